"""How a search sees the fitness: the callable type, divergence handling, counting and the memo.

- :data:`FitnessFn`: scores one pattern, lower is better (:class:`evop.method.fitness.PatternScorer`
  is the real one; tests use synthetic objectives with known optima).
- :func:`finite_score`: the one place where a diverged candidate (nan, inf, an arithmetic error)
  becomes ``inf`` and ranks last instead of crashing the search.
- :class:`CountingFitness`: what one method asked for and what it would have cost alone.
- :class:`ScoreMemo`: scores of one calibration set, shared by methods and persisted.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from evop.method.patterns import Pattern
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
            value = finite_score(self.fitness, pattern)
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
