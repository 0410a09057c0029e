"""The sampling baselines: random search (the floor) and exhaustive search (the true optimum).

- :func:`random_search`: the best of exactly ``budget`` distinct random patterns; a comparison
  gives it as many evaluations as EvoP used. Where EvoP races, so does random search: each
  pattern against the best drawn so far, which keeps its answer at a fraction of the tokens.
- :func:`exhaustive`: every k-subset of the removable layers, C(L', k) evaluations; refused with
  :class:`SearchTooLargeError` above ``search.exhaustive_limit`` candidates.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from itertools import combinations
from typing import TYPE_CHECKING

from evop.errors import BadInputError
from evop.method.operators import sample_patterns
from evop.method.outcome import Outcome
from evop.method.patterns import Pattern, removable_layers
from evop.method.racing import raced_out, score_candidates
from evop.method.scoring import FitnessFn, StagedCounting, counting, prefetch

if TYPE_CHECKING:
    from evop.config import SearchConfig


class SearchTooLargeError(BadInputError):
    """An exhaustive search over more candidate patterns than the configured limit."""


def random_search(
    fitness: FitnessFn,
    num_layers: int,
    k: int,
    budget: int,
    protected: Sequence[int] = (),
    seed: int = 0,
    racing: "SearchConfig | None" = None,
) -> Outcome:
    """Best of exactly ``budget`` distinct random patterns (fewer only when the space is smaller).

    ``racing``: search settings whose racing rules (``racing_ratio``, ``racing_confidence``) race
    each pattern against the best drawn before it, as EvoP races its candidates, when the fitness
    is scored stage by stage; a raced-out pattern never becomes the best. None: all in full.
    """
    if budget < 1:
        raise BadInputError(f"random search needs a budget of at least 1 evaluation, got {budget}")
    start = time.perf_counter()
    f = counting(fitness)
    candidates = removable_layers(num_layers, protected, k)
    rng = random.Random(seed)
    drawn = sample_patterns(rng, num_layers, candidates, k, budget)
    scores: dict[str, float] = {}
    sums: dict[str, list[float]] = {}
    staged = f if isinstance(f, StagedCounting) and racing is not None and racing.racing else None
    if staged is not None:
        score_candidates(drawn, scores, sums, None, f, staged, racing)  # type: ignore[arg-type]
    else:
        prefetch(f, drawn)
    best, best_value, history = None, math.inf, []
    for i, pattern in enumerate(drawn, 1):
        key = str(pattern)
        value = scores[key] if key in scores else f(pattern)
        finished = staged is None or not raced_out(sums[key], len(staged.stage_tokens))
        if finished and (best is None or (value, key) < (best_value, str(best))):
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
        details={"budget": budget, "raced": staged is not None},
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
