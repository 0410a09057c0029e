"""Downstream accuracy with lm-evaluation-harness, offline: tasks built from held-out text.

The standard benchmarks need the Hugging Face Hub for their data, so :func:`build_offline_tasks`
writes two zero-shot 4-way multiple-choice tasks from local text (chance 0.25): ``evop_lastword``
(a passage's last word, LAMBADA-style) and ``evop_continuation`` (its next sentence).
:func:`evaluate_tasks` scores a model in memory on them or on any lm-eval task whose data is
reachable; :func:`task_directory` gathers the task YAMLs one run needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evop.config import EvoPConfig
from evop.environment import temporary_env
from evop.errors import BadInputError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

LASTWORD_TASK = "evop_lastword"


CONTINUATION_TASK = "evop_continuation"


OFFLINE_TASKS: tuple[str, ...] = (LASTWORD_TASK, CONTINUATION_TASK)


# lm-eval tag that names both offline tasks at once.
OFFLINE_TAG = "evop_offline"


N_CHOICES = 4


MAX_PASSAGE_WORDS = 60


# Sentences shorter than this (in words) are headlines, bylines or fragments: never used.
MIN_SENTENCE_WORDS = 4


# Metrics copied from lm-eval's result rows, with their standard errors.
_METRICS = ("acc", "acc_norm", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


# The variables that keep transformers / datasets / huggingface_hub off the network.
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) and whitespace.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")


_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[A-Za-z]$")


_TRAILING_PUNCT = re.compile(r"[\"').,;:!?\]]+$")


class UnknownTaskError(BadInputError):
    """A task name that neither the local task directories nor lm-eval's registry know."""


def split_sentences(text: str) -> list[str]:
    """Split text into sentences at ``.``, ``!`` or ``?`` followed by whitespace (a simple regex:
    abbreviations such as "Mr. Smith" split too, which only shortens some passages)."""
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def _read_texts(source_jsonl: str | os.PathLike[str]) -> list[str]:
    texts = []
    with open(source_jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                text = json.loads(line).get("text", "")
                if text.strip():
                    texts.append(text)
    return texts


def _passages(doc: list[str], rng: random.Random, min_sents: int, max_sents: int) -> Iterator[list[str]]:
    """Consecutive, non-overlapping runs of ``min_sents``..``max_sents`` sentences of ``doc``."""
    i = 0
    while i + min_sents <= len(doc):
        n = rng.randint(min_sents, max_sents)
        yield doc[i : i + n]
        i += n


def _length_key(word: str, tokenizer: Any | None) -> int:
    """What distractors are matched on: the number of tokens of ``" word"`` (the continuation
    lm-eval scores) when a tokenizer is given, else the number of characters."""
    if tokenizer is None:
        return len(word)
    return len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])


def _pick_distractors(
    rng: random.Random, target: str, pool: Sequence[str], key: int, key_of: dict[str, int], n: int
) -> list[str] | None:
    """``n`` distinct pool entries other than ``target``, preferring the same capitalisation (a
    capital letter alone would give a lowercase target away) and then the length key closest to
    ``key`` (ties broken at random); ``None`` if the pool is too small."""
    candidates = sorted({w for w in pool if w.lower() != target.lower()})
    if len(candidates) < n:
        return None
    rng.shuffle(candidates)
    capital = target[0].isupper()
    # Stable sort: random order among equals.
    candidates.sort(key=lambda w: (w[0].isupper() != capital, abs(key_of[w] - key)))
    # Draw from the closest few so the same near-matches are not reused for every example.
    return rng.sample(candidates[: max(n, 4 * n)], n)


def _with_target(rng: random.Random, target: str, distractors: list[str]) -> tuple[list[str], int]:
    label = rng.randrange(len(distractors) + 1)
    choices = list(distractors)
    choices.insert(label, target)
    return choices, label


def _lastword_examples(
    docs: list[list[str]], n: int, rng: random.Random, tokenizer: Any | None
) -> list[dict]:
    raw = []  # (context, target)
    for doc in docs:
        for passage in _passages(doc, rng, 2, 4):
            # Drop sentences from the front until the passage fits (at least 2 remain).
            while len(passage) > 2 and sum(len(s.split()) for s in passage) > MAX_PASSAGE_WORDS:
                passage = passage[1:]
            words = " ".join(passage).split()
            if len(words) > MAX_PASSAGE_WORDS:
                continue
            target = _TRAILING_PUNCT.sub("", words[-1])
            if len(target) < 3 or not _WORD.match(target):
                continue
            raw.append((" ".join(words[:-1]), target))
    rng.shuffle(raw)
    raw = raw[:n]
    # The distractor pool: every passage's last word (all candidates, not only the kept ones).
    pool = sorted({t for _, t in raw})
    key_of = {w: _length_key(w, tokenizer) for w in pool}
    examples = []
    for context, target in raw:
        distractors = _pick_distractors(rng, target, pool, key_of[target], key_of, N_CHOICES - 1)
        if distractors is None:
            continue
        choices, label = _with_target(rng, target, distractors)
        examples.append({"context": context, "choices": choices, "label": label, "target": target})
    return examples


