"""Layer access, in-place skipping and pruning round trips for every supported family."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from evop.method.fitness import perplexity
from evop.method.patterns import Pattern
from evop.models.layers import FAMILIES, UnsupportedModelError, layer_access, layers_skipped, num_layers
from evop.models.pruning import save_pruned
from tests.tiny_models import TINY_CONFIGS, random_blocks, tiny_model

FAMILY_NAMES = sorted(TINY_CONFIGS)


def test_every_family_has_a_tiny_model():
    assert set(FAMILIES) == set(TINY_CONFIGS)


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_layers_skipped_in_place_and_restored(model_type):
    model = tiny_model(model_type)
    blocks = random_blocks()
    layers_before = list(layer_access(model).layers(model))
    dense = perplexity(model, blocks)
    pattern = Pattern.of(6, [1, 4])
    with layers_skipped(model, pattern):
        assert num_layers(model) == 4
        assert model.config.num_hidden_layers == 4
        pruned_in_place = perplexity(model, blocks)
    # Exact restore: same module objects, same config, same score, however often we skip.
    for removed in ([2], [0, 5], [1, 2, 3]):
        with layers_skipped(model, Pattern.of(6, removed)):
            perplexity(model, blocks)
    assert list(layer_access(model).layers(model)) == layers_before
    assert model.config.num_hidden_layers == 6
    assert perplexity(model, blocks) == dense
    assert pruned_in_place != dense


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_prune_round_trip(model_type, tmp_path):
    model = tiny_model(model_type)
    blocks = random_blocks()
    pattern = Pattern.of(6, [1, 4])
    layer_types = getattr(model.config, "layer_types", None)
    with layers_skipped(model, pattern):
        in_place = perplexity(model, blocks)

    out = save_pruned(model, None, pattern, tmp_path / "pruned", base_model="tiny")
    assert not (tmp_path / "pruned.partial").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("num_hidden_layers", cfg.get("n_layer")) == 4
    assert cfg["evop_pruning"]["removed_layers"] == [1, 4]
    if layer_types is not None:
        assert cfg["layer_types"] == [layer_types[i] for i in pattern.kept]

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert num_layers(reloaded) == 4
    assert perplexity(reloaded, blocks) == pytest.approx(in_place, rel=1e-5)

    # KV-cache generation must match cache-free generation: layer_idx was renumbered.
    prompt = blocks[:1, :5]
    with torch.inference_mode():
        cached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_unknown_architecture_names_the_model_type():
    class Cfg:
        model_type = "mamba-x"

    class Fake(torch.nn.Module):
        config = Cfg()

    with pytest.raises(UnsupportedModelError, match="mamba-x"):
        layer_access(Fake())


def test_pattern_for_wrong_model_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="30 layers"):
        with layers_skipped(model, Pattern.of(30, [1])):
            pass


def test_a_directory_without_config_json_is_not_a_model(tmp_path):
    from evop.config import ModelConfig
    from evop.models.loading import ModelLoadError, load_model, load_tokenizer

    empty = tmp_path / "empty"
    empty.mkdir()
    readme = tmp_path / "readme-only"
    readme.mkdir()
    (readme / "README.md").write_text("# not a model\n")
    for path in (empty, readme):
        cfg = ModelConfig(name_or_path=str(path), device="cpu")
        expected = rf"is not a model directory: no config\.json in {re.escape(str(path))}$"
        for load in (load_tokenizer, load_model):
            with pytest.raises(ModelLoadError, match=expected):
                load(cfg)
