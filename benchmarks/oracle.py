"""The held-out oracle: is there a pattern better than the one a search found, on the test text?

A search can only be judged against what exists. This check runs EvoP's GA and polish with the
*held-out* perplexity itself as the fitness (the geometric mean over the domains of
``evaluation.heldout``, on the first ``--windows`` windows of each), seeded with the given
patterns (those of EvoP, SLEB, ...), and its polish moves any removed layer to any kept one
(``polish_radius`` = all layers: every swap). Then the seeds and the best patterns it found are
judged on the comparison's full held-out windows. If nothing beats the seeds there, no search on
any calibration text could have done better near them: the held-out optimum is a tie.

This is a measurement, not a method: it fits the test text. No search setting may be tuned on it.

    python benchmarks/oracle.py --config configs/compare-gemma3.yaml --sparsity 0.3 \\
        --seed 6,7,8,9,16 --windows 16

Racing (the config's settings) stops hopeless candidates early, as in EvoP's search; each domain
contributes one window to every stage, so a stage's loss is a sample of all domains. Scores are
memoised in ``--out`` (resumable); the final judgements share the comparison's cache
(``<output_dir>/compare/heldout-*.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def interleaved(per_domain: list["torch.Tensor"]) -> "torch.Tensor":
    """One window of each domain after the other (d0w0, d1w0, d2w0, d0w1, ...): batches of
    ``len(per_domain)`` windows then hold every domain once. Equal windows per domain make the
    mean loss over all tokens the mean of the domains' mean losses: exp of it is the geometric
    mean of their perplexities."""
    import torch

    n = min(b.shape[0] for b in per_domain)
    return torch.stack([b[:n] for b in per_domain], dim=1).reshape(-1, per_domain[0].shape[1])


def layer_list(text: str) -> list[int]:
    """``--seed`` as layer indices, checked before minutes of model loading."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated layer indices: {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a comparison config (configs/compare-*.yaml)")
    parser.add_argument("--sparsity", type=float, required=True)
    parser.add_argument(
        "--seed", type=layer_list, action="append", required=True, help="a seed pattern, e.g. 6,7,8,9,16"
    )
    parser.add_argument("--windows", type=int, default=16, help="held-out windows per domain scored")
    parser.add_argument("--generations", type=int, default=3, help="GA generations before the polish")
    parser.add_argument("--polish-rounds", type=int, default=10)
    parser.add_argument("--confirm", type=int, default=3, help="best oracle patterns judged in full")
    parser.add_argument("--out", help="default: <output_dir>/oracle")
    parser.add_argument("overrides", nargs="*", help="config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from evop.config import load_config
    from evop.eval.compare_judge import Judge
    from evop.eval.compare_report import geomean
    from evop.eval.perplexity import text_blocks
    from evop.method.epps import Seeding, build_search
    from evop.method.fitness import PatternScorer
    from evop.method.patterns import Pattern, layers_to_remove
    from evop.method.scoring import ScoreMemo
    from evop.models.layers import num_layers
    from evop.models.loading import load_model
    from evop.records import write_json_atomic

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or Path(cfg.output_dir) / "oracle")
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(cfg.model)
    layers = num_layers(model)
    k = layers_to_remove(layers, args.sparsity)
    seeds = [Pattern.of(layers, seed) for seed in args.seed]
    if any(p.k != k for p in seeds):
        raise SystemExit(f"every --seed must remove {k} layers (sparsity {args.sparsity} of {layers})")

    e = cfg.evaluation
    per_domain = [text_blocks(source, tokenizer, e.block_len, args.windows) for source in e.heldout]
    blocks = interleaved(per_domain)
    scorer = PatternScorer(
        model, blocks, "ppl", batch_size=len(per_domain), prefix_cache_mb=cfg.fitness.prefix_cache_mb
    )
    memo_path = out / f"memo-{args.sparsity}-w{args.windows}.json"
    saved = json.loads(memo_path.read_text()) if memo_path.is_file() else None
    memo = ScoreMemo(lambda data: write_json_atomic(memo_path, data), saved, every=60.0)
    fitness = memo.fitness(scorer)
    settings = cfg.search.model_copy(
        update={
            "method": "evop",
            "generations": args.generations,
            "patience": args.generations,
            "polish_rounds": args.polish_rounds,
            "polish_radius": layers,  # every swap of a removed layer with a kept one
            "initial_patterns": [],
            "mutation_prior": "none",
            "validation_blocks": 0,
        }
    )
    seeding = Seeding(patterns=[str(p) for p in seeds], block_influence=None, evaluations=0, seconds=0.0)
    state = build_search(settings, layers, k, fitness, seeding).run()
    memo.flush()

    # The oracle's best fully scored patterns, then the full judgement of them and the seeds.
    stages = len(scorer.stage_tokens)
    scored = {
        p: f
        for p, f in state.memo.items()
        if math.isfinite(f) and len(state.stage_sums.get(p, [0] * stages)) == stages  # not raced out
    }
    best = sorted(scored, key=lambda p: (scored[p], p))[: args.confirm]
    # The comparison's judgements (same model and windows): its patterns are not judged again.
    judged = Path(cfg.output_dir) / "compare"
    judged.mkdir(parents=True, exist_ok=True)
    judge = Judge(cfg, model, tokenizer, judged, lm_eval=False)
    rows = []
    for pattern in dict.fromkeys([*(str(p) for p in seeds), *best]):
        domains = judge.heldout(Pattern.parse(pattern))
        rows.append(
            {
                "pattern": pattern,
                "seed": pattern in {str(p) for p in seeds},
                "oracle_ppl": scored.get(pattern),
                "heldout_ppl": domains,
                "heldout_geomean": geomean(list(domains.values())),
            }
        )
    report = {
        "config": args.config,
        "sparsity": args.sparsity,
        "k": k,
        "windows_per_domain": args.windows,
        "evaluations": fitness.evaluations,
        "tokens_forwarded": fitness.tokens,
        "rows": rows,
    }
    write_json_atomic(out / f"oracle-{args.sparsity}.json", report)
    domains = list(rows[0]["heldout_ppl"])
    print(f"| pattern | seed | oracle ppl ({args.windows} windows) | {' | '.join(domains)} | geomean |")
    print("|---" * (4 + len(domains)) + "|")
    for r in rows:
        oracle = "-" if r["oracle_ppl"] is None else f"{r['oracle_ppl']:.2f}"
        cells = " | ".join(f"{r['heldout_ppl'][d]:.2f}" for d in domains)
        seed = "yes" if r["seed"] else ""
        print(f"| {r['pattern']} | {seed} | {oracle} | {cells} | {r['heldout_geomean']:.2f} |")
    print(f"{fitness.evaluations} evaluations, {fitness.tokens:,} tokens forwarded -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
