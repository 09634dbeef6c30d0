"""Reader on SQLite and PostgreSQL: event frames, paged SQL, counts, past states."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from aggregates import (
    Aggregate,
    Event,
    FoldResult,
    InvalidCommandError,
    JsonObject,
    Metadata,
    Shop,
    applies,
    fold_commands,
)
from aggregates.workload import generate_commands
from store import (
    CommandRecord,
    DeadLetter,
    EventStore,
    SnapshotStore,
    load_aggregate,
    snapshot_of,
)
from store.reader import COUNT_COLUMNS, EVENT_COLUMNS, Reader

NUM_SHOPS = 12
NUM_COMMANDS = 400
SNAPSHOT_EVERY = 10
PAGE_SIZE = 7
RECORDS_PER_APPEND = 50
INVALID_MESSAGES = [
    {"type": "PlaceOrder", "command_id": "bad-no-shop"},
    {"type": "Explode", "shop_id": "shop-000001", "command_id": "bad-type"},
]


class Counter(Aggregate):
    """A minimal aggregate that sums the amounts of its Added events."""

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.total = 0

    @applies("Added")
    def _added(self, payload: JsonObject) -> None:
        self.total += payload["amount"]


def workload_messages() -> list[dict[str, Any]]:
    """Return the reference workload's commands plus two that fail validation."""
    return [
        *generate_commands(NUM_SHOPS, NUM_COMMANDS, seed=7, note_bytes=16),
        *INVALID_MESSAGES,
    ]


def expected_fold() -> FoldResult:
    commands = [
        Shop.command_from_message(m) for m in workload_messages()[:NUM_COMMANDS]
    ]
    return fold_commands(Shop, commands)


def append_messages(
    store: EventStore, messages: list[dict[str, Any]], source: str = "workload"
) -> FoldResult:
    """Fold Shop messages in process and append what a backfill would record.

    A message that fails validation becomes a dead letter at its position in
    ``messages``. Every other command is recorded with its events or its
    rejection reason, in message order. Every shop must be new to the store.
    """
    commands = []
    dead_letters = []
    for offset, message in enumerate(messages):
        try:
            commands.append(Shop.command_from_message(message))
        except InvalidCommandError as error:
            value = json.dumps(message).encode()
            dead_letters.append(DeadLetter(str(error), value, None, source, 0, offset))
    fold = fold_commands(Shop, commands)

    events_by_command: dict[str, list[Event]] = {}
    for events in fold.events.values():
        for event in events:
            events_by_command.setdefault(event.metadata.command_id, []).append(event)
    versions = dict.fromkeys(fold.aggregates, 0)
    records = []
    for command in commands:
        version = versions[command.aggregate_id]
        events = events_by_command.get(command.command_id, [])
        rejection = fold.rejected.get(command.command_id)
        records.append(
            CommandRecord(
                command.command_id,
                "Shop",
                command.aggregate_id,
                version,
                events,
                rejection,
            )
        )
        versions[command.aggregate_id] = version + len(events)

    for start in range(0, len(records), RECORDS_PER_APPEND):
        store.append(records[start : start + RECORDS_PER_APPEND])
    store.record_dead_letters(dead_letters)
    return fold


def save_snapshots(store: EventStore, snapshots: SnapshotStore) -> None:
    """Save each Shop's snapshot at the last multiple of SNAPSHOT_EVERY it reached."""
    for aggregate_id in store.iter_aggregate_ids("Shop"):
        version = store.stream_version("Shop", aggregate_id)
        snapshot_at = version - version % SNAPSHOT_EVERY
        if snapshot_at == 0:
            continue
        loaded = load_aggregate(
            Shop, aggregate_id, store, None, up_to_version=snapshot_at
        )
        snapshots.save(
            snapshot_of(loaded.aggregate, Shop.snapshot_policy.snapshot_version)
        )


