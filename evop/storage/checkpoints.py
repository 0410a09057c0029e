"""Checkpoint storage for long searches: a local directory or an S3 bucket.

:func:`open_store` turns a URI (``file://``, a plain path or ``s3://bucket/prefix``) into an
:class:`ObjectStore` (:class:`LocalStore` or :class:`S3Store`). On it, :class:`SearchCheckpoints`
writes every finished generation's :class:`~evop.method.state.SearchState` as its own JSON object
``<prefix>/generations/gen-000003.json`` carrying a SHA-256 of its payload; the manifest
``<prefix>/manifest.json`` is rewritten only after that object is complete. Loading walks the
manifest from the newest generation back and takes the first object whose checksum verifies, so a
corrupted or half-written latest checkpoint costs one generation, never the search.

Credentials for S3 come from the standard AWS chain (environment, ``~/.aws``, instance role);
they are never read from the EvoP config and never logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from evop.errors import EvoPError
from evop.method.state import SearchState

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


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


class CorruptCheckpointError(StorageError):
    """A checkpoint object failed its checksum or could not be parsed."""


class ObjectStore(Protocol):
    """The few operations checkpoints need; keys are '/'-separated, relative to the store root."""

    uri: str

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes | None: ...  # None when the key does not exist

    def url(self, key: str) -> str: ...


@dataclass
class LocalStore:
    """Objects as files under a directory; writes go through a temporary file and a rename."""

    root: Path

    @property
    def uri(self) -> str:
        return self.root.resolve().as_uri()

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        # A per-process temporary name: two writers never share one, and a reader never sees a
        # half-written object (the rename is atomic); fsync so a power loss cannot leave an empty file.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def get(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def url(self, key: str) -> str:
        return (self.root / key).resolve().as_uri()


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
        # Bounded retries: a storage outage surfaces as StorageError for the caller's own retry
        # policy (the pipeline retries the task) instead of hanging a GPU job.
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
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        where = f"s3://{self.bucket}/{self._key(key)}".rstrip("/")
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
        from botocore.exceptions import BotoCoreError, ClientError

        self.check()
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except (BotoCoreError, ClientError) as err:
            if isinstance(err, ClientError) and _code(err) in ("NoSuchKey", "404"):
                return None
            raise self._wrap(err, "reading", key) from err

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def open_store(uri: str) -> ObjectStore:
    """A store for ``file:///path``, a plain path, or ``s3://bucket/prefix``.

    The S3 endpoint and region come from ``AWS_ENDPOINT_URL`` / ``AWS_REGION`` (or
    ``AWS_DEFAULT_REGION``) and the usual AWS config; credentials from the AWS chain.
    """
    if not uri:
        raise StorageError("empty checkpoint store URI", transient=False)
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


def _digest(payload: str) -> str:
    """SHA-256 (hex) of a checkpoint's payload."""
    return hashlib.sha256(payload.encode()).hexdigest()


def generation_key(generation: int) -> str:
    """The key of one generation's object, relative to the run prefix."""
    return f"generations/gen-{generation:06d}.json"


_RESERVED = ("generation", "sha256", "state")
"""Top-level fields of a checkpoint object that ``extra`` must not override."""


