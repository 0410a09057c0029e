"""The Prefect pipeline end to end on a tiny model, against a real Prefect API and S3 server:
file:// and s3:// checkpoints, resume after SIGKILL, a storage outage, a corrupted checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from evop import pipeline
from evop.config import build_config
from evop.models.layers import num_layers
from evop.storage.checkpoints import generation_key
from evop.storage.stores import StorageError

pytest.importorskip("prefect")

from flows.evop_pipeline import evop_pipeline  # noqa: E402
from tests.outages import break_sqlite_registry_after  # noqa: E402


def make_cfg(tiny_dir, text_file, out, checkpoints=None, evaluation=None, registry=None, **search):
    return build_config(
        {
            "model": {"name_or_path": str(tiny_dir), "device": "cpu"},
            "calibration": {
                "dataset": str(text_file),
                "pool_size": 48,
                "block_len": 32,
                "n_samples": 8,
                "embedder": "model",
                "n_clusters": 4,
            },
            "search": {"num_remove": 3, "population": 8, "generations": 5, "patience": 10, **search},
            "fitness": {"batch_size": 4},
            # lm-eval, speed and MLflow have their own tests; here one test runs them in the flow.
            "evaluation": {
                "heldout": [str(text_file)],
                "block_len": 32,
                "max_blocks": 4,
                "tasks": [],
                "speed": False,
                **(evaluation or {}),
            },
            "registry": {"enabled": False, **(registry or {})},
            "output_dir": str(out),
            "checkpoints": checkpoints,
        }
    )


def comparable(result: dict) -> dict:
    """A result without timings and locations: what must match between runs of one config."""
    # The copy in output_dir also carries the evaluation and plots (write-report), not the search.
    drop = ("wall_time_s", "checkpoints", "config", "evaluation", "plots")
    out = {k: v for k, v in result.items() if k not in drop}
    out["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in result["history"]]
    return out


@pytest.fixture(scope="module")
def reference(tiny_dir, text_file, tmp_path_factory):
    """An uninterrupted search with the library alone: the result every pipeline run must match."""
    from evop.pipeline.local import run_search

    return run_search(make_cfg(tiny_dir, text_file, tmp_path_factory.mktemp("reference")))


def test_flow_with_local_checkpoints_and_resume(prefect_api, tiny_dir, text_file, tmp_path, reference):
    cfg = make_cfg(tiny_dir, text_file, tmp_path / "run")
    summary = evop_pipeline(config=cfg)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert comparable(result) == comparable(reference)
    assert summary["generations_run_now"] == result["generations"] + 1
    assert summary["checkpoints"].startswith("file://")
    pruned = AutoModelForCausalLM.from_pretrained(summary["pruned_model"])
    assert num_layers(pruned) == 5
    assert set(summary["perplexity"]) == {"dense", "pruned"}
    assert set(summary["perplexity"]["pruned"]) == {"calibration", str(text_file)}

    again = evop_pipeline(config=cfg)  # a finished search returns from its checkpoints
    assert again["generations_run_now"] == 0
    assert comparable(again["result"]) == comparable(result)


def test_progress_artifacts_reach_the_api(prefect_api, tiny_dir, text_file, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    cfg = make_cfg(tiny_dir, text_file, tmp_path / "run", generations=2)
    evop_pipeline(config=cfg)

    async def latest(key):
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )
            return found

    h = cfg.search_hash()
    table = asyncio.run(latest(f"evop-generations-{h}"))
    assert table and len(json.loads(table[-1].data)) >= 1
    assert asyncio.run(latest(f"evop-progress-{h}"))
    summary = asyncio.run(latest(f"evop-summary-{h}"))
    assert summary and "Removed layers" in summary[-1].data
    plots = asyncio.run(latest(f"evop-plots-{h}"))
    assert plots and plots[-1].data.count("](data:image/png;base64,iVBORw0KGgo") == 2  # two inline PNGs

    # result.json in the output directory carries the evaluation and the plots too.
    report = json.loads((tmp_path / "run" / "result.json").read_text())
    assert set(report["evaluation"]) == {"perplexity", "downstream", "speed"}
    assert report["evaluation"]["perplexity"]["pruned"]["calibration"] > 0
    for path in report["plots"].values():
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_flow_with_s3_checkpoints(prefect_api, s3_env, tiny_dir, text_file, tmp_path, reference):
    import boto3

    cfg = make_cfg(tiny_dir, text_file, tmp_path / "run", checkpoints=f"s3://{s3_env}/evop-runs")
    summary = evop_pipeline(config=cfg)
    assert summary["checkpoints"].startswith(f"s3://{s3_env}/evop-runs/evop-")
    assert comparable(summary["result"]) == comparable(reference)
    keys = {
        o["Key"]
        for o in boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).list_objects_v2(
            Bucket=s3_env
        )["Contents"]
    }
    prefix = f"evop-runs/{pipeline.run_prefix(cfg)}"
    assert f"{prefix}/manifest.json" in keys and f"{prefix}/result.json" in keys
    assert f"{prefix}/{generation_key(0)}" in keys and f"{prefix}/calibration/blocks.safetensors" in keys


def kill_after_generation_1(argv: list[str], env: dict, out: Path, cfg) -> int:
    """Run ``argv`` (a search of ``cfg``), SIGKILL it once generation 1 is checkpointed under
    ``out``; returns the newest checkpointed generation."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _manifest(out, cfg).get("latest", -1) < 1:
        assert proc.poll() is None, "the search ended before it could be killed"
        assert time.time() < deadline, "no checkpoint of generation 1 in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return _manifest(out, cfg)["latest"]


