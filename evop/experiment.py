"""One EvoP search end to end: model -> CCDS calibration set -> EPPS -> ``result.json``.

This is the library-level composition the CLI runs; the Prefect pipeline composes the same
library calls as separate, checkpointed steps.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evop.config import EvoPConfig
from evop.fitness import finite_or_none
from evop.patterns import Pattern
from evop.search import SearchState

if TYPE_CHECKING:
    from evop.baselines import Outcome

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


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
) -> dict[str, Any]:
    """The ``result.json`` contract read by ``evop prune`` and the pipeline (EvoP's GA)."""
    if state.best is None:
        raise RuntimeError("the search finished without a best pattern")
    history = [
        {k: h[k] for k in ("generation", "best_fitness", "mean_fitness", "evaluations", "seconds")}
        | {"best_pattern": h.get("best_pattern"), "phase": h.get("phase", "ga")}
        for h in state.history
    ]
    return _result(
        cfg, "evop", Pattern.parse(state.best), state.best_fitness, dense_fitness, calibration, wall_time_s,
        evaluations=state.evaluations, generations=state.generation, stop_reason=state.stop_reason,
        history=history,
    )  # fmt: skip


def build_outcome_result(
    cfg: EvoPConfig, outcome: "Outcome", dense_fitness: float, calibration: dict[str, Any]
) -> dict[str, Any]:
    """The ``result.json`` contract for a baseline method's :class:`~evop.baselines.Outcome`:
    the same keys as :func:`build_result` (plus ``cheap_evaluations`` and ``details``), one
    history entry per round or generation."""
    history = [
        {"generation": h["step"], "best_fitness": finite_or_none(h["best_fitness"]), "mean_fitness": None,
         "evaluations": h["evaluations"], "seconds": None, "best_pattern": h["best_pattern"]}
        for h in outcome.history
    ]  # fmt: skip
    return _result(
        cfg, outcome.method, outcome.pattern, outcome.fitness, dense_fitness, calibration, outcome.seconds,
        evaluations=outcome.evaluations, cheap_evaluations=outcome.cheap_evaluations,
        generations=len(outcome.history), stop_reason="finished", history=history, details=outcome.details,
    )  # fmt: skip


def run_search(
    cfg: EvoPConfig, on_generation: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run CCDS + EPPS (or the baseline ``cfg.search.method``) for ``cfg`` in this process and
    write ``result.json`` to ``cfg.output_dir``.

    The same idempotent steps as the Prefect pipeline, called in order: every generation is
    checkpointed to the store (``cfg.checkpoints``, default ``<output_dir>/checkpoints``), so a
    re-run of the same config continues from the last checkpoint and ends with the same pattern
    as an uninterrupted run; a finished search returns at once.

    Args:
        cfg: The run's configuration.
        on_generation: Called with each generation's history entry (progress display).

    Returns:
        The result dictionary (see :func:`build_result`).
    """
    from evop import pipeline

    pipeline.segment_dataset(cfg)
    pipeline.embed_pool(cfg)
    pipeline.sample_calibration_set(cfg)
    if cfg.search.method != "evop":
        pipeline.run_baseline(cfg)
        return pipeline.finalize_search(cfg)
    status = pipeline.search_status(cfg)
    generation = status["generation"] + 1
    if status["generation"] >= 0:
        log.info("resuming after generation %d from %s", status["generation"], pipeline.Run(cfg).url())
    done = status["done"]
    while not done:
        entry = pipeline.run_generation(cfg, generation)
        if on_generation is not None:
            on_generation(entry)
        done = entry["done"]
        generation += 1
    return pipeline.finalize_search(cfg)
