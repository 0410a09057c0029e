"""Fitness of a pruning pattern: how much worse the model gets without those layers.

Lower is better. ``ppl`` is the perplexity on the calibration blocks; ``kl`` is the mean KL
divergence from the dense model's next-token distribution (its top-k probabilities, kept by
:class:`DenseTopK`). :class:`PatternScorer` scores patterns *in place*: it runs the model with only
the pattern's kept layers (:func:`evop.models.layers.layers_kept`), so the model is never reloaded
or copied, and :class:`DensePrefix` lets a pattern's forward start at its first removed layer from
cached dense hidden states.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

from evop.method.dense_cache import DensePrefix, DenseTopK
from evop.method.patterns import Pattern
from evop.models.layers import check_pattern, device_of, layers_kept, num_layers

if TYPE_CHECKING:
    import torch
    from torch import nn

    from evop.config import FitnessConfig

log = logging.getLogger(__name__)


def _batches(blocks: "torch.Tensor", batch_size: int) -> list["torch.Tensor"]:
    return [blocks[i : i + batch_size] for i in range(0, blocks.shape[0], batch_size)]


def cluster_batches(clusters: Sequence[int], batch_size: int) -> list[tuple[int, list[int]]]:
    """Batches of at most ``batch_size`` blocks of *one* cluster each, as ``(cluster, block
    indices)``, taken round-robin over the clusters: each batch's summed loss then belongs to one
    cluster, so the cluster aggregates can be computed from a race's first stages, and those
    stages see every cluster early."""
    from evop.method.calibration import round_robin

    groups: dict[int, list[int]] = {}
    for i, c in enumerate(clusters):
        groups.setdefault(int(c), []).append(i)
    chunks = [
        (c, idx[j : j + batch_size])
        for c, idx in sorted(groups.items())
        for j in range(0, len(idx), batch_size)
    ]
    return [chunks[i] for i in round_robin([c for c, _ in chunks])]


def mean_nll(model: "nn.Module", blocks: "torch.Tensor", batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood (nats) over all positions of ``blocks``.

    Args:
        model: A causal LM.
        blocks: ``(N, T)`` token ids; every block is scored on its own (no padding).
        batch_size: Blocks per forward pass.
    """
    import torch

    device = device_of(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in _batches(blocks, batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
            total += _batch_nll(logits, batch)
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


def _batch_nll(logits: "torch.Tensor", batch: "torch.Tensor") -> float:
    """Summed next-token NLL of one batch; float32 so bf16 models sum stably.

    Row by row: one row's logits are contiguous, so the batch's ``(B, T, V)`` logits are never
    copied. With Gemma-3's 262k-token vocabulary that copy (2 GB a batch of 8 x 256) was about a
    sixth of a forward's time on CPU.
    """
    import torch.nn.functional as F

    return sum(
        F.cross_entropy(row[:-1].float(), ids[1:], reduction="sum").item()
        for row, ids in zip(logits, batch, strict=True)
    )


AGGREGATES = ("mean", "clusters", "worst-cluster")
"""How per-block losses become one fitness (``fitness.aggregate``)."""


def aggregate_block_losses(
    sums: Sequence[float],
    positions: int | Sequence[int],
    clusters: Sequence[int] | None,
    how: str,
) -> float:
    """One mean loss per position from loss sums of blocks (or of batches of one cluster each).

    Args:
        sums: Summed loss (NLL or KL, nats) of each block or batch.
        positions: Positions each sum covers (one number: the same for all).
        clusters: The CCDS cluster of each sum (needed unless ``how == "mean"``).
        how: ``"mean"``: over all positions; ``"clusters"``: the mean of the per-cluster means, so
            every cluster of the calibration text counts the same, however many blocks it has;
            ``"worst-cluster"``: the largest per-cluster mean (a pattern is as good as the domain
            it hurts most).

    Raises:
        ValueError: for an unknown ``how``, or clusters that do not match the sums.
    """
    counts = [positions] * len(sums) if isinstance(positions, int) else list(positions)
    if how == "mean":
        return math.fsum(sums) / sum(counts)
    if how not in AGGREGATES:
        raise ValueError(f"unknown fitness aggregate {how!r}; choose one of {', '.join(AGGREGATES)}")
    if clusters is None or len(clusters) != len(sums):
        raise ValueError(f"fitness.aggregate={how} needs the cluster of each of the {len(sums)} blocks")
    per_cluster: dict[int, list[float]] = {}  # cluster -> [summed loss, positions]
    for value, n, cluster in zip(sums, counts, clusters, strict=True):
        loss_positions = per_cluster.setdefault(int(cluster), [0.0, 0.0])
        loss_positions[0] += value
        loss_positions[1] += n
    means = [loss / n for _, (loss, n) in sorted(per_cluster.items())]
    return max(means) if how == "worst-cluster" else math.fsum(means) / len(means)


class PatternScorer:
    """Scores patterns on fixed calibration blocks by skipping their layers in place.

    Args:
        model: The dense causal LM (left unchanged between calls).
        blocks: ``(N, T)`` calibration token ids.
        metric: ``"ppl"`` or ``"kl"``.
        batch_size: Blocks per forward pass.
        token_budget: Score on the first blocks holding at most this many tokens (None: all).
        kl_top_k: Dense probabilities kept per position for ``kl``.
        prefix_cache_mb: Memory for dense hidden states shared by all candidates (0: off).
        aggregate: How per-block losses become the fitness (see :func:`aggregate_block_losses`).
        clusters: The CCDS cluster of each block (for the cluster aggregates, whose batches each
            hold blocks of one cluster: :func:`cluster_batches`).

    Attributes:
        calls: Patterns scored so far (the dense reference is not counted).
        seconds: Time spent scoring patterns.
        tokens: Tokens forwarded so far (dense reference included).
        stages_prefix_of: The scorer whose first stages are exactly this one's (set by
            :meth:`first_blocks`), or None.
    """

    def __init__(
        self,
        model: "nn.Module",
        blocks: "torch.Tensor",
        metric: str = "ppl",
        batch_size: int = 8,
        token_budget: int | None = None,
        kl_top_k: int = 64,
        prefix_cache_mb: float = 0,
        aggregate: str = "mean",
        clusters: Sequence[int] | None = None,
    ):
        if blocks.ndim != 2 or blocks.shape[0] == 0:
            raise ValueError(
                f"calibration blocks must be a non-empty (N, T) tensor, got {tuple(blocks.shape)}"
            )
        if metric not in ("ppl", "kl"):
            raise ValueError(f"unknown fitness metric {metric!r} (use 'ppl' or 'kl')")
        if token_budget is not None:
            blocks = blocks[: max(1, token_budget // blocks.shape[1])]
        if clusters is not None:
            clusters = [int(c) for c in clusters[: blocks.shape[0]]]
        aggregate_block_losses([0.0] * blocks.shape[0], 1, clusters, aggregate)  # fail early
        self.aggregate = aggregate
        self.clusters = clusters
        self.model = model
        self.blocks = blocks
        self.metric = metric
        self.batch_size = batch_size
        self.kl_top_k = kl_top_k
        self.prefix_cache_mb = prefix_cache_mb
        self.num_layers = num_layers(model)
        self.calls = 0
        self.seconds = 0.0
        self.tokens = 0
        device = device_of(model)
        self.stage_clusters: list[int] | None = None  # the cluster of each batch (cluster aggregates)
        self.stages_prefix_of: PatternScorer | None = None  # see first_blocks
        if aggregate == "mean":
            batches = _batches(blocks, batch_size)
        else:
            grouped = cluster_batches(clusters or [], batch_size)
            self.stage_clusters = [c for c, _ in grouped]
            batches = [blocks[idx] for _, idx in grouped]
        self._batches = [b.to(device) for b in batches]
        self._dense = DenseTopK(model, self._batches, kl_top_k) if metric == "kl" else None
        self._prefix = DensePrefix(model, self._batches, prefix_cache_mb) if prefix_cache_mb > 0 else None

    @classmethod
    def from_config(
        cls,
        model: "nn.Module",
        blocks: "torch.Tensor",
        cfg: "FitnessConfig",
        clusters: Sequence[int] | None = None,
    ) -> "PatternScorer":
        """The scorer the ``fitness`` section of a config describes (``clusters``: each block's
        CCDS cluster, for the cluster aggregates)."""
        return cls(
            model,
            blocks,
            cfg.metric,
            cfg.batch_size,
            cfg.token_budget,
            cfg.kl_top_k,
            cfg.prefix_cache_mb,
            cfg.aggregate,
            clusters,
        )

    def first_blocks(self, fraction: float) -> "PatternScorer":
        """A scorer with the same settings on the first ``fraction`` of these blocks (at least
        one): the cheap first stage of EvoPress's staged budgets. When its batches are this
        scorer's first batches (plain mean, whole batches), its ``stages_prefix_of`` is this
        scorer: its stage sums are this one's first ones, so a memo can share them."""
        n = max(1, round(fraction * self.blocks.shape[0]))
        cheap = PatternScorer(
            self.model,
            self.blocks[:n],
            self.metric,
            self.batch_size,
            None,
            self.kl_top_k,
            self.prefix_cache_mb,
            self.aggregate,
            None if self.clusters is None else self.clusters[:n],
        )
        # Cluster aggregates group blocks by cluster, so a prefix of blocks is not a prefix of batches.
        whole_batches = n % self.batch_size == 0 or n == self.blocks.shape[0]
        if self.stage_clusters is None and whole_batches:
            cheap.stages_prefix_of = self
        return cheap

    def _score(self, start: "DensePrefix | None" = None, pattern: Pattern | None = None) -> float:
        """Score the model as it stands (or from the dense prefix cache for ``pattern``)."""
        return self.fitness_of(self._batch_sums(range(len(self._batches)), start, pattern))

    def _batch_sums(
        self, batches: range, start: "DensePrefix | None" = None, pattern: Pattern | None = None
    ) -> list[float]:
        """Summed loss (NLL or KL) of each of ``batches``, with the model as it stands (or from the
        dense prefix cache for ``pattern``)."""
        import torch

        sums = []
        batch_index = [0]
        ctx = start.start_at(self.model, pattern, batch_index) if start is not None else nullcontext()
        with torch.inference_mode(), ctx:
            for i in batches:
                batch = self._batches[i]
                batch_index[0] = i
                logits = self.model(input_ids=batch, use_cache=False).logits  # (B, T, V)
                self.tokens += batch.numel()
                if self._dense is not None:
                    sums.append(self._dense.batch_kl(logits, i).item())
                else:
                    sums.append(_batch_nll(logits, batch))
        return sums

    @property
    def stage_positions(self) -> list[int]:
        """Scored positions of each batch (a *stage* of racing): ``B x T`` for KL, ``B x (T-1)``
        for perplexity."""
        drop = 0 if self._dense is not None else 1
        return [b.shape[0] * (b.shape[1] - drop) for b in self._batches]

    @property
    def stage_tokens(self) -> list[int]:
        """Tokens forwarded to score each batch."""
        return [b.numel() for b in self._batches]

    def stage_sums(self, pattern: Pattern, start: int = 0, stop: int | None = None) -> list[float]:
        """Summed loss of batches ``start..stop-1`` of ``pattern``: racing scores a candidate one
        stage at a time and stops when it is clearly out. :meth:`fitness_of` of all stages' sums
        equals ``self(pattern)`` exactly (same batches, same order of summation).
        """
        batches = range(start, len(self._batches) if stop is None else stop)
        check_pattern(self.model, pattern)
        began = time.perf_counter()
        if self._prefix is not None and self._prefix.covers(pattern):
            sums = self._batch_sums(batches, self._prefix, pattern)
        else:
            with layers_kept(self.model, pattern.kept):
                sums = self._batch_sums(batches)
        self.seconds += time.perf_counter() - began
        return sums

    def fitness_of(self, sums: list[float]) -> float:
        """The fitness from the summed losses of the first ``len(sums)`` stages, in order (see
        :meth:`stage_sums`): their mean loss per position, or with a cluster aggregate the mean
        (``clusters``) or largest (``worst-cluster``) of the per-cluster means over those stages."""
        positions = self.stage_positions
        if self.stage_clusters is None:
            total = 0.0
            for value in sums:  # sequential, as earlier versions summed them (same fitness values)
                total += value
            return self._finish(total / sum(positions[: len(sums)]))
        done = len(sums)
        return self._finish(
            aggregate_block_losses(sums, positions[:done], self.stage_clusters[:done], self.aggregate)
        )

    def _finish(self, value: float) -> float:
        """Mean loss per position -> fitness: KL as it is, NLL as perplexity."""
        if self._dense is not None:
            return value if math.isfinite(value) else math.inf
        return nll_to_ppl(value)

    def dense(self) -> float:
        """Fitness of the unpruned model (its perplexity; 0 for ``kl``)."""
        return self._score()

    def __call__(self, pattern: Pattern) -> float:
        """Fitness of ``pattern`` (lower is better; ``inf`` when the pruned model diverges)."""
        start = time.perf_counter()
        check_pattern(self.model, pattern)
        if self._prefix is not None and self._prefix.covers(pattern):
            value = self._score(self._prefix, pattern)
        else:
            with layers_kept(self.model, pattern.kept):
                value = self._score()
        self.calls += 1
        self.seconds += time.perf_counter() - start
        log.debug("fitness %s = %.4g", pattern, value)
        return value
