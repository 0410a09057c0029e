"""Fitness of a pruning pattern: how much worse the model gets without those layers.

Lower is better. ``ppl`` is the perplexity on the calibration blocks; ``kl`` is the mean KL
divergence from the dense model's next-token distribution. Patterns are scored *in place*
(:func:`evop.models.layers_skipped`): the model is never reloaded or copied.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from evop.models import layers_skipped, num_layers
from evop.patterns import Pattern

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


def _batches(blocks: "torch.Tensor", batch_size: int) -> list["torch.Tensor"]:
    return [blocks[i : i + batch_size] for i in range(0, blocks.shape[0], batch_size)]


def _device_of(model: "nn.Module") -> "torch.device":
    return next(model.parameters()).device


def mean_nll(model: "nn.Module", blocks: "torch.Tensor", batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood (nats) over all positions of ``blocks``.

    Args:
        model: A causal LM.
        blocks: ``(N, T)`` token ids; every block is scored on its own (no padding).
        batch_size: Blocks per forward pass.
    """
    import torch
    import torch.nn.functional as F

    device = _device_of(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in _batches(blocks, batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
            # Predict token t+1 from position t; float32 so bf16 models sum stably.
            nll = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
            )
            total += nll.item()
            count += batch[:, 1:].numel()
    return total / count


def perplexity(model: "nn.Module", blocks: "torch.Tensor", batch_size: int = 8) -> float:
    """Perplexity ``exp(mean NLL)`` on ``blocks``; ``inf`` when it diverges or overflows."""
    return nll_to_ppl(mean_nll(model, blocks, batch_size))


def nll_to_ppl(nll: float) -> float:
    """``exp(nll)``, with nan/overflow mapped to ``inf`` so a diverged model ranks last."""
    if not math.isfinite(nll):
        return math.inf
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


class DenseTopK:
    """The dense model's top-k next-token probabilities on the calibration blocks.

    Keeping only the top k probabilities (plus the remaining mass) bounds memory at
    ``N * T * k`` entries instead of ``N * T * vocab``: 128 x 2048 blocks with k=64 take 134 MB
    where full float16 logits of a 32k vocabulary would take 17 GB.
    """

    def __init__(self, model: "nn.Module", blocks: "torch.Tensor", top_k: int, batch_size: int):
        import torch

        device = _device_of(model)
        logp_parts, idx_parts = [], []
        with torch.inference_mode():
            for batch in _batches(blocks, batch_size):
                logits = model(input_ids=batch.to(device), use_cache=False).logits.float()
                logp, idx = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)  # (B, T, k)
                logp_parts.append(logp.cpu())
                idx_parts.append(idx.cpu())
        self.logp = torch.cat(logp_parts)  # (N, T, k)
        self.idx = torch.cat(idx_parts)  # (N, T, k)

    def kl(self, model: "nn.Module", blocks: "torch.Tensor", batch_size: int) -> float:
        """Mean KL(dense || model) per position over the top-k tokens plus one 'rest' bucket.

        Merging the tail into one bucket can only lower the KL (data-processing inequality), so
        this is a tight lower bound of the full KL when the top k hold most of the mass.
        """
        import torch

        device = _device_of(model)
        total, count = 0.0, 0
        with torch.inference_mode():
            for start in range(0, blocks.shape[0], batch_size):
                batch = blocks[start : start + batch_size].to(device)
                logq_all = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
                logp = self.logp[start : start + batch_size].to(device)
                logq = logq_all.gather(-1, self.idx[start : start + batch_size].to(device))
                p = logp.exp()
                p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
                q_rest = (1 - logq.exp().sum(-1)).clamp_min(1e-12)
                kl = (p * (logp - logq)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())  # (B, T)
                total += kl.sum().item()
                count += kl.numel()
        return total / count


class PatternScorer:
    """Scores patterns on fixed calibration blocks by skipping their layers in place.

    Args:
        model: The dense causal LM (left unchanged between calls).
        blocks: ``(N, T)`` calibration token ids.
        metric: ``"ppl"`` or ``"kl"``.
        batch_size: Blocks per forward pass.
        token_budget: Score on the first blocks holding at most this many tokens (None: all).
        kl_top_k: Dense probabilities kept per position for ``kl``.

    Attributes:
        calls: Patterns scored so far (the dense reference is not counted).
        seconds: Time spent scoring patterns.
    """

    def __init__(
        self,
        model: "nn.Module",
        blocks: "torch.Tensor",
        metric: str = "ppl",
        batch_size: int = 8,
        token_budget: int | None = None,
        kl_top_k: int = 64,
    ):
        if blocks.ndim != 2 or blocks.shape[0] == 0:
            raise ValueError(f"calibration blocks must be a non-empty (N, T) tensor, got {tuple(blocks.shape)}")
        if metric not in ("ppl", "kl"):
            raise ValueError(f"unknown fitness metric {metric!r} (use 'ppl' or 'kl')")
        if token_budget is not None:
            blocks = blocks[: max(1, token_budget // blocks.shape[1])]
        self.model = model
        self.blocks = blocks
        self.metric = metric
        self.batch_size = batch_size
        self.num_layers = num_layers(model)
        self.calls = 0
        self.seconds = 0.0
        self._dense = DenseTopK(model, blocks, kl_top_k, batch_size) if metric == "kl" else None

    def _score_current(self) -> float:
        if self._dense is not None:
            kl = self._dense.kl(self.model, self.blocks, self.batch_size)
            return kl if math.isfinite(kl) else math.inf
        return perplexity(self.model, self.blocks, self.batch_size)

    def dense(self) -> float:
        """Fitness of the unpruned model (ppl; 0 for kl up to rounding)."""
        return self._score_current()

    def __call__(self, pattern: Pattern) -> float:
        """Fitness of ``pattern`` (lower is better; ``inf`` when the pruned model diverges)."""
        start = time.perf_counter()
        with layers_skipped(self.model, pattern):
            value = self._score_current()
        self.calls += 1
        self.seconds += time.perf_counter() - start
        log.debug("fitness %s = %.4g", pattern, value)
        return value
