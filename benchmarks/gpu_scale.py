"""GPU check of the scorer and the Ray pool on a random-initialised Llama-shaped 1B+ model.

Run it the moment a CUDA machine is available (a benchmark, not a test; nothing else needs a GPU)::

    python benchmarks/gpu_scale.py --out runs/gpu-scale            # ~1.2B params, bf16

It builds the model from a config (no download), saves it once (the Ray actors load it like any
checkpoint), then prints one table:

1. ``local``: :class:`~evop.method.fitness.PatternScorer` on ``cuda`` in bf16: tokens/s, and that
   the staged sums of racing give exactly the full score in bf16 too;
2. ``ray-N x1``: one actor per visible GPU (``gpus_per_worker: 1``), the patterns sent as one step;
3. ``ray-1 x2`` (two GPUs or more): one actor whose model is split over two GPUs
   (``gpus_per_worker: 2``, Accelerate's ``device_map="auto"``), scoring the same patterns to the
   same fitness within bf16 tolerance.

``--device cpu --hidden 64 --layers 4 --intermediate 128 --vocab 256`` runs the same code on a CPU
(a smoke check of the script itself).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path


def build_model(path: Path, args: argparse.Namespace) -> int:
    """A random Llama of the given shape saved at ``path`` (once); returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 128),
        num_key_value_heads=max(1, args.hidden // 512),
        vocab_size=args.vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(path)
        _save_tokenizer(path, args.vocab)
        del model
    return _count(config)


def _count(config) -> int:
    h, i, n, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    return n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + 2 * v * h + h


def _save_tokenizer(path: Path, vocab: int) -> None:
    """A word-level tokenizer of ``vocab`` tokens, so the checkpoint loads like any other."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 1)} | {"<unk>": vocab - 1}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<unk>")))
    tok.pad_token = tok.eos_token = "<unk>"
    tok.save_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu-scale")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--blocks", type=int, default=32, help="calibration blocks per pattern")
    parser.add_argument("--block-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patterns", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.25)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from evop.config import FitnessConfig, ModelConfig, ScaleConfig
    from evop.method.fitness import PatternScorer
    from evop.method.operators import sample_patterns
    from evop.method.parallel import ParallelScorer, RayPool
    from evop.method.patterns import Pattern, layers_to_remove, removable_layers
    from evop.models.loading import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = build_model(out / "model", args)
    model_cfg = ModelConfig(name_or_path=str(out / "model"), device=args.device, dtype=args.dtype)
    fitness = FitnessConfig(batch_size=args.batch_size, prefix_cache_mb=4096)
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, args.vocab - 1, (args.blocks, args.block_len), generator=gen)
    k = layers_to_remove(args.layers, args.sparsity)
    patterns = sample_patterns(
        random.Random(0), args.layers, removable_layers(args.layers, [0, -1], k), k, args.patterns
    )
    tokens = args.patterns * blocks.numel()
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    rows, checks = [], {}

    model, _ = load_model(model_cfg)
    local = PatternScorer.from_config(model, blocks, fitness)
    local(patterns[0])  # warm-up: kernels, the dense prefix cache
    if gpus:
        torch.cuda.synchronize()
    began = time.perf_counter()
    local_scores = {str(p): local(p) for p in patterns}
    if gpus:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    rows.append(
        {
            "scorer": "local",
            "gpus": min(gpus, 1),
            "tokens_per_s": round(tokens / seconds),
            "seconds": round(seconds, 2),
        }
    )
    p0 = Pattern.parse(str(patterns[0]))
    staged = local.fitness_of(local.stage_sums(p0))
    checks["staged_equals_full"] = staged == local_scores[str(p0)]
    checks["finite"] = all(math.isfinite(v) for v in local_scores.values())
    checks["dtype"] = str(next(model.parameters()).dtype)
    if gpus:
        checks["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model, local
    if gpus:
        torch.cuda.empty_cache()

    import ray

    # The stage layout on the driver comes from a CPU copy (no prefix cache): every GPU is the actors'.
    cpu_model, _ = load_model(model_cfg.model_copy(update={"device": "cpu", "dtype": "float32"}))
    layout = PatternScorer.from_config(cpu_model, blocks, fitness.model_copy(update={"prefix_cache_mb": 0}))
    ray.init(include_dashboard=False)
    layouts = [(max(1, gpus), 1 if gpus else 0)]
    if gpus >= 2:
        layouts.append((1, 2))
    for workers, per in layouts:
        scale = ScaleConfig(backend="ray", workers=workers, gpus_per_worker=per, threads_per_worker=1)
        began = time.perf_counter()
        pool = RayPool(scale, model_cfg, blocks, fitness)
        startup = time.perf_counter() - began
        scorer = ParallelScorer(layout, pool)
        scorer.race_many({str(patterns[0]): []}, None)  # warm-up
        began = time.perf_counter()
        results = scorer.race_many({str(p): [] for p in patterns}, None)
        seconds = time.perf_counter() - began
        worst = max(
            abs(scorer.fitness_of(results[key][0]) - value) / value for key, value in local_scores.items()
        )
        rows.append(
            {
                "scorer": f"ray-{workers} x{per}",
                "gpus": workers * per,
                "tokens_per_s": round(tokens / seconds),
                "seconds": round(seconds, 2),
                "startup_s": round(startup, 1),
                "max_rel_diff_vs_local": f"{worst:.2e}",
            }
        )
        pool.shutdown()
    if gpus < 2:
        checks["gpus_per_worker_2"] = f"not run: {gpus} GPU(s) visible"

    lines = [
        f"Random Llama, {params / 1e9:.2f}B params, {args.layers} layers, k={k}, {args.dtype}, "
        f"{args.patterns} patterns x {blocks.numel():,} tokens",
        "",
        "| scorer | GPUs | tokens/s | seconds | start-up s | max rel. diff vs local |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scorer']} | {r['gpus']} | {r['tokens_per_s']:,} | {r['seconds']} | "
            f"{r.get('startup_s', '')} | {r.get('max_rel_diff_vs_local', '')} |"
        )
    lines += ["", "checks: " + json.dumps(checks)]
    text = "\n".join(lines)
    print(text)
    (out / "gpu-scale.md").write_text(text + "\n")
    (out / "gpu-scale.json").write_text(
        json.dumps({"rows": rows, "checks": checks, "args": vars(args)}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
