"""Status of a KafkaIngestor: counters, bounds, partitions, offsets and lag.

``StatusMixin`` contains the ``status`` call of ``KafkaIngestor`` and the
summary that ``run`` returns. The methods use the state that
``KafkaIngestor.__init__`` sets up. May import the rest of ``pipeline``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from kafka import TopicPartition

__all__ = ["StatusMixin", "format_partition", "format_partitions"]

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


class StatusMixin:
    """Report the ingestor's status while it runs, and its summary after."""

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
                "assigned_partitions": sorted(
                    format_partition(tp) for tp in self._assigned
                ),
                "paused_partitions": sorted(
                    format_partition(tp) for tp in self._paused
                ),
                "committed_offsets": {
                    format_partition(tp): offset
                    for tp, offset in self._committed.items()
                },
                "lag": _lag(positions, self._highwater, self._committed),
                **self._times,
            }

    def _summary(self) -> dict[str, Any]:
        summary = self.status()
        first, last = summary["first_read_at"], summary["last_commit_at"]
        elapsed = (last - first) if first is not None and last is not None else 0.0
        done = summary["appended"] + summary["rejected"] + summary["duplicates"]
        summary["elapsed_s"] = elapsed
        summary["commands_per_s"] = done / elapsed if elapsed > 0 else 0.0
        return summary


def format_partition(partition: TopicPartition) -> str:
    return f"{partition.topic}:{partition.partition}"


def format_partitions(partitions: Iterable[TopicPartition]) -> str:
    return ",".join(sorted(format_partition(partition) for partition in partitions))


def _lag(
    positions: dict[Any, int | None],
    highwater: dict[TopicPartition, int],
    committed: dict[TopicPartition, int],
) -> dict[str, int | None]:
    lag = {}
    for partition, position in positions.items():
        current = position if position is not None else committed.get(partition)
        top = highwater.get(partition)
        lag[format_partition(partition)] = (
            None if top is None or current is None else max(0, top - current)
        )
    return lag
