"""The calibration and search steps of the pipeline: text -> calibration set -> ``result.json``.

In order: :func:`segment_dataset` (the candidate pool), :func:`embed_pool` (CCDS only) and
:func:`sample_calibration_set`; then, for EvoP, :func:`seed_search` and :func:`run_generation` once
per generation (each one checkpointed; :func:`search_status` says where a resumed search stands),
or :func:`run_baseline` for any other ``search.method``; finally :func:`finalize_search` writes
``result.json``. Each step is idempotent over the run's store (see :mod:`evop.pipeline`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evop.config import EvoPConfig
from evop.method.patterns import layers_to_remove
from evop.pipeline.cache import cached_model, cached_scorer
from evop.pipeline.space import outcome_problem, patterns_problem, search_space
from evop.pipeline.store import (
    BASELINE_MEMO,
    BASELINE_OUTCOME,
    BLOCKS,
    EMBEDDINGS,
    INITIAL_PATTERNS,
    POOL,
    RESULT,
    SAMPLE,
    RunStore,
    _require_tensor,
)
from evop.records import finite_or_none

if TYPE_CHECKING:
    from evop.method.genetic import GeneticSearch
    from evop.method.patterns import Pattern
    from evop.method.state import SearchState

log = logging.getLogger(__name__)

MEMO_SAVE_SECONDS = 30.0  # how often a baseline's new scores are written to the store


def segment_dataset(cfg: EvoPConfig) -> str:
    """Read the calibration text and cut the candidate pool of token blocks.

    Returns:
        The pool's URL in the store.
    """
    from evop.method.calibration import block_pool, load_texts
    from evop.models.loading import load_tokenizer

    run = RunStore(cfg)
    if run.get_tensor(POOL) is None:
        c = cfg.calibration
        texts = load_texts(c.dataset, c.dataset_config, c.split, c.text_field)
        pool = block_pool(
            texts, load_tokenizer(cfg.model), c.block_len, c.pool_size, c.seed, c.n_samples, source=c.dataset
        )
        run.put_tensor(POOL, pool)
        log.info("pool of %d blocks x %d tokens -> %s", pool.shape[0], pool.shape[1], run.url(POOL))
    return run.url(POOL)


def embed_pool(cfg: EvoPConfig) -> str | None:
    """Embed the pool blocks for CCDS (nothing to do for random sampling).

    Returns:
        The embeddings' URL, or None for ``method: random``.
    """
    from evop.method.calibration import embed_blocks

    if cfg.calibration.method != "ccds":
        return None
    run = RunStore(cfg)
    if run.get_array(EMBEDDINGS) is None:
        pool = _require_tensor(run, POOL)
        if cfg.calibration.embedder == "model":
            model, tokenizer = cached_model(cfg)
        else:
            from evop.models.loading import load_tokenizer

            model, tokenizer = None, load_tokenizer(cfg.model)
        run.put_array(EMBEDDINGS, embed_blocks(pool, cfg.calibration, tokenizer, model))
    return run.url(EMBEDDINGS)


def sample_calibration_set(cfg: EvoPConfig) -> dict[str, Any]:
    """Draw the calibration blocks from the pool (CCDS or random).

    Returns:
        The calibration summary (method, n_samples, block_len, n_clusters, ...).
    """
    from evop.method.calibration import sample_pool

    run = RunStore(cfg)
    saved = run.get_json(SAMPLE)
    if saved is not None and run.get_tensor(BLOCKS) is not None:
        return saved["summary"]
    pool = _require_tensor(run, POOL)
    embeddings = run.get_array(EMBEDDINGS) if cfg.calibration.method == "ccds" else None
    calib = sample_pool(pool, cfg.calibration, embeddings)
    run.put_tensor(BLOCKS, calib.blocks)
    summary = calib.summary()
    clusters = calib.sample_clusters  # each block's CCDS cluster, for the cluster aggregates
    run.put_json(SAMPLE, {"pool_indices": calib.pool_indices, "clusters": clusters, "summary": summary})
    return summary


def _search(run: RunStore) -> "GeneticSearch":
    """EvoP's GA for this run, assembled by :func:`evop.method.epps.build_search` from the stored seeding."""
    from evop.method.epps import Seeding, build_search

    scorer = cached_scorer(run)
    k = layers_to_remove(scorer.num_layers, run.cfg.search.sparsity, run.cfg.search.num_remove)
    seeding = Seeding.from_json(seed_search(run.cfg))
    return build_search(run.cfg.search, scorer.num_layers, k, scorer, seeding)


