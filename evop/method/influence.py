"""ShortGPT's Block Influence: how much each decoder layer changes its input.

:func:`layer_influence` measures ``1 - cos(input, output)`` of every decoder layer on the calibration
set in one dense forward (the only function here that touches a model; torch is imported inside it).
:func:`lowest_influence` turns it into ShortGPT's pattern (the ``shortgpt`` baseline and one of
EvoP's initial seeds) and :func:`influence_prior` into the per-layer prior that guides EvoP's swap
mutation (:mod:`evop.method.epps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from evop.method.patterns import Pattern, removable_layers

if TYPE_CHECKING:
    import torch
    from torch import nn


def influence_prior(influence: Sequence[float]) -> list[float]:
    """Removability from ShortGPT's Block Influence: rank-based, ``1`` for the layer that changes
    its input least down to ``1/L`` for the one that changes it most (ranks, not raw values, so
    the prior does not depend on the scale of the scores)."""
    n = len(influence)
    order = sorted(range(n), key=lambda j: (influence[j], j))
    prior = [0.0] * n
    for rank, j in enumerate(order):
        prior[j] = (n - rank) / n
    return prior


def lowest_influence(
    influence: Sequence[float], num_layers: int, k: int, protected: Sequence[int] = ()
) -> Pattern:
    """ShortGPT's pattern: the k removable layers of lowest Block Influence (ties: lower index)."""
    if len(influence) != num_layers:
        raise ValueError(f"need one Block Influence per layer ({num_layers}), got {len(influence)}")
    candidates = removable_layers(num_layers, protected, k)
    return Pattern.of(num_layers, sorted(candidates, key=lambda c: (influence[c], c))[:k])


def layer_influence(model: "nn.Module", blocks: "torch.Tensor", batch_size: int = 8) -> list[float]:
    """ShortGPT's Block Influence of every decoder layer: ``1 - cos(x_in, x_out)`` averaged over
    all calibration tokens, from one dense forward pass (hooks read each layer's input and output).

    A layer that barely changes its input (BI near 0) is the cheapest to remove. (ShortGPT says
    "block" for a decoder layer; in EvoP a *block* is a window of tokens, so the function is named
    for what it scores: layers.)

    Args:
        model: The dense model.
        blocks: Calibration blocks (n, T) of token ids.
        batch_size: Blocks per forward pass.
    """
    import torch

    from evop.models.layers import layer_access

    layers = layer_access(model).layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    inputs: dict[int, torch.Tensor] = {}

    def before(j: int):
        def hook(module, args, kwargs):
            inputs[j] = args[0] if args else kwargs["hidden_states"]

        return hook

    def after(j: int):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(inputs.pop(j).float(), out.float(), dim=-1)
            sums[j] += (1 - cos).double().sum().cpu()

        return hook

    handles = []
    for j, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(before(j), with_kwargs=True))
        handles.append(layer.register_forward_hook(after(j), with_kwargs=True))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for i in range(0, blocks.shape[0], batch_size):
                batch = blocks[i : i + batch_size].to(device)
                model(input_ids=batch, use_cache=False)
                count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return (sums / max(count, 1)).tolist()
