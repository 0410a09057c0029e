"""The greedy baseline: SLEB (arXiv 2402.09025), one decoder layer removed per round.

:func:`sleb` removes, each round, the layer whose removal (on top of those already removed) gives
the lowest fitness, re-scoring every remaining layer each round: k rounds, about k x L fitness
evaluations. Ties go to the lower index, so the result is deterministic.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

from evop.method.outcome import Outcome
from evop.method.patterns import Pattern, removable_layers
from evop.method.scoring import FitnessFn, counting, prefetch

log = logging.getLogger(__name__)


def _best(scores: dict[int, float]) -> int:
    """The layer of lowest score; ties go to the lower index, so results are deterministic."""
    return min(scores, key=lambda layer: (scores[layer], layer))


def sleb(fitness: FitnessFn, num_layers: int, k: int, protected: Sequence[int] = ()) -> Outcome:
    """SLEB: remove one layer per round, the one whose removal gives the lowest fitness, re-scoring
    every remaining layer each round (k rounds, about k x L evaluations)."""
    start = time.perf_counter()
    f = counting(fitness)
    candidates = removable_layers(num_layers, protected, k)
    removed: list[int] = []
    history = []
    best_value = math.inf
    for step in range(k):
        patterns = {c: Pattern.of(num_layers, [*removed, c]) for c in candidates if c not in removed}
        prefetch(f, list(patterns.values()))  # a pool of workers scores the round concurrently
        scores = {c: f(p) for c, p in patterns.items()}
        choice = _best(scores)
        removed.append(choice)
        best_value = scores[choice]
        history.append(
            {
                "step": step + 1,
                "best_fitness": best_value,
                "best_pattern": str(Pattern.of(num_layers, removed)),
                "evaluations": f.evaluations,
                "removed_now": choice,
            }
        )
        log.info("sleb round %d: removes layer %d (fitness %.6g)", step + 1, choice, best_value)
    pattern = Pattern.of(num_layers, removed)
    return Outcome(
        "sleb",
        pattern,
        best_value,
        f.evaluations,
        time.perf_counter() - start,
        history=history,
        details={"removal_order": removed},
    )
