"""Offline lm-eval tasks built from text, and scoring an in-memory (pruned) model on them."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest

from evop.eval.downstream import (
    CONTINUATION_TASK,
    LASTWORD_TASK,
    OFFLINE_TAG,
    OFFLINE_TASKS,
    UnknownTaskError,
    build_offline_tasks,
    evaluate_tasks,
    split_sentences,
)
from tests.tiny_models import tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval", reason="downstream tests need lm-evaluation-harness")

SUBJECTS = "the farmer|a sailor|the old teacher|his sister|the mayor|a young doctor|the baker|a cook".split(
    "|"
)
VERBS = "walked to|looked at|painted|sold|carried|repaired|visited|described".split("|")
OBJECTS = "the red barn|a wooden boat|the village school|an old bridge|the harbour|a small garden".split("|")
PLACES = "morning|evening|winter|summer|spring|night".split("|")


def _write_text(path, n_docs: int = 12, n_sentences: int = 9):
    """Short, well-formed sentences (so the tiny model's 256 positions are never exceeded)."""
    lines = []
    for d in range(n_docs):
        sentences = [
            f"In the {PLACES[(d + i) % 6]} {SUBJECTS[(d * 3 + i) % 8]} {VERBS[(d + 2 * i) % 8]} "
            f"{OBJECTS[(d * 5 + i) % 6]} near {PLACES[(d + 3 * i) % 6]}town."
            for i in range(n_sentences)
        ]
        lines.append(json.dumps({"text": " ".join(sentences)}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("downstream")
    return build_offline_tasks(tmp / "tasks", _write_text(tmp / "text.jsonl"), n_examples=20, seed=0)


def _rows(task_dir, name):
    return [json.loads(line) for line in (task_dir / name / f"{name}.jsonl").read_text().splitlines()]


def test_split_sentences():
    text = 'He came.  She left! Did they?  "Yes." The end'
    assert split_sentences(text) == ["He came.", "She left!", "Did they?", '"Yes."', "The end"]


def test_tasks_are_well_formed(task_dir):
    for name in OFFLINE_TASKS:
        rows = _rows(task_dir, name)
        assert 0 < len(rows) <= 20
        for row in rows:
            assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
            assert 0 <= row["label"] < 4
    for row in _rows(task_dir, LASTWORD_TASK):
        assert row["choices"][row["label"]] == row["target"]
        assert len(row["context"].split()) < 60
    # The answer is not always in the same position.
    assert len({row["label"] for row in _rows(task_dir, CONTINUATION_TASK)}) > 1


def test_tasks_are_deterministic_for_a_seed(tmp_path):
    text = _write_text(tmp_path / "text.jsonl")
    a = build_offline_tasks(tmp_path / "a", text, n_examples=10, seed=3)
    b = build_offline_tasks(tmp_path / "b", text, n_examples=10, seed=3)
    c = build_offline_tasks(tmp_path / "c", text, n_examples=10, seed=4)
    assert _rows(a, LASTWORD_TASK) == _rows(b, LASTWORD_TASK)
    assert _rows(a, CONTINUATION_TASK) == _rows(b, CONTINUATION_TASK)
    assert _rows(a, CONTINUATION_TASK) != _rows(c, CONTINUATION_TASK)


def test_too_little_text_is_an_error(tmp_path):
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "One short sentence only here."}) + "\n")
    with pytest.raises(ValueError, match="too little text"):
        build_offline_tasks(tmp_path / "tasks", tmp_path / "short.jsonl")


def test_task_yaml_loads_in_lm_eval(task_dir):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    assert set(OFFLINE_TASKS) <= set(manager.all_tasks)
    assert OFFLINE_TAG in manager.all_tags
    loaded = manager.load_task_or_group([LASTWORD_TASK])
    task = next(iter(loaded.values()))
    assert task.OUTPUT_TYPE == "multiple_choice"
    doc = next(iter(task.test_docs()))
    assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == doc["target"]


def test_evaluate_tiny_model(task_dir):
    model = tiny_model("llama")
    scores = evaluate_tasks(model, tiny_tokenizer(), list(OFFLINE_TASKS), include_path=task_dir, limit=4)
    for name in OFFLINE_TASKS:
        assert scores[name]["n_samples"] == 4
        for metric in ("acc", "acc_norm"):
            assert 0.0 <= scores[name][metric] <= 1.0
    assert math.isfinite(scores["mean_acc"])
    json.dumps(scores)  # plain data


def test_unknown_task_is_a_clear_error(task_dir):
    with pytest.raises(UnknownTaskError, match=r"'no_such_task'.*" + re.escape(str(task_dir))):
        evaluate_tasks(tiny_model("llama"), tiny_tokenizer(), [LASTWORD_TASK, "no_such_task"], task_dir)


@pytest.mark.real
def test_pruning_costs_downstream_accuracy(tmp_path):
    """Dense SmolLM2 beats a copy without layers 1-8 on the last-word task.

    Measured on the 100 news examples of seed 0 (both tasks, ~140 s per model on 2 idle cores):
    evop_lastword acc_norm 0.88 (dense) vs 0.28 (pruned), acc 0.89 vs 0.39; evop_continuation
    acc_norm 0.52 vs 0.27. To stay near 90 s only the first 60 last-word examples are scored here.
    """
    from evop.assets.references import AssetError, asset_path
    from evop.config import ModelConfig
    from evop.method.patterns import Pattern
    from evop.models.loading import load_model
    from evop.models.pruning import prune_layers

    try:
        news = asset_path("news")
        dense, tokenizer = load_model(ModelConfig(name_or_path="evop-assets:smollm2", device="cpu"))
    except AssetError as err:
        pytest.skip(str(err))
    tasks = build_offline_tasks(tmp_path, news, n_examples=100, seed=0, tokenizer=tokenizer)
    pruned = prune_layers(copy.deepcopy(dense), Pattern.of(30, [1, 2, 3, 4, 5, 6, 7, 8]))
    scores = {
        name: evaluate_tasks(model, tokenizer, [LASTWORD_TASK], include_path=tasks, limit=60, batch_size=16)
        for name, model in (("dense", dense), ("pruned", pruned))
    }
    for metric in ("acc", "acc_norm"):
        assert scores["dense"][LASTWORD_TASK][metric] > scores["pruned"][LASTWORD_TASK][metric] + 0.25, scores
