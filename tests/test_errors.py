"""One error type, one policy: every deliberate error is an EvoPError, and its `permanent` flag is
what both the CLI and the Prefect task retry policy read."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import SimpleNamespace

import pytest

import evop
from evop.baselines.sampling import SearchTooLargeError, exhaustive
from evop.errors import BadInputError, EvoPError, TransientError
from evop.method.patterns import removable_layers
from evop.storage.stores import StorageError


def _error_classes() -> list[type]:
    found = []
    for info in pkgutil.walk_packages(evop.__path__, "evop."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Exception) and obj.__module__ == info.name:
                found.append(obj)
    return found


def test_every_error_class_of_the_library_is_an_evop_error():
    classes = _error_classes()
    assert len(classes) >= 11
    assert [c.__name__ for c in classes if not issubclass(c, EvoPError)] == []


def test_permanent_and_transient():
    assert BadInputError("x").permanent and not BadInputError("x").transient
    assert not TransientError("x").permanent
    assert StorageError("outage").transient and StorageError("no bucket", transient=False).permanent
    with pytest.raises(BadInputError):
        removable_layers(8, [0, -1], 7)
    with pytest.raises(SearchTooLargeError) as info:
        exhaustive(lambda p: 0.0, 30, 6, limit=10)
    assert info.value.permanent


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (SearchTooLargeError("too many patterns"), False),
        (BadInputError("cannot remove k=40 layers"), False),
        (StorageError("S3 bucket 'x' does not exist", transient=False), False),
        (StorageError("cannot reach S3"), True),
        (TransientError("timeout"), True),
        (RuntimeError("a bug"), True),
    ],
)
def test_the_task_retry_policy_reads_the_same_flag(error, retried):
    pytest.importorskip("prefect")
    from tasks.policy import worth_retrying

    assert worth_retrying(None, None, SimpleNamespace(data=error)) is retried
