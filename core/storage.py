"""Object storage: one ``ObjectStore`` interface, a local-directory backend and an S3 backend.

Keys are relative, slash-separated paths made of safe characters (``models/<id>/model.onnx``); the
local backend resolves them under its root and refuses anything that would leave it. Objects are
written whole from a local file (``put_file``) and read back as a stream of chunks (``iter_bytes``)
or into a local file (``get_file``), so no object is ever held in memory.
"""
from __future__ import annotations

import errno
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from core.errors import InsufficientStorage, NotFound, Unavailable
from core.settings import Settings, get_settings

CHUNK = 1024 * 1024
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ValueError."""
    if len(key) > 512 or not _KEY_RE.match(key) or any(part in {".", ".."} for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")
    return key


class ObjectStore(Protocol):
    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def iter_bytes(self, key: str) -> Iterator[bytes]: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def check(self) -> None:
        """Raise ``Unavailable`` when the store cannot be written."""
        ...


class LocalStore:
    """Objects as files under ``root``; writes go to a temp file and are renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        path = self.root / check_key(key)
        root = os.path.realpath(self.root)
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise ValueError(f"object key {key!r} leaves the store")
        return path

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorage(f"no disk space left in {self.root}") from exc
            raise

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise NotFound(f"object {key!r} not found")
        shutil.copyfile(source, path)

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        source = self._path(key)
        if not source.is_file():
            raise NotFound(f"object {key!r} not found")
        return _iter_file(source)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".ready-"):
                pass
        except OSError as exc:
            raise Unavailable(f"artifact directory {self.root} is not writable: {exc}") from exc


def _iter_file(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


class S3Store:
    """Objects in one S3 bucket (AWS, MinIO, or any S3-compatible server at ``endpoint_url``)."""

    def __init__(self, bucket: str, client) -> None:  # noqa: ANN001 - a boto3 S3 client
        self.bucket = bucket
        self.client = client

    @classmethod
    def from_settings(cls, settings: Settings) -> "S3Store":
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
            region_name=settings.s3_region,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )
        return cls(settings.s3_bucket, client)

    def _not_found(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        return code in {"404", "NoSuchKey", "NotFound"}

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.upload_file(str(path), self.bucket, check_key(key), ExtraArgs={"ContentType": content_type})
        except (S3UploadFailedError, BotoCoreError, ClientError) as exc:
            raise Unavailable(f"object storage refused {key!r}: {exc}") from exc

    def get_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.download_file(self.bucket, check_key(key), str(path))
        except ClientError as exc:
            if self._not_found(exc):
                raise NotFound(f"object {key!r} not found") from exc
            raise
        except BotoCoreError as exc:  # connection refused, timed out, reset: the server is away
            raise Unavailable(f"object storage unreachable reading {key!r}: {exc}") from exc

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=check_key(key))["Body"]
        except ClientError as exc:
            if self._not_found(exc):
                raise NotFound(f"object {key!r} not found") from exc
            raise
        return _iter_body(body)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=check_key(key))
        except ClientError as exc:
            if self._not_found(exc):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=check_key(key))

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise Unavailable(f"S3 bucket {self.bucket!r} is not reachable: {exc}") from exc

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist (``featherweight migrate`` calls this)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if not self._not_found(exc):
                raise
            self.client.create_bucket(Bucket=self.bucket)


def _iter_body(body) -> Iterator[bytes]:  # noqa: ANN001 - botocore StreamingBody
    try:
        yield from body.iter_chunks(CHUNK)
    finally:
        body.close()


def make_store(settings: Settings) -> ObjectStore:
    if settings.storage == "s3":
        return S3Store.from_settings(settings)
    return LocalStore(settings.resolved_artifacts_dir)


@functools.lru_cache(maxsize=1)
def get_store() -> ObjectStore:
    return make_store(get_settings())