def seed_search(cfg: EvoPConfig) -> dict[str, Any]:
    """The heuristic patterns seeding EvoP's initial population (``search.initial_patterns``) and
    the Block Influence behind its mutation prior (:func:`evop.method.epps.seed_search`), computed
    once and kept in the store, so every resume continues the same search.

    Returns:
        The :class:`~evop.method.epps.Seeding` as JSON: ``patterns``, ``block_influence``,
        ``evaluations`` (patterns scored only to find the seeds) and ``seconds``.
    """
    from evop.method.epps import seed_search as seed
    from evop.method.influence import layer_influence

    run = RunStore(cfg)
    saved = run.get_json(INITIAL_PATTERNS, check=patterns_problem(cfg, "patterns"))
    if saved is not None:
        return saved
    scorer = cached_scorer(run)
    k = layers_to_remove(scorer.num_layers, cfg.search.sparsity, cfg.search.num_remove)
    seeding = seed(
        cfg.search,
        scorer.num_layers,
        k,
        scorer,
        influence=lambda: layer_influence(scorer.model, scorer.blocks, cfg.fitness.batch_size),
    )
    data = seeding.to_json()
    run.put_json(INITIAL_PATTERNS, data)
    if seeding.patterns:
        log.info(
            "initial population seeded with %s (%s)", seeding.patterns, ", ".join(cfg.search.initial_patterns)
        )
    return data


def _finished_record(run: RunStore) -> dict[str, Any] | None:
    """The store's ``result.json`` when it is the record of this search (its model, config hash
    and pattern fit the config) and agrees with the search's last checkpoint (EvoP) or outcome (a
    baseline); otherwise None, reported once, and the record is built again from the search."""
    from evop.method.outcome import Outcome
    from evop.pipeline.results import agreement_problem, result_problem
    from evop.storage.checkpoints import CorruptCheckpointError

    def check(result: Any) -> str | None:
        problem = result_problem(result, run.cfg, search_space(run.cfg))
        if problem is not None:
            return problem
        if run.cfg.search.method != "evop":
            outcome = run.get_json(BASELINE_OUTCOME, check=outcome_problem(run.cfg))
            if outcome is None:
                return "its search has no finished outcome"
            mine = Outcome.from_json(outcome)
            found = (str(mine.pattern), finite_or_none(mine.fitness))
            if found != (result["pattern"], result.get("fitness")):
                return f"it is not the outcome of its search ({mine.pattern}, fitness {mine.fitness})"
            return None
        latest = run.checkpoints.manifest().get("latest")
        if latest is None:
            return "its search has no checkpoint"
        try:
            state = run.checkpoints.load(int(latest))
        except CorruptCheckpointError as err:
            return f"its last checkpoint cannot be trusted ({err})"
        return agreement_problem(result, state)

    return run.get_json(RESULT, check=check)


def search_status(cfg: EvoPConfig) -> dict[str, Any]:
    """Where the search stands in the store: ``{"generation": g, "done": bool}`` (g = -1: none).

    A finished search's ``result.json`` is the record, believed only when it agrees with the
    search's last checkpoint (:func:`_finished_record`); one that does not is rebuilt from the
    newest checkpoint that verifies, recomputing what that takes.
    """
    run = RunStore(cfg)
    result = _finished_record(run)
    if result is not None:
        return {"generation": int(result.get("generations", 0)), "done": True}
    state = run.checkpoints.latest()
    if state is None:
        return {"generation": -1, "done": False}
    return {"generation": state.generation, "done": state.done}


