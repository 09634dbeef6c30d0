"""KafkaIngestor: consume commands from Kafka and send them to hosts in batches.

One ingestor is one member of the job's consumer group. It polls records,
decodes them (``pipeline.decoding``), groups the commands by the host that owns
their shard (``pipeline.dispatch.Router``) and sends each host batches with
``execute_batch``, keeping at most ``kafka.max_batches_in_flight_per_host``
batches in flight per host. An offset is committed only when every record of its
partition below it is durable (``pipeline.offsets``). Its status goes to Ray's
metrics (``pipeline.metrics``) at every commit interval. May import
``aggregates``, ``store`` and the rest of ``pipeline``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import ray
from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError, RebalanceInProgressError
from kafka.future import Future
from ray.exceptions import RayError

from pipeline.config import JobConfig
from pipeline.decoding import DecodeFailure, Decoder
from pipeline.dispatch import Router
from pipeline.logs import configure_logging
from pipeline.metrics import IngestorMetrics
from pipeline.offsets import OffsetTracker, PartitionOffsets
from pipeline.protocol import (
    APPENDED,
    DUPLICATE,
    REJECTED,
    BatchItem,
    BatchRequest,
    BatchResult,
)
from store.errors import StoreUnavailableError
from store.event_store import DeadLetter, EventStore

__all__ = ["KafkaIngestor", "KafkaIngestorActor"]

logger = logging.getLogger(__name__)

# One decoded command waiting for its outcome: read sequence number (the order
# of resends), its partition's offsets, its offset, and the command.
_Entry = tuple[int, PartitionOffsets, int, BatchItem]

_IDLE_POLL_TIMEOUT_MS = 100
_BUSY_POLL_TIMEOUT_MS = 5
_RESULT_WAIT_S = 0.05
_PRODUCER_FLUSH_TIMEOUT_S = 30.0


@dataclass
class _Flight:
    """A batch sent to a host whose results have not arrived yet."""

    ref: Any
    host_id: str
    entries: list[_Entry]


class KafkaIngestor:
    """Consume commands from Kafka and execute them on aggregate hosts, in order.

    Commands of one partition reach their host in partition order, so commands
    of one key keep their order. Memory is bounded: when the commands held
    (decoded, queued or in flight) reach ``kafka.max_commands_held``, every
    assigned partition is paused, and they resume below
    ``resume_below_fraction`` of that bound. A command that is not durable
    (FAILED, NOT_OWNER, or its host died) stops dispatching. The ingestor then
    drains the batches in flight, raises its epoch and refreshes the shard
    assignment. After a backoff it resends every command not durable, in read
    order.

    Crash behaviour: nothing here is needed to recover. Offsets are committed
    only up to durable records, so after a crash the group re-reads from the
    last commit and hosts report the commands already recorded as duplicates.
    ``status`` and ``stop`` are safe to repeat and return while ``run`` loops;
    an ingestor runs once, and ``run`` after ``stop`` returns at once.
    """

    def __init__(self, ingestor_id: str, config: JobConfig, controller: Any) -> None:
        configure_logging(ingestor_id, config.log_level)
        self.ingestor_id = ingestor_id
        self._config = config.kafka
        # Records nothing unless this ingestor runs as a Ray actor.
        self._metrics = IngestorMetrics(ingestor_id, config.ray.namespace)
        self._decoder = Decoder.from_config(config)
        self._store = EventStore(config.store.database_url)
        # The namespace lets the router find a restarted controller by name.
        self._router = Router(controller, config.ray.namespace)
        self._tracker = OffsetTracker()
        self._lock = threading.RLock()
        self._stop_requested = threading.Event()
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None

        self._queues: dict[str, deque[_Entry]] = {}
        self._in_flight: dict[str, deque[_Flight]] = {}
        self._resend: list[_Entry] = []
        self._dead_letters: list[tuple[DeadLetter, PartitionOffsets]] = []
        self._num_queued = 0
        self._num_in_flight = 0
        self._next_sequence = 0
        self._needs_recovery = False
        self._failed_hosts: set[str] = set()

        # Hosts fence a sender by epoch. Starting from the clock in milliseconds
        # keeps a restarted ingestor with the same id above its predecessor's
        # epochs, so the host does not fence it for its predecessor's failures.
        self.epoch = time.time_ns() // 1_000_000
        self._backoff_s = self._config.retry_backoff_initial_s
        self._dead_letter_backoff_s = self._config.retry_backoff_initial_s
        self._dead_letter_retry_at = 0.0
        self._next_commit_at = 0.0

        self._is_running = False
        self._is_paused = False
        self._paused: set[TopicPartition] = set()
        self._assigned: set[TopicPartition] = set()
        self._committed: dict[TopicPartition, int] = {}
        self._highwater: dict[TopicPartition, int] = {}
        self.counters: Counter[str] = Counter()
        self._max_held = 0
        self._times: dict[str, float | None] = {
            "started_at": None,
            "first_read_at": None,
            "last_read_at": None,
            "last_commit_at": None,
            "stopped_at": None,
        }

    # -- public calls ------------------------------------------------------------

    def run(self, max_idle_s: float | None = None) -> dict[str, Any]:
        """Consume and dispatch until ``stop`` is called, then shut down gracefully.

        With ``max_idle_s``, also stop after that many seconds with partitions
        assigned, nothing read, nothing held and nothing in flight. Time without
        an assignment (joining the group) does not count as idle. Returns the
        final ``status`` with ``elapsed_s`` and ``commands_per_s`` (from the
        first record read to the last commit).
        """
        with self._lock:
            if self._is_running:
                msg = f"ingestor {self.ingestor_id} is already running"
                raise RuntimeError(msg)
            self._is_running = True
        self._times["started_at"] = time.time()
        if not self._stop_requested.is_set():
            self._consumer = self._open_consumer()
            logger.info(
                "ingestor started ingestor=%s pid=%d topics=%s group=%s",
                self.ingestor_id,
                os.getpid(),
                ",".join(self._config.topics),
                self._config.group_id,
            )
            try:
                self._loop(max_idle_s)
            finally:
                self._shutdown()
        with self._lock:
            self._is_running = False
        return self._summary()

    def stop(self) -> None:
        """Ask ``run`` to stop: it drains, commits and leaves the group, and returns."""
        self._stop_requested.set()

    def status(self) -> dict[str, Any]:
        """Return counters, bounds and per-partition offsets; reads only.

        Partition keys are ``"topic:partition"``. ``lag`` is the partition's
        high watermark, as the last fetch response reported it, minus the
        offset after the last record read (or the committed offset), and None
        until a fetch response for the partition has been read. Fetch
        responses carry the true high watermark on Tansu 0.6.0 too, unlike its
        end_offsets().
        """
        with self._lock:
            positions = {
                state.partition: state.position for state in self._tracker.states()
            }
            return {
                "ingestor_id": self.ingestor_id,
                "pid": os.getpid(),
                "running": self._is_running,
                "epoch": self.epoch,
                **{name: self.counters[name] for name in _COUNTER_NAMES},
                "held_commands": self._held(),
                "max_held_commands": self._max_held,
                "max_commands_held": self._config.max_commands_held,
                "queued_commands": self._num_queued,
                "in_flight_commands": self._num_in_flight,
                "in_flight_batches": {
                    host_id: len(flights)
                    for host_id, flights in self._in_flight.items()
                    if flights
                },
                "assigned_partitions": sorted(_name(tp) for tp in self._assigned),
                "paused_partitions": sorted(_name(tp) for tp in self._paused),
                "committed_offsets": {
                    _name(tp): offset for tp, offset in self._committed.items()
                },
                "lag": _lag(positions, self._highwater, self._committed),
                **self._times,
            }

    # -- the loop ----------------------------------------------------------------

    def _loop(self, max_idle_s: float | None) -> None:
        idle_since = time.monotonic()
        while not self._stop_requested.is_set():
            num_read = self._step()
            now = time.monotonic()
            is_busy = (
                num_read or self._held() or self._num_in_flight or self._needs_recovery
            )
            if is_busy or not self._assigned:
                idle_since = now
            elif max_idle_s is not None and now - idle_since >= max_idle_s:
                logger.info(
                    "ingestor idle, stopping ingestor=%s idle_s=%.1f",
                    self.ingestor_id,
                    now - idle_since,
                )
                return

    def _step(self) -> int:
        """Run one round: collect finished batches, recover, dispatch, poll, commit."""
        self._collect(timeout_s=0.0)
        if self._needs_recovery:
            self._recover()
        self._dispatch()
        self._flush_dead_letters()
        self._apply_backpressure()

        num_read = self._ingest(self._poll())
        self._dispatch()
        if not num_read and self._num_in_flight:
            self._collect(timeout_s=_RESULT_WAIT_S)
        self._maybe_commit()
        return num_read

    def _poll(self) -> dict[TopicPartition, list[Any]]:
        assert self._consumer is not None
        room = min(
            self._config.max_poll_records, self._config.max_commands_held - self._held()
        )
        if room <= 0:
            # Every assigned partition is paused, so this poll returns nothing;
            # it still runs the group protocol (joins and rebalances).
            room = 1
        is_busy = self._held() > 0 or self._num_in_flight > 0
        timeout_ms = _BUSY_POLL_TIMEOUT_MS if is_busy else _IDLE_POLL_TIMEOUT_MS
        try:
            return self._consumer.poll(timeout_ms=timeout_ms, max_records=room)
        except KafkaError:
            logger.exception("poll failed ingestor=%s; retrying", self.ingestor_id)
            self._stop_requested.wait(self._config.retry_backoff_initial_s)
            return {}

    def _ingest(self, records: dict[TopicPartition, list[Any]]) -> int:
        """Register and decode records; queue commands by host, keep dead letters."""
        if not records:
            return 0
        decode = self._decoder.decode
        host_of = self._router.host_of
        num_read = 0
        with self._lock:
            queues = self._queues
            sequence = self._next_sequence
            for partition, batch in records.items():
                state = self._tracker.get(partition)
                if state is None:
                    # Not assigned by the listener, so nothing could commit it;
                    # the partition's owner reads these records.
                    continue
                if state.position is not None and batch[0].offset < state.position:
                    batch = self._skip_reread(state, batch)
                topic, number = partition.topic, partition.partition
                for record in batch:
                    offset = record.offset
                    state.register(offset)
                    decoded = decode(topic, number, offset, record.key, record.value)
                    if isinstance(decoded, DecodeFailure):
                        letter = DeadLetter(
                            decoded.reason,
                            record.value,
                            record.key,
                            topic,
                            number,
                            offset,
                        )
                        self._dead_letters.append((letter, state))
                        continue
                    host_id = host_of(
                        decoded.aggregate_type, decoded.command.aggregate_id
                    )
                    queue = queues.get(host_id)
                    if queue is None:
                        queue = queues[host_id] = deque()
                    sequence += 1
                    queue.append((sequence, state, offset, decoded))
                num_read += len(batch)
                if batch:
                    self._highwater_from_consumer(partition)
            self._num_queued += sequence - self._next_sequence
            self._next_sequence = sequence
            self.counters["records_read"] += num_read
            self._max_held = max(self._max_held, self._held())
        now = time.time()
        if self._times["first_read_at"] is None:
            self._times["first_read_at"] = now
        self._times["last_read_at"] = now
        return num_read

    def _skip_reread(self, state: PartitionOffsets, batch: list[Any]) -> list[Any]:
        """Drop records below the partition's position, which were read already.

        The consumer moves a position back only when it resets an offset (for
        example after an out-of-range fetch). The records read before are
        queued or durable already, so reading them again would only repeat them.
        """
        position = state.position
        assert position is not None
        kept = [record for record in batch if record.offset >= position]
        logger.warning(
            "records read again skipped ingestor=%s partition=%s from=%d to=%d",
            self.ingestor_id,
            _name(state.partition),
            batch[0].offset,
            position,
        )
        return kept

    def _dispatch(self) -> None:
        """Send queued commands to their hosts, up to the in-flight bound per host."""
        if self._needs_recovery:
            return
        max_in_flight = self._config.max_batches_in_flight_per_host
        max_batch = self._config.max_batch_commands
        with self._lock:
            for host_id, queue in self._queues.items():
                flights = self._in_flight.get(host_id)
                if flights is None:
                    flights = self._in_flight[host_id] = deque()
                while queue and len(flights) < max_in_flight:
                    entries = [
                        queue.popleft() for _ in range(min(len(queue), max_batch))
                    ]
                    request = BatchRequest(
                        self.ingestor_id, self.epoch, [entry[3] for entry in entries]
                    )
                    ref = self._router.handle(host_id).execute_batch.remote(request)
                    flights.append(_Flight(ref, host_id, entries))
                    self._num_queued -= len(entries)
                    self._num_in_flight += len(entries)
                    self.counters["batches_dispatched"] += 1
                    self.counters["commands_dispatched"] += len(entries)
                    logger.debug(
                        "batch sent ingestor=%s host=%s epoch=%d commands=%d",
                        self.ingestor_id,
                        host_id,
                        self.epoch,
                        len(entries),
                    )

    def _collect(self, timeout_s: float) -> None:
        """Handle finished batches, per host in the order they were sent.

        With ``timeout_s`` above 0, first wait that long for any batch to finish.
        """
        refs = [
            flight.ref for flights in self._in_flight.values() for flight in flights
        ]
        if not refs:
            return
        if timeout_s > 0:
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
            if not ready:
                return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        ready_refs = set(ready)
        for flights in list(self._in_flight.values()):
            while flights and flights[0].ref in ready_refs:
                with self._lock:
                    flight = flights.popleft()
                self._complete(flight)

    def _complete(self, flight: _Flight) -> None:
        """Record a batch's outcome: mark durable offsets, keep the rest to resend."""
        results = self._results_of(flight)
        with self._lock:
            self._num_in_flight -= len(flight.entries)
            failed = self._apply_results(flight.entries, results)
            if failed:
                self._resend.extend(failed)
                self._needs_recovery = True
            elif results is not None:
                self._backoff_s = self._config.retry_backoff_initial_s
        if failed and results is not None and self._is_first_failure(flight.host_id):
            first = next(r for r in results if r.status not in _DURABLE)
            logger.warning(
                "batch not durable, will resend ingestor=%s host=%s failed=%d "
                "status=%s reason=%s",
                self.ingestor_id,
                flight.host_id,
                len(failed),
                first.status,
                first.reason,
            )

    def _results_of(self, flight: _Flight) -> list[Any] | None:
        """Return a batch's results, or None if the host died or the call raised."""
        try:
            batch: BatchResult = ray.get(flight.ref)
        except RayError as error:
            # Every later batch to a dead host fails the same way, so only the
            # first failure per host and recovery round is logged in full.
            if self._is_first_failure(flight.host_id):
                logger.exception(
                    "batch failed ingestor=%s host=%s commands=%d",
                    self.ingestor_id,
                    flight.host_id,
                    len(flight.entries),
                )
            else:
                logger.debug(
                    "batch failed ingestor=%s host=%s error=%s",
                    self.ingestor_id,
                    flight.host_id,
                    type(error).__name__,
                )
            return None
        logger.debug(
            "batch done ingestor=%s host=%s commands=%d elapsed_s=%.3f",
            self.ingestor_id,
            flight.host_id,
            len(flight.entries),
            batch.elapsed_s,
        )
        if len(batch.results) != len(flight.entries):
            logger.error(
                "batch returned %d results for %d commands ingestor=%s host=%s; "
                "resending them all",
                len(batch.results),
                len(flight.entries),
                self.ingestor_id,
                flight.host_id,
            )
            return None
        return batch.results

    def _is_first_failure(self, host_id: str) -> bool:
        """Return whether ``host_id`` has not failed yet in this recovery round."""
        is_first = host_id not in self._failed_hosts
        self._failed_hosts.add(host_id)
        return is_first

    def _apply_results(
        self, entries: list[_Entry], results: list[Any] | None
    ) -> list[_Entry]:
        if results is None:
            return list(entries)
        failed = []
        appended = rejected = duplicates = 0
        for entry, result in zip(entries, results, strict=True):
            status = result.status
            if status == APPENDED:
                appended += 1
            elif status == DUPLICATE:
                duplicates += 1
            elif status == REJECTED:
                rejected += 1
            else:
                failed.append(entry)
                continue
            state = entry[1]
            if state.is_active:
                state.mark_durable(entry[2])
        self.counters["appended"] += appended
        self.counters["duplicates"] += duplicates
        self.counters["rejected"] += rejected
        return failed

    # -- failures ----------------------------------------------------------------

    def _recover(self) -> None:
        """Drain, back off, raise the epoch and requeue every command not durable."""
        self._drain(timeout_s=None)
        if self._stop_requested.is_set():
            return
        self.counters["backoffs"] += 1
        logger.info(
            "backing off before resend ingestor=%s backoff_s=%.2f epoch=%d",
            self.ingestor_id,
            self._backoff_s,
            self.epoch,
        )
        self._stop_requested.wait(self._backoff_s)
        self._backoff_s = min(self._backoff_s * 2, self._config.retry_backoff_max_s)
        try:
            self._router.refresh()
        except RayError:
            logger.exception(
                "shard assignment refresh failed ingestor=%s; retrying",
                self.ingestor_id,
            )
            return

        with self._lock:
            resent = [entry for entry in self._resend if entry[1].is_active]
            entries = resent + [
                entry for queue in self._queues.values() for entry in queue
            ]
            entries.sort(key=itemgetter(0))
            self._resend = []
            self._queues = {}
            for entry in entries:
                item = entry[3]
                host_id = self._router.host_of(
                    item.aggregate_type, item.command.aggregate_id
                )
                self._queues.setdefault(host_id, deque()).append(entry)
            self._num_queued = len(entries)
            self.epoch += 1
            self.counters["resends"] += len(resent)
            self._needs_recovery = False
            self._failed_hosts = set()
        logger.info(
            "resending ingestor=%s epoch=%d commands=%d assignment_version=%d",
            self.ingestor_id,
            self.epoch,
            len(resent),
            self._router.assignment.version,
        )

    def _drain(self, timeout_s: float | None) -> bool:
        """Wait for every batch in flight; return False if ``timeout_s`` passed first.

        Without a timeout, waiting ends early only when ``stop`` is called.
        """
        started = time.monotonic()
        deadline = None if timeout_s is None else started + timeout_s
        is_warned = False
        while self._num_flights():
            if deadline is None:
                if self._stop_requested.is_set():
                    return False
                waited_s = time.monotonic() - started
                if not is_warned and waited_s > self._config.drain_timeout_s:
                    is_warned = True
                    logger.warning(
                        "batches still in flight after %.0f s ingestor=%s batches=%d; "
                        "waiting for them before resending, check the hosts",
                        waited_s,
                        self.ingestor_id,
                        self._num_flights(),
                    )
                wait_s = 1.0
            else:
                wait_s = deadline - time.monotonic()
                if wait_s <= 0:
                    return False
            self._collect(timeout_s=min(wait_s, 1.0))
        return True

    # -- dead letters ------------------------------------------------------------

    def _flush_dead_letters(self) -> None:
        """Store pending dead letters (and produce them); mark their offsets durable.

        When the store or the dead-letter topic fails, the letters stay pending
        and their offsets uncommitted, and the write is retried with backoff.
        """
        if not self._dead_letters or time.monotonic() < self._dead_letter_retry_at:
            return
        with self._lock:
            pending = list(self._dead_letters)
        letters = [letter for letter, _ in pending]
        try:
            self._store.record_dead_letters(letters)
            if self._config.dead_letter_topic:
                self._produce_dead_letters(letters)
        except (StoreUnavailableError, KafkaError):
            delay = self._dead_letter_backoff_s
            logger.exception(
                "dead letters not written ingestor=%s count=%d; retrying in %.1f s",
                self.ingestor_id,
                len(letters),
                delay,
            )
            self._dead_letter_retry_at = time.monotonic() + delay
            self._dead_letter_backoff_s = min(
                delay * 2, self._config.retry_backoff_max_s
            )
            return
        self._dead_letter_backoff_s = self._config.retry_backoff_initial_s

        with self._lock:
            for letter, state in pending:
                if state.is_active:
                    state.mark_durable(letter.offset)  # type: ignore[arg-type]
            del self._dead_letters[: len(pending)]
            self.counters["dead_letters"] += len(pending)
        first = letters[0]
        logger.warning(
            "messages dead-lettered ingestor=%s count=%d first=%s:%s:%s field=%s",
            self.ingestor_id,
            len(letters),
            first.topic,
            first.partition,
            first.offset,
            first.reason.split(" ", 1)[0],
        )

    def _produce_dead_letters(self, letters: list[DeadLetter]) -> None:
        if self._producer is None:
            self._producer = KafkaProducer(
                bootstrap_servers=self._config.bootstrap_servers.split(","),
                client_id=f"{self.ingestor_id}-dead-letters",
                acks="all",
            )
        futures = []
        for letter in letters:
            headers = [
                ("raysource-reason", letter.reason.encode()),
                (
                    "raysource-source",
                    f"{letter.topic}:{letter.partition}:{letter.offset}".encode(),
                ),
            ]
            futures.append(
                self._producer.send(
                    self._config.dead_letter_topic,
                    value=letter.value,
                    key=letter.key,
                    headers=headers,
                )
            )
        self._producer.flush(timeout=_PRODUCER_FLUSH_TIMEOUT_S)
        for future in futures:
            future.get(timeout=0)

    # -- backpressure and commits --------------------------------------------------

    def _held(self) -> int:
        return (
            self._num_queued
            + self._num_in_flight
            + len(self._resend)
            + len(self._dead_letters)
        )

    def _num_flights(self) -> int:
        return sum(len(flights) for flights in self._in_flight.values())

    def _apply_backpressure(self) -> None:
        """Pause every assigned partition at the bound; resume below the fraction."""
        assert self._consumer is not None
        held = self._held()
        limit = self._config.max_commands_held
        with self._lock:
            if not self._is_paused and held >= limit:
                self._is_paused = True
                self._paused = set(self._assigned)
                self._consumer.pause(*self._paused)
                self.counters["pauses"] += 1
                logger.info(
                    "partitions paused ingestor=%s held=%d max_commands_held=%d "
                    "partitions=%d",
                    self.ingestor_id,
                    held,
                    limit,
                    len(self._paused),
                )
            elif self._is_paused and held < self._config.resume_below_fraction * limit:
                self._is_paused = False
                self._consumer.resume(*(self._paused & self._assigned))
                self._paused = set()
                self.counters["resumes"] += 1
                logger.info(
                    "partitions resumed ingestor=%s held=%d", self.ingestor_id, held
                )

    def _maybe_commit(self) -> None:
        now = time.monotonic()
        if now < self._next_commit_at:
            return
        self._next_commit_at = now + self._config.commit_interval_s
        self._commit()
        self._metrics.record_status(self.status())

    def _commit(self, partitions: Collection[TopicPartition] | None = None) -> bool:
        """Commit the durable offsets of ``partitions`` (default: all assigned)."""
        assert self._consumer is not None
        with self._lock:
            offsets = {}
            for state in self._tracker.states():
                if partitions is not None and state.partition not in partitions:
                    continue
                offset = state.committable()
                if offset is not None and offset != state.committed:
                    offsets[state.partition] = OffsetAndMetadata(offset, "", -1)
            for partition in self._assigned:
                self._highwater_from_consumer(partition)
        if not offsets:
            return True
        try:
            self._consumer.commit(offsets)
        except (CommitFailedError, RebalanceInProgressError) as error:
            logger.warning(
                "offset commit rejected during a rebalance ingestor=%s partitions=%d "
                "error=%s; the offsets are committed again later or re-read by the "
                "next owner",
                self.ingestor_id,
                len(offsets),
                type(error).__name__,
            )
            return False
        except KafkaError:
            logger.exception(
                "offset commit failed ingestor=%s partitions=%d; retrying at the "
                "next commit",
                self.ingestor_id,
                len(offsets),
            )
            return False

        with self._lock:
            for partition, committed in offsets.items():
                state = self._tracker.get(partition)
                if state is not None:
                    state.committed = committed.offset
                self._committed[partition] = committed.offset
            self.counters["commits"] += 1
        self._times["last_commit_at"] = time.time()
        logger.debug(
            "offsets committed ingestor=%s partitions=%d",
            self.ingestor_id,
            len(offsets),
        )
        return True

    def _highwater_from_consumer(self, partition: TopicPartition) -> None:
        assert self._consumer is not None
        try:
            highwater = self._consumer.highwater(partition)
        except KafkaError:
            return
        if highwater is not None:
            self._highwater[partition] = highwater

    # -- rebalances and shutdown -----------------------------------------------------

    def _open_consumer(self) -> KafkaConsumer:
        config = self._config
        consumer = KafkaConsumer(
            bootstrap_servers=config.bootstrap_servers.split(","),
            client_id=self.ingestor_id,
            group_id=config.group_id,
            enable_auto_commit=False,
            auto_offset_reset=config.auto_offset_reset,
            session_timeout_ms=config.session_timeout_ms,
            heartbeat_interval_ms=config.heartbeat_interval_ms,
            max_poll_interval_ms=config.max_poll_interval_ms,
            max_poll_records=config.max_poll_records,
        )
        consumer.subscribe(
            topics=list(config.topics), listener=_RebalanceListener(self)
        )
        return consumer

    def _on_assigned(self, partitions: Collection[TopicPartition]) -> None:
        """Track newly assigned partitions; pause them if ingestion is paused."""
        with self._lock:
            for partition in partitions:
                self._tracker.assign(partition)
            self._assigned |= set(partitions)
            if self._is_paused and partitions:
                assert self._consumer is not None
                self._consumer.pause(*partitions)
                self._paused |= set(partitions)
        logger.info(
            "partitions assigned ingestor=%s partitions=%s",
            self.ingestor_id,
            _names(partitions),
        )

    def _on_revoked(self, partitions: Collection[TopicPartition]) -> None:
        """Give up partitions: drop queued commands, drain, commit, then forget them.

        Runs in a thread of its own while ``poll`` (or ``close``) waits for it.
        """
        logger.info(
            "partitions revoked ingestor=%s partitions=%s",
            self.ingestor_id,
            _names(partitions),
        )
        revoked = set(partitions)
        with self._lock:
            self._drop_queued(revoked)
        self._flush_dead_letters()
        if not self._drain(self._config.drain_timeout_s):
            logger.warning(
                "batches still in flight after drain_timeout_s=%.1f ingestor=%s; "
                "their offsets stay uncommitted and the next owner re-reads them",
                self._config.drain_timeout_s,
                self.ingestor_id,
            )
        self._commit(revoked)
        self._forget(revoked)

    def _on_lost(self, partitions: Collection[TopicPartition]) -> None:
        """Forget partitions taken away without a revocation (the session expired)."""
        logger.warning(
            "partitions lost ingestor=%s partitions=%s; their uncommitted records "
            "are re-read by the next owner",
            self.ingestor_id,
            _names(partitions),
        )
        self._forget(set(partitions))

    def _forget(self, partitions: set[TopicPartition]) -> None:
        with self._lock:
            self._drop_queued(partitions)
            for partition in partitions:
                self._tracker.revoke(partition)
            self._assigned -= partitions
            self._paused -= partitions
            self._resend = [entry for entry in self._resend if entry[1].is_active]
            self._dead_letters = [
                pair for pair in self._dead_letters if pair[1].is_active
            ]
            # Batches still in flight for these partitions keep running at
            # their hosts, but their results no longer move any offset.
            for host_id, flights in self._in_flight.items():
                kept = deque()
                for flight in flights:
                    if any(entry[1].is_active for entry in flight.entries):
                        kept.append(flight)
                    else:
                        self._num_in_flight -= len(flight.entries)
                self._in_flight[host_id] = kept

    def _drop_queued(self, partitions: set[TopicPartition]) -> None:
        for host_id, queue in self._queues.items():
            kept = deque(
                entry for entry in queue if entry[1].partition not in partitions
            )
            self._num_queued -= len(queue) - len(kept)
            self._queues[host_id] = kept

    def _shutdown(self) -> None:
        """Drop queued commands, drain, commit, and leave the group."""
        assert self._consumer is not None
        with self._lock:
            self._drop_queued(set(self._assigned))
        self._flush_dead_letters()
        if not self._drain(self._config.drain_timeout_s):
            logger.warning(
                "batches still in flight at shutdown after drain_timeout_s=%.1f "
                "ingestor=%s; their offsets stay uncommitted",
                self._config.drain_timeout_s,
                self.ingestor_id,
            )
        self._commit()
        self._metrics.record_status(self.status())
        try:
            self._consumer.close(autocommit=False)
        except KafkaError:
            logger.exception("consumer close failed ingestor=%s", self.ingestor_id)
        if self._producer is not None:
            self._producer.close()
        self._store.close()
        self._times["stopped_at"] = time.time()
        logger.info(
            "ingestor stopped ingestor=%s read=%d appended=%d rejected=%d "
            "duplicates=%d dead_letters=%d",
            self.ingestor_id,
            self.counters["records_read"],
            self.counters["appended"],
            self.counters["rejected"],
            self.counters["duplicates"],
            self.counters["dead_letters"],
        )

    def _summary(self) -> dict[str, Any]:
        summary = self.status()
        first, last = summary["first_read_at"], summary["last_commit_at"]
        elapsed = (last - first) if first is not None and last is not None else 0.0
        done = summary["appended"] + summary["rejected"] + summary["duplicates"]
        summary["elapsed_s"] = elapsed
        summary["commands_per_s"] = done / elapsed if elapsed > 0 else 0.0
        return summary


