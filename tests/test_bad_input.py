"""Bad input at the command line: each case is one line naming the problem (exit 2, no traceback),
found before any heavy work, with nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from evop.cli import main
from evop.config import ConfigError, build_config, load_config
from tests.tiny_models import search_config


def _one_line(capsys, code: int = 2) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture
def config(tiny_dir, text_file, tmp_path):
    """A valid config file of a tiny search (k given as num_remove), and its output directory."""
    cfg = search_config(tiny_dir, text_file, tmp_path / "run", sparsity=None, num_remove=2)
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.sparsity=0.25"], "sparsity (0.25) and num_remove (2) are both set: keep one"),
        (['output_dir=""'], "output_dir: empty: give a directory"),
        (
            ["search.sparsity=nan", "search.num_remove=null"],
            "search.sparsity: Input should be a finite number",
        ),
        (["calibration.block_len=512"], "calibration.block_len: 512 tokens exceed the context of"),
        (
            ["checkpoints=s3://AKIAEXAMPLE:top-secret@bucket/x"],
            "checkpoints: s3://***@bucket/x has credentials",
        ),
        (
            ["registry.tracking_uri=http://user:top-secret@host:5000"],
            "has credentials in it; MLflow credentials",
        ),
    ],
    ids=["sparsity-and-num_remove", "empty-output_dir", "nan", "block_len", "s3-secret", "mlflow-secret"],
)
def test_a_bad_value_is_one_line_before_any_work(config, tmp_path, capsys, overrides, message):
    # Without --quiet: no progress bar is drawn before the error line either.
    assert main(["search", "--config", str(config), *overrides]) == 2
    err = _one_line(capsys)
    assert message in err and "top-secret" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_gpu_device_without_a_gpu_is_found_before_calibration(config, tmp_path, capsys):
    assert main(["search", "--config", str(config), "--quiet", "model.device=cuda"]) == 2
    assert "model.device: device 'cuda' requested but CUDA is not available" in _one_line(capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_files_that_are_not_configs(tmp_path, capsys):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\xff\xfe\x80" * 64)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    for path, message in (
        (binary, "not UTF-8 text"),
        (empty, "is empty: nothing to run (leave out --config to run the defaults"),
        (tmp_path, "is a directory: give a YAML file"),
    ):
        assert main(["search", "--config", str(path)]) == 2
        assert message in _one_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_result_and_calibration_files_that_are_not_such(tmp_path, capsys):
    assert main(["prune", "--result", str(tmp_path)]) == 2
    assert "is a directory: give the result.json in it" in _one_line(capsys)
    binary = tmp_path / "blocks.safetensors"
    binary.write_bytes(b"\x89PNG\r\n" + bytes(range(256)))
    for path, message in (
        (tmp_path / "missing.safetensors", "not found"),
        (binary, "not a safetensors file"),
    ):
        assert main(["ppl", "some/model", "--calibration", str(path)]) == 2  # found before the model
        assert f"calibration blocks {path}" in (err := _one_line(capsys)) and message in err


def test_compare_and_bench_arguments_are_checked_first(tiny_dir, monkeypatch, capsys):
    import evop.models.loading

    monkeypatch.setattr(evop.models.loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["compare", "--sparsities", "abc"]) == 2
    assert "--sparsities 'abc': expected comma-separated numbers, e.g. 0.2,0.3" in _one_line(capsys)
    assert main(["bench", "--base", str(tiny_dir), "--pattern", "abc"]) == 2
    assert "not a pattern 'abc'" in _one_line(capsys)
    assert main(["bench", "--base", str(tiny_dir), "--pattern", "1,2/30"]) == 2
    assert "has 8 layers, not 30" in _one_line(capsys)


def test_an_override_with_a_hash_keeps_its_whole_text():
    """YAML would read `runs/a #1` as `runs/a` and a comment: an override is kept whole."""
    assert build_config({}, ["output_dir=runs/a #1"]).output_dir == "runs/a #1"
    assert build_config({}, ["evaluation.heldout=[a, b]"]).evaluation.heldout == ["a", "b"]
    with pytest.raises(ConfigError, match="search.sparsity: Input should be a valid number"):
        build_config({}, ["search.sparsity=0.3 # thirty percent"])


def test_an_empty_or_comment_only_config_is_refused_but_no_config_runs_the_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(tmp_path / "c.yaml")
    assert load_config(None).output_dir == "runs/evop"
