"""EPPS: evolutionary pruning pattern search, a genetic algorithm over pruning patterns.

The genome is a :class:`~evop.patterns.Pattern`: exactly ``k`` removed layers, never a protected
one. Every operator here (random sampling, crossover, swap mutation) keeps that invariant, so
no candidate ever needs repairing after the fact.

One generation of :class:`GeneticSearch`:

1. the ``elitism`` best patterns survive unchanged;
2. each child comes from parents picked by tournament or truncation selection, is crossed over
   with probability ``crossover_rate`` and swap-mutated with probability ``mutation_rate``;
3. a child already in the new population or already scored is re-drawn (up to ``max_attempts``
   tries), so evaluations are spent on unseen patterns;
4. only never-seen patterns are scored (the fitness memo); a diverged score becomes ``inf``;
5. the new population is the best ``population`` of parents + children (``survivors: plus``, a
   (mu + lambda) scheme) or of elites + children (``generational``), sorted by (fitness, pattern).

The whole search lives in a :class:`SearchState` that serialises to strict JSON, so a crashed
search resumes from its last checkpoint and ends exactly as the uninterrupted one would.
Fitness is *lower is better*. This module needs neither torch nor Prefect.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from evop.config import SearchConfig
from evop.patterns import Pattern

logger = logging.getLogger(__name__)

FitnessFn = Callable[[Pattern], float]
"""Scores one pattern; lower is better."""

BatchFitnessFn = Callable[[list[Pattern]], list[float]]
"""Scores several patterns at once (e.g. in parallel); one value per pattern, same order."""

STATE_FORMAT = 1
"""Version of the JSON written by :meth:`SearchState.to_json`."""

# Everything a fitness function may raise that means "this candidate diverged", not "bug":
# FloatingPointError, OverflowError and ZeroDivisionError are all ArithmeticErrors.
_DIVERGED_ERRORS = (ArithmeticError,)


# --------------------------------------------------------------------------- operators


def random_pattern(rng: random.Random, num_layers: int, candidates: Sequence[int], k: int) -> Pattern:
    """Draw a uniformly random pattern removing ``k`` of the ``candidates`` layers.

    Args:
        rng: Source of randomness.
        num_layers: Decoder layers of the dense model.
        candidates: Sorted layer indices that may be removed.
        k: Layers to remove.

    Returns:
        A pattern with exactly ``k`` removed layers, all in ``candidates``.
    """
    return Pattern.of(num_layers, rng.sample(list(candidates), k))


def crossover(rng: random.Random, first: Pattern, second: Pattern) -> Pattern:
    """Combine two parents into a child with the same number of removed layers.

    Layers both parents remove are kept; the rest are drawn at random from the layers only one
    parent removes. Both parents have ``k`` removed layers, so the symmetric difference always
    holds enough layers and the child has exactly ``k``.

    Args:
        rng: Source of randomness.
        first: One parent.
        second: The other parent (same ``num_layers`` and ``k``).

    Returns:
        The child pattern.

    Raises:
        ValueError: if the parents differ in ``num_layers`` or ``k``.
    """
    if first.num_layers != second.num_layers or first.k != second.k:
        raise ValueError(f"cannot cross {first} with {second}: different num_layers or k")
    a, b = set(first.removed), set(second.removed)
    both = a & b
    either = sorted(a ^ b)  # sorted so the draw depends only on the rng state
    fill = rng.sample(either, first.k - len(both))
    return Pattern.of(first.num_layers, both | set(fill))


def swap_count(rng: random.Random, max_swaps: int) -> int:
    """Draw a number of swaps in ``1..max_swaps`` with ``P(s)`` proportional to ``1/s``."""
    counts = range(1, max_swaps + 1)
    return rng.choices(counts, weights=[1.0 / s for s in counts])[0]


def swap_mutation(
    rng: random.Random,
    pattern: Pattern,
    candidates: Sequence[int],
    max_swaps: int,
    prior: Sequence[float] | None = None,
) -> Pattern:
    """Swap removed layers with kept candidate layers ``1..max_swaps`` times (few swaps likelier).

    Each swap puts back one removed layer and removes one kept candidate layer instead, so the
    number of removed layers never changes and protected layers (absent from ``candidates``)
    are never touched.

    Args:
        rng: Source of randomness.
        pattern: The pattern to mutate.
        candidates: Layer indices that may be removed.
        max_swaps: Most swaps applied.
        prior: Optional removability of every layer in ``(0, 1]`` (higher: likelier harmless to
            remove, e.g. from Block Influence ranks). With it, the layer removed next is drawn in
            proportion to its removability and the layer put back in proportion to the opposite;
            every candidate keeps a nonzero chance. Uniform draws without it.

    Returns:
        The mutated pattern (``pattern`` itself if no kept candidate exists to swap with).
    """
    removed = set(pattern.removed)
    kept = set(candidates) - removed
    if not kept or not removed:
        return pattern
    for _ in range(swap_count(rng, max_swaps)):
        if prior is None:
            out = rng.choice(sorted(removed))
            into = rng.choice(sorted(kept))
        else:
            back, add = sorted(removed), sorted(kept)
            out = rng.choices(back, weights=[1.0 - prior[i] + 1.0 / len(prior) for i in back])[0]
            into = rng.choices(add, weights=[prior[i] for i in add])[0]
        removed.remove(out)
        kept.remove(into)
        removed.add(into)
        kept.add(out)
    return Pattern.of(pattern.num_layers, removed)


# --------------------------------------------------------------------------- state


def _encode_float(value: float) -> float | str:
    """A JSON-safe float: non-finite values become the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _decode_float(value: float | int | str) -> float:
    """Inverse of :func:`_encode_float`."""
    if isinstance(value, str):
        if value not in ("inf", "-inf", "nan"):
            raise ValueError(f"not a float in a search state: {value!r}")
        return float(value)
    return float(value)


