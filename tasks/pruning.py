"""Pruning step: materialise the best pattern as a Hugging Face checkpoint."""

from __future__ import annotations

from typing import Any

from prefect import task

from evop import pipeline
from evop.config import EvoPConfig
from tasks.policy import STORE_IS_THE_CACHE


@task(name="prune-model", cache_policy=STORE_IS_THE_CACHE, retries=1)
def prune_model(config: EvoPConfig, result: dict[str, Any]) -> str:
    """Save the pruned checkpoint (skipped when it already holds this pattern); returns its path."""
    return pipeline.prune_model(config, result)
