"""Baseline search methods on objectives with known answers, and on tiny random models."""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from evop.baselines.evopress import default_evopress_generations, evopress
from evop.baselines.greedy import sleb
from evop.baselines.heuristics import ppl_oneshot, shortgpt
from evop.baselines.sampling import SearchTooLargeError, exhaustive, random_search
from evop.config import ConfigError, SearchConfig, build_config
from evop.method.epps import Seeding, run_epps, seed_search
from evop.method.influence import layer_influence
from evop.method.outcome import Outcome
from evop.method.patterns import Pattern
from evop.method.scoring import CountingFitness, ScoreMemo
from evop.models.layers import layer_access
from evop.pipeline.local import run_search
from evop.pipeline.store import BASELINE_MEMO, RunStore
from evop.searches import run_method
from tests.tiny_models import random_blocks, search_config, tiny_model

WEIGHTS = [9.0, 4.0, 7.0, 1.0, 8.0, 2.5, 6.0, 3.0, 5.0, 0.5]  # layer i costs WEIGHTS[i] when removed


def separable(pattern: Pattern) -> float:
    """Removing a layer costs its weight, independently of the others: optimum = k cheapest."""
    return sum(WEIGHTS[i] for i in pattern.removed)


def cheapest(k: int, protected=()) -> tuple[int, ...]:
    allowed = [i for i in range(len(WEIGHTS)) if i not in protected]
    return tuple(sorted(sorted(allowed, key=lambda i: WEIGHTS[i])[:k]))


def interacting(pattern: Pattern) -> float:
    """Layers 2 and 7 are harmful alone but complement each other (removing both is best);
    a greedy search, which adds one layer at a time, never finds the pair."""
    cost = separable(pattern)
    if {2, 7} <= set(pattern.removed):
        cost -= 20.0
    return cost


