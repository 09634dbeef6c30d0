"""Backfill workers: the actor that executes batches, and the pool that runs them.

``BackfillWorker`` executes batches of a fixed set of shards in an in-process
``AggregateHost`` and returns a ``BatchOutcome`` per batch. A pool owns the
workers: ``LocalPool`` runs one in this process, and ``RayPool`` runs one
actor per worker and replaces an actor that dies. ``BackfillError`` reports a
backfill that cannot finish. Ray and the host are imported only inside
functions, so that ``raysource --help`` stays fast. May import ``store`` and
the rest of ``pipeline``.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import JobConfig
from pipeline.protocol import (
    APPENDED,
    DUPLICATE,
    NOT_OWNER,
    REJECTED,
    BatchItem,
    BatchRequest,
    shard_of,
)

__all__ = [
    "MAX_WORKER_RESTARTS",
    "BackfillError",
    "BackfillWorker",
    "BatchOutcome",
    "LocalPool",
    "RayPool",
    "WorkerPool",
    "resolve_num_workers",
    "start_pool",
]

logger = logging.getLogger(__name__)

# Replacements of one worker actor that died, before the backfill stops.
MAX_WORKER_RESTARTS = 3

_WORKER_START_TIMEOUT_S = 120.0


class BackfillError(Exception):
    """Report a backfill that cannot finish: a batch kept failing or a worker died.

    Everything recorded before the error stays recorded, so running the same
    backfill again continues where this one stopped.
    """


@dataclass
class BatchOutcome:
    """A worker's account of one batch: commands per outcome, and those to resend.

    ``retry`` lists the indices, in batch order, of the commands that were not
    executed and must be sent again in that order: the store was
    unavailable, version conflicts outlasted the host's retries, or the
    worker died. ``reason`` is the cause.
    ``recorded_earlier`` counts the duplicates among the appended and rejected
    commands: ids recorded by an earlier run or by an earlier row.
    """

    appended_commands: int = 0
    rejected_commands: int = 0
    events: int = 0
    recorded_earlier: int = 0
    retry: list[int] = field(default_factory=list)
    reason: str | None = None

    @classmethod
    def all_failed(cls, num_items: int, reason: str) -> BatchOutcome:
        return cls(retry=list(range(num_items)), reason=reason)


class BackfillWorker:
    """Execute backfill batches of a fixed set of shards in an in-process AggregateHost.

    Crash behaviour: the host is a cache of the event store, and each batch is
    appended in one transaction, so a worker that dies loses only its live
    aggregates and the batch in progress. A replacement reloads aggregates
    from snapshots and events. Batches are safe to repeat: command ids already
    recorded are reported as duplicates and counted by their recorded outcome.
    """

    def __init__(
        self, worker_id: str, config: JobConfig, shards: Iterable[int]
    ) -> None:
        from pipeline.aggregate_host import AggregateHost
        from store.event_store import EventStore

        self.worker_id = worker_id
        self._host = AggregateHost(worker_id, config, shards, start_idle_thread=False)
        self._events = EventStore(config.store.database_url, pool_size=1)

    def execute(self, request: BatchRequest) -> BatchOutcome:
        """Execute the batch in order; return the counts and the commands to resend."""
        results = self._host.execute_batch(request).results
        outcome = BatchOutcome()
        duplicates: dict[str, int] = {}
        for index, result in enumerate(results):
            if result.status == APPENDED:
                outcome.appended_commands += 1
                if result.first_version:
                    outcome.events += result.last_version - result.first_version + 1
            elif result.status == REJECTED:
                outcome.rejected_commands += 1
            elif result.status == DUPLICATE:
                duplicates[result.command_id] = index
            elif result.status == NOT_OWNER:
                msg = (
                    f"worker {self.worker_id} received command {result.command_id} "
                    "of a shard it does not own, so the driver routed it wrongly"
                )
                raise RuntimeError(msg)
            else:
                outcome.retry.append(index)
                outcome.reason = result.reason
        if duplicates:
            self._count_duplicates(duplicates, outcome)
        return outcome

    def _count_duplicates(
        self, duplicates: dict[str, int], outcome: BatchOutcome
    ) -> None:
        """Count duplicates by the outcome recorded for their command ids."""
        from store.errors import StoreUnavailableError

        try:
            recorded = Counter(self._events.find_commands(duplicates).values())
        except StoreUnavailableError as error:
            # Sending a duplicate again executes nothing, and the lookup is
            # repeated then.
            logger.warning(
                "duplicate outcomes not read, resending worker=%s duplicates=%d "
                "error=%s",
                self.worker_id,
                len(duplicates),
                error,
            )
            outcome.retry = sorted([*outcome.retry, *duplicates.values()])
            outcome.reason = f"store unavailable: {error}"
            return
        outcome.appended_commands += recorded["appended"]
        outcome.rejected_commands += recorded["rejected"]
        outcome.recorded_earlier += len(duplicates)

    def finish(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Write the queued snapshots, stop the host and return its figures."""
        self._host.flush_snapshots(timeout_s)
        status = self._host.status()
        self._host.shutdown()
        self._events.close()
        return {
            "snapshots_written": status["snapshots_written"],
            "snapshots_failed": status["snapshots_failed"],
            "live_aggregates": status["live_aggregates"],
            "aggregates_loaded": status["counters"].get("loads", 0),
            "evictions": status["evictions"],
            "rss_bytes": status["rss_bytes"],
        }

    def ping(self) -> str:
        return self.worker_id


