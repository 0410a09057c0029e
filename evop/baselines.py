"""Pattern searches EvoP is compared with: the anchors of ``docs/method.md``, plus EvoP's own GA.

Every method returns an :class:`Outcome`: the chosen pattern, its fitness on the full calibration
set, how many distinct patterns it scored and how long that took. All of them score patterns
through the same fitness callable (lower is better), so a comparison differs only in *how* the
patterns are chosen.

=============  ============================================================  ====================
method         how it chooses                                                fitness evaluations
=============  ============================================================  ====================
``evop``       genetic algorithm (:class:`evop.search.GeneticSearch`)        population x gens
``sleb``       greedy: each round removes the layer whose removal (on top    ~ k x L
               of those already removed) gives the lowest fitness
``shortgpt``   one shot: the k layers of lowest Block Influence              1 forward (+1 score)
               (1 - cos(input, output) of the layer on the calibration set)
``ppl-oneshot``  one shot: score each single-layer removal, remove the k     L (+1 score)
               least harmful (Shortened LLaMA's PPL criterion)
``evopress``   (1 + lambda) evolution, mutation only, staged token budgets:  offspring x gens
               all offspring on few tokens, the best few on all tokens       (most of them cheap)
``random``     best of exactly ``budget`` distinct random patterns           budget
``exhaustive`` every k-subset; refused above ``limit`` candidates            C(L', k)
=============  ============================================================  ====================

Only :func:`block_influence` touches a model (torch is imported inside it); the rest is plain
Python over a fitness callable, so the algorithms are tested on objectives with known optima.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING, Any

from evop.config import SearchConfig
from evop.patterns import Pattern
from evop.search import (
    GeneticSearch,
    SearchState,
    influence_prior,
    random_pattern,
    resolve_protected,
    swap_mutation,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

METHODS = ("evop", "sleb", "shortgpt", "ppl-oneshot", "evopress", "random", "exhaustive")
"""Every search method ``search.method`` accepts."""

FitnessFn = Callable[[Pattern], float]


class SearchTooLargeError(ValueError):
    """An exhaustive search over more candidate patterns than the configured limit."""


@dataclass
class Outcome:
    """What one search method found, and what it cost.

    Attributes:
        method: One of :data:`METHODS`.
        pattern: The chosen pattern.
        fitness: Its fitness on the full calibration set (``inf`` when it diverged).
        evaluations: Distinct patterns scored on the full calibration set.
        cheap_evaluations: Distinct patterns scored on the reduced token budget (``evopress``).
        seconds: Wall time of the search (scoring included).
        history: One entry per round or generation: ``step``, ``best_fitness``, ``best_pattern``,
            ``evaluations`` (cumulative).
        details: Method-specific figures (block influence scores, single-layer fitness, ...).
    """

    method: str
    pattern: Pattern
    fitness: float
    evaluations: int
    seconds: float
    cheap_evaluations: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def evaluations_to_best(self) -> int:
        """Evaluations spent when the chosen pattern was first the best (all of them when the
        history does not say): how fast a search gets there, not just what it spent. (SLEB's
        rounds hold partial patterns, so it needs all of its rounds.)"""
        for h in self.history:
            if "evaluations" in h and h.get("best_pattern") == str(self.pattern):
                return min(int(h["evaluations"]), self.evaluations)
        return self.evaluations

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (non-finite fitness as None); :meth:`from_json` reads it back."""
        from evop.fitness import finite_or_none

        return {
            "method": self.method,
            "pattern": str(self.pattern),
            "fitness": finite_or_none(self.fitness),
            "evaluations": self.evaluations,
            "cheap_evaluations": self.cheap_evaluations,
            "seconds": round(self.seconds, 3),
            "history": [{**h, "best_fitness": finite_or_none(h["best_fitness"])} for h in self.history],
            "details": self.details,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Outcome":
        def value(x: Any) -> float:
            return math.inf if x is None else float(x)

        return cls(
            method=data["method"],
            pattern=Pattern.parse(data["pattern"]),
            fitness=value(data["fitness"]),
            evaluations=int(data["evaluations"]),
            cheap_evaluations=int(data.get("cheap_evaluations", 0)),
            seconds=float(data["seconds"]),
            history=[{**h, "best_fitness": value(h["best_fitness"])} for h in data["history"]],
            details=data.get("details", {}),
        )


class CountingFitness:
    """The fitness one method sees: counts the distinct patterns it asks for.

    Scores come from ``memo`` (``str(pattern) -> (fitness, seconds to compute)``) when present, so
    several methods compared on the same calibration set never score a pattern twice. ``seconds``
    adds the *first* measured cost of every pattern this method asked for, hits included: the
    time the method would have spent alone, which is what a comparison must report.

    Args:
        fitness: Scores one pattern (lower is better).
        memo: Shared cache of scores; a private one when None.
        on_new: Called after each pattern scored for real (e.g. to persist ``memo``).
    """

    def __init__(
        self,
        fitness: FitnessFn,
        memo: dict[str, tuple[float, float]] | None = None,
        on_new: Callable[[], None] | None = None,
    ):
        self.fitness = fitness
        self.memo = {} if memo is None else memo
        self.on_new = on_new
        self.asked: set[str] = set()
        self.seconds = 0.0

    @property
    def evaluations(self) -> int:
        """Distinct patterns this method scored."""
        return len(self.asked)

    def __call__(self, pattern: Pattern) -> float:
        key = str(pattern)
        if key not in self.memo:
            start = time.perf_counter()
            value = _finite(self.fitness, pattern)
            self.memo[key] = (value, time.perf_counter() - start)
            if self.on_new is not None:
                self.on_new()
        value, cost = self.memo[key]
        if key not in self.asked:
            self.asked.add(key)
            self.seconds += cost
        return value


class ScoreMemo:
    """Scores of one calibration set, shared by every method that searches it and persisted.

    ``full`` holds scores on all calibration blocks, ``cheap`` those of EvoPress's first stage
    (``str(pattern) -> (fitness, seconds to compute)``). New scores are written through ``write``
    at most every ``every`` seconds, so a crashed search re-scores only its last unsaved stretch;
    the JSON form keeps divergent scores as ``null``.

    Args:
        write: Persists :meth:`to_json` (a local file, an object store).
        data: What :meth:`to_json` wrote before (None: start empty).
        every: Seconds between two writes triggered by new scores.
    """

    KINDS = ("full", "cheap")

    def __init__(
        self, write: Callable[[dict[str, Any]], None], data: dict[str, Any] | None = None, every: float = 30.0
    ):
        self.full: dict[str, tuple[float, float]] = {}
        self.cheap: dict[str, tuple[float, float]] = {}
        for kind in self.KINDS:
            entries = (data or {}).get(kind, {})
            getattr(self, kind).update(
                {k: (math.inf if v is None else v, t) for k, (v, t) in entries.items()}
            )
        self._write = write
        self.every = every
        self._saved = time.perf_counter()

    def __len__(self) -> int:
        return len(self.full) + len(self.cheap)

    def to_json(self) -> dict[str, Any]:
        from evop.fitness import finite_or_none

        return {
            kind: {k: [finite_or_none(v), round(t, 4)] for k, (v, t) in getattr(self, kind).items()}
            for kind in self.KINDS
        }

    def flush(self, force: bool = True) -> None:
        """Write the scores now (``force``) or when the last write is ``every`` seconds old."""
        if force or time.perf_counter() - self._saved >= self.every:
            self._write(self.to_json())
            self._saved = time.perf_counter()

    def fitness(self, scorer: FitnessFn, cheap: bool = False) -> CountingFitness:
        """A fresh per-method view of this memo (``cheap``: the first-stage scores)."""
        return CountingFitness(scorer, self.cheap if cheap else self.full, lambda: self.flush(force=False))


def _finite(fitness: FitnessFn, pattern: Pattern) -> float:
    """``fitness(pattern)`` with divergence (inf, nan, arithmetic errors) mapped to ``inf``."""
    try:
        value = float(fitness(pattern))
    except ArithmeticError as err:
        log.warning("pattern %s diverged (%s); ranked last", pattern, err)
        return math.inf
    return value if math.isfinite(value) else math.inf


def removable_layers(num_layers: int, protected: Sequence[int], k: int) -> list[int]:
    """The layers a method may remove, after checking ``k`` fits.

    Raises:
        ValueError: if ``k`` is not in ``[1, number of removable layers]`` or leaves no layer.
    """
    guarded = set(resolve_protected(num_layers, protected))
    candidates = [i for i in range(num_layers) if i not in guarded]
    if not 1 <= k <= len(candidates) or k >= num_layers:
        raise ValueError(
            f"cannot remove k={k} layers: {len(candidates)} of {num_layers} layers are removable "
            f"(protected: {sorted(guarded)}) and at least one layer must stay"
        )
    return candidates


def _best(scores: dict[int, float]) -> int:
    """The layer of lowest score; ties go to the lower index, so results are deterministic."""
    return min(scores, key=lambda layer: (scores[layer], layer))


# --------------------------------------------------------------------------- the methods


def sleb(fitness: FitnessFn, num_layers: int, k: int, protected: Sequence[int] = ()) -> Outcome:
    """SLEB: remove one layer per round, the one whose removal gives the lowest fitness, re-scoring
    every remaining layer each round (k rounds, about k x L evaluations)."""
    start = time.perf_counter()
    f = fitness if isinstance(fitness, CountingFitness) else CountingFitness(fitness)
    candidates = removable_layers(num_layers, protected, k)
    removed: list[int] = []
    history = []
    best_value = math.inf
    for step in range(k):
        scores = {c: f(Pattern.of(num_layers, [*removed, c])) for c in candidates if c not in removed}
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


def ppl_oneshot(fitness: FitnessFn, num_layers: int, k: int, protected: Sequence[int] = ()) -> Outcome:
    """Shortened LLaMA's PPL criterion: score every single-layer removal once, remove the k least
    harmful together (one more evaluation scores the final pattern)."""
    start = time.perf_counter()
    f = fitness if isinstance(fitness, CountingFitness) else CountingFitness(fitness)
    candidates = removable_layers(num_layers, protected, k)
    single = {c: f(Pattern.of(num_layers, [c])) for c in candidates}
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
    """ShortGPT: remove the k layers of lowest Block Influence (see :func:`block_influence`).

    Args:
        influence: Block Influence of every layer (``num_layers`` values).
        fitness: Scores the chosen pattern once, for the report.
        influence_seconds: Time it took to measure ``influence`` (added to the outcome's time).
    """
    start = time.perf_counter()
    f = fitness if isinstance(fitness, CountingFitness) else CountingFitness(fitness)
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


def lowest_influence(
    influence: Sequence[float], num_layers: int, k: int, protected: Sequence[int] = ()
) -> Pattern:
    """ShortGPT's pattern: the k removable layers of lowest Block Influence (ties: lower index)."""
    if len(influence) != num_layers:
        raise ValueError(f"need one Block Influence per layer ({num_layers}), got {len(influence)}")
    candidates = removable_layers(num_layers, protected, k)
    return Pattern.of(num_layers, sorted(candidates, key=lambda c: (influence[c], c))[:k])


def random_search(
    fitness: FitnessFn, num_layers: int, k: int, budget: int, protected: Sequence[int] = (), seed: int = 0
) -> Outcome:
    """Best of exactly ``budget`` distinct random patterns (fewer only when the space is smaller)."""
    if budget < 1:
        raise ValueError(f"random search needs a budget of at least 1 evaluation, got {budget}")
    start = time.perf_counter()
    f = fitness if isinstance(fitness, CountingFitness) else CountingFitness(fitness)
    candidates = removable_layers(num_layers, protected, k)
    rng = random.Random(seed)
    space = math.comb(len(candidates), k)
    if space <= 4 * budget:
        everything = [Pattern(num_layers, c) for c in combinations(candidates, k)]
        drawn = rng.sample(everything, min(budget, space))
    else:
        seen: dict[str, Pattern] = {}
        while len(seen) < budget:
            p = random_pattern(rng, num_layers, candidates, k)
            seen.setdefault(str(p), p)
        drawn = list(seen.values())
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
    f = fitness if isinstance(fitness, CountingFitness) else CountingFitness(fitness)
    scores = {str(p): f(p) for p in (Pattern(num_layers, c) for c in combinations(candidates, k))}
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
    full = fitness if isinstance(fitness, CountingFitness) else CountingFitness(fitness)
    cheap = cheap_fitness if isinstance(cheap_fitness, CountingFitness) else CountingFitness(cheap_fitness)
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
        staged = sorted(children.values(), key=lambda p: (cheap(p), str(p)))[:survivors]
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


def initial_patterns(
    settings: SearchConfig,
    num_layers: int,
    k: int,
    fitness: FitnessFn,
    influence: Callable[[], Sequence[float]] | None = None,
) -> list[Pattern]:
    """The heuristic patterns ``settings.initial_patterns`` asks to seed EvoP's population with.

    A GA started only from random patterns spends most of a small budget finding the region a
    cheap heuristic points at; seeding it keeps the search global (the rest of the population is
    random) while guaranteeing it never ends worse than the seeds on its own fitness.

    Raises:
        ValueError: if ``shortgpt`` is asked for without ``influence``.
    """
    seeds = []
    for name in settings.initial_patterns:
        if name == "shortgpt":
            if influence is None:
                raise ValueError(
                    "initial pattern 'shortgpt' needs the model's Block Influence (influence=...)"
                )
            seeds.append(lowest_influence(influence(), num_layers, k, settings.protected_layers))
        elif name == "ppl-oneshot":
            seeds.append(ppl_oneshot(fitness, num_layers, k, settings.protected_layers).pattern)
        else:
            raise ValueError(f"unknown initial pattern source {name!r} (use 'shortgpt' or 'ppl-oneshot')")
    return seeds


def genetic(
    fitness: FitnessFn,
    num_layers: int,
    k: int,
    settings: SearchConfig,
    seed_patterns: Sequence[Pattern] = (),
    influence: Callable[[], Sequence[float]] | None = None,
) -> Outcome:
    """EvoP's GA (:class:`~evop.search.GeneticSearch`) run to the end, as an :class:`Outcome`.

    The initial population holds ``seed_patterns`` plus those of ``settings.initial_patterns``;
    evaluations count every distinct pattern scored, the seeding's included.
    """
    start = time.perf_counter()
    f = fitness if isinstance(fitness, CountingFitness) else CountingFitness(fitness)
    measured: list[list[float]] = []

    def once() -> list[float]:  # one dense forward serves the seed and the mutation prior
        if not measured:
            if influence is None:
                raise ValueError(
                    "EvoP's 'shortgpt' seed and 'block-influence' mutation prior need the model's Block "
                    "Influence (influence=...); set search.initial_patterns=[] and "
                    "search.mutation_prior=none to search without it"
                )
            measured.append(list(influence()))
        return measured[0]

    seeds = [*seed_patterns, *initial_patterns(settings, num_layers, k, f, once)]
    prior = influence_prior(once()) if settings.mutation_prior == "block-influence" else None
    state = GeneticSearch(num_layers, k, settings, fitness=f, seed_patterns=seeds, layer_prior=prior).run()
    outcome = outcome_of_state(state, time.perf_counter() - start)
    outcome.evaluations = f.evaluations
    outcome.details["initial_patterns"] = [str(p) for p in seeds]
    return outcome


def outcome_of_state(state: SearchState, seconds: float) -> Outcome:
    """A finished GA state as an :class:`Outcome` (the GA's own memo counts its evaluations)."""
    if state.best is None:
        raise ValueError("the search has not scored anything yet")
    history = [
        {
            "step": h["generation"],
            "best_fitness": h["best_fitness"],
            "best_pattern": h["best_pattern"],
            "evaluations": h["evaluations"],
            "mean_fitness": h["mean_fitness"],
        }
        for h in state.history
    ]
    return Outcome(
        "evop",
        Pattern.parse(state.best),
        state.best_fitness,
        state.evaluations,
        seconds,
        history=history,
        details={"generations": state.generation, "stop_reason": state.stop_reason},
    )


def default_evopress_generations(num_layers: int, k: int) -> int:
    """EvoPress's rule of thumb for depth pruning: about k(L-k)/1.5 generations."""
    return max(1, round(k * (num_layers - k) / 1.5))


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
    """
    method = settings.method
    protected = settings.protected_layers
    if method == "evop":
        return genetic(fitness, num_layers, k, settings, influence=influence)
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
        return random_search(fitness, num_layers, k, budget, protected, settings.seed)
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


# --------------------------------------------------------------------------- ShortGPT's metric


def block_influence(model: "nn.Module", blocks: "torch.Tensor", batch_size: int = 8) -> list[float]:
    """ShortGPT's Block Influence of every decoder layer: ``1 - cos(x_in, x_out)`` averaged over
    all calibration tokens, from one dense forward pass (hooks read each layer's input and output).

    A layer that barely changes its input (BI near 0) is the cheapest to remove.
    """
    import torch

    from evop.models import layer_access

    layers = layer_access(model).layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    inputs: dict[int, torch.Tensor] = {}

    def before(j: int):
        def hook(module, args, kwargs):
            inputs[j] = args[0] if args else kwargs["hidden_states"]

        return hook

    def after(j: int):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(inputs.pop(j).float(), out.float(), dim=-1)
            sums[j] += (1 - cos).double().sum().cpu()

        return hook

    handles = []
    for j, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(before(j), with_kwargs=True))
        handles.append(layer.register_forward_hook(after(j), with_kwargs=True))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for i in range(0, blocks.shape[0], batch_size):
                batch = blocks[i : i + batch_size].to(device)
                model(input_ids=batch, use_cache=False)
                count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return (sums / max(count, 1)).tolist()
