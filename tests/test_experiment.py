"""`evop search` / `evop prune` / `evop ppl` end to end on a tiny model directory, and resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from evop.cli import main
from evop.eval.perplexity import load_blocks
from evop.method.fitness import perplexity
from evop.method.patterns import Pattern
from evop.models.layers import layers_skipped, num_layers
from evop.pipeline.local import run_search
from evop.pipeline.store import RunStore
from tests.tiny_models import search_config


def _cfg(tiny_dir, text_file, out, **search):
    return search_config(tiny_dir, text_file, out, **search)


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


def test_prune_names_a_corrupt_or_incomplete_result_file(tmp_path, capsys):
    result = tmp_path / "result.json"
    result.write_text('{"config": {} "num_layers": 8}')
    assert main(["prune", "--result", str(result)]) == 2
    err = capsys.readouterr().err
    assert f"result file {result} is not valid JSON" in err and "Traceback" not in err
    result.write_text(json.dumps({"config": {}, "num_layers": 8}))
    assert main(["prune", "--result", str(result)]) == 2
    assert f"result file {result} lacks 'removed_layers'" in capsys.readouterr().err
    result.write_text("[1, 2]")
    assert main(["prune", "--result", str(result)]) == 2
    assert f"result file {result}: expected a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("search", ["--quiet"]),
        ("run", ["--config", "c.yaml"]),
        ("compare", ["--lm-eval"]),
        ("compare", ["--methods", "evop,sleb"]),
        ("prune", ["--out", "o"]),
    ],
)
def test_options_and_overrides_in_any_order(command, option):
    from evop.cli import build_parser

    overrides = ["search.sparsity=0.3", "output_dir=x"]
    orders = [
        [*option, *overrides],
        [*overrides, *option],
        [overrides[0], *option, overrides[1]],  # plain argparse: "unrecognized arguments"
    ]
    if command == "prune":
        orders = [["--result", "r.json", *order] for order in orders]
    parsed = [vars(build_parser().parse_args([command, *order])) for order in orders]
    assert parsed[0]["overrides"] == overrides
    assert parsed[0] == parsed[1] == parsed[2]


@pytest.mark.parametrize("command", [[], ["search"], ["prune"], ["ppl"], ["assets"]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: evop" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.num_remove=8", "removing 8 of 8 layers"),
        ("search.num_remove=7", "cannot remove k=7 layers: 6 of 8 layers are removable"),
        ("search.protected_layers=[0,12]", "protected layer 12 is out of range for 8 layers"),
        ("output_dir=/proc/evop-no-such-dir", "output_dir: cannot write to /proc/evop-no-such-dir"),
    ],
)
def test_bad_input_is_found_before_any_work_in_one_line(
    tiny_dir, text_file, tmp_path, capsys, override, message
):
    """k against the model's layers, protected layers and the output directory are checked before
    calibration: one line naming the problem, exit 2, and nothing written to the store."""
    out = tmp_path / "run"
    cfg = _cfg(tiny_dir, text_file, out, sparsity=None, num_remove=2)
    (tmp_path / "c.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))
    assert main(["search", "--config", str(tmp_path / "c.yaml"), "--quiet", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (out / "checkpoints").exists()


def test_an_unexpected_error_is_not_dressed_as_bad_input(monkeypatch, tiny_dir, text_file, tmp_path):
    """Only EvoPErrors are reported as one line: anything else is a bug and keeps its traceback."""
    from evop.pipeline import local

    def broken(cfg):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(local, "check_search", broken)
    cfg = _cfg(tiny_dir, text_file, tmp_path / "run")
    (tmp_path / "c.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))
    with pytest.raises(ValueError, match="a bug"):
        main(["search", "--config", str(tmp_path / "c.yaml"), "--quiet"])
