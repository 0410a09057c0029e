"""Temporary process-environment changes (libraries that read settings from ``os.environ``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def temporary_env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore the previous ones."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
