"""The pipeline's steps as idempotent library functions over a checkpoint store.

Each step reads its inputs from the store, writes its output there under the run prefix (derived
from the hash of the search-determining config) and returns a small value. A step whose output
is already in the store returns it without recomputing, so a re-run (new run, flow retry, another
machine) resumes where the last one stopped. ``tasks/`` wraps each step as a Prefect task;
:mod:`evop.pipeline.local` calls them in order without Prefect. This package never imports Prefect
(:mod:`evop.pipeline.launcher`, the one documented exception, starts the flow for ``evop run``).

Store layout under ``<store>/<run prefix>/`` (:class:`~evop.pipeline.store.RunStore`)::

    calibration/pool.safetensors        candidate blocks (P, T)
    calibration/embeddings.npy          their embeddings (P, D), CCDS only
    calibration/sample.json             the drawn indices and the CCDS summary
    calibration/blocks.safetensors      the calibration blocks (n, T)
    generations/gen-000003.json         search state after generation 3 (+ manifest.json)
    search/initial_patterns.json        heuristic patterns seeding EvoP's initial population
    search/memo.json                    a baseline method's scores so far (resume replays them)
    search/outcome.json                 a baseline method's finished search
    result.json                         the finished search (the ``result.json`` contract)
    lease.json                          which run computes the search now (owner, expiry)
    evaluation/perplexity-<tag>.json    dense vs pruned perplexity of one pruned pattern
    evaluation/downstream-<tag>.json    dense vs pruned lm-eval scores of one pruned pattern
    evaluation/speed-<tag>.json         each speed measurement (kept for the record, never reused)

Modules: ``store`` (the run's keys and codecs, its lease), ``cache`` (models loaded once per
process), ``space`` (the patterns the search may produce: what is read back is checked against it),
``search`` (calibration and search steps), ``evaluation`` (prune, evaluate, report, register),
``results`` (the ``result.json`` contract), ``local`` (all search steps in this process),
``summary`` (what the command line prints at the end), ``preflight`` (checks before heavy work).
"""

from evop.pipeline.cache import cached_model, cached_scorer, forget_models
from evop.pipeline.evaluation import (
    evaluate_perplexity,
    final_metrics,
    measure_speed,
    prune_model,
    register_model,
    score_downstream,
    write_report,
)
from evop.pipeline.search import (
    embed_pool,
    finalize_search,
    run_baseline,
    run_generation,
    sample_calibration_set,
    search_status,
    seed_search,
    segment_dataset,
)
from evop.pipeline.store import BASELINE_OUTCOME, RESULT, RunStore, run_prefix, store_uri

__all__ = [
    "BASELINE_OUTCOME",
    "RESULT",
    "RunStore",
    "cached_model",
    "cached_scorer",
    "embed_pool",
    "evaluate_perplexity",
    "final_metrics",
    "finalize_search",
    "forget_models",
    "measure_speed",
    "prune_model",
    "register_model",
    "run_baseline",
    "run_generation",
    "run_prefix",
    "sample_calibration_set",
    "score_downstream",
    "search_status",
    "seed_search",
    "segment_dataset",
    "store_uri",
    "write_report",
]
