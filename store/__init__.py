"""Persistence of raysource: the SQL event store and the snapshot store.

May import ``aggregates``; never ``pipeline``; no Ray.
"""

from store.errors import SchemaError, StoreUnavailableError, VersionConflictError
from store.event_store import (
    DEFAULT_PAGE_SIZE,
    AppendResult,
    CommandRecord,
    DeadLetter,
    EventStore,
)
from store.loading import LoadedAggregate, load_aggregate, snapshot_of
from store.snapshot_store import Snapshot, SnapshotStore

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "AppendResult",
    "CommandRecord",
    "DeadLetter",
    "EventStore",
    "LoadedAggregate",
    "SchemaError",
    "Snapshot",
    "SnapshotStore",
    "StoreUnavailableError",
    "VersionConflictError",
    "load_aggregate",
    "snapshot_of",
]
