"""Evaluation steps: perplexity, lm-eval accuracy and inference speed, dense vs pruned."""

from __future__ import annotations

from typing import Any

from prefect import task

from evop import pipeline
from evop.config import EvoPConfig
from tasks.policy import STORE_IS_THE_CACHE


@task(name="evaluate-perplexity", cache_policy=STORE_IS_THE_CACHE, retries=1)
def evaluate_perplexity(config: EvoPConfig, pruned_dir: str) -> dict[str, dict[str, float]]:
    """Perplexity of the dense and the pruned model on calibration and held-out text."""
    return pipeline.evaluate_perplexity(config, pruned_dir)


@task(name="score-downstream", cache_policy=STORE_IS_THE_CACHE, retries=1)
def score_downstream(config: EvoPConfig, pruned_dir: str) -> dict[str, Any] | None:
    """lm-eval accuracies of the dense and the pruned model (None when no tasks are set)."""
    return pipeline.score_downstream(config, pruned_dir)


@task(name="measure-speed", cache_policy=STORE_IS_THE_CACHE)
def measure_speed(config: EvoPConfig, pruned_dir: str) -> dict[str, Any] | None:
    """Prefill and decode speed, dense vs pruned, side by side (None when disabled)."""
    return pipeline.measure_speed(config, pruned_dir)


@task(name="write-report", cache_policy=STORE_IS_THE_CACHE)
def write_report(
    config: EvoPConfig,
    result: dict[str, Any],
    perplexity: dict[str, dict[str, float]],
    downstream: dict[str, Any] | None,
    speed: dict[str, Any] | None,
) -> dict[str, Any]:
    """``result.json`` in the output directory with the evaluation and the plots added."""
    return pipeline.write_report(config, result, perplexity, downstream, speed)
