"""Store and server URLs as EvoP prints and accepts them: never with a secret in them.

A URL such as ``s3://user:secret@bucket/prefix`` or ``http://user:pw@mlflow:5000`` carries
credentials where logs, error messages, MLflow params and Prefect's database would copy them.
:func:`redact` masks them for printing; :func:`refuse_credentials` rejects such a URL as bad input,
saying where credentials belong instead.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from evop.errors import BadInputError

CREDENTIALS_HINT = {
    "s3": "S3 credentials come from the AWS environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
    "AWS_PROFILE, ~/.aws, an instance role), never from the URL",
    "http": "MLflow credentials come from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
    "(or MLFLOW_TRACKING_TOKEN), never from the URL",
}


def _split(url: str):
    try:
        return urlsplit(url)
    except ValueError:  # e.g. an unbalanced '[' in the host part
        return None


def has_credentials(url: str) -> bool:
    """Whether ``url`` carries a user name or password (``scheme://user:secret@host/...``)."""
    parts = _split(url)
    return parts is not None and "@" in parts.netloc


def redact(url: str) -> str:
    """``url`` with its user and password replaced by ``***``: safe to print or log."""
    parts = _split(url)
    if parts is None or "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def credentials_problem(url: str | None) -> str | None:
    """What is wrong with ``url`` if it carries credentials (the URL redacted, and where
    credentials belong instead); None when it carries none."""
    if url is None or not has_credentials(url):
        return None
    scheme = (_split(url).scheme or "").lower()  # type: ignore[union-attr]
    hint = CREDENTIALS_HINT["s3" if scheme == "s3" else "http"]
    return f"{redact(url)} has credentials in it; {hint}"


def refuse_credentials(field: str, url: str | None) -> None:
    """Reject a URL with credentials in it, without echoing them.

    Raises:
        BadInputError: ``<field>: <redacted url> has credentials in it; ...`` and where they go.
    """
    problem = credentials_problem(url)
    if problem is not None:
        raise BadInputError(f"{field}: {problem}")
