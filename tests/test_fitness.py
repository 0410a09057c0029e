"""Pattern fitness: in-place scoring, exact restore, diverged models, KL with bounded memory."""

from __future__ import annotations

import math

import pytest
import torch

from evop.method.fitness import PatternScorer, nll_to_ppl, perplexity
from evop.method.patterns import Pattern
from evop.models.layers import layer_access, layers_kept
from tests.tiny_models import random_blocks, tiny_model


def test_scorer_scores_in_place_without_copying():
    model = tiny_model("llama")
    blocks = random_blocks(6, 16)
    params_before = {n: p.data_ptr() for n, p in model.named_parameters()}
    scorer = PatternScorer(model, blocks, batch_size=4)
    dense = scorer.dense()
    scores = [scorer(Pattern.of(6, r)) for r in ([1], [2, 3], [1], [4, 5])]
    assert scores[0] == scores[2]  # deterministic
    assert scorer.calls == 4
    assert scorer.dense() == dense  # exact restore after many evaluations
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params_before  # no copy


def test_diverged_candidate_ranks_last_without_crashing():
    model = tiny_model("llama")
    blocks = random_blocks()
    with torch.no_grad():
        layer_access(model).layers(model)[3].mlp.down_proj.weight.fill_(float("nan"))
    scorer = PatternScorer(model, blocks)
    assert scorer(Pattern.of(6, [1])) == math.inf  # layer 3 still in: nan -> inf
    assert math.isfinite(scorer(Pattern.of(6, [3])))  # the broken layer removed: finite
    assert nll_to_ppl(float("nan")) == math.inf
    assert nll_to_ppl(1e6) == math.inf


def test_token_budget_limits_blocks():
    model = tiny_model("llama")
    scorer = PatternScorer(model, random_blocks(8, 16), token_budget=40)
    assert scorer.blocks.shape == (2, 16)
    assert scorer.dense() == perplexity(model, random_blocks(8, 16)[:2])


def test_first_blocks_keeps_the_settings_on_a_prefix_of_the_blocks():
    model = tiny_model("llama")
    blocks = random_blocks(8, 16)
    full = PatternScorer(model, blocks, metric="kl", batch_size=3, kl_top_k=8)
    cheap = full.first_blocks(0.25)
    assert torch.equal(cheap.blocks, blocks[:2])
    assert (cheap.metric, cheap.batch_size, cheap.kl_top_k) == ("kl", 3, 8)
    pattern = Pattern.of(6, [2])
    assert cheap(pattern) == PatternScorer(model, blocks[:2], metric="kl", batch_size=3, kl_top_k=8)(pattern)
    assert full.first_blocks(0.01).blocks.shape[0] == 1  # never empty


def test_first_blocks_is_a_stage_prefix_only_on_whole_batches_of_the_plain_mean():
    """EvoPress's cheap scorer may share the full scorer's stage sums only when its stages are the
    full scorer's first ones, number for number."""
    model = tiny_model("llama")
    blocks = random_blocks(8, 16)
    full = PatternScorer(model, blocks, batch_size=2)
    cheap = full.first_blocks(0.5)  # 4 blocks: the first 2 batches
    assert cheap.stages_prefix_of is full and full.stages_prefix_of is None
    pattern = Pattern.of(6, [2, 3])
    assert cheap.stage_sums(pattern) == full.stage_sums(pattern, 0, 2)
    assert full.first_blocks(0.375).stages_prefix_of is None  # 3 blocks: a half batch
    clustered = PatternScorer(model, blocks, batch_size=2, aggregate="clusters", clusters=[0, 1] * 4)
    assert clustered.first_blocks(0.5).stages_prefix_of is None  # batches grouped by cluster


def test_kl_is_zero_for_dense_and_positive_when_pruned_with_bounded_memory():
    model = tiny_model("qwen2")
    blocks = random_blocks(4, 16)
    scorer = PatternScorer(model, blocks, metric="kl", kl_top_k=8, batch_size=3)
    # top-k only, never the full vocabulary: batches of 3 + 1 blocks
    assert [logp.shape for logp, _ in scorer._dense.parts] == [(3, 16, 8), (1, 16, 8)]
    assert scorer.dense() == pytest.approx(0.0, abs=1e-7)
    assert scorer(Pattern.of(6, [2])) > 1e-6  # random tiny models are near-uniform: small but > 0


