"""How a search sees the fitness: the callable type, divergence handling, counting and the memo.

- :data:`FitnessFn`: scores one pattern, lower is better (:class:`evop.method.fitness.PatternScorer`
  is the real one; tests use synthetic objectives with known optima).
- :func:`finite_score`: the one place where a diverged candidate (nan, inf, an arithmetic error)
  becomes ``inf`` and ranks last instead of crashing the search.
- :class:`CountingFitness`: what one method asked for and what it would have cost alone;
  :class:`StagedCounting` is the same for a fitness scored stage by stage (racing), with the
  per-stage sums memoised and the tokens forwarded counted.
- :class:`ScoreMemo`: scores of one calibration set, shared by methods and persisted.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from evop.method.patterns import Pattern, PatternSpace
from evop.records import finite_or_none

log = logging.getLogger(__name__)

FitnessFn = Callable[[Pattern], float]
"""Scores one pattern; lower is better."""


def finite_score(fitness: FitnessFn, pattern: Pattern) -> float:
    """``fitness(pattern)`` with divergence (inf, nan, overflow, arithmetic errors) mapped to ``inf``.

    FloatingPointError, OverflowError and ZeroDivisionError are all ArithmeticErrors: they mean
    "this candidate diverged", not "bug", so they are caught; anything else propagates.
    """
    try:
        value = float(fitness(pattern))
    except ArithmeticError as err:
        log.warning("pattern %s diverged (%s: %s); ranked last", pattern, type(err).__name__, err)
        return math.inf
    if not math.isfinite(value):
        log.warning("pattern %s has non-finite fitness %s; ranked last", pattern, value)
        return math.inf
    return value


class CountingFitness:
    """The fitness one method sees: counts the distinct patterns it asks for.

    Scores come from ``memo`` (``str(pattern) -> (fitness, seconds to compute)``) when present, so
    several methods compared on the same calibration set never score a pattern twice. ``seconds``
    adds the *first* measured cost of every pattern this method asked for, hits included: the
    time the method would have spent alone, which is what a comparison must report.

    ``trace`` records, each time this method first holds a pattern's full score, ``(clock,
    seconds so far, pattern, fitness)`` (``clock``: ``time.perf_counter()``): what
    :func:`anytime` turns into the method's best pattern against its search seconds.

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
        self.trace: list[tuple[float, float, str, float]] = []

    @property
    def evaluations(self) -> int:
        """Distinct patterns this method scored."""
        return len(self.asked)

    def __call__(self, pattern: Pattern) -> float:
        key = str(pattern)
        if key not in self.memo:
            start = time.perf_counter()
            value = finite_score(self.fitness, pattern)
            self.memo[key] = (value, time.perf_counter() - start)
            if self.on_new is not None:
                self.on_new()
        value, cost = self.memo[key]
        if key not in self.asked:
            self.asked.add(key)
            self.seconds += cost
            self.trace.append((time.perf_counter(), self.seconds, key, value))
        return value


