"""Read an event store into pandas: events, rejections, counts and past states.

The read side for notebooks and ad-hoc analysis. Every query that takes a
filter puts it in the SQL WHERE clause and fetches in pages ordered by a key
(position, version or id), so a filtered read never loads the whole table
first. May import ``aggregates``; never ``pipeline`` or Ray.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aggregates.aggregate import Aggregate
from aggregates.messages import Event, Metadata
from store import schema
from store.errors import StoreUnavailableError
from store.event_store import DEFAULT_PAGE_SIZE, EventStore
from store.loading import LoadedAggregate, load_aggregate
from store.snapshot_store import SnapshotStore

# Columns of every event frame, before the payload fields.
EVENT_COLUMNS = (
    "position",
    "aggregate_type",
    "aggregate_id",
    "version",
    "event_type",
    "command_id",
    "recorded_at",
)
PAYLOAD_PREFIX = "payload."
COUNT_COLUMNS = ("aggregates", "events", "appended_commands", "rejected_commands")
REJECTION_COLUMNS = (
    "command_id",
    "aggregate_type",
    "aggregate_id",
    "reason",
    "recorded_at",
)
DEAD_LETTER_COLUMNS = (
    "id",
    "topic",
    "partition",
    "offset",
    "key",
    "value",
    "reason",
    "recorded_at",
)


class Reader:
    """Read events, command outcomes and aggregate states as pandas objects.

    Like EventStore, a Reader on a new database creates the empty tables,
    but ``Reader.open`` rejects a missing SQLite file. Without a snapshot
    store, loading an aggregate replays its whole stream. The Reader never
    writes events.
    """

    def __init__(
        self,
        event_store: EventStore,
        snapshot_store: SnapshotStore | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        if page_size < 1:
            msg = f"page_size must be at least 1, got {page_size}"
            raise ValueError(msg)
        self.event_store = event_store
        self.snapshot_store = snapshot_store
        self.page_size = page_size

    @classmethod
    def open(
        cls,
        database_url: str,
        snapshot_url: str | None = None,
        storage_options: dict[str, Any] | None = None,
        snapshot_compression: str | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Reader:
        """Open the event store at ``database_url`` and snapshots at ``snapshot_url``.

        A SQLite URL must name an existing file, and a local snapshot folder
        must exist, so that a mistyped path raises FileNotFoundError here
        instead of opening a new, empty store. ``storage_options`` and
        ``snapshot_compression`` go to SnapshotStore.
        """
        _check_sqlite_file(database_url)
        snapshots = None
        if snapshot_url is not None:
            _check_snapshot_folder(snapshot_url)
            snapshots = SnapshotStore(
                snapshot_url, storage_options, snapshot_compression
            )
        return cls(EventStore(database_url), snapshots, page_size)

    def close(self) -> None:
        """Close the event store's pooled connections."""
        self.event_store.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- events ----------------------------------------------------------------

    def stream(
        self,
        aggregate_type: str,
        aggregate_id: str,
        after_version: int = 0,
        up_to_version: int | None = None,
    ) -> pd.DataFrame:
        """Return one stream's events in version order, payload fields as columns.

        Only events with ``after_version < version <= up_to_version`` are read.
        The columns are those of ``events``.
        """
        query = _stream_select(aggregate_type, aggregate_id, up_to_version)
        pages = self._pages(query, schema.events.c.version, after_version)
        return _concat([_event_frame(page) for page in pages], _event_frame([]))

    def events(
        self,
        aggregate_type: str | None = None,
        event_type: str | Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_position: int = 0,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """Return events in global order, filtered in SQL, payload fields as columns.

        ``event_type`` is one type or several. ``since`` (inclusive) and
        ``until`` (exclusive) bound ``recorded_at``, the time the store
        appended the event, and a naive datetime is read as UTC. ``limit``
        caps the number of rows. The frame has the columns of EVENT_COLUMNS,
        with ``recorded_at`` in UTC, then one column per top-level payload
        field. A nested list or object stays one value. A payload field whose
        name is already an event column is prefixed with ``payload.``.
        """
        query = _filter_events(
            _event_select(), aggregate_type, event_type, since, until
        )
        pages = self._pages(query, schema.events.c.position, after_position, limit)
        return _concat([_event_frame(page) for page in pages], _event_frame([]))

    def iter_events(
        self,
        aggregate_type: str | None = None,
        event_type: str | Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_position: int = 0,
    ) -> Iterator[pd.DataFrame]:
        """Yield the frames of ``events`` one page at a time.

        Only one page is in memory at a time, so a caller that reduces each
        page (a sum, a count per day) can read a store of any size.
        """
        query = _filter_events(
            _event_select(), aggregate_type, event_type, since, until
        )
        for page in self._pages(query, schema.events.c.position, after_position):
            yield _event_frame(page)

    # -- commands and dead letters -----------------------------------------------

    def rejections(
        self,
        aggregate_type: str | None = None,
        aggregate_id: str | None = None,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """Return the rejected commands with their reasons, in command id order."""
        table = schema.commands
        query = sa.select(*(table.c[name] for name in REJECTION_COLUMNS)).where(
            table.c.outcome == "rejected"
        )
        if aggregate_type is not None:
            query = query.where(table.c.aggregate_type == aggregate_type)
        if aggregate_id is not None:
            query = query.where(table.c.aggregate_id == aggregate_id)
        rows = [
            row
            for page in self._pages(query, table.c.command_id, "", limit)
            for row in page
        ]
        frame = pd.DataFrame(rows, columns=list(REJECTION_COLUMNS))
        frame["recorded_at"] = pd.to_datetime(frame["recorded_at"], utc=True)
        return frame

    def dead_letters(self, limit: int | None = None) -> pd.DataFrame:
        """Return the dead letters, oldest first, with raw key and value bytes."""
        table = schema.dead_letters
        query = sa.select(*(table.c[name] for name in DEAD_LETTER_COLUMNS))
        rows = [
            row for page in self._pages(query, table.c.id, 0, limit) for row in page
        ]
        frame = pd.DataFrame(rows, columns=list(DEAD_LETTER_COLUMNS))
        frame["recorded_at"] = pd.to_datetime(frame["recorded_at"], utc=True)
        return frame

    # -- counts ----------------------------------------------------------------

    def counts(self) -> pd.DataFrame:
        """Return, per aggregate type, the aggregates, events and command outcomes.

        The frame is indexed by ``aggregate_type``, sorted, with the integer
        columns of COUNT_COLUMNS. A type whose commands were all rejected has
        0 aggregates and 0 events. Dead letters have no aggregate type, so
        ``dead_letters`` and ``EventStore.counts`` report them instead.
        """
        events = schema.events
        commands = schema.commands
        event_query = sa.select(
            events.c.aggregate_type,
            sa.func.count(sa.distinct(events.c.aggregate_id)).label("aggregates"),
            sa.func.count().label("events"),
        ).group_by(events.c.aggregate_type)
        command_query = sa.select(
            commands.c.aggregate_type,
            commands.c.outcome,
            sa.func.count().label("count"),
        ).group_by(commands.c.aggregate_type, commands.c.outcome)
        with self._connect() as connection:
            event_rows = connection.execute(event_query).all()
            command_rows = connection.execute(command_query).all()

        table: dict[str, dict[str, int]] = {}
        for aggregate_type, num_aggregates, num_events in event_rows:
            row = table.setdefault(aggregate_type, dict.fromkeys(COUNT_COLUMNS, 0))
            row["aggregates"] = num_aggregates
            row["events"] = num_events
        for aggregate_type, outcome, count in command_rows:
            row = table.setdefault(aggregate_type, dict.fromkeys(COUNT_COLUMNS, 0))
            row[f"{outcome}_commands"] = count

        frame = pd.DataFrame.from_dict(
            table, orient="index", columns=list(COUNT_COLUMNS)
        )
        frame.index.name = "aggregate_type"
        return frame.sort_index().astype("int64")

    def stream_sizes(
        self, aggregate_type: str, limit: int | None = None
    ) -> pd.DataFrame:
        """Return the number of events of each aggregate of a type, largest first.

        The columns are ``aggregate_id`` and ``events``, and ties are in id
        order. The database sorts and cuts to ``limit`` rows, so only those
        are fetched.
        """
        table = schema.events
        num_events = sa.func.count().label("events")
        query = (
            sa.select(table.c.aggregate_id, num_events)
            .where(table.c.aggregate_type == aggregate_type)
            .group_by(table.c.aggregate_id)
            .order_by(num_events.desc(), table.c.aggregate_id)
        )
        if limit is not None:
            query = query.limit(limit)
        with self._connect() as connection:
            rows = connection.execute(query).all()
        return pd.DataFrame(rows, columns=["aggregate_id", "events"])

    # -- aggregate states ----------------------------------------------------------

    def load(
        self,
        aggregate_class: type[Aggregate],
        aggregate_id: str,
        version: int | None = None,
    ) -> LoadedAggregate:
        """Load an aggregate as it was at ``version``, or at its latest version.

        The load starts from the newest snapshot at or below ``version`` and
        replays only the events after it. A version past the end of the
        stream loads the latest state, and an unknown id loads a new aggregate
        at version 0: ``aggregate.version`` shows where the load stopped.
        """
        if version is not None and version < 0:
            msg = f"version must be at least 0 or None, got {version}"
            raise ValueError(msg)
        return load_aggregate(
            aggregate_class,
            aggregate_id,
            self.event_store,
            self.snapshot_store,
            page_size=self.page_size,
            up_to_version=version,
        )

    def state_history(
        self,
        aggregate_class: type[Aggregate],
        aggregate_id: str,
        fields: Sequence[str] | None = None,
        up_to_version: int | None = None,
    ) -> pd.DataFrame:
        """Return the aggregate's state after each of its events, one row per version.

        The stream is replayed from version 1, because every version is
        needed. Columns: ``version``, ``event_type``, ``recorded_at``, then
        ``fields`` of ``snapshot_state()`` (default: every field whose value
        is a number, a string, a bool or None). A list or dict field is copied
        into every row, so name such fields only for short streams.

        Raises:
            KeyError: a name in ``fields`` is not a state field.
        """
        aggregate = aggregate_class(aggregate_id)
        chosen = _state_fields(aggregate, fields)
        query = _stream_select(
            aggregate_class.aggregate_type, aggregate_id, up_to_version
        )
        rows: list[dict[str, Any]] = []
        for page in self._pages(query, schema.events.c.version, 0):
            for event in page:
                aggregate.apply(_event_of(event))
                state = aggregate.snapshot_state()
                row = {
                    "version": event.version,
                    "event_type": event.event_type,
                    "recorded_at": event.recorded_at,
                }
                # A list or dict in the state may be changed in place by the
                # next event, so each row gets its own copy.
                row.update({name: copy.deepcopy(state[name]) for name in chosen})
                rows.append(row)
        frame = pd.DataFrame(
            rows, columns=["version", "event_type", "recorded_at", *chosen]
        )
        frame["recorded_at"] = pd.to_datetime(frame["recorded_at"], utc=True)
        return frame

    # -- internals -------------------------------------------------------------

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """Yield a connection. An unreachable database raises StoreUnavailableError."""
        engine = self.event_store.engine
        try:
            with engine.connect() as connection:
                yield connection
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as error:
            url = engine.url.render_as_string(hide_password=True)
            detail = str(getattr(error, "orig", error)).splitlines()[0][:200]
            msg = f"event store {url} is unavailable: {detail}"
            raise StoreUnavailableError(msg) from error

    def _pages(
        self,
        query: sa.Select[Any],
        key: sa.ColumnElement[Any],
        after: Any,
        limit: int | None = None,
    ) -> Iterator[list[Any]]:
        """Yield the rows of ``query`` with ``key > after``, one page per query.

        Keyset pagination: each page starts after the last key of the page
        before it, so the database never skips rows with OFFSET. ``key`` must
        be one of the selected columns and unique among the rows of ``query``.
        """
        if limit is not None and limit < 0:
            msg = f"limit must be at least 0 or None, got {limit}"
            raise ValueError(msg)
        key_name = key.name
        remaining = limit
        while remaining is None or remaining > 0:
            size = (
                self.page_size if remaining is None else min(self.page_size, remaining)
            )
            page_query = query.where(key > after).order_by(key).limit(size)
            with self._connect() as connection:
                page = list(connection.execute(page_query))
            if page:
                yield page
            if len(page) < size:
                return
            after = getattr(page[-1], key_name)
            if remaining is not None:
                remaining -= len(page)


def _check_sqlite_file(database_url: str) -> None:
    url = sa.make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return
    if not Path(database).is_file():
        msg = (
            f"SQLite event store not found: {database!r}; check the path, or "
            "create the store with EventStore first"
        )
        raise FileNotFoundError(msg)


def _check_snapshot_folder(snapshot_url: str) -> None:
    is_local = "://" not in snapshot_url or snapshot_url.startswith("file://")
    folder = Path(snapshot_url.removeprefix("file://"))
    if is_local and not folder.is_dir():
        msg = (
            f"snapshot folder not found: {str(folder)!r}; check the path, or pass "
            "snapshot_url=None to load aggregates from events only"
        )
        raise FileNotFoundError(msg)


def _event_select() -> sa.Select[Any]:
    table = schema.events
    return sa.select(*(table.c[name] for name in EVENT_COLUMNS), table.c.payload)


def _stream_select(
    aggregate_type: str, aggregate_id: str, up_to_version: int | None
) -> sa.Select[Any]:
    table = schema.events
    query = (
        _event_select()
        .where(table.c.aggregate_type == aggregate_type)
        .where(table.c.aggregate_id == aggregate_id)
    )
    if up_to_version is not None:
        query = query.where(table.c.version <= up_to_version)
    return query


def _filter_events(
    query: sa.Select[Any],
    aggregate_type: str | None,
    event_type: str | Sequence[str] | None,
    since: datetime | None,
    until: datetime | None,
) -> sa.Select[Any]:
    table = schema.events
    if aggregate_type is not None:
        query = query.where(table.c.aggregate_type == aggregate_type)
    if isinstance(event_type, str):
        query = query.where(table.c.event_type == event_type)
    elif event_type is not None:
        query = query.where(table.c.event_type.in_(list(event_type)))
    if since is not None:
        query = query.where(table.c.recorded_at >= _utc(since))
    if until is not None:
        query = query.where(table.c.recorded_at < _utc(until))
    return query


def _utc(moment: datetime) -> datetime:
    """Return ``moment`` in UTC, reading a naive datetime as UTC already.

    SQLite stores the wall-clock digits without an offset, and the store
    writes them in UTC, so a bound must be converted to UTC before comparing.
    """
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _event_frame(rows: Sequence[Any]) -> pd.DataFrame:
    """Build a frame of event rows, spreading each payload's top-level fields."""
    base = pd.DataFrame(
        [row[: len(EVENT_COLUMNS)] for row in rows], columns=list(EVENT_COLUMNS)
    )
    base["recorded_at"] = pd.to_datetime(base["recorded_at"], utc=True)
    # A frame built from a list of dicts takes one column per top-level key and
    # keeps nested lists and dicts as single values, as json_normalize does with
    # max_level=0.
    payload = pd.DataFrame([row.payload for row in rows], index=base.index)
    payload.columns = [
        f"{PAYLOAD_PREFIX}{name}" if name in EVENT_COLUMNS else str(name)
        for name in payload.columns
    ]
    return pd.concat([base, payload], axis=1)


def _concat(frames: list[pd.DataFrame], empty: pd.DataFrame) -> pd.DataFrame:
    if not frames:
        return empty
    if len(frames) == 1:
        return frames[0]
    return pd.concat(frames, ignore_index=True)


def _event_of(row: Any) -> Event:
    """Return the Event of an event row, for ``Aggregate.apply``."""
    return Event(
        aggregate_type=row.aggregate_type,
        aggregate_id=row.aggregate_id,
        version=row.version,
        type=row.event_type,
        payload=row.payload,
        metadata=Metadata(command_id=row.command_id),
    )


def _state_fields(aggregate: Aggregate, fields: Sequence[str] | None) -> list[str]:
    state = aggregate.snapshot_state()
    if fields is None:
        scalar = (int, float, str, bool, type(None))
        return [name for name, value in state.items() if isinstance(value, scalar)]
    unknown = [name for name in fields if name not in state]
    if unknown:
        msg = (
            f"{aggregate.aggregate_type} has no state fields {unknown}; "
            f"its fields are {sorted(state)}"
        )
        raise KeyError(msg)
    return list(fields)
