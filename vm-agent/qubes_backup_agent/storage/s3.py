"""S3 (or compatible) storage: streaming multipart upload, ranged reads.  boto3 is optional.

No local disk is needed: parts are uploaded as they fill; the object appears only when the upload is
completed after COMMIT, and a failed upload is aborted, so a partial backup is never visible.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any, BinaryIO

from . import SeekableReader, StorageError

PART_SIZE = 8 << 20  # S3's minimum part size is 5 MiB (except the last part)
MIN_PART_SIZE = 5 << 20
MAX_PART_SIZE = 5 << 30  # S3's maximum part size
MAX_PARTS = 10_000  # S3's maximum number of parts in one upload
PARTS_PER_DOUBLING = 1000
PART_SIZE_ENV = "QUBES_AGENT_S3_PART_MIB"  # optional override of the first parts' size, in MiB
READ_BUFFER = 1 << 16
READ_ATTEMPTS = 3


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"bad S3 location (want s3://bucket/prefix): {url}")
    return bucket, key


def client() -> Any:
    """A boto3 S3 client; endpoint from AWS_ENDPOINT_URL if set (MinIO, Ceph, a local test server)."""
    try:
        import boto3  # type: ignore[import-not-found]
    except ImportError:
        raise StorageError("S3 locations need boto3, which is not installed in the backup VM") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=endpoint)


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _error_code(exc: Exception) -> str:
    """The S3 error code of a botocore ClientError ("NoSuchBucket", "404", ...), else ""."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def base_part_size() -> int:
    """Size of the first parts: PART_SIZE, or QUBES_AGENT_S3_PART_MIB (clamped to S3's limits)."""
    raw = os.environ.get(PART_SIZE_ENV)
    if not raw:
        return PART_SIZE
    try:
        mib = int(raw)
    except ValueError:
        raise StorageError(f"{PART_SIZE_ENV} is not a whole number of MiB: {raw}") from None
    return min(max(mib << 20, MIN_PART_SIZE), MAX_PART_SIZE)


def part_size(number: int, base: int = PART_SIZE) -> int:
    """Size of part ``number`` (1-based).  S3 allows at most 10,000 parts, so a fixed 8 MiB part would cap
    an upload at 80 GiB: the size doubles every 1,000 parts instead (8 MiB parts up to ~8 GiB, then 16 MiB,
    ...; ~8 TiB in 10,000 parts), so small backups keep small buffers."""
    return min(base << ((number - 1) // PARTS_PER_DOUBLING), MAX_PART_SIZE)


class S3Sink:
    """Multipart upload of the backup stream to s3://bucket/prefix/NAME."""

    def __init__(self, url: str, name: str) -> None:
        bucket, prefix = parse_url(url)
        self.bucket = bucket
        self.key = f"{prefix.rstrip('/')}/{name}" if prefix.strip("/") else name
        self.base = base_part_size()
        self.client = client()
        self.parts: list[dict[str, Any]] = []
        self.buffer = bytearray()
        try:
            resp = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if _error_code(exc) == "NoSuchBucket":
                raise StorageError(f"S3 bucket does not exist: {self.bucket}") from None
            raise StorageError(f"S3 upload to s3://{self.bucket}/{self.key} failed: {_short(exc)}") from None
        self.upload_id: str | None = resp["UploadId"]

    def _upload(self, data: bytes) -> None:
        number = len(self.parts) + 1
        if number > MAX_PARTS:
            raise StorageError(f"S3 upload too large: more than {MAX_PARTS} parts")
        try:
            resp = self.client.upload_part(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=data
            )
        except Exception as exc:
            raise StorageError(f"S3 upload of part {number} failed: {_short(exc)}") from None
        self.parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    def write(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= (size := part_size(len(self.parts) + 1, self.base)):
            self._upload(bytes(self.buffer[:size]))
            del self.buffer[:size]

    def commit(self) -> str:
        if self.buffer or not self.parts:
            self._upload(bytes(self.buffer))
            self.buffer.clear()
        try:
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts},
            )
        except Exception as exc:
            raise StorageError(f"S3 upload could not be completed: {_short(exc)}") from None
        self.upload_id = None
        return f"s3://{self.bucket}/{self.key}"

    def abort(self) -> None:
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
            self.upload_id = None


class _ReadError(OSError):
    """A read failure that retrying cannot fix."""


class RangeReader(SeekableReader):
    """A seekable read-only file over one S3 object: each read is an HTTP Range GET.

    tarfile in seekable mode then skips unwanted members without downloading them.
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        self.bucket, self.key = parse_url(url)
        if not self.key:
            raise StorageError(f"bad S3 location (want s3://bucket/key): {url}")
        self.client = client()
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            code = _error_code(exc)
            if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
                raise StorageError(f"no such S3 object: {url}") from None
            raise StorageError(f"cannot open {url}: {_short(exc)}") from None
        self.size = int(head["ContentLength"])
        # Every ranged read names this ETag: if the object is replaced during the restore, reads fail
        # instead of mixing bytes of two different objects.
        self.etag: str | None = head.get("ETag")
        self.pos = 0


    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        if self.pos >= self.size or not len(view):
            return 0
        end = min(self.pos + len(view), self.size)
        data = self._get(self.pos, end)
        n = min(len(data), len(view))
        view[:n] = data[:n]
        self.pos += n
        return n

    def _get(self, start: int, end: int) -> bytes:
        """Bytes ``start``..``end``-1 of the object (one ranged GET; a short or failed body is retried)."""
        rng = f"bytes={start}-{end - 1}"
        kw: dict[str, Any] = {"IfMatch": self.etag} if self.etag else {}
        error = "no data"
        for _attempt in range(READ_ATTEMPTS):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=rng, **kw)
                got = resp.get("ContentRange")
                if got is not None and not str(got).startswith(f"bytes {start}-{end - 1}/"):
                    raise _ReadError(f"S3 read failed: asked for {rng}, got {str(got)[:80]}")
                if got is None and (start, end) != (0, self.size):
                    # a whole object where a range was asked: never read it (it may be the whole backup)
                    raise _ReadError("S3 read failed: the server ignored the Range header")
                data = _read_body(resp["Body"], end - start)
            except _ReadError:
                raise
            except Exception as exc:
                if _error_code(exc) in ("412", "PreconditionFailed"):
                    raise _ReadError("S3 read failed: the backup object changed during the restore") from None
                error = _short(exc)
                continue
            if data:
                return bytes(data)
            error = "S3 object shorter than announced"
        raise OSError(f"S3 read failed: {error}")


def _read_body(body: Any, want: int) -> bytes:
    """At most ``want`` bytes of a response body (a server sending more than the range it announced is
    refused, without reading on); the body is closed."""
    try:
        data = body.read(want + 1)
    finally:
        with contextlib.suppress(Exception):
            body.close()
    if len(data) > want:
        raise _ReadError("S3 read failed: the server sent more than the range asked for")
    return bytes(data)


def open_object(url: str) -> BinaryIO:
    return io.BufferedReader(RangeReader(url), buffer_size=READ_BUFFER)  # type: ignore[return-value]
