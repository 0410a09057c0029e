"""Verified per-generation checkpoints of long searches, in any object store.

On an :class:`~evop.storage.stores.ObjectStore`, :class:`SearchCheckpoints` writes every finished
generation's :class:`~evop.method.state.SearchState` as its own JSON object
``<prefix>/generations/gen-000003.json`` carrying a SHA-256 of its payload; the manifest
``<prefix>/manifest.json`` is rewritten only after that object is complete. Loading walks the
manifest from the newest generation back and takes the first object that verifies, so a
corrupted or half-written latest checkpoint costs one generation, never the search.

What a checkpoint holds is checked twice: its SHA-256 catches accidents, and the search's
``check`` (:meth:`~evop.method.state.SearchState.problem`) catches a state that does not fit the
search reading it (another model, ``k``, protected layers): an edited state is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from evop.method.state import SearchState
from evop.storage.stores import ObjectStore, StorageError, report_once

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class CorruptCheckpointError(StorageError):
    """A checkpoint object failed its checksum or could not be parsed."""


class InvalidCheckpointError(CorruptCheckpointError):
    """A checkpoint that verifies but does not fit the search reading it (edited, or another search's)."""


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
        check: What is wrong with a state read back for this search (None: nothing), e.g.
            ``lambda state: state.problem(space)``; a state with a problem is not loaded.
    """

    def __init__(
        self,
        store: ObjectStore,
        run_prefix: str,
        check: Callable[[SearchState], str | None] | None = None,
    ):
        self.store = store
        self.prefix = run_prefix.strip("/")
        self.check = check

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
            report_once(
                f"checkpoint manifest {self.store.url(self._key(MANIFEST))} is unreadable ({err}); "
                "rebuilding it from the generation objects"
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
        problem = self.check(state) if self.check is not None else None
        if problem is not None:
            raise InvalidCheckpointError(f"checkpoint {url} does not fit this search: {problem}")
        return state

    def latest(self) -> SearchState | None:
        """The newest checkpoint that verifies and fits the search, or None when there is none.

        A corrupted or invalid newest checkpoint is reported (one ERROR line per process) and the
        previous good one is used, so the search recomputes from there: an edited state never
        reaches a result. A store that cannot be reached raises :class:`StorageError`: that is
        not corruption.
        """
        for generation in sorted((int(g) for g in self.manifest()["generations"]), reverse=True):
            try:
                return self.load(generation)
            except CorruptCheckpointError as err:
                report_once(f"{err}; falling back to the previous generation")
        return None
