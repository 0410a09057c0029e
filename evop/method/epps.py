"""EPPS as EvoP runs it: the GA of :mod:`evop.method.genetic`, seeded and guided by heuristics.

This is the one place where EvoP's search is assembled, for the pipeline and for comparisons alike:

1. :func:`seed_search`: the heuristic patterns of ``search.initial_patterns`` (ShortGPT's,
   Shortened LLaMA's PPL criterion) and the per-layer Block Influence behind the mutation prior,
   from one dense forward. The pipeline stores the :class:`Seeding`, so every resume continues
   the same search.
2. :func:`build_search`: the :class:`~evop.method.genetic.GeneticSearch` with those seeds first in
   its initial population, swap mutation guided by the prior and the polish rounds of
   ``search.polish_rounds``.
3. :func:`run_epps`: both, run to the end, as an :class:`~evop.method.outcome.Outcome`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from evop.baselines.heuristics import ppl_oneshot
from evop.config import SearchConfig
from evop.errors import BadInputError
from evop.method.genetic import GeneticSearch
from evop.method.influence import influence_prior, lowest_influence
from evop.method.outcome import Outcome, outcome_of_state
from evop.method.patterns import Pattern
from evop.method.scoring import CountingFitness, FitnessFn, counting

Influence = Callable[[], Sequence[float]]
"""Measures the Block Influence of every layer (one dense forward pass)."""


@dataclass
class Seeding:
    """What EvoP's GA starts from, computed once per search.

    Attributes:
        patterns: Heuristic patterns (``str(Pattern)``) placed first in the initial population.
        block_influence: Per-layer Block Influence behind the mutation prior (None: prior off).
        evaluations: Patterns scored only to find the seeds (e.g. the single-layer removals of
            ``ppl-oneshot``); the seeds themselves are scored again by the GA, whose memo counts them.
        seconds: Time spent seeding.
        tokens: Tokens forwarded to seed: the Block Influence's dense forward over the calibration
            blocks and the patterns scored only to find the seeds (None: the fitness does not
            count tokens, e.g. a synthetic objective; or a seeding stored before it was counted).
    """

    patterns: list[str]
    block_influence: list[float] | None
    evaluations: int
    seconds: float
    tokens: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Seeding":
        return cls(
            patterns=list(data["patterns"]),
            block_influence=data.get("block_influence"),
            evaluations=int(data.get("evaluations", 0)),
            seconds=float(data.get("seconds", 0.0)),
            tokens=data.get("tokens"),
        )


def needs_influence(settings: SearchConfig) -> bool:
    """Whether the search settings need the model's Block Influence (one dense forward)."""
    return "shortgpt" in settings.initial_patterns or settings.mutation_prior == "block-influence"


def heuristic_seeds(
    settings: SearchConfig,
    num_layers: int,
    k: int,
    fitness: FitnessFn,
    influence: Sequence[float] | None = None,
) -> list[Pattern]:
    """The heuristic patterns ``settings.initial_patterns`` asks to seed EvoP's population with.

    A GA started only from random patterns spends most of a small budget finding the region a
    cheap heuristic points at; seeding it keeps the search global (the rest of the population is
    random) while guaranteeing it never ends worse than the seeds on its own fitness.

    Raises:
        BadInputError: if ``shortgpt`` is asked for without ``influence``, or a source is unknown.
    """
    seeds = []
    for name in settings.initial_patterns:
        if name == "shortgpt":
            if influence is None:
                raise BadInputError("initial pattern 'shortgpt' needs the model's Block Influence")
            seeds.append(lowest_influence(influence, num_layers, k, settings.protected_layers))
        elif name == "ppl-oneshot":
            seeds.append(ppl_oneshot(fitness, num_layers, k, settings.protected_layers).pattern)
        else:
            raise BadInputError(
                f"unknown initial pattern source {name!r} (use 'shortgpt' or 'ppl-oneshot')"
            )
    return seeds


