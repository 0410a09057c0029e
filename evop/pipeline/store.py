"""Where one run lives in the checkpoint store: its prefix, its keys and their codecs.

:func:`store_uri` picks the store (the config's ``checkpoints``, else ``<output_dir>/checkpoints``)
and :func:`run_prefix` the run's prefix (the hash of the search-determining config).
:class:`RunStore` reads and writes the keys below it (:data:`POOL`, :data:`BLOCKS`, ...; the layout
is in :mod:`evop.pipeline`) as safetensors, ``.npy`` arrays or JSON, and holds the run's
:class:`~evop.storage.checkpoints.SearchCheckpoints`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evop.config import EvoPConfig
from evop.storage.checkpoints import ObjectStore, SearchCheckpoints, open_store

if TYPE_CHECKING:
    import numpy as np
    import torch

# The run's keys (relative to its prefix); the layout is described in :mod:`evop.pipeline`.
POOL = "calibration/pool.safetensors"
EMBEDDINGS = "calibration/embeddings.npy"
SAMPLE = "calibration/sample.json"
BLOCKS = "calibration/blocks.safetensors"
RESULT = "result.json"
INITIAL_PATTERNS = "search/initial_patterns.json"
BASELINE_MEMO = "search/memo.json"
BASELINE_OUTCOME = "search/outcome.json"


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
        self.store: ObjectStore = open_store(store_uri(cfg))
        self.prefix = run_prefix(cfg)
        self.checkpoints = SearchCheckpoints(self.store, self.prefix)

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

        raw = self.get(name)
        return None if raw is None else load(raw)["data"]

    def put_tensor(self, name: str, tensor: "torch.Tensor") -> None:
        from safetensors.torch import save

        self.put(name, save({"data": tensor.contiguous()}))

    def get_array(self, name: str) -> "np.ndarray | None":
        import numpy as np

        raw = self.get(name)
        return None if raw is None else np.load(io.BytesIO(raw), allow_pickle=False)

    def put_array(self, name: str, array: "np.ndarray") -> None:
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        self.put(name, buf.getvalue())

    def get_json(self, name: str) -> Any:
        raw = self.get(name)
        return None if raw is None else json.loads(raw)

    def put_json(self, name: str, data: Any) -> None:
        self.put(name, json.dumps(data, indent=1, allow_nan=False).encode())


def _require_tensor(run: RunStore, name: str) -> "torch.Tensor":
    tensor = run.get_tensor(name)
    if tensor is None:
        raise RuntimeError(f"missing {run.url(name)}: run the earlier pipeline steps first")
    return tensor
