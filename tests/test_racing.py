"""Racing: candidates scored stage by stage and stopped when clearly out, on objectives whose
per-stage losses are known, and on a tiny model (staged scores equal full scores exactly)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from urllib.parse import urlparse

import pytest

from evop.config import SearchConfig
from evop.method.genetic import GeneticSearch
from evop.method.patterns import Pattern
from evop.method.racing import RaceRule, race, worse_than
from evop.method.state import SearchState


class StagedObjective:
    """A known staged objective: each of ``stages`` stages has ``positions`` positions; a pattern's
    mean loss on a stage is its base loss (per-layer costs, a few layers critical) plus a small
    per-(pattern, stage) wobble. Fitness = exp(mean loss), like perplexity."""

    def __init__(self, num_layers: int = 16, stages: int = 8, positions: int = 10, seed: int = 0):
        rng = random.Random(seed)
        self.cost = [rng.uniform(0.0, 0.3) for _ in range(num_layers)]
        for critical in rng.sample(range(1, num_layers - 1), 4):
            self.cost[critical] = 3.0  # removing it makes the model hopeless
        self.stages, self.positions = stages, positions
        self.stage_tokens = [positions + 1] * stages
        self.stage_positions = [positions] * stages
        self.calls: list[tuple[str, int]] = []

    def stage_loss(self, pattern: Pattern, stage: int) -> float:
        wobble = random.Random(f"{pattern}/{stage}").uniform(-0.05, 0.05)
        return 2.0 + sum(self.cost[i] for i in pattern.removed) + wobble

    def stage_sums(self, pattern: Pattern, start: int = 0, stop: int | None = None) -> list[float]:
        stop = self.stages if stop is None else stop
        self.calls += [(str(pattern), s) for s in range(start, stop)]
        return [self.stage_loss(pattern, s) * self.positions for s in range(start, stop)]

    def fitness_of(self, sums: list[float]) -> float:
        return math.exp(sum(sums) / (self.positions * len(sums)))

    def __call__(self, pattern: Pattern) -> float:
        return self.fitness_of(self.stage_sums(pattern))


def settings(**overrides) -> SearchConfig:
    values = dict(num_remove=1, population=10, generations=8, patience=8, seed=1, polish_rounds=3)
    values.update(overrides)
    return SearchConfig(**values)


def test_race_stops_a_hopeless_candidate_after_the_minimum_stages():
    objective = StagedObjective()
    good = Pattern.of(16, [i for i in range(1, 15) if objective.cost[i] < 1][:3])
    bad = Pattern.of(16, [i for i in range(1, 15) if objective.cost[i] == 3.0][:1] + list(good.removed[:2]))
    reference = objective.stage_sums(good)
    assert len(race(objective, bad, reference, RaceRule(ratio=1.5, min_stages=1))) == 1
    assert len(race(objective, bad, reference, RaceRule(ratio=1.5, min_stages=3))) == 3
    assert len(race(objective, good, reference, RaceRule(ratio=1.5))) == 8  # a contender runs to the end
    assert len(race(objective, bad, None, RaceRule(ratio=1.5))) == 8  # no reference yet: scored in full


class ClusteredBlocks:
    """Known per-block losses of two patterns on a calibration set of 4 clusters (kinds of text)
    x 4 blocks, in ``order``, raced in stages (batches) of 4 blocks. The winner is worse than the
    reference on the first cluster by far more than the racing ratio and better on the other
    three, so better overall: the Gemma-3 20% case, where text order put one cluster first."""

    def __init__(self, order: list[int]):
        self.clusters = [b // 4 for b in range(16)]  # text order: cluster by cluster
        self.order = order
        self.stage_tokens, self.stage_positions = [44] * 4, [40] * 4
        self.loss = {"winner": [6.0, 4.0, 4.0, 4.0], "reference": [5.0, 4.5, 4.5, 4.5]}  # per cluster

    def stage_sums(self, pattern: str, start: int = 0, stop: int | None = None) -> list[float]:
        batches = [self.order[i : i + 4] for i in range(0, 16, 4)][start:stop]
        return [sum(self.loss[pattern][self.clusters[b]] * 10 for b in batch) for batch in batches]

    def fitness_of(self, sums: list[float]) -> float:
        return math.exp(sum(sums) / (40 * len(sums)))


def test_mixed_calibration_order_keeps_a_winner_text_order_races_out():
    from evop.method.calibration import round_robin

    text = ClusteredBlocks(list(range(16)))
    mixed = ClusteredBlocks(round_robin(text.clusters))
    for blocks in (text, mixed):
        assert blocks.fitness_of(blocks.stage_sums("winner")) < blocks.fitness_of(
            blocks.stage_sums("reference")
        )
    reference = text.stage_sums("reference")
    assert len(race(text, "winner", reference, RaceRule(ratio=1.25, confidence=0.95))) == 1  # out at once
    reference = mixed.stage_sums("reference")
    assert len(race(mixed, "winner", reference, RaceRule(ratio=1.25, confidence=0.95))) == 4  # kept


class KnownStages:
    """Known per-stage mean losses of named patterns, 16 stages of 10 positions each."""

    def __init__(self, losses: dict[str, list[float]]):
        self.losses = losses
        self.stage_tokens, self.stage_positions = [11] * 16, [10] * 16

    def stage_sums(self, pattern: str, start: int = 0, stop: int | None = None) -> list[float]:
        return [loss * 10 for loss in self.losses[str(pattern)][start:stop]]

    def fitness_of(self, sums: list[float]) -> float:
        return math.exp(sum(sums) / (10 * len(sums)))


def test_widened_ratio_keeps_a_winner_one_noisy_stage_puts_above_it_and_still_stops_the_hopeless():
    # Gemma-3 20%: the winner was 31% above the best on the first of 16 stages and 3% below on all.
    blocks = KnownStages(
        {
            "reference": [5.0] * 16,
            "winner": [5.0 + math.log(1.31)] + [4.95] * 15,
            "hopeless": [5.0 + math.log(3.0)] * 16,  # above 1.25 ** sqrt(16) = 2.44 at once
        }
    )
    assert blocks.fitness_of(blocks.stage_sums("winner")) < blocks.fitness_of(blocks.stage_sums("reference"))
    reference = blocks.stage_sums("reference")
    rule = {"ratio": 1.25, "confidence": 0.95}
    assert len(race(blocks, "winner", reference, RaceRule(**rule))) == 1  # the flat ratio drops the winner
    assert len(race(blocks, "winner", reference, RaceRule(**rule, widen=True))) == 16  # widened: kept
    assert len(race(blocks, "hopeless", reference, RaceRule(**rule, widen=True))) == 1  # still out at once


def test_the_search_races_with_the_widened_ratio_when_asked():
    from evop.method.racing import score_candidates

    best, winner = Pattern.of(16, [1, 2]), Pattern.of(16, [1, 3])
    blocks = KnownStages({str(best): [5.0] * 16, str(winner): [5.0 + math.log(1.31)] + [4.95] * 15})
    for widen, stages in ((False, 1), (True, 16)):
        memo, sums = {str(best): math.exp(5.0)}, {str(best): blocks.stage_sums(best)}
        rule = settings(num_remove=2, racing_ratio=1.25, racing_confidence=0.95, racing_widen=widen)
        tokens = score_candidates([winner], memo, sums, str(best), blocks, blocks, rule)
        assert len(sums[str(winner)]) == stages and tokens == 11 * stages


def test_the_polish_pairs_rank_a_raced_out_move_on_the_stages_it_was_scored_on():
    # The first stage is hard for every pattern: a move stopped there has a high partial fitness,
    # yet against the best on that same stage it is only 22% worse, closer than the fully scored
    # 5,9 -> 6,9 (50%). The pairs are of the two most promising moves: 4,9 and 5,10 (-> 4,10).
    best, raced, close, far = (Pattern.of(16, m) for m in ([5, 9], [4, 9], [5, 10], [6, 9]))
    blocks = KnownStages(
        {
            str(best): [6.0] + [4.0] * 15,
            str(raced): [6.2],
            str(close): [6.1] + [4.1] * 15,
            str(far): [6.0 + math.log(1.5)] + [4.0 + math.log(1.5)] * 15,
        }
    )
    sums = {key: blocks.stage_sums(key) for key in blocks.losses}
    memo = {key: blocks.fitness_of(s) for key, s in sums.items()}
    assert memo[str(raced)] > memo[str(far)] > memo[str(close)]  # raw partial fitness: raced last
    search = GeneticSearch(16, 2, settings(num_remove=2, polish_radius=15, polish_pairs=2), blocks,
                           staged=blocks)
    assert search.pair_moves(best, memo, sums) == [Pattern.of(16, [4, 10])]


def test_paired_t_test_against_hand_computations():
    # diffs 0.1 and 0.3: mean 0.2, sd 0.1414, standard error 0.1, t = 2.0 with 1 degree of freedom;
    # the one-sided critical values are 3.078 at 0.9 and 1.0 at 0.75.
    assert not worse_than([1.1, 1.3], [1.0, 1.0], confidence=0.9)
    assert worse_than([1.1, 1.3], [1.0, 1.0], confidence=0.75)
    assert not worse_than([1.1], [1.0], confidence=0.6)  # one stage says nothing about the spread
    assert not worse_than([0.9, 0.95, 0.9], [1.0, 1.0, 1.0], confidence=0.6)  # better: never out
    assert worse_than([1.05, 1.05, 1.05], [1.0, 1.0, 1.0], confidence=0.99)  # no spread, worse
    assert not worse_than([1.2, 0.9, 1.1, 0.95], [1.0] * 4, confidence=0.95)  # within the noise


def test_confidence_stops_a_near_miss_the_ratio_lets_through():
    objective = StagedObjective()
    kept = [i for i in range(1, 15) if objective.cost[i] < 1]
    cheap = sorted(kept, key=lambda i: objective.cost[i])
    worse = next(i for i in cheap if objective.cost[i] - objective.cost[cheap[1]] > 0.1)
    best, near = Pattern.of(16, cheap[:2]), Pattern.of(16, [cheap[0], worse])
    # the near miss is worse by more than the per-stage wobble, and within the ratio of 1.5
    reference = objective.stage_sums(best)
    assert len(race(objective, near, reference, RaceRule(ratio=1.5))) == 8  # within 1.5x: the ratio keeps it
    stopped = race(objective, near, reference, RaceRule(ratio=1.5, confidence=0.95))
    assert 2 <= len(stopped) < 8
    assert len(race(objective, best, reference, RaceRule(confidence=0.95))) == 8  # never its own


def test_racing_finds_the_same_best_with_fewer_tokens_and_never_stops_a_better_pattern():
    plain_fitness, racing_fitness = StagedObjective(seed=3), StagedObjective(seed=3)
    plain = GeneticSearch(16, 3, settings(), plain_fitness, staged=plain_fitness).run()
    raced = GeneticSearch(16, 3, settings(racing_ratio=1.5), racing_fitness, staged=racing_fitness).run()
    assert raced.best == plain.best and raced.best_fitness == plain.best_fitness
    assert plain.tokens == plain.evaluations * 8 * 11
    assert raced.tokens < 0.75 * plain.tokens
    assert raced.tokens == 11 * len(racing_fitness.calls)  # every stage forwarded is counted
    stopped = [key for key, sums in raced.stage_sums.items() if len(sums) < 8]
    assert stopped, "nothing was raced out"
    for key in stopped:  # clearly out: its full fitness is far above the best found
        assert racing_fitness(Pattern.parse(key)) > raced.best_fitness * 1.2
    assert all(len(raced.stage_sums[p]) == 8 for p in raced.population if p == raced.best)
    assert sum(h["raced_out"] for h in raced.history) == len(stopped)
    assert raced.history[-1]["tokens"] == raced.tokens


def test_confidence_racing_keeps_the_best_for_far_fewer_tokens_than_the_ratio_alone():
    searches = {}
    for name, extra in {
        "plain": {},
        "ratio": {"racing_ratio": 1.5},
        "both": {"racing_ratio": 1.5, "racing_confidence": 0.95},
        "confidence": {"racing_confidence": 0.95},
    }.items():
        objective = StagedObjective(seed=3)
        searches[name] = GeneticSearch(16, 3, settings(**extra), objective, staged=objective).run()
    plain = searches["plain"]
    for name in ("ratio", "both", "confidence"):
        assert searches[name].best == plain.best, name
    assert searches["both"].tokens < 0.8 * searches["ratio"].tokens


def test_raced_out_patterns_rank_after_fully_scored_ones_and_resume_is_identical():
    objective = StagedObjective(seed=5)
    search = GeneticSearch(16, 3, settings(racing_ratio=1.3), objective, staged=objective)
    state = search.step(search.step(search.initial_state()))
    full = [p for p in state.population if len(state.stage_sums[p]) == 8]
    assert state.population[: len(full)] == full  # fully scored first, then the raced-out ones
    resumed = SearchState.from_json(state.to_json())
    assert resumed.stage_sums == state.stage_sums and resumed.tokens == state.tokens
    uninterrupted = search.run(state)
    again = search.run(resumed)
    assert again.to_json().replace('"seconds"', "") == uninterrupted.to_json().replace('"seconds"', "") or (
        [h["best_pattern"] for h in again.history] == [h["best_pattern"] for h in uninterrupted.history]
        and again.best == uninterrupted.best
        and again.tokens == uninterrupted.tokens
    )


def test_racing_needs_a_staged_fitness():
    from evop.errors import BadInputError

    with pytest.raises(BadInputError, match="stage by stage"):
        GeneticSearch(16, 3, settings(racing_ratio=1.5), StagedObjective())


def test_the_scorer_staged_equals_full_scoring_exactly():
    """PatternScorer stage by stage sums to exactly its full score, with the prefix cache too."""
    from evop.method.fitness import PatternScorer
    from tests.tiny_models import random_blocks, tiny_model

    model = tiny_model("llama")
    blocks = random_blocks(6, 16)
    for cache in (0, 64):
        scorer = PatternScorer(model, blocks, batch_size=2, prefix_cache_mb=cache)
        for removed in ([2, 4], [1], [3, 4]):
            pattern = Pattern.of(6, removed)
            staged = [v for s in range(3) for v in scorer.stage_sums(pattern, s, s + 1)]
            assert scorer.fitness_of(staged) == scorer(pattern)
        assert scorer.stage_tokens == [32, 32, 32] and scorer.tokens > 0


def test_racing_in_the_pipeline_counts_tokens_into_the_result(tiny_dir, text_file, tmp_path):
    from evop.config import build_config
    from evop.pipeline.local import run_search
    from evop.pipeline.search import finalize_search
    from evop.pipeline.store import INITIAL_PATTERNS, RESULT, RunStore

    base = {
        "model": {"name_or_path": str(tiny_dir), "device": "cpu"},
        "calibration": {
            "dataset": str(text_file),
            "pool_size": 48,
            "block_len": 32,
            "n_samples": 8,
            "embedder": "model",
            "n_clusters": 4,
        },
        "fitness": {"batch_size": 2},
        "output_dir": str(tmp_path / "plain"),
    }
    search = {"num_remove": 3, "population": 8, "generations": 3, "patience": 10}
    plain = run_search(build_config({**base, "search": search}))
    raced = run_search(
        build_config(
            {**base, "search": {**search, "racing_ratio": 1.05}, "output_dir": str(tmp_path / "raced")}
        )
    )
    # Every candidate costs all 8 blocks of 32 tokens, and so does the dense Block Influence forward
    # behind the ShortGPT seed and the mutation prior: the same charge as `evop compare`'s.
    assert plain["seeding_tokens"] == 8 * 32
    assert plain["tokens_forwarded"] == (plain["evaluations"] + 1) * 8 * 32
    assert raced["tokens_forwarded"] <= plain["tokens_forwarded"]
    assert raced["history"][-1]["tokens"] + raced["seeding_tokens"] == raced["tokens_forwarded"]
    # A search stored before its seeding's tokens were counted gets them when its result is built.
    run = RunStore(build_config({**base, "search": search}))
    seeding = run.get_json(INITIAL_PATTERNS)
    run.put_json(INITIAL_PATTERNS, {k: v for k, v in seeding.items() if k != "tokens"})
    Path(urlparse(run.url(RESULT)).path).unlink()
    assert finalize_search(run.cfg)["tokens_forwarded"] == plain["tokens_forwarded"]
    # The cluster aggregates race too: each batch holds one cluster's blocks.
    worst = run_search(
        build_config(
            {
                **base,
                "search": {**search, "racing_ratio": 1.05, "racing_confidence": 0.9},
                "fitness": {"batch_size": 2, "aggregate": "worst-cluster"},
                "output_dir": str(tmp_path / "worst"),
            }
        )
    )
    assert worst["tokens_forwarded"] < worst["evaluations"] * 8 * 32  # some candidates stopped early
    assert sum(h["raced_out"] for h in worst["history"]) > 0


def test_the_settings_benchmark_prints_racing_against_full_scoring_over_seeds(
    tiny_dir, text_file, tmp_path, capsys
):
    import json

    from benchmarks.settings import main

    config = {
        "model": {"name_or_path": str(tiny_dir), "device": "cpu"},
        "calibration": {
            "dataset": f"{text_file}[:-1]",  # the last document is held out
            "pool_size": 48,
            "block_len": 32,
            "n_samples": 8,
            "embedder": "model",
            "n_clusters": 4,
        },
        "search": {"num_remove": 3, "population": 6, "generations": 2, "patience": 10, "polish_rounds": 1},
        "fitness": {"batch_size": 2},
        "evaluation": {"heldout": [f"{text_file}[-1:]"], "block_len": 32, "max_blocks": 2},
    }
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    args = ["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"), "--seeds", "0,1"]
    racing = "racing: search.racing_ratio=1.05 search.racing_confidence=0.9"
    variants = ["--variant", "full:", "--variant", racing]
    assert main([*args, *variants]) == 0
    # Four searches in one process keep one scorer (each holds a dense prefix cache of up to 1 GB).
    from evop.method.fitness import PatternScorer
    from evop.pipeline import cache

    assert sum(isinstance(v, PatternScorer) for v in cache._SCORERS.values()) == 1
    table = capsys.readouterr().out
    assert "| full seed 0 |" in table and "| racing seed 1 |" in table and "fewer" in table
    assert "Mean +- sd over seeds 0,1" in table and "| racing | " in table and "geomean" in table
    rows = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert [r["label"] for r in rows] == ["full seed 0", "full seed 1", "racing seed 0", "racing seed 1"]
    assert rows[2]["result"]["tokens_forwarded"] <= rows[0]["result"]["tokens_forwarded"]
    (judged,) = (tmp_path / "o").glob("heldout-*.json")  # each pattern judged once, kept for a re-run
    assert set(json.loads(judged.read_text())) == {r["result"]["pattern"] for r in rows}
    # A later call into the same folder with some of the variants reads its finished runs back and
    # keeps the other variants' rows: one table, not the last call's.
    assert main([*args, "--variant", "full:"]) == 0
    again = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert [r["label"] for r in again] == [r["label"] for r in rows]
    assert [r["result"]["pattern"] for r in again] == [r["result"]["pattern"] for r in rows]
    assert "| racing | " in capsys.readouterr().out


def test_random_search_races_its_draws_to_the_same_best_for_fewer_tokens():
    from evop.baselines.sampling import random_search
    from evop.method.scoring import counting

    outcomes, views = {}, {}
    for name, extra in {"plain": {}, "raced": {"racing_ratio": 1.5, "racing_confidence": 0.95}}.items():
        objective = StagedObjective(seed=3)
        views[name] = counting(objective)
        rules = settings(**extra)
        outcomes[name] = random_search(views[name], 16, 3, 60, protected=[0, 15], seed=2, racing=rules)
    plain, raced = outcomes["plain"], outcomes["raced"]
    assert raced.pattern == plain.pattern and raced.fitness == plain.fitness
    assert raced.evaluations == plain.evaluations == 60  # the same budget, raced or not
    assert views["plain"].tokens == 60 * 8 * 11
    assert views["raced"].tokens < 0.5 * views["plain"].tokens
    assert raced.details["raced"] and not plain.details["raced"]
    # The best is scored on every stage; a pattern stopped early never becomes the best, even where
    # its fitness on its few stages is lower than the best's on all of them.
    assert len(views["raced"].stages[str(raced.pattern)][0]) == 8
    assert [h["best_fitness"] for h in raced.history] == [h["best_fitness"] for h in plain.history]
