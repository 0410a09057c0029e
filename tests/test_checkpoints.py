"""Tests of evop.checkpoints on a local directory and on a real S3 server (rclone serve s3 over HTTP).

The search states are real: a small GeneticSearch on a synthetic objective, checkpointed after
every generation exactly as the pipeline does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from evop.config import SearchConfig
from evop.method.genetic import GeneticSearch
from evop.method.patterns import Pattern
from evop.method.state import SearchState
from evop.storage.checkpoints import MANIFEST, CorruptCheckpointError, SearchCheckpoints, generation_key
from evop.storage.stores import LocalStore, S3Store, StorageError, open_store

RUN = "run-a"


def hashed_fitness(pattern: Pattern) -> float:
    """A deterministic, rugged objective (as in test_search)."""
    return sum(((i * 7919 + 13) % 101) / 101 for i in pattern.removed) + 0.01 * pattern.removed[0]


def partly_diverging(pattern: Pattern) -> float:
    """Patterns removing layer 5 diverge (inf): the memo then holds non-finite values."""
    return math.inf if 5 in pattern.removed else hashed_fitness(pattern)


def run_search(fitness=hashed_fitness, seed: int = 0, generations: int = 4) -> list[SearchState]:
    """Every state a small search passes through, one per finished generation (0..generations)."""
    config = SearchConfig(
        num_remove=1, population=6, generations=generations, patience=generations, seed=seed, polish_rounds=0
    )
    states: list[SearchState] = []
    GeneticSearch(14, 3, config, fitness).run(on_generation=states.append)
    assert states[-1].done and [s.generation for s in states] == list(range(len(states)))
    return states


@pytest.fixture(scope="module")
def states() -> list[SearchState]:
    return run_search()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """A fresh, empty store of each kind; the S3 one is opened from the environment like in a run."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    bucket = request.getfixturevalue("s3_env")
    return open_store(f"s3://{bucket}/checkpoints")


def object_key(generation: int, prefix: str = RUN) -> str:
    return f"{prefix}/{generation_key(generation)}"


def strict_json(raw: bytes | str):
    """json.loads that refuses Infinity/NaN, as every strict JSON reader does."""

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(raw, parse_constant=refuse)


# --------------------------------------------------------------------------- both stores


def test_save_every_generation_and_resume_from_latest(store, states):
    checkpoints = SearchCheckpoints(store, RUN)
    assert checkpoints.latest() is None
    assert checkpoints.manifest() == {"generations": {}}

    for state in states:
        url = checkpoints.save(state)
        assert url == store.url(object_key(state.generation))
        assert checkpoints.latest().to_json() == state.to_json()

    manifest = checkpoints.manifest()
    assert sorted(map(int, manifest["generations"])) == [s.generation for s in states]
    assert manifest["latest"] == states[-1].generation
    assert manifest["done"] is True
    assert [manifest["generations"][str(s.generation)]["done"] for s in states] == [s.done for s in states]

    # A new process opening the same store and run finds every generation.
    reopened = SearchCheckpoints(open_store(store.uri), RUN + "/")
    assert reopened.latest().to_json() == states[-1].to_json()
    for state in states:
        assert reopened.load(state.generation).to_json() == state.to_json()
    if isinstance(store, LocalStore):
        assert not list(store.root.rglob("*.tmp")), "temporary files left behind"


def test_run_prefixes_do_not_see_each_other(store, states):
    other = run_search(seed=1, generations=2)
    a, b, parent = (SearchCheckpoints(store, prefix) for prefix in (RUN, "run-b", "run"))
    for state in states:
        a.save(state)
    assert b.latest() is None and parent.latest() is None
    for state in other:
        b.save(state)

    assert a.latest().to_json() == states[-1].to_json()
    assert b.latest().to_json() == other[-1].to_json()
    assert sorted(map(int, b.manifest()["generations"])) == [0, 1, 2]
    assert parent.latest() is None
    assert SearchCheckpoints(store, RUN).latest().to_json() == states[-1].to_json()


def _garbage(raw: bytes, states: list[SearchState]) -> bytes:
    return b"\x00\xffnot json at all"


