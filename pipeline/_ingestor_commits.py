"""Backpressure and offset commits of a KafkaIngestor.

``CommitMixin`` contains the methods of ``KafkaIngestor`` that count the
commands held, pause every assigned partition at ``kafka.max_commands_held``
and resume them below ``resume_below_fraction`` of it, and commit the offsets
below which every record is durable. The methods use the state that
``KafkaIngestor.__init__`` sets up. May import the rest of ``pipeline``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

from kafka import OffsetAndMetadata, TopicPartition
from kafka.errors import CommitFailedError, KafkaError, RebalanceInProgressError

__all__ = ["CommitMixin"]

logger = logging.getLogger(__name__)


class CommitMixin:
    """Bound the commands held, and commit durable offsets at every commit interval."""

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
