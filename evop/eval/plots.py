"""Figures of a finished search: the fitness curve and how often each layer is removed.

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
