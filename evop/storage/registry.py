"""Track a finished EvoP run in MLflow and register its pruned model.

One pipeline run is one MLflow run holding the flattened config as params, the search history as
per-generation metrics (``step`` = generation), the final perplexities, ``result.json``, the
pattern, the plots and the pruned Hugging Face directory under ``pruned-model/``. That directory
becomes a new version of ``cfg.registry.registered_model``.

MLflow 3 notes that shaped this module:

* ``mlflow.register_model("runs:/<id>/pruned-model")`` fails on a plain artifact folder (it
  expects a logged model), so the version is created with ``MlflowClient.create_model_version``
  whose ``source`` is the folder's artifact URI.
* Everything goes through an explicit :class:`~mlflow.tracking.MlflowClient`; nothing touches the
  global tracking URI or the fluent "active run", so this is safe inside a long-lived worker.
* A store that does not answer fails in seconds with a :class:`~evop.storage.tracking.RegistryError`
  (:mod:`evop.storage.tracking`), not after MLflow's minutes of retries.

Idempotency: the run is tagged ``evop.run_key`` = hash of the whole config. The pipeline is
deterministic and resumable, so every flow run of one config (a retry, a re-run, a second
``make demo``) is the same pipeline run continued: a call whose key matches a FINISHED run returns
that run and its model version instead of logging (and registering) a second time. The Prefect
flow-run id is only a tag. A run that crashed half-way is marked FAILED and a retry starts a new
run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evop.config import EvoPConfig
from evop.records import finite_or_none
from evop.storage.tracking import RegistryError, connect, default_artifact_location, describe, tracking_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

RUN_KEY_TAG = "evop.run_key"
"""Run tag that makes :func:`log_and_register` idempotent."""

FLOW_RUN_TAG = "prefect.flow_run_id"
"""Key in ``tags`` holding the Prefect flow-run id (part of the run key, copied to the version)."""

MODEL_ARTIFACT_PATH = "pruned-model"
"""Artifact folder of the pruned Hugging Face directory inside the run."""

_PATTERN_KEYS = (
    "base_model",
    "pattern",
    "removed_layers",
    "kept_layers",
    "num_layers",
    "sparsity",
    "fitness_metric",
    "fitness",
)
"""Fields of ``result`` copied into the small ``pattern.json`` artifact."""


def run_key(cfg: EvoPConfig) -> str:
    """Identity of one pipeline run: the hash of its whole config."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested config sections into dotted keys with string values (MLflow params).

    Lists become JSON (``[0, -1]``), ``None`` becomes ``"None"``; values longer than MLflow's
    limit are cut and end in ``...``.
    """
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    flat: dict[str, str] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, dotted + "."))
            continue
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
        flat[dotted] = text
    return flat


def _experiment_id(client: "MlflowClient", cfg: EvoPConfig, uri: str) -> str:
    reg = cfg.registry
    wanted = reg.artifact_location or default_artifact_location(uri)
    exp = client.get_experiment_by_name(reg.experiment)
    if exp is None:
        from mlflow.exceptions import MlflowException

        try:
            return client.create_experiment(reg.experiment, artifact_location=wanted)
        except MlflowException:  # created meanwhile by a concurrent run
            exp = client.get_experiment_by_name(reg.experiment)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise RegistryError(
            f"experiment {reg.experiment!r} on {uri} is deleted: restore it (mlflow experiments "
            "restore) or choose another registry.experiment"
        )
    if reg.artifact_location and exp.artifact_location.rstrip("/") != reg.artifact_location.rstrip("/"):
        # MLflow fixes an experiment's artifact root when it is created.
        log.warning(
            "experiment %r keeps its artifact location %s (registry.artifact_location=%s applies only "
            "to a new experiment)",
            reg.experiment,
            exp.artifact_location,
            reg.artifact_location,
        )
    return exp.experiment_id


def _finished_run(client: "MlflowClient", experiment_id: str, key: str):
    from mlflow.entities import ViewType

    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


def _version_of_run(client: "MlflowClient", name: str, run_id: str):
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def _log_batches(client: "MlflowClient", run_id: str, metrics=(), params=(), tags=()) -> None:
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

    metrics, params, tags = list(metrics), list(params), list(tags)
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
    for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])
    for i in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=tags[i : i + MAX_PARAMS_TAGS_PER_BATCH])


def metric_key(name: str) -> str:
    """``name`` with every character MLflow refuses in a metric name replaced by ``_`` (a held-out
    document slice ``wikipedia[90:]`` becomes ``wikipedia_90:_``)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


