"""Scoring candidate patterns on many devices: a pool of Ray actors, each holding the model once.

The searches stay sequential and deterministic. Before a step scores a list of patterns (a GA
generation, a polish round, a SLEB round, a batch of random patterns), it calls
:func:`~evop.method.scoring.prefetch` on its :class:`~evop.method.scoring.StagedCounting` view.
With a :class:`ParallelScorer` behind that view, the actors score those patterns concurrently
(raced against the step's reference when the search races) and their per-stage sums land in the
memo; the step then runs exactly as it would in one process and reads them from there. The same
numbers meet the same decisions, so a search is the same whatever the number of workers; more
workers change the time, and, when a step's reference improves mid-step, add a few stages the
search did not need (scored ahead, counted in :attr:`RayPool.tokens`, not in the method's cost).

Faults are Ray's to handle: a lost actor (killed process, lost node) is restarted up to
``scale.max_restarts`` times and the task it held is retried there; an actor past its restarts is
dropped and its pattern re-queued on the others. Scores already returned are in the memo, which
the pipeline checkpoints as before. Ray is imported only here, and only when a pool is made.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from evop.errors import BadInputError, TransientError
from evop.method.patterns import Pattern

if TYPE_CHECKING:
    import torch

    from evop.config import FitnessConfig, ModelConfig, ScaleConfig
    from evop.method.fitness import PatternScorer
    from evop.method.racing import RaceRule

log = logging.getLogger(__name__)

RaceArgs = tuple[list[float] | None, "RaceRule"]
"""``(reference sums, rule)`` of :func:`~evop.method.racing.race`."""


class ScaleError(BadInputError):
    """The Ray pool cannot be used: Ray is not installed, or its cluster cannot be reached."""


class WorkersLostError(TransientError):
    """Every actor of the pool was lost (past its restarts): a retry on a healthy cluster may work."""


def _ray() -> Any:
    try:
        import ray
    except ImportError as err:  # pragma: no cover - ray is a declared extra
        raise ScaleError("scale.backend: ray needs Ray: pip install 'evop[ray]'") from err
    return ray


def connect(scale: "ScaleConfig") -> Any:
    """Join the Ray cluster of ``scale.address`` (else ``RAY_ADDRESS``), or start a local one.

    Raises:
        ScaleError: naming the address when no cluster answers there.
    """
    ray = _ray()
    if ray.is_initialized():
        return ray
    address = check_address(scale)
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count(), log_to_driver=False, include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ScaleError(
            f"cannot reach the Ray cluster at scale.address={address!r}: {first} (start one with "
            "`ray start --head`, or leave scale.address empty for a local instance)"
        ) from err
    return ray


def check_address(scale: "ScaleConfig") -> str | None:
    """The cluster address to join (``scale.address``, else ``RAY_ADDRESS``; None: start a local
    instance), probed first unless it is ``auto``.

    Raises:
        ScaleError: naming the address when nothing listens there.
    """
    address = scale.address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto":
        probe_address(address)
    return address


def probe_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, naming ``address``, when nothing listens there (Ray itself waits minutes)."""
    import socket

    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ScaleError(f"scale.address={address!r} is not host:port (or ray://host:port, or 'auto')")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ScaleError(
            f"cannot reach the Ray cluster at scale.address={address!r}: {err} (start one with "
            "`ray start --head`, or leave scale.address empty for a local instance)"
        ) from err


