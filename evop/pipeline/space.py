"""The patterns a run's search may produce on its model: what everything read back is checked against.

:func:`model_shape` reads the model's layer count and context length from its configuration (once
per process); :func:`search_space` turns them and the ``search`` section into a
:class:`~evop.method.patterns.PatternSpace`. The layer count always comes from the model itself,
never from a file read back. :func:`patterns_problem` and :func:`outcome_problem` check the patterns
of stored JSON objects (seeds, score memos, a baseline's outcome) against it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from evop.config import EvoPConfig

if TYPE_CHECKING:
    from evop.method.patterns import PatternSpace
    from evop.models.loading import ModelShape

_SHAPES: dict[str, "ModelShape"] = {}


def model_shape(cfg: EvoPConfig) -> "ModelShape":
    """The model's layer count and context length (its configuration alone), read once per process."""
    from evop.models.loading import read_model_shape

    key = cfg.model.model_dump_json()
    if key not in _SHAPES:
        _SHAPES[key] = read_model_shape(cfg.model)
    return _SHAPES[key]


def search_space(cfg: EvoPConfig) -> "PatternSpace":
    """The patterns ``cfg``'s search may produce on its model.

    Raises:
        BadInputError: ``k`` does not fit the model (the preflight reports it first).
    """
    from evop.method.patterns import PatternSpace

    s = cfg.search
    return PatternSpace.of(model_shape(cfg).num_layers, s.sparsity, s.num_remove, s.protected_layers)


def patterns_problem(cfg: EvoPConfig, *fields: str, exact_k: bool = True) -> Callable[[Any], str | None]:
    """A check of the patterns a stored JSON object holds under ``fields`` (a list of patterns or a
    ``pattern -> score`` table each) against the search's :class:`~evop.method.patterns.PatternSpace`."""

    return lambda data: search_space(cfg).problem_in(data, fields, exact_k)


def outcome_problem(cfg: EvoPConfig) -> Callable[[Any], str | None]:
    """A check of a baseline's stored outcome: its pattern fits the search, and so does every
    round's best (a greedy round's holds fewer layers)."""

    def check(data: Any) -> str | None:
        if not isinstance(data, dict) or "pattern" not in data:
            return "not an outcome of a search (no pattern)"
        space = search_space(cfg)
        problem = space.problem(data["pattern"])
        if problem is not None:
            return f"pattern: {problem}"
        steps = [h.get("best_pattern") for h in data.get("history", []) if h.get("best_pattern")]
        return space.problem_in({"history": steps}, ["history"], exact_k=False)

    return check


def forget_shapes() -> None:
    """Read every model's configuration again (tests that rewrite a model folder)."""
    _SHAPES.clear()
