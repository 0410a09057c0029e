"""The typed configuration: defaults, YAML + overrides, and one clear line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from evop.config import ConfigError, EvoPConfig, build_config, load_config


def test_defaults_are_valid_and_json_serialisable():
    cfg = EvoPConfig()
    assert cfg.search.sparsity == 0.2
    assert cfg.model.trust_remote_code is False
    assert cfg.calibration.method == "ccds"
    assert EvoPConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("search:\n  sparsity: 0.3\n  population: 10\nmodel:\n  name_or_path: x/y\n")
    cfg = load_config(path, ["search.population=12", "search.protected_layers=[0]", "fitness.metric=kl"])
    assert cfg.search.sparsity == 0.3
    assert cfg.search.population == 12
    assert cfg.search.protected_layers == [0]
    assert cfg.fitness.metric == "kl"
    assert cfg.model.name_or_path == "x/y"


def test_every_problem_is_reported_with_its_field_path():
    with pytest.raises(ConfigError) as err:
        build_config(
            {"search": {"sparsity": 1.5, "population": 1}, "fitness": {"metric": "bleu"}, "bogus": 1}
        )
    lines = str(err.value).splitlines()
    assert any(line.startswith("search.sparsity:") for line in lines)
    assert any(line.startswith("search.population:") for line in lines)
    assert any(line.startswith("fitness.metric:") for line in lines)
    assert any(line.startswith("bogus:") for line in lines)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="elitism"):
        build_config({"search": {"elitism": 8, "population": 8}})
    with pytest.raises(ConfigError, match="n_samples"):
        build_config({"calibration": {"n_samples": 64, "pool_size": 32}})
    with pytest.raises(ConfigError, match="sparsity or search.num_remove"):
        build_config({"search": {"sparsity": None}})
    with pytest.raises(ConfigError, match=r"n_clusters \(8\) exceeds pool_size \(5\)"):
        build_config({"calibration": {"n_samples": 4, "pool_size": 5}})
    assert build_config({"calibration": {"n_samples": 4, "pool_size": 5, "method": "random"}})


def test_num_remove_wins_over_sparsity():
    cfg = build_config({}, ["search.num_remove=4"])
    assert cfg.search.num_remove == 4 and cfg.search.sparsity is None


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        build_config({}, ["search.sparsity"])


def test_search_hash_ignores_output_dir_only():
    a = build_config({"output_dir": "a"})
    b = build_config({"output_dir": "b"})
    c = build_config({"search": {"seed": 1}})
    assert a.search_hash() == b.search_hash() != c.search_hash()


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_config_is_valid(path):
    assert load_config(path).output_dir


def test_cluster_aggregates_need_ccds_and_keep_earlier_hashes():
    from evop.config import ConfigError, build_config, load_config

    with pytest.raises(ConfigError, match="needs CCDS clusters"):
        build_config({"fitness": {"aggregate": "worst-cluster"}, "calibration": {"method": "random"}})
    # Checkpoints (evop-<hash>/) of the demo's earlier settings, from before fitness.aggregate,
    # racing and validation existed, must stay valid.
    before = [
        "calibration.dataset=evop-assets:wikipedia",
        "calibration.n_samples=8",
        "fitness.batch_size=8",
        "search.racing_ratio=null",
        "search.racing_confidence=null",
    ]
    assert load_config("configs/demo.yaml", before).search_hash() == "a8616f47171958e3"
    demo = load_config("configs/demo.yaml")
    clusters = load_config("configs/demo.yaml", ["fitness.aggregate=clusters"])
    assert clusters.search_hash() != demo.search_hash()
    assert load_config("configs/demo.yaml", ["calibration.order=text"]).search_hash() == demo.search_hash()
    assert load_config("configs/demo.yaml", ["calibration.order=mixed"]).search_hash() != demo.search_hash()
    assert load_config("configs/demo.yaml", ["search.racing_widen=true"]).search_hash() != demo.search_hash()
    assert load_config("configs/demo.yaml", ["search.polish_pairs=0"]).search_hash() == demo.search_hash()
    assert load_config("configs/demo.yaml", ["search.polish_pairs=8"]).search_hash() != demo.search_hash()
