"""Start the Prefect flow for ``evop run``: the one module of the library that imports Prefect.

The library (``evop/``) never imports Prefect, so it can be used, tested and deployed without
it; ``flows/`` and ``tasks/`` are the Prefect shell around it. ``evop run`` is the one command
that starts that shell from the library's CLI, and this module is where it does so (the layout
test ``tests/test_layout.py`` allows Prefect imports here and nowhere else under ``evop/``).
"""

from __future__ import annotations

import os
from typing import Any

from evop.config import EvoPConfig


def run_flow(cfg: EvoPConfig) -> dict[str, Any]:
    """Run ``flows/evop_pipeline.py:evop_pipeline`` for ``cfg`` in this process and return its
    summary (result, perplexity, downstream, speed, MLflow version, locations)."""
    # Prefect without a server starts a temporary local one; it must not phone home, and a busy
    # 2-core machine needs longer than the default to start it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.evop_pipeline import evop_pipeline

    return evop_pipeline(config=cfg)
