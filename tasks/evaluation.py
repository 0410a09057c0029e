"""Evaluation step: dense vs pruned perplexity (lm-eval scoring joins here later)."""

from __future__ import annotations

from prefect import task

from evop import pipeline
from evop.config import EvoPConfig
from tasks.policy import STORE_IS_THE_CACHE


@task(name="evaluate-perplexity", cache_policy=STORE_IS_THE_CACHE, retries=1)
def evaluate_perplexity(config: EvoPConfig, pruned_dir: str) -> dict[str, dict[str, float]]:
    """Perplexity of the dense and the pruned model on calibration and held-out text."""
    return pipeline.evaluate_perplexity(config, pruned_dir)
