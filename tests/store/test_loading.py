"""load_aggregate: snapshot plus later events, bounded replay memory, time travel."""

from __future__ import annotations

import itertools
import logging
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aggregates import (
    Aggregate,
    DomainError,
    Event,
    EveryNEvents,
    JsonObject,
    Metadata,
    Shop,
    applies,
)
from aggregates.workload import generate_commands
from store import (
    CommandRecord,
    EventStore,
    Snapshot,
    SnapshotStore,
    load_aggregate,
    snapshot_of,
)

SNAPSHOT_EVERY = 100
# Just under 100,000 + SNAPSHOT_EVERY, so the newest snapshot leaves the most
# events a load can ever have to replay after it.
NUM_LONG_EVENTS = 100_000 + SNAPSHOT_EVERY - 1
PAGE_SIZE = 1_000
EVENTS_PER_COMMAND = 100
RECORDS_PER_APPEND = 50


class Tally(Aggregate):
    """A tiny aggregate that counts its events and sums their numbers."""

    snapshot_policy = EveryNEvents(snapshot_every=SNAPSHOT_EVERY)

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.count = 0
        self.total = 0

    @applies("Counted")
    def _counted(self, payload: JsonObject) -> None:
        self.count += 1
        self.total += payload["n"]


def tally_records(aggregate_id: str, num_events: int) -> Iterator[CommandRecord]:
    """Yield records of up to 100 small events each that build one Tally stream."""
    for start in range(0, num_events, EVENTS_PER_COMMAND):
        command_id = f"{aggregate_id}-{start}"
        metadata = Metadata(command_id=command_id)
        events = [
            Event("Tally", aggregate_id, version, "Counted", {"n": version}, metadata)
            for version in range(
                start + 1, min(start + EVENTS_PER_COMMAND, num_events) + 1
            )
        ]
        yield CommandRecord(command_id, "Tally", aggregate_id, start, events)


def append_tally(store: EventStore, aggregate_id: str, num_events: int) -> None:
    records = tally_records(aggregate_id, num_events)
    while batch := list(itertools.islice(records, RECORDS_PER_APPEND)):
        store.append(batch)


def tally_state(num_events: int) -> dict[str, int]:
    return {"count": num_events, "total": num_events * (num_events + 1) // 2}


def loading_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "store.loading" and record.levelno == logging.WARNING
    ]


@pytest.fixture
def snapshots(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(str(tmp_path / "snapshots"))


@pytest.fixture(scope="module")
def long_stream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EventStore]:
    """Yield a SQLite store with one Tally stream "long" of NUM_LONG_EVENTS events."""
    path = tmp_path_factory.mktemp("long-stream") / "events.db"
    store = EventStore(f"sqlite:///{path}")
    append_tally(store, "long", NUM_LONG_EVENTS)

    yield store

    store.close()


