"""MLflow tracking and model registry of a finished run (evop.registry) and its plots (evop.plots).

Everything runs on a SQLite tracking store under tmp_path; the S3 test puts the artifacts on the
local S3 server of ``conftest.py``. Re-calling with the same config and flow-run id reuses the
finished run and its version: no second run, no second version.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from evop.config import build_config  # noqa: E402
from evop.eval.plots import fitness_curve, layer_removal_frequency
from evop.method.genetic import GeneticSearch
from evop.method.patterns import Pattern
from evop.pipeline.results import build_result
from evop.storage.registry import (
    FLOW_RUN_TAG,
    RUN_KEY_TAG,
    flatten_params,
    load_registered_model,
    log_and_register,
    run_key,
)
from evop.storage.tracking import RegistryError

NUM_LAYERS = 6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(tmp_path: Path, **registry):
    overrides = [
        f"output_dir={tmp_path / 'out'}",
        "model.name_or_path=tiny-llama",
        "search.num_remove=2",
        "search.population=4",
        "search.elitism=1",
        "search.generations=3",
        "search.patience=3",
    ] + [f"registry.{k}={v}" for k, v in registry.items()]
    return build_config({}, overrides)


def _search(cfg):
    """A short GA run on a synthetic fitness (removing late layers costs least)."""

    def fitness(p: Pattern) -> float:
        return 10.0 * math.exp(sum(NUM_LAYERS - i for i in p.removed) / 2)

    state = GeneticSearch(NUM_LAYERS, cfg.search.num_remove, cfg.search, fitness=fitness).run()
    return build_result(cfg, state, 10.0, {"method": "random"}, 1.0), state.population


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny pruned checkpoint (dir, pattern) shared by the module; tests only read it."""
    from evop.models.pruning import save_pruned
    from tests.tiny_models import tiny_model, tiny_tokenizer

    out = tmp_path_factory.mktemp("pruned") / "pruned-model"
    pattern = Pattern.of(NUM_LAYERS, [2, 4])
    save_pruned(tiny_model("llama", NUM_LAYERS), tiny_tokenizer(), pattern, out, base_model="tiny-llama")
    return out, pattern


def _result_for(cfg, pattern):
    result, population = _search(cfg)
    # The registered checkpoint is the module's fixture; make the result describe it.
    result.update(
        removed_layers=list(pattern.removed),
        kept_layers=list(pattern.kept),
        pattern=str(pattern),
        sparsity=pattern.sparsity,
    )
    return result, population


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_plots_are_png(tmp_path):
    history = [
        {"generation": 0, "best_fitness": 900.0, "mean_fitness": math.inf},
        {"generation": 1, "best_fitness": 40.0, "mean_fitness": None},
        {"generation": 2, "best_fitness": 30.0, "mean_fitness": 1e4},
    ]
    curve = fitness_curve(history, tmp_path / "curve.png")
    bars = layer_removal_frequency(["1,2/6", "2,4/6", "2,3/6"], 6, tmp_path / "bars.png")
    for path in (curve, bars):
        assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_flatten_params_dotted_strings_and_limits():
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    flat = flatten_params({"a": {"b": [0, -1], "c": None, "d": {"e": 1.5}}, "long": "x" * 10_000})
    assert flat["a.b"] == "[0, -1]" and flat["a.c"] == "None" and flat["a.d.e"] == "1.5"
    assert len(flat["long"]) == MAX_PARAM_VAL_LENGTH and flat["long"].endswith("...")


