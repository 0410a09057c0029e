"""One EvoP search end to end: model -> CCDS calibration set -> EPPS -> ``result.json``.

This is the library-level composition the CLI runs; the Prefect pipeline composes the same
library calls as separate, checkpointed steps.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evop.config import EvoPConfig
from evop.patterns import Pattern, layers_to_remove
from evop.search import GeneticSearch, SearchState

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
STATE_FILE = "search_state.json"
CALIBRATION_FILE = "calibration.safetensors"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _finite_or_none(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None


def build_result(
    cfg: EvoPConfig,
    state: SearchState,
    dense_fitness: float,
    calibration: dict[str, Any],
    wall_time_s: float,
) -> dict[str, Any]:
    """The ``result.json`` contract read by ``evop prune`` and the pipeline."""
    best = Pattern.parse(state.best) if state.best else None
    if best is None:
        raise RuntimeError("the search finished without a best pattern")
    return {
        "base_model": cfg.model.name_or_path,
        "num_layers": best.num_layers,
        "removed_layers": list(best.removed),
        "kept_layers": list(best.kept),
        "pattern": str(best),
        "sparsity": best.sparsity,
        "fitness_metric": cfg.fitness.metric,
        "fitness": _finite_or_none(state.best_fitness),
        "dense_fitness": _finite_or_none(dense_fitness),
        "evaluations": state.evaluations,
        "generations": state.generation,
        "stop_reason": state.stop_reason,
        "seed": cfg.search.seed,
        "calibration": calibration,
        "history": [
            {k: h[k] for k in ("generation", "best_fitness", "mean_fitness", "evaluations", "seconds")}
            | {"best_pattern": h.get("best_pattern")}
            for h in state.history
        ],
        "wall_time_s": round(wall_time_s, 3),
        "config_hash": cfg.search_hash(),
        "config": cfg.model_dump(mode="json"),
    }


def _load_saved_state(path: Path, config_hash: str) -> SearchState | None:
    """A previous run's search state for the same config, or None (then start afresh)."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        if saved.get("config_hash") != config_hash:
            log.warning("%s belongs to another config; starting a new search", path)
            return None
        return SearchState.from_json(json.dumps(saved["state"]))
    except (ValueError, KeyError, TypeError) as err:
        log.warning("cannot read %s (%s); starting a new search", path, err)
        return None


def run_search(
    cfg: EvoPConfig,
    on_generation: Callable[[SearchState], None] | None = None,
    resume: bool = True,
) -> dict[str, Any]:
    """Run CCDS + EPPS for ``cfg`` and write ``result.json`` (plus the search state and the
    calibration blocks) to ``cfg.output_dir``.

    The search state is saved after every generation; with ``resume`` a re-run of the same
    config continues from it and ends with the same pattern as an uninterrupted run.

    Returns:
        The result dictionary (see :func:`build_result`).
    """
    from evop.calibration import build_calibration_set
    from evop.evaluation import save_blocks
    from evop.fitness import PatternScorer
    from evop.models import load_model, num_layers

    start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_hash = cfg.search_hash()
    # Size the problem right after loading: a bad sparsity fails before calibration and search.
    model, tokenizer = load_model(cfg.model)
    n_layers = num_layers(model)
    k = layers_to_remove(n_layers, cfg.search.sparsity, cfg.search.num_remove)

    calib = build_calibration_set(cfg.calibration, tokenizer, model)
    save_blocks(calib.blocks, out / CALIBRATION_FILE)
    f = cfg.fitness
    scorer = PatternScorer(
        model, calib.blocks, f.metric, f.batch_size, f.token_budget, f.kl_top_k, f.prefix_cache_mb
    )
    dense = scorer.dense()
    log.info("dense %s on %d calibration blocks: %.4f", f.metric, calib.blocks.shape[0], dense)

    search = GeneticSearch(n_layers, k, cfg.search, fitness=scorer)
    state = _load_saved_state(out / STATE_FILE, config_hash) if resume else None
    if state is not None:
        log.info(
            "resuming the search after generation %d (%d evaluations)", state.generation, state.evaluations
        )

    def checkpoint(s: SearchState) -> None:
        write_json_atomic(out / STATE_FILE, {"config_hash": config_hash, "state": json.loads(s.to_json())})
        if on_generation is not None:
            on_generation(s)

    state = search.run(state, on_generation=checkpoint)
    result = build_result(cfg, state, dense, calib.summary(), time.perf_counter() - start)
    result["fitness_seconds"] = round(scorer.seconds, 3)
    write_json_atomic(out / RESULT_FILE, result)
    log.info("best pattern %s: %s %.4f (dense %.4f)", state.best, f.metric, state.best_fitness, dense)
    return result
