"""Side-by-side comparison of pattern search methods: same model, calibration set and fitness.

``evop compare`` (and ``benchmarks/compare.py``) runs a :class:`Comparison`, for one model:

1. **methods x sparsities**: every method of ``spec.methods`` (see :mod:`evop.searches`) at every
   sparsity, on the calibration set of the config; ``random`` gets exactly as many evaluations as
   EvoP used at that sparsity. Each chosen pattern is scored on held-out text of other domains.
2. **CCDS vs random sampling**: EvoP on calibration sets drawn both ways, for several seeds;
   held-out perplexity of the patterns found (mean and spread).
3. **GA vs greedy**: EvoP (GA + polish), its GA alone and the GA at SLEB's budget next to SLEB's
   greedy search under the same fitness and calibration set (read from part 1).
4. **search quality against the optimum**: exhaustive search at a small k gives the true
   optimum; how often EvoP (several seeds), random search with the same budget and the
   heuristics find it, and with what share of the evaluations.

Work is shared and resumable: every pattern score goes into a memo per calibration set (saved in
``out_dir``), so methods never score a pattern twice and a re-run after a crash continues where
it stopped. Reported search times are what each method would have spent *alone*: the first
measured cost of every pattern it asked for, shared scores included. Chosen patterns are scored
on held-out text with their layers skipped in place (the same perplexity as the saved pruned
checkpoint, ``tests/test_models.py``), so no checkpoint is written per row. With ``scale.backend:
ray`` a pool of Ray actors scores the calibration patterns (:mod:`evop.method.parallel`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evop.config import EvoPConfig, without_neutral_defaults
from evop.eval.compare_judge import Judge
from evop.eval.compare_report import geomean, render_markdown
from evop.eval.compare_spec import (
    ANYTIME_PLOT,
    AT_SLEB_BUDGET,
    COMPARE_FILE,
    MEMO_SAVE_SECONDS,
    TABLE_FILE,
    VARIANTS,
    CompareSpec,
    anytime_to_judge,
)
from evop.eval.plots import anytime_plot
from evop.method.influence import layer_influence
from evop.method.outcome import Outcome
from evop.method.patterns import Pattern, PatternSpace, layers_to_remove
from evop.method.scoring import CountingFitness, ScoreMemo, anytime
from evop.records import finite_or_none, write_json_atomic
from evop.searches import run_method

if TYPE_CHECKING:
    import torch

    from evop.method.fitness import PatternScorer

log = logging.getLogger(__name__)


class Comparison:
    """One comparison run: the model loaded once, calibration and held-out sets, memos, results.

    Args:
        cfg: Model, calibration, search (GA and baseline settings), fitness and evaluation
            (held-out sources and window settings; lm-eval tasks) of the comparison.
        spec: What to compare.
        out_dir: Where ``compare.json``, ``compare.md`` and the memos go (resumable).
        model: An already loaded ``(model, tokenizer)`` (tests); loaded from ``cfg`` when None.
    """

    def __init__(self, cfg: EvoPConfig, spec: CompareSpec, out_dir: str | Path, model: Any = None):
        from evop.models.layers import num_layers
        from evop.models.loading import load_model

        self.cfg = cfg
        self.spec = spec
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model, self.tokenizer = model if model is not None else load_model(cfg.model)
        self.num_layers = num_layers(self.model)
        # name -> (blocks (n, T), summary, each block's CCDS cluster or None)
        self._calibration: dict[str, tuple[torch.Tensor, dict[str, Any], list[int] | None]] = {}
        self._scorers: dict[str, PatternScorer] = {}
        self._pool: tuple[str, Any] | None = None  # (calibration set, its RayPool): scale.backend ray
        self._memos: dict[str, ScoreMemo] = {}
        self.judge = Judge(cfg, self.model, self.tokenizer, self.out, spec.lm_eval)
        self.heldout, self.downstream = self.judge.heldout, self.judge.downstream
        self.results = self._load_results()

    # ------------------------------------------------------------------ state on disk

    def fingerprint(self) -> str:
        """Hash of everything that decides the results: a changed config starts over."""
        e = self.cfg.evaluation
        payload = {
            "search": self.cfg.search_hash(),
            "heldout": [e.heldout, e.block_len, e.max_blocks],
            "tasks": [e.tasks, e.task_source, e.task_examples, e.num_fewshot, e.limit]
            if self.spec.lm_eval
            else None,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def _fitness_key(self) -> str:
        """Calibration scores depend on the model and the fitness settings, and the per-stage sums
        of racing on the batching too (the dense prefix cache changes nothing)."""
        f = self.cfg.fitness.model_dump(mode="json", exclude={"prefix_cache_mb"})
        f = without_neutral_defaults("fitness", f)  # memos of earlier versions stay valid
        payload = [self.cfg.model.model_dump(mode="json"), f, self.cfg.search.evopress_cheap_fraction]
        if self.cfg.calibration.order != "text":  # the blocks of each stage (text order: earlier memos)
            payload.append(self.cfg.calibration.order)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    def _load_results(self) -> dict[str, Any]:
        path = self.out / COMPARE_FILE
        fresh = {"fingerprint": self.fingerprint(), "units": {}, "heldout_scores": {}}
        if not path.is_file():
            return fresh
        data = json.loads(path.read_text())
        if data.get("fingerprint") != fresh["fingerprint"]:
            log.warning("%s is from another configuration; starting a new comparison", path)
            return fresh
        log.info("resuming the comparison in %s (%d results done)", self.out, len(data.get("units", {})))
        return {**fresh, "units": data.get("units", {})}

    def _save(self) -> None:
        self.judge.save()
        write_json_atomic(self.out / COMPARE_FILE, self.report())
        (self.out / TABLE_FILE).write_text(render_markdown(self.report()))

    def _unit(self, key: str, compute) -> dict[str, Any]:
        """A result computed once: read from ``compare.json`` when a previous run finished it."""
        units = self.results["units"]
        if key not in units:
            log.info("compare: %s", key)
            units[key] = compute()
            for memo in self._memos.values():
                memo.flush()
            self._save()
        return units[key]

    # ------------------------------------------------------------------ data

    def calibration(self, sampler: str | None = None, seed: int | None = None) -> str:
        """Name of the calibration set drawn with ``sampler``/``seed`` (defaults: the config's)."""
        from evop.method.calibration import build_calibration_set

        c = self.cfg.calibration
        c = c.model_copy(update={"method": sampler or c.method, "seed": c.seed if seed is None else seed})
        name = f"{c.method}-seed{c.seed}"
        if name not in self._calibration:
            model = self.model if c.embedder == "model" else None
            calib = build_calibration_set(c, self.tokenizer, model)
            self._calibration[name] = (calib.blocks, calib.summary(), calib.sample_clusters or None)
            path = self.out / f"memo-{name}-{self._fitness_key()}.json"
            saved = json.loads(path.read_text()) if path.is_file() else None
            # The file name holds the model and fitness settings; the blocks themselves (hence the
            # calibration settings) are checked here. Memos written before the check lack the field.
            blocks = hashlib.sha256(calib.blocks.cpu().numpy().tobytes()).hexdigest()[:12]
            if saved is not None and saved.get("blocks", blocks) != blocks:
                stale = path.rename(path.with_name(f"{path.stem}-blocks-{saved['blocks']}.json"))
                log.warning("%s: scores of other calibration blocks; kept as %s", path.name, stale.name)
                saved = None
            space = PatternSpace.any_size(self.num_layers, self.cfg.search.protected_layers)
            problem = ScoreMemo.problem(saved, space) if saved is not None else None
            if problem is not None:  # not written by a search of this model: nothing in it is believed
                rejected = path.rename(path.with_name(f"{path.stem}-rejected.json"))
                log.error("%s: %s; kept as %s, its scores are computed again", path, problem, rejected.name)
                saved = None
            self._memos[name] = ScoreMemo(
                lambda data, path=path: write_json_atomic(path, {"blocks": blocks, **data}),
                saved,
                every=MEMO_SAVE_SECONDS,
            )
        return name

    def scorer(self, calib: str, cheap: bool = False) -> "PatternScorer":
        from evop.method.fitness import PatternScorer

        key = f"{calib}/{'cheap' if cheap else 'full'}"
        if key not in self._scorers:
            if cheap:
                full = self.scorer(calib)
                self._scorers[key] = full.first_blocks(self.cfg.search.evopress_cheap_fraction)
            elif self.cfg.scale.backend == "ray":  # the actors score; this process reads the layout
                self._scorers[key] = self._on_ray(calib)
            else:
                blocks, _, clusters = self._calibration[calib]
                self._scorers[key] = PatternScorer.from_config(self.model, blocks, self.cfg.fitness, clusters)
        return self._scorers[key]

    def _on_ray(self, calib: str) -> Any:
        """The scorer of ``calib`` on a pool of Ray actors (``cfg.scale``), as the pipeline's
        search does. One pool at a time: the actors hold one calibration set, so the pool of the
        previous set is shut down (its scores are in its memo) and its scorers forgotten."""
        from evop.method.parallel import ParallelScorer, RayPool

        if self._pool is not None and self._pool[0] != calib:
            previous, pool = self._pool
            pool.shutdown()
            self._scorers = {k: v for k, v in self._scorers.items() if not k.startswith(f"{previous}/")}
            self._pool = None
        blocks, _, clusters = self._calibration[calib]
        if self._pool is None:
            self._pool = (calib, RayPool(self.cfg.scale, self.cfg.model, blocks, self.cfg.fitness, clusters))
        return ParallelScorer.on_pool(self.model, blocks, self.cfg.fitness, clusters, self._pool[1])

    def close(self) -> None:
        """Shut down the Ray pool, if any (its actors hold a model each)."""
        if self._pool is not None:
            self._pool[1].shutdown()
            self._pool = None

    def fitness(self, calib: str, cheap: bool = False) -> CountingFitness:
        """A fresh per-method view of the shared, persisted memo of ``calib``."""
        return self._memos[calib].fitness(self.scorer(calib, cheap), cheap)

    # ------------------------------------------------------------------ the parts

    def search(
        self, method: str, k: int, calib: str, seed: int | None = None, budget: int | None = None
    ) -> Outcome:
        update: dict[str, Any] = {"method": method, "seed": self.cfg.search.seed if seed is None else seed}
        update.update(VARIANTS.get(method, {}))
        if method == AT_SLEB_BUDGET:
            # More generations of the same GA (same seed: the first ones replay from the memo), as
            # many as fit in SLEB's evaluation count without exceeding it. No polish: this is the
            # GA alone against the greedy search, at equal cost.
            s = self.cfg.search
            generations = max(1, (budget - s.population) // (s.population - s.elitism))
            update.update(method="evop", generations=generations, patience=generations, polish_rounds=0)
        settings = self.cfg.search.model_copy(update=update)
        full = self.fitness(calib)
        cheap = self.fitness(calib, cheap=True) if method == "evopress" else None
        blocks = self._calibration[calib][0]
        influence_seconds = [0.0]

        def influence() -> list[float]:
            start = time.perf_counter()
            scores = layer_influence(self.model, blocks, self.cfg.fitness.batch_size)
            influence_seconds[0] = time.perf_counter() - start
            return scores

        outcome = run_method(settings, self.num_layers, k, full, cheap, influence, budget)
        outcome.method = method
        # What the method would have cost alone: scoring time of every pattern it asked for.
        outcome.details["search_seconds"] = round(
            full.seconds + (cheap.seconds if cheap else 0.0) + influence_seconds[0], 2
        )
        trace = anytime(full, k, [cheap] if cheap else [], influence_seconds[0])
        outcome.details["anytime"] = [[round(t, 2), p, finite_or_none(f)] for t, p, f in trace]
        return outcome

    def row(self, outcome: Outcome, sparsity: float | None, calib: str) -> dict[str, Any]:
        return {
            "method": outcome.method,
            "sparsity": sparsity,
            "k": outcome.pattern.k,
            "removed_layers": list(outcome.pattern.removed),
            "pattern": str(outcome.pattern),
            "calibration": calib,
            "calib_fitness": finite_or_none(outcome.fitness),
            "heldout_ppl": self.heldout(outcome.pattern),
            "downstream": self.downstream(outcome.pattern),
            "evaluations": outcome.evaluations,
            "evaluations_to_best": outcome.evaluations_to_best,
            "cheap_evaluations": outcome.cheap_evaluations,
            "tokens_forwarded": outcome.tokens,
            "search_seconds": outcome.details["search_seconds"],
            "wall_seconds": round(outcome.seconds, 2),
        }

    def run_main(self) -> None:
        calib = self.calibration()
        self._unit(
            "dense",
            lambda: {
                "method": "dense",
                "sparsity": 0.0,
                "k": 0,
                "removed_layers": [],
                "pattern": "",
                "calibration": calib,
                "calib_fitness": finite_or_none(self.scorer(calib).dense()),
                "heldout_ppl": self.heldout(None),
                "downstream": self.downstream(None),
                "evaluations": 0,
                "cheap_evaluations": 0,
                "search_seconds": 0.0,
                "wall_seconds": 0.0,
            },
        )
        methods = sorted(self.spec.methods, key=lambda m: m != "evop")  # EvoP first: random's budget
        for sparsity in self.spec.sparsities:
            k = layers_to_remove(self.num_layers, sparsity)
            for method in methods:
                budget = None
                if method == "random" and "evop" in methods:
                    budget = self.results["units"][f"main/evop/{sparsity}"]["evaluations"]
                self._unit(
                    f"main/{method}/{sparsity}", partial(self._main_row, method, sparsity, k, calib, budget)
                )
            sleb = self.results["units"].get(f"main/sleb/{sparsity}")
            if "evop" in methods and sleb and "evaluations" in sleb:
                self._unit(
                    f"main/{AT_SLEB_BUDGET}/{sparsity}",
                    partial(self._main_row, AT_SLEB_BUDGET, sparsity, k, calib, sleb["evaluations"]),
                )

    def _main_row(
        self, method: str, sparsity: float, k: int, calib: str, budget: int | None
    ) -> dict[str, Any]:

        def compute() -> dict[str, Any]:
            outcome = self.search(method, k, calib, budget=budget)
            row = self.row(outcome, sparsity, calib)
            # The anytime curve: held-out quality of the method's best pattern so far. Points
            # not judged yet (None) are judged by run_anytime, after every search.
            trace = anytime_to_judge(method, outcome.details["anytime"], self.spec.anytime_points)
            row["anytime"] = [
                {"seconds": seconds, "pattern": pattern, "calib_fitness": fitness, "heldout_geomean": None}
                for seconds, pattern, fitness in trace
            ]
            self._judge_anytime(row, judge=False)
            return row

        return self._guarded(compute, method, sparsity, k)

    def _judge_anytime(self, row: dict[str, Any], judge: bool = True) -> bool:
        """Fill the held-out geomean of ``row``'s anytime points: every point when ``judge``,
        else only those whose pattern is judged already. True when something was filled."""
        filled = False
        for point in row.get("anytime", []):
            if point["heldout_geomean"] is not None:
                continue
            if not judge and not self.judge.judged(point["pattern"]):
                continue
            point["heldout_geomean"] = geomean(list(self.heldout(Pattern.parse(point["pattern"])).values()))
            filled = True
        return filled

    def run_anytime(self) -> None:
        """Judge the anytime points the searches left. It runs after every search of the run:
        a point costs a held-out judgement (about 11 min on Gemma-3 on one core), and a run
        stopped early should have spent its time on searches, which only it can do."""
        for key, row in self.results["units"].items():
            if key.startswith("main/") and self._judge_anytime(row):
                self._save()

    def _guarded(self, compute, method: str, sparsity: float | None, k: int) -> dict[str, Any]:
        """A refused search (e.g. exhaustive over too many patterns) becomes a row saying why."""
        from evop.baselines.sampling import SearchTooLargeError

        try:
            return compute()
        except SearchTooLargeError as err:
            log.warning("%s at k=%d skipped: %s", method, k, err)
            return {"method": method, "sparsity": sparsity, "k": k, "skipped": str(err)}

    def run_ablation(self) -> None:
        sparsity = self.spec.ablation_sparsity or self.spec.sparsities[0]
        k = layers_to_remove(self.num_layers, sparsity)
        for seed in self.spec.ablation_seeds:
            for sampler in ("ccds", "random"):

                def compute(sampler=sampler, seed=seed) -> dict[str, Any]:
                    calib = self.calibration(sampler, seed)
                    row = self.row(self.search("evop", k, calib, seed=seed), sparsity, calib)
                    return {**row, "sampler": sampler, "seed": seed}

                self._unit(f"ablation/{sampler}/{seed}", compute)

    def run_optimum(self) -> None:
        k = self.spec.optimum_k
        calib = self.calibration()
        best = self._unit(
            f"optimum/exhaustive/{k}",
            lambda: self._guarded(
                lambda: self.row(self.search("exhaustive", k, calib), None, calib), "exhaustive", None, k
            ),
        )
        if "skipped" in best:
            return
        for seed in self.spec.optimum_seeds:
            evop = self._unit(
                f"optimum/evop/{seed}",
                lambda s=seed: self.row(self.search("evop", k, calib, seed=s), None, calib),
            )
            self._unit(
                f"optimum/random/{seed}",
                lambda s=seed, b=evop["evaluations"]: self.row(
                    self.search("random", k, calib, seed=s, budget=b), None, calib
                ),
            )
        for method in ("sleb", "ppl-oneshot", "shortgpt"):
            self._unit(f"optimum/{method}", lambda m=method: self.row(self.search(m, k, calib), None, calib))

    def run(self) -> dict[str, Any]:
        """Run every part (finished parts are read back), write ``compare.json`` and ``compare.md``."""
        start = time.perf_counter()
        try:
            self.run_main()
            if self.spec.ablation_seeds:
                self.run_ablation()
            if self.spec.optimum_k:
                self.run_optimum()
        finally:
            self.close()
        self.run_anytime()  # held-out judgements: in this process
        self._save()
        anytime_plot(self.report(), self.out / ANYTIME_PLOT)
        log.info("comparison finished in %.1f s -> %s", time.perf_counter() - start, self.out / TABLE_FILE)
        return self.report()

    # ------------------------------------------------------------------ report

    def report(self) -> dict[str, Any]:
        """Everything measured so far, in the shape of ``compare.json``."""
        e = self.cfg.evaluation
        return {
            "fingerprint": self.results["fingerprint"],
            "model": self.cfg.model.name_or_path,
            "num_layers": self.num_layers,
            "fitness_metric": self.cfg.fitness.metric,
            "calibration": {name: summary for name, (_, summary, _) in self._calibration.items()}
            | {"dataset": self.cfg.calibration.dataset},
            "heldout": {"sources": list(e.heldout), "block_len": e.block_len, "max_blocks": e.max_blocks},
            "spec": asdict(self.spec),
            "search": self.cfg.search.model_dump(mode="json"),
            "units": self.results["units"],
            "heldout_scores": self.judge.scores,
        }
