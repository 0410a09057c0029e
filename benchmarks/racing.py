"""Racing against full scoring, side by side in one run: same model, calibration set and seed.

For each setting (full scoring, then each racing ratio) the whole EvoP search runs through the
library pipeline (its own checkpoint store), and the table compares the final pattern, its
calibration fitness, evaluations, tokens forwarded and seconds, plus held-out perplexity of the
final pattern on each ``evaluation.heldout`` source::

    python benchmarks/racing.py --config configs/demo.yaml --ratios 1.5,2 \\
        calibration.n_samples=32 fitness.batch_size=4        # 4,096 calibration tokens, 8 stages

Re-running resumes each search from its checkpoints under ``<out>/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--ratios", default="1.5,2", help="comma-separated racing ratios")
    parser.add_argument("--min-stages", type=int, default=1)
    parser.add_argument("--out", default="runs/racing")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from evop.config import load_config
    from evop.eval.perplexity import text_blocks
    from evop.method.fitness import PatternScorer
    from evop.method.patterns import Pattern
    from evop.pipeline.cache import cached_model
    from evop.pipeline.local import run_search

    rows = []
    settings = [None, *[float(r) for r in args.ratios.split(",") if r.strip()]]
    for ratio in settings:
        name = "full" if ratio is None else f"racing-{ratio:g}"
        overrides = [*args.overrides, f"output_dir={Path(args.out) / name}"]
        if ratio is not None:
            overrides += [f"search.racing_ratio={ratio}", f"search.racing_min_stages={args.min_stages}"]
        cfg = load_config(args.config, overrides)
        start = time.perf_counter()
        result = run_search(cfg)
        rows.append({"setting": name, "result": result, "seconds": time.perf_counter() - start})
    model, tokenizer = cached_model(cfg)
    e = cfg.evaluation
    heldout = {
        source.removeprefix("evop-assets:"): PatternScorer(
            model, text_blocks(source, tokenizer, e.block_len, e.max_blocks), batch_size=e.batch_size
        )
        for source in e.heldout
    }
    lines = [
        "| setting | removed layers | calib fitness | "
        + " | ".join(f"{d} ppl" for d in heldout)
        + " | evaluations | tokens forwarded | search s |",
        "| --- " * (6 + len(heldout)) + "|",
    ]
    full_tokens = rows[0]["result"]["tokens_forwarded"]
    for row in rows:
        r = row["result"]
        pattern = Pattern.parse(r["pattern"])
        row["heldout"] = {d: scorer(pattern) for d, scorer in heldout.items()}
        ratio = full_tokens / r["tokens_forwarded"] if r["tokens_forwarded"] else float("nan")
        lines.append(
            f"| {row['setting']} | {','.join(map(str, r['removed_layers']))} | {r['fitness']:.4g} | "
            + " | ".join(f"{v:.4g}" for v in row["heldout"].values())
            + f" | {r['evaluations']} | {r['tokens_forwarded']:,} ({ratio:.2f}x fewer) "
            f"| {r['wall_time_s']:.0f} |"
        )
    print("\n".join(lines))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "racing.md").write_text("\n".join(lines) + "\n")
    (Path(args.out) / "racing.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
