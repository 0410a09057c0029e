"""The README's comparison table over several models, and issue 11's targets checked on it.

Reads the ``compare.json`` of finished (or partly finished) ``evop compare`` runs::

    python benchmarks/compare_table.py \\
        SmolLM2=benchmarks/results/compare-smollm2-pairs/compare/compare.json \\
        Gemma-3=benchmarks/results/compare-gemma3-pairs/compare/compare.json

A model may name several ``compare.json`` (comma-separated): the first one's rows are the
comparison; a later one adds the methods the first lacks, and its rows of a method the first has
under that method's name and the later run's folder (an earlier EvoP, say), shown but never judged
against the targets; ``PATH:m1+m2`` takes only those methods of a later one. It prints one
markdown table (best held-out value per domain and sparsity in bold), then, per model and
sparsity, whether EvoP meets the targets: its geometric mean over the held-out domains at or below
every baseline's, on no domain more than 2% above the best baseline there, and its search seconds
at or below SLEB's. EvoP's own ablations (the GA alone, no racing, ...) are not baselines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evop.eval.compare_report import geomean

ORDER = ("evop", "sleb", "ppl-oneshot", "shortgpt", "evopress", "random", "evop-sleb-budget", "evop-unraced")
BASELINES = ("sleb", "ppl-oneshot", "shortgpt", "evopress", "random")
LABEL = {"evop-sleb-budget": "evop-sleb-budget (GA alone)", "evop-unraced": "evop-unraced (no racing)"}
DOMAIN_SLACK = 1.02


def _f(x: float) -> str:
    return f"{x:,.2f}"


def table(reports: dict[str, dict]) -> list[str]:
    lines = [
        "| model, sparsity | method | removed layers | calib ppl | "
        + " | ".join(next(iter(reports.values()))["units"]["dense"]["heldout_ppl"])
        + " | geomean | evaluations | tokens forwarded | search s |",
    ]
    lines.append("|" + " --- |" * (lines[0].count("|") - 1))
    for name, report in reports.items():
        units, layers = report["units"], report["num_layers"]
        dense = units["dense"]["heldout_ppl"]
        lines.append(
            f"| {name} dense | - | - | {_f(units['dense']['calib_fitness'])} | "
            + " | ".join(_f(v) for v in dense.values())
            + f" | {_f(geomean(list(dense.values())))} | - | - | - |"
        )
        for sparsity, rows in _by_sparsity(report).items():
            best = {d: min(r["heldout_ppl"][d] for r in rows.values()) for d in dense}
            best_mean = min(_mean(r) for r in rows.values())
            for i, (method, r) in enumerate(rows.items()):
                cells = [f"**{_f(v)}**" if v == best[d] else _f(v) for d, v in r["heldout_ppl"].items()]
                mean = _mean(r)
                label = "**evop**" if method == "evop" else r.get("label") or LABEL.get(method, method)
                head = f"{name} {sparsity:.0%} ({r['k']}/{layers})" if i == 0 else ""
                evaluations = str(r["evaluations"])
                if r.get("cheap_evaluations"):
                    evaluations += f" (+{r['cheap_evaluations']} cheap)"
                removed = ",".join(map(str, r["removed_layers"]))
                lines.append(
                    f"| {head} | {label} | {removed} | {_f(r['calib_fitness'])} | "
                    + " | ".join(cells)
                    + f" | {f'**{_f(mean)}**' if mean == best_mean else _f(mean)} | {evaluations}"
                    + f" | {r['tokens_forwarded']:,} | {r['search_seconds']:,.0f} |"
                )
    return lines


def verdicts(reports: dict[str, dict]) -> list[str]:
    """Issue 11's targets, one line per model and sparsity, with the margins."""
    lines = []
    for name, report in reports.items():
        wins = []  # where EvoP is strictly better than SLEB, greedy removal being most myopic
        for sparsity, found in _by_sparsity(report).items():
            if "evop" not in found:
                continue
            evop = found["evop"]
            baselines = {m: r for m, r in found.items() if m in BASELINES}
            missing = [m for m in BASELINES if m not in baselines]
            mean = _mean(evop)
            worst_mean = max(
                ((mean / _mean(r) - 1, m) for m, r in baselines.items()),
                default=(float("nan"), "-"),
            )
            worst_domain = max(
                (
                    (v / min(r["heldout_ppl"][d] for r in baselines.values()) - 1, d)
                    for d, v in evop["heldout_ppl"].items()
                ),
                default=(float("nan"), "-"),
            )
            sleb = baselines.get("sleb")
            faster = sleb is None or evop["search_seconds"] <= sleb["search_seconds"]
            ok = worst_mean[0] <= 0 and worst_domain[0] <= DOMAIN_SLACK - 1 and faster
            verdict = "MISSES" if not ok else "so far meets" if missing else "meets"
            sleb_seconds = sleb["search_seconds"] if sleb else float("nan")
            lines.append(
                f"{name} {sparsity:.0%}: {verdict}"
                f" | geomean vs closest baseline ({worst_mean[1]}) {worst_mean[0]:+.1%}"
                f" | worst domain vs best baseline ({worst_domain[1]}) {worst_domain[0]:+.1%}"
                f" | seconds vs SLEB {evop['search_seconds']:,.0f} / {sleb_seconds:,.0f}"
                + (f" | not run: {', '.join(missing)}" if missing else "")
            )
            if sparsity >= 0.3 and sleb and mean < _mean(sleb):
                wins.append(f"{sparsity:.0%}")
        lines.append(f"{name}: strictly below SLEB's geomean at 30% or 40%: {', '.join(wins) or 'no'}")
    return lines


