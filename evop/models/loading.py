"""Loading causal LMs and their tokenizers as the ``model`` config section says.

:func:`load_model` takes a hub id, a local directory, a GGUF file or an ``evop-assets:`` reference,
resolves the device (``auto``: CUDA when available) and the dtype, and reports a model that cannot
be found or read as a :class:`ModelLoadError` naming it. :func:`read_model_shape` reads the decoder
layer count and the context length from the configuration alone, for checks before any heavy work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r} (use 'auto', 'cpu', 'cuda', 'cuda:1')") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available (use 'cpu' or 'auto')")
    visible = torch.cuda.device_count() if resolved.type == "cuda" else 0
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= visible:
        raise ModelLoadError(f"device {device!r} requested but only {visible} GPUs are visible")
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


def _model_source(cfg: "ModelConfig") -> str:
    """``cfg.name_or_path`` resolved; a local directory must hold a model (its config.json).

    Raises:
        ModelLoadError: naming the directory when it has no config.json (and no ``gguf_file``).
    """
    from pathlib import Path

    from evop.assets.references import resolve_reference

    source = resolve_reference(cfg.name_or_path)
    if not cfg.gguf_file and Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise ModelLoadError(f"{cfg.name_or_path!r} is not a model directory: no config.json in {source}")
    return source


def load_tokenizer(cfg: "ModelConfig") -> Any:
    """The model's tokenizer alone (cheap: no weights), with a pad token.

    Raises:
        ModelLoadError: naming the model when it cannot be found or read.
    """
    from transformers import AutoTokenizer

    source = _model_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_load_kwargs(cfg))
    except (OSError, ValueError) as err:
        raise _load_error(cfg, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: "ModelConfig", device_map: str | None = None) -> tuple["nn.Module", Any]:
    """Load a causal LM and its tokenizer from a hub id, a local directory or a GGUF file.

    Args:
        cfg: The model section.
        device_map: ``"auto"`` splits the layers over every visible GPU (a model too large for
            one; Accelerate's placement) instead of moving it to ``cfg.device``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode on the resolved device and dtype, the
        tokenizer with a pad token.

    Raises:
        ModelLoadError: naming the model when it cannot be found or read.
        UnsupportedModelError: when its decoder layers cannot be reached.
    """
    from transformers import AutoModelForCausalLM

    source = _model_source(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg)
    try:
        extra = {"device_map": device_map} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **_load_kwargs(cfg), **extra)
    except (OSError, ValueError) as err:
        raise _load_error(cfg, err) from err
    if cfg.gguf_file:
        forget_quantization(model)
    if not device_map:
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


@dataclass(frozen=True)
class ModelShape:
    """What the checks before any heavy work need of a model, read from its configuration alone.

    Attributes:
        num_layers: Decoder layers.
        context: Longest sequence it takes (``max_position_embeddings``); None when unknown.
    """

    num_layers: int
    context: int | None


def read_model_shape(cfg: "ModelConfig") -> ModelShape:
    """The model's decoder layer count and context length from its configuration alone (no
    weights: seconds, not minutes), for checks before any heavy work.

    Raises:
        ModelLoadError: naming the model when its configuration cannot be found or read.
        UnsupportedModelError: naming the model type when EvoP does not know the family.
    """
    from transformers import AutoConfig

    from evop.models.layers import FAMILIES, UnsupportedModelError

    try:
        config = AutoConfig.from_pretrained(_model_source(cfg), **_load_kwargs(cfg))
    except (OSError, ValueError) as err:
        raise _load_error(cfg, err) from err
    access = FAMILIES.get(getattr(config, "model_type", None))  # type: ignore[arg-type]
    if access is None:
        raise UnsupportedModelError(
            f"unsupported model type {config.model_type!r} of {cfg.name_or_path!r}: EvoP knows where "
            f"the decoder layers are for {', '.join(sorted(FAMILIES))}"
        )
    sub = getattr(config, access.config_path) if access.config_path else config
    count = getattr(sub, "num_hidden_layers", None) or getattr(sub, "n_layer", None)
    if not count:
        raise ModelLoadError(f"the configuration of {cfg.name_or_path!r} does not say how many layers it has")
    context = getattr(sub, "max_position_embeddings", None) or getattr(sub, "n_positions", None)
    return ModelShape(int(count), int(context) if context else None)


def read_num_layers(cfg: "ModelConfig") -> int:
    """The model's decoder layer count from its configuration alone (see :func:`read_model_shape`)."""
    return read_model_shape(cfg).num_layers
