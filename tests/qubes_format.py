"""Backups in Qubes OS' own format (v4), written the way Qubes' qvm-backup writes them, with the real tools.

qubes-core-admin's qubes/backup.py (release4.2 and release4.3 alike), for a backup of format version 4:

- ``backup-header``: ``version=4`` first, then ``encrypted``, ``compressed``, ``compression-filter``,
  ``hmac-algorithm=scrypt``, ``backup-id`` (``%Y%m%dT%H%M%S-PID``), one ``key=value`` a line;
  ``backup-header.hmac``: ``scrypt enc`` of it with the passphrase ``backup-header!`` + passphrase.
- every file (``qubes.xml`` first, then each VM's files under ``SUBDIR/``): ``tar -Pc --sparse`` (``-C DIR
  --dereference --xform=s:^NAME:SUBDIR\\0: NAME``, gzip through ``--use-compress-program``), cut into
  chunks of ``chunk_size`` (100 MiB), each ``scrypt enc - FILE.NNN.enc`` with the passphrase
  ``BACKUP_ID!FILE.NNN!`` + passphrase.
- the stream: for every file in turn, ``tar -cO --posix -C TMPDIR FILE`` appended (each its own archive,
  ended and padded by GNU tar), header and hmac first; into a dom0 directory as ``qubes-%Y-%m-%dT%H%M%S``
  (qubes/backup.py), into a VM directory as ``qubes-backup-%Y-%m-%dT%H%M%S`` (its qubes.Backup service).

Here the same programs do the same things; only the scrypt work parameters are given explicitly and small
(``--logN 10 -r 8 -p 1``; Qubes lets ``scrypt enc`` pick them, up to 5 s of work per file): the files are
still ``scrypt enc`` files that ``scrypt dec`` opens.  Needs GNU tar and the scrypt command line tool
(Debian: package ``scrypt``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

SCRYPT = shutil.which("scrypt")
FAST_SCRYPT = ("--logN", "10", "-r", "8", "-p", "1")
CHUNK_SIZE = 100 * 1024 * 1024  # qubes/backup.py's default chunk_size
HEADER_KEYS = ("encrypted", "compressed", "compression-filter", "hmac-algorithm", "backup-id")


def have_tools() -> bool:
    tar = shutil.which("tar")
    if SCRYPT is None or tar is None:
        return False
    out = subprocess.run([tar, "--version"], capture_output=True, text=True, check=False).stdout
    return "GNU tar" in out


def qubes_header(backup_id: str, compressed: bool = True) -> bytes:
    """The backup-header text qubes/backup.py's BackupHeader.save writes."""
    values = {"encrypted": "True", "compressed": str(compressed), "compression-filter": "gzip",
              "hmac-algorithm": "scrypt", "backup-id": backup_id}  # fmt: skip
    return ("version=4\n" + "".join(f"{k}={values[k]}\n" for k in HEADER_KEYS)).encode("ascii")


def _scrypt_enc(src: str, dst: Path, passphrase: bytes, stdin: bytes | None = None) -> None:
    assert SCRYPT is not None, "the scrypt command line tool is not installed"
    env = {**os.environ, "QF_SCRYPT_PASSPHRASE": passphrase.decode("utf-8", "surrogateescape")}
    subprocess.run([SCRYPT, "enc", *FAST_SCRYPT, "--passphrase", "env:QF_SCRYPT_PASSPHRASE", src, str(dst)],
                   input=stdin, env=env, check=True, capture_output=True)  # fmt: skip


def scrypt_dec(path: Path, passphrase: bytes) -> bytes:
    """What ``scrypt dec`` makes of ``path`` (Qubes' restore verifies the header this way)."""
    assert SCRYPT is not None
    env = {**os.environ, "QF_SCRYPT_PASSPHRASE": passphrase.decode("utf-8", "surrogateescape")}
    r = subprocess.run([SCRYPT, "dec", "--passphrase", "env:QF_SCRYPT_PASSPHRASE", str(path)],
                       env=env, check=True, capture_output=True)  # fmt: skip
    return r.stdout


def write_qubes_backup(out: Path, passphrase: str, files: dict[str, bytes], qubes_xml: bytes = b"<qubes/>\n",
                       compressed: bool = True, chunk_size: int = CHUNK_SIZE) -> str:  # fmt: skip
    """Write a Qubes v4 backup to ``out`` (appending, as Qubes' SendWorker does); returns its backup id.

    ``files`` maps ``SUBDIR/NAME`` (``vm1/private.img``) to the file's content (written sparse: zero runs
    become holes, as on a VM's volume)."""
    pw = passphrase.encode()
    backup_id = time.strftime("%Y%m%dT%H%M%S-") + str(os.getpid())
    with tempfile.TemporaryDirectory(prefix="qubes-sample-") as tmp, tempfile.TemporaryDirectory() as srcdir:
        tmpdir, src = Path(tmp), Path(srcdir)
        (tmpdir / "backup-header").write_bytes(qubes_header(backup_id, compressed))
        _scrypt_enc(str(tmpdir / "backup-header"), tmpdir / "backup-header.hmac", b"backup-header!" + pw)
        to_send = ["backup-header", "backup-header.hmac"]
        for rel, data in [("qubes.xml", qubes_xml), *files.items()]:
            subdir, _, name = rel.rpartition("/")
            subdir = subdir + "/" if subdir else ""
            with open(src / name, "wb") as f:
                for off in range(0, len(data), 4096):
                    block = data[off : off + 4096]
                    if any(block):
                        f.seek(off)
                        f.write(block)
                f.truncate(len(data))
            argv = ["tar", "-Pc", "--sparse", "-C", str(src), "--dereference",
                    f"--xform=s:^{name}:{subdir}\\0:", name]  # fmt: skip
            if compressed:
                argv.insert(-2, "--use-compress-program=gzip")
            stream = subprocess.run(argv, check=True, capture_output=True).stdout
            (tmpdir / subdir).mkdir(parents=True, exist_ok=True)
            for i, off in enumerate(range(0, max(len(stream), 1), chunk_size)):
                chunk = f"{subdir}{name}.{i:03d}"
                _scrypt_enc("-", tmpdir / f"{chunk}.enc", f"{backup_id}!{chunk}!".encode() + pw,
                            stdin=stream[off : off + chunk_size])  # fmt: skip
                to_send.append(f"{chunk}.enc")
            (src / name).unlink()
        with open(out, "ab") as f:
            for name in to_send:
                f.write(subprocess.run(["tar", "-cO", "--posix", "-C", str(tmpdir), name],
                                       check=True, capture_output=True).stdout)  # fmt: skip
    return backup_id


def tar_layout(data: bytes) -> list[tuple[str, str]]:
    """(typeflag, name) of every header block of a concatenation of tar archives, zero blocks skipped (as
    Qubes' restore reads it, ``tar -i``); a structural fingerprint to compare samples with."""
    out: list[tuple[str, str]] = []
    off = 0
    while off + 512 <= len(data):
        h = data[off : off + 512]
        off += 512
        if not any(h):
            continue
        size = int(h[124:136].rstrip(b"\0 ") or b"0", 8)
        out.append((h[156:157].decode("latin-1"), h[0:100].split(b"\0", 1)[0].decode("latin-1")))
        off += size + (-size % 512)
    return out