def _manifest(out: Path, cfg) -> dict:
    path = out / "checkpoints" / pipeline.run_prefix(cfg) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def test_sigkill_then_rerun_resumes_without_recomputing(
    prefect_api, tiny_dir, text_file, tmp_path, reference
):
    out = tmp_path / "killed"
    cfg = make_cfg(tiny_dir, text_file, out)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    argv = [sys.executable, "-m", "evop.cli", "run", "--config", str(tmp_path / "cfg.yaml")]
    killed_at = kill_after_generation_1(argv, env, out, cfg)
    assert not _manifest(out, cfg)["done"]
    # The killed run never handed its lease back; its process is gone, so the rerun takes it at once.
    lease = out / "checkpoints" / pipeline.run_prefix(cfg) / "lease.json"
    held = json.loads(lease.read_text())
    assert held["owner"] and held["expires_at"] > time.time()

    start = time.perf_counter()
    summary = evop_pipeline(config=cfg)
    assert time.perf_counter() - start < cfg.storage.lease_s  # not waiting for the expiry
    result = summary["result"]
    # Generations 0..killed_at were read from the checkpoints, not recomputed.
    assert summary["generations_run_now"] == result["generations"] - killed_at
    first_new = result["history"][killed_at + 1]
    assert first_new["evaluations"] - reference["history"][killed_at]["evaluations"] > 0
    assert comparable(result) == comparable(reference)


def test_storage_outage_during_the_search_is_survived(
    prefect_api, s3_server, s3_env, tiny_dir, text_file, tmp_path, reference
):
    import boto3

    cfg = make_cfg(tiny_dir, text_file, tmp_path / "run", checkpoints=f"s3://{s3_env}/outage")
    key = f"outage/{pipeline.run_prefix(cfg)}/{generation_key(1)}"
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    outage = {}

    def stop_and_restart():
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                client.head_object(Bucket=s3_env, Key=key)
                break
            except Exception:
                time.sleep(0.05)
        s3_server.stop()
        outage["stopped"] = time.time()
        time.sleep(3)
        s3_server.start()
        outage["restarted"] = time.time()

    thread = threading.Thread(target=stop_and_restart)
    thread.start()
    summary = evop_pipeline(config=cfg)
    thread.join()
    assert outage.get("restarted"), "the outage never happened"
    assert comparable(summary["result"]) == comparable(reference)


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(
    prefect_api, tiny_dir, text_file, tmp_path, reference, caplog
):
    cfg = make_cfg(tiny_dir, text_file, tmp_path / "run")
    pipeline.segment_dataset(cfg)
    pipeline.embed_pool(cfg)
    pipeline.sample_calibration_set(cfg)
    pipeline.run_generation(cfg, 2)
    broken = tmp_path / "run" / "checkpoints" / pipeline.run_prefix(cfg) / generation_key(2)
    broken.write_bytes(broken.read_bytes()[:-40])  # a torn write
    with caplog.at_level("ERROR", logger="evop"):
        summary = evop_pipeline(config=cfg)
    assert any("gen-000002.json" in r.getMessage() and "corrupted" in r.getMessage() for r in caplog.records)
    assert summary["generations_run_now"] == summary["result"]["generations"] - 1  # resumed after gen 1
    assert comparable(summary["result"]) == comparable(reference)


def test_missing_bucket_is_a_clear_error(s3_env, tiny_dir, text_file, tmp_path):
    cfg = make_cfg(tiny_dir, text_file, tmp_path / "run", checkpoints="s3://evop-no-such-bucket/x")
    with pytest.raises(StorageError, match="evop-no-such-bucket.*does not exist"):
        pipeline.segment_dataset(cfg)


