"""Inference speed benchmark on tiny random models: sane numbers, identical inputs, no timing asserts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from evop.eval.speed import (
    build_prompt_ids,
    checkpoint_size,
    compare_speed,
    decoder_layer_params,
    ideal_speedup,
    measure_inference,
)
from evop.eval.speed_report import format_speed_table
from evop.method.patterns import Pattern
from evop.models.layers import layer_access
from evop.models.pruning import prune_layers, save_pruned
from tests.tiny_models import VOCAB, save_tiny_model, tiny_model, tiny_tokenizer

PATTERN = Pattern.of(8, [2, 5])  # 8 -> 6 layers


def _count(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    decoder = sum(p.numel() for layer in layer_access(model).layers(model) for p in layer.parameters())
    return total, decoder


@pytest.fixture(scope="module")
def pair():
    dense = tiny_model("llama", 8)
    pruned = prune_layers(tiny_model("llama", 8), PATTERN)
    return dense, pruned


def _sane(metrics: dict) -> None:
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_s", "decode_s"):
        assert metrics[key] > 0 and math.isfinite(metrics[key]), key
    assert metrics["device"] == "cpu" and metrics["dtype"] == "float32"
    assert metrics["weights_bytes"] >= 4 * metrics["params"]  # float32 parameters, plus buffers (rope)
    assert metrics["peak_memory_bytes"] is None  # CPU: only the approximate RSS delta
    assert metrics["peak_rss_delta_bytes"] is None or metrics["peak_rss_delta_bytes"] >= 0


def test_measure_inference_single_model(pair):
    dense, _ = pair
    m = measure_inference(dense, tiny_tokenizer(), prompt_len=16, new_tokens=3, warmup=1, runs=1)
    assert (m["batch_size"], m["prompt_len"], m["new_tokens"], m["runs"]) == (1, 16, 3, 1)
    assert m["num_layers"] == 8
    assert (m["params"], m["decoder_params"]) == _count(dense)


def test_compare_speed_counts_ratios_and_ideal(pair):
    dense, pruned = pair
    report = compare_speed(dense, pruned, tiny_tokenizer(), prompt_len=16, new_tokens=3, warmup=0, runs=2)
    _sane(report["dense"])
    _sane(report["pruned"])
    assert (report["dense"]["params"], report["dense"]["decoder_params"]) == _count(dense)
    assert (report["pruned"]["params"], report["pruned"]["decoder_params"]) == _count(pruned)
    assert report["pruned"]["params"] < report["dense"]["params"]
    assert report["pruned"]["num_layers"] == 6
    assert report["ideal"]["compute"] == pytest.approx(8 / 6)
    assert report["ideal"]["params"] == pytest.approx(8 / 6)  # llama layers are all alike
    r = report["ratios"]
    assert r["decoder_params"] == pytest.approx(6 / 8)
    assert 0 < r["params"] < 1 and 0 < r["weights_memory"] < 1
    assert r["peak_memory"] is None
    for key in ("prefill_speedup", "decode_speedup"):
        assert r[key] > 0 and math.isfinite(r[key])
    assert report["measured_vs_ideal"] == pytest.approx(r["decode_speedup"] / (8 / 6))
    table = format_speed_table(report)
    assert table.startswith("| metric | dense | pruned |")
    assert "decode tokens/s" in table and "1.33x" in table
    for key in ("prefill_speedup", "decode_speedup"):  # one interval per phase, around the ratio's pairs
        lo, hi = report["intervals"][key]
        assert 0 < lo <= hi
    assert report["above_ideal"] == [k for k in ("prefill_speedup", "decode_speedup") if r[k] > 8 / 6]


def test_speedup_interval_of_paired_runs_and_the_above_ideal_warning():
    from evop.eval.speed import speedup_interval

    assert speedup_interval([2.0, 4.0, 1.0], [1.0, 2.0, 0.5]) == pytest.approx([2.0, 2.0])  # drift cancels
    lo, hi = speedup_interval([2.0, 2.2, 1.8, 2.0], [1.0, 1.0, 1.0, 1.0])
    assert lo < 2.0 < hi and speedup_interval([2.0], [1.0]) is None
    metrics = {
        "num_layers": 8,
        "params": 10,
        "decoder_params": 8,
        "prefill_tokens_per_s": 1.0,
        "decode_tokens_per_s": 1.0,
        "weights_bytes": 40,
        "peak_memory_bytes": None,
        "device": "cpu",
        "dtype": "float32",
        "runs": 8,
    }
    report = {
        "dense": metrics,
        "pruned": {**metrics, "num_layers": 6, "decoder_params": 6, "params": 8, "weights_bytes": 32},
        "ratios": {
            "prefill_speedup": 1.20,
            "decode_speedup": 1.40,
            "params": 0.8,
            "decoder_params": 0.75,
            "weights_memory": 0.8,
            "peak_memory": None,
        },
        "ideal": {"compute": 8 / 6, "params": 8 / 6},
        "measured_vs_ideal": 1.05,
        "intervals": {"prefill_speedup": [1.1, 1.3], "decode_speedup": [1.3, 1.5]},
        "above_ideal": ["decode_speedup"],
        "input": {"batch_size": 1, "prompt_len": 16, "new_tokens": 3},
    }
    table = format_speed_table(report)
    assert "1.40x [1.30-1.50] (!)" in table and "1.20x [1.10-1.30] |" in table
    assert "warning: the decode speedup is above the ideal 1.33x" in table


def test_speed_is_measured_once_per_pattern_and_read_back(tiny_dir, text_file, tmp_path):
    """One record: a second run reads the first measurement (result.json and MLflow agree)."""
    pytest.importorskip("prefect")
    from evop import pipeline
    from evop.pipeline.local import run_search
    from tests.test_pipeline import make_cfg

    evaluation = {"speed": True, "speed_runs": 2, "prompt_len": 8, "new_tokens": 2}
    cfg = make_cfg(tiny_dir, text_file, tmp_path, evaluation=evaluation, generations=1)
    pruned = pipeline.prune_model(cfg, run_search(cfg))
    first = pipeline.measure_speed(cfg, pruned)
    assert pipeline.measure_speed(cfg, pruned) == first
    other = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"speed_runs": 3})})
    assert pipeline.measure_speed(other, pruned)["dense"]["runs"] == 3  # other settings: measured anew


def test_batch_size_two_and_identical_inputs(pair, monkeypatch):
    import evop.eval.speed as speed

    dense, pruned = pair
    seen: list[tuple[int, torch.Tensor]] = []
    real = speed._run_once

    def spy(model, input_ids, new_tokens):
        seen.append((id(model), input_ids.clone()))
        return real(model, input_ids, new_tokens)

    monkeypatch.setattr(speed, "_run_once", spy)
    report = compare_speed(
        dense, pruned, tiny_tokenizer(), prompt_len=12, new_tokens=2, batch_size=2, warmup=1, runs=2
    )
    assert report["input"] == {"batch_size": 2, "prompt_len": 12, "new_tokens": 2}
    assert report["dense"]["batch_size"] == report["pruned"]["batch_size"] == 2
    assert {i for i, _ in seen} == {id(dense), id(pruned)} and len(seen) == 2 * (1 + 2)
    assert report["dense"]["decode_tokens_per_s"] > 0 and report["pruned"]["decode_tokens_per_s"] > 0
    first = seen[0][1]
    assert first.shape == (2, 12)
    assert all(torch.equal(ids, first) for _, ids in seen)
    # Runs alternate in ABBA order after the warm-up pair.
    order = ["d" if i == id(dense) else "p" for i, _ in seen]
    assert order == ["d", "p", "d", "p", "p", "d"]


def test_prompt_ids_are_deterministic():
    tok = tiny_tokenizer()
    a = build_prompt_ids(tok, prompt_len=40, batch_size=3)
    assert a.shape == (3, 40) and torch.equal(a, build_prompt_ids(tok, prompt_len=40, batch_size=3))
    assert not torch.equal(a[0], a[1])  # rows are rotated
    r = build_prompt_ids(None, prompt_len=10, batch_size=2, vocab_size=VOCAB, seed=3)
    assert torch.equal(r, build_prompt_ids(None, prompt_len=10, batch_size=2, vocab_size=VOCAB, seed=3))
    assert int(r.max()) < VOCAB
    given = torch.arange(10).view(2, 5)
    m = measure_inference(tiny_model("llama", 2), input_ids=given, new_tokens=1, warmup=0, runs=1)
    assert (m["batch_size"], m["prompt_len"]) == (2, 5)


def test_ideal_speedup():
    dense = tiny_model("llama", 8)
    assert ideal_speedup(8, 2) == {"compute": pytest.approx(8 / 6), "params": None}
    both = ideal_speedup(8, [2, 5], dense)
    assert both["compute"] == pytest.approx(8 / 6) and both["params"] == pytest.approx(8 / 6)
    assert decoder_layer_params(dense) == [decoder_layer_params(dense)[0]] * 8
    with pytest.raises(ValueError):
        ideal_speedup(8, 8)


def test_checkpoint_size(tmp_path):
    d = save_tiny_model(tmp_path / "m", "llama", 2)
    assert checkpoint_size(d) == sum(f.stat().st_size for f in d.glob("*.safetensors")) > 0
    with pytest.raises(FileNotFoundError):
        checkpoint_size(tmp_path / "missing")


def test_cli_bench(tmp_path, capsys):
    from evop.cli import main

    dense_dir = save_tiny_model(tmp_path / "dense", "llama", 8)
    pruned_dir = tmp_path / "pruned"
    save_pruned(tiny_model("llama", 8), None, PATTERN, pruned_dir)
    tiny_tokenizer().save_pretrained(pruned_dir)
    out = tmp_path / "speed.json"
    argv = ["bench", str(pruned_dir), "--base", str(dense_dir), "--device", "cpu"]
    argv += ["--prompt-len", "8", "--new-tokens", "2", "--runs", "1", "--batch-size", "2", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "decode tokens/s" in printed and "checkpoint size" in printed
    report = json.loads(out.read_text())
    assert report["dense"]["num_layers"] == 8 and report["pruned"]["num_layers"] == 6
    assert report["pruned"]["checkpoint_bytes"] == checkpoint_size(pruned_dir)
    assert report["ideal"]["compute"] == pytest.approx(8 / 6)


def test_bench_with_a_pattern_and_the_benchmark_script(tmp_path, capsys):
    """`evop bench --pattern` prunes an in-memory copy of the base; benchmarks/speed.py is the
    same command as a script (one implementation, not two)."""
    import runpy
    import sys

    from evop.cli import main

    dense_dir = save_tiny_model(tmp_path / "dense", "llama", 8)
    out = tmp_path / "speed.json"
    argv = ["--base", str(dense_dir), "--pattern", str(PATTERN), "--device", "cpu", "--prompt-len", "8"]
    argv += ["--new-tokens", "2", "--runs", "1", "--json", str(out)]
    assert main(["bench", *argv]) == 0
    report = json.loads(out.read_text())
    assert report["pattern"] == str(PATTERN) and report["pruned"]["num_layers"] == 6
    assert main(["bench", str(dense_dir), *argv]) == 2  # a checkpoint and a pattern: which one?
    assert "either a pruned model" in capsys.readouterr().err
    out.unlink()
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    old = sys.argv
    sys.argv = [str(script), *argv]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = old
    assert done.value.code == 0 and json.loads(out.read_text())["pruned"]["num_layers"] == 6
