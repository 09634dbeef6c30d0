"""Backfills: commands from a file or a Kafka offset range, run as a batch.

``raysource backfill`` reads JSON lines, CSV or Parquet in chunks, or a range
of a topic (see pipeline.backfill_sources). It validates each row into a
command and sends the commands to Ray actors that each own a fixed set of
shards. Each actor, a ``BackfillWorker``, executes its batches in an
in-process ``AggregateHost``, the same code that serves the streaming job. So
a backfill of the same commands in the same order appends the same events per
stream.
Each shard has one owner and receives its commands in row order, so the
commands of one aggregate run in row order.

Every row ends as exactly one of: an appended command (with its events), a
rejected command (the aggregate's reason is in the commands table) or a dead
letter (the validation reason is in the dead-letter table). A backfill that is
stopped or killed can be run again. Command ids come from the rows (or from
the record's topic, partition and offset), so the commands already recorded
are duplicates and are not executed again. Dead letters are stored once per
source row.

``raysource rebuild-snapshots`` writes a fresh snapshot, at the configured
``snapshot_version``, of every aggregate of one type.

This module imports Ray, pandas and the host only inside functions, so that
``raysource --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.backfill_sources import (
    DEFAULT_IDLE_TIMEOUT_S,
    FileSource,
    RowSource,
    TopicRange,
    TopicSource,
    parse_timestamp,
)
from pipeline.config import AggregateConfig, ConfigError, JobConfig
from pipeline.protocol import (
    APPENDED,
    DUPLICATE,
    NOT_OWNER,
    REJECTED,
    BatchItem,
    BatchRequest,
    shard_of,
)

if TYPE_CHECKING:
    from pipeline.sources import SourceMapping
    from store.event_store import DeadLetter, EventStore

__all__ = [
    "BackfillError",
    "BackfillWorker",
    "BatchOutcome",
    "TopicRange",
    "backfill_config",
    "format_progress",
    "format_summary",
    "rebuild_snapshots",
    "register",
    "run_backfill",
    "run_plain_loop",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 50_000
DEFAULT_BATCH_COMMANDS = 5_000
DEFAULT_MAX_BATCHES_IN_FLIGHT = 2
# Attempts at a batch that failed because the store was unavailable or its
# version conflicts outlasted the host's retries, before the backfill stops.
MAX_RETRY_ATTEMPTS = 20
# Replacements of one worker actor that died, before the backfill stops.
MAX_WORKER_RESTARTS = 3

_DEAD_LETTER_BATCH = 1_000
_PROGRESS_INTERVAL_S = 0.5
_REBUILD_CHUNK_IDS = 200
_WORKER_START_TIMEOUT_S = 120.0

ProgressCallback = Callable[[dict[str, Any]], None]


class BackfillError(Exception):
    """Report a backfill that cannot finish: a batch kept failing or a worker died.

    Everything recorded before the error stays recorded, so running the same
    backfill again continues where this one stopped.
    """


# -- running a backfill ---------------------------------------------------------


def run_backfill(
    config: JobConfig,
    source: str | os.PathLike[str] | TopicRange | None = None,
    mapping: str | SourceMapping = "shop",
    limit: int | None = None,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    batch_commands: int = DEFAULT_BATCH_COMMANDS,
    max_batches_in_flight: int = DEFAULT_MAX_BATCHES_IN_FLIGHT,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Execute every row of ``source`` as a command and return the accounting.

    ``source`` is a JSON-lines, CSV or Parquet file, a TopicRange, or None for
    the mapping's own data set. ``mapping`` turns file rows into flat command
    dicts, as a built-in name or 'module:function' (see pipeline.sources).
    Topic records are decoded as JSON, or by ``kafka.decoder`` when it is set.
    ``workers`` is the number of worker actors (default: the CPUs Ray
    reports); 0 runs everything in this process, without Ray. Lifespans are
    replaced by INFINITY, so each worker keeps its aggregates until the
    host's live-aggregate or memory bound evicts them. An aggregate type that
    the mapping names and the configuration lacks is added with default
    settings.

    ``progress`` is called about twice a second with rows_read, rows_done,
    rows_total (None when unknown), elapsed_s and rows_per_s. When ``stop`` is
    set, reading stops and the commands already sent are finished.

    Returns the summary: rows_read, appended_commands, rejected_commands,
    dead_letters, accounted (their sum), is_accounted (the sum equals
    rows_read), events, recorded_earlier, elapsed_s and rows_per_s (from the
    first row read, after the workers started), startup_s, workers and worker
    figures. Raises BackfillError when a batch keeps failing.
    """
    from pipeline.registry import AggregateRegistry
    from pipeline.sources import resolve_mapping

    if limit is not None and limit < 0:
        msg = f"limit must be at least 0 or None, got {limit}"
        raise ValueError(msg)
    for name, value in (
        ("batch_commands", batch_commands),
        ("max_batches_in_flight", max_batches_in_flight),
        ("chunk_rows", chunk_rows),
    ):
        if value < 1:
            msg = f"{name} must be at least 1, got {value}"
            raise ValueError(msg)

    resolved = None if isinstance(source, TopicRange) else resolve_mapping(mapping)
    config = backfill_config(config, resolved)
    registry = AggregateRegistry.from_config(config.aggregates)
    if isinstance(source, TopicRange):
        reader: RowSource = TopicSource(source, config, limit)
    else:
        assert resolved is not None
        reader = FileSource(source, resolved, registry, limit, chunk_rows)

    starting = time.monotonic()
    pool = _start_pool(config, workers)
    started = time.monotonic()
    logger.info("backfill started source=%s workers=%d", reader.label, pool.num_workers)
    driver = _Driver(pool, config, batch_commands, max_batches_in_flight)
    reporter = _ProgressReporter(progress, reader.rows_total, started)
    try:
        for entry in reader:
            driver.add(entry)
            reporter.maybe_report(driver.tally)
            if stop is not None and stop.is_set():
                logger.info(
                    "backfill stopping on request rows_read=%d", driver.tally.rows_read
                )
                break
        driver.finish()
        worker_figures = pool.finish()
    finally:
        pool.close()
    reporter.report(driver.tally)

    summary = _summary(
        driver.tally, time.monotonic() - started, pool.num_workers, worker_figures
    )
    summary.update(
        source=reader.label,
        rows_total=reader.rows_total,
        startup_s=started - starting,
        is_stopped=bool(stop is not None and stop.is_set()),
    )
    logger.info(
        "backfill finished source=%s rows=%d appended=%d rejected=%d dead_letters=%d "
        "events=%d elapsed_s=%.1f",
        reader.label,
        summary["rows_read"],
        summary["appended_commands"],
        summary["rejected_commands"],
        summary["dead_letters"],
        summary["events"],
        summary["elapsed_s"],
    )
    return summary


