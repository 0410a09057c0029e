"""Choosing the final pattern on data the search did not fit.

A search ranks patterns by their loss on the calibration blocks it optimises, so its best pattern
is partly fitted to those blocks: on the demo model, the pattern with the best calibration fitness
generalised worse than the runner-up. With ``search.validation_blocks > 0`` the ``validation_candidates``
best fully scored patterns of the search compete once more, on pool blocks that are not in the
calibration set, and the lowest validation loss wins (ties: calibration fitness, then pattern).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from evop.method.patterns import Pattern
from evop.method.racing import raced_out
from evop.method.scoring import FitnessFn, finite_score
from evop.method.state import SearchState
from evop.records import finite_or_none


def validation_indices(pool_size: int, calibration: Sequence[int], count: int, seed: int) -> list[int]:
    """``count`` pool indices that are not calibration blocks, drawn with ``seed`` (sorted).

    Raises:
        ValueError: if the pool has fewer than ``count`` blocks outside the calibration set.
    """
    left = sorted(set(range(pool_size)) - set(calibration))
    if count > len(left):
        raise ValueError(f"the pool has {len(left)} blocks outside the calibration set, {count} asked")
    return sorted(random.Random(seed).sample(left, count))


def finalists(state: SearchState, count: int, stages: int) -> list[Pattern]:
    """The ``count`` best fully scored patterns of a search (raced-out ones excluded: scored on
    fewer than its ``stages``), best first."""
    scored = [key for key in state.memo if not raced_out(state.stage_sums.get(key), stages)]
    return [Pattern.parse(k) for k in sorted(scored, key=lambda k: (state.memo[k], k))[:count]]


def select_by_validation(
    candidates: Sequence[Pattern], calibration: dict[str, float], validation: FitnessFn
) -> tuple[Pattern, list[dict[str, Any]]]:
    """The candidate of lowest validation fitness, and every candidate's two fitness values.

    Args:
        candidates: The finalists.
        calibration: Their calibration fitness (``str(pattern)`` -> value).
        validation: Scores a pattern on the validation blocks.
    """
    table = []
    for pattern in candidates:
        value = finite_score(validation, pattern)
        table.append({"pattern": str(pattern), "calibration": calibration[str(pattern)], "validation": value})
    chosen = min(table, key=lambda row: (row["validation"], row["calibration"], row["pattern"]))
    rows = []
    for row in table:  # JSON-safe: a diverged value is null
        rows.append({**row, "calibration": finite_or_none(row["calibration"])})
        rows[-1]["validation"] = finite_or_none(row["validation"])
    return Pattern.parse(chosen["pattern"]), rows