class Counter:
    """A fitness that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, pattern):
        self.calls += 1
        return self.fn(pattern)


# ----------------------------------------------------------------------- known optima


def test_sleb_greedy_choice_on_a_separable_objective():
    outcome = sleb(separable, 10, 3, protected=[0, -1])
    assert outcome.pattern.removed == cheapest(3, protected=(0, 9))
    assert outcome.details["removal_order"] == [3, 5, 7]  # cheapest first, one per round
    # k rounds re-scoring every remaining layer: 8 + 7 + 6 candidates.
    assert outcome.evaluations == 8 + 7 + 6
    assert [h["step"] for h in outcome.history] == [1, 2, 3]


def test_greedy_misses_an_interaction_that_exhaustive_and_the_ga_find():
    best = exhaustive(interacting, 10, 2).pattern
    assert best.removed == (2, 7)
    assert sleb(interacting, 10, 2).pattern.removed != (2, 7)
    settings = SearchConfig(
        num_remove=2,
        protected_layers=[],
        population=8,
        generations=20,
        patience=20,
        initial_patterns=[],
        mutation_prior="none",
    )
    assert run_epps(interacting, 10, 2, settings).pattern == best


def test_seeded_ga_never_ends_worse_than_its_seeds_and_counts_their_cost():
    # A tiny budget: 4 patterns, no generation after the first. Random patterns alone would not
    # find the 3 cheapest layers; the ppl-oneshot seed is exactly them on a separable objective.
    settings = SearchConfig(
        num_remove=3,
        protected_layers=[],
        population=4,
        generations=1,
        patience=1,
        initial_patterns=["ppl-oneshot", "shortgpt"],
    )
    influence = [-w for w in WEIGHTS]  # points at the 3 *dearest* layers
    counter = Counter(separable)
    outcome = run_epps(counter, 10, 3, settings, influence=lambda: influence)
    assert outcome.pattern.removed == cheapest(3)
    seeds = outcome.details["initial_patterns"]
    assert seeds == [str(Pattern.of(10, cheapest(3))), str(Pattern.of(10, (0, 2, 4)))]  # weights 9, 7, 8
    assert outcome.evaluations == counter.calls  # the 10 single-layer removals are counted
    assert outcome.evaluations >= 10 + 4
    with pytest.raises(ValueError, match="Block Influence"):
        run_epps(separable, 10, 3, settings.model_copy(update={"initial_patterns": ["shortgpt"]}))


def test_ppl_oneshot_removes_the_least_harmful_single_layers():
    outcome = ppl_oneshot(separable, 10, 4)
    assert outcome.pattern.removed == cheapest(4)
    assert outcome.evaluations == 10 + 1  # every single layer, then the chosen pattern
    assert outcome.details["single_layer_fitness"]["9"] == 0.5


def test_exhaustive_returns_the_argmin_and_refuses_large_spaces():
    counter = Counter(separable)
    outcome = exhaustive(counter, 10, 3, protected=[0])
    brute = min((Pattern.of(10, c) for c in combinations(range(1, 10), 3)), key=separable)
    assert outcome.pattern == brute and outcome.fitness == separable(brute)
    assert counter.calls == outcome.evaluations == math.comb(9, 3)
    with pytest.raises(
        SearchTooLargeError, match=r"C\(9, 3\) = 84 patterns exceeds search.exhaustive_limit=50"
    ):
        exhaustive(separable, 10, 3, protected=[0], limit=50)


def test_random_search_uses_exactly_its_budget():
    for budget in (1, 7, 40):
        counter = Counter(separable)
        outcome = random_search(counter, 10, 3, budget, seed=1)
        assert counter.calls == outcome.evaluations == budget
    # A budget beyond the space scores every pattern once.
    counter = Counter(separable)
    assert random_search(counter, 10, 2, 500).evaluations == counter.calls == math.comb(10, 2)
    assert random_search(separable, 10, 2, 500).pattern.removed == cheapest(2)


def test_random_search_is_reproducible_by_seed():
    a = random_search(separable, 10, 3, 10, seed=3)
    b = random_search(separable, 10, 3, 10, seed=3)
    assert a.pattern == b.pattern and a.history == b.history


def test_evopress_finds_the_optimum_and_stages_its_budget():
    full, cheap = Counter(separable), Counter(separable)
    outcome = evopress(full, cheap, 10, 3, generations=30, offspring=8, survivors=2, seed=0)
    assert outcome.pattern.removed == cheapest(3)
    # Every generation: up to 8 children on the cheap budget, at most 2 of them on the full one.
    assert outcome.cheap_evaluations == cheap.calls <= 8 * 30
    assert outcome.evaluations == full.calls <= 1 + 2 * 30
    assert outcome.evaluations < outcome.cheap_evaluations
    # The parent only ever improves.
    values = [h["best_fitness"] for h in outcome.history]
    assert values == sorted(values, reverse=True)


def test_evopress_default_generations_follow_the_paper():
    assert default_evopress_generations(32, 8) == round(8 * 24 / 1.5)


def test_shortgpt_removes_the_lowest_block_influence():
    influence = [0.9, 0.2, 0.8, 0.05, 0.7, 0.1, 0.6, 0.3, 0.5, 0.01]
    outcome = shortgpt(influence, separable, 10, 3, protected=[0, -1])
    assert outcome.pattern.removed == (1, 3, 5)  # layer 9 is protected
    assert outcome.evaluations == 1
    with pytest.raises(ValueError, match="one Block Influence per layer"):
        shortgpt(influence[:5], separable, 10, 3)


def test_divergence_ranks_last_instead_of_crashing():
    def explodes(pattern):
        if 3 in pattern.removed:
            raise FloatingPointError("overflow")
        return float("nan") if 5 in pattern.removed else separable(pattern)

    outcome = sleb(explodes, 10, 2)
    assert not {3, 5} & set(outcome.pattern.removed)
    assert math.isfinite(outcome.fitness)


def test_counting_fitness_shares_scores_and_charges_each_method_its_own_time():
    memo: dict = {}
    base = Counter(separable)
    first, second = CountingFitness(base, memo), CountingFitness(base, memo)
    p = Pattern.of(10, [1, 2])
    first(p)
    first(p)
    second(p)
    assert base.calls == 1  # scored once for both
    assert first.evaluations == second.evaluations == 1
    assert first.seconds == second.seconds == memo[str(p)][1]


class StagedSeparable:
    """``separable`` scored in 4 stages of 10 positions (5 tokens forwarded each): the stage sums
    add up to 40 x the fitness, so ``fitness_of`` of all stages is the fitness itself."""

    stage_tokens = [5, 5, 5, 5]
    stage_positions = [10, 10, 10, 10]

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def stage_sums(self, pattern: Pattern, start: int = 0, stop: int | None = None) -> list[float]:
        stop = 4 if stop is None else stop
        self.calls += [(str(pattern), s) for s in range(start, stop)]
        return [10 * separable(pattern) for _ in range(start, stop)]

    def fitness_of(self, sums: list[float]) -> float:
        return sum(sums) / (10 * len(sums))

    def __call__(self, pattern: Pattern) -> float:
        return self.fitness_of(self.stage_sums(pattern))


def test_staged_counting_finishes_a_raced_out_pattern_later_and_charges_each_method_its_tokens():
    from evop.method.scoring import StagedCounting, counting

    memo: dict = {}
    stages: dict = {}
    base = StagedSeparable()
    racer, other = counting(base, memo, stages), counting(base, memo, stages)
    assert isinstance(racer, StagedCounting) and not isinstance(counting(separable), StagedCounting)
    p = Pattern.of(10, [1, 2])
    assert racer.stage_sums(p, 0, 1) == [10 * separable(p)]  # raced: one stage, then stopped
    assert racer.tokens == 5 and racer.evaluations == 1 and str(p) not in memo
    assert other(p) == separable(p)  # finished from stage 1: stage 0 is not scored again
    assert base.calls == [(str(p), s) for s in range(4)]
    assert other.tokens == 20  # its own cost: the whole pattern, memo hits included
    assert racer(p) == separable(p) and racer.tokens == 20  # pays the other 3 stages once
    assert racer(p) == separable(p) and racer.tokens == 20 and len(base.calls) == 4
    assert racer.seconds == other.seconds == pytest.approx(math.fsum(stages[str(p)][1]))
    old = {str(Pattern.of(10, [3, 4])): (7.0, 2.0)}  # a full score memoised before stages were kept
    late = counting(base, old, {})
    assert late(Pattern.of(10, [3, 4])) == 7.0 and late.tokens == 20 and late.seconds == 2.0


def test_run_method_reports_tokens_forwarded_for_a_staged_fitness():
    for method in ("sleb", "evop", "ppl-oneshot"):
        settings = SearchConfig(
            method=method,
            num_remove=2,
            protected_layers=[],
            population=6,
            generations=3,
            initial_patterns=[],
            mutation_prior="none",
        )
        outcome = run_method(settings, 10, 2, StagedSeparable())
        assert outcome.tokens is not None and outcome.tokens > 0
        assert outcome.tokens <= outcome.evaluations * 20
        assert run_method(settings, 10, 2, separable).tokens is None  # not counted: unknown


def test_evop_charges_its_seeding_alike_alone_and_in_a_comparison():
    # The Block Influence forward (one pass over every block: 20 tokens) and the 10 single-layer
    # removals of the ppl-oneshot seed are tokens forwarded too, standalone (run_epps, the
    # pipeline) as in a comparison's shared view (run_method).
    settings = SearchConfig(
        num_remove=2,
        protected_layers=[],
        population=6,
        generations=2,
        initial_patterns=["shortgpt", "ppl-oneshot"],
    )
    influence = lambda: [-w for w in WEIGHTS]  # noqa: E731
    seeding = seed_search(settings, 10, 2, StagedSeparable(), influence)
    assert seeding.tokens == (1 + 10) * 20
    assert seed_search(settings, 10, 2, separable, influence).tokens is None  # not counted: unknown
    assert Seeding.from_json(seeding.to_json()) == seeding
    alone = run_epps(StagedSeparable(), 10, 2, settings, influence=influence)
    shared = run_method(settings, 10, 2, StagedSeparable(), influence=influence)
    assert alone.pattern == shared.pattern and alone.evaluations == shared.evaluations
    assert alone.tokens == shared.tokens > seeding.tokens


def test_evaluations_to_best_reads_when_the_chosen_pattern_was_first_the_best():
    p, q = Pattern.of(10, [1, 2]), Pattern.of(10, [3, 4])
    steps = [(q, 3.0, 10), (p, 1.0, 30), (p, 1.0, 50)]
    history = [
        {"step": i, "best_fitness": f, "best_pattern": str(b), "evaluations": e}
        for i, (b, f, e) in enumerate(steps)
    ]
    assert Outcome("evop", p, 1.0, 50, 0.0, history=history).evaluations_to_best == 30
    assert Outcome("sleb", p, 1.0, 50, 0.0).evaluations_to_best == 50  # no history: all of them
    greedy = sleb(separable, 10, 3)  # its early rounds hold partial patterns of lower fitness
    assert greedy.evaluations_to_best == greedy.evaluations
    found = random_search(separable, 10, 2, budget=45, seed=0)
    assert found.evaluations_to_best <= found.evaluations == 45


def test_score_memo_persists_throttled_and_survives_divergence():
    writes: list[dict] = []
    memo = ScoreMemo(writes.append, every=3600)
    full, cheap = memo.fitness(Counter(separable)), memo.fitness(lambda p: math.inf, cheap=True)
    p, q = Pattern.of(10, [1, 2]), Pattern.of(10, [3, 4])
    full(p)
    cheap(q)
    assert writes == []  # new scores are written at most every `every` seconds
    memo.flush()
    assert writes[-1]["full"][str(p)][0] == separable(p)
    assert writes[-1]["cheap"][str(q)][0] is None  # divergence as JSON null
    again = ScoreMemo(writes.append, json.loads(json.dumps(writes[-1])))
    assert len(again) == 2 and again.cheap[str(q)][0] == math.inf
    counter = Counter(separable)
    assert again.fitness(counter)(p) == separable(p) and counter.calls == 0  # resumed, not rescored
    eager = ScoreMemo(writes.append, every=0)
    eager.fitness(separable)(p)
    assert len(writes) == 2  # due at once: written with the first new score
    staged = ScoreMemo(writes.append, every=3600)
    staged.fitness(StagedSeparable()).stage_sums(q, 0, 2)  # raced out after two stages
    staged.flush()
    resumed = ScoreMemo(writes.append, json.loads(json.dumps(writes[-1])))
    assert resumed.stages[str(q)][0] == staged.stages[str(q)][0] and len(resumed) == 1


def test_evopress_stages_share_their_forwards_and_keep_their_charges():
    """A cheap scorer on the full one's first batches shares the memo's stages: a survivor's full
    score forwards only the stages its cheap score did not, and the old memo's cheap stages move
    over. Each view still charges every stage it asks for, and EvoPress ends where it did."""
    from evop.method.fitness import PatternScorer

    model = tiny_model("llama", num_layers=8)
    blocks = random_blocks(8, 16)

    def search(shared: bool) -> tuple[Outcome, int, int, ScoreMemo]:
        """EvoPress's outcome, the tokens its views charge and the tokens really forwarded."""
        scorer = PatternScorer(model, blocks, batch_size=2)
        cheap_scorer = scorer.first_blocks(0.5)
        if not shared:
            cheap_scorer.stages_prefix_of = None
        memo = ScoreMemo(lambda data: None)
        full, cheap = memo.fitness(scorer), memo.fitness(cheap_scorer, cheap=True)
        before = scorer.tokens + cheap_scorer.tokens
        outcome = evopress(full, cheap, 8, 3, generations=4, offspring=6, survivors=2, seed=0)
        forwarded = scorer.tokens + cheap_scorer.tokens - before
        return outcome, full.tokens + cheap.tokens, forwarded, memo

    apart, apart_charged, apart_forwarded, _ = search(shared=False)
    together, charged, forwarded, memo = search(shared=True)
    assert (together.pattern, together.fitness, together.evaluations, together.cheap_evaluations) == (
        apart.pattern,
        apart.fitness,
        apart.evaluations,
        apart.cheap_evaluations,
    )
    assert charged == apart_charged == apart_forwarded  # EvoPress alone pays both of its stages
    # Every pattern scored in full but the start was scored cheaply first: 2 of its 4 stages (of
    # 2 x 16 tokens) had been forwarded.
    assert together.evaluations > 3
    assert forwarded == apart_forwarded - 2 * 32 * (together.evaluations - 1)
    assert memo.cheap_stages == {}

    old = ScoreMemo(
        lambda data: None,
        {
            "cheap_stages": {"1,2,3/8": [[1.0, 2.0], [0.5, 0.5]], "1,2,4/8": [[3.0, 4.0], [0.5, 0.5]]},
            "stages": {"1,2,3/8": [[1.0], [0.5]], "1,2,4/8": [[3.0, 4.0, 5.0], [0.5, 0.5, 0.5]]},
        },
    )
    old.fitness(PatternScorer(model, blocks, batch_size=2).first_blocks(0.5), cheap=True)
    assert old.stages == {"1,2,3/8": ([1.0, 2.0], [0.5, 0.5]), "1,2,4/8": ([3.0, 4.0, 5.0], [0.5] * 3)}
    assert old.cheap_stages == {}


