"""What a comparison compares: the methods, the EvoP ablation variants and the output files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evop.errors import BadInputError

MAIN_METHODS = (
    "evop",
    "evop-no-polish",
    "evop-random-init",
    "sleb",
    "shortgpt",
    "ppl-oneshot",
    "evopress",
    "random",
)
"""Every method ``evop compare`` knows (the default), besides :data:`UNRACED`, which is costly."""


UNSEEDED = "evop-random-init"
"""EvoP's GA without heuristic seeds (``search.initial_patterns: []``): what seeding buys."""


UNPOLISHED = "evop-no-polish"
"""EvoP without the polish rounds (``search.polish_rounds: 0``): what the local search buys."""


UNRACED = "evop-unraced"
"""EvoP with every candidate scored on all calibration blocks (racing off): racing's check on the
comparison's own calibration set. It shares the score memo, so patterns racing stopped early are
finished from where they stopped; its tokens column is still what it would forward alone."""


VARIANTS: dict[str, dict[str, Any]] = {
    UNSEEDED: {"method": "evop", "initial_patterns": []},
    UNPOLISHED: {"method": "evop", "polish_rounds": 0},
    UNRACED: {"method": "evop", "racing_ratio": None, "racing_confidence": None},
}
"""EvoP ablations usable as ``spec.methods``: the search settings each one overrides."""


AT_SLEB_BUDGET = "evop-sleb-budget"
"""EvoP's GA alone (no polish) run for as many evaluations as SLEB used (at most): the two
searches at equal cost."""


ANYTIME_CURVES = frozenset({"evop", "sleb", "evopress", AT_SLEB_BUDGET})
"""Methods whose whole anytime curve is judged on the held-out text. Every other method gets
one point, its final pattern: each point is a held-out judgement (about 11 min per pattern on
Gemma-3 on one CPU core), and random search, the ablations and the one-shot criteria do not
answer the anytime question (when does EvoP reach SLEB's quality?)."""


ANYTIME_POINTS = 8
"""At most this many points of a whole anytime curve are judged: the first, the last and points
evenly spaced in between. EvoPress-style improves in small steps (15 to 20 on SmolLM2 at 40%),
which would cost hours of judging a sparsity on Gemma-3; a dropped point only makes the step
before it last longer, so the curve stays true, only coarser."""


def anytime_to_judge(method: str, trace: list, points: int = ANYTIME_POINTS) -> list:
    """The points of ``method``'s anytime trace (best pattern so far at each improvement) that
    the comparison judges on the held-out text: see :data:`ANYTIME_CURVES`; at most ``points``
    of a whole curve (:data:`ANYTIME_POINTS`; 1: only the final pattern, as for other methods)."""
    if method not in ANYTIME_CURVES or points <= 1:
        return trace[-1:]
    if len(trace) <= points:
        return trace
    last = len(trace) - 1
    return [trace[i] for i in sorted({round(j * last / (points - 1)) for j in range(points)})]


COMPARE_FILE = "compare.json"


TABLE_FILE = "compare.md"


ANYTIME_PLOT = "anytime.png"
"""Held-out perplexity (geometric mean over the domains) of each method's best pattern so far,
against its search seconds: one panel per sparsity."""


MEMO_SAVE_SECONDS = 60.0


@dataclass
class CompareSpec:
    """What to compare (the model, calibration, search and fitness settings come from the config).

    Attributes:
        methods: Search methods of the main table (``exhaustive`` only where the space is small).
        sparsities: Sparsities of the main table.
        ablation_seeds: Seeds of the CCDS-vs-random ablation (empty: skip it).
        ablation_sparsity: Sparsity of that ablation (None: the first of ``sparsities``).
        optimum_k: Layers removed in the optimum check (None: skip it).
        optimum_seeds: EvoP (and random-search) seeds of the optimum check.
        lm_eval: Also score each chosen pattern on ``evaluation.tasks`` with lm-eval.
        anytime_points: Held-out judgements of a whole anytime curve, at most (1: the final
            pattern only; each costs a judgement of every domain: about 90 s a domain on Gemma-3).
    """

    methods: list[str] = field(default_factory=lambda: list(MAIN_METHODS))
    sparsities: list[float] = field(default_factory=lambda: [0.2, 0.3])
    ablation_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ablation_sparsity: float | None = None
    optimum_k: int | None = 2
    optimum_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    lm_eval: bool = False
    anytime_points: int = ANYTIME_POINTS

    def __post_init__(self) -> None:
        from evop.searches import METHODS

        unknown = [m for m in self.methods if m not in (*METHODS, *VARIANTS)]
        if unknown:
            raise BadInputError(
                f"unknown search method(s) {unknown}; choose from {', '.join((*METHODS, *VARIANTS))}"
            )
        bad = [s for s in self.sparsities if not 0 < s < 1]
        if bad or not self.sparsities:
            raise BadInputError(f"sparsities must be non-empty and in (0, 1), got {self.sparsities}")
        if self.anytime_points < 1:
            raise BadInputError(f"anytime_points must be at least 1, got {self.anytime_points}")


def domain_name(source: str) -> str:
    """The short name of a held-out text source (``evop-assets:news`` -> ``news``, a path -> its
    stem; a document slice stays: ``evop-assets:wikipedia[90:]`` -> ``wikipedia[90:]``)."""
    from evop.method.calibration import split_document_slice

    name, documents = split_document_slice(source.removeprefix("evop-assets:"))
    part = "" if documents == slice(None) else source[source.rindex("[") :]
    return (Path(name).stem if "/" in name else name) + part
