"""S3 (or compatible) storage: streaming multipart upload, ranged reads.  boto3 is optional.

No local disk is needed: parts are uploaded as they fill; the object appears only when the upload is
completed after COMMIT, and a failed upload is aborted, so a partial backup is never visible.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any, BinaryIO

from . import StorageError

PART_SIZE = 8 << 20  # S3's minimum part size is 5 MiB (except the last part)
READ_BUFFER = 1 << 16


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


class S3Sink:
    """Multipart upload of the backup stream to s3://bucket/prefix/NAME."""

    def __init__(self, url: str, name: str) -> None:
        bucket, prefix = parse_url(url)
        self.bucket = bucket
        self.key = f"{prefix.rstrip('/')}/{name}" if prefix.strip("/") else name
        self.client = client()
        self.parts: list[dict[str, Any]] = []
        self.buffer = bytearray()
        try:
            resp = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            raise StorageError(f"S3 upload to s3://{self.bucket}/{self.key} failed: {_short(exc)}") from None
        self.upload_id: str | None = resp["UploadId"]

    def _upload(self, data: bytes) -> None:
        number = len(self.parts) + 1
        try:
            resp = self.client.upload_part(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=data
            )
        except Exception as exc:
            raise StorageError(f"S3 upload of part {number} failed: {_short(exc)}") from None
        self.parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    def write(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= PART_SIZE:
            self._upload(bytes(self.buffer[:PART_SIZE]))
            del self.buffer[:PART_SIZE]

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


class RangeReader(io.RawIOBase):
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
            raise StorageError(f"cannot open {url}: {_short(exc)}") from None
        self.size = int(head["ContentLength"])
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self.pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise OSError("negative seek position")
        self.pos = pos
        return pos

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        if self.pos >= self.size or not len(view):
            return 0
        end = min(self.pos + len(view), self.size)
        try:
            rng = f"bytes={self.pos}-{end - 1}"
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=rng)
            data = resp["Body"].read()
        except Exception as exc:
            raise OSError(f"S3 read failed: {_short(exc)}") from None
        n = min(len(data), len(view))
        if n == 0:
            raise OSError("S3 object shorter than announced")
        view[:n] = data[:n]
        self.pos += n
        return n


def open_object(url: str) -> BinaryIO:
    return io.BufferedReader(RangeReader(url), buffer_size=READ_BUFFER)  # type: ignore[return-value]
