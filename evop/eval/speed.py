"""Inference speed of a dense and a pruned model: does removing layers make the model faster?

What is measured, for one fixed batch of prompts (``input_ids`` of shape ``(B, T)``, identical for
every model compared, no padding):

* **prefill**: one forward pass over the whole prompt with ``use_cache=True`` (it builds the KV
  cache) and, like ``generate``, logits only for the last position where the model supports
  ``logits_to_keep``; reported as ``B * T / seconds``.
* **decode**: ``new_tokens`` greedy steps with the KV cache in a plain loop (previous argmax and
  ``past_key_values`` fed back), reported as ``B * new_tokens / seconds``. Unlike ``generate`` minus
  a timed prefill, it times exactly the per-token decoder cost (no difference of two noisy timings,
  no early stop on EOS, no logits processors) on the same code path for every family; real serving
  adds ``generate``'s Python overhead, which pruning does not shrink, so end-to-end gains are lower.

Each model gets ``warmup`` untimed runs, then ``runs`` timed runs; the median is reported (on CUDA
bracketed by ``torch.cuda.synchronize``). :func:`compare_speed` alternates the two models run by
run (ABBA order) so slow drift of the machine (thermals, other load) hits both alike.

Memory: ``weights_bytes`` (parameters + buffers) is exact; ``peak_memory_bytes`` (CUDA) adds the
peak of ``torch.cuda.max_memory_allocated`` above the allocation before the run (activations, KV
cache, logits). On CPU only the growth of peak RSS is known (``peak_rss_delta_bytes``, 0 when an
earlier allocation set the peak); no memory ratio is formed from it.

The *ideal* speed-up of removing ``k`` of ``L`` decoder layers is ``L / (L - k)`` (embedding and LM
head excluded); ``measured_vs_ideal`` is the measured decode speed-up over it. The parameter-based
ideal, which differs for heterogeneous layers, is reported too.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evop.models.layers import layer_access

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

# The default prompt text, tokenised and repeated to the prompt length (any fixed text will do:
# the cost of a dense model does not depend on which tokens it reads).
DEFAULT_TEXT = (
    "The river runs north of the old town, past the mill and the stone bridge, and the market "
    "opens at dawn while the ships wait in the harbour for the tide. Merchants unload wool, salt "
    "and timber; the clerks count barrels and write the figures into heavy ledgers. "
)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


def build_prompt_ids(
    tokenizer: Any | None,
    prompt_len: int = 128,
    batch_size: int = 1,
    prompts: Sequence[str] | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
) -> "torch.Tensor":
    """A deterministic ``(batch_size, prompt_len)`` batch of prompt token ids, without padding.

    Row ``i`` is the encoding of ``prompts[i % len(prompts)]`` (default: :data:`DEFAULT_TEXT`)
    repeated until it is ``prompt_len`` tokens long and cut there, rotated by ``i`` tokens so rows
    differ. Without a tokenizer, ids are drawn uniformly from ``[0, vocab_size)`` with a generator
    seeded by ``seed``. The same arguments always give the same tensor.
    """
    import torch

    if prompt_len < 1 or batch_size < 1:
        raise ValueError(f"prompt_len and batch_size must be >= 1, got {prompt_len} and {batch_size}")
    if tokenizer is None:
        if vocab_size is None:
            raise ValueError("without a tokenizer, give vocab_size for random prompt ids")
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (batch_size, prompt_len), generator=g)
    texts = list(prompts) if prompts else [DEFAULT_TEXT]
    rows = []
    for i in range(batch_size):
        ids = list(tokenizer(texts[i % len(texts)], add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"prompt {i % len(texts)} encodes to no tokens")
        reps = math.ceil((prompt_len + i) / len(ids))
        ids = (ids * reps)[i : i + prompt_len]  # rotate by i, then cut to the prompt length
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.long)  # (B, T)


def _first_param(model: "nn.Module") -> "torch.Tensor":
    return next(model.parameters())


def decoder_layer_params(model: "nn.Module") -> list[int]:
    """Parameter count of each decoder layer of ``model``, in order."""
    return [sum(p.numel() for p in layer.parameters()) for layer in layer_access(model).layers(model)]


def _static_info(model: "nn.Module") -> dict[str, Any]:
    p = _first_param(model)
    return {
        "device": str(p.device),
        "dtype": str(p.dtype).removeprefix("torch."),
        "num_layers": len(layer_access(model).layers(model)),
        "params": sum(t.numel() for t in model.parameters()),  # tied weights counted once
        "decoder_params": sum(decoder_layer_params(model)),
        "weights_bytes": sum(t.numel() * t.element_size() for t in model.parameters())
        + sum(b.numel() * b.element_size() for b in model.buffers()),
    }


def ideal_speedup(
    num_layers: int, removed: int | Sequence[int], model: "nn.Module | None" = None
) -> dict[str, float | None]:
    """The speed-up implied by removing decoder layers, embedding and LM head excluded.

    Args:
        num_layers: Decoder layers of the dense model (L).
        removed: The removed layer indices, or just how many (k).
        model: The *dense* model; with removed indices it gives the parameter-based ideal.

    Returns:
        ``{"compute": L / (L - k), "params": dense / pruned decoder-layer parameters or None}``.
        ``compute`` is the one reported as *the* ideal: per-token decoder FLOPs scale with the
        number of layers when layers are alike.
    """
    k = removed if isinstance(removed, int) else len(set(removed))
    if not 0 <= k < num_layers:
        raise ValueError(f"cannot remove {k} of {num_layers} layers")
    by_params = None
    if model is not None and not isinstance(removed, int):
        per_layer = decoder_layer_params(model)
        if len(per_layer) != num_layers:
            raise ValueError(f"the model has {len(per_layer)} decoder layers, not {num_layers}")
        gone = set(removed)
        kept = sum(n for i, n in enumerate(per_layer) if i not in gone)
        by_params = sum(per_layer) / kept
    return {"compute": num_layers / (num_layers - k), "params": by_params}


def checkpoint_size(path: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``, ...) in a Hugging Face model directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"not a model directory: {path}")
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def add_checkpoint_sizes(report: dict[str, Any], dense_ref: str | None, pruned_ref: str | None) -> None:
    """Record ``checkpoint_bytes`` of each model in ``report`` whose reference is a local directory
    (hub ids and ``evop-assets:`` names are resolved first; others are left out)."""
    from evop.assets.references import resolve_reference

    for label, ref in (("dense", dense_ref), ("pruned", pruned_ref)):
        local = Path(resolve_reference(ref)) if ref else None
        if local is not None and local.is_dir():
            report[label]["checkpoint_bytes"] = checkpoint_size(local)


def _sync(device: "torch.device") -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _forward_args(model: "nn.Module") -> tuple[str, dict[str, Any]]:
    """The keyword that passes the KV cache in (``cache`` from transformers 5.x, ``past_key_values``
    before), and the prefill keywords: ``logits_to_keep=1`` where supported, as ``generate`` does
    (the full ``(B, T, V)`` logits of the prompt are never needed)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    return cache_arg, ({"logits_to_keep": 1} if "logits_to_keep" in params else {})


