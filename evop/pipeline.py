"""The pipeline's steps as idempotent library functions over a checkpoint store.

Each step reads its inputs from the store, writes its output there under the run prefix (derived
from the hash of the search-determining config) and returns a small value. A step whose output
is already in the store returns it without recomputing, so a re-run (new run, flow retry, another
machine) resumes where the last one stopped. ``tasks/`` wraps each step as a Prefect task; this
module never imports Prefect.

Store layout under ``<store>/<run prefix>/``::

    calibration/pool.safetensors        candidate blocks (P, T)
    calibration/embeddings.npy          their embeddings (P, D), CCDS only
    calibration/sample.json             the drawn indices and the CCDS summary
    calibration/blocks.safetensors      the calibration blocks (n, T)
    generations/gen-000003.json         search state after generation 3 (+ manifest.json)
    search/initial_patterns.json        heuristic patterns seeding EvoP's initial population
    search/memo.json                    a baseline method's scores so far (resume replays them)
    search/outcome.json                 a baseline method's finished search
    result.json                         the finished search (the ``result.json`` contract)
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evop.checkpoints import ObjectStore, SearchCheckpoints, open_store
from evop.config import EvoPConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

    from evop.fitness import PatternScorer

log = logging.getLogger(__name__)

POOL = "calibration/pool.safetensors"
EMBEDDINGS = "calibration/embeddings.npy"
SAMPLE = "calibration/sample.json"
BLOCKS = "calibration/blocks.safetensors"
RESULT = "result.json"
INITIAL_PATTERNS = "search/initial_patterns.json"
BASELINE_MEMO = "search/memo.json"
BASELINE_OUTCOME = "search/outcome.json"
MEMO_SAVE_SECONDS = 30.0  # how often a baseline's new scores are written to the store


# ---------------------------------------------------------------------------------------------
# Where a run lives, and small codecs for the store
# ---------------------------------------------------------------------------------------------


def store_uri(cfg: EvoPConfig) -> str:
    """The checkpoint store of ``cfg``: ``cfg.checkpoints`` or ``<output_dir>/checkpoints``."""
    return cfg.checkpoints or Path(cfg.output_dir, "checkpoints").resolve().as_uri()


def run_prefix(cfg: EvoPConfig) -> str:
    """Key prefix of this search: two different searches never share it."""
    return f"evop-{cfg.search_hash()}"


class Run:
    """One search's corner of the store."""

    def __init__(self, cfg: EvoPConfig):
        self.cfg = cfg
        self.store: ObjectStore = open_store(store_uri(cfg))
        self.prefix = run_prefix(cfg)
        self.checkpoints = SearchCheckpoints(self.store, self.prefix)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def url(self, name: str = "") -> str:
        return self.store.url(self.key(name).rstrip("/"))

    def get(self, name: str) -> bytes | None:
        return self.store.get(self.key(name))

    def put(self, name: str, data: bytes) -> None:
        self.store.put(self.key(name), data)

    def get_tensor(self, name: str) -> "torch.Tensor | None":
        from safetensors.torch import load

        raw = self.get(name)
        return None if raw is None else load(raw)["data"]

    def put_tensor(self, name: str, tensor: "torch.Tensor") -> None:
        from safetensors.torch import save

        self.put(name, save({"data": tensor.contiguous()}))

    def get_array(self, name: str) -> "np.ndarray | None":
        import numpy as np

        raw = self.get(name)
        return None if raw is None else np.load(io.BytesIO(raw), allow_pickle=False)

    def put_array(self, name: str, array: "np.ndarray") -> None:
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        self.put(name, buf.getvalue())

    def get_json(self, name: str) -> Any:
        raw = self.get(name)
        return None if raw is None else json.loads(raw)

    def put_json(self, name: str, data: Any) -> None:
        self.put(name, json.dumps(data, indent=1, allow_nan=False).encode())