def backfill_config(config: JobConfig, mapping: SourceMapping | None) -> JobConfig:
    """Return ``config`` with INFINITY lifespans and the mapping's aggregate type added.

    A backfill keeps aggregates live because every command of an aggregate
    arrives within one run. The host's live-aggregate and memory bounds still
    evict the least recently used ones.
    """
    aggregates = dict(config.aggregates)
    aggregate = mapping.aggregate if mapping is not None else None
    if aggregate is not None and aggregate.aggregate_type not in aggregates:
        class_path = f"{aggregate.__module__}:{aggregate.__qualname__}"
        aggregates[aggregate.aggregate_type] = AggregateConfig(class_path=class_path)
        logger.info(
            "aggregate type added with default settings aggregate=%s class=%s",
            aggregate.aggregate_type,
            class_path,
        )
    kept_live = {
        name: dataclasses.replace(
            settings,
            after_event="infinity",
            after_command="infinity",
            after_error="infinity",
            lifespan_class="",
        )
        for name, settings in aggregates.items()
    }
    return config.replace(aggregates=kept_live)


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


@dataclass
class _Tally:
    rows_read: int = 0
    appended_commands: int = 0
    rejected_commands: int = 0
    dead_letters: int = 0
    events: int = 0
    recorded_earlier: int = 0
    resent_commands: int = 0

    @property
    def rows_done(self) -> int:
        return self.appended_commands + self.rejected_commands + self.dead_letters

    def add(self, outcome: BatchOutcome) -> None:
        self.appended_commands += outcome.appended_commands
        self.rejected_commands += outcome.rejected_commands
        self.events += outcome.events
        self.recorded_earlier += outcome.recorded_earlier


def _summary(
    tally: _Tally, elapsed_s: float, num_workers: int, worker_figures: dict[str, Any]
) -> dict[str, Any]:
    accounted = tally.rows_done
    return {
        "rows_read": tally.rows_read,
        "appended_commands": tally.appended_commands,
        "rejected_commands": tally.rejected_commands,
        "dead_letters": tally.dead_letters,
        "accounted": accounted,
        "is_accounted": accounted == tally.rows_read,
        "events": tally.events,
        "recorded_earlier": tally.recorded_earlier,
        "resent_commands": tally.resent_commands,
        "elapsed_s": elapsed_s,
        "rows_per_s": tally.rows_read / elapsed_s if elapsed_s > 0 else 0.0,
        "workers": num_workers,
        **worker_figures,
    }


