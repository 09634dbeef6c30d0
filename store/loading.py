"""Load an aggregate: its latest valid snapshot, then only the events after it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TypeVar

from aggregates.aggregate import Aggregate
from aggregates.errors import InvalidCommandError
from store.event_store import DEFAULT_PAGE_SIZE, EventStore
from store.snapshot_store import Snapshot, SnapshotStore

logger = logging.getLogger(__name__)

A = TypeVar("A", bound=Aggregate)


@dataclass
class LoadedAggregate:
    """An aggregate and how it was loaded.

    ``snapshot_base`` is the stream version of the snapshot it started from (0
    without one), the base from which the snapshot policy counts;
    ``events_replayed`` is how many events were read after it.
    """

    aggregate: Aggregate
    snapshot_base: int
    events_replayed: int


def load_aggregate(
    aggregate_type: type[Aggregate],
    aggregate_id: str,
    events: EventStore,
    snapshots: SnapshotStore | None,
    page_size: int = DEFAULT_PAGE_SIZE,
    up_to_version: int | None = None,
    snapshot_version: int | None = None,
) -> LoadedAggregate:
    """Load an aggregate from its latest valid snapshot plus the later events.

    A snapshot that cannot be restored (unknown fields, wrong shape) is logged
    as a warning and the stream is replayed from the start. ``snapshot_version``
    defaults to the one of the class's snapshot policy. With
    ``up_to_version`` the aggregate stops at that version (time travel); only a
    snapshot at or below it is used.
    """
    if snapshot_version is None:
        snapshot_version = aggregate_type.snapshot_policy.snapshot_version
    aggregate, base = _from_snapshot(
        aggregate_type, aggregate_id, snapshots, snapshot_version, up_to_version
    )
    replayed = 0
    for event in events.read_stream(
        aggregate_type.aggregate_type,
        aggregate_id,
        after_version=base,
        page_size=page_size,
    ):
        if up_to_version is not None and event.version > up_to_version:
            break
        aggregate.apply(event)
        replayed += 1
    if base and not replayed and up_to_version is None:
        aggregate, base, replayed = _check_not_ahead(
            aggregate_type, aggregate_id, aggregate, base, events, page_size
        )
    logger.debug(
        "aggregate loaded aggregate=%s/%s version=%d snapshot=%d replayed=%d",
        aggregate_type.aggregate_type,
        aggregate_id,
        aggregate.version,
        base,
        replayed,
    )
    return LoadedAggregate(aggregate, base, replayed)


def _check_not_ahead(
    aggregate_type: type[Aggregate],
    aggregate_id: str,
    aggregate: Aggregate,
    base: int,
    events: EventStore,
    page_size: int,
) -> tuple[Aggregate, int, int]:
    """Replay from the start if the snapshot is newer than the stream.

    That happens when the database was restored from an older backup than the
    snapshots; using such a snapshot would make every append conflict.
    """
    stream_version = events.stream_version(aggregate_type.aggregate_type, aggregate_id)
    if stream_version >= base:
        return aggregate, base, 0
    logger.warning(
        "snapshot is ahead of the event store, replaying the stream aggregate=%s/%s "
        "snapshot=%d stream=%d",
        aggregate_type.aggregate_type,
        aggregate_id,
        base,
        stream_version,
    )
    fresh = aggregate_type(aggregate_id)
    replayed = 0
    for event in events.read_stream(
        aggregate_type.aggregate_type, aggregate_id, page_size=page_size
    ):
        fresh.apply(event)
        replayed += 1
    return fresh, 0, replayed


def _from_snapshot(
    aggregate_type: type[Aggregate],
    aggregate_id: str,
    snapshots: SnapshotStore | None,
    snapshot_version: int,
    up_to_version: int | None,
) -> tuple[Aggregate, int]:
    if snapshots is None:
        return aggregate_type(aggregate_id), 0
    snapshot = snapshots.load_latest(
        aggregate_type.aggregate_type, aggregate_id, snapshot_version
    )
    if snapshot is None or (
        up_to_version is not None and snapshot.version > up_to_version
    ):
        return aggregate_type(aggregate_id), 0
    try:
        aggregate = aggregate_type.from_snapshot(
            aggregate_id, snapshot.version, snapshot.state
        )
    except (InvalidCommandError, TypeError, ValueError, KeyError) as error:
        logger.warning(
            "snapshot cannot be restored, replaying the stream "
            "aggregate=%s/%s version=%d error=%s",
            aggregate_type.aggregate_type,
            aggregate_id,
            snapshot.version,
            error,
        )
        return aggregate_type(aggregate_id), 0
    return aggregate, snapshot.version


def snapshot_of(aggregate: Aggregate, snapshot_version: int) -> Snapshot:
    """Return a snapshot of the aggregate's current state."""
    return Snapshot(
        aggregate_type=aggregate.aggregate_type,
        aggregate_id=aggregate.aggregate_id,
        version=aggregate.version,
        snapshot_version=snapshot_version,
        state=aggregate.snapshot_state(),
    )
