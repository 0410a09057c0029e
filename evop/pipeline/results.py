"""The ``result.json`` contract: what a finished search writes, for ``evop prune`` and the pipeline.

:func:`build_result` builds it from EvoP's final :class:`~evop.method.state.SearchState` and
:func:`build_outcome_result` from a baseline's :class:`~evop.method.outcome.Outcome`, with the same
keys: the pattern (removed and kept layers, sparsity), its fitness next to the dense model's, the
search figures (evaluations, generations, stop reason, a history entry per generation or round),
the calibration summary and the config with its hash. A ``result.json`` read back is believed only
when :func:`result_problem` finds nothing (and, in the store, :func:`agreement_problem` with its
last checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from evop.config import EvoPConfig
from evop.errors import BadInputError
from evop.method.patterns import Pattern
from evop.method.state import SearchState
from evop.records import finite_or_none

if TYPE_CHECKING:
    from evop.method.outcome import Outcome
    from evop.method.patterns import PatternSpace


RESULT_FILE = "result.json"


def _result(
    cfg: EvoPConfig,
    method: str,
    best: Pattern,
    fitness: float,
    dense_fitness: float,
    calibration: dict[str, Any],
    wall_time_s: float,
    **search: Any,
) -> dict[str, Any]:
    """The ``result.json`` fields every search method shares, with ``search`` (evaluations,
    generations, stop_reason, history, ...) in their place."""
    return {
        "method": method,
        "base_model": cfg.model.name_or_path,
        "num_layers": best.num_layers,
        "removed_layers": list(best.removed),
        "kept_layers": list(best.kept),
        "pattern": str(best),
        "sparsity": best.sparsity,
        "fitness_metric": cfg.fitness.metric,
        "fitness": finite_or_none(fitness),
        "dense_fitness": finite_or_none(dense_fitness),
        **search,
        "seed": cfg.search.seed,
        "calibration": calibration,
        "wall_time_s": round(wall_time_s, 3),
        "config_hash": cfg.search_hash(),
        "config": cfg.model_dump(mode="json"),
    }


def build_result(
    cfg: EvoPConfig,
    state: SearchState,
    dense_fitness: float,
    calibration: dict[str, Any],
    wall_time_s: float,
    final: Pattern | None = None,
) -> dict[str, Any]:
    """The ``result.json`` contract read by ``evop prune`` and the pipeline (EvoP's GA).

    ``final``: the pattern chosen on validation blocks (default: the search's best).
    """
    if state.best is None:
        raise RuntimeError("the search finished without a best pattern")
    final = final or Pattern.parse(state.best)
    history = [
        {k: h[k] for k in ("generation", "best_fitness", "mean_fitness", "evaluations", "seconds")}
        | {k: h.get(k) for k in ("best_pattern", "tokens", "raced_out")}
        | {"phase": h.get("phase", "ga")}
        for h in state.history
    ]
    return _result(
        cfg,
        "evop",
        final,
        state.memo[str(final)],
        dense_fitness,
        calibration,
        wall_time_s,
        evaluations=state.evaluations,
        tokens_forwarded=state.tokens,
        generations=state.generation,
        stop_reason=state.stop_reason,
        history=history,
    )


def build_outcome_result(
    cfg: EvoPConfig, outcome: "Outcome", dense_fitness: float, calibration: dict[str, Any]
) -> dict[str, Any]:
    """The ``result.json`` contract for a baseline method's :class:`~evop.method.outcome.Outcome`:
    the same keys as :func:`build_result` (plus ``cheap_evaluations`` and ``details``), one
    history entry per round or generation."""
    history = [
        {
            "generation": h["step"],
            "best_fitness": finite_or_none(h["best_fitness"]),
            "mean_fitness": None,
            "evaluations": h["evaluations"],
            "seconds": None,
            "best_pattern": h["best_pattern"],
        }
        for h in outcome.history
    ]
    return _result(
        cfg,
        outcome.method,
        outcome.pattern,
        outcome.fitness,
        dense_fitness,
        calibration,
        outcome.seconds,
        evaluations=outcome.evaluations,
        tokens_forwarded=outcome.tokens,
        cheap_evaluations=outcome.cheap_evaluations,
        generations=len(outcome.history),
        stop_reason="finished",
        history=history,
        details=outcome.details,
    )


def result_problem(result: Any, cfg: EvoPConfig, space: "PatternSpace") -> str | None:
    """What makes ``result`` (a ``result.json`` read back) not a result of ``cfg``'s search on its
    model, in a few words; None when it is one.

    Checked: the fields ``evop prune`` relies on are there and agree with each other (pattern,
    removed and kept layers), its model and config hash are the config's, and its pattern fits
    ``space`` (the layer count read from the model, ``k``, the protected layers).
    """
    if not isinstance(result, dict):
        return f"expected a JSON object, got {type(result).__name__}"
    missing = [k for k in ("base_model", "num_layers", "removed_layers", "pattern") if k not in result]
    if missing:
        return f"it lacks {', '.join(repr(k) for k in missing)} (not a result.json written by EvoP)"
    if result["base_model"] != cfg.model.name_or_path:
        return (
            f"its base_model {result['base_model']!r} is not its config's model.name_or_path "
            f"{cfg.model.name_or_path!r}"
        )
    if "config_hash" in result and result["config_hash"] != cfg.search_hash():
        return f"its config_hash {result['config_hash']} is not the hash of its config ({cfg.search_hash()})"
    try:
        pattern = Pattern.of(int(result["num_layers"]), result["removed_layers"])
    except (BadInputError, TypeError, ValueError) as err:
        return f"its removed_layers {result['removed_layers']!r} are no pattern: {err}"
    kept = list(pattern.kept)
    if result["pattern"] != str(pattern) or result.get("kept_layers", kept) != kept:
        return f"its pattern {result['pattern']!r}, removed_layers and kept_layers disagree"
    return space.problem(pattern)


def agreement_problem(result: dict[str, Any], state: SearchState | None) -> str | None:
    """What makes a finished EvoP ``result`` disagree with its search's last checkpoint ``state``
    (None: they agree): a record that could not have come from that state is not believed."""
    if state is None or not state.done:
        return "its search has no finished checkpoint"
    if result.get("generations") != state.generation:
        said = result.get("generations")
        return f"it says {said} generations; the last checkpoint is generation {state.generation}"
    pattern = result["pattern"]
    if pattern not in state.memo:
        return f"its pattern {pattern} was never scored by the search"
    if finite_or_none(state.memo[pattern]) != result.get("fitness"):
        score = state.memo[pattern]
        return f"its fitness {result.get('fitness')} is not the search's score of {pattern} ({score})"
    if "validation" not in result and pattern != state.best:
        return f"its pattern {pattern} is not the search's best ({state.best})"
    return None


def read_result(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[EvoPConfig, Pattern, dict[str, Any]]:
    """A ``result.json`` given on the command line (``evop prune``, ``evop register``), checked
    before any model is loaded.

    The file's config with the command line's ``overrides`` is the config; the file never turns on
    ``model.trust_remote_code`` (only the command line can). The result must be one of that config
    (:func:`result_problem`), its pattern checked against the layer count of the model itself.

    Returns:
        ``(config, pattern, result)``.

    Raises:
        BadInputError: one line naming the file and the problem.
    """
    from evop.config import ConfigError, build_config
    from evop.pipeline.space import search_space
    from evop.records import read_json

    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"result file {path} is a directory: give the result.json in it")
    result = read_json(path, "result file")
    if not isinstance(result, dict):
        raise BadInputError(f"result file {path}: expected a JSON object, got {type(result).__name__}")
    needed = ("config", "num_layers", "removed_layers", "pattern", "base_model")
    missing = [k for k in needed if k not in result]
    if missing or not isinstance(result["config"], dict):
        what = ", ".join(repr(k) for k in missing) or "a 'config' object"
        raise BadInputError(f"result file {path} lacks {what} (not a result.json written by `evop search`)")
    try:
        recorded = build_config(result["config"])
        # Code from a model repository runs only when the person running EvoP says so.
        model = {**result["config"].get("model", {}), "trust_remote_code": False}
        cfg = build_config({**result["config"], "model": model}, overrides)
    except ConfigError as err:
        raise BadInputError(f"result file {path}: {err}") from None
    if recorded.model.trust_remote_code and not cfg.model.trust_remote_code:
        raise BadInputError(
            f"result file {path} asks for model.trust_remote_code=true (code from "
            f"{recorded.model.name_or_path!r} would run); a result file never turns it on: add "
            "model.trust_remote_code=true to the command if you trust that repository"
        )
    problem = result_problem(result, recorded, search_space(cfg))
    if problem is not None:
        raise BadInputError(f"result file {path}: {problem}")
    return cfg, Pattern.parse(result["pattern"]), result
