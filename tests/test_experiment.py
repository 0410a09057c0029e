"""`evop search` / `evop prune` / `evop ppl` end to end on a tiny model directory, and resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from evop.cli import main
from evop.config import build_config
from evop.eval.perplexity import load_blocks
from evop.method.fitness import perplexity
from evop.method.patterns import Pattern
from evop.models.layers import layers_skipped, num_layers
from evop.pipeline.local import run_search
from evop.pipeline.store import RunStore


def _cfg(tiny_dir, text_file, out, **search):
    return build_config(
        {
            "model": {"name_or_path": str(tiny_dir), "device": "cpu"},
            "calibration": {
                "dataset": str(text_file),
                "pool_size": 32,
                "block_len": 32,
                "n_samples": 6,
                "embedder": "model",
                "n_clusters": 3,
            },
            "search": {"sparsity": 0.25, "population": 6, "generations": 4, "patience": 10, **search},
            "fitness": {"batch_size": 4},
            "output_dir": str(out),
        }
    )


def test_search_prune_ppl_cli(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _cfg(tiny_dir, text_file, out)
    (tmp_path / "c.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    assert main(["search", "--config", str(tmp_path / "c.yaml"), "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    for key in (
        "base_model",
        "num_layers",
        "removed_layers",
        "kept_layers",
        "sparsity",
        "fitness_metric",
        "fitness",
        "dense_fitness",
        "evaluations",
        "generations",
        "seed",
        "calibration",
        "history",
        "wall_time_s",
        "config",
    ):
        assert key in result, key
    assert result["num_layers"] == 8 and len(result["removed_layers"]) == 2
    assert 0 not in result["removed_layers"] and 7 not in result["removed_layers"]  # protected
    assert (
        result["calibration"] | {"method": "ccds", "n_samples": 6, "block_len": 32, "n_clusters": 3}
        == result["calibration"]
    )
    assert [h["generation"] for h in result["history"]] == list(range(len(result["history"])))
    assert result["evaluations"] == result["history"][-1]["evaluations"]
    assert result["fitness"] <= min(h["best_fitness"] for h in result["history"])
    # The GA's generations, then the polish rounds (the default), each marked with its phase.
    phases = [h["phase"] for h in result["history"]]
    ga = phases.count("ga")
    assert ga >= 1 and phases == ["ga"] * ga + ["polish"] * (len(phases) - ga)
    if result["stop_reason"] in ("local optimum", "polish rounds"):
        assert ga < len(phases)

    assert main(["prune", "--result", str(out / "result.json")]) == 0
    pruned = AutoModelForCausalLM.from_pretrained(out / "pruned-model").eval()
    assert num_layers(pruned) == 6
    blocks = load_blocks(out / "calibration.safetensors")
    assert perplexity(pruned, blocks) == pytest.approx(result["fitness"], rel=1e-5)

    capsys.readouterr()
    assert (
        main(
            [
                "ppl",
                str(out / "pruned-model"),
                "--base",
                str(tiny_dir),
                "--calibration",
                str(out / "calibration.safetensors"),
                "--text",
                str(text_file),
                "--block-len",
                "32",
                "--json",
                str(tmp_path / "ppl.json"),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "ppl.json").read_text())
    assert [r["model"] for r in rows] == ["dense", "pruned"]
    assert rows[1]["calibration"] == pytest.approx(result["fitness"], rel=1e-5)
    assert rows[0]["calibration"] == pytest.approx(result["dense_fitness"], rel=1e-5)


def test_interrupted_search_resumes_to_the_same_result(tiny_dir, text_file, tmp_path):
    full = run_search(_cfg(tiny_dir, text_file, tmp_path / "full"))

    class Crash(Exception):
        pass

    def crash_after_gen_1(entry):
        if entry["generation"] == 1:
            raise Crash

    cfg = _cfg(tiny_dir, text_file, tmp_path / "crashed")
    with pytest.raises(Crash):
        run_search(cfg, on_generation=crash_after_gen_1)
    assert RunStore(cfg).checkpoints.latest().generation == 1
    seen = []
    resumed = run_search(cfg, on_generation=seen.append)
    assert seen[0]["generation"] == 2  # generations 0 and 1 were not recomputed
    assert seen[0]["total_evaluations"] - seen[0]["new_evaluations"] == full["history"][1]["evaluations"]

    def comparable(r):  # everything but timings and the output place
        r = {k: v for k, v in r.items() if k not in ("wall_time_s", "checkpoints", "config")}
        r["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]]
        return r

    assert comparable(resumed) == comparable(full)


def test_in_place_score_matches_saved_result(tiny_dir, text_file, tmp_path):
    result = run_search(_cfg(tiny_dir, text_file, tmp_path / "r", generations=1))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    blocks = load_blocks(tmp_path / "r" / "calibration.safetensors")
    with layers_skipped(model, Pattern.of(8, result["removed_layers"])):
        assert perplexity(model, blocks, batch_size=4) == result["fitness"]  # same batching: exact


def test_cli_reports_bad_config_and_unknown_model(tmp_path, capsys):
    assert main(["search", "search.sparsity=2", "search.population=1"]) == 2
    err = capsys.readouterr().err
    assert "search.sparsity:" in err and "search.population:" in err
    assert main(["search", f"model.name_or_path={tmp_path / 'nope'}", f"output_dir={tmp_path / 'o'}"]) == 2
    assert "cannot load model" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["search"], ["prune"], ["ppl"], ["assets"]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: evop" in capsys.readouterr().out