class _RebalanceListener(AsyncConsumerRebalanceListener):
    """Run the ingestor's revocation work off kafka-python's IO thread.

    kafka-python 3.0 calls listeners on its IO thread, which also sends the
    heartbeats, and awaits coroutine listeners. The revocation (drain and
    commit) runs in a thread of its own so heartbeats go on meanwhile.
    """

    def __init__(self, ingestor: KafkaIngestor) -> None:
        self._ingestor = ingestor

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        if revoked:
            await _in_thread(self._ingestor._on_revoked, revoked)

    async def on_partitions_assigned(
        self, assigned: Collection[TopicPartition]
    ) -> None:
        self._ingestor._on_assigned(assigned)

    async def on_partitions_lost(self, lost: Collection[TopicPartition]) -> None:
        if lost:
            self._ingestor._on_lost(lost)


def _in_thread(
    function: Callable[[Collection[TopicPartition]], None],
    partitions: Collection[TopicPartition],
) -> Future:
    """Run ``function(partitions)`` in a new thread; return a kafka Future of its end.

    NOTE: the future is resolved from that thread, and kafka-python's IO loop
    notices it at its next wake-up, which can be up to a heartbeat interval later.
    """
    future = Future()

    def target() -> None:
        try:
            function(partitions)
        except Exception as error:
            logger.exception(
                "rebalance handling failed partitions=%s", _names(partitions)
            )
            future.failure(error)
        else:
            future.success(None)

    threading.Thread(target=target, name="rebalance", daemon=True).start()
    return future


