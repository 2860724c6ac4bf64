"""S3 locations (``s3://bucket/prefix``) end to end, against a local S3 server (moto) on 127.0.0.1 only.

The real console scripts run the real agent, which talks to moto through boto3: ``AWS_*`` variables reach the
agent (transport.PASS_ENV_PREFIXES), ``AWS_ENDPOINT_URL`` points it at the local server.  The agent runs with
``QUBES_SIM_SANDBOX=0`` because the bubblewrap sandbox unshares the network namespace by design (a simulated
backup VM has no network), so a sandboxed agent could not reach even 127.0.0.1.

boto3 and moto are test dependencies (requirements-dev.txt); if they are missing these tests FAIL, they do not
skip: the S3 hook must not go untested silently.
"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Sim, make_fresh, new_sim, one_error_line
from qubes_backup_sim import simgen
from test_cli_restore import assert_same_vm

try:
    import boto3
    from moto.server import ThreadedMotoServer
except ImportError as exc:  # pragma: no cover - the failure below is the point
    boto3 = None
    ThreadedMotoServer = None
    IMPORT_ERROR: str | None = f"{exc}; install them: .venv/bin/pip install -r requirements-dev.txt"
else:
    IMPORT_ERROR = None

from qubes_backup_agent.storage import s3 as s3_storage

LOOPBACK = "127.0.0.1"  # the test server listens here and nowhere else
NAME_RE = re.compile(r"qubes-backup-\d{4}-\d\d-\d\dT\d{6}(?:-\d+)?")
PART_MIB = 5  # S3's minimum part size: the most parts for the least data


class Counter:
    """WSGI middleware around moto's app: records (method, path, query, Range, response bytes) per request."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, str, str, int]] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        query, rng = environ.get("QUERY_STRING", ""), environ.get("HTTP_RANGE", "")
        size = 0
        try:
            for piece in self.app(environ, start_response):
                size += len(piece)
                yield piece
        finally:
            with self.lock:
                self.log.append((method, path, query, rng, size))

    def requests(self) -> list[tuple[str, str, str, str, int]]:
        with self.lock:
            return list(self.log)