# ---------------------------------------------------------------------------------------------
# Loaded models: once per worker process
# ---------------------------------------------------------------------------------------------

_MODELS: dict[str, tuple[Any, Any]] = {}
_SCORERS: dict[str, "PatternScorer"] = {}


def cached_model(cfg: EvoPConfig) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``cfg.model``, loaded once per process and kept."""
    from evop.models import load_model

    key = cfg.model.model_dump_json()
    if key not in _MODELS:
        _MODELS[key] = load_model(cfg.model)
    return _MODELS[key]


def cached_scorer(run: Run) -> "PatternScorer":
    """The pattern scorer of this run (model + calibration blocks), built once per process."""
    from evop.fitness import PatternScorer

    key = run.prefix
    if key not in _SCORERS:
        blocks = run.get_tensor(BLOCKS)
        if blocks is None:
            raise RuntimeError(
                f"no calibration blocks at {run.url(BLOCKS)}: sample the calibration set first"
            )
        model, _ = cached_model(run.cfg)
        _SCORERS[key] = PatternScorer.from_config(model, blocks, run.cfg.fitness)
    return _SCORERS[key]


def forget_models() -> None:
    """Drop the process-wide model cache (tests; freeing GPU memory)."""
    _MODELS.clear()
    _SCORERS.clear()


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def segment_dataset(cfg: EvoPConfig) -> str:
    """Read the calibration text and cut the candidate pool of token blocks.

    Returns:
        The pool's URL in the store.
    """
    from evop.calibration import block_pool, load_texts
    from evop.models import load_tokenizer

    run = Run(cfg)
    if run.get(POOL) is None:
        c = cfg.calibration
        texts = load_texts(c.dataset, c.dataset_config, c.split, c.text_field)
        pool = block_pool(texts, load_tokenizer(cfg.model), c.block_len, c.pool_size, c.seed, c.n_samples)
        run.put_tensor(POOL, pool)
        log.info("pool of %d blocks x %d tokens -> %s", pool.shape[0], pool.shape[1], run.url(POOL))
    return run.url(POOL)


def embed_pool(cfg: EvoPConfig) -> str | None:
    """Embed the pool blocks for CCDS (nothing to do for random sampling).

    Returns:
        The embeddings' URL, or None for ``method: random``.
    """
    from evop.calibration import embed_pool as embed

    if cfg.calibration.method != "ccds":
        return None
    run = Run(cfg)
    if run.get(EMBEDDINGS) is None:
        pool = _require_tensor(run, POOL)
        if cfg.calibration.embedder == "model":
            model, tokenizer = cached_model(cfg)
        else:
            from evop.models import load_tokenizer

            model, tokenizer = None, load_tokenizer(cfg.model)
        run.put_array(EMBEDDINGS, embed(pool, cfg.calibration, tokenizer, model))
    return run.url(EMBEDDINGS)


def sample_calibration_set(cfg: EvoPConfig) -> dict[str, Any]:
    """Draw the calibration blocks from the pool (CCDS or random).

    Returns:
        The calibration summary (method, n_samples, block_len, n_clusters, ...).
    """
    from evop.calibration import sample_pool

    run = Run(cfg)
    saved = run.get_json(SAMPLE)
    if saved is not None and run.get(BLOCKS) is not None:
        return saved["summary"]
    pool = _require_tensor(run, POOL)
    embeddings = run.get_array(EMBEDDINGS) if cfg.calibration.method == "ccds" else None
    calib = sample_pool(pool, cfg.calibration, embeddings)
    run.put_tensor(BLOCKS, calib.blocks)
    run.put_json(SAMPLE, {"pool_indices": calib.pool_indices, "summary": calib.summary()})
    return calib.summary()


def _require_tensor(run: Run, name: str) -> "torch.Tensor":
    tensor = run.get_tensor(name)
    if tensor is None:
        raise RuntimeError(f"missing {run.url(name)}: run the earlier pipeline steps first")
    return tensor


def _search(run: Run):
    from evop.models import num_layers
    from evop.patterns import Pattern, layers_to_remove
    from evop.search import GeneticSearch, influence_prior

    scorer = cached_scorer(run)
    n = num_layers(scorer.model)
    k = layers_to_remove(n, run.cfg.search.sparsity, run.cfg.search.num_remove)
    initial = initial_patterns(run.cfg)
    seeds = [Pattern.parse(p) for p in initial["patterns"]]
    prior = influence_prior(initial["block_influence"]) if initial.get("block_influence") else None
    return GeneticSearch(n, k, run.cfg.search, fitness=scorer, seed_patterns=seeds, layer_prior=prior)


def initial_patterns(cfg: EvoPConfig) -> dict[str, Any]:
    """The heuristic patterns seeding EvoP's initial population (``search.initial_patterns``) and
    the Block Influence behind its mutation prior, computed once and kept in the store, so every
    resume continues the same search.

    Returns:
        ``patterns`` (pattern strings), ``block_influence`` (per layer, or None when the mutation
        prior is off), ``evaluations`` (patterns scored only to find them, e.g.
        the single-layer removals of ``ppl-oneshot``) and ``seconds``.
    """
    from evop.baselines import CountingFitness, block_influence
    from evop.baselines import initial_patterns as heuristics
    from evop.patterns import Pattern, layers_to_remove

    run = Run(cfg)
    saved = run.get_json(INITIAL_PATTERNS)
    if saved is not None:
        return saved
    scorer = cached_scorer(run)
    k = layers_to_remove(scorer.num_layers, cfg.search.sparsity, cfg.search.num_remove)
    counting = CountingFitness(scorer)
    start = time.perf_counter()
    influence = None
    if "shortgpt" in cfg.search.initial_patterns or cfg.search.mutation_prior == "block-influence":
        influence = block_influence(scorer.model, scorer.blocks, cfg.fitness.batch_size)
    seeds = heuristics(cfg.search, scorer.num_layers, k, counting, influence=lambda: influence)
    data = {
        "patterns": [str(p) for p in seeds],
        "block_influence": influence if cfg.search.mutation_prior == "block-influence" else None,
        # The seeds themselves are scored again by the GA (its memo counts them); the rest is extra.
        "evaluations": sum(1 for p in counting.asked if Pattern.parse(p).k != k),
        "seconds": round(time.perf_counter() - start, 3),
    }
    run.put_json(INITIAL_PATTERNS, data)
    if seeds:
        log.info(
            "initial population seeded with %s (%s)", data["patterns"], ", ".join(cfg.search.initial_patterns)
        )
    return data


def search_status(cfg: EvoPConfig) -> dict[str, Any]:
    """Where the search stands in the store: ``{"generation": g, "done": bool}`` (g = -1: none)."""
    state = Run(cfg).checkpoints.latest()
    if state is None:
        return {"generation": -1, "done": False}
    return {"generation": state.generation, "done": state.done}


def run_generation(cfg: EvoPConfig, generation: int) -> dict[str, Any]:
    """Make sure generation ``generation`` of the search is done and checkpointed.

    Resumes from the newest verified checkpoint: generations already in the store are not
    recomputed (a corrupted newest one costs that generation only).

    Returns:
        That generation's history entry plus ``done``, ``best_pattern``, ``evaluations`` and the
        checkpoint's URL.
    """
    run = Run(cfg)
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
    return {
        **entry,
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
        The :class:`~evop.baselines.Outcome` as JSON.
    """
    from evop.baselines import ScoreMemo, block_influence, run_method
    from evop.patterns import layers_to_remove

    run = Run(cfg)
    saved = run.get_json(BASELINE_OUTCOME)
    if saved is not None:
        return saved
    s = cfg.search
    scorer = cached_scorer(run)
    memo = ScoreMemo(
        lambda data: run.put_json(BASELINE_MEMO, data), run.get_json(BASELINE_MEMO), every=MEMO_SAVE_SECONDS
    )
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
        influence=lambda: block_influence(scorer.model, scorer.blocks, cfg.fitness.batch_size),
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