_DURABLE = frozenset({APPENDED, DUPLICATE, REJECTED})
_COUNTER_NAMES = (
    "records_read",
    "commands_dispatched",
    "batches_dispatched",
    "appended",
    "rejected",
    "duplicates",
    "dead_letters",
    "resends",
    "backoffs",
    "pauses",
    "resumes",
    "commits",
)


def _name(partition: TopicPartition) -> str:
    return f"{partition.topic}:{partition.partition}"


def _names(partitions: Iterable[TopicPartition]) -> str:
    return ",".join(sorted(_name(partition) for partition in partitions))


def _lag(
    positions: dict[Any, int | None],
    highwater: dict[TopicPartition, int],
    committed: dict[TopicPartition, int],
) -> dict[str, int | None]:
    lag = {}
    for partition, position in positions.items():
        current = position if position is not None else committed.get(partition)
        top = highwater.get(partition)
        lag[_name(partition)] = (
            None if top is None or current is None else max(0, top - current)
        )
    return lag


# The actor: run() occupies the default group for as long as it loops, so status
# and stop run in a group of their own and return while run() loops.
for _name_of_method in ("status", "stop"):
    setattr(
        KafkaIngestor,
        _name_of_method,
        ray.method(concurrency_group="control")(
            getattr(KafkaIngestor, _name_of_method)
        ),
    )

KafkaIngestorActor = ray.remote(num_cpus=0, concurrency_groups={"control": 2})(
    KafkaIngestor
)
