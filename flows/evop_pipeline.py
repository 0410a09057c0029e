"""The EvoP pipeline as a resumable Prefect flow.

    check-config -> segment-dataset -> embed-pool -> sample-calibration-set
      -> run-generation x G (each checkpointed to the store)   [or run-baseline: sleb, shortgpt, ...]
      -> finalize-search -> prune-model -> evaluate-perplexity -> score-downstream (lm-eval)
      -> measure-speed -> write-report (result.json + plots) -> register-model (MLflow)

Every step is idempotent against the checkpoint store (file:// or s3://), so re-running the flow
with the same config (a new run, a flow retry, the UI's Retry, another machine) skips finished
steps and continues the search at the first unfinished generation. The search steps run under the
search's lease: two runs of one search at once compute it once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import get_run_context
from prefect.states import Failed

from evop.config import EvoPConfig
from evop.errors import BadInputError
from evop.pipeline.evaluation import final_metrics
from evop.pipeline.progress import SearchProgress, total_steps
from evop.pipeline.store import RunStore, search_lease
from evop.records import format_number
from evop.storage.lease import Lease
from tasks.calibration import check_config, embed_pool, sample_calibration_set, segment_dataset
from tasks.evaluation import evaluate_perplexity, measure_speed, score_downstream, write_report
from tasks.pruning import prune_model
from tasks.registry import register_model
from tasks.search import finalize_search, run_baseline, run_generation, search_status


@contextmanager
def library_logs_in_run() -> Iterator[None]:
    """Send the ``evop`` library's INFO log lines to the flow run's logs in the Prefect UI.

    ``PREFECT_LOGGING_EXTRA_LOGGERS=evop`` (set by the deployments) attaches Prefect's API
    handler but no level, so INFO lines would be dropped; without it there is no handler. Add
    one only where none is attached (two would send every line twice) and set the level.
    """
    from prefect.logging.handlers import APILogHandler

    lib = logging.getLogger("evop")
    added = None
    if not any(isinstance(h, APILogHandler) for h in lib.handlers):
        added = APILogHandler()
        lib.addHandler(added)
    previous = lib.level
    lib.setLevel(logging.INFO if previous in (logging.NOTSET, 0) or previous > logging.INFO else previous)
    try:
        yield
    finally:
        if added is not None:
            lib.removeHandler(added)
        lib.setLevel(previous)


class GpuConcurrencyLimitMissing(BadInputError):
    """``EVOP_GPU_CONCURRENCY`` names a global concurrency limit the Prefect server does not have."""


def gpu_slot():
    """Hold the global concurrency limit named by ``EVOP_GPU_CONCURRENCY`` (if set), so two runs
    never share one GPU; ``prefect gcl create gpu --limit 1`` creates it.

    Raises:
        GpuConcurrencyLimitMissing: the server has no limit of that name. Prefect's own
            ``concurrency()`` would only warn and run without the lock.
    """
    name = os.environ.get("EVOP_GPU_CONCURRENCY")
    if not name:
        return nullcontext()
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            raise GpuConcurrencyLimitMissing(
                f"EVOP_GPU_CONCURRENCY={name}: the Prefect server has no global concurrency limit "
                f"named {name!r}; create it with `prefect gcl create {name} --limit 1` "
                "(or unset EVOP_GPU_CONCURRENCY to run without GPU locking)"
            ) from None
    return concurrency(name, occupy=1)


def _rate(count: int | None, seconds: float) -> float | None:
    """Throughput of a generation (None when unknown or instantaneous)."""
    return None if count is None or seconds <= 0 else round(count / seconds, 2)


def _artifact_key(config: EvoPConfig, what: str) -> str:
    return f"evop-{what}-{config.search_hash()}"  # lowercase letters, digits and dashes only


# No automatic flow retries: transient failures are retried per task, and bad input fails the
# same way again. The UI's Retry (or a new run) resumes from the checkpoints.
@flow(name="evop-pipeline")
def evop_pipeline(config: EvoPConfig = EvoPConfig()) -> dict[str, Any]:  # noqa: B008 (the UI form's default)
    """CCDS calibration sampling, evolutionary pattern search, pruning and evaluation.

    Args:
        config: The whole run: model, calibration, search, fitness, evaluation, output_dir and
            the checkpoint store (``checkpoints``: file:///path or s3://bucket/prefix).

    Returns:
        A summary: result, pruned model path, perplexities and the checkpoint location.
    """
    log = get_run_logger()
    gpu = gpu_slot()  # a missing limit fails the run here, before any work
    run = RunStore(config)
    log.info("checkpoints of this search: %s", run.url())
    with library_logs_in_run(), gpu:
        check_config(config)  # bad input fails here, in seconds, before any heavy work
        # One run at a time computes a search: a second run of it waits here, then reads it back.
        with search_lease(config) as lease:
            pool_url = segment_dataset(config)
            embeddings_url = embed_pool(config, pool_url)
            calibration = sample_calibration_set(config, embeddings_url)
            rows = _search(config, lease)
            result = finalize_search(config)
        pruned_dir = prune_model(config, result)
        perplexity = evaluate_perplexity(config, pruned_dir)
        downstream = score_downstream(config, pruned_dir)
        speed = measure_speed(config, pruned_dir)
        report = write_report(config, result, perplexity, downstream, speed)
        create_markdown_artifact(
            _plots_markdown(report), key=_artifact_key(config, "plots"), description="Plots of the search"
        )

    metrics = final_metrics(perplexity, downstream, speed)
    flow_run = get_run_context().flow_run
    with library_logs_in_run():  # the registry's log lines too, without holding the GPU
        registration = register_model(
            config, report, pruned_dir, metrics, str(flow_run.id) if flow_run else None, return_state=True
        )
    registered = registration.result(raise_on_failure=False) if registration.is_completed() else None
    summary = {
        "result": result,
        "pruned_model": pruned_dir,
        "plots": report["plots"],
        "perplexity": perplexity,
        "downstream": downstream,
        "speed": speed,
        "metrics": metrics,
        "mlflow": registered,
        "checkpoints": run.url(),
        "calibration": calibration,
        "generations_run_now": len(rows),
        "search_seconds_now": sum(r["seconds"] for r in rows),
        "checkpoint_seconds_now": sum(r["checkpoint seconds"] for r in rows),
    }
    create_markdown_artifact(_summary_markdown(summary), key=_artifact_key(config, "summary"))
    if registration.is_failed():  # the run fails with the task's one line; its results are kept
        return Failed(message=registration.message, data=registration.result(raise_on_failure=False))
    return summary


def _search(config: EvoPConfig, lease: Lease) -> list[dict[str, Any]]:
    """The search steps: a baseline as one task, or EvoP one task per generation (skipping those
    in the store), with the progress artifact and the generations table updated as they finish.
    Returns the table's rows of the generations computed now."""
    log = get_run_logger()
    rows: list[dict[str, Any]] = []
    if config.search.method != "evop":
        outcome = run_baseline(config)
        create_table_artifact(
            _baseline_rows(outcome),
            key=_artifact_key(config, "generations"),
            description=f"{config.search.method} search of this run",
        )
        status = {"generation": -1, "done": True}
    else:
        status = search_status(config)
    # Polish rounds come after the GA's generations and are counted like them.
    total = total_steps(config.search)
    tracker = SearchProgress(total, done=status["generation"] + 1)
    progress_id = create_progress_artifact(
        progress=100.0 if status["done"] else 100.0 * (status["generation"] + 1) / total,
        key=_artifact_key(config, "progress"),
        description=f"EPPS generations and polish rounds done (of at most {total})",
    )
    generation, done = status["generation"] + 1, status["done"]
    if done and config.search.method == "evop":
        log.info("the search finished in an earlier run; reading its checkpoints")
    elif status["generation"] >= 0:
        log.info("resuming after generation %d", status["generation"])
    while not done:
        lease.check()  # lost to another run (this one could not renew it): stop here
        entry = run_generation(config, generation)
        rows.append(
            {
                "generation": entry["generation"],
                "phase": entry.get("phase", "ga"),  # "polish": a local-search round after the GA
                "best fitness": format_number(entry["best_fitness"], missing="diverged"),
                "mean fitness": format_number(entry["mean_fitness"], missing="diverged"),
                "evaluations": entry["evaluations"],
                "tokens forwarded": entry.get("tokens"),
                "raced out": entry.get("raced_out"),
                "seconds": round(entry["seconds"], 2),
                "workers": entry.get("workers", 1),
                "patterns/s": _rate(entry.get("new_evaluations"), entry["seconds"]),
                "tokens/s": _rate(entry.get("new_tokens"), entry["seconds"]),
                "checkpoint seconds": round(entry["checkpoint_seconds"], 3),
                "best pattern": entry["best_pattern"],
            }
        )
        done = entry["done"]
        tracker.update(entry)
        update_progress_artifact(
            progress_id, 100.0 if done else 100.0 * tracker.fraction, description=tracker.describe()
        )
        create_table_artifact(
            rows, key=_artifact_key(config, "generations"), description="EPPS generations of this run"
        )
        generation += 1
    return rows


def _plots_markdown(report: dict[str, Any]) -> str:
    """The run's PNG plots inlined as data URIs: the Prefect UI renders them in the artifact."""
    import base64
    from pathlib import Path

    titles = {
        "fitness_curve": "Fitness per generation (best and mean)",
        "layer_removal_frequency": "How often each layer is removed in the final population",
    }
    lines = [f"# Plots: {report['base_model']}, removed {report['removed_layers']}"]
    for name, path in report["plots"].items():
        data = base64.b64encode(Path(path).read_bytes()).decode()
        lines += [
            "",
            f"## {titles.get(name, name)}",
            "",
            f"![{name}](data:image/png;base64,{data})",
            "",
            f"`{path}`",
        ]
    return "\n".join(lines)


def _baseline_rows(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per round or generation of a baseline method's search."""
    return [
        {
            "round": h["step"],
            "best fitness": format_number(h["best_fitness"], missing="diverged"),
            "evaluations": h["evaluations"],
            "best pattern": h["best_pattern"],
        }
        for h in outcome["history"]
    ]


def _summary_markdown(summary: dict[str, Any]) -> str:
    r = summary["result"]
    ppl = summary["perplexity"]
    lines = [
        f"# EvoP: {r['base_model']}",
        f"Removed layers **{r['removed_layers']}** ({len(r['removed_layers'])} of {r['num_layers']}, "
        f"sparsity {r['sparsity']:.2f}), found with {r['evaluations']} evaluations in "
        f"{r['generations']} generations ({r['stop_reason']}).",
        "",
        "| measure | dense | pruned |",
        "| --- | --- | --- |",
        *[
            f"| ppl {k} | {format_number(ppl['dense'][k], missing='diverged')} | "
            f"{format_number(ppl['pruned'][k], missing='diverged')} |"
            for k in ppl["dense"]
        ],
    ]
    downstream = summary.get("downstream") or {}
    for task, scores in (downstream.get("dense") or {}).items():
        if isinstance(scores, dict):
            metric = "acc_norm" if scores.get("acc_norm") is not None else "acc"
            lines.append(
                f"| {task} {metric} | {format_number(scores.get(metric))} | "
                f"{format_number(downstream['pruned'][task].get(metric))} |"
            )
    speed = summary.get("speed")
    if speed:
        ratios = speed["ratios"]
        lines += [
            "",
            f"Speed-up (pruned vs dense): prefill {format_number(ratios.get('prefill_speedup'))}x, "
            f"decode {format_number(ratios.get('decode_speedup'))}x; "
            f"ideal {format_number(speed['ideal']['compute'])}x.",
        ]
    lines += [
        "",
        f"- checkpoints: [{summary['checkpoints']}]({summary['checkpoints']})",
        f"- pruned model: `{summary['pruned_model']}`",
    ]
    if summary.get("mlflow"):
        m = summary["mlflow"]
        lines.append(
            f"- MLflow: model `{m['model_name']}` version {m['model_version']} (`{m['ui_command']}`)"
        )
    return "\n".join(lines)