class StagedCounting(CountingFitness):
    """:class:`CountingFitness` of a fitness scored stage by stage (a
    :class:`~evop.method.fitness.PatternScorer`; the :class:`~evop.method.racing.StagedFitness`
    protocol), so that the GA can race candidates through it.

    Per-stage sums live in ``stages`` (``str(pattern) -> (sums, seconds of each stage)``), shared
    like ``memo``: a raced-out candidate is finished later from where it stopped, never re-scored,
    and a full score is assembled from the stages (exactly the scorer's own full score).
    ``tokens`` and ``seconds`` add what this method asked for, memo hits included: its cost alone.
    """

    def __init__(
        self,
        fitness: Any,
        memo: dict[str, tuple[float, float]] | None = None,
        stages: dict[str, tuple[list[float], list[float]]] | None = None,
        on_new: Callable[[], None] | None = None,
    ):
        super().__init__(fitness, memo, on_new)
        self.stages = {} if stages is None else stages
        self.tokens = 0
        self._counted: dict[str, int] = {}  # stages of each pattern this method has paid for

    @property
    def stage_tokens(self) -> list[int]:
        return self.fitness.stage_tokens

    @property
    def stage_positions(self) -> list[int]:
        return self.fitness.stage_positions

    def fitness_of(self, sums: list[float]) -> float:
        return self.fitness.fitness_of(sums)

    def stage_sums(self, pattern: Pattern, start: int = 0, stop: int | None = None) -> list[float]:
        n = len(self.stage_tokens)
        stop = n if stop is None else stop
        key = str(pattern)
        sums, seconds = self.stages.get(key, ([], []))
        if len(sums) < stop:  # score the missing stages, from the first one not memoised
            more, secs = [], []
            for stage in range(len(sums), stop):
                began = time.perf_counter()
                more += self.fitness.stage_sums(pattern, stage, stage + 1)
                secs.append(time.perf_counter() - began)
            sums, seconds = [*sums, *more], [*seconds, *secs]
            self.stages[key] = (sums, seconds)
            if self.on_new is not None:
                self.on_new()
        self._pay(key, stop, seconds, lambda: finite_score(lambda _: self.fitness_of(sums), pattern))
        return sums[start:stop]

    def prefetch(self, patterns: Sequence[Pattern], race_args: Any = None) -> None:
        """Score ``patterns`` ahead, concurrently, when the fitness is a pool of workers
        (:class:`~evop.method.parallel.ParallelScorer`); a no-op otherwise. ``race_args``:
        ``(reference sums, RaceRule)`` when the search races them, None to
        score them on every stage. Nothing is charged here: the search then asks for them as
        usual and pays when it does, as if it had scored them itself."""
        many = getattr(self.fitness, "race_many", None)
        if many is None:
            return
        n = len(self.stage_tokens)
        known: dict[str, list[float]] = {}
        for pattern in patterns:
            key = str(pattern)
            sums = self.stages.get(key, ([], []))[0]
            if key not in self.memo and len(sums) < n:
                known[key] = list(sums)
        if not known:
            return
        for key, (sums, seconds) in many(known, race_args).items():
            self.stages[key] = (sums, [*self.stages.get(key, ([], []))[1], *seconds])
        if self.on_new is not None:
            self.on_new()

    def _pay(self, key: str, stop: int, seconds: Sequence[float], full: Callable[[], float]) -> None:
        """Count stages ``..stop`` of ``key`` once for this method (tokens, seconds, a pattern
        asked); ``full()`` is its fitness once all stages are paid (for the trace)."""
        paid = self._counted.get(key, 0)
        if stop > paid:
            self.tokens += sum(self.stage_tokens[paid:stop])
            self.seconds += math.fsum(seconds[paid:stop])
            self._counted[key] = stop
            if stop == len(self.stage_tokens):
                self.trace.append((time.perf_counter(), self.seconds, key, full()))
        self.asked.add(key)

    def __call__(self, pattern: Pattern) -> float:
        key = str(pattern)
        n = len(self.stage_tokens)
        if key not in self.memo:
            value = finite_score(lambda p: self.fitness.fitness_of(self.stage_sums(p)), pattern)
            self.memo[key] = (value, math.fsum(self.stages.get(key, ([], []))[1][:n]))
            if self.on_new is not None:
                self.on_new()
        value, cost = self.memo[key]
        # Shared stages may run past this view's last one (EvoPress's cheap stage: see
        # ScoreMemo.fitness); a score memoised before stages were kept (or a diverged one) costs
        # its full price.
        seconds = self.stages.get(key, ([], []))[1][:n]
        self._pay(key, n, seconds if len(seconds) == n else [cost / n] * n, lambda: value)
        return value


def anytime(
    full: CountingFitness, k: int, others: Sequence[CountingFitness] = (), offset: float = 0.0
) -> list[tuple[float, str, float]]:
    """A method's best pattern of ``k`` removed layers against its search seconds, ``(seconds,
    pattern, fitness)`` at each improvement of ``full``'s scores. The seconds add what ``full``
    and the method's ``others`` views (EvoPress's cheap first stage) had charged by then, plus
    ``offset`` (e.g. the Block Influence forward that came first)."""
    views = [full, *others]
    events = sorted(
        (clock, i, spent, key, value)
        for i, view in enumerate(views)
        for clock, spent, key, value in view.trace
    )
    charged = [0.0] * len(views)
    best: list[tuple[float, str, float]] = []
    for _, i, spent, key, value in events:
        charged[i] = spent
        if i == 0 and Pattern.parse(key).k == k and (not best or value < best[-1][2]):
            best.append((offset + math.fsum(charged), key, value))
    return best


def prefetch(fitness: Any, patterns: Sequence[Pattern], race_args: Any = None) -> None:
    """Let a pool of workers score ``patterns`` ahead of a search step that is about to ask for
    them (:meth:`StagedCounting.prefetch`); a no-op for any other fitness."""
    while type(fitness) is CountingFitness:  # a plain count of a staged view (EvoP's seeding)
        fitness = fitness.fitness
    if isinstance(fitness, StagedCounting):
        fitness.prefetch(patterns, race_args)


