"""Consumer group rebalances of a KafkaIngestor: partitions assigned, revoked or lost.

``RebalanceMixin`` contains the methods of ``KafkaIngestor`` that start tracking
assigned partitions, and give up revoked ones after draining and committing
them. ``RebalanceListener`` calls them from kafka-python's IO thread. The
methods use the state that ``KafkaIngestor.__init__`` sets up. May import the
rest of ``pipeline``.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Collection

from kafka import TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.future import Future

from pipeline._ingestor_status import format_partitions

__all__ = ["RebalanceListener", "RebalanceMixin"]

logger = logging.getLogger(__name__)


class RebalanceMixin:
    """Track assigned partitions, and drain and commit revoked ones."""

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
            format_partitions(partitions),
        )

    def _on_revoked(self, partitions: Collection[TopicPartition]) -> None:
        """Give up partitions: drop queued commands, drain, commit, then forget them.

        Runs in a thread of its own while ``poll`` (or ``close``) waits for it.
        """
        logger.info(
            "partitions revoked ingestor=%s partitions=%s",
            self.ingestor_id,
            format_partitions(partitions),
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
            format_partitions(partitions),
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


class RebalanceListener(AsyncConsumerRebalanceListener):
    """Run the ingestor's revocation work off kafka-python's IO thread.

    kafka-python 3.0 calls listeners on its IO thread, which also sends the
    heartbeats, and awaits coroutine listeners. The revocation (drain and
    commit) runs in a thread of its own so heartbeats go on meanwhile.
    """

    def __init__(self, ingestor: RebalanceMixin) -> None:
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
                "rebalance handling failed partitions=%s", format_partitions(partitions)
            )
            future.failure(error)
        else:
            future.success(None)

    threading.Thread(target=target, name="rebalance", daemon=True).start()
    return future
