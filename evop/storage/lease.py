"""One run at a time per search: a lease object in the store, with an owner and an expiry.

Two runs of the same search on one store (two ``evop search`` in two terminals, two scheduled flow
runs overlapping) would both compute every generation. The first takes a :class:`Lease` on the
search (``<run prefix>/lease.json``) and renews it every third of its duration from a background
thread; the second sees it held, waits, and when it gets the lease finds the generations done in
the store. A killed run stops renewing: its lease is taken over once it expires, or at once when
its process is gone from this host.

Taking and renewing are compare-and-swap writes (:meth:`~evop.storage.stores.ObjectStore.put_if`):
atomic on a local directory, S3 conditional writes on S3. Some S3-compatible servers ignore the
conditions, so a new holder also reads the lease back after a moment (the last writer wins), and a
holder that finds someone else's name in it at a renewal knows it lost the lease.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from evop.errors import EvoPError, TransientError

log = logging.getLogger(__name__)


class LeaseLostError(TransientError):
    """Another run took the search over (this one could not renew its lease in time)."""


def _alive_here(holder: dict[str, Any]) -> bool:
    """False when ``holder`` ran on this host and its process is gone (killed, crashed)."""
    if holder.get("host") != socket.gethostname():
        return True  # another machine: only the expiry can tell
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True  # another user's process, or no pid: leave it to the expiry
    return True


class Lease:
    """A lease on one search in an object store.

    Args:
        store: The store (``get_tagged``/``put_if``); a retrying one rides out short outages.
        key: The lease object's key, e.g. ``evop-<hash>/lease.json``.
        ttl_s: How long the lease lasts without renewal.
        settle_s: Pause before reading a new lease back (None: 1 s where conditional writes may be
            ignored, 0 where they are atomic).
        poll_s: Pause between two looks at a held lease (None: a quarter of ``ttl_s``, at most 5 s).
    """

    def __init__(
        self,
        store: Any,
        key: str,
        ttl_s: float,
        settle_s: float | None = None,
        poll_s: float | None = None,
    ):
        self.store = store
        self.key = key
        self.ttl_s = ttl_s
        atomic = getattr(store, "atomic_conditional_writes", False)
        self.settle_s = (0.0 if atomic else 1.0) if settle_s is None else settle_s
        self.poll_s = min(ttl_s / 4, 5.0) if poll_s is None else poll_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.store.url(self.key)

    # ------------------------------------------------------------------ the object

    def _read(self, store: Any = None) -> tuple[dict[str, Any] | None, str | None]:
        """The current holder (None: nobody, or an unreadable object) and the object's tag, read
        from ``store`` (default: the lease's)."""
        found = (store or self.store).get_tagged(self.key)
        if found is None:
            return None, None
        raw, tag = found
        try:
            holder = json.loads(raw)
        except ValueError:
            holder = None
        times = ("expires_at", "renewed_at")
        if not isinstance(holder, dict) or not all(isinstance(holder.get(t), (int, float)) for t in times):
            return None, tag  # not a lease: free, but written only over this very version
        return holder, tag

    def _record(self, released: bool = False) -> bytes:
        now = time.time()
        holder = {
            "owner": None if released else self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "renewed_at": now,
            "expires_at": now if released else now + self.ttl_s,
        }
        return json.dumps(holder).encode()

    def _free(self, holder: dict[str, Any] | None) -> bool:
        return (
            holder is None
            or not holder.get("owner")
            or holder["expires_at"] <= time.time()
            or not _alive_here(holder)
        )

    # ------------------------------------------------------------------ taking and keeping it

    def try_acquire(self) -> dict[str, Any] | None:
        """Take the lease if it is free; None when taken, else who holds it."""
        holder, tag = self._read()
        if holder is not None and holder.get("owner") == self.owner:
            return None
        if not self._free(holder):
            return holder
        if not self.store.put_if(self.key, self._record(), tag):
            return self._read()[0] or {"owner": "another run"}
        if self.settle_s:
            time.sleep(self.settle_s)  # a writer that ignored the condition lands meanwhile: last one wins
        back, _ = self._read()
        if back is None or back.get("owner") != self.owner:
            return back or {"owner": "another run"}
        return None

    def acquire(self, on_wait: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Take the lease, waiting while another live run holds it; then keep it renewed.

        Args:
            on_wait: Called with the holder each time the lease is found held (for a log line).
        """
        while True:
            holder = self.try_acquire()
            if holder is None:
                break
            if on_wait is not None:
                on_wait(holder)
            time.sleep(self.poll_s)
        self._stop.clear()
        self._thread = threading.Thread(target=self._keep, name="evop-lease", daemon=True)
        self._thread.start()

    def renew(self) -> None:
        """Push the expiry forward.

        Raises:
            LeaseLostError: someone else holds the lease now.
        """
        holder, tag = self._read()
        if holder is None or holder.get("owner") != self.owner:
            raise LeaseLostError(
                f"the lease {self.url} is now held by {describe(holder)}: another run took this search over"
            )
        if not self.store.put_if(self.key, self._record(), tag):
            raise LeaseLostError(
                f"the lease {self.url} changed under this run: another run took this search over"
            )

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLostError as err:
                self.lost = True
                log.error("%s", err)
                return
            except EvoPError as err:  # an outage longer than the store's retries: try again later
                log.warning("could not renew the lease %s: %s", self.url, err)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` when the lease was lost (call between steps)."""
        if self.lost:
            raise LeaseLostError(
                f"this run lost its lease on the search ({self.url}) to another run; its finished "
                "generations are in the store, and the other run goes on from them"
            )

    def release(self) -> None:
        """Stop renewing and free the lease (if it is still this run's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        # One try, without the store's retries: a run stopped during an outage must not wait for
        # minutes to hand back what expires by itself.
        store = getattr(self.store, "inner", self.store)
        try:
            holder, tag = self._read(store)
            if holder is not None and holder.get("owner") == self.owner:
                store.put_if(self.key, self._record(released=True), tag)
        except EvoPError as err:
            log.warning(
                "could not release the lease %s (%s); it expires in %.0f s", self.url, err, self.ttl_s
            )


def describe(holder: dict[str, Any] | None) -> str:
    """Who holds a lease, for a log line: ``host pid 123 (renewed 4 s ago, expires in 116 s)``."""
    if not holder or not holder.get("owner"):
        return "nobody"
    now = time.time()
    renewed = now - float(holder.get("renewed_at", now))
    expires = float(holder.get("expires_at", now)) - now
    return (
        f"{holder.get('host', '?')} pid {holder.get('pid', '?')} "
        f"(renewed {renewed:.0f} s ago, expires in {max(expires, 0):.0f} s)"
    )
