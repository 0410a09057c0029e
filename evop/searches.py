"""Every search method by name: EvoP's GA and the pattern searches it is compared with.

:func:`run_method` runs the method that ``search.method`` names, with the settings of the
``search`` config section, and returns its :class:`~evop.method.outcome.Outcome`. All methods score
patterns through the same fitness callable (lower is better), so a comparison differs only in
*how* the patterns are chosen.

===============  ============================================================  ====================
method           how it chooses                                                fitness evaluations
===============  ============================================================  ====================
``evop``         seeded genetic algorithm + polish (:mod:`evop.method.epps`)   population x gens
                                                                               (+ polish rounds)
``sleb``         greedy: each round removes the layer whose removal (on top    ~ k x L
                 of those already removed) gives the lowest fitness
``shortgpt``     one shot: the k layers of lowest Block Influence              1 forward (+1 score)
                 (1 - cos(input, output) of the layer on the calibration set)
``ppl-oneshot``  one shot: score each single-layer removal, remove the k       L (+1 score)
                 least harmful (Shortened LLaMA's PPL criterion)
``evopress``     (1 + lambda) evolution, mutation only, staged token budgets:  offspring x gens
                 all offspring on few tokens, the best few on all tokens       (most of them cheap)
``random``       best of exactly ``budget`` distinct random patterns           budget
``exhaustive``   every k-subset; refused above ``limit`` candidates            C(L', k)
===============  ============================================================  ====================

The baselines live in :mod:`evop.baselines` (their papers are cited there).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from evop.baselines.evopress import default_evopress_generations, evopress
from evop.baselines.greedy import sleb
from evop.baselines.heuristics import ppl_oneshot, shortgpt
from evop.baselines.sampling import exhaustive, random_search
from evop.config import SearchConfig
from evop.method.epps import run_epps
from evop.method.outcome import Outcome
from evop.method.scoring import CountingFitness, FitnessFn, StagedCounting, counting

METHODS = ("evop", "sleb", "shortgpt", "ppl-oneshot", "evopress", "random", "exhaustive")
"""Every search method ``search.method`` accepts."""


def default_budget(settings: SearchConfig) -> int:
    """Evaluations of ``random`` when no budget is set: the most the GA may spend."""
    return settings.population * (settings.generations + 1)


def run_method(
    settings: SearchConfig,
    num_layers: int,
    k: int,
    fitness: FitnessFn,
    cheap_fitness: FitnessFn | None = None,
    influence: Callable[[], Sequence[float]] | None = None,
    budget: int | None = None,
) -> Outcome:
    """Run ``settings.method`` with the settings of the ``search`` config section.

    Args:
        settings: The search section (method, seed, protected layers, GA and baseline settings).
        fitness: Full-budget fitness.
        cheap_fitness: Reduced-budget fitness for ``evopress`` (``fitness`` when None).
        influence: Computes the Block Influence of every layer, for ``shortgpt``.
        budget: Evaluations of ``random`` (default ``settings.budget``, else :func:`default_budget`).

    A fitness scored stage by stage (a PatternScorer, or a :class:`StagedCounting` view of a shared
    memo) is counted in tokens forwarded too (:attr:`Outcome.tokens`), and EvoP can race with it.
    """
    full = counting(fitness)
    cheap = None if cheap_fitness is None else counting(cheap_fitness)
    influence_tokens = [0]
    measure = influence
    if measure is not None and isinstance(full, StagedCounting):

        def influence() -> Sequence[float]:  # one dense forward over the calibration blocks
            influence_tokens[0] = sum(full.stage_tokens)
            return measure()

    outcome = _run(settings, num_layers, k, full, cheap, influence, budget)
    if isinstance(full, StagedCounting):
        # Tokens the method alone would have forwarded (shared memo hits included).
        cheap_tokens = cheap.tokens if isinstance(cheap, StagedCounting) else 0
        outcome.tokens = full.tokens + cheap_tokens + influence_tokens[0]
    return outcome


def _run(
    settings: SearchConfig,
    num_layers: int,
    k: int,
    fitness: CountingFitness,
    cheap_fitness: CountingFitness | None,
    influence: Callable[[], Sequence[float]] | None,
    budget: int | None,
) -> Outcome:
    method = settings.method
    protected = settings.protected_layers
    if method == "evop":
        return run_epps(fitness, num_layers, k, settings, influence=influence)
    if method == "sleb":
        return sleb(fitness, num_layers, k, protected)
    if method == "ppl-oneshot":
        return ppl_oneshot(fitness, num_layers, k, protected)
    if method == "shortgpt":
        if influence is None:
            raise ValueError("shortgpt needs the model's Block Influence (influence=...)")
        start = time.perf_counter()
        scores = influence()
        return shortgpt(scores, fitness, num_layers, k, protected, time.perf_counter() - start)
    if method == "random":
        budget = budget or settings.budget or default_budget(settings)
        return random_search(fitness, num_layers, k, budget, protected, settings.seed, racing=settings)
    if method == "exhaustive":
        return exhaustive(fitness, num_layers, k, protected, settings.exhaustive_limit)
    if method == "evopress":
        generations = settings.evopress_generations or default_evopress_generations(num_layers, k)
        return evopress(
            fitness,
            cheap_fitness or fitness,
            num_layers,
            k,
            generations,
            settings.evopress_offspring,
            settings.evopress_survivors,
            protected,
            settings.max_swaps,
            settings.seed,
        )
    raise ValueError(f"unknown search method {method!r}; choose one of {', '.join(METHODS)}")
