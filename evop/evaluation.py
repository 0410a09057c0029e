"""Perplexity of dense and pruned models on calibration blocks and held-out text."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from evop.calibration import load_texts, token_blocks
from evop.fitness import perplexity

if TYPE_CHECKING:
    import torch
    from torch import nn


def text_blocks(
    source: str, tokenizer: Any, block_len: int = 256, max_blocks: int | None = 16, text_field: str = "text"
) -> "torch.Tensor":
    """Non-overlapping ``block_len`` windows of a text source (WikiText-2 style), the first
    ``max_blocks`` of them (None: all).

    Raises:
        CalibrationDataError: when the source cannot be read or yields no full block.
    """
    from evop.calibration import CalibrationDataError

    blocks = token_blocks(load_texts(source, text_field=text_field), tokenizer, block_len, max_blocks)
    if blocks.shape[0] == 0:
        raise CalibrationDataError(f"{source!r} is shorter than one block of {block_len} tokens")
    return blocks


def save_blocks(blocks: "torch.Tensor", path: str | Path) -> Path:
    """Save token blocks as safetensors (no pickle)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({"blocks": blocks.contiguous()}, str(path))
    return path


def load_blocks(path: str | Path) -> "torch.Tensor":
    """Read blocks saved by :func:`save_blocks`."""
    from safetensors.torch import load_file

    return load_file(str(path))["blocks"]


def perplexities(
    model: "nn.Module", sets: dict[str, "torch.Tensor"], batch_size: int = 8
) -> dict[str, float]:
    """Perplexity of ``model`` on each named set of blocks."""
    return {name: perplexity(model, blocks, batch_size) for name, blocks in sets.items()}
