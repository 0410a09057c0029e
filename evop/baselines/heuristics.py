"""The one-shot baselines: a pattern from per-layer importance, without a search.

- :func:`shortgpt`: ShortGPT (arXiv 2403.03853) removes the k layers of lowest Block Influence
  (:mod:`evop.method.influence`: ``1 - cos(input, output)`` of each layer on the calibration set,
  from one dense forward).
- :func:`ppl_oneshot`: Shortened LLaMA's PPL criterion (arXiv 2402.02834) scores every single-layer
  removal once and removes the k least harmful together (about L evaluations).

Both score their final pattern once more, under the same fitness as every other method.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from evop.method.influence import lowest_influence
from evop.method.outcome import Outcome
from evop.method.patterns import Pattern, removable_layers
from evop.method.scoring import FitnessFn, counting, prefetch


def ppl_oneshot(fitness: FitnessFn, num_layers: int, k: int, protected: Sequence[int] = ()) -> Outcome:
    """Shortened LLaMA's PPL criterion: score every single-layer removal once, remove the k least
    harmful together (one more evaluation scores the final pattern)."""
    start = time.perf_counter()
    f = counting(fitness)
    candidates = removable_layers(num_layers, protected, k)
    patterns = {c: Pattern.of(num_layers, [c]) for c in candidates}
    prefetch(f, list(patterns.values()))  # a pool of workers scores them concurrently
    single = {c: f(p) for c, p in patterns.items()}
    chosen = sorted(candidates, key=lambda c: (single[c], c))[:k]
    pattern = Pattern.of(num_layers, chosen)
    value = f(pattern)
    history = [{"step": 1, "best_fitness": value, "best_pattern": str(pattern), "evaluations": f.evaluations}]
    return Outcome(
        "ppl-oneshot",
        pattern,
        value,
        f.evaluations,
        time.perf_counter() - start,
        history=history,
        details={"single_layer_fitness": {str(c): single[c] for c in candidates}},
    )


def shortgpt(
    influence: Sequence[float],
    fitness: FitnessFn,
    num_layers: int,
    k: int,
    protected: Sequence[int] = (),
    influence_seconds: float = 0.0,
) -> Outcome:
    """ShortGPT: remove the k layers of lowest Block Influence (see
    :func:`~evop.method.influence.layer_influence`).

    Args:
        influence: Block Influence of every layer (``num_layers`` values).
        fitness: Scores the chosen pattern once, for the report.
        influence_seconds: Time it took to measure ``influence`` (added to the outcome's time).
    """
    start = time.perf_counter()
    f = counting(fitness)
    pattern = lowest_influence(influence, num_layers, k, protected)
    value = f(pattern)
    history = [{"step": 1, "best_fitness": value, "best_pattern": str(pattern), "evaluations": f.evaluations}]
    seconds = time.perf_counter() - start + influence_seconds
    return Outcome(
        "shortgpt",
        pattern,
        value,
        f.evaluations,
        seconds,
        history=history,
        details={"block_influence": [round(float(x), 6) for x in influence]},
    )
