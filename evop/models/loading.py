"""TODO docstring (from evop.models)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from evop.errors import BadInputError
from evop.models.layers import layer_access, num_layers

if TYPE_CHECKING:
    import torch
    from torch import nn

    from evop.config import ModelConfig

log = logging.getLogger(__name__)

class ModelLoadError(BadInputError, RuntimeError):
    """A model could not be loaded (unknown id, offline hub, corrupted files...)."""


def resolve_device(device: str) -> "torch.device":
    """'auto' -> CUDA if available, else CPU; anything else as given."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, device: "torch.device") -> "torch.dtype":
    """'auto' -> bfloat16 on CUDA, float32 elsewhere (CPU half precision is slow and lossy)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _load_kwargs(cfg: "ModelConfig") -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    return kwargs


def _load_error(cfg: "ModelConfig", err: Exception) -> ModelLoadError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelLoadError(
        f"cannot load model {cfg.name_or_path!r}: {first} "
        "(a hub id needs network access to the Hugging Face Hub; a local path must be a "
        "model directory with config.json and weights)"
    )


def load_tokenizer(cfg: "ModelConfig") -> Any:
    """The model's tokenizer alone (cheap: no weights), with a pad token.

    Raises:
        ModelLoadError: naming the model when it cannot be found or read.
    """
    from transformers import AutoTokenizer

    from evop.assets.references import resolve_reference

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_reference(cfg.name_or_path), **_load_kwargs(cfg))
    except (OSError, ValueError) as err:
        raise _load_error(cfg, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: "ModelConfig") -> tuple["nn.Module", Any]:
    """Load a causal LM and its tokenizer from a hub id, a local directory or a GGUF file.

    Returns:
        ``(model, tokenizer)``, the model in eval mode on the resolved device and dtype, the
        tokenizer with a pad token.

    Raises:
        ModelLoadError: naming the model when it cannot be found or read.
        UnsupportedModelError: when its decoder layers cannot be reached.
    """
    from transformers import AutoModelForCausalLM

    from evop.assets.references import resolve_reference

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_reference(cfg.name_or_path), dtype=dtype, **_load_kwargs(cfg)
        )
    except (OSError, ValueError) as err:
        raise _load_error(cfg, err) from err
    if cfg.gguf_file:
        forget_quantization(model)
    model.to(device)
    model.eval()
    layer_access(model)  # fail early, before any heavy work, on an unknown family
    log.info(
        "loaded %s (%s, %d layers, %.1fM params) on %s as %s",
        cfg.name_or_path,
        model.config.model_type,
        num_layers(model),
        sum(p.numel() for p in model.parameters()) / 1e6,
        device,
        dtype,
    )
    return model, tokenizer


def forget_quantization(model: "nn.Module") -> None:
    """Mark a GGUF-loaded model as a plain float model so ``save_pretrained`` accepts it.

    Transformers de-quantises GGUF weights into ordinary float ``Linear`` layers but keeps the
    quantizer attached, which makes ``save_pretrained`` refuse the model.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