def _rng_state_to_json(state: tuple) -> list:
    """``random.Random.getstate()`` as nested lists (tuples do not survive JSON)."""
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def _rng_state_from_json(state: list) -> tuple:
    """Inverse of :func:`_rng_state_to_json`, ready for ``random.Random.setstate``."""
    version, internal, gauss_next = state
    return (version, tuple(internal), gauss_next)


@dataclass
class SearchState:
    """Everything needed to continue a search bit-identically.

    Attributes:
        num_layers: Decoder layers of the dense model.
        k: Layers every pattern removes.
        candidates: Sorted layers that may be removed (protected layers excluded).
        generation: Finished generations; ``-1``: nothing evaluated yet, ``0``: the initial
            population is scored.
        population: ``str(Pattern)`` of the current population, best first.
        memo: Every pattern ever scored -> its fitness (``math.inf`` for a diverged one), in
            scoring order.
        rng_state: ``random.Random`` state as JSON-friendly lists.
        history: One dict per finished generation: ``generation``, ``best_fitness``,
            ``mean_fitness`` (over the finite fitness values of the population),
            ``evaluations`` (cumulative distinct fitness calls), ``new_evaluations``,
            ``seconds`` (wall time; the only nondeterministic field) and ``best_pattern``.
        best: Best pattern found so far (``str(Pattern)``), ``None`` before generation 0.
        best_fitness: Its fitness (``math.inf`` until something finite is found).
        stall: Generations in a row without a strict improvement of ``best_fitness``.
        done: Whether the search has stopped.
        stop_reason: ``"generations"``, ``"patience"`` or ``"exhausted"`` (every pattern of the
            space has been scored) without polish; with it ``"local optimum"``, ``"polish
            rounds"`` or ``"exhausted"``; ``None`` while running.
        ga_stop_reason: Why the GA phase ended (``"generations"``/``"patience"``) once the polish
            phase has begun; ``None`` before.
        polish_rounds: Polish rounds done.
    """

    num_layers: int
    k: int
    candidates: list[int]
    generation: int = -1
    population: list[str] = field(default_factory=list)
    memo: dict[str, float] = field(default_factory=dict)
    rng_state: list = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    best: str | None = None
    best_fitness: float = math.inf
    stall: int = 0
    done: bool = False
    stop_reason: str | None = None
    ga_stop_reason: str | None = None
    polish_rounds: int = 0

    @property
    def evaluations(self) -> int:
        """Distinct patterns scored so far (fitness calls, thanks to the memo)."""
        return len(self.memo)

    def to_json(self) -> str:
        """Serialise to strict JSON (no ``Infinity``/``NaN``; those are written as ``"inf"``...).

        Returns:
            A JSON object; :meth:`from_json` reads it back into an equal state.
        """
        history = [
            {
                **entry,
                "best_fitness": _encode_float(entry["best_fitness"]),
                "mean_fitness": _encode_float(entry["mean_fitness"]),
            }
            for entry in self.history
        ]
        payload: dict[str, Any] = {
            "format": STATE_FORMAT,
            "num_layers": self.num_layers,
            "k": self.k,
            "candidates": list(self.candidates),
            "generation": self.generation,
            "population": list(self.population),
            "memo": {key: _encode_float(value) for key, value in self.memo.items()},
            "rng_state": self.rng_state,
            "history": history,
            "best": self.best,
            "best_fitness": _encode_float(self.best_fitness),
            "stall": self.stall,
            "done": self.done,
            "stop_reason": self.stop_reason,
            "ga_stop_reason": self.ga_stop_reason,
            "polish_rounds": self.polish_rounds,
        }
        return json.dumps(payload, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "SearchState":
        """Read a state written by :meth:`to_json`.

        Raises:
            ValueError: if the text is not a search state of a known format.
        """
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ValueError(f"not a search state of format {STATE_FORMAT}")
        history = [
            {
                **entry,
                "best_fitness": _decode_float(entry["best_fitness"]),
                "mean_fitness": _decode_float(entry["mean_fitness"]),
            }
            for entry in data["history"]
        ]
        return cls(
            num_layers=int(data["num_layers"]),
            k=int(data["k"]),
            candidates=[int(i) for i in data["candidates"]],
            generation=int(data["generation"]),
            population=list(data["population"]),
            memo={key: _decode_float(value) for key, value in data["memo"].items()},
            rng_state=data["rng_state"],
            history=history,
            best=data["best"],
            best_fitness=_decode_float(data["best_fitness"]),
            stall=int(data["stall"]),
            done=bool(data["done"]),
            stop_reason=data["stop_reason"],
            ga_stop_reason=data.get("ga_stop_reason"),
            polish_rounds=int(data.get("polish_rounds", 0)),
        )


# --------------------------------------------------------------------------- search


def influence_prior(influence: Sequence[float]) -> list[float]:
    """Removability from ShortGPT's Block Influence: rank-based, ``1`` for the layer that changes
    its input least down to ``1/L`` for the one that changes it most (ranks, not raw values, so
    the prior does not depend on the scale of the scores)."""
    n = len(influence)
    order = sorted(range(n), key=lambda j: (influence[j], j))
    prior = [0.0] * n
    for rank, j in enumerate(order):
        prior[j] = (n - rank) / n
    return prior


def resolve_protected(num_layers: int, protected: Sequence[int]) -> list[int]:
    """Turn protected layer indices (negative = from the end) into sorted indices in ``[0, L)``.

    Raises:
        ValueError: if an index is outside ``[-L, L)``.
    """
    resolved = set()
    for index in protected:
        if not -num_layers <= index < num_layers:
            raise ValueError(f"protected layer {index} is out of range for {num_layers} layers")
        resolved.add(index % num_layers)
    return sorted(resolved)


class GeneticSearch:
    """EPPS: a genetic algorithm over pruning patterns with exactly ``k`` removed layers.

    Args:
        num_layers: Decoder layers of the dense model.
        k: Layers every pattern removes.
        settings: The search settings (population, selection, rates, stopping, seed, protected
            layers). ``settings.sparsity``/``num_remove`` are not read: ``k`` is explicit.
        fitness: Scores one pattern (lower is better).
        batch_fitness: Scores a list of patterns at once; give this *or* ``fitness``.
        seed_patterns: Patterns placed first in the initial population (e.g. baselines).
        layer_prior: Removability of every layer in ``(0, 1]`` guiding swap mutation (see
            :func:`swap_mutation`; :func:`influence_prior` makes one from Block Influence).

    Raises:
        ValueError: if not exactly one of ``fitness``/``batch_fitness`` is given, a protected
            layer is out of range, ``k`` is not in ``[1, number of removable layers]`` (and
            below ``num_layers``), or a seed pattern does not fit.
    """

    def __init__(
        self,
        num_layers: int,
        k: int,
        settings: SearchConfig,
        fitness: FitnessFn | None = None,
        batch_fitness: BatchFitnessFn | None = None,
        seed_patterns: Sequence[Pattern] = (),
        layer_prior: Sequence[float] | None = None,
    ) -> None:
        if (fitness is None) == (batch_fitness is None):
            raise ValueError("give exactly one of fitness or batch_fitness")
        if num_layers < 2:
            raise ValueError(f"need at least 2 layers to prune, got {num_layers}")
        protected = resolve_protected(num_layers, settings.protected_layers)
        self.num_layers = num_layers
        self.k = k
        self.settings = settings
        self.protected = protected
        self.candidates = [i for i in range(num_layers) if i not in set(protected)]
        if not 1 <= k <= len(self.candidates) or k >= num_layers:
            raise ValueError(
                f"cannot remove k={k} layers: {len(self.candidates)} of {num_layers} layers are "
                f"removable (protected: {protected}) and at least one layer must stay"
            )
        self.space_size = math.comb(len(self.candidates), k)
        self._fitness = fitness
        self._batch_fitness = batch_fitness
        self.seed_patterns = self._check_seeds(seed_patterns)
        if layer_prior is not None and (
            len(layer_prior) != num_layers or not all(0 < p <= 1 for p in layer_prior)
        ):
            raise ValueError(f"layer_prior needs {num_layers} values in (0, 1], got {list(layer_prior)}")
        self.layer_prior = None if layer_prior is None else [float(p) for p in layer_prior]

    def _check_seeds(self, seeds: Sequence[Pattern]) -> list[Pattern]:
        unique: list[Pattern] = []
        allowed = set(self.candidates)
        for pattern in seeds:
            if pattern.num_layers != self.num_layers or pattern.k != self.k:
                raise ValueError(
                    f"seed pattern {pattern} does not remove k={self.k} of {self.num_layers} layers"
                )
            if not set(pattern.removed) <= allowed:
                raise ValueError(f"seed pattern {pattern} removes a protected layer {self.protected}")
            if pattern not in unique:
                unique.append(pattern)
        return unique

    # ----------------------------------------------------------------- public API

    def initial_state(self) -> SearchState:
        """The state before anything is scored (generation ``-1``), seeded by ``settings.seed``."""
        rng = random.Random(self.settings.seed)
        return SearchState(
            num_layers=self.num_layers,
            k=self.k,
            candidates=list(self.candidates),
            rng_state=_rng_state_to_json(rng.getstate()),
        )

    def step(self, state: SearchState) -> SearchState:
        """Run one generation and return the new state; ``state`` itself is left unchanged.

        From generation ``-1`` this scores the initial population (seed patterns first, then
        distinct random patterns); afterwards it breeds, scores and selects one generation. Once
        the GA has stopped, each step is one polish round (:meth:`polish_moves` of the best
        pattern, scored; the best of them and the population survive) until no move improves.

        Raises:
            ValueError: if ``state`` belongs to a different search or is already done.
        """
        self._check_state(state)
        if state.done:
            raise ValueError(f"the search is already done ({state.stop_reason})")
        started = time.perf_counter()
        rng = random.Random()
        rng.setstate(_rng_state_from_json(state.rng_state))
        memo = dict(state.memo)
        before = len(memo)
        polishing = state.ga_stop_reason is not None
        if state.generation < 0:
            pool = self._initial_patterns(rng)
        elif polishing:
            assert state.best is not None
            pool = self.polish_moves(Pattern.parse(state.best))
        else:
            pool = self._next_patterns(rng, [Pattern.parse(p) for p in state.population], memo)
        fresh = [p for p in pool if str(p) not in memo]
        for pattern, value in zip(fresh, self._score(fresh), strict=True):
            memo[str(pattern)] = value
        survivors = {str(p) for p in pool}
        if state.generation >= 0 and (polishing or self.settings.survivors == "plus"):
            survivors |= set(state.population)  # (mu + lambda): parents compete with their children
        ranked = sorted(survivors, key=lambda s: (memo[s], s))[: self.settings.population]

        generation = state.generation + 1
        best, best_fitness, stall = state.best, state.best_fitness, state.stall
        if best is None or memo[ranked[0]] < best_fitness:
            best, best_fitness, stall = ranked[0], memo[ranked[0]], 0
        else:
            stall += 1
        finite = [memo[s] for s in ranked if math.isfinite(memo[s])]
        mean = math.fsum(finite) / len(finite) if finite else math.inf
        stop_reason = None
        ga_stop_reason, polish_rounds = state.ga_stop_reason, state.polish_rounds + polishing
        if len(memo) >= self.space_size:
            stop_reason = "exhausted"
        elif polishing:
            if stall:
                stop_reason = "local optimum"
            elif polish_rounds >= self.settings.polish_rounds:
                stop_reason = "polish rounds"
        else:
            if generation >= self.settings.generations:
                stop_reason = "generations"
            elif stall >= self.settings.patience:
                stop_reason = "patience"
            if stop_reason is not None and self.settings.polish_rounds > 0:
                ga_stop_reason, stop_reason, stall = stop_reason, None, 0
        seconds = time.perf_counter() - started
        entry = {
            "generation": generation,
            "best_fitness": best_fitness,
            "mean_fitness": mean,
            "evaluations": len(memo),
            "new_evaluations": len(memo) - before,
            "seconds": seconds,
            "best_pattern": best,
            "phase": "polish" if polishing else "ga",
        }
        logger.info(
            "%s %d: best %.6g (%s), mean %.6g, evaluations %d (+%d), %.2fs%s",
            "polish round" if polishing else "generation",
            polish_rounds if polishing else generation,
            best_fitness,
            best,
            mean,
            len(memo),
            len(memo) - before,
            seconds,
            f", stop: {stop_reason}" if stop_reason else "",
        )
        return SearchState(
            num_layers=state.num_layers,
            k=state.k,
            candidates=list(state.candidates),
            generation=generation,
            population=ranked,
            memo=memo,
            rng_state=_rng_state_to_json(rng.getstate()),
            history=[dict(h) for h in state.history] + [entry],
            best=best,
            best_fitness=best_fitness,
            stall=stall,
            done=stop_reason is not None,
            stop_reason=stop_reason,
            ga_stop_reason=ga_stop_reason,
            polish_rounds=polish_rounds,
        )

    def polish_moves(self, pattern: Pattern) -> list[Pattern]:
        """Patterns that move one removed layer of ``pattern`` to a kept, removable layer at most
        ``settings.polish_radius`` layers from a removed one.

        Redundant layers come in runs of neighbours, so the last gains of a search are mostly
        moves at the edges of those runs: a layer of the run re-placed at its other end (SLEB's
        greedy pattern on the demo model at 20% is such a move from the ShortGPT seed), or a lone
        removed layer brought next to another (at 30%). That is ``k x |edges|`` patterns a round,
        where the edges number at most ``2 x radius x k`` and far fewer for runs, against
        ``k x (L - k)`` for all swaps.
        """
        removed = set(pattern.removed)
        radius = self.settings.polish_radius
        edges = [
            t
            for t in self.candidates
            if t not in removed and any(abs(t - r) <= radius for r in pattern.removed)
        ]
        moves = [
            Pattern.of(self.num_layers, (removed - {layer}) | {target})
            for layer in pattern.removed
            for target in edges
        ]
        return list(dict.fromkeys(moves))

    def run(
        self,
        state: SearchState | None = None,
        on_generation: Callable[[SearchState], None] | None = None,
    ) -> SearchState:
        """Run generations until the search is done.

        Args:
            state: Where to continue from (e.g. ``SearchState.from_json(checkpoint)``); a fresh
                search when ``None``.
            on_generation: Called with the new state after every generation; the place to
                checkpoint ``state.to_json()``.

        Returns:
            The final state; ``state.best`` is the best pattern found.
        """
        state = self.initial_state() if state is None else state
        self._check_state(state)
        while not state.done:
            state = self.step(state)
            if on_generation is not None:
                on_generation(state)
        return state

    # ----------------------------------------------------------------- internals

    def _check_state(self, state: SearchState) -> None:
        if (state.num_layers, state.k, list(state.candidates)) != (
            self.num_layers,
            self.k,
            self.candidates,
        ):
            raise ValueError(
                f"state of a different search: {state.num_layers} layers, k={state.k}, candidates "
                f"{state.candidates}; this search has {self.num_layers}, k={self.k}, {self.candidates}"
            )

    def _initial_patterns(self, rng: random.Random) -> list[Pattern]:
        """Seed patterns, then distinct random patterns up to the population size."""
        pool = list(self.seed_patterns)
        seen = {str(p) for p in pool}
        need = min(self.settings.population - len(pool), self.space_size - len(pool))
        if need <= 0:
            return pool
        if self.space_size <= 4 * self.settings.population:
            # A small space: sample without replacement from all patterns, no rejection loop.
            everything = [Pattern(self.num_layers, c) for c in combinations(self.candidates, self.k)]
            pool += rng.sample([p for p in everything if str(p) not in seen], need)
            return pool
        # A large space (more than 4x the population): rejection rarely triggers.
        while need > 0:
            pattern = random_pattern(rng, self.num_layers, self.candidates, self.k)
            if str(pattern) not in seen:
                seen.add(str(pattern))
                pool.append(pattern)
                need -= 1
        return pool

    def _next_patterns(
        self, rng: random.Random, population: list[Pattern], memo: dict[str, float]
    ) -> list[Pattern]:
        """Elites plus children of one generation; children avoid known patterns where possible."""
        settings = self.settings
        elites = population[: settings.elitism]
        pool = list(elites)
        in_pool = {str(p) for p in pool}
        dropped = 0
        for _ in range(settings.population - len(elites)):
            chosen: Pattern | None = None
            fallback: Pattern | None = None  # already scored, but not in this generation yet
            for _attempt in range(settings.max_attempts):
                child = self._breed(rng, population)
                key = str(child)
                if key in in_pool:
                    continue
                if key in memo:
                    if fallback is None:
                        fallback = child
                    continue
                chosen = child
                break
            if chosen is None:
                chosen = fallback
            if chosen is None:
                dropped += 1
                continue
            pool.append(chosen)
            in_pool.add(str(chosen))
        if dropped:
            logger.debug("dropped %d duplicate children: the space is nearly exhausted", dropped)
        return pool

    def _breed(self, rng: random.Random, population: list[Pattern]) -> Pattern:
        """One child: select, cross over (maybe), mutate (maybe)."""
        settings = self.settings
        child = self._select(rng, population)
        if rng.random() < settings.crossover_rate:
            child = crossover(rng, child, self._select(rng, population))
        if rng.random() < settings.mutation_rate:
            child = swap_mutation(rng, child, self.candidates, settings.max_swaps, self.layer_prior)
        return child

    def _select(self, rng: random.Random, population: list[Pattern]) -> Pattern:
        """One parent; ``population`` is sorted best-first, so a lower index is a fitter parent."""
        if self.settings.selection == "tournament":
            size = min(self.settings.tournament_size, len(population))
            return population[min(rng.sample(range(len(population)), size))]
        top = max(1, math.ceil(self.settings.truncation_fraction * len(population)))
        return population[rng.randrange(top)]

    def _score(self, patterns: list[Pattern]) -> list[float]:
        """Fitness of never-seen patterns; diverged ones (nan, inf, overflow) become ``inf``."""
        if not patterns:
            return []
        if self._fitness is not None:
            return [self._score_one(self._fitness, p) for p in patterns]
        assert self._batch_fitness is not None
        try:
            values = list(self._batch_fitness(list(patterns)))
        except _DIVERGED_ERRORS as err:
            # Do not blame the whole batch: find the diverged patterns one by one.
            logger.warning("batch fitness failed (%s: %s); scoring one by one", type(err).__name__, err)
            batch = self._batch_fitness
            return [self._score_one(lambda p: batch([p])[0], p) for p in patterns]
        if len(values) != len(patterns):
            raise ValueError(f"batch fitness returned {len(values)} values for {len(patterns)} patterns")
        return [self._finite(value, pattern) for pattern, value in zip(patterns, values, strict=True)]

    def _score_one(self, fitness: FitnessFn, pattern: Pattern) -> float:
        try:
            value = fitness(pattern)
        except _DIVERGED_ERRORS as err:
            logger.warning("pattern %s diverged (%s: %s); ranked last", pattern, type(err).__name__, err)
            return math.inf
        return self._finite(value, pattern)

    @staticmethod
    def _finite(value: Any, pattern: Pattern) -> float:
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            logger.warning("pattern %s has non-finite fitness %s; ranked last", pattern, value)
            return math.inf
        return value