def _mean(row: dict) -> float:
    return geomean(list(row["heldout_ppl"].values()))


def _by_sparsity(report: dict) -> dict[float, dict[str, dict]]:
    """The judged main-table rows of a comparison, per sparsity, method -> row in :data:`ORDER`."""
    units = report["units"]
    main_rows = [u for key, u in units.items() if key.startswith("main/") and "heldout_ppl" in u]
    out = {}
    for sparsity in sorted({u["sparsity"] for u in main_rows}):
        rows = {m: units.get(f"main/{m}/{sparsity}") for m in ORDER}
        later = {k: u for k, u in units.items() if "@" in k and u.get("sparsity") == sparsity}
        rows |= {key.split("/")[1]: u for key, u in later.items()}
        out[sparsity] = {m: r for m, r in rows.items() if r and r.get("heldout_ppl")}
    return out


def merged(paths: list[str]) -> dict:
    """The first report, plus the main-table rows of the later ones: under their own key when
    the first lacks that method, else as ``method@folder`` labelled with the later run's folder."""
    report = json.loads(Path(paths[0]).read_text())
    units = report["units"]
    for item in paths[1:]:
        path, _, only = item.partition(":")
        parent = Path(path).parent
        folder = parent.parent.name if parent.name == "compare" else parent.name
        for key, unit in json.loads(Path(path).read_text())["units"].items():
            if not key.startswith("main/") or (only and key.split("/")[1] not in only.split("+")):
                continue
            if key not in units:
                units[key] = unit
            else:
                _, method, sparsity = key.split("/")
                label = f"{LABEL.get(method, method)} ({folder})"
                units.setdefault(f"main/{method}@{folder}/{sparsity}", {**unit, "label": label})
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("reports", nargs="+", metavar="NAME=COMPARE_JSON[,COMPARE_JSON...]")
    args = parser.parse_args(argv)
    reports = {}
    for item in args.reports:
        name, _, paths = item.partition("=")
        reports[name] = merged(paths.split(","))
    print("\n".join(table(reports)))
    print()
    print("\n".join(verdicts(reports)))


if __name__ == "__main__":
    main()
