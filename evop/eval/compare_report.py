"""The comparison's tables as markdown: what ``compare.md`` holds and ``evop compare`` prints.

:func:`render_markdown` reads the report of :meth:`evop.eval.compare.Comparison.report` (the shape
of ``compare.json``): methods x sparsities with calibration fitness and held-out perplexity, then,
where they were run, the ablations (CCDS vs random sampling, EvoP's GA vs SLEB's greedy search)
and the search quality against the exhaustive optimum. A diverged value reads "diverged".
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from evop.eval.compare_spec import AT_SLEB_BUDGET, UNPOLISHED, UNRACED, UNSEEDED, domain_name
from evop.records import format_number


def _f(x: float | None, digits: int = 4) -> str:
    return format_number(x, digits, missing="diverged")


def geomean(values: list[float | None]) -> float | None:
    """Geometric mean of held-out perplexities over domains (None if any diverged or is missing):
    one number per method that no single domain dominates."""
    if not values or any(v is None for v in values):
        return None
    return math.exp(math.fsum(math.log(v) for v in values) / len(values))  # type: ignore[arg-type]


def _tokens(r: dict[str, Any]) -> str:
    """Tokens forwarded, in thousands ('-' where the method did not count them)."""
    t = r.get("tokens_forwarded")
    return "-" if t is None else f"{t / 1000:,.0f}k"


def render_markdown(report: dict[str, Any]) -> str:
    """The comparison's tables as markdown (what ``compare.md`` holds and ``evop compare`` prints)."""
    units = report["units"]
    domains = report["heldout"]["sources"]
    names = [domain_name(s) for s in domains]
    metric = report["fitness_metric"]
    L = report["num_layers"]
    lines = [f"# Layer-pruning search methods on {report['model']} ({L} layers)", ""]
    calib = report["calibration"]
    main = next((v for k, v in calib.items() if isinstance(v, dict)), None)
    if main:
        lines.append(
            f"Calibration: {main['method']}, {main['n_samples']} x {main['block_len']} tokens of "
            f"{calib.get('dataset')}; fitness: calibration {metric}. Held-out: "
            + ", ".join(
                f"{n} ({report['heldout']['max_blocks']} x {report['heldout']['block_len']} tokens)"
                for n in names
            )
            + ". Geomean: geometric mean of the held-out perplexities. Tokens and search s: tokens "
            "forwarded and scoring time each method would spend alone."
            " Best held-out value per sparsity in bold."
        )
        lines.append("")
    header = f"| sparsity | method | removed layers | calib {metric} | " + " | ".join(
        f"{n} ppl" for n in names
    )
    lines += [header + " | geomean | evaluations | tokens | search s |", "|" + " --- |" * (9 + len(names))]
    dense = units.get("dense")
    if dense:
        lines.append(
            f"| 0 | dense | - | {_f(dense['calib_fitness'])} | "
            + " | ".join(_f(dense["heldout_ppl"].get(n)) for n in names)
            + f" | {_f(geomean([dense['heldout_ppl'].get(n) for n in names]))} | - | - | - |"
        )
    for sparsity in report["spec"]["sparsities"]:
        rows = [v for key, v in units.items() if key.startswith("main/") and v.get("sparsity") == sparsity]
        best = {
            n: min(
                (r["heldout_ppl"][n] for r in rows if "heldout_ppl" in r and r["heldout_ppl"][n] is not None),
                default=None,
            )
            for n in names
        }
        means = {id(r): geomean([r["heldout_ppl"][n] for n in names]) for r in rows if "heldout_ppl" in r}
        best_mean = min((v for v in means.values() if v is not None), default=None)
        for r in rows:
            head = f"| {sparsity:.0%} ({r['k']}/{L}) | {r['method']} |"
            if "skipped" in r:
                lines.append(f"{head} refused: {r['skipped']} |" + " |" * (6 + len(names)))
                continue
            mean = means[id(r)]
            mean_cell = f"**{_f(mean)}**" if mean is not None and mean == best_mean else _f(mean)
            cells = []
            for n in names:
                v = r["heldout_ppl"][n]
                cells.append(f"**{_f(v)}**" if v is not None and v == best[n] else _f(v))
            evals = str(r["evaluations"]) + (
                f" (+{r['cheap_evaluations']} cheap)" if r["cheap_evaluations"] else ""
            )
            if r["method"] == "shortgpt":
                evals += " (+1 forward)"
            lines.append(
                f"{head} {','.join(map(str, r['removed_layers']))} | {_f(r['calib_fitness'])} | "
                + " | ".join(cells)
                + f" | {mean_cell} | {evals} | {_tokens(r)} | {r['search_seconds']:.0f} |"
            )
    if any(r.get("anytime") for key, r in units.items() if key.startswith("main/")):
        lines += [
            "",
            "Anytime curves (held-out geomean of each method's best pattern so far against its search "
            "seconds): `anytime.png`.",
        ]
    lines += _ablation_markdown(report, names, metric) + _greedy_markdown(report, names, metric)
    lines += _optimum_markdown(report)
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return _f(values[0])
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def _ablation_markdown(report: dict[str, Any], names: list[str], metric: str) -> list[str]:
    rows = [v for k, v in report["units"].items() if k.startswith("ablation/")]
    if not rows:
        return []
    spec = report["spec"]
    sparsity = spec["ablation_sparsity"] or spec["sparsities"][0]
    lines = [
        "",
        f"## Ablation: CCDS vs random calibration sampling (EvoP at {sparsity:.0%}, seeds "
        f"{', '.join(map(str, spec['ablation_seeds']))})",
        "",
        "The calibration ppl is on each run's own calibration set, so only the held-out columns compare.",
        "",
        "| sampler | seed | removed layers | own calib "
        + metric
        + " | "
        + " | ".join(f"{n} ppl" for n in names)
        + " |",
        "|" + " --- |" * (4 + len(names)),
    ]
    for r in sorted(rows, key=lambda r: (r["sampler"], r["seed"])):
        lines.append(
            f"| {r['sampler']} | {r['seed']} | {','.join(map(str, r['removed_layers']))} | "
            f"{_f(r['calib_fitness'])} | " + " | ".join(_f(r["heldout_ppl"][n]) for n in names) + " |"
        )
    for sampler in ("ccds", "random"):
        mine = [r for r in rows if r["sampler"] == sampler]
        cells = [
            _mean_std([r["heldout_ppl"][n] for r in mine if r["heldout_ppl"][n] is not None]) for n in names
        ]
        lines.append(f"| **{sampler} mean ± std** | {len(mine)} seeds | | | " + " | ".join(cells) + " |")
    return lines