def test_bad_bucket_fails_the_flow_at_once_without_retries(
    prefect_api, s3_env, tiny_dir, text_file, tmp_path
):
    cfg = make_cfg(tiny_dir, text_file, tmp_path / "run", checkpoints="s3://evop-no-such-bucket/x")
    start = time.perf_counter()
    with pytest.raises(StorageError, match="does not exist"):
        evop_pipeline(config=cfg)
    # Bad input is not retried (the transient retries would pause 10 + 60 s).
    assert time.perf_counter() - start < 15


def test_library_log_lines_reach_the_flow_run_logs_once(
    prefect_api, tiny_dir, text_file, tmp_path, monkeypatch
):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from evop.pipeline.cache import forget_models

    forget_models()  # so this run loads the model and logs it
    cfg = make_cfg(tiny_dir, text_file, tmp_path / "run", generations=1)
    state = evop_pipeline(config=cfg, return_state=True)
    flow_run_id = state.state_details.flow_run_id

    async def messages():
        async with get_client() as client:
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            return [log.message for log in logs]

    time.sleep(2)  # logs are sent in batches
    lines = asyncio.run(messages())
    checkpointed = [m for m in lines if m.startswith("checkpointed generation 0 ")]
    assert len(checkpointed) == 1, lines
    assert any(m.startswith("loaded ") and "8 layers" in m for m in lines)


@pytest.fixture(scope="module")
def sentences_file(tmp_path_factory):
    from tests.tiny_models import write_sentences

    return write_sentences(tmp_path_factory.mktemp("sentences") / "sentences.jsonl")


def test_flow_scores_lm_eval_speed_and_registers_in_mlflow(
    prefect_api, tiny_dir, text_file, sentences_file, tmp_path
):
    from evop.method.fitness import perplexity
    from evop.storage.registry import load_registered_model
    from tests.tiny_models import random_blocks

    evaluation = {
        "tasks": ["evop_lastword", "evop_continuation"],
        "task_source": str(sentences_file),
        "task_examples": 8,
        "limit": 8,
        "speed": True,
        "speed_runs": 1,
        "prompt_len": 16,
        "new_tokens": 4,
    }
    cfg = make_cfg(
        tiny_dir,
        text_file,
        tmp_path / "run",
        evaluation=evaluation,
        registry={"enabled": True},
        generations=1,
    )
    summary = evop_pipeline(config=cfg)
    report = json.loads((tmp_path / "run" / "result.json").read_text())
    for label in ("dense", "pruned"):
        for task in ("evop_lastword", "evop_continuation"):
            assert 0 <= summary["downstream"][label][task]["acc"] <= 1
            assert report["evaluation"]["downstream"][label][task] == summary["downstream"][label][task]
    assert summary["speed"]["ideal"]["compute"] == pytest.approx(8 / 5)
    assert summary["speed"]["ratios"]["decode_speedup"] > 0
    assert 0 < summary["speed"]["pruned"]["checkpoint_bytes"] < summary["speed"]["dense"]["checkpoint_bytes"]
    assert summary["metrics"]["pruned_params"] < summary["metrics"]["dense_params"]
    mlflow_info = summary["mlflow"]
    assert mlflow_info["model_name"] == "evop-pruned" and str(mlflow_info["model_version"]) == "1"
    assert "mlflow ui --backend-store-uri sqlite:///" in mlflow_info["ui_command"]

    model, _ = load_registered_model("evop-pruned", mlflow_info["model_version"], mlflow_info["tracking_uri"])
    pruned = AutoModelForCausalLM.from_pretrained(summary["pruned_model"])
    blocks = random_blocks()
    assert perplexity(model, blocks) == pytest.approx(perplexity(pruned, blocks), rel=1e-6)

    again = evop_pipeline(config=cfg)  # everything is found done: no second MLflow run or version
    assert again["mlflow"]["run_id"] == mlflow_info["run_id"] and again["mlflow"]["reused"]


def test_failed_registration_keeps_results_and_a_rerun_retries_only_it(
    prefect_api, tiny_dir, text_file, tmp_path
):
    """The tracking store passes the pre-flight, then fails at the end (its SQLite file turns into a
    folder once the search is done): the run fails with one error that says how to register later,
    everything computed is kept, and a rerun once the store is back runs only the registration."""
    from evop.storage.tracking import RegistryError

    out, db = tmp_path / "run", tmp_path / "registry" / "mlflow.db"
    cfg = make_cfg(
        tiny_dir, text_file, out, generations=1, registry={"enabled": True, "tracking_uri": f"sqlite:///{db}"}
    )

    breaker = break_sqlite_registry_after(out / "result.json", db)
    start = time.perf_counter()
    with pytest.raises(RegistryError, match=r"not usable.*evop register --result .*result.json"):
        evop_pipeline(config=cfg)
    breaker.join()
    assert time.perf_counter() - start < 120  # not retried for minutes
    assert (out / "result.json").is_file() and (out / "pruned-model" / "config.json").is_file()

    db.rmdir()
    summary = evop_pipeline(config=cfg)
    assert summary["generations_run_now"] == 0  # the search was not redone
    assert str(summary["mlflow"]["model_version"]) == "1"