@dataclass
class S3Server:
    endpoint: str
    client: Any
    counter: Counter

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def keys(self, bucket: str) -> list[str]:
        return [o["Key"] for o in self.client.list_objects_v2(Bucket=bucket).get("Contents", [])]

    def uploads(self, bucket: str) -> list[dict[str, Any]]:
        return list(self.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


@pytest.fixture(scope="session")
def s3server() -> Iterator[S3Server]:
    if IMPORT_ERROR is not None:
        pytest.fail(f"boto3 and moto[server] are needed for the S3 tests: {IMPORT_ERROR}", pytrace=False)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log on stderr
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        assert host == LOOPBACK, host
        server._server.app = counter = Counter(server._server.app)  # type: ignore[union-attr]
        endpoint = f"http://{LOOPBACK}:{port}"
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip
        yield S3Server(endpoint, client, counter)
    finally:
        server.stop()


@pytest.fixture
def bucket(s3server: S3Server) -> str:
    name = f"qb-{uuid.uuid4().hex[:12]}"
    s3server.client.create_bucket(Bucket=name)
    return name


@dataclass
class S3Sim(Sim):
    """A simulated system whose CLIs reach the local S3 server (agent unsandboxed: it needs the network)."""

    extra: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = super().env()
        env.update(self.extra)
        env["QUBES_SIM_SANDBOX"] = "0"
        return env


def s3sim(sim: Sim, server: S3Server, **extra: str) -> S3Sim:
    return S3Sim(sim.dir, {**server.env, **extra})


def backup_name(stdout: str, url: str) -> str:
    m = re.fullmatch(rf"Backup written to: backupvm:{re.escape(url)}/({NAME_RE.pattern}) \(backup id .*\)",
                     stdout.strip())  # fmt: skip
    assert m, stdout
    return m.group(1)


def part_numbers(server: S3Server, key: str) -> set[int]:
    """Part numbers uploaded for ``key`` (from the server's request log)."""
    out = set()
    for method, path, query, _rng, _size in server.counter.requests():
        m = re.search(r"(?:^|&)partNumber=(\d+)", query)
        if method == "PUT" and path.endswith("/" + key) and m:
            out.add(int(m.group(1)))
    return out


# -- (1) backup: one object, a valid tar, no multipart upload left ----------------------------------------------


def test_backup_stores_one_object(tmp_path: Path, s3server: S3Server, bucket: str) -> None:
    sim = s3sim(new_sim(tmp_path / "sim"), s3server)
    url = f"s3://{bucket}/prefix"
    r = sim.backup("-q", "-d", "backupvm", url)
    assert r.returncode == 0, r.stderr
    name = backup_name(r.stdout, url)
    assert s3server.keys(bucket) == [f"prefix/{name}"]
    assert s3server.uploads(bucket) == []
    body = s3server.client.get_object(Bucket=bucket, Key=f"prefix/{name}")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
        names = tar.getnames()
    assert names[0] == "backup-header", names[:3]
    assert len(names) > 3
    # Nothing was written into the backup VM's filesystem.
    assert not any(p.name.startswith("qubes-backup-") for p in sim.vm_root("backupvm").rglob("*"))


def test_backup_without_prefix(tmp_path: Path, s3server: S3Server, bucket: str) -> None:
    sim = s3sim(new_sim(tmp_path / "sim"), s3server)
    r = sim.backup("-q", "-d", "backupvm", f"s3://{bucket}")
    assert r.returncode == 0, r.stderr
    name = backup_name(r.stdout, f"s3://{bucket}")
    assert s3server.keys(bucket) == [name]


# -- (2) multipart with several parts, (3) restores from it -----------------------------------------------------


@pytest.fixture(scope="module")
def big_backup(tmp_path_factory: pytest.TempPathFactory, s3server: S3Server) -> tuple[Sim, str, str, str]:
    """A 40 MiB-data system backed up to S3 with 5 MiB parts; returns (source, bucket, key, s3 url)."""
    path = tmp_path_factory.mktemp("big") / "sim"
    simgen.generate(path, "bench", seed=1, data_mib=40, apparent_gib=1)
    (path / "dom0" / "pw").write_text("correct horse battery staple\n")
    sim = s3sim(Sim(path), s3server, QUBES_AGENT_S3_PART_MIB=str(PART_MIB))
    bucket = f"qb-{uuid.uuid4().hex[:12]}"
    s3server.client.create_bucket(Bucket=bucket)
    r = sim.backup("-q", "-d", "backupvm", f"s3://{bucket}/big")
    assert r.returncode == 0, r.stderr
    name = backup_name(r.stdout, f"s3://{bucket}/big")
    key = f"big/{name}"
    return sim, bucket, key, f"s3://{bucket}/{key}"


def test_multipart_upload_has_several_parts(big_backup: tuple[Sim, str, str, str], s3server: S3Server) -> None:
    _sim, bucket, key, _url = big_backup
    assert s3server.keys(bucket) == [key]
    assert s3server.uploads(bucket) == []
    head = s3server.client.head_object(Bucket=bucket, Key=key)
    size = head["ContentLength"]
    parts = part_numbers(s3server, key)
    expected = -(-size // (PART_MIB << 20))
    assert len(parts) >= 3, (size, parts)
    assert parts == set(range(1, expected + 1)), (size, parts)
    # A multipart object's ETag is "<md5 of the part md5s>-<number of parts>".
    assert head["ETag"].strip('"').endswith(f"-{expected}"), head["ETag"]
    body = s3server.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert len(body) == size
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
        assert tar.getnames()[0] == "backup-header"


def test_restore_everything_from_s3(tmp_path: Path, big_backup: tuple[Sim, str, str, str], s3server: S3Server) -> None:
    src, _bucket, _key, url = big_backup
    dst = s3sim(make_fresh(tmp_path / "fresh", src), s3server)
    r = dst.restore("-d", "backupvm", url)
    assert r.returncode == 0, r.stderr
    restored = set(dst.collection().names()) - {"dom0", "backupvm"}
    assert len(restored) >= 5, restored
    for name in sorted(restored):
        assert_same_vm(src, name, dst)


def test_restore_one_vm_reads_ranges(tmp_path: Path, big_backup: tuple[Sim, str, str, str], s3server: S3Server) -> None:
    """A single VM: the agent seeks over the other VMs' archives, so S3 serves a small part of the object."""
    src, bucket, key, url = big_backup
    size = s3server.client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    dst = s3sim(make_fresh(tmp_path / "fresh", src), s3server)
    before = len(s3server.counter.requests())
    r = dst.restore("-d", "backupvm", url, "legacy-hvm")
    assert r.returncode == 0, r.stderr
    assert sorted(dst.collection().names()) == ["backupvm", "dom0", "legacy-hvm"]
    assert_same_vm(src, "legacy-hvm", dst)
    gets = [q for q in s3server.counter.requests()[before:] if q[0] == "GET" and q[1].endswith("/" + key)]
    assert gets and all(rng.startswith("bytes=") for _m, _p, _q, rng, _n in gets), gets[:5]
    served = sum(n for *_rest, n in gets)
    legacy = sum(p.stat().st_blocks * 512 for p in src.volume_files("legacy-hvm").values())
    assert served < size // 3, (served, size, legacy)


# -- (4) an interrupted backup leaves nothing ---------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_backup_aborts_upload(tmp_path: Path, s3server: S3Server, bucket: str, sig: signal.Signals) -> None:
    path = tmp_path / "sim"
    simgen.generate(path, "bench", seed=2, data_mib=60, apparent_gib=1)
    (path / "dom0" / "pw").write_text("correct horse battery staple\n")
    sim = s3sim(Sim(path), s3server, QUBES_AGENT_S3_PART_MIB=str(PART_MIB))
    proc = sim.popen("qvm-backup", "-y", "-q", "-p", "/pw", "--kdf-n", "1024", "--weak-kdf-ok", "-d", "backupvm", f"s3://{bucket}/p")
    try:
        deadline = time.monotonic() + 60
        while True:  # wait until the first part is stored, then freeze dom0's side mid-stream
            uploads = s3server.uploads(bucket)
            if uploads:
                listed = s3server.client.list_parts(
                    Bucket=bucket, Key=uploads[0]["Key"], UploadId=uploads[0]["UploadId"]
                )
                if listed.get("Parts"):
                    break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no part was uploaded"
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)
        assert proc.poll() is None
        proc.send_signal(sig)
        if sig != signal.SIGKILL:
            proc.send_signal(signal.SIGCONT)
        out, _err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out
    assert "Backup written" not in out
    deadline = time.monotonic() + 30  # the orphaned agent sees end of stream and aborts the upload
    while s3server.uploads(bucket) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert s3server.uploads(bucket) == []
    assert not [k for k in s3server.keys(bucket) if "qubes-backup-" in k]


# -- (5) errors ---------------------------------------------------------------------------------------------------


def test_missing_bucket_is_one_error_line(tmp_path: Path, s3server: S3Server) -> None:
    sim = s3sim(new_sim(tmp_path / "sim"), s3server)
    r = sim.backup("-q", "-d", "backupvm", "s3://no-such-bucket-qb/prefix")
    assert r.returncode != 0
    assert "Backup written" not in r.stdout
    assert "S3 bucket does not exist: no-such-bucket-qb" in one_error_line(r.stderr)


def test_missing_object_is_one_error_line(tmp_path: Path, s3server: S3Server, bucket: str) -> None:
    sim = s3sim(new_sim(tmp_path / "sim"), s3server)
    r = sim.restore("-d", "backupvm", f"s3://{bucket}/nothing/qubes-backup-2020-01-01T000000")
    assert r.returncode != 0
    assert "no such S3 object" in one_error_line(r.stderr)


def test_missing_credentials_is_one_error_line(tmp_path: Path, s3server: S3Server, bucket: str) -> None:
    sim = s3sim(new_sim(tmp_path / "sim"), s3server)
    sim.extra = {k: v for k, v in sim.extra.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env_keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE")
    saved = {k: os.environ.pop(k) for k in env_keys if k in os.environ}
    try:
        sim.extra["AWS_SHARED_CREDENTIALS_FILE"] = sim.extra["AWS_CONFIG_FILE"] = str(tmp_path / "none")
        r = sim.backup("-q", "-d", "backupvm", f"s3://{bucket}/p")
    finally:
        os.environ.update(saved)
    assert r.returncode != 0
    assert "S3 upload to" in one_error_line(r.stderr)
    assert s3server.keys(bucket) == []


# -- part sizes -----------------------------------------------------------------------------------------------------


def test_part_sizes_reach_beyond_80_gib() -> None:
    sizes = [s3_storage.part_size(n) for n in range(1, s3_storage.MAX_PARTS + 1)]
    assert sizes[0] == sizes[999] == 8 << 20
    assert sizes[1000] == 16 << 20
    assert all(s3_storage.MIN_PART_SIZE <= s <= s3_storage.MAX_PART_SIZE for s in sizes)
    assert sum(sizes) > 5 << 40  # 5 TiB


def test_part_size_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(s3_storage.PART_SIZE_ENV, "1")
    assert s3_storage.base_part_size() == s3_storage.MIN_PART_SIZE
    monkeypatch.setenv(s3_storage.PART_SIZE_ENV, "64")
    assert s3_storage.base_part_size() == 64 << 20
    monkeypatch.setenv(s3_storage.PART_SIZE_ENV, "x")
    with pytest.raises(s3_storage.StorageError):
        s3_storage.base_part_size()


def test_backup_location_is_not_a_path(tmp_path: Path) -> None:
    """``s3://`` is never taken for a path or a command inside the VM."""
    from qubes_backup_agent.storage import classify

    assert classify("s3://b/p", tmp_path, want_dir=True).kind == "s3"
    assert classify("s3://b/p/qubes-backup-2020-01-01T000000", tmp_path, want_dir=False).kind == "s3"