def counting(
    fitness: Any,
    memo: dict[str, tuple[float, float]] | None = None,
    stages: dict[str, tuple[list[float], list[float]]] | None = None,
    on_new: Callable[[], None] | None = None,
) -> CountingFitness:
    """The counting view of ``fitness``: ``fitness`` itself when it is one already (a method given
    a shared memo's view), else a :class:`StagedCounting` when it is scored stage by stage, else a
    :class:`CountingFitness`."""
    if isinstance(fitness, CountingFitness):
        return fitness
    if hasattr(fitness, "stage_sums"):
        return StagedCounting(fitness, memo, stages, on_new)
    return CountingFitness(fitness, memo, on_new)


class ScoreMemo:
    """Scores of one calibration set, shared by every method that searches it and persisted.

    ``full`` holds scores on all calibration blocks, ``cheap`` those of EvoPress's first stage
    (``str(pattern) -> (fitness, seconds to compute)``); ``stages`` and ``cheap_stages`` the
    per-stage sums of a staged scorer (``str(pattern) -> (sums, seconds of each stage)``), which
    racing may have stopped early. New scores are written through ``write``
    at most every ``every`` seconds, so a crashed search re-scores only its last unsaved stretch;
    the JSON form keeps divergent scores as ``null``.

    Args:
        write: Persists :meth:`to_json` (a local file, an object store).
        data: What :meth:`to_json` wrote before (None: start empty).
        every: Seconds between two writes triggered by new scores.
    """

    KINDS = ("full", "cheap")
    STAGE_KINDS = ("stages", "cheap_stages")
    TABLES = KINDS + STAGE_KINDS
    """Its ``pattern -> ...`` tables, as :meth:`to_json` names them."""

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
        self.stages: dict[str, tuple[list[float], list[float]]] = {}
        self.cheap_stages: dict[str, tuple[list[float], list[float]]] = {}
        for kind in self.STAGE_KINDS:
            for k, (sums, secs) in (data or {}).get(kind, {}).items():
                getattr(self, kind)[k] = ([math.inf if v is None else v for v in sums], list(secs))
        self._write = write
        self.every = every
        self._saved = time.perf_counter()

    def __len__(self) -> int:
        return len(self.full) + len(self.cheap) + len(self.stages) + len(self.cheap_stages)

    @classmethod
    def problem(cls, data: Any, space: PatternSpace) -> str | None:
        """What makes ``data`` (a memo read back) not scores of patterns of ``space`` (None: it is):
        a memo holding a pattern the search could never ask for was not written by it."""
        return space.problem_in(data, cls.TABLES, exact_k=False)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            kind: {k: [finite_or_none(v), round(t, 4)] for k, (v, t) in getattr(self, kind).items()}
            for kind in self.KINDS
        }
        for kind in self.STAGE_KINDS:
            data[kind] = {
                k: [[finite_or_none(v) for v in sums], [round(t, 4) for t in secs]]
                for k, (sums, secs) in getattr(self, kind).items()
            }
        return data

    def flush(self, force: bool = True) -> None:
        """Write the scores now (``force``) or when the last write is ``every`` seconds old."""
        if force or time.perf_counter() - self._saved >= self.every:
            self._write(self.to_json())
            self._saved = time.perf_counter()

    def fitness(self, scorer: FitnessFn, cheap: bool = False) -> CountingFitness:
        """A fresh per-method view of this memo (``cheap``: the first-stage scores); a
        :class:`StagedCounting` when ``scorer`` is scored stage by stage.

        A cheap scorer whose stages are the first stages of the full one (its
        ``stages_prefix_of``: EvoPress's first stage on whole batches) shares ``stages`` with the
        full views: a survivor's full score starts after the stages its cheap score forwarded,
        and a pattern another method raced is not scored again. Each view still charges every
        stage it asks for (EvoPress alone scores its two stages on separate samples)."""
        stages = self.cheap_stages if cheap else self.stages
        if cheap and getattr(scorer, "stages_prefix_of", None) is not None:
            self._share_cheap_stages()
            stages = self.stages
        return counting(scorer, self.cheap if cheap else self.full, stages, lambda: self.flush(force=False))

    def _share_cheap_stages(self) -> None:
        """Move the cheap stages kept apart (memos written before stages were shared) into
        ``stages`` where they run further and agree on the stages both hold."""
        for key, (sums, secs) in list(self.cheap_stages.items()):
            have = self.stages.get(key, ([], []))[0]
            both = min(len(have), len(sums))
            if have[:both] != sums[:both]:
                continue  # not the same stages: keep both apart
            if len(sums) > len(have):
                self.stages[key] = (list(sums), list(secs))
            del self.cheap_stages[key]
