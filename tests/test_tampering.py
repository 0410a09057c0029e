"""Nothing read back is believed: edited checkpoints, memos and results (checksums recomputed, as an
adversary would) are refused naming the file, the search recomputes instead of shipping them, and a
result file never turns on code execution."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from evop import pipeline
from evop.cli import main
from evop.config import build_config
from evop.pipeline.local import run_search
from evop.storage.checkpoints import generation_key
from tests.tiny_models import comparable, search_config

_cfg = search_config  # 8 layers, k=2, layers 0 and 7 protected


@pytest.fixture(scope="module")
def reference(tiny_dir, text_file, tmp_path_factory):
    return run_search(_cfg(tiny_dir, text_file, tmp_path_factory.mktemp("reference")))


def errors(caplog) -> list[logging.LogRecord]:
    """The ERROR lines logged (other tests may have set the library's loggers lower)."""
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def run_dir(cfg) -> Path:
    return Path(cfg.output_dir) / "checkpoints" / pipeline.run_prefix(cfg)


def rewrite_generation(cfg, generation: int, edit) -> Path:
    """Edit one generation's state and recompute its checksum (object and manifest), as someone
    who knows the format would: the SHA-256 then verifies."""
    path = run_dir(cfg) / generation_key(generation)
    doc = json.loads(path.read_text())
    state = json.loads(doc["state"])
    edit(state)
    doc["state"] = json.dumps(state)
    doc["sha256"] = hashlib.sha256(doc["state"].encode()).hexdigest()
    path.write_text(json.dumps(doc))
    manifest_path = run_dir(cfg) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["generations"][str(generation)]["sha256"] = doc["sha256"]
    manifest_path.write_text(json.dumps(manifest))
    return path


def plant_best(pattern: str, fitness: float = 1.0):
    """An edit that makes ``pattern`` the state's best, with a tempting fitness."""

    def edit(state):
        state["memo"][pattern] = fitness
        state["population"][0] = pattern
        state["best"], state["best_fitness"] = pattern, fitness

    return edit


def _search_to_generation_2(cfg):
    for step in (pipeline.segment_dataset, pipeline.embed_pool, pipeline.sample_calibration_set):
        step(cfg)
    pipeline.run_generation(cfg, 2)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (plant_best("0,1/8"), r"removes protected layers \[0\]"),
        (plant_best("2/8"), "removes 1 layers; this search removes 2"),
        (plant_best("3,8/8"), r"out of range \[0, 8\)"),
        (plant_best("2,3/9"), "for a model of 9 layers; this one has 8"),
    ],
    ids=["protected", "wrong-k", "out-of-range", "other-model"],
)
def test_an_edited_checkpoint_is_refused_naming_the_file_and_recomputed(
    tiny_dir, text_file, tmp_path, reference, caplog, edit, problem
):
    cfg = _cfg(tiny_dir, text_file, tmp_path / "run")
    _search_to_generation_2(cfg)
    path = rewrite_generation(cfg, 2, edit)
    with caplog.at_level(logging.ERROR, logger="evop"):
        result = run_search(cfg)
    refused = [r.getMessage() for r in errors(caplog) if path.as_uri() in r.getMessage()]
    assert len(refused) == 1 and "does not fit this search" in refused[0]  # once, though read by every step
    assert re.search(problem, refused[0]), refused[0]
    assert comparable(result) == comparable(reference)  # recomputed from generation 1: the same search
    assert 0 not in result["removed_layers"] and 7 not in result["removed_layers"]


def test_a_made_up_score_of_an_allowed_pattern_stops_the_search(tiny_dir, text_file, tmp_path, reference):
    """A pattern the config allows, with a score nobody measured: the final pattern is measured again
    before it is recorded, and a record that disagrees stops the search instead of shipping."""
    from evop.errors import BadInputError

    cfg = _cfg(tiny_dir, text_file, tmp_path / "run")
    _search_to_generation_2(cfg)
    planted = "2,3/8" if reference["pattern"] != "2,3/8" else "3,4/8"
    rewrite_generation(cfg, 2, plant_best(planted, fitness=1.0))
    with pytest.raises(BadInputError, match=rf"{planted} \(fitness 1.0\) is not what it measures"):
        run_search(cfg)
    assert not (tmp_path / "run" / "result.json").exists()
    assert not (run_dir(cfg) / "result.json").exists()


