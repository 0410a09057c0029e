"""EPPS: evolutionary pruning pattern search, a genetic algorithm over pruning patterns.

The genome is a :class:`~evop.method.patterns.Pattern`: exactly ``k`` removed layers, never a
protected one. Every operator (:mod:`evop.method.operators`: random sampling, crossover, swap
mutation) keeps that invariant, so no candidate ever needs repairing after the fact.

One generation of :class:`GeneticSearch`:

1. the ``elitism`` best patterns survive unchanged;
2. each child comes from parents picked by tournament or truncation selection, is crossed over
   with probability ``crossover_rate`` and swap-mutated with probability ``mutation_rate``;
3. a child already in the new population or already scored is re-drawn (up to ``max_attempts``
   tries), so evaluations are spent on unseen patterns;
4. only never-seen patterns are scored (the fitness memo); a diverged score becomes ``inf``;
5. the new population is the best ``population`` of parents + children (``survivors: plus``, a
   (mu + lambda) scheme) or of elites + children (``generational``), sorted by (fitness, pattern).

When the GA stops (generations or patience) and ``polish_rounds > 0``, each further step is a
polish round: every :meth:`GeneticSearch.polish_moves` of the best pattern is scored, until no
move improves (a local optimum). With ``polish_pairs`` a round that finds nothing is followed by
one of :meth:`GeneticSearch.pair_moves` (two of its most promising moves at once); the polish
stops only when that finds nothing either.

The whole search lives in a :class:`~evop.method.state.SearchState` that serialises to strict
JSON, so a crashed search resumes from its last checkpoint and ends exactly as the uninterrupted
one would. Fitness is *lower is better*. This module needs neither torch nor Prefect.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from evop.config import SearchConfig
from evop.errors import BadInputError
from evop.method.operators import crossover, paired_moves, sample_patterns, swap_mutation
from evop.method.patterns import Pattern, removable_layers
from evop.method.racing import StagedFitness, raced_out, score_candidates
from evop.method.scoring import FitnessFn
from evop.method.state import SearchState, rng_state_from_json, rng_state_to_json

logger = logging.getLogger(__name__)


class GeneticSearch:
    """EPPS: a genetic algorithm over pruning patterns with exactly ``k`` removed layers.

    Args:
        num_layers: Decoder layers of the dense model.
        k: Layers every pattern removes.
        settings: The search settings (population, selection, rates, stopping, polish, seed,
            protected layers). ``settings.sparsity``/``num_remove`` are not read: ``k`` is explicit.
        fitness: Scores one pattern (lower is better).
        seed_patterns: Patterns placed first in the initial population (e.g. baselines).
        staged: The fitness scored stage by stage (:class:`~evop.method.racing.StagedFitness`,
            e.g. the :class:`~evop.method.fitness.PatternScorer` behind ``fitness``): counts the
            tokens forwarded, and makes racing (``settings.racing``) possible.
        layer_prior: Removability of every layer in ``(0, 1]`` guiding swap mutation (see
            :func:`~evop.method.operators.swap_mutation`;
            :func:`~evop.method.influence.influence_prior` makes one from Block Influence).

    Raises:
        BadInputError: if a protected layer is out of range, ``k`` is not in
            ``[1, number of removable layers]`` (and below ``num_layers``), or a seed pattern or
            the prior does not fit.
    """

    def __init__(
        self,
        num_layers: int,
        k: int,
        settings: SearchConfig,
        fitness: FitnessFn,
        seed_patterns: Sequence[Pattern] = (),
        layer_prior: Sequence[float] | None = None,
        staged: StagedFitness | None = None,
    ) -> None:
        if num_layers < 2:
            raise BadInputError(f"need at least 2 layers to prune, got {num_layers}")
        self.num_layers = num_layers
        self.k = k
        self.settings = settings
        self.candidates = removable_layers(num_layers, settings.protected_layers, k)
        self.protected = [i for i in range(num_layers) if i not in set(self.candidates)]
        self.space_size = math.comb(len(self.candidates), k)
        self._fitness = fitness
        if settings.racing and staged is None:
            raise BadInputError("search racing needs a fitness that is scored stage by stage")
        self.staged = staged
        self.seed_patterns = self._check_seeds(seed_patterns)
        if layer_prior is not None and (
            len(layer_prior) != num_layers or not all(0 < p <= 1 for p in layer_prior)
        ):
            raise BadInputError(f"layer_prior needs {num_layers} values in (0, 1], got {list(layer_prior)}")
        self.layer_prior = None if layer_prior is None else [float(p) for p in layer_prior]

    def _check_seeds(self, seeds: Sequence[Pattern]) -> list[Pattern]:
        unique: list[Pattern] = []
        allowed = set(self.candidates)
        for pattern in seeds:
            if pattern.num_layers != self.num_layers or pattern.k != self.k:
                raise BadInputError(
                    f"seed pattern {pattern} does not remove k={self.k} of {self.num_layers} layers"
                )
            if not set(pattern.removed) <= allowed:
                raise BadInputError(f"seed pattern {pattern} removes a protected layer {self.protected}")
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
            rng_state=rng_state_to_json(rng.getstate()),
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
        rng.setstate(rng_state_from_json(state.rng_state))
        memo = dict(state.memo)
        stage_sums = {key: list(v) for key, v in state.stage_sums.items()}
        polishing = state.ga_stop_reason is not None
        pool = self._candidates(state, rng, memo, polishing, stage_sums)
        fresh = [p for p in pool if str(p) not in memo]
        tokens = score_candidates(
            fresh, memo, stage_sums, state.best, self._fitness, self.staged, self.settings
        )
        ranked = self._survivors(state, pool, memo, polishing, stage_sums)
        new = self._advance(state, ranked, memo, polishing)
        new.rng_state = rng_state_to_json(rng.getstate())
        new.stage_sums = stage_sums
        new.tokens = None if tokens is None else (state.tokens or 0) + tokens
        entry = {
            "generation": new.generation,
            "best_fitness": new.best_fitness,
            "mean_fitness": _mean_finite(memo[s] for s in ranked),
            "evaluations": len(memo),
            "new_evaluations": len(fresh),
            "seconds": time.perf_counter() - started,
            "best_pattern": new.best,
            "phase": "polish" if polishing else "ga",
            "tokens": new.tokens,
            "new_tokens": tokens,
            "raced_out": sum(1 for p in fresh if self._partial(str(p), stage_sums)),
        }
        new.history.append(entry)
        kind = ("polish round (pairs)" if state.stall else "polish round") if polishing else "generation"
        self._log(entry, new, kind)
        return new

    def _candidates(
        self,
        state: SearchState,
        rng: random.Random,
        memo: dict[str, float],
        polishing: bool,
        stage_sums: dict[str, list[float]],
    ) -> list[Pattern]:
        """The patterns of this step: the initial population, a bred generation, or polish moves
        (pairs of them after a polish round that found nothing: see :meth:`_advance`)."""
        if state.generation < 0:
            return self._initial_population(rng)
        if polishing:
            assert state.best is not None
            if state.stall:
                return self.pair_moves(Pattern.parse(state.best), memo, stage_sums)
            return self.polish_moves(Pattern.parse(state.best))
        return self._next_patterns(rng, [Pattern.parse(p) for p in state.population], memo)

    def _survivors(
        self,
        state: SearchState,
        pool: list[Pattern],
        memo: dict[str, float],
        polishing: bool,
        stage_sums: dict[str, list[float]],
    ) -> list[str]:
        """The next population, best first: of the pool alone, or of pool + parents ((mu + lambda):
        ``survivors: plus``, and always in polish rounds). Raced-out patterns rank after every
        fully scored one (their fitness is on fewer blocks: not comparable)."""
        survivors = {str(p) for p in pool}
        if state.generation >= 0 and (polishing or self.settings.survivors == "plus"):
            survivors |= set(state.population)
        key = lambda s: (self._partial(s, stage_sums), memo[s], s)  # noqa: E731
        return sorted(survivors, key=key)[: self.settings.population]

    def _partial(self, key: str, stage_sums: dict[str, list[float]]) -> bool:
        """Whether ``key`` was raced out (scored on fewer stages than all)."""
        return self.staged is not None and raced_out(stage_sums.get(key), len(self.staged.stage_tokens))

    def _advance(
        self, state: SearchState, ranked: list[str], memo: dict[str, float], polishing: bool
    ) -> SearchState:
        """The state after this step (without its history entry and RNG): best so far, stall
        count, and whether and why the GA, the polish or the whole search stops."""
        generation = state.generation + 1
        best, best_fitness, stall = state.best, state.best_fitness, state.stall
        if best is None or memo[ranked[0]] < best_fitness:
            best, best_fitness, stall = ranked[0], memo[ranked[0]], 0
        else:
            stall += 1
        stop_reason = None
        ga_stop_reason, polish_rounds = state.ga_stop_reason, state.polish_rounds + polishing
        if len(memo) >= self.space_size:
            stop_reason = "exhausted"
        elif polishing:
            if stall > (1 if self.settings.polish_pairs > 1 else 0):  # the pair round comes at stall 1
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
        return SearchState(
            num_layers=state.num_layers,
            k=state.k,
            candidates=list(state.candidates),
            generation=generation,
            population=ranked,
            memo=memo,
            rng_state=state.rng_state,
            history=[dict(h) for h in state.history],
            best=best,
            best_fitness=best_fitness,
            stall=stall,
            done=stop_reason is not None,
            stop_reason=stop_reason,
            ga_stop_reason=ga_stop_reason,
            polish_rounds=polish_rounds,
        )

    @staticmethod
    def _log(entry: dict[str, Any], state: SearchState, step: str) -> None:
        fields = ("best_fitness", "best_pattern", "mean_fitness", "evaluations", "new_evaluations", "seconds")
        logger.info(
            "%s %d: best %.6g (%s), mean %.6g, evaluations %d (+%d), %.2fs%s",
            step,
            state.generation if step == "generation" else state.polish_rounds,
            *(entry[f] for f in fields),
            f", stop: {state.stop_reason}" if state.stop_reason else "",
        )

    def polish_moves(self, pattern: Pattern) -> list[Pattern]:
        """Patterns that move one removed layer of ``pattern`` to a kept, removable layer at most
        ``settings.polish_radius`` layers from a removed one.

        Redundant layers come in runs of neighbours, so the last gains of a search are mostly
        moves at the edges of those runs: a layer of the run re-placed at its other end (SLEB's
        greedy pattern on the demo model at 20% from the ShortGPT seed), or a lone removed layer
        brought next to another (at 30%): ``k x |edges|`` patterns a round, the edges at most
        ``2 x radius x k``, against ``k x (L - k)`` for all swaps.
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

    def pair_moves(
        self, pattern: Pattern, memo: dict[str, float], stage_sums: dict[str, list[float]]
    ) -> list[Pattern]:
        """Every pair of the ``settings.polish_pairs`` scored :meth:`polish_moves` of ``pattern``
        with the lowest fitness relative to its own, made at once (a raced-out move is compared
        on the stages it was scored on, as racing does): :func:`~evop.method.operators.paired_moves`."""
        best = stage_sums.get(str(pattern))

        def relative(move: Pattern) -> tuple[float, str]:
            sums = stage_sums.get(str(move))
            if self.staged is not None and sums and best and math.isfinite(sums[-1]):
                return self.staged.fitness_of(sums) / self.staged.fitness_of(best[: len(sums)]), str(move)
            return memo[str(move)] / memo[str(pattern)], str(move)

        scored = sorted((m for m in self.polish_moves(pattern) if str(m) in memo), key=relative)
        return paired_moves(pattern, scored, self.settings.polish_pairs)

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

    def _initial_population(self, rng: random.Random) -> list[Pattern]:
        """Seed patterns, then distinct random patterns up to the population size."""
        pool = list(self.seed_patterns)
        need = min(self.settings.population - len(pool), self.space_size - len(pool))
        if need <= 0:
            return pool
        fresh = sample_patterns(
            rng, self.num_layers, self.candidates, self.k, need, exclude=pool,
            enumerate_below=4 * self.settings.population,
        )
        return pool + fresh

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


def _mean_finite(values) -> float:
    """Mean of the finite values (``inf`` when there are none): a diverged pattern in the
    population must not make the mean meaningless."""
    finite = [v for v in values if math.isfinite(v)]
    return math.fsum(finite) / len(finite) if finite else math.inf