def _greedy_markdown(report: dict[str, Any], names: list[str], metric: str) -> list[str]:
    units = report["units"]
    pairs = [
        (s, units.get(f"main/evop/{s}"), units.get(f"main/sleb/{s}")) for s in report["spec"]["sparsities"]
    ]
    pairs = [(s, a, b) for s, a, b in pairs if a and b and "skipped" not in a and "skipped" not in b]
    if not pairs:
        return []
    lines = [
        "",
        "## Ablation: EvoP's GA vs SLEB's greedy search (same fitness, same calibration set)",
        "",
        f"| sparsity | search | calib {metric} | "
        + " | ".join(f"{n} ppl" for n in names)
        + " | evaluations | tokens | search s |",
        "|" + " --- |" * (6 + len(names)),
    ]
    for s, ga, greedy in pairs:
        searches = [("EvoP: GA + polish", ga)]
        for name, label in (
            (UNPOLISHED, "GA alone (no polish)"),
            (UNSEEDED, "GA + polish, random initial population"),
            (UNRACED, "GA + polish, every candidate scored in full (no racing)"),
            (AT_SLEB_BUDGET, "GA alone (no polish), SLEB's budget"),
        ):
            extra = units.get(f"main/{name}/{s}")
            if extra and "skipped" not in extra:
                searches.append((label, extra))
        searches.append(("greedy (sleb)", greedy))
        for label, r in searches:
            lines.append(
                f"| {s:.0%} | {label} | {_f(r['calib_fitness'])} | "
                + " | ".join(_f(r["heldout_ppl"][n]) for n in names)
                + f" | {r['evaluations']} | {_tokens(r)} | {r['search_seconds']:.0f} |"
            )
    return lines


def _optimum_markdown(report: dict[str, Any]) -> list[str]:
    units = report["units"]
    spec = report["spec"]
    k = spec["optimum_k"]
    best = units.get(f"optimum/exhaustive/{k}")
    if not best:
        return []
    if "skipped" in best:
        return ["", f"## Search quality against the optimum: skipped ({best['skipped']})"]
    space = best["evaluations"]
    optimum = best["calib_fitness"]
    lines = [
        "",
        f"## Search quality against the optimum (k={k} of {report['num_layers']} layers)",
        "",
        f"Exhaustive search scored all {space} patterns: optimum {best['pattern']} with calibration "
        f"fitness {_f(optimum, 6)}.",
        "",
        "| method | runs | found the optimum | mean evaluations | share of the space "
        "| evaluations until found (mean) | mean fitness above optimum |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def found(r: dict[str, Any]) -> bool:
        return (
            r["calib_fitness"] is not None
            and optimum is not None
            and r["calib_fitness"] <= optimum * (1 + 1e-9)
        )

    def gap(rs: list[dict[str, Any]]) -> str:
        gaps = [
            (r["calib_fitness"] / optimum - 1) * 100 for r in rs if r["calib_fitness"] is not None and optimum
        ]
        return f"{statistics.mean(gaps):+.2f}%" if gaps else "-"

    def until_found(rs: list[dict[str, Any]]) -> str:
        hits = [r.get("evaluations_to_best", r["evaluations"]) for r in rs if found(r)]
        return f"{statistics.mean(hits):.0f} ({statistics.mean(hits) / space:.0%})" if hits else "-"

    for method in ("evop", "random"):
        rs = [
            units[f"optimum/{method}/{s}"] for s in spec["optimum_seeds"] if f"optimum/{method}/{s}" in units
        ]
        if rs:
            evals = statistics.mean(r["evaluations"] for r in rs)
            label = "evop (GA + polish)" if method == "evop" else "random, same budget"
            lines.append(
                f"| {label} | {len(rs)} seeds | {sum(map(found, rs))}/{len(rs)} | {evals:.0f} | "
                f"{evals / space:.0%} | {until_found(rs)} | {gap(rs)} |"
            )
    for method in ("sleb", "ppl-oneshot", "shortgpt"):
        r = units.get(f"optimum/{method}")
        if r:
            lines.append(
                f"| {method} | 1 | {'yes' if found(r) else 'no'} | {r['evaluations']} | "
                f"{r['evaluations'] / space:.0%} | {until_found([r])} | {gap([r])} |"
            )
    return lines