def run_generation(cfg: EvoPConfig, generation: int) -> dict[str, Any]:
    """Make sure generation ``generation`` of the search is done and checkpointed.

    Resumes from the newest verified checkpoint: generations already in the store are not
    recomputed (a corrupted newest one costs that generation only).

    Returns:
        That generation's history entry (the last one when the search stopped before it; it holds
        ``best_pattern``, ``evaluations``, ``phase``, ...) plus ``done``, ``stop_reason``,
        ``total_evaluations`` (distinct patterns scored so far) and ``checkpoint_seconds`` (time to
        save the last checkpoint written by this call; 0 when every generation was already stored).
    """
    run = RunStore(cfg)
    state = run.checkpoints.latest()
    search = None
    checkpoint_seconds = 0.0
    while state is None or (state.generation < generation and not state.done):
        search = search or _search(run)
        state = search.step(state or search.initial_state())
        start = time.perf_counter()
        url = run.checkpoints.save(state)
        checkpoint_seconds = time.perf_counter() - start
        log.info("checkpointed generation %d in %.3f s -> %s", state.generation, checkpoint_seconds, url)
    entry = next((h for h in state.history if h["generation"] == generation), state.history[-1])
    pool = getattr(cached_scorer(run), "pool", None) if search is not None else None
    return {
        **entry,
        # Actors that scored it (scale.backend: ray), 1 in this process, None: read from the store.
        "workers": None if search is None else pool.workers if pool is not None else 1,
        "done": state.done,
        "stop_reason": state.stop_reason,
        "total_evaluations": state.evaluations,
        "checkpoint_seconds": checkpoint_seconds,
    }


def run_baseline(cfg: EvoPConfig) -> dict[str, Any]:
    """Run the baseline search ``cfg.search.method`` (anything but ``evop``) to the end, once.

    Baselines are deterministic given the config, so their checkpoint is the memo of scores:
    it is written to the store every ``MEMO_SAVE_SECONDS`` and a re-run replays the method
    against it, re-scoring only what was not saved.

    Returns:
        The :class:`~evop.method.outcome.Outcome` as JSON.
    """
    from evop.method.influence import layer_influence
    from evop.method.patterns import layers_to_remove
    from evop.method.scoring import ScoreMemo
    from evop.searches import run_method

    run = RunStore(cfg)
    saved = run.get_json(BASELINE_OUTCOME, check=outcome_problem(cfg))
    if saved is not None:
        return saved
    s = cfg.search
    scorer = cached_scorer(run)
    saved_memo = run.get_json(BASELINE_MEMO, check=lambda data: ScoreMemo.problem(data, search_space(cfg)))
    memo = ScoreMemo(lambda data: run.put_json(BASELINE_MEMO, data), saved_memo, every=MEMO_SAVE_SECONDS)
    if len(memo):
        log.info("resuming %s with %d saved scores from %s", s.method, len(memo), run.url(BASELINE_MEMO))
    cheap = None
    if s.method == "evopress":
        cheap = memo.fitness(scorer.first_blocks(s.evopress_cheap_fraction), cheap=True)
    n = scorer.num_layers
    k = layers_to_remove(n, s.sparsity, s.num_remove)
    outcome = run_method(
        s,
        n,
        k,
        memo.fitness(scorer),
        cheap,
        influence=lambda: layer_influence(scorer.model, scorer.blocks, cfg.fitness.batch_size),
    )
    memo.flush()
    data = outcome.to_json()
    run.put_json(BASELINE_OUTCOME, data)
    log.info(
        "%s removes %s (fitness %s) after %d evaluations in %.1f s",
        s.method,
        list(outcome.pattern.removed),
        data["fitness"],
        outcome.evaluations,
        outcome.seconds,
    )
    return data


def _validate(run: RunStore, state: "SearchState") -> tuple["Pattern | None", dict[str, Any] | None]:
    """The final pattern chosen on validation blocks (``search.validation_blocks``), and the
    record of the choice; ``(None, None)`` when validation is off."""
    from evop.method.fitness import PatternScorer
    from evop.method.selection import finalists, select_by_validation, validation_indices

    s, c = run.cfg.search, run.cfg.calibration
    if not s.validation_blocks:
        return None, None
    pool = _require_tensor(run, POOL)
    idx = validation_indices(pool.shape[0], run.get_json(SAMPLE)["pool_indices"], s.validation_blocks, c.seed)
    model, _ = cached_model(run.cfg)
    # All validation blocks count, and they have no clusters: their loss is the plain mean.
    fitness = run.cfg.fitness.model_copy(update={"aggregate": "mean", "token_budget": None})
    scorer = PatternScorer.from_config(model, pool[idx], fitness)
    candidates = finalists(state, s.validation_candidates, stages=len(cached_scorer(run).stage_tokens))
    chosen, table = select_by_validation(candidates, state.memo, scorer)
    log.info("validation on %d held-back pool blocks chose %s (search best %s)", len(idx), chosen, state.best)
    record = {"blocks": len(idx), "pool_indices": idx, "search_best": state.best, "finalists": table}
    return chosen, {**record, "chosen": str(chosen)}


