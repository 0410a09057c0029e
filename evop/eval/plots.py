"""Figures of a finished search (the fitness curve, how often each layer is removed) and of a
comparison (the anytime curves of its methods).

matplotlib is imported inside each function with the non-interactive Agg backend, so importing
this module costs nothing and plotting works on machines without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evop.method.patterns import Pattern
from evop.records import finite_or_none


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fitness_curve(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Plot best and mean fitness per generation (log y axis) to a PNG.

    Fitness values of a pruning search span orders of magnitude (a dense perplexity of 20 next to
    diverged candidates in the thousands), hence the log scale. Generations whose value is
    ``None``, ``inf``, NaN or not positive are skipped for that curve.

    Args:
        history: ``result["history"]``: dicts with ``generation``, ``best_fitness``, ``mean_fitness``.
        path: Where to write the PNG.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        for key, label, style in (("best_fitness", "best", "o-"), ("mean_fitness", "mean", "s--")):
            points = [(h["generation"], finite_or_none(h.get(key))) for h in history]
            points = [(g, v) for g, v in points if v is not None and v > 0]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, label=label, markersize=3)
        ax.set_yscale("log")
        ax.set_xlabel("generation")
        ax.set_ylabel("fitness (lower is better)")
        ax.set_title("EPPS fitness per generation")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def layer_removal_frequency(population: Sequence[str], num_layers: int, path: str | Path) -> Path:
    """Bar chart of how often each layer is removed in the final population, to a PNG.

    Every layer ``0..num_layers-1`` gets a bar, so protected (never removed) layers show as zero.

    Args:
        population: Pattern strings, e.g. ``["4,5,16/30", ...]`` (``SearchState.population``).
        num_layers: Decoder layers of the dense model.
        path: Where to write the PNG.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    plt = _pyplot()
    path = Path(path)
    counts = [0] * num_layers
    for text in population:
        for layer in Pattern.parse(text).removed:
            counts[layer] += 1
    share = [c / len(population) for c in counts] if population else counts
    fig, ax = plt.subplots(figsize=(max(6, num_layers * 0.25), 4))
    try:
        ax.bar(range(num_layers), share, color="tab:red")
        ax.set_xlim(-0.5, num_layers - 0.5)
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction of final population removing it")
        ax.set_title(f"Layer removal frequency ({len(population)} patterns)")
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def anytime_plot(report: dict[str, Any], path: str | Path) -> Path | None:
    """The anytime curves of a comparison (``compare.json``): for each sparsity, the held-out
    perplexity (geometric mean over the domains) of each method's best pattern so far against
    its search seconds, so a user sees when EvoP reaches SLEB's quality. One-shot methods are
    single points. Nothing is written (None) before a main-table row has a curve.
    """
    rows = [r for key, r in report["units"].items() if key.startswith("main/") and r.get("anytime")]
    if not rows:
        return None
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    path = Path(path)
    sparsities = sorted({r["sparsity"] for r in rows})
    # One colour per method in every panel: panels can hold different methods.
    methods = list(dict.fromkeys(r["method"] for r in rows))
    palette = plt.get_cmap("tab10").colors
    colour = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(sparsities), figsize=(5 * len(sparsities), 4), squeeze=False)
    try:
        for ax, sparsity in zip(axes[0], sparsities, strict=True):
            finals = []
            for r in (r for r in rows if r["sparsity"] == sparsity):
                points = [(p["seconds"], p["heldout_geomean"]) for p in r["anytime"]]
                points = [(max(t, 0.1), v) for t, v in points if v is not None]
                if not points:
                    continue
                xs, ys = zip(*points, strict=True)
                end = max(r.get("search_seconds") or 0.0, xs[-1])
                ax.step(
                    [*xs, end], [*ys, ys[-1]], where="post", marker="o", markersize=3,
                    label=r["method"], color=colour[r["method"]],
                )  # fmt: skip
                finals.append(ys[-1])
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # a range under a decade labels every tick
            # Log perplexity, cut at 3x the worst final value: a search's first patterns can be
            # 100x worse than its last, and on a linear axis they flatten every final difference.
            ax.set_yscale("log")
            if finals:
                ax.set_ylim(0.9 * min(finals), 3 * max(finals))
            ax.set_xlabel("search seconds (scoring time, the method alone)")
            ax.set_ylabel("held-out perplexity (geometric mean)")
            ax.set_title(f"sparsity {sparsity:.0%}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path
