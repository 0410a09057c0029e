"""Calibration text reading, block pools and CCDS sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from evop.config import CalibrationConfig
from evop.method.calibration import (
    CalibrationDataError,
    _allocate,
    block_pool,
    build_calibration_set,
    kmeans_sample,
    load_texts,
    random_sample,
    round_robin,
    sample_pool,
    token_blocks,
)
from tests.tiny_models import CharTokenizer, tiny_model


@pytest.fixture
def blobs():
    # Five clusters of very different sizes: random sampling would miss the small ones.
    x, y = make_blobs(
        n_samples=[120, 40, 12, 5, 3], centers=None, n_features=8, cluster_std=0.3, random_state=0
    )
    return x, y


def test_ccds_covers_every_cluster_and_is_deterministic(blobs):
    x, truth = blobs
    idx, labels = kmeans_sample(x, n_samples=10, n_clusters=5, seed=0)
    assert len(idx) == len(set(idx)) == 10
    assert set(truth[idx]) == set(range(5))  # every true cluster represented
    assert (idx, labels.tolist()) == (lambda r: (r[0], r[1].tolist()))(kmeans_sample(x, 10, 5, seed=0))


def test_ccds_rules(blobs):
    x, _ = blobs
    _, labels = kmeans_sample(x, 10, 5, seed=0)
    sizes = np.bincount(labels)
    prop = _allocate(sizes, 10, "proportional")
    equal = _allocate(sizes, 10, "equal")
    assert prop.sum() == equal.sum() == 10
    assert (prop >= 1).all() and (equal >= 1).all()
    assert prop[np.argmax(sizes)] == prop.max()  # the big cluster gets most under proportional
    assert (equal <= sizes).all()
    assert equal.tolist() == [2] * 5  # every cluster has >= 3 members, so 10 split evenly
    assert _allocate(np.array([1, 1, 20]), 9, "equal").tolist() == [1, 1, 7]  # capped, rest moves


def test_nearest_takes_the_points_closest_to_the_centroid():
    x = np.array([[0.0], [0.1], [5.0], [-0.1], [0.05], [2.0]])
    idx, _ = kmeans_sample(x, n_samples=2, n_clusters=1, within_cluster="nearest", seed=0)
    centroid = x.mean()
    dist = np.abs(x[:, 0] - centroid)
    assert sorted(idx) == sorted(np.argsort(dist)[:2].tolist())


def test_fewer_samples_than_clusters_and_errors(blobs):
    x, _ = blobs
    idx, _ = kmeans_sample(x, n_samples=3, n_clusters=5, seed=1)
    assert len(set(idx)) == 3
    with pytest.raises(CalibrationDataError, match="pool of"):
        kmeans_sample(x, n_samples=len(x) + 1, n_clusters=5)


def test_random_sample_is_seeded():
    assert random_sample(100, 8, seed=3) == random_sample(100, 8, seed=3)
    assert random_sample(100, 8, seed=3) != random_sample(100, 8, seed=4)


def test_load_texts_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n"
    )
    assert load_texts(str(tmp_path / "a.txt")) == ["hello world"]
    assert load_texts(str(tmp_path / "b.jsonl"), text_field="body") == ["one", "two"]
    with pytest.raises(CalibrationDataError, match="no field 'text'"):
        load_texts(str(tmp_path / "b.jsonl"))
    (tmp_path / "b.jsonl").unlink()
    assert load_texts(str(tmp_path)) == ["hello world"]


def test_a_document_slice_splits_one_corpus_into_pool_and_held_out(tmp_path):
    from evop.method.calibration import split_document_slice

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    assert load_texts(f"{path}[:3]") == ["doc 0", "doc 1", "doc 2"]
    assert load_texts(f"{path}[3:]") == ["doc 3", "doc 4"]
    assert load_texts(f"{path}[-1:]") == ["doc 4"]
    assert split_document_slice("evop-assets:wikipedia[90:]") == ("evop-assets:wikipedia", slice(90, None))
    assert split_document_slice("wikitext") == ("wikitext", slice(None))
    with pytest.raises(CalibrationDataError, match="holds no text"):
        load_texts(f"{path}[9:]")


def test_load_texts_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(CalibrationDataError, match="holds no text"):
        load_texts(str(tmp_path / "empty.jsonl"))
    with pytest.raises(CalibrationDataError, match="not found"):
        load_texts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(CalibrationDataError, match="bad.jsonl:1"):
        load_texts(str(tmp_path / "bad.jsonl"))


def test_binary_text_file_is_named_not_a_decode_error(tmp_path):
    for name in ("data.txt", "data.jsonl"):
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 4)
        with pytest.raises(CalibrationDataError, match=rf"{name} is not UTF-8 text"):
            load_texts(str(tmp_path / name))


def test_block_pool_sizes_and_too_small_text():
    tok = CharTokenizer()
    texts = ["abcdefghij" * 20, "klmnopqrst" * 20]
    blocks = token_blocks(texts, tok, 16)
    assert blocks.shape == (402 // 16, 16)
    pool = block_pool(texts, tok, 16, pool_size=10, seed=0)
    assert pool.shape == (10, 16)
    assert pool.tolist() == block_pool(texts, tok, 16, pool_size=10, seed=0).tolist()
    with pytest.raises(CalibrationDataError, match="too short: it has 6 tokens, and one block needs 16"):
        block_pool(["short"], tok, 16, pool_size=10, seed=0, min_blocks=1)


def test_block_pool_refuses_a_smaller_pool_than_asked():
    # 402 tokens give 25 blocks of 16: a pool of 64 cannot be cut, and must not shrink silently
    # (it would also cap the clusters below calibration.n_clusters).
    tok = CharTokenizer()
    texts = ["abcdefghij" * 20, "klmnopqrst" * 20]
    with pytest.raises(
        CalibrationDataError,
        match=r"'data\.txt'.* 402 tokens give 25 blocks of 16 tokens.*pool_size asks for 64.*at most 25",
    ):
        block_pool(texts, tok, 16, pool_size=64, seed=0, source="data.txt")
    assert block_pool(texts, tok, 16, pool_size=25, seed=0).shape == (25, 16)  # exactly enough
    with pytest.raises(CalibrationDataError, match="'short.txt' is too short: it has 6 tokens"):
        build_calibration_set(
            CalibrationConfig(dataset="short.txt", pool_size=4, block_len=16, n_samples=2, n_clusters=2),
            tok,
            texts=["short"],
        )


def test_more_clusters_than_the_pool_is_an_error(blobs):
    x, _ = blobs
    with pytest.raises(CalibrationDataError, match="cannot make 5 clusters .* pool of 4 blocks"):
        kmeans_sample(x[:4], n_samples=2, n_clusters=5)


def test_build_calibration_set_with_model_embeddings():
    model = tiny_model("llama")
    texts = [("abc" * 40), ("xyz " * 30), ("0123456789" * 12)] * 4
    cfg = CalibrationConfig(
        dataset="unused", pool_size=40, block_len=16, n_samples=6, embedder="model", n_clusters=3, seed=0
    )
    calib = build_calibration_set(cfg, CharTokenizer(), model, texts=texts)
    assert calib.blocks.shape == (6, 16)
    assert calib.summary()["clusters_covered"] == 3
    again = build_calibration_set(cfg, CharTokenizer(), model, texts=texts)
    assert again.pool_indices == calib.pool_indices
    rnd = build_calibration_set(
        cfg.model_copy(update={"method": "random"}), CharTokenizer(), model, texts=texts
    )
    assert rnd.method == "random" and rnd.blocks.shape == (6, 16)


def test_round_robin_takes_one_of_each_group_in_turn():
    assert round_robin([0, 0, 1, 1, 2]) == [0, 2, 4, 1, 3]
    assert round_robin([2, 2, 2, 0]) == [3, 0, 1, 2]  # groups in order; a spent group is skipped
    assert round_robin([]) == []


def test_mixed_order_makes_every_racing_batch_a_sample_of_all_clusters(blobs):
    """calibration.order: 'mixed' draws the same blocks as 'text' and orders them round-robin over
    the clusters, so the first batches racing judges a candidate on see every cluster."""
    import torch

    x, _ = blobs
    pool = torch.arange(len(x)).unsqueeze(1).repeat(1, 4)  # block i holds token i
    text = CalibrationConfig(dataset="unused", pool_size=len(x), n_samples=15, n_clusters=5, seed=0)
    mixed = text.model_copy(update={"order": "mixed"})
    a, b = sample_pool(pool, text, x), sample_pool(pool, mixed, x)
    assert a.pool_indices == sorted(a.pool_indices)  # text order: as before
    assert sorted(b.pool_indices) == a.pool_indices and b.pool_indices != a.pool_indices
    assert b.blocks[:, 0].tolist() == b.pool_indices
    assert sorted(b.sample_clusters) == sorted(a.sample_clusters)
    assert len(set(b.sample_clusters[:5])) == 5  # the first five blocks: one of each cluster
    assert len(set(a.sample_clusters[:5])) < 5
    # Random sampling has no clusters: n_clusters stretches of the text stand in for them.
    r_text = sample_pool(pool, text.model_copy(update={"method": "random"}), None)
    r_mixed = sample_pool(pool, mixed.model_copy(update={"method": "random"}), None)
    assert sorted(r_mixed.pool_indices) == r_text.pool_indices
    assert r_mixed.pool_indices[:5] == r_text.pool_indices[::3]


def test_unreachable_dataset_name_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CalibrationDataError, match="cannot load dataset 'wikitext'.*wikitext-2-raw-v1"):
        load_texts("wikitext", "wikitext-2-raw-v1", "train")
