"""The Ray pool (``scale.backend: ray``) on a local Ray instance with CPU actors and a tiny random
model: the same searches as in one process, through a killed actor too, and clear errors."""

from __future__ import annotations

import os
import signal

import pytest

from evop.config import FitnessConfig, ModelConfig, ScaleConfig, SearchConfig

ray = pytest.importorskip("ray")

CLUSTERS = [0, 1, 0, 1, 2, 2, 0, 1]  # each calibration block's CCDS cluster


def test_an_unreachable_ray_address_is_one_clear_error():
    from evop.errors import BadInputError
    from evop.method.parallel import connect

    assert not ray.is_initialized()  # runs before the module's local instance starts
    with pytest.raises(BadInputError, match=r"cannot reach the Ray cluster at scale.address='127.0.0.1:1'"):
        connect(ScaleConfig(backend="ray", address="127.0.0.1:1"))
    with pytest.raises(BadInputError, match="not host:port"):
        connect(ScaleConfig(backend="ray", address="nowhere"))


@pytest.fixture(scope="module")
def local_ray():
    # Logical CPUs: the shared pool (2 actors), a killed driver's pool and its re-run's may overlap.
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tiny_dir):
    """The model section, the loaded model, calibration blocks of 3 clusters (a batch of 2 per
    stage, one cluster each) and the fitness: the mean of the per-cluster losses."""
    from evop.models.loading import load_model
    from tests.tiny_models import random_blocks

    model_cfg = ModelConfig(name_or_path=str(tiny_dir), device="cpu", dtype="float32")
    model, _ = load_model(model_cfg)
    fitness = FitnessConfig(batch_size=2, aggregate="clusters")
    return model_cfg, model, random_blocks(n=8, length=16), fitness


def scorer_of(setup, pool=None):
    from evop.method.fitness import PatternScorer
    from evop.method.parallel import ParallelScorer

    _, model, blocks, fitness = setup
    local = PatternScorer.from_config(model, blocks, fitness, CLUSTERS)
    return local if pool is None else ParallelScorer(local, pool)


@pytest.fixture(scope="module")
def pool(local_ray, setup):
    """Two CPU actors, started once for the module (an actor's start is most of a test's time)."""
    from evop.method.parallel import RayPool

    model_cfg, _, blocks, fitness = setup
    pool = RayPool(ScaleConfig(backend="ray", workers=2), model_cfg, blocks, fitness, CLUSTERS)
    yield pool
    pool.shutdown()


def evop_settings(**overrides) -> SearchConfig:
    values = dict(
        num_remove=2,
        population=6,
        generations=3,
        patience=3,
        polish_rounds=2,
        seed=0,
        initial_patterns=["ppl-oneshot"],
        mutation_prior="none",
        racing_ratio=1.05,
        racing_confidence=0.9,
    )
    values.update(overrides)
    return SearchConfig(**values)


def run(method: str, scorer, settings: SearchConfig):
    from evop.searches import run_method

    cheap = scorer.first_blocks(0.5) if method == "evopress" else None
    return run_method(settings.model_copy(update={"method": method}), 8, 2, scorer, cheap)


def same_search(a, b):
    """Same final pattern and the same history (patterns, evaluations, tokens), fitness within
    float tolerance (the actors run 1 thread, this process more: the sums may differ in the last bits)."""
    assert str(a.pattern) == str(b.pattern)
    assert a.evaluations == b.evaluations and a.tokens == b.tokens
    assert a.fitness == pytest.approx(b.fitness, rel=1e-5)
    keys = ("best_pattern", "evaluations", "new_evaluations", "tokens", "raced_out")
    assert [{k: h.get(k) for k in keys} for h in a.history] == [
        {k: h.get(k) for k in keys} for h in b.history
    ]


