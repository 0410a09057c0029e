"""One run at a time per search: the lease in the store, its expiry and takeover, and two real
processes running the same search on one store, each generation computed once."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

from evop import pipeline
from evop.storage.lease import Lease, LeaseLostError
from evop.storage.retry import RetryingStore, RetryPolicy
from evop.storage.stores import LocalStore, S3Store
from tests.tiny_models import comparable, search_config


def test_a_held_lease_is_refused_until_released(tmp_path):
    store = LocalStore(tmp_path)
    a, b = Lease(store, "run/lease.json", ttl_s=60), Lease(store, "run/lease.json", ttl_s=60)
    assert a.try_acquire() is None
    holder = b.try_acquire()
    assert holder["owner"] == a.owner and holder["pid"] == os.getpid()
    a.renew()
    a.release()
    assert b.try_acquire() is None
    with pytest.raises(LeaseLostError, match="held by"):
        a.renew()


def test_an_expired_lease_is_taken_over_and_its_holder_learns_it(tmp_path):
    store = LocalStore(tmp_path)
    a, b = Lease(store, "lease.json", ttl_s=1.0), Lease(store, "lease.json", ttl_s=60)
    assert a.try_acquire() is None  # and never renewed: a frozen or killed run
    assert b.try_acquire() is not None
    time.sleep(1.1)
    assert b.try_acquire() is None
    with pytest.raises(LeaseLostError):
        a.renew()


def test_the_lease_of_a_dead_process_on_this_host_is_free_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {
        "owner": f"x:{dead.pid}:1",
        "host": socket.gethostname(),
        "pid": dead.pid,
        "renewed_at": time.time(),
        "expires_at": time.time() + 3600,
    }
    (tmp_path / "lease.json").write_text(json.dumps(record))
    assert Lease(LocalStore(tmp_path), "lease.json", ttl_s=60).try_acquire() is None
    elsewhere = {**record, "host": "another-host"}  # only the expiry can tell for another machine
    (tmp_path / "lease.json").write_text(json.dumps(elsewhere))
    assert Lease(LocalStore(tmp_path), "lease.json", ttl_s=60).try_acquire()["host"] == "another-host"


def test_the_heartbeat_keeps_the_lease_past_its_duration(tmp_path):
    store = LocalStore(tmp_path)
    a = Lease(store, "lease.json", ttl_s=0.6)
    a.acquire()
    time.sleep(1.5)  # well past 0.6 s: renewed every 0.2 s
    assert Lease(store, "lease.json", ttl_s=60).try_acquire()["owner"] == a.owner
    a.check()
    a.release()


def test_s3_servers_that_ignore_conditional_writes_still_give_one_holder(s3_env):
    """rclone serve s3 ignores If-None-Match: the read-back after a pause decides. (As in a run, the
    store retries: a read racing a write may get a torn body, which boto's checksum refuses.)"""
    leases = [
        Lease(
            RetryingStore(S3Store(s3_env, "race"), RetryPolicy(total_s=10)),
            "lease.json",
            ttl_s=60,
            settle_s=0.5,
        )
        for _ in range(4)
    ]
    won = []
    threads = [
        threading.Thread(target=lambda lease=lease: won.append(lease.try_acquire() is None))
        for lease in leases
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert won.count(True) == 1


@pytest.mark.parametrize("store", ["file", "s3"])
def test_two_identical_runs_compute_each_generation_once(tiny_dir, text_file, tmp_path, store, request):
    """Two `evop search` processes started together on one store: one computes, the other waits for
    the lease, then finds every generation done; both print the same result."""
    checkpoints = None
    if store == "s3":
        checkpoints = f"s3://{request.getfixturevalue('s3_env')}/two-runs"  # and the AWS_* variables
    env = {**os.environ}
    outs = [tmp_path / "a", tmp_path / "b"]
    cfgs = [
        search_config(tiny_dir, text_file, out, [f"checkpoints={checkpoints}"] if checkpoints else [])
        for out in outs
    ]
    if store == "file":  # one store for both: the first run's folder
        cfgs[1] = cfgs[1].model_copy(update={"checkpoints": str(outs[0] / "checkpoints")})
    procs = []
    for i, cfg in enumerate(cfgs):
        (tmp_path / f"{i}.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        argv = [
            sys.executable,
            "-m",
            "evop.cli",
            "search",
            "--quiet",
            "--config",
            str(tmp_path / f"{i}.yaml"),
        ]
        procs.append(
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    logs = []
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        logs.append(err)
    computed = [int(g) for log in logs for g in re.findall(r"checkpointed generation (\d+) ", log)]
    assert sorted(computed) == list(range(max(computed) + 1))  # every generation, each once
    assert sum("another run is computing this search" in log for log in logs) == 1
    results = [json.loads((out / "result.json").read_text()) for out in outs]
    assert comparable(results[0]) == comparable(results[1])
    assert results[0]["generations"] == max(computed)
    assert pipeline.search_status(cfgs[0])["done"]


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b'{"owner": "x", "expires_at": "soon"}'])
def test_a_lease_object_that_is_no_lease_is_free_but_replaced_only_as_read(tmp_path, content):
    (tmp_path / "lease.json").write_bytes(content)
    lease = Lease(LocalStore(tmp_path), "lease.json", ttl_s=60)
    assert lease.try_acquire() is None
    assert json.loads((tmp_path / "lease.json").read_text())["owner"] == lease.owner
