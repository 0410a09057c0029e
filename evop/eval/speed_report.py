"""The speed report of :func:`evop.eval.speed.compare_speed` as a markdown table: each ratio with
its 95% interval, and a warning for any speed-up above the ideal (which removing layers cannot
beat, so it is noise or a biased measurement, never a win)."""

from __future__ import annotations

import math
from typing import Any

from evop.eval.speed import safe_ratio


def _num(x: float | None, fmt: str = "{:,.1f}") -> str:
    return "n/a" if x is None or not math.isfinite(x) else fmt.format(x)


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.1f} MiB"


def format_speed_table(report: dict[str, Any]) -> str:
    """A markdown table of a :func:`compare_speed` report: one row per metric, dense | pruned | ratio.

    The ratio column is always pruned / dense of the row's quantity, so > 1 on a tokens/s row is a
    speed-up and < 1 on a size row is a saving. A ``checkpoint_bytes`` entry in either model's
    metrics (the CLI adds it) becomes a checkpoint-size row.
    """
    dense, pruned, ratios, ideal = report["dense"], report["pruned"], report["ratios"], report["ideal"]
    x = "{:.2f}x"
    rows = [
        (
            "decoder layers",
            str(dense["num_layers"]),
            str(pruned["num_layers"]),
            _num(pruned["num_layers"] / dense["num_layers"], x),
        ),
        ("parameters", f"{dense['params']:,}", f"{pruned['params']:,}", _num(ratios["params"], x)),
        (
            "decoder-layer parameters",
            f"{dense['decoder_params']:,}",
            f"{pruned['decoder_params']:,}",
            _num(ratios["decoder_params"], x),
        ),
        (
            "prefill tokens/s",
            _num(dense["prefill_tokens_per_s"]),
            _num(pruned["prefill_tokens_per_s"]),
            format_speedup(report, "prefill_speedup"),
        ),
        (
            "decode tokens/s",
            _num(dense["decode_tokens_per_s"]),
            _num(pruned["decode_tokens_per_s"]),
            format_speedup(report, "decode_speedup"),
        ),
        (
            "weights memory",
            _mib(dense["weights_bytes"]),
            _mib(pruned["weights_bytes"]),
            _num(ratios["weights_memory"], x),
        ),
    ]
    if dense["peak_memory_bytes"] is not None:
        rows.append(
            (
                "peak memory",
                _mib(dense["peak_memory_bytes"]),
                _mib(pruned["peak_memory_bytes"]),
                _num(ratios["peak_memory"], x),
            )
        )
    if "checkpoint_bytes" in dense or "checkpoint_bytes" in pruned:
        d, p = dense.get("checkpoint_bytes"), pruned.get("checkpoint_bytes")
        rows.append(("checkpoint size", _mib(d), _mib(p), _num(safe_ratio(p, d), x)))
    lines = [
        "| metric | dense | pruned | pruned / dense |",
        "|---|---:|---:|---:|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        f"ideal speed-up (L / (L - k), decoder only): {ideal['compute']:.2f}x; "
        f"by decoder-layer parameters: {_num(ideal['params'], x)}; "
        f"measured decode speed-up / ideal: {_num(report['measured_vs_ideal'], '{:.2f}')}",
        f"{dense['device']}, {dense['dtype']}, batch {report['input']['batch_size']}, "
        f"prompt {report['input']['prompt_len']} tokens, {report['input']['new_tokens']} new tokens, "
        f"median of {dense['runs']} interleaved runs (95% interval of the speed-up in brackets)",
    ]
    for key in report.get("above_ideal", []):
        lines.append(
            f"warning: the {key.replace('_', ' ')} is above the ideal {ideal['compute']:.2f}x, which "
            "removing layers cannot beat (embedding and LM head stay): noise or a biased measurement; "
            "measure again on idle cores with more runs (evaluation.speed_runs)"
        )
    return "\n".join(lines)


def format_speedup(report: dict[str, Any], key: str) -> str:
    """``1.23x [1.18-1.27]``, with ``(!)`` when above the ideal."""
    text = _num(report["ratios"][key], "{:.2f}x")
    interval = report.get("intervals", {}).get(key)
    if interval:
        text += f" [{interval[0]:.2f}-{interval[1]:.2f}]"
    return text + (" (!)" if key in report.get("above_ideal", []) else "")
