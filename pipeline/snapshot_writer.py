"""A background thread that writes encoded snapshots, off the command path."""

from __future__ import annotations

import logging
import queue
import threading
import time

from store.snapshot_store import Snapshot, SnapshotStore

logger = logging.getLogger(__name__)

# Log the first write failure and then one in this many, so an unreachable
# store does not flood the log; every failure is counted.
_LOG_EVERY_FAILURES = 100


class SnapshotWriter:
    """Write snapshots in submission order on one daemon thread.

    A failed write is counted and logged, never raised: a command never fails
    because a snapshot could not be written. When the queue is full, new
    snapshots are skipped and counted (the next one due replaces them).
    """

    def __init__(self, store: SnapshotStore, max_queued: int) -> None:
        self._store = store
        self._queue: queue.Queue[tuple[Snapshot, bytes] | None] = queue.Queue(
            max_queued
        )
        self.num_written = 0
        self.num_failed = 0
        self.num_skipped = 0
        self._thread = threading.Thread(
            target=self._run, name="snapshot-writer", daemon=True
        )
        self._thread.start()

    def submit(self, snapshot: Snapshot, data: bytes) -> None:
        """Queue an encoded snapshot for writing; skip it if the queue is full."""
        try:
            self._queue.put_nowait((snapshot, data))
        except queue.Full:
            self.num_skipped += 1

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued snapshot is written or failed.

        Return False if ``timeout_s`` seconds pass first, True otherwise.
        """
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._queue.unfinished_tasks == 0

    @property
    def num_queued(self) -> int:
        return self._queue.qsize()

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, then stop the thread."""
        self.flush(timeout_s)
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            finally:
                self._queue.task_done()

    def _write(self, snapshot: Snapshot, data: bytes) -> None:
        try:
            self._store.save_encoded(snapshot, data)
        except Exception:
            self.num_failed += 1
            if self.num_failed % _LOG_EVERY_FAILURES == 1:
                logger.exception(
                    "snapshot write failed aggregate=%s/%s version=%d failures=%d",
                    snapshot.aggregate_type,
                    snapshot.aggregate_id,
                    snapshot.version,
                    self.num_failed,
                )
            return
        self.num_written += 1
