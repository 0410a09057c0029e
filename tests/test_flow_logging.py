"""The flow's wiring around its steps, against the real Prefect API, with the steps' bodies replaced.

The real flow and its real tasks run; only the library functions the tasks call (``evop.pipeline.*``,
and MLflow's ``log_and_register``) are stand-ins that log one line through an ``evop`` logger and
return a small canned value. So a run takes a second or two and checks what the full pipeline tests
cannot afford to repeat: every step, registration included, logs to the flow run (exactly once), and a
misspelled GPU concurrency limit fails the run before any step.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

pytest.importorskip("prefect")

from prefect import get_client  # noqa: E402
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate  # noqa: E402
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId  # noqa: E402
from prefect.logging.handlers import APILogHandler  # noqa: E402

import evop.pipeline  # noqa: E402
import evop.storage.registry  # noqa: E402
from evop.config import build_config  # noqa: E402
from evop.errors import BadInputError  # noqa: E402
from flows.evop_pipeline import GpuConcurrencyLimitMissing, evop_pipeline  # noqa: E402

REGISTRY_LINE = "logged run run-1 and registered evop-pruned v1; browse with: mlflow ui"

RESULT = {
    "base_model": "tiny-llama",
    "removed_layers": [2],
    "num_layers": 4,
    "sparsity": 0.25,
    "evaluations": 3,
    "generations": 1,
    "stop_reason": "converged",
}


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    """Replace the bodies of every step; returns the names of the steps that ran, in order."""
    ran: list[str] = []
    lib = logging.getLogger("evop.pipeline")

    def step(name, value):
        def body(*args, **kwargs):
            ran.append(name)
            lib.info("step %s ran", name)
            return value(*args) if callable(value) else value

        monkeypatch.setattr(evop.pipeline, name, body)

    generation = {
        "generation": 0, "phase": "ga", "best_fitness": 1.0, "mean_fitness": 2.0, "evaluations": 3,
        "seconds": 0.1, "checkpoint_seconds": 0.01, "best_pattern": "1101", "done": True,
    }  # fmt: skip
    step("segment_dataset", "pool-url")
    step("embed_pool", "embeddings-url")
    step("sample_calibration_set", {"n_samples": 8})
    step("search_status", {"generation": -1, "done": False})
    step("run_generation", generation)
    step("finalize_search", RESULT)
    step("prune_model", str(tmp_path / "pruned"))
    step("evaluate_perplexity", {"dense": {"calibration": 10.0}, "pruned": {"calibration": 12.0}})
    step("score_downstream", None)
    step("measure_speed", None)
    step("write_report", {**RESULT, "plots": {}})

    def log_and_register(cfg, result, pruned_dir, metrics, **kwargs):
        # The registry's own logger and message (evop/storage/registry.py, after a new version).
        ran.append("register_model")
        evop.storage.registry.log.info(
            "logged run %s and registered %s v%s; browse with: %s", "run-1", "evop-pruned", 1, "mlflow ui"
        )
        return {"model_name": "evop-pruned", "model_version": "1", "ui_command": "mlflow ui"}

    # evop.pipeline.register_model (the real one) imports it from the registry module when called.
    monkeypatch.setattr(evop.storage.registry, "log_and_register", log_and_register)
    monkeypatch.delenv("PREFECT_LOGGING_EXTRA_LOGGERS", raising=False)
    monkeypatch.delenv("EVOP_GPU_CONCURRENCY", raising=False)
    return ran


def _config(tmp_path):
    return build_config({"output_dir": str(tmp_path / "out")})


def _flow_run_messages(flow_run_id) -> list[str]:
    APILogHandler().flush()  # logs go to the API in batches

    async def read():
        async with get_client() as client:
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            return [log.message for log in logs]

    return asyncio.run(read())


STEPS = [
    "segment_dataset", "embed_pool", "sample_calibration_set", "search_status", "run_generation",
    "finalize_search", "prune_model", "evaluate_perplexity", "score_downstream", "measure_speed",
    "write_report", "register_model",
]  # fmt: skip


def test_every_step_logs_to_the_flow_run_once_registration_included(prefect_api, stand_ins, tmp_path):
    state = evop_pipeline(config=_config(tmp_path), return_state=True)
    assert state.is_completed(), state
    assert stand_ins == STEPS
    assert state.result()["mlflow"]["model_version"] == "1"
    lines = _flow_run_messages(state.state_details.flow_run_id)
    for name in STEPS[:-1]:
        assert lines.count(f"step {name} ran") == 1, (name, lines)
    # register-model runs after the GPU work: it must still be inside library_logs_in_run().
    assert lines.count(REGISTRY_LINE) == 1, lines


def test_a_missing_gpu_concurrency_limit_fails_before_any_step(prefect_api, stand_ins, tmp_path, monkeypatch):
    name = f"evop-test-gpu-{uuid.uuid4().hex[:8]}"  # misspelled or never created
    monkeypatch.setenv("EVOP_GPU_CONCURRENCY", name)
    with pytest.raises(GpuConcurrencyLimitMissing) as err:
        evop_pipeline(config=_config(tmp_path))
    assert stand_ins == []
    assert isinstance(err.value, BadInputError) and err.value.permanent
    message = str(err.value)
    assert f"EVOP_GPU_CONCURRENCY={name}" in message
    assert f"prefect gcl create {name} --limit 1" in message
    assert "\n" not in message

    # Created (as the message says), the same run goes through and holds the limit.
    async def create():
        async with get_client() as client:
            await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))

    asyncio.run(create())
    state = evop_pipeline(config=_config(tmp_path), return_state=True)
    assert state.is_completed(), state
    assert stand_ins == STEPS
    lines = _flow_run_messages(state.state_details.flow_run_id)
    assert not [m for m in lines if "do not exist" in m], lines  # Prefect's warning when it skips the lock