def _truncated(raw: bytes, states: list[SearchState]) -> bytes:
    return raw[: len(raw) // 2]


def _flipped_sha(raw: bytes, states: list[SearchState]) -> bytes:
    doc = json.loads(raw)
    doc["sha256"] = ("0" if doc["sha256"][0] != "0" else "1") + doc["sha256"][1:]
    return json.dumps(doc).encode()


def _tampered_state(raw: bytes, states: list[SearchState]) -> bytes:
    doc = json.loads(raw)  # the checksum no longer matches the edited state
    doc["state"] = doc["state"].replace('"stall": ', '"stall": 1')
    return json.dumps(doc).encode()


def _state_not_a_string(raw: bytes, states: list[SearchState]) -> bytes:
    doc = json.loads(raw)
    doc["state"] = json.loads(doc["state"])
    return json.dumps(doc).encode()


def _wrong_generation(raw: bytes, states: list[SearchState]) -> bytes:
    # A valid, verifying object of another generation stored under this generation's key.
    payload = states[0].to_json()
    doc = json.loads(raw)
    doc.update(state=payload, generation=0)
    doc["sha256"] = hashlib.sha256(payload.encode()).hexdigest()
    return json.dumps(doc).encode()


CORRUPTIONS = {
    "garbage": _garbage,
    "truncated": _truncated,
    "empty": lambda raw, states: b"",
    "flipped-sha256": _flipped_sha,
    "tampered-state": _tampered_state,
    "state-not-a-string": _state_not_a_string,
    "wrong-generation": _wrong_generation,
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupted_latest_falls_back_to_the_previous_generation(store, states, caplog, corruption):
    checkpoints = SearchCheckpoints(store, RUN)
    for state in states:
        checkpoints.save(state)
    last = states[-1].generation
    key = object_key(last)
    store.put(key, CORRUPTIONS[corruption](store.get(key), states))

    with caplog.at_level(logging.ERROR, logger="evop.storage.checkpoints"):
        resumed = checkpoints.latest()
    assert resumed.to_json() == states[-2].to_json()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and store.url(key) in errors[0].getMessage()

    with pytest.raises(CorruptCheckpointError, match="gen-"):
        checkpoints.load(last)
    assert checkpoints.load(last - 1).to_json() == states[-2].to_json()

    # Re-running the lost generation repairs the run.
    checkpoints.save(states[-1])
    assert checkpoints.latest().to_json() == states[-1].to_json()


def test_every_checkpoint_corrupted_gives_none(store, states, caplog):
    checkpoints = SearchCheckpoints(store, RUN)
    for state in states[:3]:
        checkpoints.save(state)
    for state in states[:3]:
        store.put(object_key(state.generation), b"{}")
    with caplog.at_level(logging.ERROR, logger="evop.storage.checkpoints"):
        assert checkpoints.latest() is None
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 3


class CrashBeforeManifest:
    """A store that dies (like a killed process) when the manifest is about to be written."""

    def __init__(self, store):
        self.store, self.uri, self.puts = store, store.uri, []

    def put(self, key: str, data: bytes) -> None:
        self.puts.append(key)
        if key.endswith(MANIFEST):
            raise KeyboardInterrupt("killed between the object and the manifest")
        self.store.put(key, data)

    def get(self, key: str) -> bytes | None:
        return self.store.get(key)

    def url(self, key: str) -> str:
        return self.store.url(key)


def test_manifest_is_written_only_after_the_object(store, states):
    checkpoints = SearchCheckpoints(store, RUN)
    for state in states[:-1]:
        checkpoints.save(state)
    crashing = CrashBeforeManifest(store)
    with pytest.raises(KeyboardInterrupt):
        SearchCheckpoints(crashing, RUN).save(states[-1])
    assert crashing.puts == [object_key(states[-1].generation), f"{RUN}/{MANIFEST}"]
    assert store.get(object_key(states[-1].generation)) is not None  # the object made it ...

    # ... but the manifest still ends at the previous generation, which is what resumes.
    assert checkpoints.manifest()["latest"] == states[-2].generation
    assert checkpoints.latest().to_json() == states[-2].to_json()
    checkpoints.save(states[-1])
    assert checkpoints.latest().to_json() == states[-1].to_json()


def test_unreadable_manifest_is_rebuilt_from_the_objects(store, states, caplog):
    checkpoints = SearchCheckpoints(store, RUN)
    for state in states:
        checkpoints.save(state)
    store.put(f"{RUN}/{MANIFEST}", b'{"generations": [')
    with caplog.at_level(logging.ERROR, logger="evop.storage.checkpoints"):
        assert checkpoints.latest().to_json() == states[-1].to_json()
    assert any(store.url(f"{RUN}/{MANIFEST}") in r.getMessage() for r in caplog.records)
    # The next save writes a complete manifest again.
    checkpoints.save(states[-1])
    assert sorted(map(int, checkpoints.manifest()["generations"])) == [s.generation for s in states]


def test_saving_an_earlier_generation_supersedes_later_ones(store, states):
    checkpoints = SearchCheckpoints(store, RUN)
    for state in states:
        checkpoints.save(state)
    checkpoints.save(states[1])  # rolled back to generation 1 and re-run from there
    manifest = checkpoints.manifest()
    assert sorted(map(int, manifest["generations"])) == [0, 1]
    assert manifest["latest"] == 1 and manifest["done"] is False
    assert checkpoints.latest().to_json() == states[1].to_json()


def test_strict_json_and_non_finite_fitness_round_trip(store):
    partly = run_search(partly_diverging, generations=3)
    everything_diverges = run_search(lambda p: math.inf, generations=2)
    assert any(math.isinf(v) for v in partly[-1].memo.values())
    assert math.isinf(everything_diverges[-1].best_fitness)

    for prefix, run in (("partly", partly), ("all-inf", everything_diverges)):
        checkpoints = SearchCheckpoints(store, prefix)
        for state in run:
            checkpoints.save(state, extra={"note": "strict", "seconds": 1.5})
        strict_json(store.get(f"{prefix}/{MANIFEST}"))
        for state in run:
            doc = strict_json(store.get(object_key(state.generation, prefix)))
            strict_json(doc["state"])
            assert doc["note"] == "strict" and doc["generation"] == state.generation
        latest = checkpoints.latest()
        assert latest.to_json() == run[-1].to_json()
        assert latest.memo == run[-1].memo and latest.best_fitness == run[-1].best_fitness

    checkpoints = SearchCheckpoints(store, "partly")
    before = store.get(f"partly/{MANIFEST}")
    with pytest.raises(ValueError):
        checkpoints.save(partly[0], extra={"loss": math.inf})
    with pytest.raises(ValueError, match="reserved"):
        checkpoints.save(partly[0], extra={"sha256": "0" * 64})
    assert store.get(f"partly/{MANIFEST}") == before, "a refused save must write nothing"


# --------------------------------------------------------------------------- S3 only


def test_missing_bucket_is_a_clear_error(s3_env):
    store = open_store("s3://evop-no-such-bucket/runs")
    for action in (lambda: store.put("x.json", b"{}"), lambda: store.get("x.json")):
        with pytest.raises(StorageError, match="'evop-no-such-bucket' does not exist"):
            action()
    # A missing bucket is not "no checkpoints yet": a search must not silently start over.
    with pytest.raises(StorageError, match="does not exist"):
        SearchCheckpoints(store, RUN).latest()


@pytest.mark.parametrize("variable", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_refused_credentials_are_a_clear_error(s3_env, s3_server, monkeypatch, states, variable):
    monkeypatch.setenv(variable, "wrong-value-123")
    store = open_store(f"s3://{s3_env}/runs")
    with pytest.raises(StorageError, match=f"refused the credentials for bucket '{s3_env}'") as info:
        SearchCheckpoints(store, RUN).save(states[0])
    assert "wrong-value-123" not in str(info.value)
    with pytest.raises(StorageError, match="refused the credentials"):
        SearchCheckpoints(store, RUN).latest()

    monkeypatch.setenv(variable, s3_server.env[variable])  # the right credentials: nothing was written
    assert SearchCheckpoints(open_store(f"s3://{s3_env}/runs"), RUN).latest() is None


def test_outage_raises_promptly_and_the_same_store_recovers(s3_env, tmp_path, monkeypatch, states):
    from evop.storage.s3server import LocalS3Server

    with LocalS3Server(tmp_path / "s3") as server:  # its own server: this test stops it
        server.create_bucket("evop-outage")
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
        store = open_store("s3://evop-outage/runs")
        checkpoints = SearchCheckpoints(store, RUN)
        for state in states[:2]:
            checkpoints.save(state)

        server.stop()
        started = time.monotonic()
        with pytest.raises(StorageError, match="cannot reach S3"):
            checkpoints.save(states[2])
        with pytest.raises(StorageError, match="cannot reach S3"):
            checkpoints.latest()
        assert time.monotonic() - started < 10

        port = server.port
        server.start()
        assert server.port == port
        assert checkpoints.latest().to_json() == states[1].to_json()  # nothing written before is lost
        checkpoints.save(states[2])
        assert checkpoints.latest().to_json() == states[2].to_json()
        assert [checkpoints.load(s.generation).to_json() for s in states[:3]] == [
            s.to_json() for s in states[:3]
        ]


def _wait_until_stopped(pid: int, timeout: float = 10.0) -> None:
    """A stop signal takes effect when each thread of ``pid`` is next scheduled: on a loaded
    machine a request sent at once could still be answered. Wait for the stopped state."""
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + timeout
    while stat.is_file() and time.monotonic() < deadline:
        try:
            threads = [t / "stat" for t in Path(f"/proc/{pid}/task").iterdir()]
            states = [t.read_text().rsplit(")", 1)[1].split()[0] for t in threads]
        except OSError:  # a thread ended while we looked
            states = []
        if states and all(state in ("T", "t") for state in states):
            return
        time.sleep(0.01)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP is POSIX")
def test_a_hung_server_times_out_instead_of_hanging(s3_env, tmp_path, monkeypatch, states):
    from evop.storage.s3server import LocalS3Server

    with LocalS3Server(tmp_path / "s3") as server:
        server.create_bucket("evop-hang")
        store = S3Store(
            "evop-hang", "runs", server.endpoint_url, max_attempts=1, connect_timeout=1, read_timeout=0.5
        )
        store.put("a.json", b"{}")
        os.kill(server.pid, signal.SIGSTOP)  # accepts connections (kernel backlog), never answers
        try:
            _wait_until_stopped(server.pid)
            started = time.monotonic()
            with pytest.raises(StorageError, match="cannot reach S3"):
                store.put("b.json", b"{}")
            assert time.monotonic() - started < 8
        finally:
            os.kill(server.pid, signal.SIGCONT)


def test_open_store_reads_endpoint_and_credentials_from_the_environment(s3_env, s3_server):
    store = open_store(f"s3://{s3_env}/some/prefix/")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.uri) == (s3_env, "some/prefix", f"s3://{s3_env}/some/prefix")
    assert store.client.meta.endpoint_url == s3_server.endpoint_url
    store.put("hello.json", b'{"a": 1}')
    assert store.get("hello.json") == b'{"a": 1}'
    assert store.get("missing.json") is None
    assert store.url("hello.json") == f"s3://{s3_env}/some/prefix/hello.json"
    # The object is a plain file in the server's directory, under its bucket and full key.
    assert (s3_server.root / s3_env / "some/prefix/hello.json").read_bytes() == b'{"a": 1}'
    assert open_store(f"s3://{s3_env}").uri == f"s3://{s3_env}"


# --------------------------------------------------------------------------- open_store, local


def test_open_store_local_forms(tmp_path, monkeypatch):
    spaced = tmp_path / "with space"
    for uri in (spaced.as_uri(), str(spaced), f"file://localhost{spaced}"):
        store = open_store(uri)
        assert isinstance(store, LocalStore) and store.root == spaced, uri
    store = open_store(spaced.as_uri())
    store.put("a/b.json", b"1")
    assert (spaced / "a/b.json").read_bytes() == b"1"
    assert open_store(store.uri).get("a/b.json") == b"1"  # uri round-trips
    monkeypatch.chdir(tmp_path)
    assert open_store("relative/dir").root == Path("relative/dir")


@pytest.mark.parametrize("uri", ["gs://bucket/x", "http://127.0.0.1:9000/b", "s3:///no-bucket", ""])
def test_open_store_refuses_what_it_cannot_serve(uri):
    with pytest.raises(StorageError):
        open_store(uri)


def test_a_store_url_with_credentials_is_refused_without_echoing_them():
    from evop.storage.urls import redact

    with pytest.raises(StorageError) as info:
        open_store("s3://AKIAEXAMPLE:top-secret@bucket/runs")
    assert info.value.permanent and "top-secret" not in str(info.value)
    message = str(info.value)
    assert "s3://***@bucket/runs has credentials in it" in message and "AWS_ACCESS_KEY_ID" in message
    assert redact("http://u:p@host:5000/x") == "http://***@host:5000/x" and redact("s3://b/k") == "s3://b/k"


def test_the_development_s3_server_keeps_its_secret_off_the_command_line(s3_server):
    """`ps` shows every user a process's command line; the key pair goes through the environment."""
    cmdline = Path(f"/proc/{s3_server.pid}/cmdline").read_bytes().decode()
    assert s3_server.secret_key not in cmdline and "--auth-key" not in cmdline
    s3_server.client().list_buckets()  # and the server still checks the key
