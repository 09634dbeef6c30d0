"""The SQL event store: append events with optimistic concurrency, read them back.

SQLAlchemy Core over SQLite (the default: one file, WAL) or PostgreSQL
(``postgresql+psycopg://``). May import ``aggregates``; never ``pipeline`` or Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from aggregates.messages import Event, Metadata
from store import schema
from store.errors import SchemaError, StoreUnavailableError, VersionConflictError

logger = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///raysource.db"
DEFAULT_PAGE_SIZE = 1000
_SCHEMA_ATTEMPTS = 5
# Bound parameters per IN list; SQLite allows 32,766 per statement, PostgreSQL 65,535.
_IN_CHUNK = 500


@dataclass(frozen=True)
class CommandRecord:
    """Outcome of one command, to be recorded in one ``append`` call.

    ``events`` are the command's new events, numbered from
    ``expected_version + 1``; an empty list with ``rejection`` set records a
    rejected command. Records of one stream in one call must follow each other:
    each expects the version the one before it left.
    """

    command_id: str
    aggregate_type: str
    aggregate_id: str
    expected_version: int
    events: Sequence[Event] = ()
    rejection: str | None = None


@dataclass
class AppendResult:
    """Outcome of an ``append`` call.

    ``recorded`` contains the command ids written by this call; ``duplicates``
    maps each command id that was already recorded to its earlier outcome
    ("appended" or "rejected"), and nothing was written for it.
    """

    recorded: list[str] = field(default_factory=list)
    duplicates: dict[str, str] = field(default_factory=dict)
    num_events: int = 0


@dataclass(frozen=True)
class DeadLetter:
    """A message that could not be decoded or validated, kept with its reason."""

    reason: str
    value: bytes | None
    key: bytes | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


class EventStore:
    """Events, command outcomes and dead letters in one SQL database.

    Tables are created on first use. A database made by another schema version
    raises SchemaError. Database errors that may pass (connection refused,
    locked, timed out) raise StoreUnavailableError; nothing of the failed call
    is written. Safe to share between threads.
    """

    def __init__(self, url: str = DEFAULT_URL, *, pool_size: int = 4) -> None:
        self.url = url
        self.engine = _create_engine(url, pool_size)
        self._create_schema()

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    # -- writing ---------------------------------------------------------------

    def append(self, records: Sequence[CommandRecord]) -> AppendResult:
        """Record many commands and their events in one transaction.

        Command ids recorded before are skipped and reported as duplicates.
        Each other stream must be at the version its first record expects;
        otherwise VersionConflictError is raised and nothing is written.
        """
        result = AppendResult()
        if not records:
            return result
        _check_record_chains(records)
        now = datetime.now(UTC)
        with self._write() as connection:
            result.duplicates = self._find_commands(
                connection, [r.command_id for r in records]
            )
            fresh = [r for r in records if r.command_id not in result.duplicates]
            self._check_versions(connection, fresh)
            command_rows, event_rows = _rows(fresh, now)
            if command_rows:
                connection.execute(schema.commands.insert(), command_rows)
            if event_rows:
                connection.execute(schema.events.insert(), event_rows)
        result.recorded = [r.command_id for r in fresh]
        result.num_events = len(event_rows)
        return result

    def record_dead_letters(self, letters: Sequence[DeadLetter]) -> int:
        """Store dead letters; one already stored for the same source is kept once.

        Returns how many rows were new.
        """
        if not letters:
            return 0
        now = datetime.now(UTC)
        rows = [
            {
                "topic": letter.topic,
                "partition": letter.partition,
                "offset": letter.offset,
                "key": letter.key,
                "value": letter.value,
                "reason": letter.reason,
                "recorded_at": now,
            }
            for letter in letters
        ]
        # RETURNING counts the new rows: psycopg reports no rowcount for an
        # executemany, so PostgreSQL would otherwise always count 0.
        table = schema.dead_letters
        insert = _insert_ignoring_duplicates(self.engine, table).returning(table.c.id)
        with self._write() as connection:
            inserted = connection.execute(insert, rows).all()
        return len(inserted)

    # -- reading ---------------------------------------------------------------

    def read_stream(
        self,
        aggregate_type: str,
        aggregate_id: str,
        after_version: int = 0,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Iterator[Event]:
        """Yield a stream's events after ``after_version``, one page per query.

        At most one page is held at a time, so a long stream never sits whole in
        memory.
        """
        _check_page_size(page_size)
        table = schema.events
        while True:
            query = (
                sa.select(table)
                .where(table.c.aggregate_type == aggregate_type)
                .where(table.c.aggregate_id == aggregate_id)
                .where(table.c.version > after_version)
                .order_by(table.c.version)
                .limit(page_size)
            )
            page = self._fetch(query)
            for row in page:
                yield _event_from_row(row)
            if len(page) < page_size:
                return
            after_version = page[-1].version

    def read_all(
        self,
        after_position: int = 0,
        page_size: int = DEFAULT_PAGE_SIZE,
        aggregate_type: str | None = None,
        event_type: str | None = None,
    ) -> Iterator[Event]:
        """Yield events in global order after ``after_position``, page by page."""
        _check_page_size(page_size)
        table = schema.events
        while True:
            query = sa.select(table).where(table.c.position > after_position)
            if aggregate_type is not None:
                query = query.where(table.c.aggregate_type == aggregate_type)
            if event_type is not None:
                query = query.where(table.c.event_type == event_type)
            page = self._fetch(query.order_by(table.c.position).limit(page_size))
            for row in page:
                yield _event_from_row(row)
            if len(page) < page_size:
                return
            after_position = page[-1].position

    def stream_version(self, aggregate_type: str, aggregate_id: str) -> int:
        """Return the version of a stream's last event, 0 for an empty stream."""
        table = schema.events
        query = (
            sa.select(sa.func.max(table.c.version))
            .where(table.c.aggregate_type == aggregate_type)
            .where(table.c.aggregate_id == aggregate_id)
        )
        with self._read() as connection:
            return connection.execute(query).scalar() or 0

    def stream_versions(
        self, streams: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], int]:
        """Return the version of each (aggregate_type, aggregate_id) stream.

        Streams without events are left out.
        """
        with self._read() as connection:
            return self._stream_versions(connection, list(streams))

    def find_commands(self, command_ids: Iterable[str]) -> dict[str, str]:
        """Return the recorded outcome ("appended" or "rejected") of each known id."""
        with self._read() as connection:
            return self._find_commands(connection, list(command_ids))

    def iter_aggregate_ids(
        self, aggregate_type: str, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Iterator[str]:
        """Yield the id of every aggregate of a type that has events, in id order."""
        _check_page_size(page_size)
        table = schema.events
        after = ""
        while True:
            query = (
                sa.select(table.c.aggregate_id)
                .where(table.c.aggregate_type == aggregate_type)
                .where(table.c.aggregate_id > after)
                .group_by(table.c.aggregate_id)
                .order_by(table.c.aggregate_id)
                .limit(page_size)
            )
            page = [row.aggregate_id for row in self._fetch(query)]
            yield from page
            if len(page) < page_size:
                return
            after = page[-1]

    def count_aggregates(self) -> int:
        """Return how many distinct aggregates have events."""
        table = schema.events
        distinct = (
            sa.select(table.c.aggregate_type, table.c.aggregate_id)
            .distinct()
            .subquery()
        )
        query = sa.select(sa.func.count()).select_from(distinct)
        with self._read() as connection:
            return connection.execute(query).scalar() or 0

    def read_dead_letters(self) -> list[dict[str, Any]]:
        """Return every dead letter as a dict, oldest first."""
        query = sa.select(schema.dead_letters).order_by(schema.dead_letters.c.id)
        return [dict(row._mapping) for row in self._fetch(query)]

    def counts(self) -> dict[str, int]:
        """Return the number of events, appended and rejected commands, dead letters."""
        commands = schema.commands
        with self._read() as connection:
            num_events = connection.execute(
                sa.select(sa.func.count()).select_from(schema.events)
            )
            by_outcome = connection.execute(
                sa.select(commands.c.outcome, sa.func.count()).group_by(
                    commands.c.outcome
                )
            )
            outcomes = {row[0]: row[1] for row in by_outcome}
            num_dead = connection.execute(
                sa.select(sa.func.count()).select_from(schema.dead_letters)
            )
            return {
                "events": num_events.scalar() or 0,
                "appended_commands": outcomes.get("appended", 0),
                "rejected_commands": outcomes.get("rejected", 0),
                "dead_letters": num_dead.scalar() or 0,
            }

    def to_dataframe(self, query: sa.Select[Any] | None = None) -> Any:
        """Return the events table, or the rows of ``query``, as a pandas DataFrame."""
        import pandas as pd

        query = query if query is not None else sa.select(schema.events)
        with self._read() as connection:
            return pd.read_sql_query(query, connection)

    # -- internals -------------------------------------------------------------

    def _fetch(self, query: sa.Select[Any]) -> list[Any]:
        with self._read() as connection:
            return list(connection.execute(query))

    def _find_commands(
        self, connection: Connection, command_ids: list[str]
    ) -> dict[str, str]:
        table = schema.commands
        found: dict[str, str] = {}
        for start in range(0, len(command_ids), _IN_CHUNK):
            chunk = command_ids[start : start + _IN_CHUNK]
            query = sa.select(table.c.command_id, table.c.outcome).where(
                table.c.command_id.in_(chunk)
            )
            found.update(
                {row.command_id: row.outcome for row in connection.execute(query)}
            )
        return found

    def _check_versions(
        self, connection: Connection, records: Sequence[CommandRecord]
    ) -> None:
        expected: dict[tuple[str, str], int] = {}
        for record in records:
            if record.events:
                expected.setdefault(
                    (record.aggregate_type, record.aggregate_id),
                    record.expected_version,
                )
        actual = self._stream_versions(connection, list(expected))
        for stream, version in expected.items():
            if actual.get(stream, 0) != version:
                msg = (
                    f"stream {stream[0]}/{stream[1]} is at version "
                    f"{actual.get(stream, 0)}, not the expected {version}; "
                    "reload it and retry"
                )
                raise VersionConflictError(msg)

    def _stream_versions(
        self, connection: Connection, streams: list[tuple[str, str]]
    ) -> dict[tuple[str, str], int]:
        table = schema.events
        ids_by_type: dict[str, list[str]] = {}
        for aggregate_type, aggregate_id in streams:
            ids_by_type.setdefault(aggregate_type, []).append(aggregate_id)
        versions: dict[tuple[str, str], int] = {}
        for aggregate_type, ids in ids_by_type.items():
            # Filtering on the type too lets the unique (type, id, version)
            # index find each id with one seek.
            for start in range(0, len(ids), _IN_CHUNK):
                query = (
                    sa.select(table.c.aggregate_id, sa.func.max(table.c.version))
                    .where(table.c.aggregate_type == aggregate_type)
                    .where(table.c.aggregate_id.in_(ids[start : start + _IN_CHUNK]))
                    .group_by(table.c.aggregate_id)
                )
                for aggregate_id, version in connection.execute(query):
                    versions[(aggregate_type, aggregate_id)] = version
        return versions

    def _write(self) -> _Transaction:
        return _Transaction(self.engine, immediate=True)

    def _read(self) -> _Transaction:
        return _Transaction(self.engine, immediate=False)

    def _create_schema(self) -> None:
        # Processes that open a new PostgreSQL database at the same moment race
        # to create the tables; the loser's CREATE fails on PostgreSQL's unique
        # type names. The tables exist by then, so the next attempt only checks.
        for attempt in range(_SCHEMA_ATTEMPTS):
            try:
                self._ensure_schema()
                return
            except VersionConflictError:
                if attempt == _SCHEMA_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _ensure_schema(self) -> None:
        with self._write() as connection:
            tables = set(sa.inspect(connection).get_table_names())
            ours = {table.name for table in schema.metadata.sorted_tables}
            if "raysource_meta" not in tables and tables & ours:
                msg = (
                    f"database {_safe_url(self.url)} has raysource tables from before "
                    "schema versions were recorded; migrate it or use a new database"
                )
                raise SchemaError(msg)
            schema.metadata.create_all(connection)
            meta = schema.raysource_meta
            stored = connection.execute(
                sa.select(meta.c.value).where(meta.c.key == "schema_version")
            ).scalar()
            if stored is None:
                connection.execute(
                    meta.insert(),
                    {"key": "schema_version", "value": str(schema.SCHEMA_VERSION)},
                )
            elif stored != str(schema.SCHEMA_VERSION):
                msg = (
                    f"database {_safe_url(self.url)} has event store schema version "
                    f"{stored}, but this raysource reads version "
                    f"{schema.SCHEMA_VERSION}; migrate the database or use a new one"
                )
                raise SchemaError(msg)


class _Transaction:
    """A connection with a transaction, translating database errors.

    On SQLite a write transaction begins with BEGIN IMMEDIATE, so that two
    processes writing the same file wait on the lock instead of failing when
    a read lock cannot be upgraded.
    """

    def __init__(self, engine: Engine, immediate: bool) -> None:
        self._engine = engine
        self._immediate = immediate
        self._connection: Connection | None = None
        self._transaction: Any = None

    def __enter__(self) -> Connection:
        try:
            connection = self._engine.connect()
            if self._immediate:
                connection = connection.execution_options(raysource_immediate=True)
            self._connection = connection
            self._transaction = connection.begin()
        except sa.exc.OperationalError as error:
            self._close()
            raise _unavailable(self._engine, error) from error
        return connection

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        try:
            if kind is None:
                self._transaction.commit()
            else:
                self._transaction.rollback()
        except sa.exc.OperationalError as commit_error:
            raise _unavailable(self._engine, commit_error) from commit_error
        except sa.exc.IntegrityError as commit_error:
            raise _conflict(commit_error) from commit_error
        finally:
            self._close()
        if isinstance(error, sa.exc.IntegrityError):
            raise _conflict(error) from error
        if isinstance(error, (sa.exc.OperationalError, sa.exc.InterfaceError)):
            raise _unavailable(self._engine, error) from error

    def _close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except sa.exc.SQLAlchemyError:
                logger.debug("closing a failed connection raised", exc_info=True)
            self._connection = None


def _conflict(error: Exception) -> VersionConflictError:
    msg = (
        "append conflicted with another writer (a stream version or a command id "
        f"was written first); reload and retry: {type(error).__name__}"
    )
    return VersionConflictError(msg)


def _unavailable(engine: Engine, error: Exception) -> StoreUnavailableError:
    detail = str(getattr(error, "orig", error)).splitlines()[0][:200]
    msg = f"event store {_safe_url(str(engine.url))} is unavailable: {detail}"
    return StoreUnavailableError(msg)


def _safe_url(url: str) -> str:
    """Return the URL with any password masked, for messages and logs."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<invalid database URL>"


def _create_engine(url: str, pool_size: int) -> Engine:
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _create_sqlite_engine(url)
    return sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=10,
    )


def _create_sqlite_engine(url: str) -> Engine:
    engine = sa.create_engine(
        url, connect_args={"check_same_thread": False, "timeout": 60}
    )

    @sa_event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN can be chosen below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @sa_event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get("raysource_immediate", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _insert_ignoring_duplicates(engine: Engine, table: sa.Table) -> Any:
    if engine.dialect.name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return table.insert()


def _check_page_size(page_size: int) -> None:
    # A page size below 1 would make the paging loops index an empty page.
    if page_size < 1:
        msg = f"page_size = {page_size} is invalid: use 1 or more"
        raise ValueError(msg)


def _check_record_chains(records: Sequence[CommandRecord]) -> None:
    next_version: dict[tuple[str, str], int] = {}
    for record in records:
        stream = (record.aggregate_type, record.aggregate_id)
        expected = next_version.get(stream, record.expected_version)
        if record.expected_version != expected:
            msg = (
                f"command {record.command_id} expects {stream[0]}/{stream[1]} "
                f"at version {record.expected_version}, "
                f"but the record before it leaves {expected}"
            )
            raise ValueError(msg)
        for offset, event in enumerate(record.events, start=1):
            if event.version != record.expected_version + offset:
                msg = (
                    f"command {record.command_id}: event {event.type} has version "
                    f"{event.version}, expected {record.expected_version + offset}"
                )
                raise ValueError(msg)
        next_version[stream] = record.expected_version + len(record.events)


def _rows(
    records: Sequence[CommandRecord], now: datetime
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    command_rows = []
    event_rows = []
    for record in records:
        command_rows.append(
            {
                "command_id": record.command_id,
                "aggregate_type": record.aggregate_type,
                "aggregate_id": record.aggregate_id,
                "outcome": "rejected" if record.rejection is not None else "appended",
                "reason": record.rejection,
                "num_events": len(record.events),
                "recorded_at": now,
            }
        )
        for event in record.events:
            event_rows.append(
                {
                    "aggregate_type": event.aggregate_type,
                    "aggregate_id": event.aggregate_id,
                    "version": event.version,
                    "event_type": event.type,
                    "payload": event.payload,
                    "metadata": event.metadata.to_dict(),
                    "command_id": record.command_id,
                    "recorded_at": now,
                }
            )
    return command_rows, event_rows


def _event_from_row(row: Any) -> Event:
    recorded_at = row.recorded_at
    if recorded_at is not None and recorded_at.tzinfo is None:
        recorded_at = recorded_at.replace(tzinfo=UTC)
    return Event(
        aggregate_type=row.aggregate_type,
        aggregate_id=row.aggregate_id,
        version=row.version,
        type=row.event_type,
        payload=row.payload,
        metadata=Metadata.from_dict(row.metadata),
        position=row.position,
        recorded_at=recorded_at.isoformat() if recorded_at is not None else None,
    )