def _cache_of(out: Any) -> Any:
    return out.cache if hasattr(out, "cache") else out.past_key_values


def _run_once(model: "nn.Module", input_ids: "torch.Tensor", new_tokens: int) -> dict[str, Any]:
    """One timed prefill + ``new_tokens`` greedy decode steps; seconds of each and extra memory."""
    import torch

    device = _first_param(model).device
    input_ids = input_ids.to(device)
    cuda = device.type == "cuda"
    if cuda:
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = None if cuda else _peak_rss_bytes()
    cache_arg, prefill_kw = _forward_args(model)
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True, **prefill_kw)
        next_ids = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)  # (B, 1)
        _sync(device)
        t1 = time.perf_counter()
        past = _cache_of(out)
        del out
        for _ in range(new_tokens):
            out = model(input_ids=next_ids, use_cache=True, **{cache_arg: past})
            past = _cache_of(out)
            next_ids = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)  # (B, 1)
        _sync(device)
        t2 = time.perf_counter()
    result: dict[str, Any] = {"prefill_s": t1 - t0, "decode_s": t2 - t1}
    if cuda:
        result["extra_bytes"] = torch.cuda.max_memory_allocated(device) - base
    elif rss_before is not None:
        result["rss_delta"] = max(0, (_peak_rss_bytes() or 0) - rss_before)
    return result