def test_run_method_dispatches_every_method():
    for method in ("evop", "sleb", "ppl-oneshot", "evopress", "random", "exhaustive", "shortgpt"):
        settings = SearchConfig(
            method=method,
            num_remove=2,
            protected_layers=[],
            population=6,
            generations=6,
            evopress_generations=10,
            budget=20,
        )
        outcome = run_method(settings, 10, 2, separable, influence=lambda: list(WEIGHTS))
        assert outcome.method == method and outcome.pattern.k == 2
        again = Outcome.from_json(json.loads(json.dumps(outcome.to_json())))
        assert again.pattern == outcome.pattern and again.evaluations == outcome.evaluations
    with pytest.raises(ValueError, match="Block Influence"):
        run_method(SearchConfig(method="shortgpt", num_remove=2), 10, 2, separable)


def test_config_rejects_unknown_methods_and_bad_evopress_settings():
    with pytest.raises(ConfigError, match="search.method"):
        build_config({"search": {"method": "magic"}})
    with pytest.raises(ConfigError, match="evopress_survivors"):
        build_config({"search": {"evopress_offspring": 2, "evopress_survivors": 3}})


# ----------------------------------------------------------------------- on models


def make_identity(layer: torch.nn.Module) -> None:
    """Zero the projections that write into the residual stream: the layer returns its input."""
    for name, param in layer.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            param.data.zero_()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_block_influence_finds_layers_made_identity(model_type):
    model = tiny_model(model_type, num_layers=6)
    layers = layer_access(model).layers(model)
    if model_type == "gpt2":
        for j in (2, 4):
            layers[j].attn.c_proj.weight.data.zero_()
            layers[j].attn.c_proj.bias.data.zero_()
            layers[j].mlp.c_proj.weight.data.zero_()
            layers[j].mlp.c_proj.bias.data.zero_()
    else:
        for j in (2, 4):
            make_identity(layers[j])
    influence = layer_influence(model, random_blocks(4, 16), batch_size=2)
    assert len(influence) == 6
    assert influence[2] == pytest.approx(0, abs=1e-5) and influence[4] == pytest.approx(0, abs=1e-5)
    assert min(influence[j] for j in (1, 3, 5)) > 1e-3
    assert shortgpt(influence, lambda p: 0.0, 6, 2, protected=[0, -1]).pattern.removed == (2, 4)


