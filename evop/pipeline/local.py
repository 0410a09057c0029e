"""One search end to end in this process: model -> CCDS calibration set -> EPPS -> ``result.json``.

:func:`run_search` is what the CLI runs: the pipeline's search steps (:mod:`evop.pipeline.search`)
called in order without Prefect, over the same checkpoint store, so an interrupted run continues
from its last checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from evop.config import EvoPConfig
from evop.pipeline import search as steps
from evop.pipeline.preflight import check_search
from evop.pipeline.store import RunStore, search_lease

log = logging.getLogger(__name__)


def run_search(
    cfg: EvoPConfig, on_generation: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run CCDS + EPPS (or the baseline ``cfg.search.method``) for ``cfg`` in this process and
    write ``result.json`` to ``cfg.output_dir``.

    The same idempotent steps as the Prefect pipeline, called in order: every generation is
    checkpointed to the store (``cfg.checkpoints``, default ``<output_dir>/checkpoints``), so a
    re-run of the same config continues from the last checkpoint and ends with the same pattern
    as an uninterrupted run; a finished search returns at once. The run holds the search's lease
    (:func:`~evop.pipeline.store.search_lease`): a second run of it waits instead of computing it
    twice.

    Args:
        cfg: The run's configuration.
        on_generation: Called with each generation's history entry (progress display).

    Returns:
        The result dictionary (see :func:`~evop.pipeline.results.build_result`).
    """
    check_search(cfg)  # bad input fails here, in seconds, before calibration and search
    with search_lease(cfg) as lease:  # one run at a time computes this search
        steps.segment_dataset(cfg)
        steps.embed_pool(cfg)
        steps.sample_calibration_set(cfg)
        if cfg.search.method != "evop":
            steps.run_baseline(cfg)
            return steps.finalize_search(cfg)
        status = steps.search_status(cfg)
        generation = status["generation"] + 1
        if status["generation"] >= 0:
            log.info("resuming after generation %d from %s", status["generation"], RunStore(cfg).url())
        done = status["done"]
        while not done:
            lease.check()
            entry = steps.run_generation(cfg, generation)
            if on_generation is not None:
                on_generation(entry)
            done = entry["done"]
            generation += 1
        return steps.finalize_search(cfg)
