"""The backfill driver: route commands to workers in row order and resend failures.

``Driver`` buffers the commands of each worker into batches, keeps a bounded
number of batches in flight per worker, and takes their outcomes in send
order. Commands that were not executed are resent with backoff before
anything newer. It stores dead letters in groups, and counts every row in a
``Tally``. The event store is imported only inside functions. May import
``store`` and the rest of ``pipeline``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipeline._backfill_progress import Tally
from pipeline._backfill_workers import BackfillError
from pipeline.config import JobConfig
from pipeline.protocol import BatchItem

if TYPE_CHECKING:
    from pipeline._backfill_workers import WorkerPool
    from store.event_store import DeadLetter, EventStore

__all__ = ["MAX_RETRY_ATTEMPTS", "Driver"]

logger = logging.getLogger(__name__)

# Attempts at a batch that failed because the store was unavailable or its
# version conflicts outlasted the host's retries, before the backfill stops.
MAX_RETRY_ATTEMPTS = 20

_DEAD_LETTER_BATCH = 1_000


class Driver:
    """Route commands to workers by shard, in row order, with batches in flight bounded.

    The results of one worker's batches are taken in the order sent. When a
    batch fails, the host fences the batches sent after it (same sender
    epoch), or they are lost with the worker. So the commands not executed
    are gathered in order and sent again, with backoff and a higher epoch,
    before anything newer.
    """

    def __init__(
        self,
        pool: WorkerPool,
        config: JobConfig,
        batch_commands: int,
        max_batches_in_flight: int,
    ) -> None:
        self.tally = Tally()
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
