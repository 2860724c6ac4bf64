"""The manifest's size buckets (FORMAT.md section 6, issue 10 item 8) and the strict checks of section 6."""

from __future__ import annotations

import pytest
from qubes_backup_dom0.errors import VerificationError
from qubes_backup_dom0.format import manifest
from qubes_backup_dom0.format.manifest import ArchiveEntry, FileEntry, Manifest, padded_size

BACKUP_ID = "00112233445566778899aabbccddeeff"
CREATED = "2026-01-01T00:00:00Z"
DOM0 = (
    b'<domain id="domain-0" class="AdminVM"><properties/><features>'
    b'<feature name="backup-content">False</feature></features></domain>'
)


def qubes(work_size: int | None, dom0: bytes = DOM0, extra: bytes = b"") -> bytes:
    work = b""
    if work_size is not None:
        work = (
            b'<domain id="domain-1" class="AppVM"><properties><property name="name">work</property></properties>'
            b'<features><feature name="backup-content">True</feature>'
            b'<feature name="backup-path">appvms/work</feature>'
            b'<feature name="backup-size">%d</feature></features></domain>' % work_size
        )
    return b"<qubes><labels/><pools/><properties/><domains>" + dom0 + work + extra + b"</domains></qubes>"


def make(nfiles: int) -> Manifest:
    files = [FileEntry(f"appvms/work/f{i}", "file", i, i) for i in range(nfiles)]
    return Manifest(BACKUP_ID, CREATED, [ArchiveEntry("vm1", "work", "vm", files)], qubes(sum(range(nfiles))))


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


# -- FORMAT.md section 6, decided (issue 10 item 9) -------------------------------------------------------

HOME_DOM0 = (
    b'<domain id="domain-0" class="AdminVM"><properties/><features>'
    b'<feature name="backup-content">True</feature><feature name="backup-path">dom0-home/user</feature>'
    b'<feature name="backup-size">%d</feature></features></domain>'
)


def home_manifest(files: list[FileEntry], dom0: bytes | None = None, work: bool = False) -> bytes:
    size = sum(f.size for f in files)
    archives = [ArchiveEntry("vm0", "dom0", "home", files)]
    wfiles = [FileEntry("appvms/work/private.img", "file", 10, 5)]
    if work:
        archives.append(ArchiveEntry("vm1", "work", "vm", wfiles))
    q = qubes(10 if work else None, dom0 if dom0 is not None else HOME_DOM0 % size)
    return Manifest(BACKUP_ID, CREATED, archives, q).render()


GOOD_HOME = [FileEntry("home/user", "dir", 0, 0), FileEntry("home/user/a", "file", 4, 4),
             FileEntry("home/user/l", "symlink", 0, 0)]  # fmt: skip


def test_good_home_manifest() -> None:
    m = manifest.parse(home_manifest(GOOD_HOME, work=True))
    assert [a.member for a in m.archives] == ["vm0", "vm1"]


@pytest.mark.parametrize(
    "bad",
    [
        [FileEntry("home/user", "dir", 4096, 0), *GOOD_HOME[1:]],  # a directory's size is 0
        [*GOOD_HOME[:2], FileEntry("home/user/l", "symlink", 7, 7)],  # so is a symlink's
        GOOD_HOME[1:],  # the first entry is the home directory itself
        [GOOD_HOME[0], FileEntry("home/other/a", "file", 4, 4)],  # everything else is below home/USER
        [FileEntry("home/other", "dir", 0, 0)],  # USER is backup-path's dom0-home/USER
    ],
    ids=["dir-size", "symlink-size", "no-home-dir", "outside-home", "other-user"],
)
def test_bad_home_archive(bad: list[FileEntry]) -> None:
    with pytest.raises(VerificationError):
        manifest.parse(home_manifest(bad))


def _feat(content: str, path: str | None = None, size: str | None = None) -> bytes:
    out = b'<feature name="backup-content">%s</feature>' % content.encode()
    if path is not None:
        out += b'<feature name="backup-path">%s</feature>' % path.encode()
    if size is not None:
        out += b'<feature name="backup-size">%s</feature>' % size.encode()
    return out


@pytest.mark.parametrize(
    "dom0",
    [
        b'<domain class="AdminVM"><properties><property name="name">admin</property></properties><features>'
        + _feat("False") + b"</features></domain>",  # dom0 is named dom0 (or has no name)
        b'<domain class="AppVM"><properties><property name="name">dom0</property></properties><features>'
        + _feat("False") + b"</features></domain>",  # dom0 is the AdminVM, not a VM named dom0
        DOM0 + DOM0,  # exactly one AdminVM
        b'<domain class="AdminVM"><features>' + _feat("True", "dom0-home/user", "0") + b"</features></domain>",
        b'<domain class="AdminVM"><features>' + _feat("False", "dom0-home/user") + b"</features></domain>",
        b'<domain class="AdminVM"><features/></domain>',  # backup-content is always there
    ],
    ids=["admin-named", "appvm-dom0", "two-admins", "content-without-archive", "path-without-archive",
         "no-content-feature"],
)
def test_dom0_identification_and_features(dom0: bytes) -> None:
    files = [FileEntry("appvms/work/private.img", "file", 10, 5)]
    data = Manifest(BACKUP_ID, CREATED, [ArchiveEntry("vm1", "work", "vm", files)], qubes(10, dom0)).render()
    with pytest.raises(VerificationError):
        manifest.parse(data)


@pytest.mark.parametrize("size", ["9", "11", "010", ""])
def test_backup_size_is_the_archive_size(size: str) -> None:
    files = [FileEntry("appvms/work/private.img", "file", 10, 5)]
    good = Manifest(BACKUP_ID, CREATED, [ArchiveEntry("vm1", "work", "vm", files)], qubes(10)).render()
    manifest.parse(good)
    bad = good.rstrip(b" ").replace(b'"backup-size">10<', b'"backup-size">%s<' % size.encode())
    with pytest.raises(VerificationError):
        manifest.parse(bad + b" " * (manifest.padded_size(len(bad)) - len(bad)))


def test_archive_without_domain_and_bad_created() -> None:
    files = [FileEntry("appvms/work/private.img", "file", 10, 5)]
    with pytest.raises(VerificationError, match="no domain"):
        manifest.parse(Manifest(BACKUP_ID, CREATED, [ArchiveEntry("vm1", "work", "vm", files)], qubes(None)).render())
    for created in ("2026-01-01 00:00:00", "2026-01-01T00:00:00+00:00", ""):
        with pytest.raises(VerificationError, match="created"):
            manifest.parse(Manifest(BACKUP_ID, created, [ArchiveEntry("vm1", "work", "vm", files)], qubes(10)).render())


def test_check_header() -> None:
    m = manifest.parse(make(1).render())
    manifest.check_header(m, BACKUP_ID, CREATED)
    with pytest.raises(VerificationError, match="another backup"):
        manifest.check_header(m, "ff" * 16, CREATED)
    with pytest.raises(VerificationError, match="creation time"):
        manifest.check_header(m, BACKUP_ID, "2026-01-01T00:00:01Z")
