"""What a search method returns: the chosen pattern, its fitness and what finding it cost.

Every search method (:data:`evop.searches.METHODS`: EvoP's GA and the baselines of
:mod:`evop.baselines`) returns an :class:`Outcome`: the chosen pattern, its fitness on the full
calibration set, how many distinct patterns it scored and how long that took. All of them score
patterns through the same fitness callable (lower is better), so a comparison differs only in
*how* the patterns are chosen. :func:`outcome_of_state` turns a finished GA state into one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from evop.method.patterns import Pattern
from evop.method.state import SearchState


@dataclass
class Outcome:
    """What one search method found, and what it cost.

    Attributes:
        method: One of :data:`~evop.searches.METHODS`.
        pattern: The chosen pattern.
        fitness: Its fitness on the full calibration set (``inf`` when it diverged).
        evaluations: Distinct patterns scored on the full calibration set.
        cheap_evaluations: Distinct patterns scored on the reduced token budget (``evopress``).
        seconds: Wall time of the search (scoring included).
        tokens: Tokens forwarded through the model to find it, as the method alone would have
            (None: not counted, e.g. a fitness not scored stage by stage).
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
    tokens: int | None = None
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
        from evop.records import finite_or_none

        return {
            "method": self.method,
            "pattern": str(self.pattern),
            "fitness": finite_or_none(self.fitness),
            "evaluations": self.evaluations,
            "cheap_evaluations": self.cheap_evaluations,
            "seconds": round(self.seconds, 3),
            "tokens": self.tokens,
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
            tokens=data.get("tokens"),
            history=[{**h, "best_fitness": value(h["best_fitness"])} for h in data["history"]],
            details=data.get("details", {}),
        )


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
            "new_evaluations": h.get("new_evaluations"),
            "raced_out": h.get("raced_out"),
            "tokens": h.get("tokens"),
            "seconds": h.get("seconds"),
        }
        for h in state.history
    ]
    return Outcome(
        "evop",
        Pattern.parse(state.best),
        state.best_fitness,
        state.evaluations,
        seconds,
        tokens=state.tokens,
        history=history,
        details={"generations": state.generation, "stop_reason": state.stop_reason},
    )