def test_bad_inputs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="non-empty"):
        PatternScorer(model, torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown fitness metric"):
        PatternScorer(model, random_blocks(), metric="bleu")


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2", "opt"])
def test_dense_prefix_cache_gives_identical_scores_and_skips_the_prefix(model_type):
    model = tiny_model(model_type, num_layers=6)
    blocks = random_blocks(5, 16)
    plain = PatternScorer(model, blocks, batch_size=2)
    built = []  # what building the cache runs: layers 0-4 (the inputs of 1-5), never the head
    modules = [*enumerate(layer_access(model).layers(model)), ("head", model.get_output_embeddings())]
    handles = [module.register_forward_hook(lambda m, a, o, j=j: built.append(j)) for j, module in modules]
    cached = PatternScorer(model, blocks, batch_size=2, prefix_cache_mb=64)
    for h in handles:
        h.remove()
    assert cached._prefix.depth == 5
    assert sorted(set(built), key=str) == [0, 1, 2, 3, 4]
    for removed in ([1], [2, 4], [3], [5], [0, 2], [4, 5], [1, 2, 3, 4]):
        pattern = Pattern.of(6, removed)
        assert cached(pattern) == plain(pattern), removed  # bit-identical, not just close
    assert cached.dense() == plain.dense()

    calls = []
    handles = [
        layer.register_forward_hook(lambda m, a, o, j=j: calls.append(j))
        for j, layer in enumerate(layer_access(model).layers(model))
    ]
    cached(Pattern.of(6, [3]))
    for h in handles:
        h.remove()
    assert sorted(set(calls)) == [4, 5]  # layers 0-2 came from the cache, 3 was removed


def test_prefix_cache_respects_its_memory_budget():
    model = tiny_model("llama", num_layers=6)
    blocks = random_blocks(4, 16)  # one layer's states: 4 * 16 * 32 hidden * 4 bytes = 8 KiB
    scorer = PatternScorer(model, blocks, prefix_cache_mb=2 * 8 / 1024)
    assert scorer._prefix.depth == 2
    assert scorer(Pattern.of(6, [4])) == PatternScorer(model, blocks)(Pattern.of(6, [4]))


# --------------------------------------------------------------------------- cluster aggregates


def test_aggregates_against_hand_computations():
    from evop.method.fitness import aggregate_block_losses

    sums, clusters = [2.0, 4.0, 6.0, 8.0], [0, 0, 1, 2]  # 2 positions per block
    assert aggregate_block_losses(sums, 2, None, "mean") == pytest.approx(20 / 8)
    # per-cluster means: (2+4)/4 = 1.5, 6/2 = 3, 8/2 = 4
    assert aggregate_block_losses(sums, 2, clusters, "clusters") == pytest.approx((1.5 + 3 + 4) / 3)
    assert aggregate_block_losses(sums, 2, clusters, "worst-cluster") == pytest.approx(4.0)
    with pytest.raises(ValueError, match="needs the cluster"):
        aggregate_block_losses(sums, 2, [0, 1], "clusters")
    with pytest.raises(ValueError, match="unknown fitness aggregate"):
        aggregate_block_losses(sums, 2, clusters, "median")


@pytest.mark.parametrize("aggregate", ["mean", "clusters", "worst-cluster"])
def test_scorer_aggregates_per_block_losses_by_cluster(aggregate):
    """The scorer's cluster aggregates equal per-block perplexities combined by hand."""
    from evop.method.fitness import mean_nll

    model = tiny_model("llama")
    blocks = random_blocks(6, 16)
    clusters = [0, 0, 0, 1, 1, 2]
    pattern = Pattern.of(6, [2, 4])
    scorer = PatternScorer(model, blocks, batch_size=4, aggregate=aggregate, clusters=clusters)
    with layers_kept(model, pattern.kept):
        nll = [mean_nll(model, blocks[i : i + 1]) for i in range(6)]  # one block at a time
    by_cluster = [sum(nll[:3]) / 3, sum(nll[3:5]) / 2, nll[5]]
    expected = {
        "mean": sum(nll) / 6,
        "clusters": sum(by_cluster) / 3,
        "worst-cluster": max(by_cluster),
    }[aggregate]
    assert scorer(pattern) == pytest.approx(math.exp(expected), rel=1e-5)
    if aggregate == "mean":  # the default path is the one every earlier search used
        assert scorer(pattern) == PatternScorer(model, blocks, batch_size=4)(pattern)


def test_cluster_batches_hold_one_cluster_each_round_robin():
    from evop.method.fitness import cluster_batches

    assert cluster_batches([2, 0, 0, 1, 0, 2, 0], 2) == [(0, [1, 2]), (1, [3]), (2, [0, 5]), (0, [4, 6])]


@pytest.mark.parametrize("aggregate", ["clusters", "worst-cluster"])
def test_cluster_aggregates_race_stage_by_stage(aggregate):
    """Staged sums give exactly the full cluster aggregate, and a partial one over the clusters
    seen so far (what racing compares)."""
    from evop.method.fitness import aggregate_block_losses, cluster_batches, mean_nll

    model = tiny_model("llama")
    blocks = random_blocks(6, 16)
    clusters = [0, 1, 0, 1, 2, 0]
    pattern = Pattern.of(6, [1, 4])
    scorer = PatternScorer(
        model, blocks, batch_size=2, aggregate=aggregate, clusters=clusters, prefix_cache_mb=8
    )
    stages = [v for s in range(len(scorer.stage_tokens)) for v in scorer.stage_sums(pattern, s, s + 1)]
    assert scorer.fitness_of(stages) == scorer(pattern)
    assert scorer.stage_clusters == [c for c, _ in cluster_batches(clusters, 2)] == [0, 1, 2, 0]
    first = [i for _, idx in cluster_batches(clusters, 2)[:2] for i in idx]  # blocks of stages 0, 1
    with layers_kept(model, pattern.kept):
        per_block = [15 * mean_nll(model, blocks[i : i + 1]) for i in first]
    partial = aggregate_block_losses(per_block, 15, [clusters[i] for i in first], aggregate)
    assert scorer.fitness_of(stages[:2]) == pytest.approx(math.exp(partial), rel=1e-5)


def test_kl_worst_cluster_is_the_worst_blocks_kl():
    model = tiny_model("llama")
    blocks = random_blocks(4, 16)
    pattern = Pattern.of(6, [1, 3])
    per_block = [PatternScorer(model, blocks[i : i + 1], metric="kl")(pattern) for i in range(4)]
    scorer = PatternScorer(model, blocks, "kl", 2, aggregate="worst-cluster", clusters=[0, 1, 2, 3])
    assert scorer(pattern) == pytest.approx(max(per_block), rel=1e-4)
    assert scorer.dense() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="needs the cluster"):
        PatternScorer(model, blocks, aggregate="clusters")
