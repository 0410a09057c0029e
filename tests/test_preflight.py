"""Checks before any heavy work: each bad input is one EvoPError naming it, found in seconds."""

from __future__ import annotations

import re

import pytest

from evop.config import ConfigError, build_config
from evop.errors import BadInputError, EvoPError
from evop.pipeline.preflight import check_output_dir, check_run, check_search


def _cfg(tiny_dir, text_file, out, **sections):
    data = {
        "model": {"name_or_path": str(tiny_dir), "device": "cpu"},
        "calibration": {"dataset": str(text_file), "pool_size": 32, "block_len": 32, "n_samples": 6,
                        "embedder": "model", "n_clusters": 3},
        "search": {"num_remove": 2},
        "evaluation": {"heldout": [str(text_file)], "tasks": [], "task_source": str(text_file)},
        "output_dir": str(out),
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return build_config(data)


def test_a_good_config_passes_and_reports_the_layers(tiny_dir, text_file, tmp_path):
    assert check_search(_cfg(tiny_dir, text_file, tmp_path / "out")) == 8
    assert check_run(_cfg(tiny_dir, text_file, tmp_path / "out")) == 8


def test_dataset_names_pass_through_and_missing_files_are_named(tiny_dir, text_file, tmp_path):
    for name in ("wikitext", "allenai/c4"):  # loaded by `datasets` later, maybe from the network
        check_search(_cfg(tiny_dir, text_file, tmp_path / "o", calibration={"dataset": name}))
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(BadInputError, match="calibration.dataset: .*nope.txt.* does not exist"):
        check_search(_cfg(tiny_dir, text_file, tmp_path / "o", calibration={"dataset": missing}))
    with pytest.raises(BadInputError, match="evaluation.heldout: .*nope.txt"):
        check_run(_cfg(tiny_dir, text_file, tmp_path / "o", evaluation={"heldout": [missing]}))
    with pytest.raises(BadInputError, match="evaluation.heldout: .*nope.txt"):
        check_run(_cfg(tiny_dir, text_file, tmp_path / "o", evaluation={"heldout": [missing + "[3:]"]}))
    check_run(_cfg(tiny_dir, text_file, tmp_path / "o", evaluation={"heldout": [f"{text_file}[1:]"]}))


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"search": {"num_remove": 9}}, "removing 9 of 8 layers"),
        ({"search": {"num_remove": None, "sparsity": 0.9}}, "removing 7 of 8 layers|cannot remove k=7"),
        ({"search": {"protected_layers": [0, -9]}}, "protected layer -9 is out of range for 8 layers"),
        ({"model": {"name_or_path": "/nonexistent/model"}}, "cannot load model"),
        ({"evaluation": {"tasks": ["evop_lastword", "no_such_lm_eval_task"]}}, "no_such_lm_eval_task"),
    ],
)
def test_bad_input_is_one_named_error(tiny_dir, text_file, tmp_path, sections, message):
    with pytest.raises(EvoPError, match=message) as info:
        check_run(_cfg(tiny_dir, text_file, tmp_path / "out", **sections))
    assert info.value.permanent


def test_check_output_dir(tmp_path):
    out = tmp_path / "a" / "b"
    assert check_output_dir(build_config({"output_dir": str(out)})) == out
    assert out.is_dir() and not list(out.iterdir())  # created, and the probe file is gone
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "out"  # under a file: fails for root too (a read-only dir would not)
    expected = rf"^output_dir: cannot write to {re.escape(str(bad))}: Not a directory"
    with pytest.raises(ConfigError, match=expected):
        check_output_dir(build_config({"output_dir": str(bad)}))
