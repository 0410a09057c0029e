"""Numbers and JSON files as EvoP records them: one way to write, read and print them.

- :func:`finite_or_none`: a diverged (non-finite) value is ``null`` in JSON results and metrics.
- :func:`format_number`: the one formatter of a number in tables and summaries.
- :func:`write_json_atomic` / :func:`read_json`: result files are replaced in one rename (readers
  never see half a file), and a file that is not JSON is an error naming the file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from evop.errors import BadInputError


def finite_or_none(value: object) -> float | None:
    """``value`` as a float, or None when it is no finite number (inf, nan, None, text): how
    diverged fitness values appear in JSON results, metrics and plots."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def format_number(value: object, digits: int = 4, missing: str = "n/a") -> str:
    """``value`` with ``digits`` significant digits, or ``missing`` when it is no finite number
    (say ``missing="diverged"`` where a missing value is a diverged fitness)."""
    x = finite_or_none(value)
    return missing if x is None else f"{x:.{digits}g}"


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file in the same directory, so
    readers never see half a file. Non-finite floats are refused (use :func:`finite_or_none`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Read a JSON file written by EvoP (or by hand).

    Raises:
        BadInputError: naming the file, when it is missing, unreadable or not JSON.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{what} not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInputError(f"{what} {path} is not valid JSON: {err}") from None
    except OSError as err:
        raise BadInputError(f"cannot read {what} {path}: {err.strerror or err}") from None