class SearchCheckpoints:
    """Per-generation search checkpoints of one search (one config hash) in a store.

    Args:
        store: Where objects go.
        run_prefix: Key prefix of this search, e.g. the config hash: two different searches
            never share one, the same search always finds its own.
    """

    def __init__(self, store: ObjectStore, run_prefix: str):
        self.store = store
        self.prefix = run_prefix.strip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @property
    def location(self) -> str:
        return self.store.url(self.prefix) if self.prefix else self.store.uri

    def manifest(self) -> dict[str, Any]:
        """The run's manifest: ``{"generations": {"3": {"key", "sha256", "saved_at", "done"}, ...},
        "latest": 3, "done": bool}``; ``{"generations": {}}`` when nothing is saved yet.

        An unreadable manifest (bit rot, a hand edit) is reported and rebuilt from the generation
        objects themselves; the next :meth:`save` writes the rebuilt one back.
        """
        raw = self.store.get(self._key(MANIFEST))
        if raw is None:
            return {"generations": {}}
        try:
            manifest = json.loads(raw)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("generations"), dict):
                raise ValueError("no 'generations' table")
            for generation in manifest["generations"]:
                int(generation)
        except ValueError as err:  # UnicodeDecodeError and JSONDecodeError included
            log.error(
                "checkpoint manifest %s is unreadable (%s); rebuilding it from the generation objects",
                self.store.url(self._key(MANIFEST)),
                err,
            )
            return self._rebuilt_manifest()
        return manifest

    def _rebuilt_manifest(self) -> dict[str, Any]:
        """A manifest of the generation objects 0, 1, 2, ... up to the first missing one.

        The store has no listing, but generations are saved in order, so probing finds them all.
        Entries are not verified here: :meth:`latest` verifies whatever it loads.
        """
        generations: dict[str, Any] = {}
        generation = 0
        while self.store.get(self._key(generation_key(generation))) is not None:
            generations[str(generation)] = {"key": generation_key(generation), "rebuilt": True}
            generation += 1
        if not generations:
            return {"generations": {}}
        return {"generations": generations, "latest": generation - 1, "done": False}

    def save(self, state: SearchState, extra: dict[str, Any] | None = None) -> str:
        """Write ``state`` as its generation's object, then record it in the manifest.

        Saving generation ``g`` makes it the manifest's latest: entries of later generations (a
        run that went further before it was rolled back to ``g``) are dropped from the manifest.

        Args:
            state: The search state after a generation.
            extra: More top-level fields for the object (strict JSON; not ``generation``,
                ``sha256`` or ``state``).

        Returns:
            The object's URL.

        Raises:
            ValueError: if ``extra`` uses a reserved field or holds a non-finite float.
            StorageError: if the store cannot be written.
        """
        clash = sorted(set(extra or {}) & set(_RESERVED))
        if clash:
            raise ValueError(f"extra checkpoint fields {clash} are reserved")
        payload = state.to_json()
        doc = {**(extra or {}), "generation": state.generation, "sha256": _digest(payload), "state": payload}
        body = json.dumps(doc, allow_nan=False).encode()  # strict JSON: fails before any write
        key = generation_key(state.generation)
        self.store.put(self._key(key), body)
        # Only now, with the object complete, may the manifest point to it: a crash in between
        # leaves the manifest at the previous generation, never at a half-written object.
        manifest = self.manifest()
        stale = sorted(int(g) for g in manifest["generations"] if int(g) > state.generation)
        if stale:
            log.warning(
                "checkpoint of generation %d supersedes later generations %s in %s",
                state.generation,
                stale,
                self.location,
            )
        generations = {g: e for g, e in manifest["generations"].items() if int(g) < state.generation}
        generations[str(state.generation)] = {
            "key": key,
            "sha256": doc["sha256"],
            "saved_at": time.time(),
            "done": state.done,
        }
        manifest.update(generations=generations, latest=state.generation, done=state.done)
        self.store.put(self._key(MANIFEST), json.dumps(manifest, indent=1, allow_nan=False).encode())
        return self.store.url(self._key(key))

    def load(self, generation: int) -> SearchState:
        """Read and verify one generation's state.

        Raises:
            CorruptCheckpointError: when the object is missing, unparsable or fails its checksum.
            StorageError: when the store cannot be read.
        """
        key = generation_key(generation)
        url = self.store.url(self._key(key))
        raw = self.store.get(self._key(key))
        if raw is None:
            raise CorruptCheckpointError(f"checkpoint {url} is missing")
        try:
            doc = json.loads(raw)
            payload = doc["state"]
            if not isinstance(payload, str):
                raise TypeError("'state' is not a JSON string")
            if _digest(payload) != doc["sha256"]:
                raise ValueError("checksum mismatch")
            state = SearchState.from_json(payload)
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptCheckpointError(f"checkpoint {url} is corrupted: {err}") from err
        if state.generation != generation:
            raise CorruptCheckpointError(f"checkpoint {url} holds generation {state.generation}")
        return state

    def latest(self) -> SearchState | None:
        """The newest checkpoint that verifies, or None when there is none.

        A corrupted newest checkpoint is reported (ERROR log) and the previous good one is used.
        A store that cannot be reached raises :class:`StorageError`: that is not corruption.
        """
        for generation in sorted((int(g) for g in self.manifest()["generations"]), reverse=True):
            try:
                return self.load(generation)
            except CorruptCheckpointError as err:
                log.error("%s; falling back to the previous generation", err)
        return None