def finalize_search(cfg: EvoPConfig) -> dict[str, Any]:
    """Build ``result.json`` from the final checkpoint; write it to the store and ``output_dir``
    (with ``calibration.safetensors`` beside it for later perplexity checks)."""
    from evop.evaluation import save_blocks
    from evop.experiment import RESULT_FILE, build_result, write_json_atomic

    run = Run(cfg)
    result = run.get_json(RESULT)
    if result is None and cfg.search.method != "evop":
        from evop.baselines import Outcome
        from evop.experiment import build_outcome_result

        saved = run.get_json(BASELINE_OUTCOME)
        if saved is None:
            raise RuntimeError(f"the {cfg.search.method} search at {run.url()} is not finished")
        dense = cached_scorer(run).dense()
        result = build_outcome_result(cfg, Outcome.from_json(saved), dense, run.get_json(SAMPLE)["summary"])
        result["checkpoints"] = run.url()
        run.put_json(RESULT, result)
    if result is None:
        state = run.checkpoints.latest()
        if state is None or not state.done:
            raise RuntimeError(f"the search at {run.url()} is not finished")
        dense = cached_scorer(run).dense()
        seeding = run.get_json(INITIAL_PATTERNS) or {"patterns": [], "evaluations": 0, "seconds": 0.0}
        wall = sum(h["seconds"] for h in state.history) + seeding["seconds"]
        result = build_result(cfg, state, dense, run.get_json(SAMPLE)["summary"], wall)
        result["evaluations"] += seeding["evaluations"]
        result["initial_patterns"] = seeding["patterns"]
        result["checkpoints"] = run.url()
        run.put_json(RESULT, result)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RESULT_FILE, result)
    save_blocks(_require_tensor(run, BLOCKS), out / "calibration.safetensors")
    return result


