"""Search steps: one task run per GA generation, then the final result."""

from __future__ import annotations

from typing import Any

from evop import pipeline
from evop.config import EvoPConfig
from tasks.policy import io_task


@io_task("search-status")
def search_status(config: EvoPConfig) -> dict[str, Any]:
    """The newest verified checkpoint: ``{"generation": g, "done": bool}``."""
    return pipeline.search_status(config)


@io_task("run-generation", task_run_name="generation-{generation}")
def run_generation(config: EvoPConfig, generation: int) -> dict[str, Any]:
    """Run (or find checkpointed) one GA generation; returns its history entry and ``done``."""
    return pipeline.run_generation(config, generation)


@io_task("finalize-search")
def finalize_search(config: EvoPConfig) -> dict[str, Any]:
    """Write ``result.json`` (store and output directory) from the final checkpoint."""
    return pipeline.finalize_search(config)


@io_task("run-baseline", task_run_name="{config.search.method}")
def run_baseline(config: EvoPConfig) -> dict[str, Any]:
    """Run a baseline search method (sleb, shortgpt, ...) to the end; its scores are saved as it
    goes, so a retry replays them."""
    return pipeline.run_baseline(config)