class TestSnapshotThenEvents:
    def test_tally_matches_full_replay(
        self, event_store: EventStore, snapshots: SnapshotStore
    ) -> None:
        append_tally(event_store, "t", 250)
        at_200 = load_aggregate(Tally, "t", event_store, None, up_to_version=200)
        snapshots.save(snapshot_of(at_200.aggregate, snapshot_version=1))

        from_snapshot = load_aggregate(Tally, "t", event_store, snapshots, page_size=7)
        full = load_aggregate(Tally, "t", event_store, None)

        assert from_snapshot.snapshot_base == 200
        assert from_snapshot.events_replayed == 50
        assert full.events_replayed == 250
        assert from_snapshot.aggregate.version == full.aggregate.version == 250
        assert from_snapshot.aggregate.snapshot_state() == tally_state(250)
        assert full.aggregate.snapshot_state() == tally_state(250)

    def test_shop_matches_full_replay(
        self, event_store: EventStore, snapshots: SnapshotStore
    ) -> None:
        """Shops built from workload commands load the same from a snapshot."""
        shops = fold_into_store(event_store, num_shops=3, num_commands=1_500)

        for shop_id, folded in shops.items():
            middle = folded.version // 2
            partial = load_aggregate(
                Shop, shop_id, event_store, None, up_to_version=middle
            )
            snapshots.save(snapshot_of(partial.aggregate, snapshot_version=1))

            loaded = load_aggregate(Shop, shop_id, event_store, snapshots, page_size=50)
            full = load_aggregate(Shop, shop_id, event_store, None, page_size=50)

            assert loaded.snapshot_base == middle
            assert loaded.events_replayed == folded.version - middle
            assert loaded.aggregate.version == folded.version
            assert loaded.aggregate.snapshot_state() == folded.snapshot_state()
            assert full.aggregate.snapshot_state() == folded.snapshot_state()

    def test_unknown_id_loads_empty(
        self, event_store: EventStore, snapshots: SnapshotStore
    ) -> None:
        loaded = load_aggregate(Tally, "nobody", event_store, snapshots)

        assert loaded.aggregate.version == 0
        assert loaded.events_replayed == 0
        assert loaded.snapshot_base == 0

    def test_snapshot_at_stream_end_replays_nothing(
        self, event_store: EventStore, snapshots: SnapshotStore
    ) -> None:
        append_tally(event_store, "t", 300)
        snapshots.save(Snapshot("Tally", "t", 300, 1, tally_state(300)))

        loaded = load_aggregate(Tally, "t", event_store, snapshots)

        assert loaded.events_replayed == 0
        assert loaded.aggregate.version == 300
        assert loaded.aggregate.snapshot_state() == tally_state(300)


