"""Cache and retry policy shared by the pipeline tasks.

Every step is idempotent against the checkpoint store (``evop.pipeline``): it returns at once
when its output is already there. The store is therefore the one record of finished work, the
same for a new run, a flow retry, the UI's Retry or another machine. A Prefect result cache on
top would be a second record that can disagree with the store (say, after a bucket is wiped), so
the tasks opt out of it explicitly.
"""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE

STORE_IS_THE_CACHE = NO_CACHE

# Storage outages are ridden out inside the library's store (one policy for the CLI and the tasks:
# evop.storage.retry, storage.retry_s), with the step's work kept in memory. What is retried here
# is the rest: a transient error that outlasted that, a network error of a dataset download.
IO_RETRIES = 2
IO_RETRY_DELAYS = [10, 60]


def worth_retrying(task, task_run, state) -> bool:
    """Retry transient failures (storage outage, network); not bad input, which fails the same
    way every time: a wrong config, an unknown model, a missing bucket, refused credentials."""
    from evop.errors import EvoPError

    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as err:  # noqa: BLE001 (whatever it is, it decides the retry)
            exc = err
    # Permanence is the error's own verdict (evop.errors), the same one the command line reads.
    # An unreachable MLflow server is permanent too: it is not back within the retry pauses.
    return not (isinstance(exc, EvoPError) and exc.permanent)


def io_task(name: str, **kwargs):
    """``@task`` for a storage/network step: store-backed (no Prefect cache), transient failures
    retried with growing pauses."""
    from prefect import task

    return task(
        name=name,
        cache_policy=STORE_IS_THE_CACHE,
        retries=IO_RETRIES,
        retry_delay_seconds=IO_RETRY_DELAYS,
        retry_condition_fn=worth_retrying,
        **kwargs,
    )
