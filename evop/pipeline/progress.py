"""Progress of a long search: steps done, throughput and time left, from its generation entries.

One definition for the command line's progress bar and the Prefect progress artifact. The time
left is an upper bound: it assumes every remaining step (GA generations, then polish rounds) runs,
at the mean time of the steps run so far in this process, while patience or a local optimum may end
the search sooner.
"""

from __future__ import annotations

from typing import Any


class SearchProgress:
    """Running totals of the steps a search ran in this process.

    Args:
        total_steps: Steps the search runs at most (initial population + generations + polish rounds).
        done: Steps already done before (read from checkpoints: not timed here).
    """

    def __init__(self, total_steps: int, done: int = 0):
        self.total_steps = total_steps
        self.done = done
        self.steps = 0  # steps run (and timed) here
        self.seconds = 0.0
        self.patterns = 0
        self.tokens = 0

    def update(self, entry: dict[str, Any]) -> None:
        """Count one step's history entry (``generation``, ``seconds``, ``new_evaluations``,
        ``new_tokens``)."""
        self.done = max(self.done, entry["generation"] + 1)
        self.steps += 1
        self.seconds += entry.get("seconds") or 0.0
        self.patterns += entry.get("new_evaluations") or 0
        self.tokens += entry.get("new_tokens") or 0

    @property
    def patterns_per_s(self) -> float | None:
        return self.patterns / self.seconds if self.seconds > 0 else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 and self.tokens else None

    @property
    def eta_seconds(self) -> float | None:
        """Upper bound of the seconds left (None before the first timed step)."""
        if not self.steps:
            return None
        return max(0, self.total_steps - self.done) * self.seconds / self.steps

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total_steps) if self.total_steps else 1.0

    def postfix(self, entry: dict[str, Any]) -> dict[str, str]:
        """The command line's progress-bar fields after ``entry``: best fitness, evaluations so
        far, patterns/s and the upper bound of the minutes left."""
        fields = {"best": f"{entry['best_fitness']:.4g}", "evals": str(entry["total_evaluations"])}
        if self.patterns_per_s is not None:
            fields["patterns/s"] = f"{self.patterns_per_s:.2f}"
        if self.eta_seconds is not None:
            fields["eta<="] = f"{self.eta_seconds / 60:.1f}min"
        return fields

    def describe(self) -> str:
        """E.g. ``step 5 of at most 21 · 3.2 patterns/s · 12,000 tokens/s · at most 4m10s left``."""
        parts = [f"step {self.done} of at most {self.total_steps}"]
        if self.patterns_per_s is not None:
            parts.append(f"{self.patterns_per_s:.2f} patterns/s")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:,.0f} tokens/s")
        if self.eta_seconds is not None:
            minutes, seconds = divmod(round(self.eta_seconds), 60)
            parts.append(f"at most {minutes}m{seconds:02d}s left")
        return " · ".join(parts)


def total_steps(search: Any) -> int:
    """Steps of a search section at most: the initial population, the generations, polish rounds."""
    return search.generations + 1 + search.polish_rounds
