"""What the command line prints when a search or a pipeline run ends: the rows of its summary
table (``(label, value)`` pairs, rendered by :mod:`evop.cli`), and where a run stopped."""

from __future__ import annotations

from typing import Any

from evop.config import EvoPConfig
from evop.records import format_number


def _pattern_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    removed = result["removed_layers"]
    return [
        ("model", result["base_model"]),
        ("removed layers", f"{removed} ({len(removed)} of {result['num_layers']})"),
    ]


def _search_figures(result: dict[str, Any]) -> tuple[str, str]:
    return (
        "generations / evaluations",
        f"{result['generations']} / {result['evaluations']} ({result['stop_reason']})",
    )


def search_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary of ``evop search``: the pattern, its fitness next to the dense model's, the
    calibration set and what the search cost."""
    metric, calibration = result["fitness_metric"], result["calibration"]
    return [
        *_pattern_rows(result),
        (f"dense {metric}", format_number(result["dense_fitness"], missing="diverged")),
        (f"pruned {metric}", format_number(result["fitness"], missing="diverged")),
        (
            "calibration",
            f"{calibration['method']}, {calibration['n_samples']} x {calibration['block_len']} tokens",
        ),
        _search_figures(result),
        ("tokens forwarded", f"{result.get('tokens_forwarded') or 0:,}"),
        ("wall time", f"{result['wall_time_s']:.1f} s"),
    ]


def run_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary of ``evop run``: the pattern, what this run computed, dense vs pruned
    perplexity, lm-eval scores and speed, and the MLflow version."""
    from evop.eval.speed_report import format_speedup

    result, ppl = summary["result"], summary["perplexity"]
    now = summary["generations_run_now"]
    rows = [*_pattern_rows(result), _search_figures(result), ("generations run now", str(now))]
    if now:
        spent = summary["checkpoint_seconds_now"]
        share = spent / max(summary["search_seconds_now"], 1e-9)
        rows.append(
            (
                "checkpointing",
                f"{spent:.3f} s for {now} generations "
                f"({100 * share:.2f}% of {summary['search_seconds_now']:.1f} s of search)",
            )
        )
    for text in ppl["dense"]:
        dense, pruned = ppl["dense"][text], ppl["pruned"][text]
        ratio = format_number(pruned / dense if dense and pruned else None, 3)
        rows.append(
            (
                f"ppl {text}",
                f"dense {format_number(dense, missing='diverged')} -> "
                f"pruned {format_number(pruned, missing='diverged')} ({ratio}x)",
            )
        )
    downstream = summary.get("downstream") or {}
    for task, scores in (downstream.get("dense") or {}).items():
        if isinstance(scores, dict):
            metric = "acc_norm" if scores.get("acc_norm") is not None else "acc"
            pruned_score = downstream["pruned"][task].get(metric)
            rows.append(
                (
                    f"{task} {metric}",
                    f"dense {format_number(scores.get(metric))} -> pruned {format_number(pruned_score)}",
                )
            )
    speed = summary.get("speed")
    if speed:
        rows.append(
            (
                "speed-up (pruned/dense)",
                f"prefill {format_speedup(speed, 'prefill_speedup')}, "
                f"decode {format_speedup(speed, 'decode_speedup')} "
                f"(ideal {format_number(speed['ideal']['compute'])}x, "
                f"params {format_number(speed['ratios'].get('params'))}x)",
            )
        )
    mlflow = summary.get("mlflow")
    if mlflow:
        rows.append(("MLflow model", f"{mlflow['model_name']} version {mlflow['model_version']}"))
    return rows


def where_it_stopped(cfg: EvoPConfig) -> str:
    """Where an interrupted search stands in its store, in one phrase for the line the command
    line prints (``after generation 3 (checkpointed in file:///...)``); read from the manifest
    alone, without waiting on an unreachable store."""
    from evop.pipeline.store import RESULT, RunStore

    try:
        run = RunStore(cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"retry_s": 0})}))
        if run.get(RESULT) is not None:
            return f"after the search finished (its result is in {run.url()})"
        latest = run.checkpoints.manifest().get("latest")
    except Exception:  # noqa: BLE001 (an unreachable store must not hide the interruption)
        return "(the checkpoint store could not be read just now)"
    if latest is None:
        return f"before the search's first checkpoint (what was done is kept in {run.url()})"
    return f"after generation {latest} of the search (checkpointed in {run.url()})"
