"""How a comparison judges a chosen pattern: held-out perplexity per domain and lm-eval accuracy.

Scores are memoised per pattern and persisted (``heldout-<key>.json`` in the comparison's
directory): they depend on the model and the held-out windows only, so they outlive a changed
search or calibration config.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evop.config import EvoPConfig
from evop.eval.compare_spec import domain_name
from evop.method.patterns import Pattern
from evop.records import finite_or_none, write_json_atomic

if TYPE_CHECKING:
    from evop.method.fitness import PatternScorer

log = logging.getLogger(__name__)


class Judge:
    """Held-out perplexity and (``lm_eval``) downstream accuracy of patterns of one model."""

    def __init__(self, cfg: EvoPConfig, model: Any, tokenizer: Any, out: Path, lm_eval: bool):
        self.cfg, self.model, self.tokenizer, self.out, self.lm_eval = cfg, model, tokenizer, out, lm_eval
        self._heldout: dict[str, PatternScorer] | None = None
        self.scores: dict[str, dict[str, float | None]] = {}  # pattern -> domain -> perplexity
        self._heldout_path = out / f"heldout-{self._heldout_key()}.json"
        if self._heldout_path.is_file():
            self.scores = json.loads(self._heldout_path.read_text())

    def _heldout_key(self) -> str:
        """Held-out scores depend on the model and the held-out windows only: they outlive a
        changed search or calibration config."""
        import hashlib

        e = self.cfg.evaluation
        payload = [self.cfg.model.model_dump(mode="json"), e.heldout, e.block_len, e.max_blocks]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    def save(self) -> None:
        """Write the scores, keeping those another process (a second comparison of the same model,
        ``benchmarks/oracle.py``) wrote to the same file meanwhile."""
        if self._heldout_path.is_file():
            for pattern, domains in json.loads(self._heldout_path.read_text()).items():
                mine = self.scores.setdefault(pattern, {})
                for domain, value in domains.items():
                    mine.setdefault(domain, value)
        write_json_atomic(self._heldout_path, self.scores)

    def heldout_scorers(self) -> dict[str, "PatternScorer"]:
        from evop.assets.build import DEFAULT_ASSETS, prepare_assets
        from evop.eval.perplexity import text_blocks
        from evop.method.calibration import split_document_slice
        from evop.method.fitness import PatternScorer

        if self._heldout is None:
            e = self.cfg.evaluation
            wanted = [
                split_document_slice(s.removeprefix("evop-assets:"))[0]
                for s in e.heldout
                if s.startswith("evop-assets:")
            ]
            extra = [name for name in wanted if name not in DEFAULT_ASSETS]
            if extra:
                prepare_assets(tuple(extra))
            self._heldout = {}
            for source in e.heldout:
                blocks = text_blocks(source, self.tokenizer, e.block_len, e.max_blocks)
                self._heldout[domain_name(source)] = PatternScorer(
                    self.model, blocks, "ppl", e.batch_size, prefix_cache_mb=self.cfg.fitness.prefix_cache_mb
                )
        return self._heldout

    def judged(self, pattern: str) -> bool:
        """Whether ``pattern`` (its string form) has a held-out score on every domain."""
        scores = self.scores.get(pattern, {})
        return all(domain_name(source) in scores for source in self.cfg.evaluation.heldout)

    def heldout(self, pattern: Pattern | None) -> dict[str, float | None]:
        """Held-out perplexity per domain of ``pattern`` (None: the dense model), memoised."""
        key = "dense" if pattern is None else str(pattern)
        if self.judged(key):  # without building the scorers: a dense forward per domain
            return self.scores[key]
        scores = self.scores.setdefault(key, {})
        for domain, scorer in self.heldout_scorers().items():
            if domain not in scores:
                start = time.perf_counter()
                scores[domain] = finite_or_none(scorer.dense() if pattern is None else scorer(pattern))
                seconds = time.perf_counter() - start
                log.info("held-out %s on %s: ppl %s (%.0f s)", key, domain, scores[domain], seconds)
                # Judging is costly too (a large vocabulary): a stopped comparison keeps every
                # finished domain of every pattern.
                self.save()
        return scores

    def downstream(self, pattern: Pattern | None) -> dict[str, float | None] | None:
        """lm-eval accuracy per task (acc_norm where the task has it) of ``pattern``, in place."""
        if not self.lm_eval or not self.cfg.evaluation.tasks:
            return None
        from evop.eval.downstream import evaluate_tasks, task_directory
        from evop.models.layers import layers_kept, num_layers

        e = self.cfg.evaluation
        include = task_directory(self.cfg.model_copy(update={"output_dir": str(self.out)}), self.tokenizer)
        kept = range(num_layers(self.model)) if pattern is None else pattern.kept
        use_cache = self.model.config.use_cache
        self.model.config.use_cache = False  # skipped layers break the KV-cache bookkeeping
        try:
            with layers_kept(self.model, kept):
                scores = evaluate_tasks(
                    self.model, self.tokenizer, e.tasks, include, e.num_fewshot, e.limit, e.lm_eval_batch_size
                )
        finally:
            self.model.config.use_cache = use_cache
        out = {}
        for task, value in scores.items():
            if isinstance(value, dict):
                out[task] = value.get("acc_norm") if value.get("acc_norm") is not None else value.get("acc")
        out["mean_acc"] = scores.get("mean_acc")
        return out