def _cfg(tiny_dir, text_file, out, **search):
    """The tiny search with the search section's defaults, k = 2."""
    defaults = {"sparsity": None, "num_remove": 2, "population": 16, "generations": 20, "patience": 6}
    return search_config(tiny_dir, text_file, out, **{**defaults, **search})


@pytest.mark.parametrize("method", ["sleb", "shortgpt", "ppl-oneshot", "evopress", "random", "exhaustive"])
def test_every_baseline_writes_the_result_contract(method, tiny_dir, text_file, tmp_path):
    cfg = _cfg(
        tiny_dir,
        text_file,
        tmp_path / method,
        method=method,
        evopress_generations=3,
        evopress_offspring=4,
        budget=5,
    )
    result = run_search(cfg)
    on_disk = json.loads((tmp_path / method / "result.json").read_text())
    assert on_disk == result
    assert result["method"] == method and len(result["removed_layers"]) == 2
    assert result["fitness"] > 0 and result["evaluations"] >= 1 and result["history"]
    assert not {0, 7} & set(result["removed_layers"])  # protected by default
    if method == "random":
        assert result["evaluations"] == 5
    if method == "exhaustive":
        assert result["evaluations"] == math.comb(6, 2)


def test_pipeline_seeds_the_ga_with_the_shortgpt_pattern_once(tiny_dir, text_file, tmp_path):
    from evop.pipeline.store import INITIAL_PATTERNS

    cfg = _cfg(tiny_dir, text_file, tmp_path / "run", population=6, generations=2)
    result = run_search(cfg)
    seeds = RunStore(cfg).get_json(INITIAL_PATTERNS)
    assert seeds["evaluations"] == 0 and len(seeds["patterns"]) == 1
    assert result["initial_patterns"] == seeds["patterns"]
    memo = json.loads(RunStore(cfg).checkpoints.latest().to_json())["memo"]
    assert result["fitness"] <= memo[seeds["patterns"][0]]
    unseeded = run_search(
        _cfg(tiny_dir, text_file, tmp_path / "plain", population=6, generations=2, initial_patterns=[])
    )
    assert unseeded["initial_patterns"] == []


