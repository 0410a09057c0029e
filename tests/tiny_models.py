"""Tiny random-initialised causal LMs of each supported family (no files, no network)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128

# Small but structurally faithful settings per family (GQA, per-layer layer_types...).
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "mixtral": dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=2,
        num_experts_per_tok=1,
    ),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8
    ),
    "gemma": dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8
    ),
    "gemma2": dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=8,
    ),
    "gemma3_text": dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=8,
        sliding_window_pattern=3,
    ),
    "phi3": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "phi": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4),
    "opt": dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32),
    "gpt2": dict(n_embd=32, n_head=4),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4),
}


def tiny_model(model_type: str, num_layers: int = 6, seed: int = 0) -> torch.nn.Module:
    """A random-initialised ``model_type`` causal LM with ``num_layers`` decoder layers."""
    kwargs = dict(TINY_CONFIGS[model_type])
    layer_key = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    kwargs[layer_key] = num_layers
    kwargs.setdefault("max_position_embeddings", 256)
    if model_type == "gpt2":
        kwargs.pop("max_position_embeddings")
        kwargs["n_positions"] = 256
    cfg = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


def random_blocks(n: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=g)


class CharTokenizer:
    """A character tokenizer with ids below :data:`VOCAB`, enough for calibration code paths."""

    eos_token_id = 2
    eos_token = "\x02"
    pad_token = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [3 + (ord(c) % (VOCAB - 3)) for c in text]}

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return ["".join(chr(int(i) - 3 + 32) for i in row if int(i) >= 3) for row in batch]


def tiny_tokenizer():
    """A word-level fast tokenizer with ids below :data:`VOCAB` that saves and reloads like a
    hub tokenizer (unknown words map to id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the of and to in a is was for on as with by he it at from his an were are which".split()
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for token in words + letters:
        if len(vocab) < VOCAB:
            vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Split("", "isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )


def save_tiny_model(path, model_type: str = "llama", num_layers: int = 6, seed: int = 0):
    """Write a tiny random model and its tokenizer as a normal Hugging Face directory."""
    tiny_model(model_type, num_layers, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


WORDS = "the river runs north of the old town and the market opens at dawn while ships wait".split()


def write_docs(path, n_docs: int = 60, seed: int = 0):
    """A .jsonl file of ``n_docs`` random word documents (calibration text for tiny models)."""
    import json
    import random

    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 120))) for _ in range(n_docs)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def write_sentences(path, n_docs: int = 30, seed: int = 1):
    """A .jsonl file of documents made of capitalised sentences (the offline lm-eval tasks are
    built from sentences)."""
    import json
    import random

    rng = random.Random(seed)
    docs = [
        " ".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + "."
            for _ in range(8)
        )
        for _ in range(n_docs)
    ]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def search_config(model_dir, text_file, out, overrides=(), **search):
    """A small search of the tiny model on ``text_file`` (8 layers: k=2, layers 0 and 7 protected),
    written to ``out``; ``search`` replaces search settings, ``overrides`` are ``key=value`` strings."""
    from evop.config import build_config

    return build_config(
        {
            "model": {"name_or_path": str(model_dir), "device": "cpu"},
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
        },
        list(overrides),
    )


def comparable(result: dict) -> dict:
    """A result without timings, locations and config: what must match between runs of one search."""
    out = {k: v for k, v in result.items() if k not in ("wall_time_s", "checkpoints", "config")}
    out["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in result["history"]]
    return out