def _continuation_examples(docs: list[list[str]], n: int, rng: random.Random) -> list[dict]:
    raw = []  # (doc index, context, next sentence)
    for d, doc in enumerate(docs):
        for passage in _passages(doc, rng, 3, 4):
            context, target = " ".join(passage[:-1]), passage[-1]
            if len(context.split()) + len(target.split()) > 2 * MAX_PASSAGE_WORDS:
                continue
            raw.append((d, context, target))
    rng.shuffle(raw)
    raw = raw[:n]
    # Distractors: sentences of other documents, of about the target's word count.
    sentences = [(d, s) for d, doc in enumerate(docs) for s in doc]
    examples = []
    for d, context, target in raw:
        n_words = len(target.split())
        near = [s for e, s in sentences if e != d and abs(len(s.split()) - n_words) <= max(3, n_words // 4)]
        near = sorted(set(near) - {target})
        if len(near) < N_CHOICES - 1:
            continue
        choices, label = _with_target(rng, target, rng.sample(near, N_CHOICES - 1))
        examples.append({"context": context, "choices": choices, "label": label})
    return examples


def _task_yaml(name: str, data_file: Path, cache_dir: Path) -> str:
    # JSON is valid YAML: no quoting surprises for paths or Jinja templates.
    config = {
        "task": name,
        "tag": [OFFLINE_TAG],
        "dataset_path": "json",
        # cache_dir: datasets' Arrow cache for this file stays beside it, not in ~/.cache.
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    return json.dumps(config, indent=2) + "\n"


def build_offline_tasks(
    out_dir: str | os.PathLike[str],
    source_jsonl: str | os.PathLike[str],
    n_examples: int = 200,
    seed: int = 0,
    tokenizer: Any | None = None,
) -> Path:
    """Write the offline multiple-choice tasks (``evop_lastword``, ``evop_continuation``).

    Each task is a directory ``out_dir/<task>/`` with ``<task>.yaml`` and ``<task>.jsonl``; pass
    ``out_dir`` as ``include_path`` to :func:`evaluate_tasks` (or to ``lm_eval --include_path``).
    Both tasks also carry the tag ``evop_offline``.

    Args:
        out_dir: Where to write the task directories (created; existing task files are replaced).
        source_jsonl: Held-out text, one JSON document per line with a ``"text"`` field (e.g.
            ``asset_path("news")``); use text the pruning search did not calibrate on.
        n_examples: At most this many examples per task (fewer if the text is short).
        seed: Seeds the choice of passages, distractors and answer positions.
        tokenizer: If given, last-word distractors are matched to the target's token count
            (else to its character count).

    Returns:
        ``out_dir``, the include path.

    Raises:
        ValueError: If the text yields no example for a task.
    """
    out_dir = Path(out_dir).resolve()
    rng = random.Random(seed)
    docs = [
        [s for s in split_sentences(text) if len(s.split()) >= MIN_SENTENCE_WORDS]
        for text in _read_texts(source_jsonl)
    ]
    built = {
        LASTWORD_TASK: _lastword_examples(docs, n_examples, random.Random(rng.random()), tokenizer),
        CONTINUATION_TASK: _continuation_examples(docs, n_examples, random.Random(rng.random())),
    }
    for name, examples in built.items():
        if not examples:
            raise ValueError(f"{source_jsonl}: too little text to build any {name} example")
        task_dir = out_dir / name
        task_dir.mkdir(parents=True, exist_ok=True)
        data_file = task_dir / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
        (task_dir / f"{name}.yaml").write_text(_task_yaml(name, data_file, out_dir / ".datasets-cache"))
        log.info("%s: %d examples from %s in %s", name, len(examples), source_jsonl, task_dir)
    return out_dir


@contextlib.contextmanager
def offline_hf_env() -> Iterator[None]:
    """Hub-offline flags and a private, temporary ``HF_HOME`` / ``HF_DATASETS_CACHE`` while the
    block runs; the previous environment is restored afterwards.

    ``datasets`` and ``huggingface_hub`` read these variables when first imported, so they only
    take full effect if that import happens inside the block (lm-eval imports ``datasets``
    lazily); the offline task YAMLs name their own ``cache_dir`` either way.
    """
    with tempfile.TemporaryDirectory(prefix="evop-hf-") as home:
        wanted = {**_OFFLINE_ENV, "HF_HOME": home, "HF_DATASETS_CACHE": str(Path(home) / "datasets")}
        with temporary_env(**wanted):
            yield


def _float(x: Any) -> float | None:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" for a stderr it could not compute
    return value if math.isfinite(value) else None


def _task_manager(tasks: Sequence[str], include_path: str | os.PathLike[str] | None) -> Any:
    """A TaskManager that knows ``tasks``, indexing lm-eval's 1000s of built-in tasks only when a
    name is not found locally (that indexing costs seconds)."""
    from lm_eval.tasks import TaskManager

    include = str(include_path) if include_path is not None else None
    if include is not None:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include, include_defaults=True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f"{include} and lm-eval's built-in tasks" if include else "lm-eval's built-in tasks"
        raise UnknownTaskError(
            f"unknown lm-eval task(s) {', '.join(map(repr, unknown))}; looked in {where}. "
            f"Build the offline tasks ({', '.join(OFFLINE_TASKS)}) with build_offline_tasks() "
            "and pass their directory as include_path."
        )
    return manager


def check_task_names(tasks: Sequence[str], include_path: str | os.PathLike[str] | None = None) -> None:
    """Check that every task name is one of EvoP's offline tasks, in ``include_path`` or in lm-eval's
    registry, before any model is loaded (indexing lm-eval's registry takes seconds, so it is
    done only for names that are not offline tasks).

    Raises:
        UnknownTaskError: naming the unknown tasks and where they were looked for.
    """
    others = [t for t in tasks if t not in OFFLINE_TASKS]
    if not others:
        return
    from lm_eval.tasks import TaskManager

    include = str(include_path) if include_path is not None else None
    known = TaskManager(include_path=include, include_defaults=True).all_tasks
    unknown = [t for t in others if t not in known]
    if unknown:
        where = f"{include} and lm-eval's built-in tasks" if include else "lm-eval's built-in tasks"
        raise UnknownTaskError(
            f"evaluation.tasks: unknown lm-eval task(s) {', '.join(map(repr, unknown))}; looked in "
            f"{where}. EvoP's offline tasks are {', '.join(OFFLINE_TASKS)}; for your own task YAMLs "
            "set evaluation.include_path to their directory"
        )


def evaluate_tasks(
    model: "nn.Module",
    tokenizer: Any,
    tasks: list[str],
    include_path: str | os.PathLike[str] | None = None,
    num_fewshot: int = 0,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, Any]:
    """Score an in-memory model (dense or pruned) on lm-eval tasks.

    Runs with the Hub offline and a throw-away ``HF_HOME`` (see :func:`offline_hf_env`). Standard
    task names (``arc_easy``, ``hellaswag``...) resolve through lm-eval's registry but need their
    dataset from the Hub: offline they fail with the ``datasets`` error that names it.

    Args:
        model: A causal LM (``transformers.PreTrainedModel``), evaluated on its own device.
        tokenizer: Its tokenizer.
        tasks: Task, group or tag names, e.g. ``["evop_lastword", "evop_continuation"]``.
        include_path: A directory of extra task YAMLs, e.g. from :func:`build_offline_tasks`.
        num_fewshot: Few-shot examples per prompt (drawn from the test split for offline tasks).
        limit: At most this many examples per task (a float < 1: that fraction).
        batch_size: Requests per forward pass.
        device: If given, the model is moved there (in place) first.

    Returns:
        ``{task: {"acc": ..., "acc_stderr": ..., "acc_norm": ..., "acc_norm_stderr": ...,
        "n_samples": ...}, "mean_acc": ...}`` with plain floats (``None`` for a stderr lm-eval
        could not compute); ``mean_acc`` averages ``acc`` over the tasks that report it.

    Raises:
        UnknownTaskError: (a ``ValueError``) before any model call, naming the unknown tasks and
            where they were looked for.
    """
    with offline_hf_env():
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        manager = _task_manager(tasks, include_path)
        if device is not None:
            model.to(device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=1000,  # only for non-mean metrics; acc's stderr is analytic
            verbosity="WARNING",
        )
    results: dict[str, Any] = {}
    for task, row in out["results"].items():
        scores: dict[str, Any] = {}
        for key, value in row.items():
            metric, _, _filter = key.partition(",")  # "acc,none", "acc_stderr,none"
            base = metric.removesuffix("_stderr")
            if base in _METRICS:
                scores[metric] = _float(value)
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            scores["n_samples"] = int(n)
        results[task] = scores
    accs = [s["acc"] for s in results.values() if s.get("acc") is not None]
    results["mean_acc"] = sum(accs) / len(accs) if accs else None
    return results


def task_directory(cfg: EvoPConfig, tokenizer: Any) -> Path | None:
    """A directory with every lm-eval task YAML the run needs: the offline tasks built from
    ``evaluation.task_source`` (when asked for) plus a link to ``evaluation.include_path``."""
    from evop.assets.references import resolve_reference

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