def prune_model(cfg: EvoPConfig, result: dict[str, Any]) -> str:
    """Save the pruned checkpoint of ``result`` to ``<output_dir>/pruned-model`` (once)."""
    from evop.models import load_model
    from evop.patterns import Pattern
    from evop.pruning import save_pruned

    out = Path(cfg.output_dir) / "pruned-model"
    meta = out / "evop_pattern.json"
    if meta.is_file() and json.loads(meta.read_text()).get("pattern") == result["pattern"]:
        return str(out)
    # A fresh copy: pruning is destructive, and the cached dense model must stay whole.
    model, tokenizer = load_model(cfg.model)
    pattern = Pattern.of(result["num_layers"], result["removed_layers"])
    save_pruned(model, tokenizer, pattern, out, base_model=cfg.model.name_or_path)
    del model
    return str(out)


def evaluate_perplexity(cfg: EvoPConfig, pruned_dir: str) -> dict[str, dict[str, float]]:
    """Dense vs pruned perplexity on the calibration blocks and each held-out text.

    Returns:
        ``{"dense": {set: ppl}, "pruned": {set: ppl}}``.
    """
    from evop.evaluation import heldout_set, perplexities

    run = Run(cfg)
    e = cfg.evaluation
    name = _evaluation_name(
        "perplexity", pruned_dir, e.model_dump_json(include={"heldout", "block_len", "max_blocks", "stride"})
    )
    saved = run.get_json(name)
    if saved is not None:
        return saved
    dense_model, tokenizer = cached_model(cfg)
    sets = {"calibration": _require_tensor(run, BLOCKS)}
    for source in e.heldout:
        sets[source.removeprefix("evop-assets:")] = heldout_set(
            source, tokenizer, e.block_len, e.max_blocks, e.stride
        )
    start = time.perf_counter()
    scores = {
        "dense": perplexities(dense_model, sets, e.batch_size),
        "pruned": perplexities(_pruned_model(cfg, pruned_dir)[0], sets, e.batch_size),
    }
    log.info("perplexity of dense and pruned in %.1f s", time.perf_counter() - start)
    run.put_json(name, scores)
    return scores


