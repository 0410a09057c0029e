"""The ``result.json`` contract: what a finished search writes, for ``evop prune`` and the pipeline.

:func:`build_result` builds it from EvoP's final :class:`~evop.method.state.SearchState` and
:func:`build_outcome_result` from a baseline's :class:`~evop.method.outcome.Outcome`, with the same
keys: the pattern (removed and kept layers, sparsity), its fitness next to the dense model's, the
search figures (evaluations, generations, stop reason, a history entry per generation or round),
the calibration summary and the config with its hash.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evop.config import EvoPConfig
from evop.method.patterns import Pattern
from evop.method.state import SearchState
from evop.records import finite_or_none

if TYPE_CHECKING:
    from evop.method.outcome import Outcome


RESULT_FILE = "result.json"


def _result(
    cfg: EvoPConfig,
    method: str,
    best: Pattern,
    fitness: float,
    dense_fitness: float,
    calibration: dict[str, Any],
    wall_time_s: float,
    **search: Any,
) -> dict[str, Any]:
    """The ``result.json`` fields every search method shares, with ``search`` (evaluations,
    generations, stop_reason, history, ...) in their place."""
    return {
        "method": method,
        "base_model": cfg.model.name_or_path,
        "num_layers": best.num_layers,
        "removed_layers": list(best.removed),
        "kept_layers": list(best.kept),
        "pattern": str(best),
        "sparsity": best.sparsity,
        "fitness_metric": cfg.fitness.metric,
        "fitness": finite_or_none(fitness),
        "dense_fitness": finite_or_none(dense_fitness),
        **search,
        "seed": cfg.search.seed,
        "calibration": calibration,
        "wall_time_s": round(wall_time_s, 3),
        "config_hash": cfg.search_hash(),
        "config": cfg.model_dump(mode="json"),
    }


def build_result(
    cfg: EvoPConfig,
    state: SearchState,
    dense_fitness: float,
    calibration: dict[str, Any],
    wall_time_s: float,
    final: Pattern | None = None,
) -> dict[str, Any]:
    """The ``result.json`` contract read by ``evop prune`` and the pipeline (EvoP's GA).

    ``final``: the pattern chosen on validation blocks (default: the search's best).
    """
    if state.best is None:
        raise RuntimeError("the search finished without a best pattern")
    final = final or Pattern.parse(state.best)
    history = [
        {k: h[k] for k in ("generation", "best_fitness", "mean_fitness", "evaluations", "seconds")}
        | {k: h.get(k) for k in ("best_pattern", "tokens", "raced_out")}
        | {"phase": h.get("phase", "ga")}
        for h in state.history
    ]
    return _result(
        cfg,
        "evop",
        final,
        state.memo[str(final)],
        dense_fitness,
        calibration,
        wall_time_s,
        evaluations=state.evaluations,
        tokens_forwarded=state.tokens,
        generations=state.generation,
        stop_reason=state.stop_reason,
        history=history,
    )


def build_outcome_result(
    cfg: EvoPConfig, outcome: "Outcome", dense_fitness: float, calibration: dict[str, Any]
) -> dict[str, Any]:
    """The ``result.json`` contract for a baseline method's :class:`~evop.method.outcome.Outcome`:
    the same keys as :func:`build_result` (plus ``cheap_evaluations`` and ``details``), one
    history entry per round or generation."""
    history = [
        {
            "generation": h["step"],
            "best_fitness": finite_or_none(h["best_fitness"]),
            "mean_fitness": None,
            "evaluations": h["evaluations"],
            "seconds": None,
            "best_pattern": h["best_pattern"],
        }
        for h in outcome.history
    ]
    return _result(
        cfg,
        outcome.method,
        outcome.pattern,
        outcome.fitness,
        dense_fitness,
        calibration,
        outcome.seconds,
        evaluations=outcome.evaluations,
        tokens_forwarded=outcome.tokens,
        cheap_evaluations=outcome.cheap_evaluations,
        generations=len(outcome.history),
        stop_reason="finished",
        history=history,
        details=outcome.details,
    )