CONFIRM_TOLERANCE = 0.01
"""Relative difference allowed between a final pattern's recorded and re-measured fitness (numerics
of another device or batching stay far below it; a made-up score does not)."""


def _confirm_score(run: RunStore, result: dict[str, Any]) -> None:
    """Measure the final pattern again before it is recorded (one evaluation): a score in the
    store that nobody measured (an edited checkpoint or memo whose patterns all fit the config)
    stops the search here instead of being shipped.

    Raises:
        BadInputError: the record and the measurement disagree.
    """
    from evop.errors import BadInputError
    from evop.method.patterns import Pattern

    claimed = result["fitness"]
    measured = finite_or_none(cached_scorer(run)(Pattern.parse(result["pattern"])))
    if claimed is None and measured is None:
        return
    if claimed is None or measured is None or abs(measured - claimed) > CONFIRM_TOLERANCE * abs(measured):
        raise BadInputError(
            f"the search's record of {result['pattern']} (fitness {claimed}) is not what it measures now "
            f"({measured}): the store {run.url()} was edited, or holds another model's scores; remove it "
            "to search again"
        )


def finalize_search(cfg: EvoPConfig) -> dict[str, Any]:
    """Build ``result.json`` from the final checkpoint; write it to the store and ``output_dir``
    (with ``calibration.safetensors`` beside it for later perplexity checks)."""
    from evop.eval.perplexity import save_blocks
    from evop.method.epps import seeding_tokens
    from evop.pipeline.results import RESULT_FILE, build_result
    from evop.records import write_json_atomic

    run = RunStore(cfg)
    result = _finished_record(run)
    if result is None and cfg.search.method != "evop":
        from evop.method.outcome import Outcome
        from evop.pipeline.results import build_outcome_result

        saved = run.get_json(BASELINE_OUTCOME, check=outcome_problem(cfg))
        if saved is None:
            raise RuntimeError(f"the {cfg.search.method} search at {run.url()} is not finished")
        dense = cached_scorer(run).dense()
        result = build_outcome_result(cfg, Outcome.from_json(saved), dense, run.get_json(SAMPLE)["summary"])
        result["checkpoints"] = run.url()
        _confirm_score(run, result)
        run.put_json(RESULT, result)
    if result is None:
        state = run.checkpoints.latest()
        if state is None or not state.done:
            raise RuntimeError(f"the search at {run.url()} is not finished")
        dense = cached_scorer(run).dense()
        unseeded = {"patterns": [], "evaluations": 0, "seconds": 0.0, "tokens": 0}
        seeding = run.get_json(INITIAL_PATTERNS, check=patterns_problem(cfg, "patterns")) or unseeded
        wall = sum(h["seconds"] for h in state.history) + seeding["seconds"]
        final, validation = _validate(run, state)
        result = build_result(cfg, state, dense, run.get_json(SAMPLE)["summary"], wall, final)
        if validation is not None:
            result["validation"] = validation
        result["evaluations"] += seeding["evaluations"]
        if result["tokens_forwarded"] is not None:  # the GA's tokens; seeding forwarded some too
            tokens = seeding.get("tokens")
            if tokens is None:  # a seeding stored before its tokens were counted
                tokens = seeding_tokens(cfg.search, seeding["evaluations"], cached_scorer(run).stage_tokens)
            result["tokens_forwarded"] += tokens
            result["seeding_tokens"] = tokens
        result["initial_patterns"] = seeding["patterns"]
        result["checkpoints"] = run.url()
        _confirm_score(run, result)
        run.put_json(RESULT, result)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RESULT_FILE, result)
    save_blocks(_require_tensor(run, BLOCKS), out / "calibration.safetensors")
    return result
