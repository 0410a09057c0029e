"""The `real` tier: SmolLM2-135M (30 layers) and offline text from `evop assets`.

A short CCDS + EPPS search through the CLI, pruning, reloading with plain transformers, and the
search's value over random patterns of the same sparsity.
"""

from __future__ import annotations

import json
import random
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evop.assets.references import asset_path
from evop.cli import main
from evop.eval.perplexity import load_blocks
from evop.method.fitness import PatternScorer, perplexity
from evop.method.patterns import Pattern
from evop.models.layers import num_layers

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "run"
    args = [
        "search",
        "--config",
        "configs/demo.yaml",
        "--quiet",
        f"output_dir={out}",
        # A small budget: the point is the whole path on the real model, not the best pattern.
        "calibration.pool_size=48",
        "calibration.block_len=64",
        "calibration.n_samples=4",
        "calibration.n_clusters=4",
        "search.population=8",
        "search.generations=3",
    ]
    assert main(args) == 0
    return out, json.loads((out / "result.json").read_text())


def test_search_writes_a_valid_result(searched):
    _, result = searched
    assert result["num_layers"] == 30
    assert len(result["removed_layers"]) == 6  # sparsity 0.2 of 30 layers
    assert 0 not in result["removed_layers"] and 29 not in result["removed_layers"]
    assert result["fitness"] is not None and result["fitness"] > result["dense_fitness"] > 1
    assert result["calibration"]["method"] == "ccds" and result["calibration"]["clusters_covered"] == 4
    assert len(result["history"]) == result["generations"] + 1


def test_prune_reload_generate_and_equal_perplexity(searched):
    out, result = searched
    assert main(["prune", "--result", str(out / "result.json")]) == 0
    model = AutoModelForCausalLM.from_pretrained(out / "pruned-model", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out / "pruned-model")
    assert num_layers(model) == 24 and model.config.num_hidden_layers == 24
    blocks = load_blocks(out / "calibration.safetensors")
    assert perplexity(model, blocks, batch_size=8) == pytest.approx(result["fitness"], rel=1e-4)
    prompt = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        cached = model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_searched_pattern_beats_random_patterns(searched):
    out, result = searched
    model = AutoModelForCausalLM.from_pretrained(asset_path("smollm2"), dtype=torch.float32).eval()
    scorer = PatternScorer(model, load_blocks(out / "calibration.safetensors"))
    rng = random.Random(0)
    candidates = list(range(1, 29))
    randoms = [scorer(Pattern.of(30, rng.sample(candidates, 6))) for _ in range(8)]
    best = scorer(Pattern.of(30, result["removed_layers"]))
    assert best == pytest.approx(result["fitness"], rel=1e-6)
    assert best < statistics.mean(randoms)
    assert best < statistics.median(randoms)
