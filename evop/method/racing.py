"""Racing: score a candidate one stage (calibration batch) at a time and stop when it is clearly out.

Most candidates of a layer-pruning search are hopeless: they remove a layer the model cannot do
without, and their perplexity is many times the best's after the first few blocks already. Racing
compares a candidate with the best fully scored pattern on the *same* stages (a paired comparison,
so the blocks' own difficulty cancels out) and stops it, after at least ``racing_min_stages``
stages, when

- ``racing_ratio``: its fitness on the stages so far is above ratio x the best's there (the
  hopeless ones, usually after one stage; with ``racing_widen`` the ratio is ``ratio ** sqrt(N/n)``
  after n of N stages, since a partial mean's noise shrinks as 1/sqrt(n)), or
- ``racing_confidence``: a one-sided paired t-test on the per-stage mean losses says it is worse
  than the best at that confidence (the near misses, which the ratio lets run to the end; most of
  a converging search's candidates are near misses).

A stopped (raced-out) candidate keeps its per-stage losses and its partial fitness, and ranks
after every fully scored pattern; the best pattern is always scored on all blocks.

Cost is counted in tokens forwarded (:attr:`SearchState.tokens <evop.method.state.SearchState>`),
not only in evaluations. This module needs neither torch nor Prefect.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from evop.method.patterns import Pattern
from evop.method.scoring import FitnessFn, finite_score, prefetch

if TYPE_CHECKING:
    from evop.config import SearchConfig

logger = logging.getLogger(__name__)


class StagedFitness(Protocol):
    """A fitness that can be scored stage by stage (:class:`~evop.method.fitness.PatternScorer`)."""

    @property
    def stage_tokens(self) -> list[int]: ...  # tokens forwarded to score each stage

    @property
    def stage_positions(self) -> list[int]: ...  # positions each stage's summed loss covers

    def stage_sums(self, pattern: Pattern, start: int = 0, stop: int | None = None) -> list[float]: ...

    def fitness_of(self, sums: list[float]) -> float: ...  # fitness on the first len(sums) stages


def raced_out(sums: Sequence[float] | None, stages: int) -> bool:
    """Whether a pattern with these per-stage sums was stopped early: scored on fewer than all
    ``stages`` (None: scored without racing, so in full)."""
    return sums is not None and len(sums) < stages


def worse_than(mine: Sequence[float], best: Sequence[float], confidence: float) -> bool:
    """Whether per-stage mean losses ``mine`` are above ``best``'s (the same stages) at
    ``confidence``: a one-sided paired t-test, so the stages' own difficulty cancels out."""
    n = len(mine)
    if n < 2:
        return False
    diffs = [a - b for a, b in zip(mine, best, strict=True)]
    mean = math.fsum(diffs) / n
    if mean <= 0:
        return False
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    from scipy.stats import t  # a scikit-learn dependency; imported only when racing needs it

    return mean > t.ppf(confidence, n - 1) * sd / math.sqrt(n)


@dataclass(frozen=True)
class RaceRule:
    """When :func:`race` stops a candidate (the ``search.racing_*`` settings).

    Attributes:
        ratio: Out when its fitness on the stages so far exceeds ``ratio`` x the reference's there
            (None: no ratio rule).
        min_stages: Stages always scored before the candidate can be stopped.
        confidence: Out when its per-stage mean losses are above the reference's at this
            confidence (:func:`worse_than`; None: no such test).
        widen: Widen the ratio on early stages: ``ratio ** sqrt(stages / scored)`` (one stage of
            Gemma-3's text-order calibration put the winner 31% above the best; all 16, 3% below).
    """

    ratio: float | None = None
    min_stages: int = 1
    confidence: float | None = None
    widen: bool = False

    @classmethod
    def of(cls, settings: "SearchConfig") -> "RaceRule":
        s = settings
        return cls(s.racing_ratio, s.racing_min_stages, s.racing_confidence, s.racing_widen)


def race(
    staged: StagedFitness, pattern: Pattern, reference: list[float] | None, rule: RaceRule
) -> list[float]:
    """Score ``pattern`` stage by stage until ``rule`` says it is clearly out, or on every stage.

    Args:
        staged: The staged fitness.
        pattern: The candidate.
        reference: Per-stage summed losses of the best pattern so far (all stages); None: score
            the candidate on every stage.
        rule: When it is out.

    Returns:
        The candidate's summed loss of each stage scored (all of them unless it was raced out).
    """
    stages = len(staged.stage_tokens)
    positions = staged.stage_positions
    ratio, confidence = rule.ratio, rule.confidence
    sums: list[float] = []
    for stage in range(stages):
        sums += staged.stage_sums(pattern, stage, stage + 1)
        done = len(sums)
        if reference is None or done < rule.min_stages or done == stages:
            continue
        mine, best = staged.fitness_of(sums), staged.fitness_of(reference[:done])
        limit = ratio ** math.sqrt(stages / done) if ratio is not None and rule.widen else ratio
        if not math.isfinite(mine) or (limit is not None and mine > limit * best):
            break
        if confidence is not None and worse_than(
            [v / p for v, p in zip(sums, positions, strict=False)],
            [v / p for v, p in zip(reference[:done], positions, strict=False)],
            confidence,
        ):
            break
    return sums


def score_candidates(
    fresh: list[Pattern],
    memo: dict[str, float],
    stage_sums: dict[str, list[float]],
    best: str | None,
    fitness: FitnessFn,
    staged: StagedFitness | None,
    settings: "SearchConfig",
) -> int | None:
    """Score a step's never-seen patterns into ``memo``: in full, or (``settings.racing``)
    raced against the best fully scored pattern so far, this step's included.

    Args:
        fresh: The patterns to score, in order.
        memo: Pattern -> fitness; updated (a raced-out pattern gets its partial fitness).
        stage_sums: Pattern -> per-stage summed losses; updated when racing.
        best: The best pattern before this step (None: none yet).
        fitness: Scores one pattern in full.
        staged: The same fitness stage by stage (None: tokens are not reported).
        settings: ``racing_ratio``, ``racing_confidence``, ``racing_min_stages``, ``racing_widen``.

    Returns:
        Tokens forwarded (None when the fitness does not report them).
    """
    if staged is None or not settings.racing:
        prefetch(fitness, fresh)  # a pool of workers scores them concurrently (else a no-op)
        for pattern in fresh:
            memo[str(pattern)] = finite_score(fitness, pattern)
        return None if staged is None else len(fresh) * sum(staged.stage_tokens)
    tokens = 0
    reference = stage_sums.get(best) if best is not None else None
    reference_fitness = memo[best] if reference is not None else math.inf
    # A pool of workers races them all against this reference concurrently; the loop below then
    # replays the same races from the memo, so a reference that improves mid-step changes nothing.
    rule = RaceRule.of(settings)
    prefetch(staged, fresh, (reference, rule))
    for pattern in fresh:
        key = str(pattern)
        try:
            sums = race(staged, pattern, reference, rule)
        except ArithmeticError as err:  # diverged: ranked last, as finite_score would
            logger.warning("pattern %s diverged (%s); ranked last", pattern, err)
            sums = [math.inf]
        stage_sums[key] = sums
        memo[key] = finite_score(lambda _, sums=sums: staged.fitness_of(sums), pattern)
        tokens += sum(staged.stage_tokens[: len(sums)])
        if not raced_out(sums, len(staged.stage_tokens)) and memo[key] < reference_fitness:
            reference, reference_fitness = sums, memo[key]
    return tokens
