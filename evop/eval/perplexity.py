"""Perplexity of dense and pruned models on calibration blocks and held-out text.

The protocol of the layer-pruning papers (WikiText-2 style): the held-out text is one token
stream (documents joined by EOS) cut into fixed-length windows, non-overlapping by default; with
a stride below the window length the windows overlap and each scores only its new tokens
(:func:`heldout_set` builds either kind, :func:`perplexities` scores a model on them).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from evop.errors import BadInputError
from evop.method.calibration import load_texts, token_blocks
from evop.method.fitness import perplexity

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
    from evop.method.calibration import CalibrationDataError

    blocks = token_blocks(load_texts(source, text_field=text_field), tokenizer, block_len, max_blocks)
    if blocks.shape[0] == 0:
        raise CalibrationDataError(f"{source!r} is shorter than one block of {block_len} tokens")
    return blocks


class StridedWindows(NamedTuple):
    """Overlapping windows of one token stream (the sliding-window perplexity protocol).

    Window ``i`` starts ``i * stride`` tokens in; only its tokens from ``score_from[i]`` on are
    scored (the first window scores all of them, later ones only the ``stride`` tokens no
    earlier window scored), so every token of the stream is predicted exactly once, with at
    least ``block_len - stride`` tokens of context after the first window.
    """

    windows: "torch.Tensor"  # (N, block_len) token ids
    score_from: "torch.Tensor"  # (N,) first scored position of each window


def strided_windows(
    source: str,
    tokenizer: Any,
    block_len: int = 256,
    stride: int = 128,
    max_windows: int | None = 16,
    text_field: str = "text",
) -> StridedWindows:
    """``block_len`` windows of a text source every ``stride`` tokens (see :class:`StridedWindows`).

    Raises:
        ValueError: if ``stride`` is not in ``[1, block_len]``.
        CalibrationDataError: when the source cannot be read or yields no full window.
    """
    import torch

    from evop.method.calibration import CalibrationDataError

    if not 1 <= stride <= block_len:
        raise ValueError(f"stride must be in [1, block_len={block_len}], got {stride}")
    need = None if max_windows is None else (max_windows - 1) * stride + block_len
    stream = token_blocks(load_texts(source, text_field=text_field), tokenizer, 1, need).flatten()
    starts = list(range(0, stream.numel() - block_len + 1, stride))[:max_windows]
    if not starts:
        raise CalibrationDataError(f"{source!r} is shorter than one window of {block_len} tokens")
    windows = torch.stack([stream[s : s + block_len] for s in starts])
    score_from = torch.full((len(starts),), block_len - stride, dtype=torch.long)
    score_from[0] = 0
    return StridedWindows(windows, score_from)


def strided_perplexity(model: "nn.Module", data: StridedWindows, batch_size: int = 8) -> float:
    """Perplexity over the scored tokens of :class:`StridedWindows` (each token counted once)."""
    import torch
    import torch.nn.functional as F

    from evop.method.fitness import nll_to_ppl

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, data.windows.shape[0], batch_size):
            batch = data.windows[i : i + batch_size].to(device)
            first = data.score_from[i : i + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            losses = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
            # Target position j + 1 is scored when it is at or after the window's first scored one.
            target = torch.arange(1, batch.shape[1], device=device)
            mask = (target[None, :] >= first[:, None]).flatten()
            total += losses[mask].sum().item()
            count += int(mask.sum())
    return nll_to_ppl(total / count)


def heldout_set(
    source: str, tokenizer: Any, block_len: int, max_blocks: int | None, stride: int | None = None
) -> "torch.Tensor | StridedWindows":
    """A held-out evaluation set: non-overlapping windows, or strided ones when ``stride`` is set
    below ``block_len``."""
    if stride is None or stride >= block_len:
        return text_blocks(source, tokenizer, block_len, max_blocks)
    return strided_windows(source, tokenizer, block_len, stride, max_blocks)


def save_blocks(blocks: "torch.Tensor", path: str | Path) -> Path:
    """Save token blocks as safetensors (no pickle)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({"blocks": blocks.contiguous()}, str(path))
    return path


def load_blocks(path: str | Path) -> "torch.Tensor":
    """Read blocks saved by :func:`save_blocks`.

    Raises:
        BadInputError: naming the file when it is missing, a directory, or not such a file.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "not found"
        raise BadInputError(f"calibration blocks {path} {problem} (calibration.safetensors of `evop search`)")
    try:
        blocks = load_file(str(path)).get("blocks")
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error type on foreign bytes)
        raise BadInputError(f"calibration blocks {path}: not a safetensors file ({err})") from None
    if blocks is None or blocks.dim() != 2 or blocks.is_floating_point():
        raise BadInputError(f"calibration blocks {path}: no 2-D 'blocks' tensor of token ids in it")
    return blocks


def perplexities(
    model: "nn.Module", sets: dict[str, "torch.Tensor | StridedWindows"], batch_size: int = 8
) -> dict[str, float]:
    """Perplexity of ``model`` on each named set of blocks (or strided windows)."""
    return {
        name: strided_perplexity(model, data, batch_size)
        if isinstance(data, StridedWindows)
        else perplexity(model, data, batch_size)
        for name, data in sets.items()
    }
