"""KafkaIngestor: consume commands from Kafka and send them to hosts in batches.

One ingestor is one member of the job's consumer group. It polls records,
decodes them (``pipeline.decoding``), groups the commands by the host that owns
their shard (``pipeline.dispatch.Router``) and sends each host batches with
``execute_batch``, keeping at most ``kafka.max_batches_in_flight_per_host``
batches in flight per host. An offset is committed only when every record of its
partition below it is durable (``pipeline.offsets``). Its status goes to Ray's
metrics (``pipeline.metrics``) at every commit interval. May import
``aggregates``, ``store`` and the rest of ``pipeline``.

The methods are split by concept over mixins in ``pipeline._ingestor_*``:
batch results and resends, dead letters, backpressure and commits,
rebalances, and status. This module contains the state, the public calls, the
poll and dispatch loop, and the actor.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from typing import Any

import ray
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from pipeline._ingestor_commits import CommitMixin
from pipeline._ingestor_dead_letters import DeadLetterMixin
from pipeline._ingestor_rebalance import RebalanceListener, RebalanceMixin
from pipeline._ingestor_results import Entry, Flight, ResultsMixin
from pipeline._ingestor_status import StatusMixin, format_partition
from pipeline.config import JobConfig
from pipeline.decoding import DecodeFailure, Decoder
from pipeline.dispatch import Router
from pipeline.logs import configure_logging
from pipeline.metrics import IngestorMetrics
from pipeline.offsets import OffsetTracker, PartitionOffsets
from pipeline.protocol import BatchRequest
from store.event_store import DeadLetter, EventStore

__all__ = ["KafkaIngestor", "KafkaIngestorActor"]

logger = logging.getLogger(__name__)

_IDLE_POLL_TIMEOUT_MS = 100
_BUSY_POLL_TIMEOUT_MS = 5
_RESULT_WAIT_S = 0.05


class KafkaIngestor(
    StatusMixin, ResultsMixin, DeadLetterMixin, CommitMixin, RebalanceMixin
):
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

        self._queues: dict[str, deque[Entry]] = {}
        self._in_flight: dict[str, deque[Flight]] = {}
        self._resend: list[Entry] = []
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
            format_partition(state.partition),
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
                    flights.append(Flight(ref, host_id, entries))
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

    # -- consumer and shutdown ------------------------------------------------------

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
        consumer.subscribe(topics=list(config.topics), listener=RebalanceListener(self))
        return consumer

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
