"""The one base type of every error EvoP raises on purpose, and what it says about retrying.

Every error class of the library derives from :class:`EvoPError`. Its ``permanent`` flag is the
single answer to "can trying again help?", read by both the command line (one line naming the
problem, exit 2) and the Prefect task retry policy (``tasks/policy.py``: permanent errors are never
retried):

- **permanent** (bad input, :class:`BadInputError`): an invalid config, an unknown model or task,
  an empty or unreadable dataset, a missing bucket, refused credentials, a search too large.
  It fails the same way every time.
- **transient** (:class:`TransientError`): a storage outage, a network hiccup. A retry may succeed.

Anything that is not an :class:`EvoPError` is a bug (or an error of a dependency EvoP did not
anticipate): the command line shows its traceback and the task policy retries it, as before.
"""

from __future__ import annotations


class EvoPError(Exception):
    """Base of every error EvoP raises on purpose.

    Attributes:
        permanent: True when retrying cannot help (bad input); False for transient failures.
    """

    permanent: bool = True

    @property
    def transient(self) -> bool:
        """The opposite of :attr:`permanent`: trying again later may succeed."""
        return not self.permanent


class BadInputError(EvoPError, ValueError):
    """Bad input found by a check: a value, file, model or setting that cannot work (permanent)."""

    permanent = True


class TransientError(EvoPError, RuntimeError):
    """A failure that a later try may not meet (an outage, a timeout)."""

    permanent = False