def seed_search(
    settings: SearchConfig, num_layers: int, k: int, fitness: FitnessFn, influence: Influence | None
) -> Seeding:
    """Seeds and mutation prior of EvoP's GA (see :class:`Seeding`).

    Args:
        settings: The search section.
        fitness: Scores one pattern (the ``ppl-oneshot`` seed needs it).
        influence: Measures the Block Influence, called at most once; needed when
            :func:`needs_influence` says so.

    Raises:
        BadInputError: if the settings need Block Influence and ``influence`` is None.
    """
    start = time.perf_counter()
    measured = None
    if needs_influence(settings):
        if influence is None:
            raise BadInputError(
                "EvoP's 'shortgpt' seed and 'block-influence' mutation prior need the model's Block "
                "Influence; set search.initial_patterns=[] and search.mutation_prior=none to search "
                "without it"
            )
        measured = [float(x) for x in influence()]
    asked = CountingFitness(fitness)  # what the seeding alone asked for, even of a shared view
    seeds = heuristic_seeds(settings, num_layers, k, asked, measured)
    evaluations = sum(1 for p in asked.asked if Pattern.parse(p).k != k)
    stage_tokens = getattr(fitness, "stage_tokens", None)
    return Seeding(
        patterns=[str(p) for p in seeds],
        block_influence=measured if settings.mutation_prior == "block-influence" else None,
        evaluations=evaluations,
        seconds=round(time.perf_counter() - start, 3),
        tokens=None if stage_tokens is None else seeding_tokens(settings, evaluations, stage_tokens),
    )


def seeding_tokens(settings: SearchConfig, evaluations: int, stage_tokens: Sequence[int]) -> int:
    """Tokens forwarded to seed EvoP's GA (:attr:`Seeding.tokens`): one pass over every calibration
    block for the Block Influence (when the settings need it) and one per pattern scored only to
    find the seeds (scored in full: there is no best to race them against yet)."""
    return (int(needs_influence(settings)) + evaluations) * sum(stage_tokens)


def build_search(
    settings: SearchConfig, num_layers: int, k: int, fitness: FitnessFn, seeding: Seeding
) -> GeneticSearch:
    """EvoP's GA: ``seeding``'s patterns first in the initial population, its prior guiding mutation;
    when ``fitness`` is scored stage by stage (a PatternScorer), tokens are counted and racing
    (``search.racing_ratio``, ``search.racing_confidence``) is possible."""
    prior = influence_prior(seeding.block_influence) if seeding.block_influence else None
    # A staged scorer is seen through a StagedCounting view: with a pool of workers behind it,
    # that view is what lets each step's candidates be scored ahead, concurrently.
    fitness = counting(fitness)
    staged = fitness if hasattr(fitness, "stage_sums") else None
    return GeneticSearch(
        num_layers,
        k,
        settings,
        fitness=fitness,
        seed_patterns=[Pattern.parse(p) for p in seeding.patterns],
        layer_prior=prior,
        staged=staged,  # type: ignore[arg-type]
    )


def run_epps(
    fitness: FitnessFn,
    num_layers: int,
    k: int,
    settings: SearchConfig,
    influence: Influence | None = None,
) -> Outcome:
    """EvoP's search (seeding, GA, polish) run to the end in this process, as an :class:`Outcome`.

    Evaluations count every distinct pattern scored, the seeding's included.
    """
    start = time.perf_counter()
    f = counting(fitness)
    seeding = seed_search(settings, num_layers, k, f, influence)
    state = build_search(settings, num_layers, k, f, seeding).run()
    outcome = outcome_of_state(state, time.perf_counter() - start)
    outcome.evaluations = f.evaluations
    if outcome.tokens is not None and seeding.tokens is not None:
        outcome.tokens += seeding.tokens
    outcome.details["initial_patterns"] = seeding.patterns
    return outcome
