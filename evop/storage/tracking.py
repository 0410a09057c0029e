"""Where a run is tracked in MLflow, and whether that store answers: checked in seconds.

:func:`tracking_uri` resolves the config (or ``$MLFLOW_TRACKING_URI``, or SQLite beside the
results); :func:`check_registry` is the pre-flight check of ``evop run`` and :func:`connect` the
first request of every use. A failing store is a :class:`RegistryError` naming it (any credentials
in its URL masked), never minutes of retries:

* an unreachable HTTP server is retried for minutes by default (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``):
  the probe here makes one quick request with few retries and a short timeout;
* a SQLite file MLflow cannot open is retried for about 100 s with a warning each time: it is
  opened here first, in milliseconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from evop.config import EvoPConfig
from evop.environment import temporary_env
from evop.errors import BadInputError
from evop.storage.urls import redact

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

PROBE_RETRIES = 1
"""HTTP retries of the first request to the tracking server (MLflow's default is 7)."""

PROBE_TIMEOUT_S = 5
"""Seconds the first request to the tracking server may take (MLflow's default is 120)."""


class RegistryError(BadInputError, RuntimeError):
    """The run could not be tracked or the model not registered; the message names the URI."""


def tracking_uri(cfg: EvoPConfig) -> str:
    """The tracking URI of ``cfg``: the config, else ``$MLFLOW_TRACKING_URI``, else SQLite beside the results.

    The default is ``sqlite:///<output_dir>/mlflow.db`` with an absolute path, so the same run
    directory always finds its database whatever the working directory.
    """
    if cfg.registry.tracking_uri:
        return cfg.registry.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


def default_artifact_location(uri: str) -> str | None:
    """``<db dir>/mlartifacts`` for SQLite (MLflow's default is relative to the working directory)."""
    db = sqlite_path(uri)
    return (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None


def describe(uri: str) -> str:
    """The store, for a message: ``MLflow tracking server http://***@host:5000``."""
    scheme = urlparse(uri).scheme
    kind = "server" if scheme in ("http", "https") else "store"
    return f"MLflow tracking {kind} {redact(uri)}"


def check_registry(cfg: EvoPConfig) -> None:
    """Before any heavy work: the tracking store answers (a server: the quick probe of
    :func:`_connect`; SQLite: its file opens); else :class:`RegistryError`."""
    uri = tracking_uri(cfg)
    db = sqlite_path(uri)
    if db is None:
        connect(uri)
    else:
        _open_sqlite(uri, db)


def _open_sqlite(uri: str, db: Path) -> None:
    """Open the SQLite file (made, with its folder, when missing)."""
    import sqlite3

    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        sqlite3.connect(db).close()
    except (OSError, sqlite3.Error) as err:
        raise RegistryError(f"{describe(uri)} is not usable: {err}") from None


def connect(uri: str) -> "MlflowClient":
    """A client for ``uri`` after one quick request, so a dead server fails in seconds."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is not None:
        _open_sqlite(uri, db)
    with temporary_env(
        MLFLOW_HTTP_REQUEST_MAX_RETRIES=str(PROBE_RETRIES),
        MLFLOW_HTTP_REQUEST_TIMEOUT=str(PROBE_TIMEOUT_S),
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0",
    ):
        try:
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.search_experiments(max_results=1)
        except Exception as err:  # connection refused, timeouts, bad URIs, broken databases...
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RegistryError(f"{describe(uri)} is not usable: {first}") from err
    return client
