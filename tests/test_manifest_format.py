"""The manifest's size buckets (FORMAT.md section 6, issue 10 item 8) and the strict checks of section 6."""

from __future__ import annotations

import pytest
from qubes_backup_dom0 import manifest
from qubes_backup_dom0.errors import VerificationError
from qubes_backup_dom0.manifest import ArchiveEntry, FileEntry, Manifest, padded_size

BACKUP_ID = "00112233445566778899aabbccddeeff"
CREATED = "2026-01-01T00:00:00Z"
QUBES = (
    b"<qubes><labels/><pools/><properties/><domains>"
    b'<domain id="domain-0" class="AdminVM"><properties><property name="qid">0</property></properties>'
    b"<features/><tags/><volume-config/><devices/></domain></domains></qubes>"
)


def make(nfiles: int) -> Manifest:
    files = [FileEntry(f"appvms/work/f{i}", "file", i, i) for i in range(nfiles)]
    return Manifest(BACKUP_ID, CREATED, [ArchiveEntry("vm1", "work", "vm", files)], QUBES)


@pytest.mark.parametrize(
    ("n", "bucket"),
    [(0, 4096), (1, 4096), (4096, 4096), (4097, 8192), (65535, 65536), (65536, 65536), (65537, 131072),
     (131072, 131072), (131073, 262144), ((8 << 20) + 1, 16 << 20), (16 << 20, 16 << 20)],
)  # fmt: skip
def test_buckets(n: int, bucket: int) -> None:
    assert padded_size(n) == bucket


def test_render_pads_and_file_count_does_not_show() -> None:
    lengths = set()
    for n in range(5, 15):
        data = make(n).render()
        assert len(data) == padded_size(len(data.rstrip(b" ")))
        assert data.rstrip(b" ").endswith(b"</qubes-backup-manifest>\n")
        parsed = manifest.parse(data)
        assert len(parsed.archives[0].files) == n
        lengths.add(len(data))
    assert lengths == {4096}, "ten manifests with 5..14 files must all be 4 KiB"


def test_large_manifest_uses_power_of_two() -> None:
    data = make(2000).render()
    assert len(data) == 1 << (len(data) - 1).bit_length() and len(data) > 65536
    manifest.parse(data)


@pytest.mark.parametrize("how", ["unpadded", "one-more", "one-less", "newline", "tab", "nul", "next-bucket"])
def test_parser_accepts_exactly_the_padding(how: str) -> None:
    good = make(3).render()
    body = good.rstrip(b" ")
    pad = len(good) - len(body)
    bad = {
        "unpadded": body,
        "one-more": good + b" ",
        "one-less": good[:-1],
        "newline": body + b"\n" * pad,
        "tab": body + b" " * (pad - 1) + b"\t",
        "nul": body + b" " * (pad - 1) + b"\0",
        "next-bucket": body + b" " * (pad + 4096),
    }[how]
    with pytest.raises(VerificationError):
        manifest.parse(bad)