def _run_metrics(result: Mapping[str, Any], metrics: Mapping[str, float], now_ms: int) -> list:
    """Per-generation history (step = generation) plus the final scalars, as MLflow ``Metric``s."""
    from mlflow.entities import Metric

    out = []
    for h in result.get("history", []):
        for name in ("best_fitness", "mean_fitness", "evaluations"):
            value = finite_or_none(h.get(name))
            if value is not None:
                out.append(Metric(name, value, now_ms, int(h["generation"])))
    final = {
        "fitness": result.get("fitness"),
        "dense_fitness": result.get("dense_fitness"),
        "sparsity": result.get("sparsity"),
        "layers_removed": len(result.get("removed_layers", [])),
        "total_evaluations": result.get("evaluations"),
        **metrics,
    }
    for name, value in final.items():
        value = finite_or_none(value)
        if value is not None:
            out.append(Metric(metric_key(name), value, now_ms, 0))
        else:
            log.debug("metric %s is not finite; not logged", name)
    return out


def _write_run_files(
    folder: Path,
    result: Mapping[str, Any],
    final_population: Sequence[str] | None,
) -> list[Path]:
    """result.json, pattern.json and the two plots, written into ``folder``."""
    from evop.eval.plots import fitness_curve, layer_removal_frequency

    (folder / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    pattern = {k: result.get(k) for k in _PATTERN_KEYS}
    (folder / "pattern.json").write_text(json.dumps(pattern, indent=2) + "\n")
    plots = folder / "plots"
    plots.mkdir()
    # Without the final population, the best pattern alone still shows which layers went.
    population = list(final_population) if final_population else [result["pattern"]]
    return [
        folder / "result.json",
        folder / "pattern.json",
        fitness_curve(result.get("history", []), plots / "fitness_curve.png"),
        layer_removal_frequency(population, int(result["num_layers"]), plots / "layer_removal_frequency.png"),
    ]


def log_and_register(
    cfg: EvoPConfig,
    result: dict[str, Any],
    pruned_dir: str | Path,
    metrics: Mapping[str, float],
    artifacts: Sequence[str | Path] = (),
    tags: Mapping[str, str] | None = None,
    final_population: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Log one finished pipeline run to MLflow and register its pruned model as a new version.

    Idempotent: if a FINISHED run with the same ``evop.run_key`` (see :func:`run_key`) exists in
    the experiment, nothing is logged again and that run's model version is returned
    (``reused=True``); no second version is created. The caller's files are only read.

    Args:
        cfg: The run's configuration (``cfg.registry`` says where to log).
        result: The ``result.json`` dictionary (see :func:`evop.pipeline.results.build_result`).
        pruned_dir: The pruned Hugging Face checkpoint directory (weights, config, tokenizer).
        metrics: Final scalars, e.g. ``{"pruned_ppl.calibration": 31.2, "dense_ppl.news": 18.0}``.
        artifacts: Extra files logged at the artifact root under their own names.
        tags: Extra run tags; ``tags["prefect.flow_run_id"]`` is also part of the run key and
            copied to the model version.
        final_population: Pattern strings of the last population (the removal-frequency plot);
            without it the plot shows the best pattern alone.

    Returns:
        ``run_id``, ``experiment_id``, ``model_name``, ``model_version``, ``model_source``,
        ``tracking_uri``, ``ui_command`` (``mlflow ui --backend-store-uri <uri>``) and ``reused``.

    Raises:
        RegistryError: the tracking store is unreachable or refuses a request (the message names
            its URI), or ``pruned_dir``/an artifact is missing.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    reg = cfg.registry
    tags = dict(tags or {})
    pruned_dir = Path(pruned_dir)
    if not (pruned_dir / "config.json").is_file():
        raise RegistryError(f"{pruned_dir} is not a saved model directory (no config.json)")
    missing = [str(a) for a in artifacts if not Path(a).is_file()]
    if missing:
        raise RegistryError(f"artifact files not found: {', '.join(missing)}")

    uri = tracking_uri(cfg)
    client = connect(uri)
    flow_run_id = tags.get(FLOW_RUN_TAG)
    key = run_key(cfg)
    answer = {"model_name": reg.registered_model, "tracking_uri": uri}
    answer["ui_command"] = f"mlflow ui --backend-store-uri {uri}"

    run_id = None
    try:
        experiment_id = _experiment_id(client, cfg, uri)
        answer["experiment_id"] = experiment_id
        try:
            client.get_registered_model(reg.registered_model)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            try:
                client.create_registered_model(
                    reg.registered_model, description="Decoder-layer-pruned models found by EvoP."
                )
            except MlflowException:  # created meanwhile by a concurrent run
                client.get_registered_model(reg.registered_model)

        previous = _finished_run(client, experiment_id, key)
        if previous is not None:
            run_id = previous.info.run_id
            version = _version_of_run(client, reg.registered_model, run_id)
            if version is not None:
                log.info("run %s already logged as %s v%s", run_id, reg.registered_model, version.version)
                return answer | {
                    "run_id": run_id,
                    "model_version": str(version.version),
                    "model_source": version.source,
                    "reused": True,
                }
            # Finished but unregistered (the version was deleted): register the logged folder again.
            version = _create_version(client, cfg, result, run_id, previous.info.artifact_uri, flow_run_id)
            return answer | {
                "run_id": run_id,
                "model_version": str(version.version),
                "model_source": version.source,
                "reused": True,
            }

        run = _start_run(client, experiment_id, cfg, result, key, tags)
        run_id = run.info.run_id
        _log_batches(
            client,
            run_id,
            metrics=_run_metrics(result, metrics, run.info.start_time),
            params=_params(cfg),
        )
        with tempfile.TemporaryDirectory(prefix="evop-mlflow-") as tmp:
            for path in _write_run_files(Path(tmp), result, final_population):
                artifact_dir = "plots" if path.parent.name == "plots" else None
                client.log_artifact(run_id, str(path), artifact_dir)
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        client.log_artifacts(run_id, str(pruned_dir), MODEL_ARTIFACT_PATH)
        version = _create_version(client, cfg, result, run_id, run.info.artifact_uri, flow_run_id)
        client.set_terminated(run_id, "FINISHED")
    except RegistryError:
        _fail(client, run_id)
        raise
    except Exception as err:  # MlflowException, boto3/botocore, requests, OSError
        _fail(client, run_id)
        raise RegistryError(f"logging to {describe(uri)} failed: {err}") from err
    log.info(
        "logged run %s and registered %s v%s; browse with: %s",
        run_id,
        reg.registered_model,
        version.version,
        answer["ui_command"],
    )
    return answer | {
        "run_id": run_id,
        "model_version": str(version.version),
        "model_source": version.source,
        "reused": False,
    }


def _params(cfg: EvoPConfig) -> list:
    from mlflow.entities import Param

    return [Param(k, v) for k, v in flatten_params(cfg.model_dump(mode="json")).items()]


def _start_run(client, experiment_id: str, cfg: EvoPConfig, result, key: str, tags: dict[str, str]):
    base = Path(str(result.get("base_model", "model"))).name.removeprefix("evop-assets:")
    removed = len(result.get("removed_layers", []))
    run_tags = {
        **{k: str(v) for k, v in tags.items()},
        RUN_KEY_TAG: key,
        "evop.config_hash": str(result.get("config_hash", cfg.search_hash())),
        "evop.pattern": str(result.get("pattern")),
        "evop.base_model": str(result.get("base_model")),
    }
    return client.create_run(
        experiment_id, run_name=f"{base}-minus-{removed}of{result.get('num_layers')}", tags=run_tags
    )


def _create_version(client, cfg: EvoPConfig, result, run_id: str, artifact_uri: str, flow_run_id: str | None):
    version_tags = {
        "base_model": str(result.get("base_model")),
        "removed_layers": ",".join(str(i) for i in result.get("removed_layers", [])),
        "pattern": str(result.get("pattern")),
        "sparsity": str(result.get("sparsity")),
        "config_hash": str(result.get("config_hash", cfg.search_hash())),
    }
    if flow_run_id:
        version_tags[FLOW_RUN_TAG] = flow_run_id
    return client.create_model_version(
        cfg.registry.registered_model,
        source=f"{artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}",
        run_id=run_id,
        tags=version_tags,
        description=f"{result.get('base_model')} without layers {version_tags['removed_layers']}",
    )


def _fail(client, run_id: str | None) -> None:
    if run_id is None:
        return
    try:
        client.set_terminated(run_id, "FAILED")
    except Exception as err:  # the store may be what failed
        log.warning("could not mark MLflow run %s as FAILED: %s", run_id, err)


def load_registered_model(
    name: str,
    version: str | int,
    tracking_uri: str,
    dst_path: str | Path | None = None,
    **from_pretrained: Any,
) -> tuple[Any, Any]:
    """Download a registered version's pruned directory and load it with transformers.

    Args:
        name: Registered model name (``cfg.registry.registered_model``).
        version: Version number (``log_and_register(...)["model_version"]``).
        tracking_uri: Tracking/registry URI it was registered on.
        dst_path: Keep the downloaded directory here; by default it goes to a temporary
            directory that is removed once the model is in memory.
        **from_pretrained: Passed to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ...).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.

    Raises:
        RegistryError: the store is unreachable or the version does not exist.
    """
    import mlflow.artifacts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = connect(tracking_uri)
    try:
        mv = client.get_model_version(name, str(version))
    except Exception as err:
        raise RegistryError(f"{name} v{version} not found on {describe(tracking_uri)}: {err}") from err
    tmp = None
    if dst_path is None:
        tmp = tempfile.mkdtemp(prefix="evop-model-")
        dst_path = tmp
    try:
        Path(dst_path).mkdir(parents=True, exist_ok=True)
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=mv.source, dst_path=str(dst_path), tracking_uri=tracking_uri
            )
        except Exception as err:
            raise RegistryError(f"downloading {name} v{version} from {mv.source} failed: {err}") from err
        model = AutoModelForCausalLM.from_pretrained(local, **from_pretrained).eval()
        tokenizer = AutoTokenizer.from_pretrained(local)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer
