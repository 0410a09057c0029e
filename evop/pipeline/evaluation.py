"""The steps after the search: prune, evaluate, report and register the pruned model.

:func:`prune_model` saves the pruned checkpoint once. :func:`evaluate_perplexity`,
:func:`score_downstream` and :func:`measure_speed` compare it with the dense model (perplexity and
lm-eval scores and speed are kept in the run's store and reused, so ``result.json`` and MLflow
always hold the same figures; ``evop bench`` measures speed again). :func:`write_report` adds the
evaluation and the plots to ``<output_dir>/result.json``, and :func:`register_model` logs the run
to MLflow with the flat metrics of :func:`final_metrics` and registers the pruned model.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from evop.config import EvoPConfig
from evop.eval.downstream import task_directory
from evop.pipeline.cache import cached_model
from evop.pipeline.store import BLOCKS, RunStore, _require_tensor

log = logging.getLogger(__name__)


def prune_model(cfg: EvoPConfig, result: dict[str, Any]) -> str:
    """Save the pruned checkpoint of ``result`` to ``<output_dir>/pruned-model`` (once)."""
    from evop.method.patterns import Pattern
    from evop.models.loading import load_model
    from evop.models.pruning import save_pruned

    out = Path(cfg.output_dir) / "pruned-model"
    meta = out / "evop_pattern.json"
    if meta.is_file() and json.loads(meta.read_text()).get("pattern") == result["pattern"]:
        return str(out)
    # A fresh copy: pruning is destructive, and the cached dense model must stay whole.
    model, tokenizer = load_model(cfg.model)
    pattern = Pattern.of(result["num_layers"], result["removed_layers"])
    save_pruned(model, tokenizer, pattern, out, base_model=cfg.model.name_or_path)
    del model
    return str(out)


def evaluate_perplexity(cfg: EvoPConfig, pruned_dir: str) -> dict[str, dict[str, float]]:
    """Dense vs pruned perplexity on the calibration blocks and each held-out text.

    Returns:
        ``{"dense": {set: ppl}, "pruned": {set: ppl}}``.
    """
    from evop.eval.perplexity import heldout_set, perplexities

    run = RunStore(cfg)
    e = cfg.evaluation
    name = _evaluation_name(
        "perplexity", pruned_dir, e.model_dump_json(include={"heldout", "block_len", "max_blocks", "stride"})
    )
    saved = run.get_json(name)
    if saved is not None:
        return saved
    dense_model, tokenizer = cached_model(cfg)
    sets = {"calibration": _require_tensor(run, BLOCKS)}
    for source in e.heldout:
        sets[source.removeprefix("evop-assets:")] = heldout_set(
            source, tokenizer, e.block_len, e.max_blocks, e.stride
        )
    start = time.perf_counter()
    scores = {
        "dense": perplexities(dense_model, sets, e.batch_size),
        "pruned": perplexities(_pruned_model(cfg, pruned_dir)[0], sets, e.batch_size),
    }
    log.info("perplexity of dense and pruned in %.1f s", time.perf_counter() - start)
    run.put_json(name, scores)
    return scores


def _pruned_model(cfg: EvoPConfig, pruned_dir: str) -> tuple[Any, Any]:
    """The pruned checkpoint, loaded once per process like the dense model."""
    pruned_cfg = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"name_or_path": pruned_dir, "gguf_file": None})}
    )
    return cached_model(pruned_cfg)


def _evaluation_name(kind: str, pruned_dir: str, settings: str) -> str:
    """Store key of an evaluation of one pruned pattern under given settings."""
    import hashlib

    pattern = json.loads((Path(pruned_dir) / "evop_pattern.json").read_text())["pattern"]
    tag = hashlib.sha256(f"{pattern}|{settings}".encode()).hexdigest()[:12]
    return f"evaluation/{kind}-{tag}.json"


def score_downstream(cfg: EvoPConfig, pruned_dir: str) -> dict[str, Any] | None:
    """lm-eval accuracies of the dense and the pruned model (None when no tasks are configured).

    Returns:
        ``{"dense": {task: {...}, "mean_acc": x}, "pruned": {...}}``.
    """
    from evop.eval.downstream import evaluate_tasks

    e = cfg.evaluation
    if not e.tasks:
        return None
    run = RunStore(cfg)
    settings = e.model_dump_json(
        include={"tasks", "task_source", "task_examples", "include_path", "num_fewshot", "limit"}
    )
    name = _evaluation_name("downstream", pruned_dir, settings)
    saved = run.get_json(name)
    if saved is not None:
        return saved
    dense_model, tokenizer = cached_model(cfg)
    include = task_directory(cfg, tokenizer)
    scores = {}
    for label, model in (("dense", dense_model), ("pruned", _pruned_model(cfg, pruned_dir)[0])):
        start = time.perf_counter()
        scores[label] = evaluate_tasks(
            model, tokenizer, e.tasks, include, e.num_fewshot, e.limit, e.lm_eval_batch_size
        )
        log.info(
            "lm-eval on the %s model: mean acc %s (%.1f s)",
            label,
            scores[label].get("mean_acc"),
            time.perf_counter() - start,
        )
    run.put_json(name, scores)
    return scores


def measure_speed(cfg: EvoPConfig, pruned_dir: str) -> dict[str, Any] | None:
    """Dense vs pruned inference speed, side by side on the same prompts (None when disabled)."""
    from evop.eval.speed import add_checkpoint_sizes, compare_speed

    e = cfg.evaluation
    if not e.speed:
        return None
    # A finished step like the others: measured once per pruned pattern and settings, then read
    # back, so result.json and MLflow hold the same figures. Re-measure with `evop bench`.
    run = RunStore(cfg)
    name = _evaluation_name(
        "speed", pruned_dir, e.model_dump_json(include={"speed_runs", "prompt_len", "new_tokens"})
    )
    saved = run.get_json(name)
    if saved is not None:
        return saved
    dense_model, tokenizer = cached_model(cfg)
    report = compare_speed(
        dense_model,
        _pruned_model(cfg, pruned_dir)[0],
        tokenizer,
        prompt_len=e.prompt_len,
        new_tokens=e.new_tokens,
        runs=e.speed_runs,
    )
    add_checkpoint_sizes(report, cfg.model.name_or_path, pruned_dir)
    run.put_json(name, report)
    return report


def write_report(
    cfg: EvoPConfig,
    result: dict[str, Any],
    perplexity: dict[str, dict[str, float]],
    downstream: dict[str, Any] | None,
    speed: dict[str, Any] | None,
) -> dict[str, Any]:
    """``<output_dir>/result.json`` with the evaluation added, and the plots beside it.

    The search's ``result.json`` in the store stays as it was; the copy in ``output_dir`` gains
    ``evaluation`` (perplexities, lm-eval scores per task with stderr and their mean, speed) and
    ``plots`` (PNG paths: fitness per generation, layer removal frequency in the final population).

    Returns:
        The enriched result.
    """
    from evop.eval.plots import fitness_curve, layer_removal_frequency
    from evop.pipeline.results import RESULT_FILE
    from evop.records import write_json_atomic

    out = Path(cfg.output_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    state = RunStore(cfg).checkpoints.latest() if result.get("method", "evop") == "evop" else None
    population = state.population if state is not None else [result["pattern"]]
    paths = {
        "fitness_curve": fitness_curve(result.get("history", []), plots / "fitness_curve.png"),
        "layer_removal_frequency": layer_removal_frequency(
            population, int(result["num_layers"]), plots / "layer_removal_frequency.png"
        ),
    }
    report = {
        **result,
        "evaluation": {"perplexity": perplexity, "downstream": downstream, "speed": speed},
        "plots": {name: str(path) for name, path in paths.items()},
    }
    write_json_atomic(out / RESULT_FILE, report)
    return report


def final_metrics(
    perplexity: dict[str, dict[str, float]],
    downstream: dict[str, Any] | None,
    speed: dict[str, Any] | None,
) -> dict[str, float]:
    """Flat ``name -> value`` metrics of a finished run (what MLflow logs and the demo prints)."""
    out: dict[str, float] = {}
    for label, sets in perplexity.items():
        for text, value in sets.items():
            out[f"{label}_ppl_{Path(text).stem if '/' in text else text}"] = value
    for label, scores in (downstream or {}).items():
        for task, value in scores.items():
            if isinstance(value, dict):
                for metric in ("acc", "acc_norm"):
                    if value.get(metric) is not None:
                        out[f"{label}_{task}_{metric}"] = value[metric]
            elif value is not None:
                out[f"{label}_{task}"] = value
    if speed:
        for name, value in speed["ratios"].items():
            if value is not None:
                out[f"speed_{name}"] = value
        out["speed_ideal"] = speed["ideal"]["compute"]
        if speed.get("measured_vs_ideal") is not None:
            out["speed_measured_vs_ideal"] = speed["measured_vs_ideal"]
        for name, interval in (speed.get("intervals") or {}).items():
            if interval:
                out[f"speed_{name}_low"], out[f"speed_{name}_high"] = interval
        out["speed_above_ideal"] = float(bool(speed.get("above_ideal")))  # 1: not to be trusted
        out["dense_params"] = speed["dense"]["params"]
        out["pruned_params"] = speed["pruned"]["params"]
    return out


def register_model(
    cfg: EvoPConfig,
    result: dict[str, Any],
    pruned_dir: str,
    metrics: dict[str, float],
    flow_run_id: str | None,
) -> dict[str, Any] | None:
    """Log the run to MLflow and register the pruned model (None when the registry is disabled).

    The pruned checkpoint and ``result.json`` are only read: when registration fails they stay,
    and a re-run retries only this step.
    """
    from evop.storage.registry import FLOW_RUN_TAG, log_and_register
    from evop.storage.tracking import RegistryError

    if not cfg.registry.enabled:
        return None
    run = RunStore(cfg)
    state = run.checkpoints.latest()
    tags = {FLOW_RUN_TAG: flow_run_id} if flow_run_id else {}
    saved = Path(cfg.output_dir) / "result.json"
    try:
        return log_and_register(
            cfg,
            result,
            pruned_dir,
            metrics,
            artifacts=[str(saved)],
            tags=tags,
            final_population=state.population if state else None,
        )
    except RegistryError as err:
        raise RegistryError(
            f"{err}; the results are kept in {cfg.output_dir}: register them later with "
            f"`evop register --result {saved}`, or run the same command again (finished steps are skipped)"
        ) from err


def register_saved_run(result_path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """``evop register``: log a finished run (its ``result.json`` with the evaluation, and the
    ``pruned-model`` beside it) to MLflow and register the model, e.g. after the tracking server
    was down at the end of ``evop run``. The result is checked as ``evop prune`` checks it.

    Raises:
        BadInputError: the result or the pruned checkpoint beside it is not this run's.
        RegistryError: the tracking store is not usable.
    """
    from evop.errors import BadInputError
    from evop.pipeline.results import read_result
    from evop.records import read_json
    from evop.storage.registry import log_and_register

    cfg, pattern, result = read_result(result_path, overrides)
    pruned = Path(result_path).parent / "pruned-model"
    saved = read_json(pruned / "evop_pattern.json", "pruned checkpoint record")
    if not isinstance(saved, dict) or saved.get("pattern") != str(pattern):
        raise BadInputError(
            f"{pruned} holds pattern {saved.get('pattern') if isinstance(saved, dict) else saved!r}, not "
            f"{pattern}: prune it again with `evop prune --result {result_path}`"
        )
    evaluation = result.get("evaluation") or {}
    metrics = final_metrics(
        evaluation.get("perplexity") or {}, evaluation.get("downstream"), evaluation.get("speed")
    )
    return log_and_register(cfg, result, pruned, metrics, artifacts=[str(result_path)])