class _ProgressReporter:
    def __init__(
        self, callback: ProgressCallback | None, rows_total: int | None, started: float
    ) -> None:
        self._callback = callback
        self._rows_total = rows_total
        self._started = started
        self._last = 0.0

    def maybe_report(self, tally: _Tally) -> None:
        # Called once per row: the clock is read only every 1,024 rows.
        if self._callback is None or tally.rows_read & 1023:
            return
        now = time.monotonic()
        if now - self._last >= _PROGRESS_INTERVAL_S:
            self._last = now
            self.report(tally)

    def report(self, tally: _Tally) -> None:
        if self._callback is None:
            return
        elapsed = time.monotonic() - self._started
        self._callback(
            {
                "rows_read": tally.rows_read,
                "rows_done": tally.rows_done,
                "rows_total": self._rows_total,
                "elapsed_s": elapsed,
                "rows_per_s": tally.rows_done / elapsed if elapsed > 0 else 0.0,
            }
        )


# -- the driver -----------------------------------------------------------------


class _Driver:
    """Route commands to workers by shard, in row order, with batches in flight bounded.

    The results of one worker's batches are taken in the order sent. When a
    batch fails, the host fences the batches sent after it (same sender
    epoch), or they are lost with the worker. So the commands not executed
    are gathered in order and sent again, with backoff and a higher epoch,
    before anything newer.
    """

    def __init__(
        self,
        pool: _Pool,
        config: JobConfig,
        batch_commands: int,
        max_batches_in_flight: int,
    ) -> None:
        self.tally = _Tally()
        self._pool = pool
        self._batch_commands = batch_commands
        self._max_in_flight = max_batches_in_flight
        self._backoff_initial_s = config.kafka.retry_backoff_initial_s
        self._backoff_max_s = config.kafka.retry_backoff_max_s
        self._buffers: list[list[BatchItem]] = [[] for _ in range(pool.num_workers)]
        self._in_flight: list[deque[tuple[Any, list[BatchItem]]]] = [
            deque() for _ in range(pool.num_workers)
        ]
        self._dead_letters: list[DeadLetter] = []
        self._database_url = config.store.database_url
        self._events: EventStore | None = None

    def add(self, entry: BatchItem | DeadLetter) -> None:
        self.tally.rows_read += 1
        if not isinstance(entry, BatchItem):
            self._dead_letters.append(entry)
            if len(self._dead_letters) >= _DEAD_LETTER_BATCH:
                self._flush_dead_letters()
            return
        worker = self._pool.worker_of(entry)
        buffer = self._buffers[worker]
        buffer.append(entry)
        if len(buffer) >= self._batch_commands:
            self._send(worker)

    def finish(self) -> None:
        """Send what is buffered and wait until every command is durable."""
        for worker in range(self._pool.num_workers):
            if self._buffers[worker]:
                self._send(worker)
        for worker in range(self._pool.num_workers):
            while self._in_flight[worker]:
                self._settle_oldest(worker)
        self._flush_dead_letters()
        if self._events is not None:
            self._events.close()

    def _send(self, worker: int) -> None:
        items = self._buffers[worker]
        self._buffers[worker] = []
        self._settle_finished()
        while len(self._in_flight[worker]) >= self._max_in_flight:
            self._settle_oldest(worker)
        self._in_flight[worker].append((self._pool.submit(worker, items), items))

    def _settle_finished(self) -> None:
        """Take in the results that have arrived, so progress moves without waiting."""
        for worker in range(self._pool.num_workers):
            in_flight = self._in_flight[worker]
            while in_flight and self._pool.is_ready(in_flight[0][0]):
                self._settle_oldest(worker)

    def _settle_oldest(self, worker: int) -> None:
        handle, items = self._in_flight[worker].popleft()
        outcome = self._pool.result(worker, handle, len(items))
        self.tally.add(outcome)
        if outcome.retry:
            pending = [items[index] for index in outcome.retry]
            self._resend(worker, pending, outcome.reason or "unknown failure")

    def _resend(self, worker: int, pending: list[BatchItem], reason: str) -> None:
        in_flight = self._in_flight[worker]
        while in_flight:
            handle, items = in_flight.popleft()
            outcome = self._pool.result(worker, handle, len(items))
            self.tally.add(outcome)
            pending.extend(items[index] for index in outcome.retry)

        for attempt, delay_s in enumerate(self._backoff_delays(), start=1):
            logger.warning(
                "batch failed, resending worker=%d attempt=%d commands=%d reason=%s",
                worker,
                attempt,
                len(pending),
                reason,
            )
            time.sleep(delay_s)
            self._pool.raise_epoch(worker)
            self.tally.resent_commands += len(pending)
            handle = self._pool.submit(worker, pending)
            outcome = self._pool.result(worker, handle, len(pending))
            self.tally.add(outcome)
            pending = [pending[index] for index in outcome.retry]
            if not pending:
                return
            reason = outcome.reason or reason
        msg = (
            f"{len(pending)} commands of worker {worker} are still not durable "
            f"after {MAX_RETRY_ATTEMPTS} attempts, the last failing with: {reason}. "
            "Fix the cause and run the backfill again, which skips the commands "
            "already recorded"
        )
        raise BackfillError(msg)

    def _flush_dead_letters(self) -> None:
        from store.errors import StoreUnavailableError
        from store.event_store import EventStore

        if not self._dead_letters:
            return
        for attempt, delay_s in enumerate(self._backoff_delays(), start=1):
            try:
                if self._events is None:
                    self._events = EventStore(self._database_url)
                self._events.record_dead_letters(self._dead_letters)
                break
            except StoreUnavailableError as error:
                if attempt == MAX_RETRY_ATTEMPTS:
                    msg = (
                        f"{len(self._dead_letters)} dead letters could not be stored "
                        f"after {MAX_RETRY_ATTEMPTS} attempts: {error}. Fix the cause "
                        "and run the backfill again"
                    )
                    raise BackfillError(msg) from error
                logger.warning(
                    "dead letters not stored, retrying attempt=%d error=%s",
                    attempt,
                    error,
                )
                time.sleep(delay_s)
        self.tally.dead_letters += len(self._dead_letters)
        self._dead_letters = []

    def _backoff_delays(self) -> Iterator[float]:
        """Yield MAX_RETRY_ATTEMPTS waits, doubling from the configured first one."""
        delay_s = self._backoff_initial_s
        for _ in range(MAX_RETRY_ATTEMPTS):
            yield delay_s
            delay_s = min(max(delay_s * 2, 0.05), self._backoff_max_s)


