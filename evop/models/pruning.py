"""Materialising a pattern: a standard Hugging Face checkpoint with fewer decoder layers.

:func:`prune_layers` removes the pattern's layers for good and renumbers the rest;
:func:`save_pruned` writes the result with its tokenizer and ``evop_pattern.json`` in one rename,
so ``AutoModelForCausalLM.from_pretrained`` loads it as is, without EvoP.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evop.method.patterns import Pattern
from evop.models.layers import check_pattern, keep_only, layer_access

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


def prune_layers(model: "nn.Module", pattern: Pattern, base_model: str | None = None) -> "nn.Module":
    """Remove the pattern's layers from ``model`` for good (in place) and return it.

    The kept layers are renumbered (every ``layer_idx`` attribute becomes the layer's new
    position: the KV cache is indexed by it), the config's layer count and per-layer lists are
    updated, and the provenance is recorded in ``config.evop_pruning`` so it travels with the
    checkpoint.
    """
    check_pattern(model, pattern)
    keep_only(model, pattern.kept)
    for new_idx, layer in enumerate(layer_access(model).layers(model)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    layer_access(model).config(model).evop_pruning = {
        "base_model": base_model,
        "base_num_layers": pattern.num_layers,
        "removed_layers": list(pattern.removed),
    }
    return model


def save_pruned(
    model: "nn.Module",
    tokenizer: Any | None,
    pattern: Pattern,
    out_dir: str | Path,
    base_model: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Prune ``model`` in place by ``pattern`` and save it with its tokenizer to ``out_dir``.

    The directory is written under a temporary name and renamed when complete, so a crash never
    leaves a half-written checkpoint where a finished one is expected. ``evop_pattern.json``
    beside the weights records the pattern (plus ``extra``).

    Returns:
        The checkpoint directory; ``AutoModelForCausalLM.from_pretrained`` loads it as is.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    prune_layers(model, pattern, base_model)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {
            "base_model": base_model,
            "pattern": str(pattern),
            "removed_layers": list(pattern.removed),
            "kept_layers": list(pattern.kept),
            "num_layers": pattern.num_layers,
            **(extra or {}),
        }
        (tmp / "evop_pattern.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved pruned model (%d layers) to %s", len(pattern.kept), out_dir)
    return out_dir
