"""Choosing the final pattern on blocks the search did not fit (search.validation_blocks)."""

from __future__ import annotations

import pytest

from evop.config import ConfigError, build_config
from evop.method.patterns import Pattern
from evop.method.selection import finalists, select_by_validation, validation_indices
from evop.method.state import SearchState


def test_validation_blocks_are_outside_the_calibration_set_and_reproducible():
    calibration = [0, 3, 5, 9]
    idx = validation_indices(12, calibration, 5, seed=1)
    assert len(idx) == 5 and not set(idx) & set(calibration) and idx == sorted(idx)
    assert validation_indices(12, calibration, 5, seed=1) == idx
    with pytest.raises(ValueError, match="8 blocks outside the calibration set, 9 asked"):
        validation_indices(12, calibration, 9, seed=1)


def test_finalists_are_the_best_fully_scored_patterns():
    memo = {"1,2/6": 3.0, "1,3/6": 1.0, "2,3/6": 2.0, "3,4/6": 0.5}
    state = SearchState(num_layers=6, k=2, candidates=[1, 2, 3, 4], memo=memo)
    assert [str(p) for p in finalists(state, 2, stages=2)] == ["3,4/6", "1,3/6"]
    state.stage_sums = {k: [1.0, 1.0] for k in memo} | {"3,4/6": [9.0]}  # 3,4 was raced out
    assert [str(p) for p in finalists(state, 2, stages=2)] == ["1,3/6", "2,3/6"]


def test_the_lowest_validation_loss_wins_and_ties_go_to_calibration():
    candidates = [Pattern.parse(p) for p in ("1,3/6", "2,3/6", "1,2/6")]
    calibration = {"1,3/6": 1.0, "2,3/6": 2.0, "1,2/6": 3.0}
    validation = {"1,3/6": 5.0, "2,3/6": 4.0, "1,2/6": 4.5}
    chosen, table = select_by_validation(candidates, calibration, lambda p: validation[str(p)])
    assert str(chosen) == "2,3/6"
    assert table[0] == {"pattern": "1,3/6", "calibration": 1.0, "validation": 5.0}
    tie, _ = select_by_validation(candidates, calibration, lambda p: 4.0)
    assert str(tie) == "1,3/6"
    diverged, rows = select_by_validation(candidates, calibration, lambda p: float("nan"))
    assert str(diverged) == "1,3/6" and rows[0]["validation"] is None


def test_validation_needs_room_in_the_pool():
    with pytest.raises(ConfigError, match="validation_blocks"):
        build_config({"calibration": {"pool_size": 16, "n_samples": 8}, "search": {"validation_blocks": 9}})


def test_the_pipeline_chooses_the_final_pattern_on_validation_blocks(tiny_dir, text_file, tmp_path):
    from evop.eval.perplexity import load_blocks
    from evop.method.fitness import PatternScorer
    from evop.models.loading import load_model
    from evop.pipeline.local import run_search
    from evop.pipeline.store import SAMPLE, RunStore

    cfg = build_config(
        {
            "model": {"name_or_path": str(tiny_dir), "device": "cpu"},
            "calibration": {"dataset": str(text_file), "pool_size": 48, "block_len": 32, "n_samples": 8,
                            "embedder": "model", "n_clusters": 4},
            "search": {"num_remove": 3, "population": 8, "generations": 2, "patience": 10,
                       "validation_blocks": 16, "validation_candidates": 4},
            "fitness": {"batch_size": 4},
            "output_dir": str(tmp_path / "run"),
        }
    )
    result = run_search(cfg)
    v = result["validation"]
    assert v["chosen"] == result["pattern"] and len(v["finalists"]) == 4 and v["blocks"] == 16
    assert not set(v["pool_indices"]) & set(RunStore(cfg).get_json(SAMPLE)["pool_indices"])
    assert v["finalists"][0]["pattern"] == v["search_best"]  # the search's best competes first
    best_validation = min(row["validation"] for row in v["finalists"])
    assert next(r for r in v["finalists"] if r["pattern"] == v["chosen"])["validation"] == best_validation
    model, _ = load_model(cfg.model)
    blocks = load_blocks(tmp_path / "run" / "calibration.safetensors")
    calibration = PatternScorer(model, blocks, batch_size=4)
    assert calibration(Pattern.parse(result["pattern"])) == result["fitness"]  # its calibration fitness