def test_round_trip_on_sqlite(tmp_path, pruned, monkeypatch):
    from mlflow.tracking import MlflowClient

    from evop.method.fitness import perplexity
    from evop.models.loading import load_model
    from tests.tiny_models import random_blocks

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pruned_dir, pattern = pruned
    cfg = _config(tmp_path)
    result, population = _result_for(cfg, pattern)
    extra = tmp_path / "notes.txt"
    extra.write_text("evaluation notes\n")
    before = _snapshot(pruned_dir)

    info = log_and_register(
        cfg,
        result,
        str(pruned_dir),
        {
            "pruned_ppl.calibration": 31.5,
            "dense_ppl.calibration": 20.25,
            "pruned_ppl.news": math.inf,
            "pruned_ppl_wikipedia[90:]": 40.5,  # a document slice: brackets are not MLflow names
        },
        artifacts=[str(extra)],
        tags={FLOW_RUN_TAG: "flow-123", "team": "evop"},
        final_population=population,
    )
    uri = f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}"
    assert info["tracking_uri"] == uri and info["ui_command"] == f"mlflow ui --backend-store-uri {uri}"
    assert info["model_name"] == "evop-pruned" and info["model_version"] == "1" and not info["reused"]

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.info.experiment_id == info["experiment_id"]
    assert client.get_experiment(info["experiment_id"]).name == "evop"
    # Params: the whole config, dotted, as strings.
    assert run.data.params["search.num_remove"] == "2"
    assert run.data.params["search.protected_layers"] == "[0, -1]"
    assert run.data.params["registry.registered_model"] == "evop-pruned"
    assert run.data.tags["team"] == "evop" and run.data.tags[RUN_KEY_TAG] == run_key(cfg)
    assert run.data.tags[FLOW_RUN_TAG] == "flow-123"
    # Final metrics; a non-finite one is left out rather than failing the run.
    assert run.data.metrics["pruned_ppl.calibration"] == 31.5
    assert run.data.metrics["fitness"] == result["fitness"]
    assert "pruned_ppl.news" not in run.data.metrics
    assert run.data.metrics["pruned_ppl_wikipedia_90:_"] == 40.5
    # One point per generation, step = generation.
    for name in ("best_fitness", "mean_fitness", "evaluations"):
        steps = [m.step for m in client.get_metric_history(info["run_id"], name)]
        assert sorted(steps) == [h["generation"] for h in result["history"]]
    assert sorted(steps) == list(range(result["generations"] + 1))
    # Artifacts.
    root = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"result.json", "pattern.json", "notes.txt", "plots", "pruned-model"} <= root
    plots = {a.path for a in client.list_artifacts(info["run_id"], "plots")}
    assert plots == {"plots/fitness_curve.png", "plots/layer_removal_frequency.png"}
    local = Path(client.download_artifacts(info["run_id"], "plots/fitness_curve.png", str(tmp_path)))
    assert local.read_bytes()[:8] == PNG_MAGIC
    # The version and its tags.
    mv = client.get_model_version("evop-pruned", "1")
    assert mv.run_id == info["run_id"] and mv.source.endswith("/pruned-model")
    assert mv.tags["removed_layers"] == "2,4" and mv.tags["base_model"] == "tiny-llama"
    assert mv.tags["sparsity"] == str(pattern.sparsity) and mv.tags["config_hash"] == cfg.search_hash()
    assert mv.tags[FLOW_RUN_TAG] == "flow-123"

    # The registered version loads and scores exactly like the pruned directory.
    model, tokenizer = load_registered_model("evop-pruned", info["model_version"], uri)
    direct, _ = load_model(cfg.model.model_copy(update={"name_or_path": str(pruned_dir)}))
    blocks = random_blocks()
    assert perplexity(model, blocks) == pytest.approx(perplexity(direct, blocks), rel=1e-6)
    assert tokenizer("the river")["input_ids"]

    # Idempotent: the same config and flow run reuse the finished run and its version.
    again = log_and_register(cfg, result, str(pruned_dir), {}, tags={FLOW_RUN_TAG: "flow-123"})
    assert again["reused"] and again["run_id"] == info["run_id"] and again["model_version"] == "1"
    assert len(client.search_runs([info["experiment_id"]])) == 1
    # Another flow run of the same config continues the same pipeline run: nothing new is logged.
    other = log_and_register(cfg, result, str(pruned_dir), {}, tags={FLOW_RUN_TAG: "flow-456"})
    assert other["run_id"] == info["run_id"] and other["model_version"] == info["model_version"]
    assert other["reused"]
    # A different config is a different pipeline run: a new run and version 2.
    changed = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"max_blocks": 3})})
    third = log_and_register(changed, result, str(pruned_dir), {})
    assert third["run_id"] != info["run_id"] and third["model_version"] == "2"
    assert _snapshot(pruned_dir) == before


def test_artifacts_on_s3(tmp_path, pruned, s3_env, s3_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server.endpoint_url)
    pruned_dir, pattern = pruned
    cfg = _config(tmp_path, artifact_location=f"s3://{s3_env}/mlflow", experiment="evop-s3")
    result, population = _result_for(cfg, pattern)

    info = log_and_register(
        cfg, result, pruned_dir, {"pruned_ppl.calibration": 31.5}, final_population=population
    )
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_env).get("Contents", [])}
    prefix = f"mlflow/{info['run_id']}/artifacts/"
    assert {
        prefix + "result.json",
        prefix + "plots/fitness_curve.png",
        prefix + "pruned-model/config.json",
    } <= keys
    assert any(k.startswith(prefix + "pruned-model/model") for k in keys)
    mv = MlflowClient(tracking_uri=info["tracking_uri"]).get_model_version(
        "evop-pruned", info["model_version"]
    )
    assert mv.source == f"s3://{s3_env}/{prefix}pruned-model"

    model, _ = load_registered_model("evop-pruned", info["model_version"], info["tracking_uri"])
    assert len(model.model.layers) == NUM_LAYERS - pattern.k


def test_unreachable_server_fails_fast_and_leaves_files(tmp_path, pruned):
    pruned_dir, pattern = pruned
    cfg = _config(tmp_path, tracking_uri="http://127.0.0.1:1")
    result, _ = _result_for(cfg, pattern)
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text(json.dumps(result))
    before = _snapshot(pruned_dir), _snapshot(out)

    start = time.monotonic()
    with pytest.raises(RegistryError, match=r"http://127\.0\.0\.1:1"):
        log_and_register(cfg, result, pruned_dir, {})
    assert time.monotonic() - start < 20
    with pytest.raises(RegistryError, match=r"http://127\.0\.0\.1:1"):
        load_registered_model("evop-pruned", 1, "http://127.0.0.1:1")
    assert (_snapshot(pruned_dir), _snapshot(out)) == before


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    from evop.storage.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(_config(tmp_path)) == f"sqlite:///{(tmp_path / 'out').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri(_config(tmp_path)) == "http://mlflow.example:5000"
    assert tracking_uri(_config(tmp_path, tracking_uri="sqlite:///x.db")) == "sqlite:///x.db"


def test_missing_model_dir_is_a_clear_error(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(RegistryError, match="not a saved model directory"):
        log_and_register(cfg, {"pattern": "1/6"}, tmp_path / "nowhere", {})
