"""Messages between dispatchers (ingestors, backfills, the Python entry point) and hosts."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from aggregates.messages import Command

APPENDED = "appended"
DUPLICATE = "duplicate"
REJECTED = "rejected"
# Not executed; the sender must resend it. NOT_OWNER: the shard moved.
# FAILED: the store was unavailable or conflicts outlasted the retries.
NOT_OWNER = "not_owner"
FAILED = "failed"

DURABLE_STATUSES = frozenset({APPENDED, DUPLICATE, REJECTED})


def shard_of(aggregate_type: str, aggregate_id: str, num_shards: int) -> int:
    """Return the shard of an aggregate: a stable hash of type and id, modulo shards."""
    return zlib.crc32(f"{aggregate_type}\x00{aggregate_id}".encode()) % num_shards


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One command with the aggregate type it is addressed to."""

    aggregate_type: str
    command: Command


@dataclass(frozen=True)
class BatchRequest:
    """Commands for one host, executed in order.

    ``sender_id`` and ``epoch`` fence resends: after a batch from a sender
    fails, the host fails every later batch from that sender with an epoch no
    higher than the failed one, so commands never run out of order. The sender
    drains what is in flight, raises its epoch and resends in order.
    """

    sender_id: str
    epoch: int
    items: list[BatchItem]


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What became of one command.

    ``first_version`` and ``last_version`` give the stream versions of the
    events appended (both 0 when none); ``reason`` carries the domain error's
    message for a rejection or the cause of a failure.
    """

    command_id: str
    status: str
    first_version: int = 0
    last_version: int = 0
    reason: str | None = None

    @property
    def is_durable(self) -> bool:
        return self.status in DURABLE_STATUSES


@dataclass
class BatchResult:
    """Per-command results of a batch, in request order, and the host's counters."""

    results: list[CommandResult]
    host_id: str = ""
    num_loaded: int = 0
    events_replayed: int = 0
    elapsed_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
