"""Blob storage for bulk, immutable data: tree files, rendered overlays, checkpoints, uploads.

Keys are relative POSIX paths (``projects/3/rounds/1/trees/7.npz``). The local backend maps a key to a
file under its root and refuses anything that would land outside it: absolute paths, ``..`` segments,
and symlinks pointing out. Writes are atomic (temp file + rename), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO


class StorageError(ValueError):
    """A key is malformed or points outside the storage root, or an object is missing."""


def validate_key(key: str) -> str:
    """Normalise a key, refusing anything that could escape the root."""
    if not isinstance(key, str) or not key:
        raise StorageError("storage key must be a non-empty string")
    if "\x00" in key or "\\" in key:
        raise StorageError(f"storage key {key!r} contains a NUL byte or a backslash")
    path = PurePosixPath(key)
    if path.is_absolute() or key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        raise StorageError(f"storage key {key!r} is absolute; keys are relative to the root")
    parts = [p for p in path.parts if p not in ("", ".")]
    if any(part == ".." for part in parts):
        raise StorageError(f"storage key {key!r} contains '..'")
    if not parts:
        raise StorageError(f"storage key {key!r} names the root itself")
    return "/".join(parts)


class Storage(ABC):
    """What the service and workers need from a blob store."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """A URI identifying the object, stored in the database (e.g. ``Tree.uri``)."""

    @abstractmethod
    def key_from_uri(self, uri: str) -> str:
        """Inverse of :meth:`uri`; refuses URIs of another store."""

    @abstractmethod
    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[BinaryIO]:
        """A binary file to write; the object appears atomically when the block exits cleanly."""

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A binary file to read; :class:`StorageError` if missing."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def put_bytes(self, key: str, data: bytes) -> str:
        with self.open_write(key) as handle:
            handle.write(data)
        return self.uri(key)

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as handle:
            return handle.read()


class LocalStorage(Storage):
    """A directory on local disk."""

    scheme = "file"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def path(self, key: str) -> Path:
        """The file for ``key``, guaranteed (after resolving symlinks) to be inside the root."""
        normal = validate_key(key)
        candidate = (self.root / normal).resolve()
        if candidate != self.root and not candidate.is_relative_to(self.root):
            raise StorageError(f"storage key {key!r} resolves outside the storage root")
        return candidate

    def uri(self, key: str) -> str:
        return f"{self.scheme}://{self.path(key)}"

    def key_from_uri(self, uri: str) -> str:
        prefix = f"{self.scheme}://"
        if not uri.startswith(prefix):
            raise StorageError(f"{uri!r} is not a {self.scheme}:// URI")
        path = Path(uri[len(prefix) :]).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise StorageError(f"{uri!r} is outside the storage root {self.root}")
        return path.relative_to(self.root).as_posix()

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[BinaryIO]:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Re-check after mkdir: a symlinked parent created concurrently must not redirect the write.
        self.path(key)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise

    def open_read(self, key: str) -> BinaryIO:
        path = self.path(key)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise StorageError(f"no object stored at {key!r}") from None
        except IsADirectoryError:
            raise StorageError(f"{key!r} is a directory, not an object") from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()


class S3Storage(Storage):
    """An S3 bucket (and key prefix) through boto3. Credentials, region and endpoint come from the
    standard AWS environment/configuration (``AWS_ENDPOINT_URL`` for S3-compatible stores).

    A PUT is atomic in S3, so buffering a write and uploading it on close gives the same guarantee as
    the local backend: readers see the whole object or nothing.
    """

    scheme = "s3"

    def __init__(self, bucket: str, prefix: str = "", client: Any = None) -> None:
        if not bucket:
            raise StorageError("an S3 storage URL needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if client is None:
            import boto3

            client = boto3.client("s3")
        self.client = client

    def _object_key(self, key: str) -> str:
        normal = validate_key(key)
        return f"{self.prefix}/{normal}" if self.prefix else normal

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def key_from_uri(self, uri: str) -> str:
        head = f"s3://{self.bucket}/" + (f"{self.prefix}/" if self.prefix else "")
        if not uri.startswith(head):
            raise StorageError(f"{uri!r} is not in s3://{self.bucket}/{self.prefix}")
        return validate_key(uri[len(head) :])

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[BinaryIO]:
        object_key = self._object_key(key)
        buffer = io.BytesIO()
        yield buffer
        self.client.put_object(Bucket=self.bucket, Key=object_key, Body=buffer.getvalue())

    def open_read(self, key: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise StorageError(f"no object stored at {key!r}") from None
            raise
        return io.BytesIO(response["Body"].read())

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key))


def open_storage(url: str) -> Storage:
    """Storage for a ``MASKMILL_STORAGE_URL``: a directory path, ``file://`` URL or ``s3://``."""
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return S3Storage(bucket, prefix)
    if "://" in url and not url.startswith("file://"):
        raise StorageError(
            f"unsupported storage URL {url!r}: use a directory or s3://bucket/prefix"
        )
    return LocalStorage(url.removeprefix("file://"))