# -- workers --------------------------------------------------------------------


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


class _Pool:
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


class _LocalPool(_Pool):
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


class _RayPool(_Pool):
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


def _start_pool(config: JobConfig, workers: int | None) -> _Pool:
    if workers is not None and workers < 0:
        msg = f"workers must be at least 0, got {workers}"
        raise ValueError(msg)
    if workers == 0:
        return _LocalPool(config)
    num_workers = _num_workers(config, workers)
    return _RayPool(config, min(num_workers, config.hosts.num_shards))


def _num_workers(config: JobConfig, workers: int | None) -> int:
    """Start Ray if needed; return ``workers``, or the CPUs Ray reports (at least 1)."""
    import ray

    from pipeline.runtime import init_ray

    init_ray(config.ray)
    if workers is not None:
        return workers
    num_cpus = ray.cluster_resources().get("CPU", 1)  # type: ignore[no-untyped-call]
    return max(1, int(num_cpus))


# -- rebuilding snapshots -------------------------------------------------------


def rebuild_snapshots(
    config: JobConfig,
    aggregate_type: str,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Write a snapshot at the configured snapshot_version of every aggregate of a type.

    Each aggregate is loaded with that snapshot_version, so snapshots of other
    versions are ignored and its whole stream is replayed (a snapshot already
    at the new version is used). The new snapshot replaces the others. The ids
    are split into chunks run as Ray tasks, at most ``workers`` at a time
    (default: the CPUs Ray reports); 0 runs everything in this process.
    ``progress`` receives aggregates_done, elapsed_s and aggregates_per_s.

    Returns aggregates, written, already_current (a snapshot of that stream
    version existed), failed, events_replayed, snapshot_version, elapsed_s
    and workers (0 in this process).
    Raises ConfigError when the type is not configured.
    """
    from store.event_store import EventStore

    settings = config.aggregates.get(aggregate_type)
    if settings is None:
        known = ", ".join(sorted(config.aggregates))
        msg = (
            f"aggregate type {aggregate_type!r} is not configured; configured: {known}"
        )
        raise ConfigError(msg)
    if workers is not None and workers < 0:
        msg = f"workers must be at least 0, got {workers}"
        raise ValueError(msg)

    run: RebuildRunner
    if workers == 0:
        num_tasks, run = 0, _local_rebuild
    else:
        num_tasks = _num_workers(config, workers)
        run = _ray_rebuild(num_tasks)
    started = time.monotonic()
    totals: Counter[str] = Counter()
    events = EventStore(config.store.database_url)
    try:
        ids = events.iter_aggregate_ids(aggregate_type, page_size=_REBUILD_CHUNK_IDS)
        for figures in run(config, aggregate_type, _chunks(ids, _REBUILD_CHUNK_IDS)):
            totals.update(figures)
            if progress is not None:
                elapsed = time.monotonic() - started
                progress(
                    {
                        "aggregates_done": totals["aggregates"],
                        "elapsed_s": elapsed,
                        "aggregates_per_s": totals["aggregates"] / elapsed
                        if elapsed
                        else 0.0,
                    }
                )
    finally:
        events.close()

    elapsed = time.monotonic() - started
    summary = {
        "aggregate_type": aggregate_type,
        "snapshot_version": settings.snapshot_version,
        "aggregates": totals["aggregates"],
        "written": totals["written"],
        "already_current": totals["already_current"],
        "failed": totals["failed"],
        "events_replayed": totals["events_replayed"],
        "elapsed_s": elapsed,
        "workers": num_tasks,
    }
    logger.info(
        "snapshots rebuilt aggregate=%s snapshot_version=%d aggregates=%d "
        "written=%d failed=%d",
        aggregate_type,
        settings.snapshot_version,
        summary["aggregates"],
        summary["written"],
        summary["failed"],
    )
    return summary


RebuildRunner = Callable[
    [JobConfig, str, Iterator[list[str]]], Iterator[dict[str, int]]
]


def _local_rebuild(
    config: JobConfig, aggregate_type: str, chunks: Iterator[list[str]]
) -> Iterator[dict[str, int]]:
    for chunk in chunks:
        yield rebuild_chunk(config, aggregate_type, chunk)


def _ray_rebuild(num_tasks: int) -> RebuildRunner:
    import ray

    task = ray.remote(num_cpus=1)(rebuild_chunk)

    def run(
        config: JobConfig, aggregate_type: str, chunks: Iterator[list[str]]
    ) -> Iterator[dict[str, int]]:
        config_ref = ray.put(config)
        in_flight: list[Any] = []
        for chunk in chunks:
            if len(in_flight) >= num_tasks:
                done, in_flight = ray.wait(in_flight, num_returns=1)
                yield ray.get(done[0])
            in_flight.append(task.remote(config_ref, aggregate_type, chunk))
        while in_flight:
            done, in_flight = ray.wait(in_flight, num_returns=1)
            yield ray.get(done[0])

    return run


def rebuild_chunk(
    config: JobConfig, aggregate_type: str, aggregate_ids: list[str]
) -> dict[str, int]:
    """Load each aggregate by full replay and save its snapshot; return the counts.

    An aggregate whose events cannot be applied (an applier raises) is counted
    as failed and logged; the others go on.
    """
    from pipeline.registry import AggregateRegistry
    from store.event_store import EventStore
    from store.loading import load_aggregate, snapshot_of
    from store.snapshot_store import SnapshotStore

    spec = AggregateRegistry.from_config(config.aggregates).get(aggregate_type)
    version = spec.snapshot_policy.snapshot_version
    events = EventStore(config.store.database_url, pool_size=1)
    snapshots = SnapshotStore(
        config.store.snapshot_url,
        config.store.snapshot_storage_options,
        config.store.snapshot_compression or None,
    )
    counts = Counter(
        {
            "aggregates": 0,
            "written": 0,
            "already_current": 0,
            "failed": 0,
            "events_replayed": 0,
        }
    )
    try:
        for aggregate_id in aggregate_ids:
            counts["aggregates"] += 1
            try:
                loaded = load_aggregate(
                    spec.cls,
                    aggregate_id,
                    events,
                    snapshots,
                    page_size=config.store.page_size,
                    snapshot_version=version,
                )
            except Exception:
                # Aggregate code that cannot fold its own stream fails this one only.
                logger.exception(
                    "aggregate cannot be loaded aggregate=%s/%s",
                    aggregate_type,
                    aggregate_id,
                )
                counts["failed"] += 1
                continue
            counts["events_replayed"] += loaded.events_replayed
            if snapshots.save(snapshot_of(loaded.aggregate, version)):
                counts["written"] += 1
            else:
                counts["already_current"] += 1
    finally:
        events.close()
    return dict(counts)


def _chunks(values: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for value in values:
        chunk.append(value)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- plain loop, for comparison -------------------------------------------------


def run_plain_loop(
    config: JobConfig,
    source: str | os.PathLike[str] | None,
    mapping: str | SourceMapping = "shop",
    limit: int | None = None,
    batch_commands: int = DEFAULT_BATCH_COMMANDS,
) -> dict[str, Any]:
    """Run a file through one AggregateHost in this process with no driver or Ray.

    A baseline for the backfill's throughput: read, validate, execute in
    batches, record dead letters. Returns rows_read, appended_commands,
    rejected_commands, dead_letters, elapsed_s and rows_per_s.
    """
    from pipeline.aggregate_host import AggregateHost
    from pipeline.registry import AggregateRegistry
    from pipeline.sources import resolve_mapping
    from store.event_store import EventStore

    resolved = resolve_mapping(mapping)
    config = backfill_config(config, resolved)
    registry = AggregateRegistry.from_config(config.aggregates)
    reader = FileSource(source, resolved, registry, limit, DEFAULT_CHUNK_ROWS)
    host = AggregateHost(
        "plain", config, range(config.hosts.num_shards), start_idle_thread=False
    )
    events = EventStore(config.store.database_url)
    statuses: Counter[str] = Counter()
    started = time.monotonic()
    items: list[BatchItem] = []
    dead_letters = []
    num_rows = 0
    for entry in reader:
        num_rows += 1
        if isinstance(entry, BatchItem):
            items.append(entry)
        else:
            dead_letters.append(entry)
        if len(items) >= batch_commands:
            statuses.update(
                r.status
                for r in host.execute_batch(BatchRequest("plain", 0, items)).results
            )
            items = []
    if items:
        statuses.update(
            r.status
            for r in host.execute_batch(BatchRequest("plain", 0, items)).results
        )
    events.record_dead_letters(dead_letters)
    elapsed = time.monotonic() - started
    host.shutdown()
    events.close()
    return {
        "rows_read": num_rows,
        "appended_commands": statuses[APPENDED],
        "rejected_commands": statuses[REJECTED],
        "duplicates": statuses[DUPLICATE],
        "dead_letters": len(dead_letters),
        "elapsed_s": elapsed,
        "rows_per_s": num_rows / elapsed if elapsed > 0 else 0.0,
    }


# -- command line ---------------------------------------------------------------


def register(commands: Any) -> None:
    """Add the ``backfill`` and ``rebuild-snapshots`` subcommands to the CLI."""
    backfill = commands.add_parser(
        "backfill",
        help="run commands from a file or a Kafka offset range through the aggregates",
        description="Run every row of a JSON-lines, CSV or Parquet file, or every "
        "record "
        "of a Kafka topic range, as a command, over Ray workers split by aggregate id. "
        "Running it again after an interruption finishes the work: commands already "
        "recorded are skipped.",
    )
    inputs = backfill.add_mutually_exclusive_group(required=True)
    inputs.add_argument(
        "--input",
        metavar="FILE",
        help="JSON-lines (.jsonl, .json, .ndjson), CSV or Parquet file",
    )
    inputs.add_argument(
        "--topic", metavar="TOPIC", help="Kafka topic to read a range of"
    )
    backfill.add_argument(
        "--mapping",
        metavar="NAME",
        help="row-to-command mapping for --input: flights, retail, shop, "
        "or 'module:function' (default: shop, rows that already are commands)",
    )
    backfill.add_argument("--config", metavar="FILE", help="TOML configuration file")
    backfill.add_argument(
        "--limit", type=int, metavar="N", help="read only the first N rows or records"
    )
    backfill.add_argument(
        "--chunk-rows",
        type=int,
        default=DEFAULT_CHUNK_ROWS,
        metavar="N",
        help="rows read from CSV or Parquet at a time (default: %(default)s)",
    )
    backfill.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker actors (default: the CPUs Ray reports; 0 runs in this "
        "process without Ray)",
    )
    backfill.add_argument(
        "--batch-commands",
        type=int,
        default=DEFAULT_BATCH_COMMANDS,
        metavar="N",
        help="commands per batch sent to a worker (default: %(default)s)",
    )
    backfill.add_argument(
        "--max-batches-in-flight",
        type=int,
        default=DEFAULT_MAX_BATCHES_IN_FLIGHT,
        metavar="N",
        help="batches sent to a worker and not yet finished before reading "
        "waits (default: %(default)s)",
    )
    kafka = backfill.add_argument_group("Kafka range (with --topic)")
    kafka.add_argument(
        "--bootstrap-servers",
        metavar="HOST:PORT",
        help="Kafka bootstrap servers (default: kafka.bootstrap_servers)",
    )
    kafka.add_argument(
        "--partitions", metavar="LIST", help="comma-separated partitions (default: all)"
    )
    kafka.add_argument(
        "--from-offset", type=int, metavar="N", help="first offset read, per partition"
    )
    kafka.add_argument(
        "--to-offset",
        type=int,
        metavar="M",
        help="first offset not read, per partition",
    )
    kafka.add_argument(
        "--from-timestamp",
        metavar="ISO",
        help="start each partition at its first record stamped at or after this "
        "time (ISO 8601; UTC without an offset)",
    )
    kafka.add_argument(
        "--to-timestamp",
        metavar="ISO",
        help="stop each partition at its first record stamped at or after this time",
    )
    kafka.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT_S,
        metavar="SECONDS",
        help="a partition with an open end is done after this long without "
        "records (default: %(default)s)",
    )
    backfill.set_defaults(handler=_backfill_command)

    rebuild = commands.add_parser(
        "rebuild-snapshots",
        help="write fresh snapshots of every aggregate of a type at its "
        "snapshot_version",
    )
    rebuild.add_argument(
        "--aggregate", required=True, metavar="TYPE", help="aggregate type, e.g. Shop"
    )
    rebuild.add_argument("--config", metavar="FILE", help="TOML configuration file")
    rebuild.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="Ray tasks at once (default: the CPUs Ray reports; 0 runs in this "
        "process)",
    )
    rebuild.set_defaults(handler=_rebuild_command)


def _backfill_command(args: argparse.Namespace) -> int:
    from kafka.errors import KafkaError

    from pipeline.cli import load_job_config, output, stop_on_signals
    from pipeline.logs import configure_logging

    config = load_job_config(args)
    configure_logging("driver", config.log_level)
    try:
        source = _source_from_args(args, config)
    except ValueError as error:
        output(f"raysource backfill: {error}")
        return 2
    stop = stop_on_signals()
    try:
        summary = run_backfill(
            config,
            source,
            args.mapping or "shop",
            args.limit,
            args.workers,
            progress_printer(),
            chunk_rows=args.chunk_rows,
            batch_commands=args.batch_commands,
            max_batches_in_flight=args.max_batches_in_flight,
            stop=stop,
        )
    except (BackfillError, FileNotFoundError, ValueError, KafkaError) as error:
        output(f"\nraysource backfill: {error}")
        return 1
    for line in format_summary(summary):
        output(line)
    if summary["is_stopped"]:
        return 130
    return 0 if summary["is_accounted"] else 1


def _source_from_args(args: argparse.Namespace, config: JobConfig) -> str | TopicRange:
    kafka_options = (
        "bootstrap_servers",
        "partitions",
        "from_offset",
        "to_offset",
        "from_timestamp",
        "to_timestamp",
    )
    if args.input is not None:
        kafka_flags = [
            f"--{name.replace('_', '-')}"
            for name in kafka_options
            if getattr(args, name) is not None
        ]
        if kafka_flags:
            msg = f"{', '.join(kafka_flags)} apply to --topic only, not --input"
            raise ValueError(msg)
        return str(args.input)
    if args.mapping is not None:
        msg = (
            "--mapping applies to --input only: topic records are decoded as JSON "
            "or by kafka.decoder"
        )
        raise ValueError(msg)
    partitions = None
    if args.partitions:
        try:
            partitions = tuple(int(p) for p in args.partitions.split(","))
        except ValueError as error:
            msg = (
                f"--partitions {args.partitions!r} is invalid: expected numbers "
                "such as 0,1,2"
            )
            raise ValueError(msg) from error
    return TopicRange(
        topic=args.topic,
        bootstrap_servers=args.bootstrap_servers or config.kafka.bootstrap_servers,
        partitions=partitions,
        from_offset=args.from_offset,
        to_offset=args.to_offset,
        from_timestamp=parse_timestamp(args.from_timestamp)
        if args.from_timestamp
        else None,
        to_timestamp=parse_timestamp(args.to_timestamp) if args.to_timestamp else None,
        idle_timeout_s=args.idle_timeout,
    )


def _rebuild_command(args: argparse.Namespace) -> int:
    from pipeline.cli import load_job_config, output
    from pipeline.logs import configure_logging

    config = load_job_config(args)
    configure_logging("driver", config.log_level)
    summary = rebuild_snapshots(
        config, args.aggregate, args.workers, progress_printer(format_rebuild_progress)
    )
    output("")
    output(
        f"snapshots of {summary['aggregate_type']} at snapshot_version "
        f"{summary['snapshot_version']}: {summary['aggregates']:,} aggregates, "
        f"{summary['written']:,} written, "
        f"{summary['already_current']:,} already current, "
        f"{summary['failed']:,} failed; {summary['events_replayed']:,} events replayed "
        f"in {summary['elapsed_s']:,.1f}s"
    )
    return 0 if summary["failed"] == 0 else 1


def progress_printer(
    format_line: Callable[[dict[str, Any]], str] | None = None,
) -> ProgressCallback:
    """Return a callback that prints progress lines made by ``format_line``.

    The default line is ``format_progress``. On a terminal the line is
    rewritten in place; otherwise one line is printed every ten seconds.
    """
    from pipeline.cli import output

    format_line = format_line or format_progress
    is_tty = sys.stdout.isatty()
    last_printed = [0.0]

    def show(state: dict[str, Any]) -> None:
        now = time.monotonic()
        if not is_tty and now - last_printed[0] < 10:
            return
        last_printed[0] = now
        line = format_line(state)
        output(f"\r{line}\033[K" if is_tty else line, end="" if is_tty else "\n")

    return show


def format_rebuild_progress(state: dict[str, Any]) -> str:
    """Return one progress line of a snapshot rebuild: aggregates done, rate, time."""
    return (
        f"{state['aggregates_done']:,} aggregates  "
        f"{state['aggregates_per_s']:,.0f}/s  {state['elapsed_s']:,.0f}s"
    )


def format_progress(state: dict[str, Any]) -> str:
    """Return one progress line: rows done (of the total), rate, time left, elapsed."""
    done, total, rate = state["rows_done"], state["rows_total"], state["rows_per_s"]
    parts = [f"{done:,} rows"]
    if total:
        left = max(total - done, 0)
        parts = [
            f"{done:,}/{total:,} rows ({100 * done / total:.0f}%)",
            f"{left / rate:,.0f}s left" if rate > 0 else "-",
        ]
    parts += [f"{rate:,.0f} rows/s", f"{state['elapsed_s']:,.0f}s"]
    return "  ".join(parts)


def format_summary(summary: dict[str, Any]) -> list[str]:
    """Return the lines of a backfill's summary: accounting, then speed and workers."""
    rows = summary["rows_read"]
    accounted = summary["accounted"]
    check = (
        "ok: every row accounted for"
        if summary["is_accounted"]
        else f"MISMATCH: {rows - accounted:,} rows unaccounted for"
    )
    lines = [
        "",
        f"backfill of {summary['source']}"
        + (" (stopped early)" if summary.get("is_stopped") else ""),
        f"  rows read            {rows:>12,}",
        f"  commands appended    {summary['appended_commands']:>12,}  "
        f"({summary['events']:,} events appended by this run)",
        f"  commands rejected    {summary['rejected_commands']:>12,}  "
        "(reasons in the commands table)",
        f"  dead letters         {summary['dead_letters']:>12,}  "
        "(reasons in the dead_letters table)",
        f"  sum                  {accounted:>12,}  ({check})",
    ]
    if summary["recorded_earlier"]:
        lines.append(
            f"  recorded earlier     {summary['recorded_earlier']:>12,}  "
            "(command ids already in the store, counted by their recorded outcome)"
        )
    if summary.get("resent_commands"):
        lines.append(f"  commands resent      {summary['resent_commands']:>12,}")
    lines += [
        f"  rows per second      {summary['rows_per_s']:>12,.0f}  "
        f"over {summary['elapsed_s']:,.1f}s",
        f"  workers              {summary['workers']:>12,}  "
        f"(restarted {summary.get('worker_restarts', 0):,})",
        f"  snapshots written    {summary.get('snapshots_written', 0):>12,}  "
        f"(failed {summary.get('snapshots_failed', 0):,})",
    ]
    return lines
