"""EvoP search settings side by side in one run: same model, machine and load, one table.

Each ``--variant`` is a name and config overrides on top of ``--config`` (and the shared
overrides). Every variant's whole EvoP search runs through the library pipeline (its own
checkpoint store under ``<out>/<name>``, so a re-run resumes), then the table compares the final
pattern, its calibration fitness, evaluations, tokens forwarded, search seconds and held-out
perplexity of the final pattern on each ``evaluation.heldout`` source (judged once per pattern,
kept in ``--judged``: a comparison's folder shares its judgements). Token and seconds ratios
are against the first variant. Examples::

    # racing against full scoring on the demo's calibration set
    python benchmarks/settings.py --config configs/demo.yaml \\
        --variant "full: search.racing_ratio=null search.racing_confidence=null" \\
        --variant "racing:"

    # the demo before (1,024 calibration tokens, every candidate in full) and now
    python benchmarks/settings.py --config configs/demo.yaml \\
        --variant "before: calibration.n_samples=8 fitness.batch_size=8 \\
                   search.racing_ratio=null search.racing_confidence=null" \\
        --variant "now:"

Seeds are overrides too (``search.seed=1 calibration.seed=1``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from pathlib import Path


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"name: key=value key=value"`` -> ``(name, [overrides])``."""
    name, _, rest = text.partition(":")
    if not name.strip():
        raise SystemExit(f"--variant {text!r}: expected 'name: key=value ...'")
    return name.strip(), rest.split()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--variant", action="append", required=True, help="'name: key=value ...'")
    parser.add_argument("--out", default="runs/settings")
    parser.add_argument("--heldout", nargs="*", help="held-out sources (default: evaluation.heldout)")
    parser.add_argument(
        "--seeds",
        default="",
        help="comma-separated seeds: run every variant with search.seed = calibration.seed = each "
        "(a row per run plus a mean +- sd row per variant); empty: the config's seeds",
    )
    parser.add_argument(
        "--judged",
        help="folder of held-out judgements to read and extend (default: --out); a comparison's "
        "folder (<output_dir>/compare of a compare config) shares its judgements",
    )
    parser.add_argument("overrides", nargs="*", help="overrides shared by every variant")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from evop.config import load_config
    from evop.eval.compare_judge import Judge
    from evop.eval.compare_report import geomean
    from evop.eval.compare_spec import domain_name
    from evop.method.patterns import Pattern
    from evop.pipeline.cache import cached_model
    from evop.pipeline.local import run_search

    seeds = [int(x) for x in args.seeds.split(",") if x.strip()] or [None]
    rows = []
    for text in args.variant:
        name, extra = parse_variant(text)
        for seed in seeds:
            label = name if seed is None else f"{name} seed {seed}"
            seeded = [] if seed is None else [f"search.seed={seed}", f"calibration.seed={seed}"]
            where = Path(args.out) / (name if seed is None else f"{name}-seed{seed}")
            cfg = load_config(args.config, [*args.overrides, *extra, *seeded, f"output_dir={where}"])
            result = run_search(cfg)
            rows.append({"variant": name, "label": label, "overrides": extra + seeded, "result": result})
    rows = merged(Path(args.out) / "settings.json", rows)
    model, tokenizer = cached_model(cfg)
    if args.heldout:
        cfg = cfg.model_copy(
            update={"evaluation": cfg.evaluation.model_copy(update={"heldout": args.heldout})}
        )
    # Judgements are memoised per pattern (most variants end at the same few) and persisted.
    judged = Path(args.judged or args.out)
    judged.mkdir(parents=True, exist_ok=True)
    judge = Judge(cfg, model, tokenizer, judged, lm_eval=False)
    domains = [domain_name(source) for source in cfg.evaluation.heldout]
    lines = [
        "| variant | removed layers | calib fitness | "
        + " | ".join(f"{d} ppl" for d in domains)
        + " | geomean | evaluations | tokens forwarded | search s |",
        "| --- " * (7 + len(domains)) + "|",
    ]
    first = rows[0]["result"]
    for row in rows:
        r = row["result"]
        pattern = Pattern.parse(r["pattern"])
        scores = judge.heldout(pattern)
        row["heldout"] = {d: math.inf if scores[d] is None else scores[d] for d in domains}
        row["geomean"] = geomean(list(row["heldout"].values()))
        tokens = r["tokens_forwarded"]
        token_ratio = first["tokens_forwarded"] / tokens if tokens else float("nan")
        time_ratio = r["wall_time_s"] / first["wall_time_s"]
        lines.append(
            f"| {row['label']} | {','.join(map(str, r['removed_layers']))} | {r['fitness']:.4g} | "
            + " | ".join(f"{v:.4g}" for v in row["heldout"].values())
            + f" | {row['geomean']:.4g} | {r['evaluations']} | {tokens:,} ({token_ratio:.2f}x fewer) "
            f"| {r['wall_time_s']:.0f} ({time_ratio:.2f}x) |"
        )
    seeds_run = sorted(
        {int(o.partition("=")[2]) for row in rows for o in row["overrides"] if o.startswith("search.seed=")}
    )
    if len(seeds_run) > 1:
        lines += ["", f"Mean +- sd over seeds {','.join(map(str, seeds_run))}:", "", *lines[:2]]
        for name in dict.fromkeys(row["variant"] for row in rows):
            group = [row for row in rows if row["variant"] == name]
            patterns = sorted({",".join(map(str, row["result"]["removed_layers"])) for row in group})
            lines.append(
                f"| {name} | {len(patterns)} distinct: {'; '.join(patterns)} | "
                + _spread([row["result"]["fitness"] for row in group])
                + " | "
                + " | ".join(_spread([row["heldout"][d] for row in group]) for d in domains)
                + f" | {_spread([row['geomean'] for row in group])} | "
                + _spread([row["result"]["evaluations"] for row in group], 0)
                + f" | {_spread([row['result']['tokens_forwarded'] for row in group], 0)} | "
                + _spread([row["result"]["wall_time_s"] for row in group], 0)
                + " |"
            )
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.md").write_text("\n".join(lines) + "\n")
    (out / "settings.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return 0


def merged(table: Path, rows: list[dict]) -> list[dict]:
    """The rows of an earlier call into the same folder, updated by this call's (matched by label).

    So several calls into one ``--out`` (say, two variants now and two more later) build one table
    instead of the last call overwriting the others'. Earlier rows keep their place; new ones follow.
    """
    if not table.exists():
        return rows
    fresh = {row["label"]: row for row in rows}
    earlier = [fresh.pop(row["label"], row) for row in json.loads(table.read_text())]
    return earlier + list(fresh.values())


def _spread(values: list[float], digits: int = 4) -> str:
    """``mean +- sd`` of the values (sd over runs, n - 1)."""
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    if digits == 0:
        return f"{mean:,.0f} +- {sd:,.0f}"
    return f"{mean:.{digits}g} +- {sd:.2g}"


if __name__ == "__main__":
    sys.exit(main())
