"""The state of a pattern search: everything a resumed search needs, as strict JSON.

:class:`SearchState` holds the population, the fitness memo, the random generator's state, the
history and the stopping bookkeeping of one :class:`~evop.method.genetic.GeneticSearch`.
:meth:`SearchState.to_json` writes it without ``Infinity``/``NaN`` (a diverged fitness is ``"inf"``)
and :meth:`SearchState.from_json` reads it back into an equal state, so a crashed search resumes
from its last checkpoint (:mod:`evop.storage.checkpoints`) and ends exactly as the uninterrupted
one would. This module needs neither torch nor Prefect.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evop.method.patterns import PatternSpace

STATE_FORMAT = 1
"""Version of the JSON written by :meth:`SearchState.to_json`."""


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


def rng_state_to_json(state: tuple) -> list:
    """``random.Random.getstate()`` as nested lists (tuples do not survive JSON)."""
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def rng_state_from_json(state: list) -> tuple:
    """Inverse of :func:`rng_state_to_json`, ready for ``random.Random.setstate``."""
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
        history: One dict per finished generation (a GA generation or a polish round):
            ``generation``, ``best_fitness``, ``mean_fitness`` (over the finite fitness values of
            the population), ``evaluations`` (cumulative distinct fitness calls),
            ``new_evaluations``, ``seconds`` (wall time; the only nondeterministic field),
            ``best_pattern`` and ``phase`` (``"ga"`` or ``"polish"``).
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
        stage_sums: With racing: each pattern's summed loss per stage (calibration batch), all
            stages for a fully scored pattern, fewer for one stopped early (raced out). Its memo
            value is then the fitness on the stages it was scored on, and it ranks after every
            fully scored pattern.
        tokens: Tokens forwarded so far (None when the fitness does not report them).
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
    stage_sums: dict[str, list[float]] = field(default_factory=dict)
    tokens: int | None = None

    @property
    def evaluations(self) -> int:
        """Distinct patterns scored so far (fitness calls, thanks to the memo)."""
        return len(self.memo)

    def problem(self, space: "PatternSpace") -> str | None:
        """What makes this state (read back from a file) not a state of the search ``space``
        describes, in a few words; None when every pattern in it fits.

        A checksum only catches accidents: this catches an edited state (a protected layer, another
        ``k``, another model) before its best pattern could be pruned and shipped.
        """
        if (self.num_layers, self.k) != (space.num_layers, space.k):
            return (
                f"a search of {self.k} of {self.num_layers} layers; this one removes {space.k} of "
                f"{space.num_layers}"
            )
        if tuple(self.candidates) != space.removable:
            return f"removable layers {self.candidates}; this search's are {list(space.removable)}"
        patterns = [*self.population, *self.memo, *self.stage_sums, *([self.best] if self.best else [])]
        patterns += [h["best_pattern"] for h in self.history if h.get("best_pattern")]
        for pattern in dict.fromkeys(patterns):  # each once, in order
            problem = space.problem(pattern)
            if problem is not None:
                return problem
        if self.best is not None and self.best not in self.memo:
            return f"its best pattern {self.best} was never scored"
        if self.best is not None and self.memo[self.best] != self.best_fitness:
            score = self.memo[self.best]
            return f"its best fitness {self.best_fitness} is not the score of {self.best} ({score})"
        return None

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
            "stage_sums": {key: [_encode_float(v) for v in sums] for key, sums in self.stage_sums.items()},
            "tokens": self.tokens,
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
            stage_sums={
                key: [_decode_float(v) for v in sums] for key, sums in data.get("stage_sums", {}).items()
            },
            tokens=data.get("tokens"),
        )