def _summarise(
    info: dict[str, Any], timings: list[dict[str, Any]], input_ids: "torch.Tensor", new_tokens: int
) -> dict[str, Any]:
    batch, prompt_len = input_ids.shape
    prefill = statistics.median(t["prefill_s"] for t in timings)
    decode = statistics.median(t["decode_s"] for t in timings)
    report = {
        **info,
        "batch_size": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "runs": len(timings),
        "prefill_s": prefill,
        "decode_s": decode,
        "prefill_tokens_per_s": batch * prompt_len / prefill,
        "decode_tokens_per_s": batch * new_tokens / decode if new_tokens else None,
        "peak_memory_bytes": None,
        "peak_rss_delta_bytes": None,
    }
    if "extra_bytes" in timings[0]:
        report["peak_memory_bytes"] = info["weights_bytes"] + max(t["extra_bytes"] for t in timings)
    elif "rss_delta" in timings[0]:
        report["peak_rss_delta_bytes"] = max(t["rss_delta"] for t in timings)
    return report


def _input_ids_for(
    model: "nn.Module",
    tokenizer: Any | None,
    input_ids: "torch.Tensor | None",
    prompts: Sequence[str] | None,
    prompt_len: int,
    batch_size: int,
) -> "torch.Tensor":
    if input_ids is not None:
        return input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    return build_prompt_ids(
        tokenizer, prompt_len, batch_size, prompts, vocab_size=getattr(model.config, "vocab_size", None)
    )


def measure_inference(
    model: "nn.Module",
    tokenizer: Any | None = None,
    prompts: Sequence[str] | None = None,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch_size: int = 1,
    warmup: int = 1,
    runs: int = 3,
    input_ids: "torch.Tensor | None" = None,
) -> dict[str, Any]:
    """Prefill and KV-cache decode throughput of one model (see the module docstring for how).

    Args:
        model: A causal LM in eval mode; it runs on the device of its parameters.
        tokenizer: Encodes the prompts; without one, seeded random ids are used.
        prompts: Texts for the batch rows (default: a fixed text), repeated/cut to ``prompt_len``.
        prompt_len: Prompt tokens per row (T).
        new_tokens: Greedy decode steps after the prefill.
        batch_size: Rows (B).
        warmup: Untimed runs first.
        runs: Timed runs; medians are reported.
        input_ids: ``(B, T)`` ids to use as they are (overrides the three above).

    Returns:
        A flat dict: ``prefill_tokens_per_s``, ``decode_tokens_per_s``, ``prefill_s``, ``decode_s``,
        ``params``, ``decoder_params``, ``num_layers``, ``weights_bytes``, ``peak_memory_bytes``
        (CUDA) or ``peak_rss_delta_bytes`` (CPU, approximate), ``device``, ``dtype``, and the shape.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    ids = _input_ids_for(model, tokenizer, input_ids, prompts, prompt_len, batch_size)
    for _ in range(warmup):
        _run_once(model, ids, new_tokens)
    timings = [_run_once(model, ids, new_tokens) for _ in range(runs)]
    return _summarise(_static_info(model), timings, ids, new_tokens)


def safe_ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, None when either is missing or zero."""
    return a / b if a and b else None