def resolve_workers(scale: "ScaleConfig", resources: dict[str, float]) -> int:
    """``scale.workers``, with ``auto``: one per visible GPU (GPU actors), else one per CPU core,
    given the cluster's ``resources`` (``ray.cluster_resources()``)."""
    if scale.workers != "auto":
        return int(scale.workers)
    if scale.gpus_per_worker > 0:
        return max(1, int(resources.get("GPU", 0) // scale.gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) // scale.threads_per_worker))


class ScorerWorker:
    """One actor: the model loaded once, the calibration blocks received once, patterns scored in
    place exactly as :class:`~evop.method.fitness.PatternScorer` scores them in one process."""

    def __init__(
        self,
        model: dict[str, Any],
        blocks: "torch.Tensor",
        fitness: dict[str, Any],
        clusters: Sequence[int] | None,
        threads: int,
        split: bool,
    ):
        import torch

        from evop.config import FitnessConfig, ModelConfig
        from evop.method.fitness import PatternScorer
        from evop.models.loading import load_model

        torch.set_num_threads(threads)
        loaded, _ = load_model(ModelConfig(**model), device_map="auto" if split else None)
        self._scorers = {1.0: PatternScorer.from_config(loaded, blocks, FitnessConfig(**fitness), clusters)}

    def _scorer(self, fraction: float) -> "PatternScorer":
        if fraction not in self._scorers:
            self._scorers[fraction] = self._scorers[1.0].first_blocks(fraction)
        return self._scorers[fraction]

    def pid(self) -> int:
        return os.getpid()

    def stages(self, key: str, fraction: float, start: int, stop: int) -> tuple[list[float], list[float]]:
        """Summed losses of stages ``start..stop-1`` of pattern ``key``, and the seconds of each."""
        scorer = self._scorer(fraction)
        sums, seconds = [], []
        for stage in range(start, stop):
            began = time.perf_counter()
            sums += scorer.stage_sums(Pattern.parse(key), stage, stage + 1)
            seconds.append(time.perf_counter() - began)
        return sums, seconds

    def race(
        self, key: str, known: list[float], fraction: float, race_args: RaceArgs | None
    ) -> tuple[list[float], list[float]]:
        """Pattern ``key`` raced as :func:`~evop.method.racing.race` would (``race_args`` None: on
        every stage), starting from its ``known`` stage sums; returns all its sums and the seconds
        of the stages scored here."""
        from evop.method.racing import RaceRule, race
        from evop.method.scoring import StagedCounting

        view = StagedCounting(self._scorer(fraction), stages={key: (list(known), [0.0] * len(known))})
        reference, rule = race_args or (None, RaceRule())
        try:
            sums = race(view, Pattern.parse(key), reference, rule)
        except ArithmeticError:  # diverged: the search's own scoring will see it and rank it last
            return list(known), []
        return sums, view.stages[key][1][len(known) :]


class RayPool:
    """A pool of :class:`ScorerWorker` actors and the queue that feeds them.

    Args:
        scale: Workers, GPUs and threads per worker, restarts, cluster address.
        model: The model section (each actor loads the model itself).
        blocks: Calibration blocks ``(N, T)``, put once in Ray's object store.
        fitness: The fitness section.
        clusters: Each block's CCDS cluster (the cluster aggregates), or None.
        on_result: Called after each finished job with ``(jobs done, jobs asked)`` (progress).
    """

    def __init__(
        self,
        scale: "ScaleConfig",
        model: "ModelConfig",
        blocks: "torch.Tensor",
        fitness: "FitnessConfig",
        clusters: Sequence[int] | None = None,
        on_result: Callable[[int, int], None] | None = None,
    ):
        ray = connect(scale)
        self.workers = resolve_workers(scale, ray.cluster_resources())
        actor = ray.remote(ScorerWorker).options(
            num_cpus=scale.threads_per_worker,
            num_gpus=scale.gpus_per_worker,
            max_restarts=scale.max_restarts,
            max_task_retries=scale.max_restarts,
        )
        # Kept for the pool's life: a restarted actor is built again from these arguments.
        self._blocks = blocks_ref = ray.put(blocks.cpu())
        model_json = model.model_dump(mode="json")
        fitness_json = fitness.model_dump(mode="json")
        split = scale.gpus_per_worker > 1
        clusters = None if clusters is None else [int(c) for c in clusters]
        self.actors = [
            actor.remote(model_json, blocks_ref, fitness_json, clusters, scale.threads_per_worker, split)
            for _ in range(self.workers)
        ]
        self._wait_started(ray, scale)
        self.on_result = on_result
        self.jobs: Counter[str] = Counter()  # jobs finished by method, over the pool's life
        self.seconds = 0.0  # wall seconds spent waiting on the pool
        self.tokens = 0  # tokens forwarded by the actors, ahead-of-need stages included
        log.info("Ray pool of %d workers (%s)", self.workers, ray.get_runtime_context().gcs_address)

    def _wait_started(self, ray: Any, scale: "ScaleConfig") -> None:
        """Every actor up (its model loaded), or a clear error when the cluster cannot place them."""
        refs = [a.pid.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=scale.start_timeout_s)
        if len(ready) < len(refs):
            free = ray.available_resources()
            self.shutdown()
            raise ScaleError(
                f"only {len(ready)} of {self.workers} Ray workers started within "
                f"scale.start_timeout_s={scale.start_timeout_s:g}: each needs "
                f"{scale.threads_per_worker} CPU and {scale.gpus_per_worker:g} GPU, the cluster has "
                f"{free.get('CPU', 0):g} CPU and {free.get('GPU', 0):g} GPU free (lower scale.workers, "
                "or workers: auto)"
            )
        ray.get(ready)  # an actor that failed to load its model raises its error here

    def run(self, method: str, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        """``method(*args)`` of some actor for each ``args`` of ``calls``, at most one call in
        flight per actor; the results in the order of ``calls``. A call whose actor is lost past
        its restarts is re-queued on the others; an error of the call itself is returned as the
        exception (the caller decides)."""
        ray = _ray()
        from ray.exceptions import RayActorError

        began = time.perf_counter()
        queue = deque(enumerate(calls))
        results: list[Any] = [None] * len(calls)
        idle = list(self.actors)
        inflight: dict[Any, tuple[Any, int, tuple[Any, ...]]] = {}
        done_here = 0
        while queue or inflight:
            while queue and idle:
                worker = idle.pop()
                i, args = queue.popleft()
                inflight[getattr(worker, method).remote(*args)] = (worker, i, args)
            if not inflight:
                raise WorkersLostError(f"every one of the {self.workers} Ray workers was lost")
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            worker, i, args = inflight.pop(ref)
            try:
                results[i] = ray.get(ref)
            except RayActorError as err:
                log.warning("Ray worker lost past its restarts (%s); its job goes to the others", err)
                self.actors.remove(worker)
                queue.appendleft((i, args))
                continue
            except Exception as err:  # noqa: BLE001 - the call's own error, returned to the caller
                results[i] = err
            idle.append(worker)
            done_here += 1
            self.jobs[method] += 1
            if self.on_result is not None:
                self.on_result(done_here, len(calls))
        self.seconds += time.perf_counter() - began
        return results

    def pids(self) -> list[int]:
        """Process ids of the actors (tests kill one)."""
        return _ray().get([a.pid.remote() for a in self.actors])

    def shutdown(self) -> None:
        ray = _ray()
        for worker in self.actors:
            ray.kill(worker)
        self.actors = []


class ParallelScorer:
    """A :class:`~evop.method.fitness.PatternScorer` whose patterns are scored by a
    :class:`RayPool`: the stage layout and :meth:`fitness_of` come from ``local`` (the same model,
    blocks and settings in this process), the losses from the actors.

    Args:
        local: The scorer of this process (its layout and aggregate; its model is not run).
        pool: The actors.
        fraction: Which first fraction of the blocks the actors score (EvoPress's cheap stage).
    """

    def __init__(self, local: "PatternScorer", pool: RayPool, fraction: float = 1.0):
        self.local = local
        self.pool = pool
        self.fraction = fraction

    @classmethod
    def on_pool(
        cls, model: Any, blocks: "torch.Tensor", fitness: "FitnessConfig", clusters: Any, pool: RayPool
    ) -> "ParallelScorer":
        """The scorer of ``blocks`` whose patterns ``pool`` scores; the local one only reads the
        stage layout, so it keeps no prefix cache (the actors hold theirs)."""
        from evop.method.fitness import PatternScorer

        no_cache = fitness.model_copy(update={"prefix_cache_mb": 0})
        return cls(PatternScorer.from_config(model, blocks, no_cache, clusters), pool)

    def __getattr__(self, name: str) -> Any:  # layout, model, blocks, num_layers... of the local one
        return getattr(self.local, name)

    @property
    def stage_tokens(self) -> list[int]:
        return self.local.stage_tokens

    @property
    def stage_positions(self) -> list[int]:
        return self.local.stage_positions

    def fitness_of(self, sums: list[float]) -> float:
        return self.local.fitness_of(sums)

    def first_blocks(self, fraction: float) -> "ParallelScorer":
        return ParallelScorer(self.local.first_blocks(fraction), self.pool, fraction)

    def stage_sums(self, pattern: Pattern, start: int = 0, stop: int | None = None) -> list[float]:
        stop = len(self.stage_tokens) if stop is None else stop
        (result,) = self.pool.run("stages", [(str(pattern), self.fraction, start, stop)])
        if isinstance(result, Exception):
            raise result
        self.pool.tokens += sum(self.stage_tokens[start:stop])
        return result[0]

    def __call__(self, pattern: Pattern) -> float:
        return self.fitness_of(self.stage_sums(pattern))

    def race_many(
        self, known: dict[str, list[float]], race_args: RaceArgs | None
    ) -> dict[str, tuple[list[float], list[float]]]:
        """Each pattern of ``known`` (its stage sums so far) raced on the actors, concurrently:
        ``key -> (all its sums, seconds of the stages scored now)``; patterns whose scoring failed
        are left out (the search's own scoring meets the failure)."""
        keys = list(known)
        results = self.pool.run("race", [(k, known[k], self.fraction, race_args) for k in keys])
        out = {}
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, Exception):
                log.warning("scoring %s ahead failed (%s); it is scored when the search asks", key, result)
                continue
            sums, _ = out[key] = result
            self.pool.tokens += sum(self.stage_tokens[len(known[key]) : len(sums)])
        return out
