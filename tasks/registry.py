"""Registration step: the MLflow run and the pruned model's registered version."""

from __future__ import annotations

from typing import Any

from evop import pipeline
from evop.config import EvoPConfig
from tasks.policy import io_task


@io_task("register-model")
def register_model(
    config: EvoPConfig,
    result: dict[str, Any],
    pruned_dir: str,
    metrics: dict[str, float],
    flow_run_id: str | None,
) -> dict[str, Any] | None:
    """Log the run to MLflow and register the pruned checkpoint as a new model version. A tracking
    store that fails ends this task Failed with one line (no traceback): the results are kept, and
    the line says how to register them later."""
    from prefect.states import Failed

    from evop.storage.tracking import RegistryError

    try:
        return pipeline.register_model(config, result, pruned_dir, metrics, flow_run_id)
    except RegistryError as err:
        return Failed(message=str(err), data=err)
