"""Tests of EPPS (evop.search) on synthetic objectives with known optima; no torch needed."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evop.config import SearchConfig
from evop.method.genetic import GeneticSearch
from evop.method.influence import influence_prior
from evop.method.operators import crossover, paired_moves, random_pattern, swap_count, swap_mutation
from evop.method.patterns import Pattern
from evop.method.state import SearchState


def search_config(**overrides) -> SearchConfig:
    """Small, fast settings; ``num_remove`` only satisfies the config (GeneticSearch takes k).
    The GA alone unless a test asks for polish rounds."""
    values = dict(num_remove=1, population=8, generations=6, patience=6, seed=0, polish_rounds=0)
    values.update(overrides)
    return SearchConfig(**values)


def hashed_fitness(pattern: Pattern) -> float:
    """A deterministic, rugged objective of any pattern."""
    return sum(((i * 7919 + 13) % 101) / 101 for i in pattern.removed) + 0.01 * pattern.removed[0]


def interaction_objective(num_layers: int, seed: int):
    """Per-layer costs plus a pairwise term (adjacent removals hurt), so it is not separable."""
    rng = random.Random(seed)
    cost = [rng.uniform(0, 1) for _ in range(num_layers)]
    pair = {
        (i, j): rng.uniform(-0.3, 0.3) + (0.4 if j == i + 1 else 0.0)
        for i in range(num_layers)
        for j in range(i + 1, num_layers)
    }

    def fitness(pattern: Pattern) -> float:
        removed = pattern.removed
        return sum(cost[i] for i in removed) + sum(pair[ab] for ab in itertools.combinations(removed, 2))

    return fitness


def brute_force_optimum(num_layers: int, k: int, candidates: list[int], fitness) -> str:
    patterns = (Pattern.of(num_layers, c) for c in itertools.combinations(candidates, k))
    return str(min(patterns, key=lambda p: (fitness(p), str(p))))


class CountingFitness:
    """Wraps a fitness function and counts calls per pattern."""

    def __init__(self, fitness):
        self.fitness = fitness
        self.calls: Counter[str] = Counter()

    def __call__(self, pattern: Pattern) -> float:
        self.calls[str(pattern)] += 1
        return self.fitness(pattern)


def without_seconds(state: SearchState) -> dict:
    """The state as plain JSON data minus the only nondeterministic field (wall time)."""
    data = json.loads(state.to_json())
    for entry in data["history"]:
        del entry["seconds"]
    return data


def all_patterns(state: SearchState) -> list[Pattern]:
    return [Pattern.parse(s) for s in [*state.population, *state.memo, *([state.best] if state.best else [])]]


# --------------------------------------------------------------------------- operators


def test_crossover_keeps_intersection_and_k():
    rng = random.Random(1)
    a, b = Pattern.of(12, [1, 2, 3, 7]), Pattern.of(12, [2, 3, 9, 10])
    for _ in range(200):
        child = crossover(rng, a, b)
        assert child.k == 4
        assert {2, 3} <= set(child.removed) <= {1, 2, 3, 7, 9, 10}


def test_swap_mutation_keeps_k_and_candidates():
    rng = random.Random(2)
    candidates = list(range(1, 11))
    pattern = Pattern.of(12, [1, 4, 5])
    for _ in range(200):
        child = swap_mutation(rng, pattern, candidates, max_swaps=3)
        assert child.k == 3 and set(child.removed) <= set(candidates)
    # Nothing to swap with: the pattern comes back unchanged.
    assert swap_mutation(rng, Pattern.of(5, [1, 2]), [1, 2], 3) == Pattern.of(5, [1, 2])


def test_swap_count_prefers_few_swaps():
    rng = random.Random(3)
    counts = Counter(swap_count(rng, 3) for _ in range(6000))
    assert set(counts) == {1, 2, 3}
    assert counts[1] > counts[2] > counts[3]


# --------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_exact_sparsity_property(data):
    num_layers = data.draw(st.integers(4, 40), label="num_layers")
    protected = data.draw(
        st.lists(st.integers(-num_layers, num_layers - 1), max_size=3, unique=True), label="protected"
    )
    removable = num_layers - len({p % num_layers for p in protected})
    k = data.draw(st.integers(1, min(removable, num_layers - 1)), label="k")
    population = data.draw(st.integers(2, 8), label="population")
    config = search_config(
        protected_layers=protected,
        population=population,
        elitism=data.draw(st.integers(1, population - 1), label="elitism"),
        generations=data.draw(st.integers(1, 4), label="generations"),
        selection=data.draw(st.sampled_from(["tournament", "truncation"]), label="selection"),
        seed=data.draw(st.integers(0, 2**32 - 1), label="seed"),
    )
    state = GeneticSearch(num_layers, k, config, hashed_fitness).run()

    banned = {p % num_layers for p in protected}
    assert state.done
    assert 1 <= len(state.population) <= population
    for pattern in all_patterns(state):
        assert pattern.num_layers == num_layers
        assert pattern.k == k
        assert not banned & set(pattern.removed)
        assert all(0 <= i < num_layers for i in pattern.removed)


# --------------------------------------------------------------------------- reproducibility


def test_same_seed_same_search_and_different_seeds_differ():
    fitness = interaction_objective(20, seed=5)
    runs = [GeneticSearch(20, 5, search_config(seed=s, generations=8), fitness).run() for s in (7, 7, 8)]
    assert without_seconds(runs[0]) == without_seconds(runs[1])
    assert runs[0].history[0]["best_fitness"] != runs[2].history[0]["best_fitness"]
    assert runs[0].population != runs[2].population


@pytest.mark.parametrize("selection", ["tournament", "truncation"])
def test_resume_from_json_equals_uninterrupted(selection):
    config = search_config(
        seed=11, population=10, generations=10, patience=10, selection=selection, polish_rounds=5
    )
    fitness = interaction_objective(24, seed=3)
    checkpoints: list[str] = []
    full = GeneticSearch(24, 6, config, fitness).run(on_generation=lambda s: checkpoints.append(s.to_json()))
    assert [json.loads(c)["generation"] for c in checkpoints] == list(range(len(checkpoints)))
    assert full.ga_stop_reason == "generations"
    assert full.stop_reason in ("local optimum", "polish rounds")
    polish = [g for g, h in enumerate(full.history) if h["phase"] == "polish"]
    assert polish and polish[0] == 11  # the polish rounds follow the GA's 10 generations

    for g in (0, 1, 4, 10, polish[-1] - 1):
        counting = CountingFitness(fitness)
        state = SearchState.from_json(checkpoints[g])
        resumed = GeneticSearch(24, 6, config, counting).run(state)
        assert without_seconds(resumed) == without_seconds(full)
        # The memo travels with the checkpoint: nothing scored before g is scored again.
        assert not set(counting.calls) & set(state.memo)

    # From before generation 0 as well.
    initial = GeneticSearch(24, 6, config, fitness).initial_state()
    resumed = GeneticSearch(24, 6, config, fitness).run(SearchState.from_json(initial.to_json()))
    assert without_seconds(resumed) == without_seconds(full)


def test_step_does_not_change_its_input():
    search = GeneticSearch(16, 4, search_config(), hashed_fitness)
    state = search.step(search.initial_state())
    before = state.to_json()
    search.step(state)
    assert state.to_json() == before


def test_fitness_is_never_called_twice_for_a_pattern():
    counting = CountingFitness(interaction_objective(10, seed=1))
    config = search_config(protected_layers=[], population=12, generations=40, patience=40, seed=3)
    state = GeneticSearch(10, 3, config, counting).run()
    assert max(counting.calls.values()) == 1
    assert sum(counting.calls.values()) == state.evaluations == len(state.memo)
    assert state.history[-1]["evaluations"] == state.evaluations
    assert sum(h["new_evaluations"] for h in state.history) == state.evaluations


# --------------------------------------------------------------------------- quality


@pytest.mark.parametrize("seed", range(5))
def test_finds_known_optimum_with_a_third_of_the_evaluations(seed):
    num_layers, k = 16, 4
    fitness = interaction_objective(num_layers, seed=0)
    optimum = brute_force_optimum(num_layers, k, list(range(num_layers)), fitness)
    budget = 0.35 * math.comb(num_layers, k)  # 637 of 1820 patterns
    # 16 initial + 44 generations x 14 children = 632 evaluations at most.
    config = search_config(protected_layers=[], population=16, generations=44, patience=44, seed=seed)
    state = GeneticSearch(num_layers, k, config, CountingFitness(fitness)).run()
    assert state.best == optimum
    assert state.best_fitness == fitness(Pattern.parse(optimum))
    assert state.evaluations <= budget


@pytest.mark.parametrize("seed", range(5))
def test_finds_known_optimum_with_protected_layers(seed):
    num_layers, k = 16, 4
    fitness = interaction_objective(num_layers, seed=1)
    candidates = list(range(1, num_layers - 1))
    optimum = brute_force_optimum(num_layers, k, candidates, fitness)
    budget = 0.35 * math.comb(len(candidates), k)  # 350 of 1001 patterns
    # 16 initial + 23 generations x 14 children = 338 evaluations at most.
    config = search_config(protected_layers=[0, -1], population=16, generations=23, patience=23, seed=seed)
    state = GeneticSearch(num_layers, k, config, fitness).run()
    assert state.best == optimum
    assert state.evaluations <= budget
    assert all({0, num_layers - 1}.isdisjoint(Pattern.parse(p).removed) for p in state.memo)


def test_exhausted_small_space_finds_argmin():
    fitness = interaction_objective(6, seed=9)
    counting = CountingFitness(fitness)
    config = search_config(protected_layers=[], population=4, elitism=1, generations=50, patience=50)
    state = GeneticSearch(6, 2, config, counting).run()
    assert state.stop_reason == "exhausted" and state.done
    assert state.evaluations == math.comb(6, 2) == len(counting.calls)
    assert state.best == brute_force_optimum(6, 2, list(range(6)), fitness)


def test_population_larger_than_space_is_exhausted_at_once():
    state = GeneticSearch(6, 2, search_config(protected_layers=[], population=20), hashed_fitness).run()
    assert state.generation == 0 and state.stop_reason == "exhausted"
    assert len(state.population) == 15


def test_stops_on_patience():
    config = search_config(protected_layers=[], population=4, generations=100, patience=3)
    state = GeneticSearch(30, 3, config, lambda p: 1.0).run()  # a flat objective never improves
    assert state.stop_reason == "patience" and state.stall == 3 and state.generation == 3


def test_polish_moves_put_one_removed_layer_next_to_the_removed_ones():
    search = GeneticSearch(12, 3, search_config(protected_layers=[0, -1], polish_radius=1), hashed_fitness)
    moves = search.polish_moves(Pattern.of(12, [1, 2, 7]))
    edges = (3, 6, 8)  # kept, removable, at most 1 from a removed layer (0 is protected)
    expected = {tuple(sorted({1, 2, 7} - {layer} | {target})) for layer in (1, 2, 7) for target in edges}
    assert {p.removed for p in moves} == expected and len(moves) == len(expected) == 9
    assert (1, 2, 8) in expected and (2, 7, 8) in expected  # a shift by one, a jump to the run's edge
    wider = GeneticSearch(12, 3, search_config(polish_radius=2), hashed_fitness)
    assert len(wider.polish_moves(Pattern.of(12, [1, 2, 7]))) == 3 * len((3, 4, 5, 6, 8, 9))


def smooth_objective(pattern: Pattern) -> float:
    """Removing layer i costs |i - 9.3|: the optimum is the run of layers nearest 9.3."""
    return sum(abs(i - 9.3) for i in pattern.removed)


def test_polish_reaches_the_optimum_the_ga_stopped_short_of():
    n, k = 24, 5
    optimum = brute_force_optimum(n, k, list(range(1, n - 1)), smooth_objective)
    assert optimum == "7,8,9,10,11/24"
    short = dict(protected_layers=[0, -1], population=6, generations=2, patience=2, seed=1)
    ga = GeneticSearch(n, k, search_config(**short), smooth_objective).run()
    assert ga.best != optimum and ga.stop_reason == "generations"
    counting = CountingFitness(smooth_objective)
    polished = GeneticSearch(n, k, search_config(**short, polish_rounds=50), counting).run()
    assert polished.best == optimum
    assert (polished.ga_stop_reason, polished.stop_reason) == ("generations", "local optimum")
    # The GA phase is the same search; the polish only adds rounds, each never worse than the last.
    assert without_seconds(polished)["history"][:3] == without_seconds(ga)["history"]
    assert [h["phase"] for h in polished.history] == ["ga"] * 3 + ["polish"] * polished.polish_rounds
    bests = [h["best_fitness"] for h in polished.history]
    assert bests == sorted(bests, reverse=True)
    assert polished.evaluations == len(counting.calls) <= ga.evaluations + polished.polish_rounds * 2 * k * k


def test_polish_stops_after_its_rounds_or_at_once_on_a_flat_objective():
    short = dict(protected_layers=[0, -1], population=6, generations=2, patience=2, seed=1)
    capped = GeneticSearch(24, 5, search_config(**short, polish_rounds=1), smooth_objective).run()
    assert capped.stop_reason == "polish rounds" and capped.polish_rounds == 1
    flat_config = search_config(**{**short, "generations": 10}, polish_rounds=5)
    flat = GeneticSearch(24, 5, flat_config, lambda p: 1.0).run()
    assert flat.ga_stop_reason == "patience" and flat.stop_reason == "local optimum"
    assert flat.polish_rounds == 1


def two_move_trap(pattern: Pattern) -> float:
    """On 10 layers, k = 2: 5,6 is a local optimum of single moves (each of its four most
    promising moves, 5 or 6 -> 1 or 2, is worse), while two of them at once give the optimum 1,2."""
    removed = set(pattern.removed)
    if removed in ({1, 2}, {5, 6}):
        return 1.0 if removed == {1, 2} else 2.0
    return 2.5 if removed in ({1, 5}, {1, 6}, {2, 5}, {2, 6}) else 3.0 + sum(removed) / 100


def test_polish_pairs_make_two_moves_at_once_where_every_single_move_is_worse():
    trapped = dict(protected_layers=[0, -1], population=2, elitism=1, generations=1, patience=1, seed=3)
    seeds = [Pattern.of(10, [5, 6])]
    single = GeneticSearch(10, 2, search_config(**trapped, polish_rounds=5, polish_radius=9), two_move_trap,
                           seed_patterns=seeds).run()
    assert (single.best, single.stop_reason, single.polish_rounds) == ("5,6/10", "local optimum", 1)
    counting = CountingFitness(two_move_trap)
    paired = GeneticSearch(10, 2, search_config(**trapped, polish_rounds=5, polish_radius=9, polish_pairs=4),
                           counting, seed_patterns=seeds).run()
    assert (paired.best, paired.best_fitness, paired.stop_reason) == ("1,2/10", 1.0, "local optimum")
    # The GA and the first polish round are the same; the pair round scored one new pattern (the
    # pairs of the 4 best moves that take back and remove distinct layers are all 1,2), then a
    # single round and a pair round around 1,2 found nothing better.
    assert without_seconds(paired)["history"][:3] == without_seconds(single)["history"][:3]
    assert paired.history[3]["new_evaluations"] == 1 and paired.polish_rounds == 4
    assert max(counting.calls.values()) == 1


def test_paired_moves_combine_the_first_moves_that_touch_distinct_layers():
    pattern = Pattern.of(12, [3, 4, 8])
    moves = [Pattern.of(12, m) for m in ([2, 4, 8], [3, 4, 9], [3, 8, 9], [1, 4, 8], [3, 4, 10])]
    pairs = paired_moves(pattern, moves, 4)
    # 3->2 with 8->9, 3->2 with 4->9, 8->9 with 3->1, 4->9 with 3->1; not 3->2 with 3->1 (same
    # layer taken back), 8->9 with 4->9 (same layer removed), nor anything with the fifth move.
    expected = [[2, 4, 9], [2, 8, 9], [1, 4, 9], [1, 8, 9]]
    assert [p.removed for p in pairs] == [tuple(e) for e in expected]
    assert paired_moves(pattern, moves, 1) == [] and paired_moves(pattern, moves, 0) == []


def test_seed_patterns_come_first():
    seed = Pattern.of(16, [3, 4, 5, 6])
    search = GeneticSearch(16, 4, search_config(), hashed_fitness, seed_patterns=[seed, seed])
    state = search.step(search.initial_state())
    assert next(iter(state.memo)) == str(seed)
    assert len(state.memo) == 8


# --------------------------------------------------------------------------- robustness


def diverging(pattern: Pattern) -> float:
    removed = set(pattern.removed)
    if 3 in removed:
        return math.nan
    if 5 in removed:
        return math.inf
    if 7 in removed:
        raise OverflowError("activations overflowed")
    if 9 in removed:
        raise FloatingPointError("nan in logits")
    if 11 in removed:
        return 10**400  # an int too large for a float
    return hashed_fitness(pattern)


def check_diverged_rank_last(state: SearchState) -> None:
    values = [state.memo[p] for p in state.population]
    assert values == sorted(values)
    assert math.isfinite(state.best_fitness)
    assert not {3, 5, 7, 9, 11} & set(Pattern.parse(state.best).removed)
    diverged = [p for p, v in state.memo.items() if not math.isfinite(v)]
    assert diverged and all(state.memo[p] == math.inf for p in diverged)
    json.loads(state.to_json(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))


def test_diverged_candidates_rank_last_and_do_not_crash():
    config = search_config(protected_layers=[], population=12, generations=5)
    state = GeneticSearch(14, 4, config, diverging).run()
    check_diverged_rank_last(state)


def test_all_diverged_generation_zero():
    config = search_config(population=4, generations=2)
    state = GeneticSearch(10, 2, config, lambda p: math.nan).run()
    assert state.best_fitness == math.inf and state.best is not None
    assert state.history[0]["mean_fitness"] == math.inf
    assert SearchState.from_json(state.to_json()) == state


def test_strict_json_round_trip_with_inf():
    config = search_config(protected_layers=[], population=12, generations=3)
    state = GeneticSearch(14, 4, config, diverging).run()
    assert math.inf in state.memo.values()
    text = state.to_json()
    json.dumps(json.loads(text), allow_nan=False)  # strict JSON both ways
    assert "Infinity" not in text and "NaN" not in text
    restored = SearchState.from_json(text)
    assert restored == state
    assert restored.evaluations == state.evaluations


def test_from_json_rejects_other_documents():
    with pytest.raises(ValueError):
        SearchState.from_json('{"generation": 3}')


# --------------------------------------------------------------------------- validation


def test_k_larger_than_removable_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="removable"):
        GeneticSearch(6, 5, search_config(protected_layers=[0, -1]), hashed_fitness)
    with pytest.raises(ValueError, match="removable"):
        GeneticSearch(6, 6, search_config(protected_layers=[]), hashed_fitness)


def test_invalid_arguments():
    config = search_config()
    with pytest.raises(ValueError, match="out of range"):
        GeneticSearch(10, 2, search_config(protected_layers=[10]), hashed_fitness)
    with pytest.raises(ValueError, match="protected"):
        GeneticSearch(10, 2, config, hashed_fitness, seed_patterns=[Pattern.of(10, [0, 4])])
    with pytest.raises(ValueError, match="k=2"):
        GeneticSearch(10, 2, config, hashed_fitness, seed_patterns=[Pattern.of(10, [3, 4, 5])])
    other = GeneticSearch(12, 2, config, hashed_fitness).initial_state()
    with pytest.raises(ValueError, match="different search"):
        GeneticSearch(10, 2, config, hashed_fitness).step(other)


def test_step_after_done_is_an_error():
    search = GeneticSearch(6, 2, search_config(protected_layers=[], population=20), hashed_fitness)
    state = search.run()
    with pytest.raises(ValueError, match="done"):
        search.step(state)
    assert search.run(state) is state


def test_random_pattern_is_within_candidates():
    rng = random.Random(0)
    for _ in range(100):
        pattern = random_pattern(rng, 10, [2, 3, 5, 7], 3)
        assert pattern.k == 3 and set(pattern.removed) <= {2, 3, 5, 7}


@pytest.mark.parametrize("survivors", ["plus", "generational"])
def test_survivor_schemes(survivors):
    search = GeneticSearch(16, 4, search_config(survivors=survivors, generations=3), hashed_fitness)
    state = search.step(search.initial_state())
    for _ in range(3):
        parents = state.population
        state = search.step(state)
        new = [p for p in state.memo if p not in parents]
        if survivors == "plus":
            # (mu + lambda): the population is the best of the parents and everything bred now.
            pool = sorted(
                set(parents) | set(state.population) | set(new[-7:]), key=lambda s: (state.memo[s], s)
            )
            assert state.population == pool[: len(state.population)]
            assert max(state.memo[p] for p in state.population) <= max(state.memo[p] for p in parents)
        else:
            # Only the elites are sure to stay; the rest of the parents are replaced by children.
            assert set(parents[:2]) <= set(state.population)


def test_influence_prior_ranks_layers_by_block_influence():
    assert influence_prior([0.5, 0.1, 0.9, 0.3]) == [0.5, 1.0, 0.25, 0.75]


def test_prior_guided_swaps_prefer_removable_layers_and_keep_the_invariants():
    rng = random.Random(0)
    prior = [0.05] * 12
    prior[7] = 1.0  # layer 7 is by far the most removable
    start = Pattern.of(12, [1, 2, 3])
    guided, uniform = Counter(), Counter()
    for _ in range(2000):
        child = swap_mutation(rng, start, list(range(1, 11)), 1, prior)
        assert child.k == 3 and set(child.removed) <= set(range(1, 11))
        guided.update(set(child.removed) - set(start.removed))
        uniform.update(set(swap_mutation(rng, start, list(range(1, 11)), 1).removed) - set(start.removed))
    assert guided[7] > 0.6 * 2000 and uniform[7] < 0.25 * 2000
    assert sum(guided.values()) == 2000 and len(guided) > 1  # every kept layer keeps a chance


def test_layer_prior_is_validated():
    with pytest.raises(ValueError, match="layer_prior needs 16 values"):
        GeneticSearch(16, 4, search_config(), hashed_fitness, layer_prior=[0.5] * 15)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        GeneticSearch(16, 4, search_config(), hashed_fitness, layer_prior=[0.0] * 16)


def test_search_progress_rates_and_an_upper_bound_of_the_time_left():
    from evop.pipeline.progress import SearchProgress

    progress = SearchProgress(total_steps=10, done=2)  # two steps read from checkpoints
    assert progress.eta_seconds is None and progress.patterns_per_s is None
    progress.update({"generation": 2, "seconds": 4.0, "new_evaluations": 8, "new_tokens": 4096})
    progress.update({"generation": 3, "seconds": 6.0, "new_evaluations": 12, "new_tokens": 6144})
    assert progress.done == 4 and progress.fraction == 0.4
    assert progress.patterns_per_s == 2.0 and progress.tokens_per_s == 1024.0
    assert progress.eta_seconds == 6 * 5.0  # 6 steps left at the mean 5 s of the 2 timed here
    expected = "step 4 of at most 10 · 2.00 patterns/s · 1,024 tokens/s · at most 0m30s left"
    assert progress.describe() == expected
