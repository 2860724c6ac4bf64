"""A repository in an S3 bucket (or a compatible service): ``s3://bucket/prefix``, boto3 and its credentials
as the single-file S3 storage (storage/s3.py: the usual AWS_* variables and files, ``AWS_ENDPOINT_URL``).

Each repository file is one S3 object, ``prefix/`` + its name in a directory repository (``repo-header``,
``roots/NAME``, ``objects/XX/ID``).  A PUT is atomic (the object appears whole or not at all) and durable when
it returns, so no temporary names are needed.  Exclusive names (the lock, the header, a root) are written with
a conditional PUT (``If-None-Match: *``): the service refuses to replace an existing object (AWS S3 since
2024, MinIO, Ceph RGW); a service that ignores the condition could let a root be replaced, which dom0 then
refuses as a fork (docs/REPOSITORY.md section 8).  Every GET asks for at most the file's bound plus one byte
(``Range``) and checks the total size the answer states before reading its body.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from qubes_backup_protocol import repo as names

from ..storage import StorageError
from ..storage import s3 as s3_storage
from .base import Exists, Missing, RemoteStore

MAX_PAGE_KEYS = 1000  # S3 answers at most 1,000 keys per listing page
_MISSING = ("404", "NoSuchKey", "NotFound")


class S3Store(RemoteStore):
    def __init__(self, url: str, create: bool) -> None:
        self.bucket, prefix = s3_storage.parse_url(url)
        self.prefix = prefix.strip("/")
        self.view = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.client = s3_storage.client()
        self.listed_sizes: dict[str, int] = {}
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            if s3_storage._error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"S3 bucket does not exist: {self.bucket}") from None
            raise self._fail(exc, "opening") from None

    def _key(self, key: str) -> str:
        if not key:
            return f"{self.prefix}/" if self.prefix else ""
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, exc: Exception, doing: str, key: str = "") -> StorageError:
        where = f"{self.view}/{key}" if key else self.view
        return StorageError(f"S3: {doing} {where} failed: {s3_storage._short(exc)}")

    # -- primitives ----------------------------------------------------------------------------------

    def _get(self, key: str, length: int) -> tuple[bytes, int]:
        """Up to ``length`` bytes from the start, and the object's total size (from Content-Range)."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes=0-{length - 1}")
        except Exception as exc:
            code = s3_storage._error_code(exc)
            if code in _MISSING:
                raise Missing(key) from None
            if code in ("416", "InvalidRange"):  # an empty object
                return b"", 0
            raise self._fail(exc, "reading", key) from None
        body = resp["Body"]
        try:
            got = str(resp.get("ContentRange") or "")
            if got:
                total = got.rpartition("/")[2]
                if not got.startswith("bytes 0-") or not total.isdigit():
                    raise StorageError(f"S3: reading {self.view}/{key}: a malformed Content-Range")
                size = int(total)
            else:
                size = int(resp.get("ContentLength", -1))  # the whole object: the server ignored Range
            if size < 0:
                raise StorageError(f"S3: reading {self.view}/{key}: no size in the answer")
            want = min(size, length)
            if size > length and not got:
                return b"", size  # more than asked for, and no range: its body is never read
            data = body.read(want + 1)
        except StorageError:
            raise
        except Exception as exc:
            raise self._fail(exc, "reading", key) from None
        finally:
            with contextlib.suppress(Exception):
                body.close()
        if len(data) != want:
            raise StorageError(f"S3: reading {self.view}/{key}: the answer is not the size it states")
        return bytes(data), size

    def load(self, key: str, limit: int) -> bytes:
        data, size = self._get(key, limit + 1)
        if size > limit:
            raise StorageError(f"{key.rsplit('/', 1)[-1]} in repository {self.view} is larger than possible "
                               f"({size} bytes)")  # fmt: skip
        return data

    def load_prefix(self, key: str, length: int) -> bytes:
        return self._get(key, length)[0]

    def size(self, key: str) -> int | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            if s3_storage._error_code(exc) in _MISSING:
                return None
            raise self._fail(exc, "reading", key) from None
        return int(head["ContentLength"])

    def _pages(self, prefix: str, delimiter: bool, limit: int) -> Iterator[dict[str, Any]]:
        """Listing pages (continuation tokens followed); more than ``limit`` keys or pages is refused."""
        token: str | None = None
        seen = pages = 0
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": MAX_PAGE_KEYS}
            if delimiter:
                kw["Delimiter"] = "/"
            if token:
                kw["ContinuationToken"] = token
            try:
                page = self.client.list_objects_v2(**kw)
            except Exception as exc:
                raise self._fail(exc, "listing") from None
            pages += 1
            seen += len(page.get("Contents") or []) + len(page.get("CommonPrefixes") or [])
            if seen > limit or pages > limit // MAX_PAGE_KEYS + 16:
                raise StorageError(f"S3: {self.view}: listing {prefix or '/'} gives more than {limit} entries")
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def listdir(self, directory: str, limit: int) -> Iterator[str]:
        prefix = self._key(directory)
        if directory:
            prefix += "/"
        for page in self._pages(prefix, True, limit):
            for item in page.get("Contents") or []:
                name = str(item.get("Key", ""))[len(prefix) :]
                if name and "/" not in name:
                    yield name
            for item in page.get("CommonPrefixes") or []:
                name = str(item.get("Prefix", ""))[len(prefix) :].rstrip("/")
                if name and "/" not in name:
                    yield name

    def save(self, key: str, data: bytes, *, exclusive: bool, durable: bool) -> None:
        kw: dict[str, Any] = {"IfNoneMatch": "*"} if exclusive else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **kw)
        except Exception as exc:
            if exclusive and s3_storage._error_code(exc) in ("412", "PreconditionFailed",
                                                              "ConditionalRequestConflict"):  # fmt: skip
                raise Exists(key) from None
            raise self._fail(exc, "storing", key) from None

    def remove(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            if s3_storage._error_code(exc) not in _MISSING:
                raise self._fail(exc, "removing", key) from None

    def sync(self) -> None:
        """Nothing to do: a PUT that returned is durable."""

    def disconnect(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    def clean_tmp(self) -> None:
        """Nothing to do: an S3 PUT needs no temporary object (a killed one leaves nothing)."""

    def object_ids(self) -> Iterator[str]:
        """One listing of ``prefix/objects/`` (1,000 keys a page, in key order), keeping each object's size."""
        prefix = self._key(names.OBJECTS_DIR) + "/"
        for page in self._pages(prefix, False, 1 << 40):
            for item in page.get("Contents") or []:
                sub, _slash, oid = str(item.get("Key", ""))[len(prefix) :].partition("/")
                if names.is_object_name(oid) and oid[:2] == sub:
                    if isinstance(item.get("Size"), int):
                        self.listed_sizes[oid] = item["Size"]
                    yield oid
