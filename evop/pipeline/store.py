"""Where one run lives in the checkpoint store: its prefix, its keys and their codecs.

:func:`store_uri` picks the store (the config's ``checkpoints``, else ``<output_dir>/checkpoints``)
and :func:`run_prefix` the run's prefix (the hash of the search-determining config).
:class:`RunStore` reads and writes the keys below it (:data:`POOL`, :data:`BLOCKS`, ...; the layout
is in :mod:`evop.pipeline`) as safetensors, ``.npy`` arrays or JSON, and holds the run's
:class:`~evop.storage.checkpoints.SearchCheckpoints`. Its requests retry transient failures
(``storage.retry_s``). Nothing read back is believed: an object that does not decode, or fails the
check its reader gives, is reported once and read as absent, so its step computes it again.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from evop.config import EvoPConfig
from evop.storage.checkpoints import SearchCheckpoints
from evop.storage.lease import Lease, describe
from evop.storage.retry import RetryPolicy
from evop.storage.stores import ObjectStore, open_store, report_once

if TYPE_CHECKING:
    import numpy as np
    import torch

    from evop.method.state import SearchState

log = logging.getLogger(__name__)

T = TypeVar("T")
Check = Callable[[Any], "str | None"]
"""What is wrong with a value read back (None: nothing)."""

# The run's keys (relative to its prefix); the layout is described in :mod:`evop.pipeline`.
POOL = "calibration/pool.safetensors"
EMBEDDINGS = "calibration/embeddings.npy"
SAMPLE = "calibration/sample.json"
BLOCKS = "calibration/blocks.safetensors"
RESULT = "result.json"
INITIAL_PATTERNS = "search/initial_patterns.json"
BASELINE_MEMO = "search/memo.json"
BASELINE_OUTCOME = "search/outcome.json"
LEASE = "lease.json"


def store_uri(cfg: EvoPConfig) -> str:
    """The checkpoint store of ``cfg``: ``cfg.checkpoints`` or ``<output_dir>/checkpoints``."""
    return cfg.checkpoints or Path(cfg.output_dir, "checkpoints").resolve().as_uri()


def run_prefix(cfg: EvoPConfig) -> str:
    """Key prefix of this search: two different searches never share it."""
    return f"evop-{cfg.search_hash()}"


class RunStore:
    """One search's corner of the checkpoint store: the keys under its run prefix (the layout is
    in :mod:`evop.pipeline`), with codecs for tensors, arrays and JSON."""

    def __init__(self, cfg: EvoPConfig):
        self.cfg = cfg
        self.store: ObjectStore = open_store(store_uri(cfg), RetryPolicy(total_s=cfg.storage.retry_s))
        self.prefix = run_prefix(cfg)
        self.checkpoints = SearchCheckpoints(self.store, self.prefix, check=self._state_problem)

    def _state_problem(self, state: "SearchState") -> str | None:
        from evop.pipeline.space import search_space

        return state.problem(search_space(self.cfg))

    def read(self, name: str, decode: Callable[[bytes], T], check: Check | None = None) -> T | None:
        """The object ``name`` decoded, or None when it is absent, does not decode or fails
        ``check`` (the last two reported once: its step computes it again)."""
        raw = self.get(name)
        if raw is None:
            return None
        try:
            value = decode(raw)
        except Exception as err:  # noqa: BLE001 (JSON, safetensors, numpy: whatever the bytes broke)
            report_once(f"{self.url(name)} is unreadable ({type(err).__name__}: {err}); computing it again")
            return None
        problem = check(value) if check is not None else None
        if problem is not None:
            report_once(f"{self.url(name)} does not fit this search: {problem}; computing it again")
            return None
        return value

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def url(self, name: str = "") -> str:
        return self.store.url(self.key(name).rstrip("/"))

    def get(self, name: str) -> bytes | None:
        return self.store.get(self.key(name))

    def put(self, name: str, data: bytes) -> None:
        self.store.put(self.key(name), data)

    def get_tensor(self, name: str) -> "torch.Tensor | None":
        from safetensors.torch import load

        return self.read(name, lambda raw: load(raw)["data"])

    def put_tensor(self, name: str, tensor: "torch.Tensor") -> None:
        from safetensors.torch import save

        self.put(name, save({"data": tensor.contiguous()}))

    def get_array(self, name: str) -> "np.ndarray | None":
        import numpy as np

        return self.read(name, lambda raw: np.load(io.BytesIO(raw), allow_pickle=False))

    def put_array(self, name: str, array: "np.ndarray") -> None:
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        self.put(name, buf.getvalue())

    def get_json(self, name: str, check: Check | None = None) -> Any:
        return self.read(name, json.loads, check)

    def put_json(self, name: str, data: Any) -> None:
        self.put(name, json.dumps(data, indent=1, allow_nan=False).encode())


@contextmanager
def search_lease(cfg: EvoPConfig) -> Iterator[Lease]:
    """Hold the lease on ``cfg``'s search while the block runs: one run at a time computes a
    search. Another run holding it is waited for (it finishes, or it stops and its lease expires);
    this run then goes on from the generations it checkpointed."""
    run = RunStore(cfg)
    lease = Lease(run.store, run.key(LEASE), cfg.storage.lease_s)
    waiting_since: list[float] = []

    def on_wait(holder: dict[str, Any]) -> None:
        if not waiting_since:
            waiting_since.append(time.monotonic())
            log.warning(
                "another run is computing this search: %s holds %s; waiting for it (Ctrl-C leaves; a "
                "later run goes on from the store)",
                describe(holder),
                lease.url,
            )

    lease.acquire(on_wait)
    if waiting_since:
        log.warning("took the search over after waiting %.0f s", time.monotonic() - waiting_since[0])
    try:
        yield lease
    finally:
        lease.release()


def _require_tensor(run: RunStore, name: str) -> "torch.Tensor":
    tensor = run.get_tensor(name)
    if tensor is None:
        raise RuntimeError(f"missing {run.url(name)}: run the earlier pipeline steps first")
    return tensor
