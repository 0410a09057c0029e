"""Outages staged for tests: a service that works when a run starts and fails later."""

from __future__ import annotations

import threading
import time
from pathlib import Path


def break_sqlite_registry_after(ready: Path, db: Path, timeout: float = 240) -> threading.Thread:
    """Start a thread that, once ``ready`` exists (e.g. the search's ``result.json``), turns the
    MLflow SQLite file ``db`` into a folder, so that the tracking store fails from then on (it
    passed the pre-flight, which made the file). ``join()`` the thread before looking."""

    def wait_then_break() -> None:
        deadline = time.time() + timeout
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        db.unlink()
        db.mkdir()

    thread = threading.Thread(target=wait_then_break)
    thread.start()
    return thread