class WorkerPool:
    """Workers that each own the shards ``shard % num_workers == index``."""

    num_workers: int

    def __init__(self, config: JobConfig, num_workers: int) -> None:
        self.num_workers = num_workers
        self._num_shards = config.hosts.num_shards
        self._sender_id = f"backfill-{uuid.uuid4().hex[:8]}"
        self._epochs = [0] * num_workers

    def worker_of(self, item: BatchItem) -> int:
        shard = shard_of(
            item.aggregate_type, item.command.aggregate_id, self._num_shards
        )
        return shard % self.num_workers

    def shards_of(self, worker: int) -> list[int]:
        return [s for s in range(self._num_shards) if s % self.num_workers == worker]

    def raise_epoch(self, worker: int) -> None:
        self._epochs[worker] += 1

    def request(self, worker: int, items: list[BatchItem]) -> BatchRequest:
        return BatchRequest(self._sender_id, self._epochs[worker], items)

    def submit(self, worker: int, items: list[BatchItem]) -> Any:
        raise NotImplementedError

    def is_ready(self, handle: Any) -> bool:
        raise NotImplementedError

    def result(self, worker: int, handle: Any, num_items: int) -> BatchOutcome:
        raise NotImplementedError

    def finish(self) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the workers; safe after ``finish`` and after a failure."""


class LocalPool(WorkerPool):
    """One worker in this process, owning every shard: a backfill without Ray."""

    def __init__(self, config: JobConfig) -> None:
        super().__init__(config, 1)
        self._worker = BackfillWorker("backfill-local", config, self.shards_of(0))
        self._is_finished = False

    def submit(self, worker: int, items: list[BatchItem]) -> Any:
        return self._worker.execute(self.request(worker, items))

    def is_ready(self, handle: Any) -> bool:
        return True

    def result(self, worker: int, handle: Any, num_items: int) -> BatchOutcome:
        return handle  # type: ignore[no-any-return]

    def finish(self) -> dict[str, Any]:
        self._is_finished = True
        return _merge_figures([self._worker.finish()])

    def close(self) -> None:
        if not self._is_finished:
            self._worker.finish()


class RayPool(WorkerPool):
    """BackfillWorker actors; a dead one is replaced up to MAX_WORKER_RESTARTS times."""

    def __init__(self, config: JobConfig, num_workers: int) -> None:
        import ray

        super().__init__(config, num_workers)
        self._config = config
        options: dict[str, Any] = {
            "num_cpus": config.hosts.num_cpus,
            "max_restarts": 0,
            "max_concurrency": 1,
        }
        if config.hosts.memory_bytes:
            options["memory"] = config.hosts.memory_bytes
        if config.hosts.resources:
            options["resources"] = dict(config.hosts.resources)
        if config.hosts.spread:
            options["scheduling_strategy"] = "SPREAD"
        self._actor_cls = ray.remote(BackfillWorker).options(**options)
        self._actors = [self._start(worker) for worker in range(num_workers)]
        self._generations = [0] * num_workers
        self._restarts = [0] * num_workers
        self._wait_until_started(num_workers)

    def _wait_until_started(self, num_workers: int) -> None:
        """Wait until every worker is up, so a worker that cannot start fails here."""
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            ray.get(
                [actor.ping.remote() for actor in self._actors],
                timeout=_WORKER_START_TIMEOUT_S,
            )
        except GetTimeoutError as error:
            self.close()
            resources = ray.cluster_resources()  # type: ignore[no-untyped-call]
            msg = (
                f"{num_workers} backfill workers did not start within "
                f"{_WORKER_START_TIMEOUT_S:.0f} s. Each needs hosts.num_cpus = "
                f"{self._config.hosts.num_cpus} CPUs, and the cluster has "
                f"{resources.get('CPU', 0)}, so lower --workers or hosts.num_cpus"
            )
            raise BackfillError(msg) from error

    def _start(self, worker: int) -> Any:
        return self._actor_cls.remote(
            f"backfill-{worker}", self._config, self.shards_of(worker)
        )

    def submit(self, worker: int, items: list[BatchItem]) -> Any:
        ref = self._actors[worker].execute.remote(self.request(worker, items))
        return self._generations[worker], ref

    def is_ready(self, handle: Any) -> bool:
        import ray

        ready, _ = ray.wait([handle[1]], timeout=0)
        return bool(ready)

    def result(self, worker: int, handle: Any, num_items: int) -> BatchOutcome:
        import ray
        from ray.exceptions import RayActorError

        generation, ref = handle
        try:
            return ray.get(ref)  # type: ignore[no-any-return]
        except RayActorError as error:
            if generation == self._generations[worker]:
                self._replace(worker, error)
            return BatchOutcome.all_failed(
                num_items, f"worker died: {type(error).__name__}"
            )

    def _replace(self, worker: int, error: Exception) -> None:
        import ray

        self._restarts[worker] += 1
        if self._restarts[worker] > MAX_WORKER_RESTARTS:
            msg = (
                f"backfill worker {worker} died {self._restarts[worker]} times, the "
                f"last with {type(error).__name__}: {error}. Fix the cause and run the "
                "backfill again, which skips the commands already recorded"
            )
            raise BackfillError(msg) from error
        logger.warning(
            "worker died, starting a replacement worker=%d error=%s",
            worker,
            type(error).__name__,
        )
        ray.kill(self._actors[worker], no_restart=True)
        self._actors[worker] = self._start(worker)
        self._generations[worker] += 1

    def finish(self) -> dict[str, Any]:
        import ray

        figures = ray.get([actor.finish.remote() for actor in self._actors])
        return {**_merge_figures(figures), "worker_restarts": sum(self._restarts)}

    def close(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)


def _merge_figures(figures: list[dict[str, Any]]) -> dict[str, Any]:
    evictions: Counter[str] = Counter()
    for figure in figures:
        evictions.update(figure["evictions"])
    return {
        "snapshots_written": sum(f["snapshots_written"] for f in figures),
        "snapshots_failed": sum(f["snapshots_failed"] for f in figures),
        "aggregates_loaded": sum(f["aggregates_loaded"] for f in figures),
        "live_aggregates": sum(f["live_aggregates"] for f in figures),
        "evictions": dict(evictions),
        "max_worker_rss_bytes": max((f["rss_bytes"] for f in figures), default=0),
        "worker_restarts": 0,
    }


def start_pool(config: JobConfig, workers: int | None) -> WorkerPool:
    if workers is not None and workers < 0:
        msg = f"workers must be at least 0, got {workers}"
        raise ValueError(msg)
    if workers == 0:
        return LocalPool(config)
    num_workers = resolve_num_workers(config, workers)
    return RayPool(config, min(num_workers, config.hosts.num_shards))


def resolve_num_workers(config: JobConfig, workers: int | None) -> int:
    """Start Ray if needed; return ``workers``, or the CPUs Ray reports (at least 1)."""
    import ray

    from pipeline.runtime import init_ray

    init_ray(config.ray)
    if workers is not None:
        return workers
    num_cpus = ray.cluster_resources().get("CPU", 1)  # type: ignore[no-untyped-call]
    return max(1, int(num_cpus))
