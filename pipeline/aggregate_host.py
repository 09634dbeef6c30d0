"""AggregateHost: one Ray actor holding many live aggregates.

It executes batches of commands in order, appends each batch's events in one
transaction, applies lifespans, takes snapshots off the command path, and keeps
hard bounds (live count, resident memory) whatever the lifespans return.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
import zlib
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psutil
import ray

from aggregates.aggregate import Aggregate
from aggregates.errors import DomainError, InvalidCommandError
from aggregates.lifespan import HIBERNATE, STOP, Answer, LifespanTimers, ask_lifespan
from pipeline.allocator import release_free_memory
from pipeline.config import JobConfig
from pipeline.logs import configure_logging
from pipeline.metrics import HostMetrics
from pipeline.protocol import (
    APPENDED,
    DUPLICATE,
    FAILED,
    NOT_OWNER,
    REJECTED,
    BatchItem,
    BatchRequest,
    BatchResult,
    CommandResult,
    shard_of,
)
from pipeline.registry import AggregateRegistry, AggregateSpec
from pipeline.snapshot_writer import SnapshotWriter
from store.errors import StoreUnavailableError, VersionConflictError
from store.event_store import CommandRecord, EventStore
from store.loading import load_aggregate, snapshot_of
from store.snapshot_store import SnapshotStore

logger = logging.getLogger(__name__)

Key = tuple[str, str]

# Eviction reasons, as counted in status and metrics.
EVICT_STOP = "stop"
EVICT_IDLE = "idle"
EVICT_HIBERNATE = "hibernate"
EVICT_COUNT = "count_limit"
EVICT_MEMORY = "memory_budget"
EVICT_SHARD_MOVED = "shard_moved"
EVICT_FAILED_BATCH = "failed_batch"

_BUSY_WINDOW_S = 10.0
# Share of live aggregates evicted at once when the memory budget is exceeded.
_MEMORY_EVICT_FRACTION = 0.25
# Minimum seconds between two hand-backs of free heap pages after evictions.
_RELEASE_INTERVAL_S = 5.0


@dataclass
class _Live:
    aggregate: Aggregate
    spec: AggregateSpec
    snapshot_base: int
    last_command_at: float


class _Conflict(Exception):
    """Restart the batch: another writer appended first, or a command id raced."""


class AggregateHost:
    """Host many live aggregates and execute batches of commands for them.

    Crash behaviour: everything here is a cache of the event store. A host that
    dies loses its live aggregates and nothing else; its shards go to a new
    host, which reloads aggregates from snapshots and events. Batches are safe
    to repeat: command ids already recorded are reported as duplicates.
    ``set_shards`` is idempotent. ``execute_batch`` and ``set_shards`` run one
    at a time in arrival order; ``status`` and ``top_aggregates`` run beside
    them and never change state.
    """

    def __init__(
        self,
        host_id: str,
        config: JobConfig,
        shards: Iterable[int] = (),
        clock: Callable[[], float] = time.monotonic,
        start_idle_thread: bool = True,
        metrics: HostMetrics | None = None,
    ) -> None:
        configure_logging(host_id, config.log_level)
        self.host_id = host_id
        # Records nothing unless this host runs as a Ray actor.
        self._metrics = (
            metrics
            if metrics is not None
            else HostMetrics(host_id, config.ray.namespace)
        )
        self._config = config.hosts
        self._clock = clock
        self._registry = AggregateRegistry.from_config(config.aggregates)
        self._events = EventStore(config.store.database_url)
        self._snapshots = SnapshotStore(
            config.store.snapshot_url,
            config.store.snapshot_storage_options,
            config.store.snapshot_compression or None,
        )
        self._page_size = config.store.page_size
        self._writer = SnapshotWriter(self._snapshots, self._config.snapshot_queue_size)
        self._live: OrderedDict[Key, _Live] = OrderedDict()
        self._hibernated: OrderedDict[Key, bytes] = OrderedDict()
        self._timers = LifespanTimers(clock)
        self._shards = set(shards)
        self._blocked_senders: dict[str, int] = {}
        self._poisoned: dict[str, Exception] = {}
        self._lock = threading.RLock()
        self._loader = ThreadPoolExecutor(self._config.max_concurrent_loads, "load")
        self._process = psutil.Process()
        self._started_at = time.time()
        self._last_batch_at = clock()
        self._over_budget_since: float | None = None
        self._busy: deque[tuple[float, float]] = deque()
        self.counters: Counter[str] = Counter()
        # The commands, events, rejected, duplicates and loads of ``counters``
        # again, keyed by (counter name, aggregate type).
        self.counters_by_type: Counter[tuple[str, str]] = Counter()
        self.evictions: Counter[str] = Counter()
        self._stopping = threading.Event()
        if start_idle_thread:
            threading.Thread(
                target=self._evict_idle_loop, name="idle", daemon=True
            ).start()
        logger.info(
            "host started host=%s pid=%d shards=%d",
            host_id,
            os.getpid(),
            len(self._shards),
        )

    # -- commands --------------------------------------------------------------

    def execute_batch(self, request: BatchRequest) -> BatchResult:
        """Execute the commands in order and return one result per command, in order.

        A command of a shard this host does not own gets NOT_OWNER. When the
        store is unavailable, or version conflicts outlast the retries, the
        unfinished commands get FAILED and the sender is fenced until it
        resends with a higher epoch.
        """
        started = time.perf_counter()
        with self._lock:
            self._last_batch_at = self._clock()
            results = self._execute_fenced(request)
            self._enforce_bounds()
            self._record_metrics()
        elapsed = time.perf_counter() - started
        self._record_busy(elapsed)
        self.counters["batches"] += 1
        self._metrics.record_batch(elapsed)
        logger.debug(
            "batch executed host=%s sender=%s epoch=%d commands=%d elapsed_s=%.4f",
            self.host_id,
            request.sender_id,
            request.epoch,
            len(request.items),
            elapsed,
        )
        return BatchResult(results, self.host_id, elapsed_s=elapsed)

    def set_shards(self, shards: Iterable[int]) -> int:
        """Own exactly ``shards`` from now on; drop aggregates of shards given up.

        Runs after every batch that arrived before it, which is what fences a
        shard move. Returns how many aggregates were dropped.
        """
        with self._lock:
            self._shards = set(shards)
            num_shards = self._config.num_shards
            moved = [
                key
                for key in list(self._live) + list(self._hibernated)
                if shard_of(key[0], key[1], num_shards) not in self._shards
            ]
            for key in moved:
                self._evict(key, EVICT_SHARD_MOVED)
        logger.info(
            "shards set host=%s shards=%d dropped=%d",
            self.host_id,
            len(self._shards),
            len(moved),
        )
        return len(moved)

    def _execute_fenced(self, request: BatchRequest) -> list[CommandResult]:
        results: list[CommandResult | None] = [None] * len(request.items)
        blocked_epoch = self._blocked_senders.get(request.sender_id)
        if blocked_epoch is not None and request.epoch <= blocked_epoch:
            reason = (
                "an earlier batch from this sender failed; resend with a higher epoch"
            )
            return [
                CommandResult(i.command.command_id, FAILED, reason=reason)
                for i in request.items
            ]
        self._blocked_senders.pop(request.sender_id, None)

        owned = []
        num_shards = self._config.num_shards
        for index, item in enumerate(request.items):
            command = item.command
            if (
                shard_of(item.aggregate_type, command.aggregate_id, num_shards)
                in self._shards
            ):
                owned.append(index)
            else:
                results[index] = CommandResult(command.command_id, NOT_OWNER)

        self._poisoned = {}
        reason = self._execute_with_retries(request.items, owned, results)
        if reason is not None:
            self._blocked_senders[request.sender_id] = request.epoch
            for index in owned:
                if results[index] is None:
                    results[index] = CommandResult(
                        request.items[index].command.command_id, FAILED, reason=reason
                    )
        return [r for r in results if r is not None]

    def _execute_with_retries(
        self,
        items: list[BatchItem],
        owned: list[int],
        results: list[CommandResult | None],
    ) -> str | None:
        for attempt in range(self._config.max_conflict_retries + 1):
            touched: set[Key] = set()
            try:
                self._execute_once(items, owned, results, touched)
                return None
            except (VersionConflictError, _Conflict) as error:
                self.counters["version_conflicts"] += 1
                self._drop_all(touched)
                logger.info(
                    "version conflict, reloading host=%s attempt=%d error=%s",
                    self.host_id,
                    attempt + 1,
                    error,
                )
                reason = (
                    "version conflicts outlasted "
                    f"{self._config.max_conflict_retries} retries"
                )
            except StoreUnavailableError as error:
                self.counters["store_failures"] += 1
                self._drop_all(touched)
                # One line without the traceback: the chained driver error can
                # hold the statement's parameters, which are command payloads.
                # The message names the store with its password masked.
                logger.warning(
                    "batch failed, store unavailable host=%s error=%s",
                    self.host_id,
                    error,
                )
                return f"store unavailable: {error}"
        return reason

    def _execute_once(
        self,
        items: list[BatchItem],
        owned: list[int],
        results: list[CommandResult | None],
        touched: set[Key],
    ) -> None:
        known = self._events.find_commands(items[i].command.command_id for i in owned)
        pending, seen = [], set(known)
        duplicates: Counter[str] = Counter()
        for index in owned:
            command_id = items[index].command.command_id
            if command_id in seen:
                results[index] = CommandResult(command_id, DUPLICATE)
                duplicates[items[index].aggregate_type] += 1
            else:
                seen.add(command_id)
                pending.append(index)
        self._ensure_live(
            {(items[i].aggregate_type, items[i].command.aggregate_id) for i in pending}
        )

        records, answers = [], {}
        for index in pending:
            record, answer = self._execute_command(items[index], touched)
            records.append(record)
            answers[(record.aggregate_type, record.aggregate_id)] = answer
        if records:
            appended = self._events.append(records)
            if appended.duplicates:
                msg = f"{len(appended.duplicates)} command ids were recorded meanwhile"
                raise _Conflict(msg)

        for index, record in zip(pending, records, strict=True):
            results[index] = _result_of(record)
        self._count(records, duplicates)
        for key, answer in answers.items():
            self._after_durable(key, answer)

    def _execute_command(
        self, item: BatchItem, touched: set[Key]
    ) -> tuple[CommandRecord, Answer]:
        command = item.command
        key = (item.aggregate_type, command.aggregate_id)
        live = self._live[key]
        live.last_command_at = self._clock()
        self._live.move_to_end(key)
        touched.add(key)
        aggregate = live.aggregate
        version = aggregate.version
        events: list[Any] = []
        error = self._poisoned.get(command.command_id)
        if error is None:
            try:
                events = aggregate.execute(command)
            except (DomainError, InvalidCommandError) as rejection:
                error = rejection
            except Exception as failure:
                # A bug in aggregate code fails this command only.
                logger.exception(
                    "aggregate code raised aggregate=%s/%s command=%s",
                    key[0],
                    key[1],
                    command.command_id,
                )
                error = failure
        if error is None:
            try:
                for event in events:
                    aggregate.apply(event)
            except Exception as failure:
                # The state may be half applied: reject the command and restart
                # the batch from the store so that no later command reads that state.
                logger.exception(
                    "applying an event raised aggregate=%s/%s command=%s",
                    key[0],
                    key[1],
                    command.command_id,
                )
                self._poisoned[command.command_id] = failure
                msg = f"command {command.command_id} could not be applied"
                raise _Conflict(msg) from failure
        if error is not None:
            record = CommandRecord(
                command.command_id, key[0], key[1], version, (), _reason(error)
            )
            return record, ask_lifespan(live.spec.lifespan, [], command, error)
        record = CommandRecord(command.command_id, key[0], key[1], version, events)
        return record, ask_lifespan(live.spec.lifespan, events, command, None)

    # -- lifespans, snapshots, bounds ---------------------------------------------

    def _after_durable(self, key: Key, answer: Answer) -> None:
        live = self._live.get(key)
        if live is None:
            return
        if answer is STOP:
            self._evict(key, EVICT_STOP)
        elif answer is HIBERNATE:
            self._evict(key, EVICT_HIBERNATE)
        else:
            self._maybe_snapshot(live)
            self._timers.record(key, answer)

    def _maybe_snapshot(self, live: _Live) -> None:
        policy = live.spec.snapshot_policy
        aggregate = live.aggregate
        if not policy.is_due(live.snapshot_base, aggregate.version):
            return
        snapshot = snapshot_of(aggregate, policy.snapshot_version)
        self._writer.submit(snapshot, self._snapshots.encode(snapshot))
        live.snapshot_base = aggregate.version

    def _evict(self, key: Key, reason: str) -> None:
        """Remove a durable aggregate from memory.

        The aggregate is snapshotted first if a snapshot is due.
        """
        self._timers.forget(key)
        live = self._live.pop(key, None)
        if live is None:
            if self._hibernated.pop(key, None) is not None:
                self.evictions[reason] += 1
            return
        self._maybe_snapshot(live)
        if reason == EVICT_HIBERNATE:
            self._hibernated[key] = _hibernate(live)
        self.evictions[reason] += 1

    def _drop(self, key: Key) -> None:
        """Forget an aggregate whose state may be ahead of the store; no snapshot."""
        self._timers.forget(key)
        if self._live.pop(key, None) is not None:
            self.evictions[EVICT_FAILED_BATCH] += 1

    def _drop_all(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self._drop(key)

    def _enforce_bounds(self) -> None:
        while len(self._live) > self._config.max_live_aggregates:
            self._evict(next(iter(self._live)), EVICT_COUNT)
        while len(self._hibernated) > self._config.max_hibernated_aggregates:
            self._hibernated.popitem(last=False)
            self.evictions[EVICT_COUNT] += 1
        rss = self._process.memory_info().rss
        if rss <= self._config.memory_budget_bytes:
            self._over_budget_since = None
            return
        num_evict = max(1, int(len(self._live) * _MEMORY_EVICT_FRACTION))
        for key in list(self._live)[:num_evict]:
            self._evict(key, EVICT_MEMORY)
        self._hibernated.clear()
        gc.collect()
        release_free_memory()
        if self._over_budget_since is None:
            self._over_budget_since = time.time()
            logger.warning(
                "host over memory budget, evicted least recently used host=%s rss=%d "
                "budget=%d evicted=%d; the controller recycles the host if it stays "
                "over for recycle_after_s=%.0f",
                self.host_id,
                rss,
                self._config.memory_budget_bytes,
                num_evict,
                self._config.recycle_after_s,
            )

    def _evict_idle_loop(self) -> None:
        evictions_at_last_release = 0
        last_release = time.monotonic()
        while not self._stopping.wait(self._config.idle_check_interval_s):
            self.evict_idle()
            # The allocator keeps the pages of evicted aggregates mapped, so
            # resident memory stays at its peak unless they are handed back.
            # A release walks the heap (about 20 ms for 100 MiB, measured on
            # one machine) under the allocator's locks, so it runs seldom.
            evictions = self.evictions.total()
            now = time.monotonic()
            if (
                evictions != evictions_at_last_release
                and now - last_release >= _RELEASE_INTERVAL_S
            ):
                evictions_at_last_release = evictions
                last_release = now
                release_free_memory()

    def evict_idle(self) -> int:
        """Evict every aggregate whose idle timeout has passed; return how many."""
        with self._lock:
            expired = self._timers.pop_expired()
            for key in expired:
                self._evict(key, EVICT_IDLE)  # type: ignore[arg-type]
            self._record_metrics()
        return len(expired)

    # -- loading ---------------------------------------------------------------

    def _ensure_live(self, keys: set[Key]) -> None:
        missing = [key for key in keys if key not in self._live]
        restored = [key for key in missing if key in self._hibernated]
        for key in restored:
            self._live[key] = self._restore(key, self._hibernated.pop(key))
        to_load = [key for key in missing if key not in self._live]
        if not to_load:
            return
        # One query finds the streams that do not exist yet; those aggregates
        # start empty without a snapshot lookup or an event read each.
        versions = self._events.stream_versions(to_load)
        for key in [key for key in to_load if not versions.get(key)]:
            spec = self._registry.get(key[0])
            self._live[key] = _Live(spec.cls(key[1]), spec, 0, self._clock())
            self.counters["new_aggregates"] += 1
        to_load = [key for key in to_load if versions.get(key)]
        if not to_load:
            return
        # Counted here, in the batch's thread, rather than in the loader threads.
        for key, (live, events_replayed) in zip(
            to_load, self._loader.map(self._load, to_load), strict=True
        ):
            self._live[key] = live
            self.counters["loads"] += 1
            self.counters["events_replayed"] += events_replayed
            self.counters_by_type[("loads", key[0])] += 1
            self._metrics.record_load(key[0], events_replayed)

    def _load(self, key: Key) -> tuple[_Live, int]:
        spec = self._registry.get(key[0])
        loaded = load_aggregate(
            spec.cls,
            key[1],
            self._events,
            self._snapshots,
            page_size=self._page_size,
            snapshot_version=spec.snapshot_policy.snapshot_version,
        )
        logger.debug(
            "aggregate loaded host=%s aggregate=%s/%s version=%d snapshot_base=%d "
            "events_replayed=%d",
            self.host_id,
            key[0],
            key[1],
            loaded.aggregate.version,
            loaded.snapshot_base,
            loaded.events_replayed,
        )
        live = _Live(loaded.aggregate, spec, loaded.snapshot_base, self._clock())
        return live, loaded.events_replayed

    def _restore(self, key: Key, data: bytes) -> _Live:
        spec = self._registry.get(key[0])
        document = json.loads(zlib.decompress(data))
        aggregate = spec.cls.from_snapshot(
            key[1], document["version"], document["state"]
        )
        self.counters["restores"] += 1
        return _Live(aggregate, spec, document["base"], self._clock())

    # -- status ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Return counters and gauges of this host; reads only, changes nothing."""
        now = self._clock()
        return {
            "host_id": self.host_id,
            "pid": os.getpid(),
            "node_id": _node_id(),
            "started_at": self._started_at,
            "rss_bytes": self._process.memory_info().rss,
            "memory_budget_bytes": self._config.memory_budget_bytes,
            "over_budget_since": self._over_budget_since,
            "live_aggregates": len(self._live),
            "live_by_type": dict(Counter(key[0] for key in list(self._live))),
            "hibernated_aggregates": len(self._hibernated),
            "num_shards": len(self._shards),
            "idle_s": now - self._last_batch_at,
            "busy_fraction": self._busy_fraction(),
            "counters": dict(self.counters),
            "counters_by_type": _by_type(self.counters_by_type),
            "evictions": dict(self.evictions),
            "snapshots_written": self._writer.num_written,
            "snapshots_failed": self._writer.num_failed,
            "snapshots_skipped": self._writer.num_skipped,
            "snapshots_queued": self._writer.num_queued,
        }

    def top_aggregates(
        self, limit: int = 10, sample: int = 2000
    ) -> list[dict[str, Any]]:
        """Return the live aggregates holding the most memory, largest first.

        Sizes are estimates (a recursive sys.getsizeof of the state). Only the
        ``sample`` most recently used aggregates are measured, so on a host with
        more live aggregates a larger, older one can be missed.
        """
        now = self._clock()
        candidates = list(self._live.items())[-sample:]
        rows = []
        for key, live in candidates:
            rows.append(
                {
                    "aggregate_type": key[0],
                    "aggregate_id": key[1],
                    "version": live.aggregate.version,
                    "estimated_bytes": _deep_size(live.aggregate.__dict__),
                    "idle_s": now - live.last_command_at,
                }
            )
        rows.sort(key=lambda row: row["estimated_bytes"], reverse=True)
        return rows[:limit]

    def flush_snapshots(self, timeout_s: float = 30.0) -> bool:
        """Wait until queued snapshots are written; return whether the queue emptied."""
        return self._writer.flush(timeout_s)

    def shutdown(self) -> None:
        """Write queued snapshots and stop background threads."""
        self._stopping.set()
        self._writer.close()
        self._loader.shutdown(wait=False)
        self._events.close()
        logger.info("host stopped host=%s", self.host_id)

    def ping(self) -> str:
        return self.host_id

    def _record_busy(self, elapsed: float) -> None:
        now = time.monotonic()
        self._busy.append((now, elapsed))
        while self._busy and self._busy[0][0] < now - _BUSY_WINDOW_S:
            self._busy.popleft()

    def _busy_fraction(self) -> float:
        now = time.monotonic()
        busy = sum(
            elapsed
            for ended, elapsed in list(self._busy)
            if ended >= now - _BUSY_WINDOW_S
        )
        return min(1.0, busy / _BUSY_WINDOW_S)

    def _count(self, records: list[CommandRecord], duplicates: Counter[str]) -> None:
        tally: Counter[tuple[str, str]] = Counter()
        for record in records:
            if record.rejection is not None:
                tally[("rejected", record.aggregate_type)] += 1
            else:
                tally[("commands", record.aggregate_type)] += 1
                tally[("events", record.aggregate_type)] += len(record.events)
        for aggregate_type, count in duplicates.items():
            tally[("duplicates", aggregate_type)] += count
        for (name, aggregate_type), count in tally.items():
            self.counters[name] += count
            self.counters_by_type[(name, aggregate_type)] += count

    def _record_metrics(self) -> None:
        """Record counters as increments and, when due, the gauges.

        Call it while holding ``self._lock``.
        """
        metrics = self._metrics
        if not metrics.enabled:
            return
        writer = self._writer
        metrics.record_counts(
            self.counters_by_type, self.evictions, writer.num_written, writer.num_failed
        )
        if metrics.gauges_due():
            live_by_type = Counter(key[0] for key in self._live)
            rss = self._process.memory_info().rss
            metrics.record_gauges(live_by_type, len(self._hibernated), rss)