class TestBadSnapshots:
    def test_unrestorable_snapshot_replays_all(
        self,
        event_store: EventStore,
        snapshots: SnapshotStore,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A snapshot with fields the class does not have warns and is not used."""
        append_tally(event_store, "t", 120)
        state = {**tally_state(100), "colour": "red"}
        snapshots.save(Snapshot("Tally", "t", 100, 1, state))

        with caplog.at_level(logging.WARNING):
            loaded = load_aggregate(Tally, "t", event_store, snapshots)

        warnings = loading_warnings(caplog)
        assert loaded.snapshot_base == 0
        assert loaded.events_replayed == 120
        assert loaded.aggregate.snapshot_state() == tally_state(120)
        assert len(warnings) == 1
        assert "Tally/t" in warnings[0].getMessage()

    def test_other_snapshot_version_ignored(
        self, event_store: EventStore, snapshots: SnapshotStore
    ) -> None:
        append_tally(event_store, "t", 120)
        snapshots.save(Snapshot("Tally", "t", 100, 2, tally_state(100)))

        loaded = load_aggregate(Tally, "t", event_store, snapshots)

        assert loaded.snapshot_base == 0
        assert loaded.events_replayed == 120

    def test_snapshot_version_argument_used(
        self, event_store: EventStore, snapshots: SnapshotStore
    ) -> None:
        append_tally(event_store, "t", 120)
        snapshots.save(Snapshot("Tally", "t", 100, 2, tally_state(100)))

        loaded = load_aggregate(Tally, "t", event_store, snapshots, snapshot_version=2)

        assert loaded.snapshot_base == 100
        assert loaded.events_replayed == 20


class TestTimeTravel:
    @pytest.mark.parametrize(
        ("up_to_version", "expected_version"),
        [(0, 0), (1, 1), (37, 37), (250, 250), (1_000, 250)],
    )
    def test_up_to_version(
        self, event_store: EventStore, up_to_version: int, expected_version: int
    ) -> None:
        append_tally(event_store, "t", 250)

        loaded = load_aggregate(
            Tally, "t", event_store, None, page_size=7, up_to_version=up_to_version
        )

        assert loaded.aggregate.version == expected_version
        assert loaded.events_replayed == expected_version
        assert loaded.aggregate.snapshot_state() == tally_state(expected_version)

    @pytest.mark.parametrize(
        ("snapshot_at", "expected_base"),
        [(100, 100), (150, 150), (200, 0)],
        ids=["older-snapshot", "same-version", "newer-snapshot"],
    )
    def test_up_to_version_with_snapshot(
        self,
        event_store: EventStore,
        snapshots: SnapshotStore,
        snapshot_at: int,
        expected_base: int,
    ) -> None:
        """Only a snapshot at or below the target version is used."""
        append_tally(event_store, "t", 250)
        snapshots.save(Snapshot("Tally", "t", snapshot_at, 1, tally_state(snapshot_at)))

        loaded = load_aggregate(Tally, "t", event_store, snapshots, up_to_version=150)

        assert loaded.snapshot_base == expected_base
        assert loaded.events_replayed == 150 - expected_base
        assert loaded.aggregate.version == 150
        assert loaded.aggregate.snapshot_state() == tally_state(150)


class TestLongStream:
    def test_snapshot_bounds_replay(
        self, long_stream: EventStore, snapshots: SnapshotStore
    ) -> None:
        """After a snapshot every 100 events, a load replays fewer than 100 events."""
        newest_multiple = NUM_LONG_EVENTS // SNAPSHOT_EVERY * SNAPSHOT_EVERY
        snapshots.save(
            Snapshot("Tally", "long", newest_multiple, 1, tally_state(newest_multiple))
        )

        loaded = load_aggregate(Tally, "long", long_stream, snapshots)

        assert loaded.snapshot_base == newest_multiple
        assert loaded.events_replayed <= SNAPSHOT_EVERY
        assert loaded.events_replayed == NUM_LONG_EVENTS - newest_multiple
        assert loaded.aggregate.snapshot_state() == tally_state(NUM_LONG_EVENTS)

    def test_full_replay_memory_bounded(self, long_stream: EventStore) -> None:
        """A full replay keeps about one page of events in memory, not the stream."""
        event_bytes = measure_event_bytes(long_stream)
        all_events_bytes = event_bytes * NUM_LONG_EVENTS
        # At its peak a page is in memory twice, as database rows and as the
        # events made from them. The fixed margin covers the driver, SQLAlchemy
        # and the state.
        page_bound = 2 * PAGE_SIZE * event_bytes + 2 * 1024 * 1024
        load_aggregate(Tally, "long", long_stream, None, up_to_version=10)

        tracemalloc.start()
        try:
            loaded = load_aggregate(
                Tally, "long", long_stream, None, page_size=PAGE_SIZE
            )
            _, peak_bytes = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

        assert loaded.events_replayed == NUM_LONG_EVENTS
        assert loaded.aggregate.snapshot_state() == tally_state(NUM_LONG_EVENTS)
        assert peak_bytes < page_bound
        assert peak_bytes < all_events_bytes / 20


def measure_event_bytes(store: EventStore) -> float:
    """Return the traced bytes that one Event read back from ``store`` holds."""
    num_sample = PAGE_SIZE
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        sample = list(
            itertools.islice(
                store.read_stream("Tally", "long", page_size=num_sample), num_sample
            )
        )
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(sample) == num_sample
    return (after - before) / num_sample


def fold_into_store(
    store: EventStore, num_shops: int, num_commands: int
) -> dict[str, Any]:
    """Execute workload commands, append each outcome, and return the shops."""
    shops: dict[str, Shop] = {}
    records: list[CommandRecord] = []
    for message in generate_commands(num_shops, num_commands, seed=9, note_bytes=32):
        command = Shop.command_from_message(message)
        shop = shops.setdefault(command.aggregate_id, Shop(command.aggregate_id))
        expected_version = shop.version
        try:
            events = shop.execute(command)
        except DomainError as error:
            records.append(
                CommandRecord(
                    command.command_id,
                    "Shop",
                    shop.aggregate_id,
                    expected_version,
                    rejection=str(error),
                )
            )
            continue
        for event in events:
            shop.apply(event)
        records.append(
            CommandRecord(
                command.command_id, "Shop", shop.aggregate_id, expected_version, events
            )
        )
    for start in range(0, len(records), 500):
        store.append(records[start : start + 500])
    return dict(shops)
