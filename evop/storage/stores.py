"""Object stores for what outlives a process: a local directory or an S3 bucket.

:func:`open_store` turns a URI (``file://``, a plain path or ``s3://bucket/prefix``) into an
:class:`ObjectStore` (:class:`LocalStore` or :class:`S3Store`); opened with a
:class:`~evop.storage.retry.RetryPolicy`, its requests retry transient failures (an outage) for
minutes before a step fails. Every failure is a :class:`StorageError` that says whether trying again
can help.

Credentials for S3 come from the standard AWS chain (environment, ``~/.aws``, instance role);
they are never read from the EvoP config and never logged (a URL with credentials in it is refused).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from evop.errors import EvoPError
from evop.storage.retry import RetryingStore, RetryPolicy
from evop.storage.urls import credentials_problem

log = logging.getLogger(__name__)


class StorageError(EvoPError, RuntimeError):
    """The checkpoint store cannot be reached or refused the request (names bucket/path).

    Args:
        message: What failed, naming the bucket or path.
        transient: True when trying again later may succeed (an outage); False for bad input
            that fails the same way every time (missing bucket, refused credentials, bad URI).
    """

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.permanent = not transient


class ObjectStore(Protocol):
    """The few operations checkpoints need; keys are '/'-separated, relative to the store root.

    ``get_tagged`` and ``put_if`` are a compare-and-swap for small coordination objects (the
    search lease): the tag identifies the version read, and ``put_if`` writes only over that
    version (``tag=None``: only where there is none). A server that ignores S3's conditional
    headers makes ``put_if`` a plain write; :mod:`evop.storage.lease` reads back to make sure.
    """

    uri: str

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes | None: ...  # None when the key does not exist

    def get_tagged(self, key: str) -> tuple[bytes, str] | None: ...

    def put_if(self, key: str, data: bytes, tag: str | None) -> bool: ...

    def url(self, key: str) -> str: ...


# Local errors a retry cannot fix; anything else (EIO, ESTALE on a network mount...) may pass.
_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}


def _local_error(err: OSError, action: str, path: Path) -> StorageError:
    return StorageError(
        f"cannot {action} {path}: {err.strerror or err}", transient=err.errno not in _PERMANENT_ERRNOS
    )


@dataclass
class LocalStore:
    """Objects as files under a directory; writes go through a temporary file and a rename."""

    root: Path
    atomic_conditional_writes = True  # put_if is a true compare-and-swap here (see evop.storage.lease)

    @property
    def uri(self) -> str:
        return self.root.resolve().as_uri()

    def _write_tmp(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A per-process temporary name: two writers never share one, and a reader never sees a
        # half-written object (the rename is atomic); fsync so a power loss cannot leave an empty file.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        try:
            os.replace(self._write_tmp(path, data), path)
        except OSError as err:
            raise _local_error(err, "write", path) from err

    def get(self, key: str) -> bytes | None:
        path = self.root / key
        try:
            return path.read_bytes() if path.is_file() else None
        except OSError as err:
            raise _local_error(err, "read", path) from err

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        data = self.get(key)
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        import fcntl

        path = self.root / key
        try:
            tmp = self._write_tmp(path, data)
            # One writer at a time compares and swaps (an flock on a file beside the object).
            with open(path.with_name(path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                current = self.get_tagged(key)
                if (current[1] if current else None) != tag:
                    tmp.unlink()
                    return False
                os.replace(tmp, path)
                return True
        except OSError as err:
            raise _local_error(err, "write", path) from err

    def url(self, key: str) -> str:
        return (self.root / key).resolve().as_uri()


_CHANGED_MEANWHILE = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
"""Error codes of a conditional write whose object changed since it was read."""


def _code(err: Any) -> str:
    """The error code of a botocore ClientError ('NoSuchBucket', '404', ...)."""
    return str(err.response.get("Error", {}).get("Code", ""))


class S3Store:
    """Objects in ``s3://bucket/prefix`` through boto3 (any S3-compatible endpoint).

    Args:
        bucket: Bucket name; it must exist.
        prefix: Key prefix inside the bucket.
        endpoint_url: For S3-compatible servers (MinIO, rclone, ...); default: AWS or
            ``AWS_ENDPOINT_URL`` from the environment.
        region: AWS region (default from the environment / AWS config).
        max_attempts: Tries per request (first one included) before StorageError.
        connect_timeout: Seconds to wait for a connection.
        read_timeout: Seconds to wait for data on an open connection.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        *,
        max_attempts: int = 3,
        connect_timeout: float = 5,
        read_timeout: float = 30,
    ):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # Bounded retries per request: an outage surfaces as StorageError for the one retry policy
        # (evop.storage.retry, storage.retry_s) instead of hanging in botocore.
        cfg = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        # A session of its own: boto3's default session caches the first credentials it finds for
        # the life of the process, so a store opened later would ignore a changed environment (and
        # the default session is not safe to share between threads).
        session = boto3.session.Session()
        self.client = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)
        self._checked = False

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _wrap(self, err: Exception, action: str, key: str) -> StorageError:
        from botocore.exceptions import (
            ClientError,
            NoCredentialsError,
            ParamValidationError,
            PartialCredentialsError,
        )

        where = f"s3://{self.bucket}/{self._key(key)}".rstrip("/")
        if isinstance(err, ParamValidationError):  # e.g. a bucket name S3 does not allow
            return StorageError(f"not a valid S3 location {where}: {err}", transient=False)
        if isinstance(err, ClientError):
            code = _code(err)
            if code in ("NoSuchBucket",):
                return StorageError(
                    f"S3 bucket {self.bucket!r} does not exist ({action} {where})", transient=False
                )
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                return StorageError(
                    f"S3 refused the credentials for bucket {self.bucket!r} ({code})", transient=False
                )
            return StorageError(f"S3 error {code} on {action} {where}: {err}")
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(
                f"no usable S3 credentials for bucket {self.bucket!r}: {err}", transient=False
            )
        return StorageError(f"cannot reach S3 for {action} {where}: {err}")

    def check(self) -> None:
        """Fail fast with a clear message when the bucket is missing or credentials are refused."""
        from botocore.exceptions import BotoCoreError, ClientError

        if self._checked:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as err:
            # HEAD responses have no body, so a missing bucket is a bare '404' here.
            if isinstance(err, ClientError) and _code(err) in ("404", "NoSuchBucket"):
                raise StorageError(f"S3 bucket {self.bucket!r} does not exist", transient=False) from err
            raise self._wrap(err, "checking", "") from err
        self._checked = True

    def put(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self.check()
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (BotoCoreError, ClientError) as err:
            raise self._wrap(err, "writing", key) from err

    def get(self, key: str) -> bytes | None:
        tagged = self.get_tagged(key)
        return None if tagged is None else tagged[0]

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import BotoCoreError, ClientError

        self.check()
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read(), response["ETag"]
        except (BotoCoreError, ClientError) as err:
            if isinstance(err, ClientError) and _code(err) in ("NoSuchKey", "404"):
                return None
            raise self._wrap(err, "reading", key) from err

    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """S3 conditional writes (``If-None-Match: *`` / ``If-Match: <ETag>``); False when the
        object changed meanwhile. Servers that ignore the headers write unconditionally."""
        from botocore.exceptions import BotoCoreError, ClientError

        self.check()
        condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
        except (BotoCoreError, ClientError) as err:
            if isinstance(err, ClientError) and _code(err) in _CHANGED_MEANWHILE:
                return False
            raise self._wrap(err, "writing", key) from err
        return True

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def open_store(uri: str, retry: RetryPolicy | None = None) -> ObjectStore:
    """A store for ``file:///path``, a plain path, or ``s3://bucket/prefix``.

    The S3 endpoint and region come from ``AWS_ENDPOINT_URL`` / ``AWS_REGION`` (or
    ``AWS_DEFAULT_REGION``) and the usual AWS config; credentials from the AWS chain.

    Args:
        uri: Where the store is.
        retry: How its requests retry transient failures (None: they do not).

    Raises:
        StorageError: a bad URI (permanent), one with credentials in it among them.
    """
    store = _open(uri)
    return store if retry is None else RetryingStore(store, retry)


def _open(uri: str) -> ObjectStore:
    if not uri:
        raise StorageError("empty checkpoint store URI", transient=False)
    problem = credentials_problem(uri)
    if problem is not None:  # never echoed: the message holds the URL redacted
        raise StorageError(f"checkpoint store {problem}", transient=False)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"not an S3 URI (expected s3://bucket/prefix): {uri!r}", transient=False)
        return S3Store(
            parsed.netloc,
            parsed.path,
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        )
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"file URI of another host {parsed.netloc!r}: {uri!r}", transient=False)
        # Path.as_uri() percent-encodes (a space becomes %20): undo it to get the path back.
        return LocalStore(Path(unquote(parsed.path)))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # C:\... on Windows
        return LocalStore(Path(uri))
    raise StorageError(f"unsupported checkpoint store {uri!r} (use file:// or s3://)", transient=False)


_REPORTED: set[str] = set()


def report_once(message: str) -> None:
    """Log ``message`` at ERROR once per process: every step of a run reads the checkpoints
    again, and one bad object deserves one line, not one per step."""
    if message not in _REPORTED:
        _REPORTED.add(message)
        log.error("%s", message)