def test_a_rerun_replays_saved_scores_instead_of_rescoring(tiny_dir, text_file, tmp_path, monkeypatch):
    from evop import pipeline
    from evop.method.fitness import PatternScorer

    cfg = _cfg(tiny_dir, text_file, tmp_path / "run", method="sleb")
    first = run_search(cfg)
    run = RunStore(cfg)
    memo = run.get_json(BASELINE_MEMO)["full"]
    assert len(memo) == first["evaluations"]
    # A crash after the scores were saved but before the outcome: the re-run replays the search from
    # them and scores one pattern, the final one, measured again before it is recorded.
    for name in (pipeline.BASELINE_OUTCOME, pipeline.RESULT):
        Path(urlparse(run.url(name)).path).unlink()
    pipeline.forget_models()
    calls = []
    original = PatternScorer.__call__
    monkeypatch.setattr(PatternScorer, "__call__", lambda self, p: calls.append(p) or original(self, p))
    again = run_search(cfg)
    assert calls == [Pattern.parse(first["pattern"])]
    assert again["removed_layers"] == first["removed_layers"] and again["fitness"] == first["fitness"]


@pytest.mark.parametrize("initial_patterns", [["shortgpt"], ["ppl-oneshot", "shortgpt"]])
def test_the_pipeline_and_the_comparison_run_the_same_evop(initial_patterns, tiny_dir, text_file, tmp_path):
    """EvoP's GA is assembled in one place (evop.method.epps): the pipeline's checkpointed steps and
    the comparison's in-process run_method give the same seeds, search and final pattern."""
    from evop.eval.perplexity import load_blocks
    from evop.method.fitness import PatternScorer
    from evop.models.loading import load_model
    from evop.searches import run_method

    cfg = _cfg(
        tiny_dir, text_file, tmp_path / "run", population=6, generations=3, initial_patterns=initial_patterns
    )
    result = run_search(cfg)
    model, _ = load_model(cfg.model)
    scorer = PatternScorer.from_config(
        model, load_blocks(tmp_path / "run" / "calibration.safetensors"), cfg.fitness
    )
    outcome = run_method(
        cfg.search,
        8,
        2,
        scorer,
        influence=lambda: layer_influence(model, scorer.blocks, cfg.fitness.batch_size),
    )
    assert outcome.details["initial_patterns"] == result["initial_patterns"]
    assert str(outcome.pattern) == result["pattern"] and outcome.fitness == result["fitness"]
    assert outcome.evaluations == result["evaluations"]
    assert [h["best_pattern"] for h in outcome.history] == [h["best_pattern"] for h in result["history"]]