def _pruned_model(cfg: EvoPConfig, pruned_dir: str) -> tuple[Any, Any]:
    """The pruned checkpoint, loaded once per process like the dense model."""
    pruned_cfg = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"name_or_path": pruned_dir, "gguf_file": None})}
    )
    return cached_model(pruned_cfg)


def _evaluation_name(kind: str, pruned_dir: str, settings: str) -> str:
    """Store key of an evaluation of one pruned pattern under given settings."""
    import hashlib

    pattern = json.loads((Path(pruned_dir) / "evop_pattern.json").read_text())["pattern"]
    tag = hashlib.sha256(f"{pattern}|{settings}".encode()).hexdigest()[:12]
    return f"evaluation/{kind}-{tag}.json"


def task_directory(cfg: EvoPConfig, tokenizer: Any) -> Path | None:
    """A directory with every lm-eval task YAML the run needs: the offline tasks built from
    ``evaluation.task_source`` (when asked for) plus a link to ``evaluation.include_path``."""
    from evop.assets import resolve_reference
    from evop.downstream import OFFLINE_TASKS, build_offline_tasks

    e = cfg.evaluation
    root = Path(cfg.output_dir) / "lm-eval-tasks"
    if any(t in OFFLINE_TASKS for t in e.tasks):
        build_offline_tasks(
            root / "evop-offline", resolve_reference(e.task_source), e.task_examples, 0, tokenizer
        )
    if e.include_path:
        root.mkdir(parents=True, exist_ok=True)
        link = root / "user-tasks"
        if not link.exists():
            link.symlink_to(Path(e.include_path).resolve(), target_is_directory=True)
    return root if root.exists() else None


def score_downstream(cfg: EvoPConfig, pruned_dir: str) -> dict[str, Any] | None:
    """lm-eval accuracies of the dense and the pruned model (None when no tasks are configured).

    Returns:
        ``{"dense": {task: {...}, "mean_acc": x}, "pruned": {...}}``.
    """
    from evop.downstream import evaluate_tasks

    e = cfg.evaluation
    if not e.tasks:
        return None
    run = Run(cfg)
    settings = e.model_dump_json(
        include={"tasks", "task_source", "task_examples", "include_path", "num_fewshot", "limit"}
    )
    name = _evaluation_name("downstream", pruned_dir, settings)
    saved = run.get_json(name)
    if saved is not None:
        return saved
    dense_model, tokenizer = cached_model(cfg)
    include = task_directory(cfg, tokenizer)
    scores = {}
    for label, model in (("dense", dense_model), ("pruned", _pruned_model(cfg, pruned_dir)[0])):
        start = time.perf_counter()
        scores[label] = evaluate_tasks(
            model, tokenizer, e.tasks, include, e.num_fewshot, e.limit, e.lm_eval_batch_size
        )
        log.info("lm-eval on the %s model: mean acc %s (%.1f s)", label, scores[label].get("mean_acc"),
                 time.perf_counter() - start)  # fmt: skip
    run.put_json(name, scores)
    return scores


def measure_speed(cfg: EvoPConfig, pruned_dir: str) -> dict[str, Any] | None:
    """Dense vs pruned inference speed, side by side on the same prompts (None when disabled)."""
    from evop.speed import add_checkpoint_sizes, compare_speed

    e = cfg.evaluation
    if not e.speed:
        return None
    dense_model, tokenizer = cached_model(cfg)
    report = compare_speed(
        dense_model, _pruned_model(cfg, pruned_dir)[0], tokenizer,
        prompt_len=e.prompt_len, new_tokens=e.new_tokens, runs=e.speed_runs,
    )  # fmt: skip
    add_checkpoint_sizes(report, cfg.model.name_or_path, pruned_dir)
    # Timings are measurements of this machine now: stored for the record, never reused.
    run = Run(cfg)
    run.put_json(_evaluation_name("speed", pruned_dir, str(time.time())), report)
    return report