@pytest.mark.parametrize("method", ["evop", "sleb", "ppl-oneshot", "random", "exhaustive", "evopress"])
def test_two_ray_workers_search_as_one_process(pool, setup, method):
    settings = evop_settings(budget=10, evopress_generations=3, evopress_offspring=4)
    alone = run(method, scorer_of(setup), settings)
    races, tokens = pool.jobs["race"], pool.tokens
    parallel = run(method, scorer_of(setup, pool), settings)
    assert pool.workers == 2 and len(set(pool.pids())) == 2
    # Scored ahead on the actors (each step's patterns at once), not one by one here.
    assert pool.jobs["race"] > races and pool.tokens - tokens >= alone.tokens
    if method == "evop":
        assert any(h["raced_out"] for h in alone.history)  # the races were replayed too
    same_search(alone, parallel)


def test_a_killed_worker_is_restarted_and_the_search_ends_the_same(pool, setup):
    settings = evop_settings(seed=3)
    alone = run("evop", scorer_of(setup), settings)
    killed: list[int] = []

    def kill_one(done: int, asked: int) -> None:  # once, while a generation is in flight
        if not killed and done == 1 and asked > 2:
            pid = pool.pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    pool.on_result = kill_one
    try:
        parallel = run("evop", scorer_of(setup, pool), settings)
    finally:
        pool.on_result = None
    assert killed and killed[0] not in pool.pids()  # a restarted process took its place
    same_search(alone, parallel)


def test_an_unreachable_ray_address_fails_the_preflight(tiny_dir, text_file, tmp_path):
    """Found before any heavy work (calibration, search), naming the address."""
    from evop.errors import BadInputError
    from evop.pipeline.preflight import check_search
    from tests.test_pipeline import make_cfg

    cfg = make_cfg(tiny_dir, text_file, tmp_path)
    cfg = cfg.model_copy(update={"scale": ScaleConfig(backend="ray", address="127.0.0.1:1")})
    with pytest.raises(BadInputError, match=r"scale.address='127.0.0.1:1'"):
        check_search(cfg)
    check_search(cfg.model_copy(update={"scale": ScaleConfig()}))  # local: nothing to reach


def test_auto_workers_follow_the_cluster_resources():
    from evop.method.parallel import resolve_workers

    assert resolve_workers(ScaleConfig(), {"CPU": 16.0}) == 16
    assert resolve_workers(ScaleConfig(threads_per_worker=4), {"CPU": 16.0}) == 4
    assert resolve_workers(ScaleConfig(gpus_per_worker=1), {"CPU": 64.0, "GPU": 8.0}) == 8
    assert resolve_workers(ScaleConfig(gpus_per_worker=2), {"CPU": 64.0, "GPU": 8.0}) == 4
    assert resolve_workers(ScaleConfig(workers=3), {"CPU": 1.0}) == 3
    with pytest.raises(ValueError, match="greater than 0"):
        ScaleConfig(workers=0)


def test_a_worker_lost_for_good_hands_its_jobs_to_the_others(local_ray, setup):
    """No restarts left (max_restarts: 0): the lost actor is dropped, its pattern re-queued on the
    other one, and the search still ends as in one process."""
    from evop.method.parallel import RayPool

    settings = evop_settings(seed=5)
    alone = run("sleb", scorer_of(setup), settings)
    model_cfg, _, blocks, fitness = setup
    scale = ScaleConfig(backend="ray", workers=2, max_restarts=0)
    lost = RayPool(scale, model_cfg, blocks, fitness, CLUSTERS)
    killed: list[int] = []

    def kill_one(done: int, asked: int) -> None:
        if not killed and done == 1 and asked > 2:
            killed.append(lost.pids()[0])
            os.kill(killed[0], signal.SIGKILL)

    lost.on_result = kill_one
    try:
        parallel = run("sleb", scorer_of(setup, lost), settings)
        assert killed and len(lost.actors) == 1
    finally:
        lost.shutdown()
    same_search(alone, parallel)


