"""Measured inference speed-up of a depth-pruned model over its dense base, as a markdown table.

The pruned model is either a checkpoint directory (``--pruned``) or made here from the dense one
by a pattern (``--pattern``, the one-line form ``"4,5,6,16,17,18/30"``). Both run on identical
prompts, alternating run by run; see :mod:`evop.speed` for exactly what is timed.

Examples::

    python benchmarks/speed.py evop-assets:smollm2 --pruned runs/demo/pruned-model
    python benchmarks/speed.py evop-assets:smollm2 --pattern 4,5,6,16,17,18/30 --runs 5
    python benchmarks/speed.py meta-llama/Llama-3.1-8B --pattern 20,22,24,25,26,27,28,29/32 \\
        --device cuda --dtype bfloat16 --prompt-len 512 --new-tokens 128 --batch-size 8 --json speed.json

``evop bench PRUNED_DIR --base DENSE`` is the same measurement for a saved checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="dense model: hub id, directory or evop-assets:<name>")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--pruned", help="pruned checkpoint directory (or hub id)")
    which.add_argument("--pattern", help="removed layers, e.g. '4,5,6/30': prune a copy of the dense model")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy decode steps with the KV cache")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--json", help="also write the full report as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from evop.config import ModelConfig
    from evop.eval.speed import add_checkpoint_sizes, compare_speed, format_speed_table
    from evop.method.patterns import Pattern
    from evop.models.loading import load_model
    from evop.models.pruning import prune_layers

    def load(ref: str):
        return load_model(ModelConfig(name_or_path=ref, device=args.device, dtype=args.dtype))

    dense, tokenizer = load(args.model)
    if args.pattern:
        pruned = prune_layers(copy.deepcopy(dense), Pattern.parse(args.pattern), base_model=args.model)
    else:
        pruned, _ = load(args.pruned)
    report = compare_speed(
        dense,
        pruned,
        tokenizer,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        warmup=args.warmup,
        runs=args.runs,
    )
    add_checkpoint_sizes(report, args.model, args.pruned)
    report["pattern"] = args.pattern
    print(format_speed_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
