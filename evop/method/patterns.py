"""Pruning patterns: which decoder layers a pruned model drops, and how many it may drop.

A *pattern* (:class:`Pattern`) is the sorted set of removed layer indices of a model with
``num_layers`` decoder layers. It is frozen and hashable so it can key the fitness memo, be
logged as one line (``"1,5,7/30"``) and be read back from that line or from JSON.

Every search method checks its problem the same way: :func:`layers_to_remove` turns a sparsity
(or a count) into ``k``, :func:`resolve_protected` resolves protected layers (negative indices
count from the end) and :func:`removable_layers` lists the layers a pattern may remove once it
has checked that ``k`` fits. :class:`PatternSpace` is that problem as a value: what every pattern
read back from a file (checkpoint, memo, result) is checked against.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from evop.errors import BadInputError


@dataclass(frozen=True, order=True)
class Pattern:
    """A set of removed decoder layers of a model with ``num_layers`` layers.

    Attributes:
        num_layers: Decoder layers of the dense model (L).
        removed: Sorted, distinct indices in ``[0, L)`` of the layers to remove.
    """

    num_layers: int
    removed: tuple[int, ...]

    def __post_init__(self) -> None:
        removed = tuple(sorted(set(int(i) for i in self.removed)))
        if len(removed) != len(self.removed):
            raise BadInputError(f"pattern has repeated layers: {list(self.removed)}")
        if removed and (removed[0] < 0 or removed[-1] >= self.num_layers):
            raise BadInputError(f"layer index out of range [0, {self.num_layers}): {list(removed)}")
        if len(removed) >= self.num_layers:
            raise BadInputError("a pattern must keep at least one layer")
        object.__setattr__(self, "removed", removed)

    @classmethod
    def of(cls, num_layers: int, removed: Iterable[int]) -> "Pattern":
        """Build a pattern from any iterable of removed indices (sorted for you)."""
        return cls(num_layers, tuple(sorted(int(i) for i in removed)))

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        """Read the one-line form produced by ``str(pattern)``: ``"1,5,7/30"``."""
        try:
            body, total = text.strip().split("/")
            removed = [int(x) for x in body.split(",") if x.strip()]
            return cls.of(int(total), removed)
        except ValueError as err:
            raise BadInputError(f"not a pattern {text!r} (expected e.g. '1,5,7/30'): {err}") from None

    @property
    def k(self) -> int:
        """Number of removed layers."""
        return len(self.removed)

    @property
    def kept(self) -> tuple[int, ...]:
        """Original indices of the layers that stay, in order."""
        gone = set(self.removed)
        return tuple(i for i in range(self.num_layers) if i not in gone)

    @property
    def sparsity(self) -> float:
        """Fraction of decoder layers removed."""
        return self.k / self.num_layers

    def __str__(self) -> str:
        return ",".join(map(str, self.removed)) + f"/{self.num_layers}"


def layers_to_remove(num_layers: int, sparsity: float | None = None, count: int | None = None) -> int:
    """Number of layers k to remove: ``count`` if given, else ``round(sparsity * num_layers)``.

    Raises:
        ValueError: if neither or both are given, or k is not in ``[1, num_layers - 1]``.
    """
    if (sparsity is None) == (count is None):
        raise BadInputError("give exactly one of sparsity or count")
    k = count if count is not None else int(round(sparsity * num_layers))  # type: ignore[operator]
    if not 1 <= k <= num_layers - 1:
        raise BadInputError(
            f"removing {k} of {num_layers} layers is not a pruning (need 1 <= k <= {num_layers - 1})"
        )
    return k


def resolve_protected(num_layers: int, protected: Sequence[int]) -> list[int]:
    """Turn protected layer indices (negative = from the end) into sorted indices in ``[0, L)``.

    Raises:
        ValueError: if an index is outside ``[-L, L)``.
    """
    resolved = set()
    for index in protected:
        if not -num_layers <= index < num_layers:
            raise BadInputError(f"protected layer {index} is out of range for {num_layers} layers")
        resolved.add(index % num_layers)
    return sorted(resolved)


def removable_layers(num_layers: int, protected: Sequence[int], k: int) -> list[int]:
    """The layers a method may remove, after checking ``k`` fits.

    Raises:
        ValueError: if ``k`` is not in ``[1, number of removable layers]`` or leaves no layer.
    """
    guarded = set(resolve_protected(num_layers, protected))
    candidates = [i for i in range(num_layers) if i not in guarded]
    if not 1 <= k <= len(candidates) or k >= num_layers:
        raise BadInputError(
            f"cannot remove k={k} layers: {len(candidates)} of {num_layers} layers are removable "
            f"(protected: {sorted(guarded)}) and at least one layer must stay"
        )
    return candidates


@dataclass(frozen=True)
class PatternSpace:
    """The patterns one search may produce: of ``num_layers`` layers, ``k`` removed, none of them
    protected. Everything read back (a checkpoint, a memo, a result) is checked against it, so an
    edited file can never ship a pattern the config forbids.

    Attributes:
        num_layers: Decoder layers of the model (read from the model, not from the file).
        k: Layers every final pattern removes.
        removable: Layers a pattern may remove (the protected ones excluded).
        protected: The config's ``protected_layers`` as given (for messages).
    """

    num_layers: int
    k: int
    removable: tuple[int, ...]
    protected: tuple[int, ...] = ()

    @classmethod
    def of(
        cls, num_layers: int, sparsity: float | None, count: int | None, protected: Sequence[int]
    ) -> "PatternSpace":
        """The space of a search settings' ``sparsity``/``num_remove`` and ``protected_layers``."""
        k = layers_to_remove(num_layers, sparsity, count)
        return cls(num_layers, k, tuple(removable_layers(num_layers, protected, k)), tuple(protected))

    @classmethod
    def any_size(cls, num_layers: int, protected: Sequence[int]) -> "PatternSpace":
        """Patterns of any size up to every removable layer (the memo of a comparison serves every
        sparsity); still of this model's layer count, still sparing the protected layers."""
        removable = [i for i in range(num_layers) if i not in set(resolve_protected(num_layers, protected))]
        return cls(num_layers, len(removable), tuple(removable), tuple(protected))

    def problem(self, pattern: "Pattern | str", exact_k: bool = True) -> str | None:
        """What is wrong with ``pattern`` here, in a few words; None when it fits.

        ``exact_k=False`` also admits smaller patterns (the steps of a greedy search, single
        layers scored to rank them), never larger ones.
        """
        if not isinstance(pattern, Pattern):
            try:
                pattern = Pattern.parse(pattern)
            except BadInputError as err:
                return str(err)
        if pattern.num_layers != self.num_layers:
            layers = pattern.num_layers
            return f"pattern {pattern} is for a model of {layers} layers; this one has {self.num_layers}"
        if pattern.k > self.k or (exact_k and pattern.k != self.k) or pattern.k == 0:
            return f"pattern {pattern} removes {pattern.k} layers; this search removes {self.k}"
        guarded = sorted(set(pattern.removed) - set(self.removable))
        if guarded:
            return (
                f"pattern {pattern} removes protected layers {guarded} "
                f"(search.protected_layers {list(self.protected)})"
            )
        return None

    def problem_in(self, data: object, fields: Sequence[str], exact_k: bool = True) -> str | None:
        """The first problem of the patterns a JSON object read back holds under ``fields`` (a list
        of patterns or a ``pattern -> ...`` table each), as ``field: problem``; None when all fit."""
        if not isinstance(data, dict):
            return f"expected a JSON object, got {type(data).__name__}"
        for field in fields:
            for pattern in data.get(field) or ():
                problem = self.problem(pattern, exact_k)
                if problem is not None:
                    return f"{field}: {problem}"
        return None

    def check(self, pattern: "Pattern | str", what: str, exact_k: bool = True) -> Pattern:
        """``pattern`` as a :class:`Pattern` if it fits this space.

        Raises:
            BadInputError: ``<what>: <problem>``.
        """
        problem = self.problem(pattern, exact_k)
        if problem is not None:
            raise BadInputError(f"{what}: {problem}")
        return pattern if isinstance(pattern, Pattern) else Pattern.parse(pattern)
