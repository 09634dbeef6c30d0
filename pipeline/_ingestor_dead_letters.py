"""Dead letters of a KafkaIngestor: records that fail to decode or validate.

``DeadLetterMixin`` contains the methods of ``KafkaIngestor`` that store pending
dead letters in the event store, and produce them to
``kafka.dead_letter_topic`` when it is set, before their offsets count as
durable. The methods use the state that ``KafkaIngestor.__init__`` sets up.
May import ``store`` and the rest of ``pipeline``.
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaProducer
from kafka.errors import KafkaError

from store.errors import StoreUnavailableError
from store.event_store import DeadLetter

__all__ = ["DeadLetterMixin"]

logger = logging.getLogger(__name__)

_PRODUCER_FLUSH_TIMEOUT_S = 30.0


class DeadLetterMixin:
    """Store and produce dead letters, with backoff when the write fails."""

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
