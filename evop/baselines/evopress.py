"""The EvoPress baseline (arXiv 2410.14649): (1 + lambda) evolution with staged token budgets.

:func:`evopress` mutates a single parent (swap mutation only, no crossover), scores all offspring
on few calibration tokens and only the best few on all of them, so most of its evaluations are
cheap. :func:`default_evopress_generations` is EvoPress's rule of thumb for depth pruning: about
k(L-k)/1.5 generations.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence

from evop.method.operators import random_pattern, swap_mutation
from evop.method.outcome import Outcome
from evop.method.patterns import Pattern, removable_layers
from evop.method.scoring import FitnessFn, counting, prefetch


def evopress(
    fitness: FitnessFn,
    cheap_fitness: FitnessFn,
    num_layers: int,
    k: int,
    generations: int,
    offspring: int = 16,
    survivors: int = 2,
    protected: Sequence[int] = (),
    max_swaps: int = 3,
    seed: int = 0,
    initial: Pattern | None = None,
) -> Outcome:
    """EvoPress-style (1 + lambda) evolution with staged selection on growing token budgets.

    Each generation: ``offspring`` distinct children of the parent by 1..``max_swaps`` swap
    mutations are scored on the cheap budget; the ``survivors`` best of them are scored on the
    full budget; the best survivor replaces the parent when strictly better on the full budget.

    Args:
        fitness: Fitness on the full calibration set.
        cheap_fitness: The same fitness on fewer tokens (first selection stage).
        generations: Generations to run (EvoPress uses about k(L-k)/1.5).
        initial: Start pattern (random when None).
    """
    if offspring < 1 or not 1 <= survivors <= offspring:
        raise ValueError(f"evopress needs 1 <= survivors ({survivors}) <= offspring ({offspring})")
    start = time.perf_counter()
    full = counting(fitness)
    cheap = counting(cheap_fitness)
    candidates = removable_layers(num_layers, protected, k)
    rng = random.Random(seed)
    parent = initial or random_pattern(rng, num_layers, candidates, k)
    if initial is not None and (initial.num_layers != num_layers or initial.k != k):
        raise ValueError(f"initial pattern {initial} does not remove k={k} of {num_layers} layers")
    parent_value = full(parent)
    space = math.comb(len(candidates), k)
    history = []
    for generation in range(1, generations + 1):
        children: dict[str, Pattern] = {}
        for _ in range(offspring * 50):  # bounded: a tiny space may hold fewer distinct children
            if len(children) >= min(offspring, space - 1):
                break
            child = swap_mutation(rng, parent, candidates, max_swaps)
            if child != parent:
                children.setdefault(str(child), child)
        if not children:
            break
        prefetch(cheap, list(children.values()))  # a pool of workers scores them concurrently
        staged = sorted(children.values(), key=lambda p: (cheap(p), str(p)))[:survivors]
        prefetch(full, staged)
        best = min(staged, key=lambda p: (full(p), str(p)))
        if full(best) < parent_value:
            parent, parent_value = best, full(best)
        history.append(
            {
                "step": generation,
                "best_fitness": parent_value,
                "best_pattern": str(parent),
                "evaluations": full.evaluations,
                "cheap_evaluations": cheap.evaluations,
            }
        )
    return Outcome(
        "evopress",
        parent,
        parent_value,
        full.evaluations,
        time.perf_counter() - start,
        cheap_evaluations=cheap.evaluations,
        history=history,
        details={"generations": generations, "offspring": offspring, "survivors": survivors},
    )


def default_evopress_generations(num_layers: int, k: int) -> int:
    """EvoPress's rule of thumb for depth pruning: about k(L-k)/1.5 generations."""
    return max(1, round(k * (num_layers - k) / 1.5))