def test_flow_runs_a_baseline_method_as_one_task(prefect_api, tiny_dir, text_file, tmp_path):
    from evop.pipeline.local import run_search

    cfg = make_cfg(tiny_dir, text_file, tmp_path / "run", method="sleb")
    summary = evop_pipeline(config=cfg)
    result = summary["result"]
    assert result["method"] == "sleb" and len(result["removed_layers"]) == 3
    assert result["evaluations"] == 6 + 5 + 4  # 3 greedy rounds over the 6 removable layers
    assert num_layers(AutoModelForCausalLM.from_pretrained(summary["pruned_model"])) == 5
    library = run_search(make_cfg(tiny_dir, text_file, tmp_path / "library", method="sleb"))
    assert comparable(library) == comparable(result)


def test_a_finished_search_with_a_torn_newest_checkpoint_recomputes_only_that_generation(
    tiny_dir, text_file, tmp_path, reference, monkeypatch, caplog
):
    """result.json in the store is believed only when it agrees with the search's last checkpoint:
    with that checkpoint torn, it cannot be checked, so the last generation is computed again (and
    only it: every earlier one is read back) and the record comes out the same."""
    from evop.method.fitness import PatternScorer
    from evop.pipeline.local import run_search

    cfg = make_cfg(tiny_dir, text_file, tmp_path / "run")
    first = run_search(cfg)
    checkpoints = pipeline.RunStore(cfg).checkpoints
    last, before = checkpoints.load(first["generations"]), checkpoints.load(first["generations"] - 1)
    store = tmp_path / "run" / "checkpoints" / pipeline.run_prefix(cfg)
    newest = store / generation_key(first["generations"])
    newest.write_bytes(newest.read_bytes()[:-40])
    scored = []

    def spying(original):
        def spy(self, pattern, *args, **kwargs):
            scored.append(str(pattern))
            return original(self, pattern, *args, **kwargs)

        return spy

    for name in ("__call__", "stage_sums"):  # every way the search and the final check score a pattern
        monkeypatch.setattr(PatternScorer, name, spying(getattr(PatternScorer, name)))
    with caplog.at_level("ERROR", logger="evop"):
        again = run_search(cfg)
    assert any(newest.name in r.getMessage() and "corrupted" in r.getMessage() for r in caplog.records)
    assert scored and set(scored) <= set(last.memo) - set(before.memo)
    assert comparable(again) == comparable(first) == comparable(reference)
    assert pipeline.search_status(cfg) == {"generation": first["generations"], "done": True}


def test_an_unknown_lm_eval_task_fails_the_flow_before_any_step(prefect_api, tiny_dir, text_file, tmp_path):
    """The task name is checked by check-config, first: not after search, pruning and perplexity,
    and not retried."""
    from evop.eval.downstream import UnknownTaskError

    cfg = make_cfg(tiny_dir, text_file, tmp_path / "run", evaluation={"tasks": ["evop_no_such_task"]})
    with pytest.raises(UnknownTaskError, match="evop_no_such_task.*include_path"):
        evop_pipeline(config=cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_cluster_aggregate_search_scores_each_block_with_its_ccds_cluster(tiny_dir, text_file, tmp_path):
    """fitness.aggregate reaches the pipeline's scorer with the cluster of every calibration block."""
    from evop.eval.perplexity import load_blocks
    from evop.method.fitness import PatternScorer
    from evop.method.patterns import Pattern
    from evop.models.loading import load_model
    from evop.pipeline.local import run_search

    cfg = make_cfg(tiny_dir, text_file, tmp_path / "run", generations=1)
    cfg = cfg.model_copy(update={"fitness": cfg.fitness.model_copy(update={"aggregate": "worst-cluster"})})
    result = run_search(cfg)
    sample = pipeline.RunStore(cfg).get_json("calibration/sample.json")
    assert len(sample["clusters"]) == 8 and len(set(sample["clusters"])) > 1
    model, _ = load_model(cfg.model)
    blocks = load_blocks(tmp_path / "run" / "calibration.safetensors")
    pattern = Pattern.parse(result["pattern"])
    worst = PatternScorer(model, blocks, batch_size=4, aggregate="worst-cluster", clusters=sample["clusters"])
    assert worst(pattern) == result["fitness"]
    assert PatternScorer(model, blocks, batch_size=4)(pattern) < result["fitness"]  # the mean is lower
