"""Models and pattern scorers loaded once per process and kept between pipeline steps.

Loading a model costs more than most steps, and a Prefect worker (or
:func:`~evop.pipeline.local.run_search`) runs many steps of one run in the same process:
:func:`cached_model` keeps the model and tokenizer of each ``model`` config section and
:func:`cached_scorer` the :class:`~evop.method.fitness.PatternScorer` of each run, until
:func:`forget_models` drops them. A step that changes a model (pruning) loads its own copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evop.config import EvoPConfig
from evop.pipeline.space import forget_shapes
from evop.pipeline.store import BLOCKS, SAMPLE, RunStore

if TYPE_CHECKING:
    from evop.method.fitness import PatternScorer


_MODELS: dict[str, tuple[Any, Any]] = {}
_SCORERS: dict[str, "PatternScorer"] = {}
_POOLS: list[Any] = []  # Ray pools behind scorers (scale.backend: ray)


def cached_model(cfg: EvoPConfig) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``cfg.model``, loaded once per process and kept."""
    from evop.models.loading import load_model

    key = cfg.model.model_dump_json()
    if key not in _MODELS:
        _MODELS[key] = load_model(cfg.model)
    return _MODELS[key]


def cached_scorer(run: RunStore) -> "PatternScorer":
    """The pattern scorer of this run (model + calibration blocks), built once per process.

    Only the last run's local scorer is kept: each holds a dense prefix cache of up to
    ``fitness.prefix_cache_mb`` (1 GB by default), and a process that runs many searches one
    after another (``benchmarks/settings.py``: 18 in one call) was killed for memory at 14.6 GB
    when every run's stayed. Ray scorers stay with their pools (:func:`forget_models`)."""
    from evop.method.fitness import PatternScorer

    key = run.prefix
    if key not in _SCORERS:
        for other in [k for k, v in _SCORERS.items() if isinstance(v, PatternScorer)]:
            del _SCORERS[other]
        blocks = run.get_tensor(BLOCKS)
        if blocks is None:
            raise RuntimeError(
                f"no calibration blocks at {run.url(BLOCKS)}: sample the calibration set first"
            )
        model, _ = cached_model(run.cfg)
        clusters = (run.get_json(SAMPLE) or {}).get("clusters") or None  # each block's CCDS cluster
        if run.cfg.scale.backend == "ray":  # the actors score; here only the layout is read
            _SCORERS[key] = parallel_scorer(run.cfg, model, blocks, clusters)
        else:
            _SCORERS[key] = PatternScorer.from_config(model, blocks, run.cfg.fitness, clusters)
    return _SCORERS[key]


def parallel_scorer(cfg: EvoPConfig, model: Any, blocks: Any, clusters: Any) -> Any:
    """The scorer of ``blocks`` on a pool of Ray actors (``cfg.scale``), the pool started once
    per process and kept with the scorer."""
    from evop.method.parallel import ParallelScorer, RayPool

    pool = RayPool(cfg.scale, cfg.model, blocks, cfg.fitness, clusters)
    _POOLS.append(pool)
    return ParallelScorer.on_pool(model, blocks, cfg.fitness, clusters, pool)


def forget_models() -> None:
    """Drop the process-wide model cache and stop the Ray pools (tests; freeing GPU memory)."""
    for pool in _POOLS:
        pool.shutdown()
    _POOLS.clear()
    _MODELS.clear()
    _SCORERS.clear()
    forget_shapes()
