"""Reaching the decoder layers of causal LMs, family by family, and running without some of them.

Every architecture keeps its decoder layers in one ``nn.ModuleList`` at a family-specific
place, and counts them in a family-specific config attribute. Some also keep per-layer config
lists (Gemma's ``layer_types``) that must follow the layers. :class:`LayerAccess` names those
places (:data:`FAMILIES`); :func:`layers_kept` (and :func:`layers_skipped`) run the model with only
some of its layers, *in place*, for scoring, and put the others back exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evop.errors import BadInputError
from evop.method.patterns import Pattern

if TYPE_CHECKING:
    import torch
    from torch import nn


class UnsupportedModelError(BadInputError):
    """The model's architecture is not one whose decoder layers EvoP knows how to reach."""


@dataclass(frozen=True)
class LayerAccess:
    """Where a family keeps its decoder layers.

    Attributes:
        layers_path: Dotted attribute path from the CausalLM to the decoder ``ModuleList``.
        config_path: Dotted path from ``model.config`` to the config that counts the layers
            ('' for the top-level config; 'text_config' for multimodal wrappers).
    """

    layers_path: str
    config_path: str = ""

    def layers(self, model: "nn.Module") -> "nn.ModuleList":
        return _get(model, self.layers_path)

    def config(self, model: "nn.Module") -> Any:
        return _get(model.config, self.config_path) if self.config_path else model.config


# model_type -> where its layers live. Each entry is covered by a tiny random-model test.
FAMILIES: dict[str, LayerAccess] = {
    "llama": LayerAccess("model.layers"),
    "mistral": LayerAccess("model.layers"),
    "mixtral": LayerAccess("model.layers"),
    "qwen2": LayerAccess("model.layers"),
    "qwen3": LayerAccess("model.layers"),
    "gemma": LayerAccess("model.layers"),
    "gemma2": LayerAccess("model.layers"),
    "gemma3_text": LayerAccess("model.layers"),
    "phi3": LayerAccess("model.layers"),
    "phi": LayerAccess("model.layers"),
    "opt": LayerAccess("model.decoder.layers"),
    "gpt2": LayerAccess("transformer.h"),
    "gpt_neox": LayerAccess("gpt_neox.layers"),
}


# Per-layer config lists that must be filtered together with the layers.
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")


def _get(obj: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def _set(obj: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for name in parents:
        obj = getattr(obj, name)
    setattr(obj, last, value)


def layer_access(model: "nn.Module") -> LayerAccess:
    """The :class:`LayerAccess` of ``model``'s family.

    Raises:
        UnsupportedModelError: naming the model type when EvoP does not know the family.
    """
    model_type = getattr(model.config, "model_type", None)
    access = FAMILIES.get(model_type)  # type: ignore[arg-type]
    if access is None:
        raise UnsupportedModelError(
            f"unsupported model type {model_type!r} ({type(model).__name__}): EvoP knows where the "
            f"decoder layers are for {', '.join(sorted(FAMILIES))}"
        )
    return access


def device_of(model: "nn.Module") -> "torch.device":
    """The device of the model's (first) parameters: where its inputs must go."""
    return next(model.parameters()).device


def num_layers(model: "nn.Module") -> int:
    """Number of decoder layers the model currently runs."""
    return len(layer_access(model).layers(model))


def _layer_state(cfg: Any) -> dict[str, Any]:
    state = {"num_hidden_layers": cfg.num_hidden_layers}
    for name in PER_LAYER_LISTS:
        value = getattr(cfg, name, None)
        if isinstance(value, (list, tuple)):
            state[name] = list(value)
    return state


def _apply_layer_state(cfg: Any, state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(cfg, name, value)


def _kept_layer_state(cfg: Any, kept: tuple[int, ...]) -> dict[str, Any]:
    state = _layer_state(cfg)
    out: dict[str, Any] = {"num_hidden_layers": len(kept)}
    for name in PER_LAYER_LISTS:
        if name in state:
            out[name] = [state[name][i] for i in kept]
    return out


def check_pattern(model: "nn.Module", pattern: Pattern) -> None:
    """Raise ValueError when ``pattern`` was made for a model with another layer count."""
    n = num_layers(model)
    if pattern.num_layers != n:
        raise ValueError(f"pattern {pattern} is for {pattern.num_layers} layers, the model has {n}")


def keep_only(model: "nn.Module", kept: Sequence[int]) -> tuple["nn.ModuleList", dict[str, Any]]:
    """Make ``model`` run only the layers at positions ``kept``; return what :func:`restore` needs.

    Nothing is copied: the decoder list is swapped for a new list of the same module objects,
    and the layer count and per-layer config lists are set to match.
    """
    from torch import nn

    access = layer_access(model)
    original = access.layers(model)
    cfg = access.config(model)
    saved = _layer_state(cfg)
    _set(model, access.layers_path, nn.ModuleList([original[i] for i in kept]))
    _apply_layer_state(cfg, _kept_layer_state(cfg, tuple(kept)))
    return original, saved


def restore(model: "nn.Module", original: "nn.ModuleList", saved: dict[str, Any]) -> None:
    """Undo :func:`keep_only`: put the original decoder list and config values back."""
    access = layer_access(model)
    _set(model, access.layers_path, original)
    _apply_layer_state(access.config(model), saved)


@contextmanager
def layers_kept(model: "nn.Module", kept: Sequence[int]) -> Iterator["nn.Module"]:
    """Run ``model`` with only the layers at positions ``kept`` inside the block, then restore it
    exactly. The KV-cache ``layer_idx`` bookkeeping is left alone: use ``use_cache=False``."""
    original, saved = keep_only(model, kept)
    try:
        yield model
    finally:
        restore(model, original, saved)


@contextmanager
def layers_skipped(model: "nn.Module", pattern: Pattern) -> Iterator["nn.Module"]:
    """Run ``model`` without the pattern's layers inside the block, then restore it exactly."""
    check_pattern(model, pattern)
    with layers_kept(model, pattern.kept):
        yield model