def write_report(
    cfg: EvoPConfig,
    result: dict[str, Any],
    perplexity: dict[str, dict[str, float]],
    downstream: dict[str, Any] | None,
    speed: dict[str, Any] | None,
) -> dict[str, Any]:
    """``<output_dir>/result.json`` with the evaluation added, and the plots beside it.

    The search's ``result.json`` in the store stays as it was; the copy in ``output_dir`` gains
    ``evaluation`` (perplexities, lm-eval scores per task with stderr and their mean, speed) and
    ``plots`` (PNG paths: fitness per generation, layer removal frequency in the final population).

    Returns:
        The enriched result.
    """
    from evop.experiment import RESULT_FILE, write_json_atomic
    from evop.plots import fitness_curve, layer_removal_frequency

    out = Path(cfg.output_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    state = Run(cfg).checkpoints.latest() if result.get("method", "evop") == "evop" else None
    population = state.population if state is not None else [result["pattern"]]
    paths = {
        "fitness_curve": fitness_curve(result.get("history", []), plots / "fitness_curve.png"),
        "layer_removal_frequency": layer_removal_frequency(
            population, int(result["num_layers"]), plots / "layer_removal_frequency.png"
        ),
    }
    report = {
        **result,
        "evaluation": {"perplexity": perplexity, "downstream": downstream, "speed": speed},
        "plots": {name: str(path) for name, path in paths.items()},
    }
    write_json_atomic(out / RESULT_FILE, report)
    return report


def final_metrics(
    perplexity: dict[str, dict[str, float]],
    downstream: dict[str, Any] | None,
    speed: dict[str, Any] | None,
) -> dict[str, float]:
    """Flat ``name -> value`` metrics of a finished run (what MLflow logs and the demo prints)."""
    out: dict[str, float] = {}
    for label, sets in perplexity.items():
        for text, value in sets.items():
            out[f"{label}_ppl_{Path(text).stem if '/' in text else text}"] = value
    for label, scores in (downstream or {}).items():
        for task, value in scores.items():
            if isinstance(value, dict):
                for metric in ("acc", "acc_norm"):
                    if value.get(metric) is not None:
                        out[f"{label}_{task}_{metric}"] = value[metric]
            elif value is not None:
                out[f"{label}_{task}"] = value
    if speed:
        for name, value in speed["ratios"].items():
            if value is not None:
                out[f"speed_{name}"] = value
        out["speed_ideal"] = speed["ideal"]["compute"]
        if speed.get("measured_vs_ideal") is not None:
            out["speed_measured_vs_ideal"] = speed["measured_vs_ideal"]
        out["dense_params"] = speed["dense"]["params"]
        out["pruned_params"] = speed["pruned"]["params"]
    return out


def register_model(
    cfg: EvoPConfig,
    result: dict[str, Any],
    pruned_dir: str,
    metrics: dict[str, float],
    flow_run_id: str | None,
) -> dict[str, Any] | None:
    """Log the run to MLflow and register the pruned model (None when the registry is disabled).

    The pruned checkpoint and ``result.json`` are only read: when registration fails they stay,
    and a re-run retries only this step.
    """
    from evop.registry import FLOW_RUN_TAG, log_and_register

    if not cfg.registry.enabled:
        return None
    run = Run(cfg)
    state = run.checkpoints.latest()
    tags = {FLOW_RUN_TAG: flow_run_id} if flow_run_id else {}
    return log_and_register(
        cfg, result, pruned_dir, metrics,
        artifacts=[str(Path(cfg.output_dir) / "result.json")],
        tags=tags, final_population=state.population if state else None,
    )  # fmt: skip
