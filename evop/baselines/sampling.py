"""The sampling baselines: random search (the floor) and exhaustive search (the true optimum).

- :func:`random_search`: the best of exactly ``budget`` distinct random patterns; a comparison
  gives it as many evaluations as EvoP used.
- :func:`exhaustive`: every k-subset of the removable layers, C(L', k) evaluations; refused with
  :class:`SearchTooLargeError` above ``search.exhaustive_limit`` candidates.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from itertools import combinations

from evop.errors import BadInputError
from evop.method.operators import sample_patterns
from evop.method.outcome import Outcome
from evop.method.patterns import Pattern, removable_layers
from evop.method.scoring import FitnessFn, counting, prefetch


class SearchTooLargeError(BadInputError):
    """An exhaustive search over more candidate patterns than the configured limit."""


def random_search(
    fitness: FitnessFn, num_layers: int, k: int, budget: int, protected: Sequence[int] = (), seed: int = 0
) -> Outcome:
    """Best of exactly ``budget`` distinct random patterns (fewer only when the space is smaller)."""
    if budget < 1:
        raise BadInputError(f"random search needs a budget of at least 1 evaluation, got {budget}")
    start = time.perf_counter()
    f = counting(fitness)
    candidates = removable_layers(num_layers, protected, k)
    rng = random.Random(seed)
    drawn = sample_patterns(rng, num_layers, candidates, k, budget)
    prefetch(f, drawn)
    best, best_value, history = None, math.inf, []
    for i, pattern in enumerate(drawn, 1):
        value = f(pattern)
        if best is None or (value, str(pattern)) < (best_value, str(best)):
            best, best_value = pattern, value
        if i % 10 == 0 or i == len(drawn):
            history.append(
                {"step": i, "best_fitness": best_value, "best_pattern": str(best), "evaluations": i}
            )
    assert best is not None
    return Outcome(
        "random",
        best,
        best_value,
        len(drawn),
        time.perf_counter() - start,
        history=history,
        details={"budget": budget},
    )


def exhaustive(
    fitness: FitnessFn, num_layers: int, k: int, protected: Sequence[int] = (), limit: int = 10_000
) -> Outcome:
    """Score every k-subset of the removable layers: the true optimum, for small problems only.

    Raises:
        SearchTooLargeError: when there are more than ``limit`` candidate patterns.
    """
    candidates = removable_layers(num_layers, protected, k)
    space = math.comb(len(candidates), k)
    if space > limit:
        raise SearchTooLargeError(
            f"exhaustive search over C({len(candidates)}, {k}) = {space:,} patterns exceeds "
            f"search.exhaustive_limit={limit:,}; raise the limit or pick another method"
        )
    start = time.perf_counter()
    f = counting(fitness)
    patterns = [Pattern(num_layers, c) for c in combinations(candidates, k)]
    prefetch(f, patterns)
    scores = {str(p): f(p) for p in patterns}
    ranking = sorted(scores, key=lambda s: (scores[s], s))
    best = ranking[0]
    history = [{"step": 1, "best_fitness": scores[best], "best_pattern": best, "evaluations": space}]
    return Outcome(
        "exhaustive",
        Pattern.parse(best),
        scores[best],
        f.evaluations,
        time.perf_counter() - start,
        history=history,
        details={"space": space, "top": [[s, scores[s]] for s in ranking[:10]]},
    )