def test_an_edited_store_result_is_not_shipped(tiny_dir, text_file, tmp_path, reference, caplog):
    cfg = _cfg(tiny_dir, text_file, tmp_path / "run")
    run_search(cfg)
    stored = run_dir(cfg) / "result.json"
    result = json.loads(stored.read_text())
    result.update(removed_layers=[0, 3], kept_layers=[1, 2, 4, 5, 6, 7], pattern="0,3/8", fitness=1.0)
    stored.write_text(json.dumps(result))
    with caplog.at_level(logging.ERROR, logger="evop"):
        again = run_search(cfg)
    lines = [r.getMessage() for r in errors(caplog) if "result.json" in r.getMessage()]
    assert len(lines) == 1 and stored.as_uri() in lines[0] and "protected layers [0]" in lines[0]
    assert comparable(again) == comparable(reference)
    assert comparable(json.loads((tmp_path / "run" / "result.json").read_text())) == comparable(reference)

    # A pattern that fits the config but is not what the search found: it disagrees with the checkpoint.
    caplog.clear()
    other = "3,4/8" if reference["pattern"] != "3,4/8" else "4,5/8"
    result = json.loads(stored.read_text())
    result.update(removed_layers=[int(i) for i in other[:3].split(",")], pattern=other)
    result["kept_layers"] = [i for i in range(8) if i not in result["removed_layers"]]
    stored.write_text(json.dumps(result))
    with caplog.at_level(logging.ERROR, logger="evop"):
        assert comparable(run_search(cfg)) == comparable(reference)
    assert any("result.json" in r.getMessage() and "does not fit" in r.getMessage() for r in errors(caplog))


def test_prune_refuses_a_result_that_asks_for_remote_code(tiny_dir, text_file, tmp_path, reference, capsys):
    """A shared result.json pointing at a model folder with an ``auto_map`` module must not run it."""
    model = tmp_path / "model-with-code"
    shutil.copytree(tiny_dir, model)
    marker = tmp_path / "MARKER"
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom.CustomLlama", "AutoConfig": "custom.CustomConfig"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    pass\n"
        "class CustomLlama(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    shared = dict(reference)
    shared_cfg = build_config(
        reference["config"], [f"model.name_or_path={model}", "model.trust_remote_code=true"]
    )
    shared.update(config=shared_cfg.model_dump(mode="json"), base_model=str(model))
    shared["config_hash"] = shared_cfg.search_hash()  # consistent: only the code request is the tell
    path = tmp_path / "shared" / "result.json"
    path.parent.mkdir()
    path.write_text(json.dumps(shared))

    assert main(["prune", "--result", str(path)]) == 2
    err = capsys.readouterr().err
    assert "asks for model.trust_remote_code=true" in err and "add model.trust_remote_code=true" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not marker.exists() and not (path.parent / "pruned-model").exists()

    # The person running EvoP may allow it, explicitly, on the command line.
    assert main(["prune", "--result", str(path), "model.trust_remote_code=true"]) == 0
    assert marker.exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {
                "num_layers": 30,
                "removed_layers": [3, 4],
                "pattern": "3,4/30",
                "kept_layers": [0, 1, 2, *range(5, 30)],
            },
            "for a model of 30 layers; this one has 8",
        ),
        (
            {"base_model": "someone/else"},
            "its base_model 'someone/else' is not its config's model.name_or_path",
        ),
        (
            {"removed_layers": [0, 3], "kept_layers": [1, 2, 4, 5, 6, 7], "pattern": "0,3/8"},
            "protected layers",
        ),
        ({"pattern": "3,4/8"}, "disagree"),
        ({"config_hash": "0123456789abcdef"}, "is not the hash of its config"),
    ],
    ids=["layer-count", "base-model", "protected", "inconsistent", "config-hash"],
)
def test_prune_refuses_a_result_that_does_not_fit_its_model_or_config(
    tiny_dir, text_file, tmp_path, reference, capsys, edit, message
):
    edited = {**reference, **edit}
    if edited["pattern"] == reference["pattern"] and "pattern" in edit:
        edited["pattern"] = "4,5/8"
    path = tmp_path / "result.json"
    path.write_text(json.dumps(edited))
    assert main(["prune", "--result", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "pruned-model").exists()


def test_a_baseline_memo_with_foreign_patterns_is_not_replayed(tiny_dir, text_file, tmp_path, caplog):
    cfg = _cfg(tiny_dir, text_file, tmp_path / "run", method="sleb")
    clean = run_search(cfg)
    memo_path = run_dir(cfg) / "search" / "memo.json"
    memo = json.loads(memo_path.read_text())
    memo["full"]["0,1/8"] = [0.001, 0.0]  # a protected layer with the best score of all
    memo_path.write_text(json.dumps(memo))
    (run_dir(cfg) / "search" / "outcome.json").unlink()
    (run_dir(cfg) / "result.json").unlink()
    with caplog.at_level(logging.ERROR, logger="evop"):
        again = run_search(cfg)
    assert any(memo_path.as_uri() in r.getMessage() and "protected" in r.getMessage() for r in errors(caplog))
    assert again["pattern"] == clean["pattern"] and again["evaluations"] == clean["evaluations"]