def _by_type(counters: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """Return ``{aggregate type: {counter name: total}}`` for status output."""
    nested: dict[str, dict[str, int]] = {}
    for (name, aggregate_type), total in list(counters.items()):
        nested.setdefault(aggregate_type, {})[name] = total
    return nested


def _result_of(record: CommandRecord) -> CommandResult:
    if record.rejection is not None:
        return CommandResult(record.command_id, REJECTED, reason=record.rejection)
    first = record.expected_version + 1 if record.events else 0
    last = record.expected_version + len(record.events)
    return CommandResult(record.command_id, APPENDED, first, last)


def _reason(error: Exception) -> str:
    if isinstance(error, (DomainError, InvalidCommandError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _hibernate(live: _Live) -> bytes:
    document = {
        "version": live.aggregate.version,
        "base": live.snapshot_base,
        "state": live.aggregate.snapshot_state(),
    }
    return zlib.compress(json.dumps(document, separators=(",", ":")).encode(), 1)


def _deep_size(value: Any, depth: int = 0) -> int:
    import sys

    size = sys.getsizeof(value)
    if depth > 6:
        return size
    if isinstance(value, dict):
        for k, v in value.items():
            size += _deep_size(k, depth + 1) + _deep_size(v, depth + 1)
    elif isinstance(value, (list, tuple, set)):
        for v in value:
            size += _deep_size(v, depth + 1)
    return size


def _node_id() -> str | None:
    # Outside Ray (a host built directly in a test) there is no node, and
    # asking the runtime context would start a local Ray instance.
    if not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


# The actor: batches and shard changes in the default group (one at a time, in
# arrival order); read-only calls in their own group so they return during a batch.
for _name in ("status", "top_aggregates", "ping", "flush_snapshots"):
    setattr(
        AggregateHost,
        _name,
        ray.method(concurrency_group="status")(getattr(AggregateHost, _name)),
    )

AggregateHostActor = ray.remote(concurrency_groups={"status": 2})(AggregateHost)
