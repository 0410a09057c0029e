"""Faults a long search meets, against real processes: a 30 s S3 outage during `evop search`, Ctrl-C,
and a tracking server that is down before the run (pre-flight) or at its end (one line, results kept,
registered later with `evop register`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evop import pipeline
from evop.pipeline.local import run_search
from evop.storage.checkpoints import generation_key
from tests.outages import break_sqlite_registry_after
from tests.tiny_models import comparable, search_config

LOG_LINE = r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) "  # the CLI's log format


def _write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def _search(config: Path, env: dict | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "evop.cli", "search", "--quiet", "--config", str(config)]
    return subprocess.Popen(
        argv, env=env or dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_30_second_s3_outage_during_evop_search_is_survived(
    s3_server, s3_env, tiny_dir, text_file, tmp_path
):
    reference = run_search(search_config(tiny_dir, text_file, tmp_path / "reference"))
    cfg = search_config(tiny_dir, text_file, tmp_path / "run", [f"checkpoints=s3://{s3_env}/outage"])
    proc = _search(_write_config(cfg, tmp_path / "c.yaml"))
    # rclone serves the bucket from a folder: the object is there once generation 1 is saved.
    _wait_for(s3_server.root / s3_env / "outage" / pipeline.run_prefix(cfg) / generation_key(1), proc)
    s3_server.stop()
    stopped = time.time()
    time.sleep(30)
    s3_server.start()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "retrying for up to 300 s" in err and "succeeded after" in err  # it waited, then went on
    assert "Found credentials" not in err  # botocore's line per client is not the user's business
    waited = [line for line in err.splitlines() if "succeeded after" in line]
    assert float(waited[0].split("succeeded after ")[1].split(" s")[0]) >= 20
    assert time.time() - stopped >= 30
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert comparable(result) == comparable(reference)  # the same search: nothing lost or redone


def test_ctrl_c_is_one_line_and_a_rerun_resumes(text_file, tmp_path):
    import re

    from tests.tiny_models import save_tiny_model

    model = save_tiny_model(tmp_path / "deep", num_layers=24)  # a space the search needs a while for
    settings = dict(generations=40, patience=40, polish_rounds=0)
    cfg = search_config(model, text_file, tmp_path / "run", **settings)
    reference = run_search(search_config(model, text_file, tmp_path / "ref", **settings))
    proc = _search(_write_config(cfg, tmp_path / "c.yaml"))
    _wait_for(tmp_path / "run" / "checkpoints" / pipeline.run_prefix(cfg) / generation_key(1), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    progress = ("it/s]", "s/it]")  # transformers' weight-loading bars
    said = [
        line
        for line in err.splitlines()
        if line.strip() and not re.match(LOG_LINE, line) and not line.endswith(progress)
    ]
    assert len(said) == 1 and "Traceback" not in err, err
    assert re.match(
        r"evop: stopped by Ctrl-C after generation \d+ of the search \(checkpointed in file://", said[0]
    )
    assert said[0].endswith("run the same command again to resume from there")
    stopped_at = int(re.search(r"after generation (\d+)", said[0]).group(1))
    lease = json.loads(
        (tmp_path / "run" / "checkpoints" / pipeline.run_prefix(cfg) / "lease.json").read_text()
    )
    assert lease["owner"] is None  # handed back on the way out: the rerun need not wait for it

    seen = []
    resumed = run_search(cfg, on_generation=seen.append)
    assert seen[0]["generation"] == stopped_at + 1
    assert comparable(resumed) == comparable(reference)


def test_an_unreachable_tracking_server_is_found_by_the_preflight(tiny_dir, text_file, tmp_path, capsys):
    from evop.cli import main

    cfg = search_config(tiny_dir, text_file, tmp_path / "run", ["registry.tracking_uri=http://127.0.0.1:9"])
    start = time.perf_counter()
    assert main(["run", "--config", str(_write_config(cfg, tmp_path / "c.yaml"))]) == 2
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert "MLflow tracking server http://127.0.0.1:9 is not usable" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and seconds < 30
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing computed, nothing written


def test_a_registry_outage_at_the_end_is_one_line_and_evop_register_finishes_the_job(
    prefect_api, tiny_dir, text_file, tmp_path, capsys
):
    from evop.cli import main

    out = tmp_path / "run"
    db = tmp_path / "registry" / "mlflow.db"
    cfg = search_config(
        tiny_dir,
        text_file,
        out,
        [
            f"registry.tracking_uri=sqlite:///{db}",
            f"evaluation.heldout=[{text_file}]",
            "evaluation.block_len=32",
            "evaluation.max_blocks=2",
            "evaluation.tasks=[]",
            "evaluation.speed=false",
        ],
        generations=1,
    )
    config = _write_config(cfg, tmp_path / "c.yaml")

    breaker = break_sqlite_registry_after(out / "result.json", db)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    argv = [sys.executable, "-m", "evop.cli", "run", "--config", str(config)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    breaker.join()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"evop: MLflow tracking store sqlite:///{db} is not usable")
    assert last.endswith(
        f"register them later with `evop register --result {out / 'result.json'}`, or run the same "
        "command again (finished steps are skipped)"
    )
    report = json.loads((out / "result.json").read_text())
    assert report["evaluation"]["perplexity"]["pruned"] and (out / "pruned-model" / "config.json").is_file()

    db.rmdir()  # the registry is back
    assert main(["register", "--result", str(out / "result.json")]) == 0
    assert "evop-pruned version 1" in capsys.readouterr().out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    version = client.get_model_version("evop-pruned", "1")
    assert version.tags["pattern"] == report["pattern"]
    run = client.get_run(version.run_id)
    assert run.data.metrics["pruned_ppl_calibration"] == pytest.approx(
        report["evaluation"]["perplexity"]["pruned"]["calibration"]
    )
