"""Results of the batches a KafkaIngestor sends to hosts, and resends after a failure.

``ResultsMixin`` contains the methods of ``KafkaIngestor`` that collect
finished batches in send order per host and mark the offsets of durable
commands. When a command is not durable, they recover: drain the batches in
flight, back off, raise the epoch, refresh the shard assignment and requeue
every command not durable, in read order. The methods use the state that
``KafkaIngestor.__init__`` sets up. May import the rest of ``pipeline``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import ray
from ray.exceptions import RayError

from pipeline.offsets import PartitionOffsets
from pipeline.protocol import APPENDED, DUPLICATE, REJECTED, BatchItem, BatchResult

__all__ = ["Entry", "Flight", "ResultsMixin"]

logger = logging.getLogger(__name__)

# One decoded command waiting for its outcome: read sequence number (the order
# of resends), its partition's offsets, its offset, and the command.
Entry = tuple[int, PartitionOffsets, int, BatchItem]

_DURABLE = frozenset({APPENDED, DUPLICATE, REJECTED})


@dataclass
class Flight:
    """A batch sent to a host whose results have not arrived yet."""

    ref: Any
    host_id: str
    entries: list[Entry]


class ResultsMixin:
    """Collect batch results and resend the commands that are not durable."""

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

    def _complete(self, flight: Flight) -> None:
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

    def _results_of(self, flight: Flight) -> list[Any] | None:
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
        self, entries: list[Entry], results: list[Any] | None
    ) -> list[Entry]:
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