def test_the_pipeline_on_ray_resumes_after_its_driver_is_killed(local_ray, tiny_dir, text_file, tmp_path):
    """The driver (the process running the search) is SIGKILLed after checkpointing generation 1;
    a re-run resumes from the checkpoints, on new actors, and ends as a local run does."""
    import sys

    import yaml

    from evop.pipeline.cache import forget_models
    from evop.pipeline.local import run_search
    from tests.test_pipeline import comparable, kill_after_generation_1, make_cfg

    reference = run_search(make_cfg(tiny_dir, text_file, tmp_path / "local"))
    out = tmp_path / "ray"
    cfg = make_cfg(tiny_dir, text_file, out)
    cfg = cfg.model_copy(update={"scale": ScaleConfig(backend="ray", workers=2)})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    script = "import sys; from evop.config import load_config; from evop.pipeline.local import run_search; "
    script += "run_search(load_config(sys.argv[1]))"
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    argv = [sys.executable, "-c", script, str(tmp_path / "cfg.yaml")]
    killed_at = kill_after_generation_1(argv, env, out, cfg)
    try:
        result = run_search(cfg)  # joins the running Ray instance; its actors start afresh
    finally:
        forget_models()
    assert result["history"][killed_at]["generation"] == killed_at
    assert comparable(result) == comparable(reference)


def test_evop_compare_on_ray_finds_what_one_process_finds(local_ray, tiny_dir, tmp_path, monkeypatch):
    """`evop compare` with ``scale.backend: ray``: the actors score every calibration set's
    patterns (one pool at a time, the next set's after the last one's is shut down), and every row
    is the one-process row: pattern, evaluations, tokens."""
    import json
    import shutil

    import yaml

    from evop.cli import main
    from evop.eval.compare_spec import COMPARE_FILE
    from evop.method.parallel import RayPool
    from tests.test_compare import write_config
    from tests.tiny_models import write_docs, write_sentences

    texts = {
        "calibration": write_docs(tmp_path / "wiki.jsonl"),
        "news": write_docs(tmp_path / "news.jsonl", seed=7),
        "books": write_docs(tmp_path / "books.jsonl", seed=8),
        "sentences": write_sentences(tmp_path / "sentences.jsonl"),
    }
    local_cfg = write_config(tiny_dir, texts, tmp_path / "local.yaml")
    on_ray = yaml.safe_load(local_cfg.read_text()) | {"scale": {"backend": "ray", "workers": 1}}
    (tmp_path / "ray.yaml").write_text(yaml.safe_dump(on_ray))
    pools: list[dict] = []
    shutdown = RayPool.shutdown
    monkeypatch.setattr(RayPool, "shutdown", lambda self: (pools.append(dict(self.jobs)), shutdown(self)))
    args = ["--methods", "evop,evopress", "--sparsities", "0.25", "--ablation-seeds", "1", "--optimum-k", "0"]
    units = {}
    for name in ("local", "ray"):
        out = tmp_path / name
        if name == "ray":  # the held-out judgements are this process's either way: not made again
            out.mkdir()
            for judged in (tmp_path / "local").glob("heldout-*.json"):
                shutil.copy(judged, out / judged.name)
        assert main(["compare", "--config", str(tmp_path / f"{name}.yaml"), "--out", str(out), *args]) == 0
        units[name] = json.loads((out / COMPARE_FILE).read_text())["units"]
    # The main calibration set, then each ablation set (CCDS and random sampling, seed 1).
    assert len(pools) == 3 and all(jobs.get("race", 0) > 0 for jobs in pools)
    assert units["ray"].keys() == units["local"].keys()
    for key, row in units["local"].items():
        other = units["ray"][key]
        for field in ("pattern", "evaluations", "cheap_evaluations", "tokens_forwarded"):
            assert other.get(field) == row.get(field), (key, field)
        assert other["calib_fitness"] == pytest.approx(row["calib_fitness"], rel=1e-5), key