@pytest.fixture
def snapshots(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(str(tmp_path / "snapshots"))


@pytest.fixture
def filled_store(event_store: EventStore, snapshots: SnapshotStore) -> EventStore:
    """Return the event store with the workload appended and snapshots saved."""
    append_messages(event_store, workload_messages())
    save_snapshots(event_store, snapshots)
    return event_store


@pytest.fixture
def reader(filled_store: EventStore, snapshots: SnapshotStore) -> Iterator[Reader]:
    yield Reader(filled_store, snapshots, page_size=PAGE_SIZE)


class StatementLog:
    """The SQL text of every statement an engine executes while attached."""

    def __init__(self, engine: sa.Engine) -> None:
        self.statements: list[str] = []
        self._engine = engine
        sa.event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.statements.append(" ".join(statement.split()))

    def detach(self) -> None:
        sa.event.remove(self._engine, "before_cursor_execute", self._record)

    def selects_from(self, table: str) -> list[str]:
        return [
            s
            for s in self.statements
            if s.startswith("SELECT") and f"FROM {table}" in s
        ]


# -- opening -------------------------------------------------------------------


def test_open_rejects_missing_sqlite_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "events.db"

    with pytest.raises(FileNotFoundError, match="events.db"):
        Reader.open(f"sqlite:///{missing}")

    assert not missing.exists()


def test_open_rejects_missing_snapshot_folder(
    filled_store: EventStore, tmp_path: Path
) -> None:
    missing = tmp_path / "no-snapshots"

    with pytest.raises(FileNotFoundError, match="no-snapshots"):
        Reader.open(filled_store.url, str(missing))

    assert not missing.exists()


def test_open_reads_existing_store(filled_store: EventStore, tmp_path: Path) -> None:
    with Reader.open(filled_store.url, str(tmp_path / "snapshots")) as opened:
        counts = opened.counts()

    assert counts.loc["Shop", "events"] == filled_store.counts()["events"]
    assert opened.snapshot_store is not None


def test_reader_rejects_page_size_zero(event_store: EventStore) -> None:
    with pytest.raises(ValueError, match="page_size"):
        Reader(event_store, page_size=0)


# -- events ----------------------------------------------------------------------


def test_events_spread_payload_fields(reader: Reader) -> None:
    frame = reader.events(event_type="OrderPlaced")

    assert list(frame.columns[: len(EVENT_COLUMNS)]) == list(EVENT_COLUMNS)
    assert {"order_id", "amount_cents", "items", "note"} <= set(frame.columns)
    assert (frame["event_type"] == "OrderPlaced").all()
    assert frame["amount_cents"].dtype.kind == "i"


def test_events_keep_nested_values_whole(reader: Reader) -> None:
    frame = reader.events(event_type="OrderPlaced", limit=5)

    first_items = frame["items"].iloc[0]
    assert isinstance(first_items, list)
    assert isinstance(first_items[0], dict)
    assert {"sku", "qty", "price_cents"} <= set(first_items[0])
    assert not any(column.startswith("items.") for column in frame.columns)


def test_events_recorded_at_is_utc(reader: Reader) -> None:
    frame = reader.events(limit=3)

    assert str(frame["recorded_at"].dt.tz) == "UTC"


def test_events_match_read_all(reader: Reader, filled_store: EventStore) -> None:
    frame = reader.events()
    expected = list(filled_store.read_all())

    assert frame["position"].tolist() == [e.position for e in expected]
    assert frame["aggregate_id"].tolist() == [e.aggregate_id for e in expected]
    assert frame["version"].tolist() == [e.version for e in expected]
    assert frame["event_type"].tolist() == [e.type for e in expected]
    assert frame["order_id"].tolist() == [e.payload["order_id"] for e in expected]


def test_events_filter_by_several_types(reader: Reader) -> None:
    types = ["OrderFulfilled", "OrderCancelled"]

    frame = reader.events(aggregate_type="Shop", event_type=types)
    everything = reader.events()

    assert len(frame) > 0
    assert set(frame["event_type"]) <= set(types)
    assert len(frame) == everything["event_type"].isin(types).sum()


def test_events_filter_by_unknown_type_is_empty(reader: Reader) -> None:
    frame = reader.events(aggregate_type="NoSuchType")

    assert frame.empty
    assert list(frame.columns) == list(EVENT_COLUMNS)


def test_events_limit_and_after_position(reader: Reader) -> None:
    everything = reader.events()
    start = int(everything["position"].iloc[10])

    frame = reader.events(after_position=start, limit=PAGE_SIZE * 2 + 3)

    expected = everything[everything["position"] > start].head(PAGE_SIZE * 2 + 3)
    assert frame["position"].tolist() == expected["position"].tolist()


def test_events_reject_negative_limit(reader: Reader) -> None:
    with pytest.raises(ValueError, match="limit"):
        reader.events(limit=-1)


def test_events_filter_by_recorded_time(event_store: EventStore) -> None:
    """since is inclusive and until exclusive, compared with the append time in UTC."""
    append_messages(event_store, list(generate_commands(3, 30, seed=1, note_bytes=0)))
    time.sleep(0.05)
    boundary = datetime.now(UTC)
    time.sleep(0.05)
    second = [
        {**m, "command_id": f"late-{m['command_id']}", "shop_id": "late-shop"}
        for m in generate_commands(1, 5, seed=2, note_bytes=0)
    ]
    append_messages(event_store, second)
    reader = Reader(event_store, page_size=PAGE_SIZE)

    late = reader.events(since=boundary)
    early = reader.events(until=boundary)
    naive_late = reader.events(since=boundary.replace(tzinfo=None))
    local = boundary.astimezone(timezone(timedelta(hours=2)))
    local_late = reader.events(since=local)

    assert set(late["aggregate_id"]) == {"late-shop"}
    assert len(late) == len(reader.stream("Shop", "late-shop")) > 0
    assert "late-shop" not in set(early["aggregate_id"])
    assert len(early) + len(late) == len(reader.events())
    assert naive_late["position"].tolist() == late["position"].tolist()
    assert local_late["position"].tolist() == late["position"].tolist()


def test_events_prefix_payload_field_named_like_column(event_store: EventStore) -> None:
    metadata = Metadata(command_id="c1")
    event = Event("Odd", "o1", 1, "Happened", {"version": "v9", "size": 3}, metadata)
    event_store.append([CommandRecord("c1", "Odd", "o1", 0, [event])])

    frame = Reader(event_store).events()

    assert frame["version"].tolist() == [1]
    assert frame["payload.version"].tolist() == ["v9"]
    assert frame["size"].tolist() == [3]


def test_events_are_read_in_limited_pages(
    reader: Reader, filled_store: EventStore
) -> None:
    """A filtered read runs one LIMIT query per page, with the filter in the SQL."""
    num_fulfilled = len(reader.events(event_type="OrderFulfilled"))
    log = StatementLog(filled_store.engine)
    try:
        reader.events(event_type="OrderFulfilled")
    finally:
        log.detach()

    queries = log.selects_from("events")
    assert len(queries) == num_fulfilled // PAGE_SIZE + 1
    for query in queries:
        assert "LIMIT" in query
        assert "event_type" in query.split("WHERE", 1)[1]


def test_iter_events_yields_pages(reader: Reader) -> None:
    pages = list(reader.iter_events(aggregate_type="Shop"))
    total = len(reader.events())

    assert len(pages) == math.ceil(total / PAGE_SIZE)
    assert all(len(page) == PAGE_SIZE for page in pages[:-1])
    assert sum(len(page) for page in pages) == total


# -- streams ---------------------------------------------------------------------


def test_stream_between_versions(reader: Reader) -> None:
    frame = reader.stream("Shop", "shop-000001", after_version=3, up_to_version=20)

    assert frame["version"].tolist() == list(range(4, 21))
    assert set(frame["aggregate_id"]) == {"shop-000001"}


def test_stream_matches_fold(reader: Reader) -> None:
    expected = expected_fold().events["shop-000002"]

    frame = reader.stream("Shop", "shop-000002")

    assert frame["event_type"].tolist() == [e.type for e in expected]
    assert frame["order_id"].tolist() == [e.payload["order_id"] for e in expected]


def test_stream_of_unknown_aggregate_is_empty(reader: Reader) -> None:
    assert reader.stream("Shop", "no-such-shop").empty


# -- counts ----------------------------------------------------------------------


def test_counts_per_aggregate_type(reader: Reader, filled_store: EventStore) -> None:
    fold = expected_fold()
    # A type whose only command was rejected has no events and no aggregates.
    filled_store.append(
        [CommandRecord("r1", "Gone", "g1", 0, rejection="nothing to do")]
    )

    counts = reader.counts()

    assert list(counts.columns) == list(COUNT_COLUMNS)
    assert list(counts.index) == ["Gone", "Shop"]
    assert counts.loc["Shop", "aggregates"] == len(fold.events)
    assert counts.loc["Shop", "events"] == sum(len(e) for e in fold.events.values())
    assert counts.loc["Shop", "rejected_commands"] == len(fold.rejected)
    assert counts.loc["Shop", "appended_commands"] == NUM_COMMANDS - len(fold.rejected)
    assert counts.loc["Gone"].tolist() == [0, 0, 0, 1]


def test_counts_of_empty_store(event_store: EventStore) -> None:
    counts = Reader(event_store).counts()

    assert counts.empty
    assert list(counts.columns) == list(COUNT_COLUMNS)


def test_stream_sizes_largest_first(reader: Reader) -> None:
    fold = expected_fold()
    expected = sorted(
        ((-len(events), aggregate_id) for aggregate_id, events in fold.events.items())
    )

    sizes = reader.stream_sizes("Shop", limit=5)

    assert sizes.columns.tolist() == ["aggregate_id", "events"]
    assert sizes["aggregate_id"].tolist() == [
        aggregate_id for _, aggregate_id in expected[:5]
    ]
    assert sizes["events"].tolist() == [-negative for negative, _ in expected[:5]]


def test_rejections_list_reasons(reader: Reader) -> None:
    fold = expected_fold()

    frame = reader.rejections(aggregate_type="Shop")

    assert sorted(frame["command_id"]) == sorted(fold.rejected)
    assert frame["command_id"].is_monotonic_increasing
    for row in frame.itertuples():
        assert row.reason == fold.rejected[row.command_id]


def test_rejections_of_one_aggregate(reader: Reader) -> None:
    everything = reader.rejections()
    aggregate_id = everything["aggregate_id"].iloc[0]

    frame = reader.rejections(aggregate_id=aggregate_id, limit=2)

    assert set(frame["aggregate_id"]) == {aggregate_id}
    assert len(frame) == min(2, (everything["aggregate_id"] == aggregate_id).sum())


def test_dead_letters_keep_invalid_messages(reader: Reader) -> None:
    frame = reader.dead_letters()

    assert len(frame) == len(INVALID_MESSAGES)
    assert set(frame["topic"]) == {"workload"}
    assert frame["offset"].tolist() == [NUM_COMMANDS, NUM_COMMANDS + 1]
    assert b"bad-no-shop" in frame["value"].iloc[0]
    assert "shop_id" in frame["reason"].iloc[0]


# -- states ------------------------------------------------------------------------


def test_load_latest_matches_fold(reader: Reader) -> None:
    fold = expected_fold()

    for aggregate_id, expected in fold.aggregates.items():
        loaded = reader.load(Shop, aggregate_id)

        assert loaded.aggregate.version == expected.version
        assert loaded.aggregate.snapshot_state() == expected.snapshot_state()


def test_load_at_earlier_version(reader: Reader) -> None:
    events = expected_fold().events["shop-000001"]
    version = len(events) // 2
    expected = Shop("shop-000001")
    for event in events[:version]:
        expected.apply(event)

    loaded = reader.load(Shop, "shop-000001", version=version)

    assert loaded.aggregate.version == version
    assert loaded.aggregate.snapshot_state() == expected.snapshot_state()
    assert loaded.snapshot_base <= version


def test_load_starts_from_snapshot(reader: Reader, snapshots: SnapshotStore) -> None:
    [stored] = snapshots.list_versions("Shop", "shop-000001").values()
    latest_snapshot = stored[-1]
    stream_end = int(reader.stream("Shop", "shop-000001")["version"].max())

    loaded = reader.load(Shop, "shop-000001", version=latest_snapshot + 1)

    assert latest_snapshot > 0
    assert loaded.snapshot_base == latest_snapshot
    assert (
        loaded.events_replayed == min(latest_snapshot + 1, stream_end) - latest_snapshot
    )


def test_load_past_the_end_stops_at_latest(reader: Reader) -> None:
    latest = reader.load(Shop, "shop-000003").aggregate.version

    loaded = reader.load(Shop, "shop-000003", version=latest + 100)

    assert loaded.aggregate.version == latest


def test_load_unknown_aggregate_is_new(reader: Reader) -> None:
    assert reader.load(Shop, "no-such-shop").aggregate.version == 0


def test_load_rejects_negative_version(reader: Reader) -> None:
    with pytest.raises(ValueError, match="version"):
        reader.load(Shop, "shop-000001", version=-1)


def test_state_history_matches_each_load(
    reader: Reader, filled_store: EventStore
) -> None:
    history = reader.state_history(Shop, "shop-000004")

    assert history["version"].tolist() == list(range(1, len(history) + 1))
    assert "open_orders" not in history.columns
    for row in history.itertuples():
        state = load_aggregate(
            Shop, "shop-000004", filled_store, None, up_to_version=row.version
        ).aggregate.snapshot_state()
        assert row.orders_placed == state["orders_placed"]
        assert row.revenue_cents == state["revenue_cents"]


def test_state_history_named_fields_up_to_version(reader: Reader) -> None:
    history = reader.state_history(
        Shop, "shop-000001", fields=["revenue_cents", "open_orders"], up_to_version=12
    )

    assert history.columns.tolist() == [
        "version",
        "event_type",
        "recorded_at",
        "revenue_cents",
        "open_orders",
    ]
    assert history["version"].tolist() == list(range(1, 13))
    for row in history.itertuples():
        loaded = reader.load(Shop, "shop-000001", version=row.version)
        assert row.open_orders == loaded.aggregate.snapshot_state()["open_orders"]


def test_state_history_rejects_unknown_field(reader: Reader) -> None:
    with pytest.raises(KeyError, match="no_such_field"):
        reader.state_history(Shop, "shop-000001", fields=["no_such_field"])


def test_state_history_of_unknown_aggregate_is_empty(reader: Reader) -> None:
    history = reader.state_history(Shop, "no-such-shop")

    assert history.empty
    assert "revenue_cents" in history.columns


def test_state_history_of_custom_aggregate(event_store: EventStore) -> None:
    """The Reader folds any Aggregate subclass, here one that is not in a package."""
    events = [
        Event("Counter", "c", v, "Added", {"amount": v}, Metadata(command_id=f"c{v}"))
        for v in range(1, 6)
    ]
    records = [
        CommandRecord(f"c{v}", "Counter", "c", v - 1, [events[v - 1]])
        for v in range(1, 6)
    ]
    event_store.append(records)

    history = Reader(event_store, page_size=2).state_history(Counter, "c")

    assert history["total"].tolist() == [1, 3, 6, 10, 15]
