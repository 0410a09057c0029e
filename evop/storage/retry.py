"""The one retry policy for transient storage failures, for the command line and the tasks alike.

A store opened with a :class:`RetryPolicy` (:func:`evop.storage.stores.open_store`) retries
every request that fails with a *transient* :class:`~evop.errors.EvoPError` (an outage, a
timeout) with growing pauses, for up to ``storage.retry_s`` seconds; bad input (a missing bucket,
refused credentials) fails at once. The caller waits with what it computed still in memory: a
generation finished during an outage is written when the store is back, not lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from evop.errors import EvoPError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Retry a transient failure with pauses of ``first_pause_s``, doubling up to ``max_pause_s``,
    until ``total_s`` seconds have passed since the first failure (then the last error is raised).

    Attributes:
        total_s: Seconds of retrying before giving up (0: never retry).
        first_pause_s: The first pause.
        max_pause_s: The longest pause.
    """

    total_s: float = 300.0
    first_pause_s: float = 1.0
    max_pause_s: float = 30.0

    def pauses(self) -> Iterator[float]:
        """The pauses between tries, before the deadline is taken into account: 1, 2, 4, ... 30, 30."""
        pause = self.first_pause_s
        while True:
            yield min(pause, self.max_pause_s)
            pause *= 2

    def call(self, action: Callable[[], T], what: str, sleep: Callable[[float], None] = time.sleep) -> T:
        """``action()``, retried while it raises a transient :class:`~evop.errors.EvoPError`.

        Args:
            action: The request.
            what: What it does, for the log lines (``"writing s3://bucket/key"``).
            sleep: How to wait (tests pass a fake clock's).

        Raises:
            EvoPError: a permanent one at once; a transient one once ``total_s`` has passed.
        """
        first_failure = None
        pauses = self.pauses()
        while True:
            try:
                result = action()
            except EvoPError as err:
                if err.permanent:
                    raise
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                    if self.total_s > 0:
                        log.warning("%s failed (%s); retrying for up to %.0f s", what, err, self.total_s)
                left = first_failure + self.total_s - now
                if left <= 0:
                    if self.total_s > 0:
                        log.error(
                            "%s still failing after %.0f s of retries (storage.retry_s)",
                            what,
                            now - first_failure,
                        )
                    raise
                sleep(min(next(pauses), left))
                continue
            if first_failure is not None:
                log.warning("%s succeeded after %.1f s of retries", what, time.monotonic() - first_failure)
            return result


class RetryingStore:
    """An :class:`~evop.storage.stores.ObjectStore` whose requests follow a :class:`RetryPolicy`.

    Args:
        store: The store (local directory, S3 bucket).
        policy: How transient failures are retried.
    """

    def __init__(self, store: Any, policy: RetryPolicy):
        self.inner = store
        self.policy = policy

    @property
    def uri(self) -> str:
        return self.inner.uri

    @property
    def atomic_conditional_writes(self) -> bool:
        return getattr(self.inner, "atomic_conditional_writes", False)

    def url(self, key: str) -> str:
        return self.inner.url(key)

    def put(self, key: str, data: bytes) -> None:
        self.policy.call(lambda: self.inner.put(key, data), f"writing {self.url(key)}")

    def get(self, key: str) -> bytes | None:
        return self.policy.call(lambda: self.inner.get(key), f"reading {self.url(key)}")

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        return self.policy.call(lambda: self.inner.get_tagged(key), f"reading {self.url(key)}")

    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        return self.policy.call(lambda: self.inner.put_if(key, data, tag), f"writing {self.url(key)}")

    def check(self) -> None:
        check = getattr(self.inner, "check", None)
        if check is not None:
            self.policy.call(check, f"checking {self.uri}")