def compare_speed(
    dense_model: "nn.Module",
    pruned_model: "nn.Module",
    tokenizer: Any | None = None,
    prompts: Sequence[str] | None = None,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch_size: int = 1,
    warmup: int = 1,
    runs: int = 3,
    input_ids: "torch.Tensor | None" = None,
) -> dict[str, Any]:
    """Measure a dense model and its pruned version side by side on identical inputs.

    Runs alternate between the models in ABBA order (dense, pruned, pruned, dense, ...). Arguments
    are those of :func:`measure_inference`.

    Returns:
        ``{"dense": metrics, "pruned": metrics, "ratios": {...}, "ideal": {...},
        "measured_vs_ideal": float, "input": {...}}``. Ratios are dense/pruned times (so > 1 means
        the pruned model is faster) for ``prefill_speedup`` and ``decode_speedup``; pruned/dense
        for ``params``, ``decoder_params``, ``weights_memory`` and ``peak_memory`` (CUDA only).
        ``ideal`` holds the compute-ideal ``L / (L - k)`` and the decoder-parameter ideal.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    ids = _input_ids_for(dense_model, tokenizer, input_ids, prompts, prompt_len, batch_size)
    models = {"dense": dense_model, "pruned": pruned_model}
    for _ in range(warmup):
        for model in models.values():
            _run_once(model, ids, new_tokens)
    timings: dict[str, list[dict[str, Any]]] = {"dense": [], "pruned": []}
    for r in range(runs):
        order = ("dense", "pruned") if r % 2 == 0 else ("pruned", "dense")
        for name in order:
            timings[name].append(_run_once(models[name], ids, new_tokens))
    dense = _summarise(_static_info(dense_model), timings["dense"], ids, new_tokens)
    pruned = _summarise(_static_info(pruned_model), timings["pruned"], ids, new_tokens)

    num_dense, num_pruned = dense["num_layers"], pruned["num_layers"]
    ideal = ideal_speedup(num_dense, num_dense - num_pruned)
    ideal["params"] = dense["decoder_params"] / pruned["decoder_params"]
    ratios = {
        "prefill_speedup": safe_ratio(dense["prefill_s"], pruned["prefill_s"]),
        "decode_speedup": safe_ratio(dense["decode_s"], pruned["decode_s"]),
        "params": pruned["params"] / dense["params"],
        "decoder_params": pruned["decoder_params"] / dense["decoder_params"],
        "weights_memory": pruned["weights_bytes"] / dense["weights_bytes"],
        "peak_memory": safe_ratio(pruned["peak_memory_bytes"], dense["peak_memory_bytes"]),
    }
    decode = ratios["decode_speedup"]
    intervals = {
        f"{phase}_speedup": speedup_interval(
            [d[f"{phase}_s"] for d in timings["dense"]], [p[f"{phase}_s"] for p in timings["pruned"]]
        )
        for phase in ("prefill", "decode")
    }
    # Removing layers cannot beat L / (L - k): the embedding and LM head are not pruned. A speed-up
    # above it is noise or a biased measurement, flagged instead of reported as a win.
    above_ideal = [k for k in ("prefill_speedup", "decode_speedup") if (ratios[k] or 0) > ideal["compute"]]
    report = {
        "dense": dense,
        "pruned": pruned,
        "ratios": ratios,
        "ideal": ideal,
        "measured_vs_ideal": decode / ideal["compute"] if decode else None,
        "intervals": intervals,
        "above_ideal": above_ideal,
        "input": {"batch_size": ids.shape[0], "prompt_len": ids.shape[1], "new_tokens": new_tokens},
    }
    log.info(
        "speed: prefill %.2fx, decode %.2fx (ideal %.2fx) with %d of %d layers",
        ratios["prefill_speedup"] or float("nan"),
        decode or float("nan"),
        ideal["compute"],
        num_pruned,
        num_dense,
    )
    return report


def speedup_interval(
    dense_s: Sequence[float], pruned_s: Sequence[float], confidence: float = 0.95
) -> list[float] | None:
    """Confidence interval of the speed-up (dense / pruned time) from runs taken pair by pair: a
    t-interval of the mean log ratio, so a slow moment of the machine that hits both runs of a
    pair cancels out (None with fewer than 2 pairs)."""
    logs = [math.log(d / p) for d, p in zip(dense_s, pruned_s, strict=True) if d > 0 and p > 0]
    if len(logs) < 2:
        return None
    from scipy.stats import t

    mean = statistics.fmean(logs)
    half = t.ppf(0.5 + confidence / 2, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return [math.exp(mean - half), math.exp(mean + half)]
