"""Fitness throughput of the local scorer and of Ray pools side by side, plus a cost model.

One run scores the same random patterns (every stage, no racing: the cost of a full candidate)
with each scorer in turn, for ``--rounds`` interleaved rounds, so every scorer meets the same load:

- ``local``: :class:`~evop.method.fitness.PatternScorer` in this process, ``--local-threads`` torch
  threads;
- ``ray-N``: a :class:`~evop.method.parallel.RayPool` of N actors with ``--threads`` each, the
  patterns sent as one step (:meth:`~evop.method.parallel.ParallelScorer.race_many`).

It prints patterns per minute, tokens per second, the ratio to ``local`` (median over rounds, with
the min-max range) and each pool's start-up seconds (model load in every actor, paid once per
search). Then the cost model: how long an EvoP search would take for a ``--params`` model on
``--gpus`` GPUs (its assumptions printed with it, each a flag). Example::

    python benchmarks/scale.py --config configs/demo.yaml --workers 1,2 --out runs/bench-scale
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--workers", default="1,2", help="comma-separated pool sizes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per Ray actor")
    parser.add_argument("--local-threads", type=int, default=2, help="torch threads of the local scorer")
    parser.add_argument("--patterns", type=int, default=12, help="patterns scored per round")
    parser.add_argument("--blocks", type=int, default=16, help="calibration blocks per pattern")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="runs/bench-scale")
    # The cost model.
    parser.add_argument("--params", type=float, default=8e9, help="parameters of the model to prune")
    parser.add_argument("--gpus", default="1,2,4,8", help="GPU counts of the cost model")
    parser.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM)")
    parser.add_argument("--mfu", type=float, default=0.35, help="fraction of that peak a forward reaches")
    parser.add_argument("--calibration-tokens", type=int, default=128 * 1024, help="of the 8B search")
    parser.add_argument("--evaluations", type=int, default=124, help="patterns a search scores")
    parser.add_argument(
        "--raced-fraction",
        type=float,
        default=0.11,
        help="share of the calibration tokens a raced candidate forwards on average (the demo: "
        "112,128 tokens for 124 patterns on 8,192 tokens)",
    )
    parser.add_argument(
        "--gpu-efficiency",
        type=float,
        default=0.9,
        help="throughput of N GPU actors / (N x one): each actor has its own GPU, so only the "
        "driver's bookkeeping and the step's stragglers are shared",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import random

    import torch

    from evop.config import load_config
    from evop.method.fitness import PatternScorer
    from evop.method.operators import sample_patterns
    from evop.method.parallel import ParallelScorer, RayPool
    from evop.method.patterns import layers_to_remove, removable_layers
    from evop.models.layers import num_layers
    from evop.models.loading import load_model

    cfg = load_config(args.config)
    torch.set_num_threads(args.local_threads)
    model, tokenizer = load_model(cfg.model)
    n = num_layers(model)
    k = layers_to_remove(n, cfg.search.sparsity, cfg.search.num_remove)
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, len(tokenizer), (args.blocks, cfg.calibration.block_len), generator=gen)
    local = PatternScorer.from_config(model, blocks, cfg.fitness)
    candidates = removable_layers(n, cfg.search.protected_layers, k)
    patterns = sample_patterns(random.Random(0), n, candidates, k, args.patterns * args.rounds)
    tokens_per_pattern = sum(local.stage_tokens)

    import os

    import ray

    sizes = [int(x) for x in args.workers.split(",") if x]
    # The pools live side by side (interleaved rounds): logical CPUs for all their actors.
    ray.init(num_cpus=max(os.cpu_count() or 1, sum(sizes) * args.threads), include_dashboard=False)
    scorers: dict[str, tuple[int, int, object]] = {"local": (1, args.local_threads, local)}
    startup: dict[str, float] = {}
    for w in sizes:
        update = {"backend": "ray", "workers": w, "threads_per_worker": args.threads}
        scale = cfg.scale.model_copy(update=update)
        began = time.perf_counter()
        pool = RayPool(scale, cfg.model, blocks, cfg.fitness)
        pool.pids()  # every actor has loaded the model
        startup[f"ray-{w}"] = time.perf_counter() - began
        scorers[f"ray-{w}"] = (w, args.threads, ParallelScorer(local, pool))

    seconds: dict[str, list[float]] = {name: [] for name in scorers}
    for r in range(args.rounds):
        batch = patterns[r * args.patterns : (r + 1) * args.patterns]
        for name, (_, _, scorer) in scorers.items():
            began = time.perf_counter()
            if name == "local":
                for p in batch:
                    local(p)
            else:
                scorer.race_many({str(p): [] for p in batch}, None)  # type: ignore[attr-defined]
            seconds[name].append(time.perf_counter() - began)
            print(f"round {r + 1}: {name} {seconds[name][-1]:.1f} s", flush=True)

    rows = []
    for name, (workers, threads, _) in scorers.items():
        per_round = seconds[name]
        ratios = [a / b for a, b in zip(seconds["local"], per_round, strict=True)]
        median = statistics.median(per_round)
        rows.append(
            {
                "scorer": name,
                "workers": workers,
                "threads_each": threads,
                "patterns_per_min": round(60 * args.patterns / median, 1),
                "tokens_per_s": round(args.patterns * tokens_per_pattern / median),
                "speedup_vs_local": round(statistics.median(ratios), 2),
                "speedup_range": [round(min(ratios), 2), round(max(ratios), 2)],
                "startup_s": round(startup.get(name, 0.0), 1),
            }
        )
    lines = [
        f"Fitness throughput, {cfg.model.name_or_path} ({n} layers, k={k}), {args.blocks} x "
        f"{cfg.calibration.block_len} tokens per pattern, {args.patterns} patterns x {args.rounds} "
        "interleaved rounds",
        "",
        "| scorer | workers | threads each | patterns/min | tokens/s | vs local (median, range) "
        "| start-up s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lo, hi = row["speedup_range"]
        lines.append(
            f"| {row['scorer']} | {row['workers']} | {row['threads_each']} | {row['patterns_per_min']} | "
            f"{row['tokens_per_s']:,} | {row['speedup_vs_local']}x ({lo}-{hi}) | {row['startup_s']} |"
        )

    # Cost model: a forward costs about 2 x params FLOPs per token. The pruned layers and the
    # dense prefix cache (a candidate's forward starts at its first removed layer) save about
    # a third to a half of that, which the model ignores: its minutes are an upper bound.
    pools = sorted((r for r in rows if r["scorer"] != "local"), key=lambda r: r["workers"])
    cpu_efficiency = None
    if len(pools) > 1:
        one, top = pools[0], pools[-1]
        cpu_efficiency = (top["tokens_per_s"] / one["tokens_per_s"]) / (top["workers"] / one["workers"])
    per_gpu = args.gpu_tflops * 1e12 * args.mfu / (2 * args.params)  # tokens per second per GPU
    search_tokens = args.evaluations * args.calibration_tokens * args.raced_fraction
    lines += [
        "",
        f"Cost model (assumptions): a {args.params / 1e9:g}B model; a search scores {args.evaluations} "
        f"patterns on {args.calibration_tokens:,} calibration tokens, forwarding {args.raced_fraction:.0%} "
        f"of them on average (racing) = {search_tokens:,.0f} tokens; 2 x params FLOPs per token at "
        f"{args.mfu:.0%} of {args.gpu_tflops:g} TFLOP/s = {per_gpu:,.0f} tokens/s per GPU; N GPU actors "
        f"give {args.gpu_efficiency:.0%} of N x one. Measured here: N CPU actors gave "
        + ("(one pool only)" if cpu_efficiency is None else f"{cpu_efficiency:.0%} of N x one")
        + " (they share the memory bandwidth of one socket; GPUs do not).",
        "",
        "| GPUs | tokens/s | search minutes (upper bound) |",
        "|---|---|---|",
    ]
    model_rows = []
    for g in (int(x) for x in args.gpus.split(",") if x):
        rate = per_gpu * (1 if g == 1 else g * args.gpu_efficiency)
        minutes = search_tokens / rate / 60
        model_rows.append({"gpus": g, "tokens_per_s": round(rate), "search_minutes": round(minutes, 2)})
        lines.append(f"| {g} | {rate:,.0f} | {minutes:.2f} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.md").write_text(text + "\n")
    (out / "scale.json").write_text(
        json.dumps({"rows": rows, "seconds": seconds, "cost_model": model_rows, "args": vars(args)}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
