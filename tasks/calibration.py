"""Calibration steps: segment the dataset into a pool, embed it, draw the CCDS sample."""

from __future__ import annotations

from typing import Any

from prefect import task

from evop import pipeline
from evop.config import EvoPConfig
from evop.pipeline import preflight
from tasks.policy import STORE_IS_THE_CACHE, io_task


@task(name="check-config", cache_policy=STORE_IS_THE_CACHE)
def check_config(config: EvoPConfig) -> int:
    """Check the config against the world before any heavy work (model layers against k and the
    protected layers, text sources, lm-eval task names, output directory, store); returns the
    model's layer count. Bad input fails here, and is never retried."""
    return preflight.check_run(config)


@io_task("segment-dataset")
def segment_dataset(config: EvoPConfig) -> str:
    """Read the calibration text and cut the candidate pool; returns the pool's URL."""
    return pipeline.segment_dataset(config)


@io_task("embed-pool")
def embed_pool(config: EvoPConfig, pool_url: str) -> str | None:
    """Embed the pool for CCDS; returns the embeddings' URL (None for random sampling)."""
    return pipeline.embed_pool(config)


@io_task("sample-calibration-set")
def sample_calibration_set(config: EvoPConfig, embeddings_url: str | None) -> dict[str, Any]:
    """Draw the calibration blocks (k-means across clusters, or random); returns the summary."""
    return pipeline.sample_calibration_set(config)
