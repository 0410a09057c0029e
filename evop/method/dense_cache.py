"""What the dense model computes once for every candidate: the reference of KL, and a head start.

- :class:`DenseTopK`: the dense model's top-k next-token log-probabilities on each calibration
  batch, the reference of the KL fitness, with memory bounded by k instead of the vocabulary.
- :class:`DensePrefix`: the dense hidden states entering the first layers; a candidate whose first
  removed layer is ``f`` computes layers ``0..f-1`` exactly as the dense model does, so its forward
  starts at layer ``f`` from the cache (bit-identical scores, less compute).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from evop.errors import EvoPError
from evop.method.patterns import Pattern
from evop.models.layers import device_of, layer_access, layers_kept

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


class DenseTopK:
    """The dense model's top-k next-token log-probabilities on each calibration batch.

    Keeping only the top k probabilities (plus the remaining mass) bounds memory at
    ``N * T * k`` entries instead of ``N * T * vocab``: 128 x 2048 blocks with k=64 take 134 MB
    where full float16 logits of a 32k vocabulary would take 17 GB.
    """

    def __init__(self, model: "nn.Module", batches: list["torch.Tensor"], top_k: int):
        import torch

        device = device_of(model)
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # per batch: (B, T, k) logp, idx
        with torch.inference_mode():
            for batch in batches:
                logits = model(input_ids=batch.to(device), use_cache=False).logits.float()
                logp, idx = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
                self.parts.append((logp, idx))

    def batch_kl(self, logits: "torch.Tensor", batch_index: int) -> "torch.Tensor":
        """Summed KL(dense || model) over one batch's positions, top-k tokens + one 'rest' bucket.

        Merging the tail into one bucket can only lower the KL (data-processing inequality), so
        this is a tight lower bound of the full KL when the top k hold most of the mass.
        """
        import torch

        logp, idx = self.parts[batch_index]
        logq = torch.log_softmax(logits.float(), -1).gather(-1, idx)  # (B, T, k)
        p = logp.exp()
        p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
        q_rest = (1 - logq.exp().sum(-1)).clamp_min(1e-12)
        kl = (p * (logp - logq)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())  # (B, T)
        return kl.sum()


class _PrefixCaptured(EvoPError):
    """Ends a forward once the deepest cached state is captured: what would follow (the last
    layers and the head over the whole vocabulary, 3/4 of a Gemma-3 forward) is not needed.
    Raised on purpose and caught at once (an EvoPError, as every error class of the library)."""


class DensePrefix:
    """Dense hidden states entering layers ``1..depth`` for each calibration batch.

    A pattern whose first removed layer is ``f`` runs layers ``0..f-1`` exactly as the dense model
    does, so its forward can start at layer ``f`` from the cached state: the prefix is computed
    once instead of once per candidate. ``depth`` is capped by a memory budget.
    """

    def __init__(self, model: "nn.Module", batches: list["torch.Tensor"], budget_mb: float):
        import torch

        self.layers = layer_access(model).layers(model)
        hidden = model.config.get_text_config().hidden_size
        itemsize = next(model.parameters()).element_size()
        per_layer = sum(b.numel() for b in batches) * hidden * itemsize
        self.depth = min(len(self.layers) - 1, int(budget_mb * 2**20 // max(per_layer, 1)))
        self.states: list[dict[int, torch.Tensor]] = [{} for _ in batches]
        if self.depth < 1:
            return
        device = device_of(model)
        current: dict[int, torch.Tensor] = {}

        def capture(j: int):
            def hook(module, args, kwargs):
                current[j] = (args[0] if args else kwargs["hidden_states"]).clone()
                if j == self.depth:
                    raise _PrefixCaptured

            return hook

        handles = [
            self.layers[j].register_forward_pre_hook(capture(j), with_kwargs=True)
            for j in range(1, self.depth + 1)
        ]
        try:
            with torch.inference_mode(), layers_kept(model, range(self.depth + 1)):
                # Only layers 0..depth are needed to see the inputs of layers 1..depth.
                for i, batch in enumerate(batches):
                    try:
                        model(input_ids=batch.to(device), use_cache=False)
                    except _PrefixCaptured:
                        pass
                    self.states[i] = dict(current)
        finally:
            for handle in handles:
                handle.remove()
        log.debug(
            "cached dense hidden states entering layers 1..%d (%.1f MB)",
            self.depth,
            per_layer * self.depth / 2**20,
        )

    @contextmanager
    def start_at(self, model: "nn.Module", pattern: Pattern, batch_index: list[int]) -> Iterator[None]:
        """Run only the pattern's kept layers from its first removed layer on, fed from the cache.

        ``batch_index[0]`` names the batch whose cached state is injected on the next forward.
        """
        first = pattern.removed[0]
        tail = [i for i in pattern.kept if i >= first]

        def inject(module, args, kwargs):
            state = self.states[batch_index[0]][first]
            if args:
                return (state, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": state}

        handle = self.layers[tail[0]].register_forward_pre_hook(inject, with_kwargs=True)
        try:
            with layers_kept(model, tail):
                yield
        finally:
            handle.remove()

    def covers(self, pattern: Pattern) -> bool:
        """Whether the cache can start ``pattern``'s forward (its first removed layer is cached)."""
        if not pattern.removed or not 1 <= pattern.removed[0] <= self.depth:
            return False
        return pattern.kept[-1] > pattern.removed[0]  # some kept layer runs after the jump
