"""The one retry policy for transient storage failures: what it retries, for how long, and the store
that applies it to every request."""

from __future__ import annotations

import time

import pytest

from evop.errors import BadInputError, TransientError
from evop.storage.retry import RetryingStore, RetryPolicy
from evop.storage.stores import LocalStore


def flaky(failures: int, error=TransientError):
    """An action that fails ``failures`` times, then returns "ok"; ``calls`` counts the tries."""

    def action():
        action.calls += 1
        if action.calls <= failures:
            raise error(f"outage {action.calls}")
        return "ok"

    action.calls = 0
    return action


def test_pauses_double_up_to_the_longest():
    pauses = RetryPolicy(total_s=300, first_pause_s=1, max_pause_s=30).pauses()
    assert [next(pauses) for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_a_transient_failure_is_retried_until_it_passes(caplog):
    slept = []
    action = flaky(3)
    assert RetryPolicy(total_s=60).call(action, "writing x", sleep=slept.append) == "ok"
    assert action.calls == 4 and slept == [1, 2, 4]
    assert "retrying for up to 60 s" in caplog.text and "succeeded after" in caplog.text


def test_bad_input_is_not_retried():
    action = flaky(1, BadInputError)
    with pytest.raises(BadInputError):
        RetryPolicy(total_s=60).call(action, "writing x", sleep=lambda s: pytest.fail("slept"))
    assert action.calls == 1


def test_it_gives_up_after_total_s_with_the_last_error():
    action = flaky(10**6)
    start = time.monotonic()
    with pytest.raises(TransientError, match="outage"):
        RetryPolicy(total_s=0.3, first_pause_s=0.05, max_pause_s=0.1).call(action, "writing x")
    assert 0.3 <= time.monotonic() - start < 1.0 and action.calls >= 4
    with pytest.raises(TransientError):  # total_s=0: one try
        RetryPolicy(total_s=0).call(flaky(1), "writing x", sleep=lambda s: pytest.fail("slept"))


def test_the_retrying_store_retries_every_request(tmp_path):
    class Flaky(LocalStore):
        fail = 2

        def put(self, key, data):
            if Flaky.fail:
                Flaky.fail -= 1
                raise TransientError("outage")
            super().put(key, data)

    store = RetryingStore(Flaky(tmp_path), RetryPolicy(total_s=5, first_pause_s=0.01))
    store.put("a/b.json", b"{}")
    assert store.get("a/b.json") == b"{}" and Flaky.fail == 0
    assert store.atomic_conditional_writes and store.put_if("a/c.json", b"1", None)
    assert not store.put_if("a/c.json", b"2", None)  # a compare-and-swap: c.json exists now
