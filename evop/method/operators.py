"""The variation operators of EPPS; every one keeps a pattern's exact number of removed layers.

- :func:`random_pattern` / :func:`sample_patterns`: uniform random patterns (distinct ones);
- :func:`crossover`: keep what both parents remove, fill up from what one of them removes;
- :func:`swap_mutation`: swap removed with kept layers 1..max_swaps times (few swaps likelier),
  optionally guided by a per-layer prior;
- :func:`paired_moves`: two single-layer moves of a pattern made at once (the polish's pairs).

Randomness always comes from an explicit ``random.Random``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from itertools import combinations

from evop.method.patterns import Pattern


def random_pattern(rng: random.Random, num_layers: int, candidates: Sequence[int], k: int) -> Pattern:
    """Draw a uniformly random pattern removing ``k`` of the ``candidates`` layers.

    Args:
        rng: Source of randomness.
        num_layers: Decoder layers of the dense model.
        candidates: Sorted layer indices that may be removed.
        k: Layers to remove.

    Returns:
        A pattern with exactly ``k`` removed layers, all in ``candidates``.
    """
    return Pattern.of(num_layers, rng.sample(list(candidates), k))


def sample_patterns(
    rng: random.Random,
    num_layers: int,
    candidates: Sequence[int],
    k: int,
    count: int,
    exclude: Iterable[Pattern] = (),
    enumerate_below: int | None = None,
) -> list[Pattern]:
    """Draw ``count`` distinct uniformly random patterns, none of them in ``exclude``.

    A small space (at most ``enumerate_below`` patterns, default ``4 x count``) is enumerated and
    sampled without replacement; in a larger one, rejection of repeats rarely triggers.

    Args:
        rng: Source of randomness.
        num_layers: Decoder layers of the dense model.
        candidates: Sorted layer indices that may be removed.
        k: Layers to remove.
        count: Patterns wanted; fewer only when the space has fewer left.
        exclude: Patterns never drawn (e.g. seeds already in a population).
        enumerate_below: Largest space size that is enumerated.

    Returns:
        The patterns, in the order drawn.
    """
    seen = {str(p) for p in exclude}
    space = math.comb(len(candidates), k)
    if space <= (4 * count if enumerate_below is None else enumerate_below):
        everything = [Pattern(num_layers, c) for c in combinations(candidates, k)]
        left = [p for p in everything if str(p) not in seen]
        return rng.sample(left, min(count, len(left)))
    drawn: list[Pattern] = []
    while len(drawn) < count:
        pattern = random_pattern(rng, num_layers, candidates, k)
        if str(pattern) not in seen:
            seen.add(str(pattern))
            drawn.append(pattern)
    return drawn


def crossover(rng: random.Random, first: Pattern, second: Pattern) -> Pattern:
    """Combine two parents into a child with the same number of removed layers.

    Layers both parents remove are kept; the rest are drawn at random from the layers only one
    parent removes. Both parents have ``k`` removed layers, so the symmetric difference always
    holds enough layers and the child has exactly ``k``.

    Args:
        rng: Source of randomness.
        first: One parent.
        second: The other parent (same ``num_layers`` and ``k``).

    Returns:
        The child pattern.

    Raises:
        ValueError: if the parents differ in ``num_layers`` or ``k``.
    """
    if first.num_layers != second.num_layers or first.k != second.k:
        raise ValueError(f"cannot cross {first} with {second}: different num_layers or k")
    a, b = set(first.removed), set(second.removed)
    both = a & b
    either = sorted(a ^ b)  # sorted so the draw depends only on the rng state
    fill = rng.sample(either, first.k - len(both))
    return Pattern.of(first.num_layers, both | set(fill))


def swap_count(rng: random.Random, max_swaps: int) -> int:
    """Draw a number of swaps in ``1..max_swaps`` with ``P(s)`` proportional to ``1/s``."""
    counts = range(1, max_swaps + 1)
    return rng.choices(counts, weights=[1.0 / s for s in counts])[0]


def swap_mutation(
    rng: random.Random,
    pattern: Pattern,
    candidates: Sequence[int],
    max_swaps: int,
    prior: Sequence[float] | None = None,
) -> Pattern:
    """Swap removed layers with kept candidate layers ``1..max_swaps`` times (few swaps likelier).

    Each swap puts back one removed layer and removes one kept candidate layer instead, so the
    number of removed layers never changes and protected layers (absent from ``candidates``)
    are never touched.

    Args:
        rng: Source of randomness.
        pattern: The pattern to mutate.
        candidates: Layer indices that may be removed.
        max_swaps: Most swaps applied.
        prior: Optional removability of every layer in ``(0, 1]`` (higher: likelier harmless to
            remove, e.g. from Block Influence ranks). With it, the layer removed next is drawn in
            proportion to its removability and the layer put back in proportion to the opposite;
            every candidate keeps a nonzero chance. Uniform draws without it.

    Returns:
        The mutated pattern (``pattern`` itself if no kept candidate exists to swap with).
    """
    removed = set(pattern.removed)
    kept = set(candidates) - removed
    if not kept or not removed:
        return pattern
    for _ in range(swap_count(rng, max_swaps)):
        if prior is None:
            out = rng.choice(sorted(removed))
            into = rng.choice(sorted(kept))
        else:
            back, add = sorted(removed), sorted(kept)
            out = rng.choices(back, weights=[1.0 - prior[i] + 1.0 / len(prior) for i in back])[0]
            into = rng.choices(add, weights=[prior[i] for i in add])[0]
        removed.remove(out)
        kept.remove(into)
        removed.add(into)
        kept.add(out)
    return Pattern.of(pattern.num_layers, removed)


def paired_moves(pattern: Pattern, moves: Sequence[Pattern], limit: int) -> list[Pattern]:
    """Patterns that make two of ``moves`` at once: every pair of the first ``limit`` (most
    promising first) that take back two different layers and remove two different ones.

    Each move is ``pattern`` with one removed layer swapped for a kept one (a polish move). Two
    moves, each a little worse alone, can be better together: on SmolLM2 at 40% (CCDS seed 2) the
    polish stopped at 3,4,5,12-19,26 while 3-7,13-18,26 fits the same calibration 5% better; the
    moves 12->6 and 19->7 are each 2-3% worse alone.
    """
    removed = set(pattern.removed)
    swaps = []
    for move in moves[:limit]:
        (out,), (into,) = removed - set(move.removed), set(move.removed) - removed
        swaps.append((out, into))
    pairs = [
        Pattern.of(pattern.num_layers, (removed - {out, other_out}) | {into, other_into})
        for (out, into), (other_out, other_into) in combinations(swaps, 2)
        if out != other_out and into != other_into
    ]
    return list(dict.fromkeys(pairs))
