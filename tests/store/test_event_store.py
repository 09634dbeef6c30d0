"""Contract suite of EventStore, run on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from aggregates import Event, Metadata
from store import (
    CommandRecord,
    DeadLetter,
    EventStore,
    SchemaError,
    StoreUnavailableError,
    VersionConflictError,
    schema,
)

TYPE = "Counter"

EVENT_COLUMNS = [
    "position",
    "aggregate_type",
    "aggregate_id",
    "version",
    "event_type",
    "payload",
    "metadata",
    "command_id",
    "recorded_at",
]

# Strings that break a query built by string formatting: quotes, comment
# markers, statement separators, LIKE wildcards and backslashes.
HOSTILE_STRINGS = [
    "x'); DROP TABLE events;--",
    "shop'; DELETE FROM commands WHERE '1'='1",
    'quote"double',
    "back\\slash\\'",
    "100% _wild_ %",
    "/* comment */ OR 1=1 --",
    "ünïcødé ✓ 名前",
]


def make_record(
    aggregate_id: str,
    expected_version: int,
    num_events: int,
    command_id: str,
    aggregate_type: str = TYPE,
    event_type: str = "Counted",
) -> CommandRecord:
    """Build a record whose events continue the stream from ``expected_version``."""
    events = [
        Event(
            aggregate_type,
            aggregate_id,
            expected_version + number,
            event_type,
            {"n": expected_version + number, "note": f"from {command_id}"},
            Metadata(command_id=command_id, correlation_id=command_id),
        )
        for number in range(1, num_events + 1)
    ]
    return CommandRecord(
        command_id, aggregate_type, aggregate_id, expected_version, events
    )


def rejected_record(
    aggregate_id: str, expected_version: int, command_id: str, reason: str
) -> CommandRecord:
    return CommandRecord(
        command_id, TYPE, aggregate_id, expected_version, (), rejection=reason
    )


def versions(store: EventStore, aggregate_id: str, **kwargs: int) -> list[int]:
    return [event.version for event in store.read_stream(TYPE, aggregate_id, **kwargs)]


def command_rows(store: EventStore) -> dict[str, dict[str, object]]:
    frame = store.to_dataframe(sa.select(schema.commands))
    return {row["command_id"]: row for row in frame.to_dict("records")}


def race_to_append(store: EventStore, version: int) -> dict[str, str]:
    """Append one event at ``version + 1`` from two threads released at once.

    Returns each writer's outcome: "appended", "conflict", or the repr of any
    other error.
    """
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def append(writer: str) -> None:
        record = make_record("race", version, 1, f"{writer}-{version}")
        barrier.wait()
        try:
            store.append([record])
            outcomes[writer] = "appended"
        except VersionConflictError:
            outcomes[writer] = "conflict"
        except Exception as error:
            # Kept as text so that the caller's assert names the unexpected error.
            outcomes[writer] = repr(error)

    threads = [
        threading.Thread(target=append, args=(writer,)) for writer in ("left", "right")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return outcomes


class TestAppend:
    def test_append_many_streams_one_call(self, event_store: EventStore) -> None:
        records = [
            make_record("a", 0, 2, "c1"),
            make_record("b", 0, 1, "c2"),
            make_record("a", 2, 3, "c3"),
            make_record("c", 0, 1, "c4"),
        ]

        result = event_store.append(records)

        assert result.recorded == ["c1", "c2", "c3", "c4"]
        assert result.duplicates == {}
        assert result.num_events == 7
        assert versions(event_store, "a") == [1, 2, 3, 4, 5]
        assert versions(event_store, "b") == [1]
        assert versions(event_store, "c") == [1]
        assert event_store.stream_version(TYPE, "a") == 5

    def test_append_empty_list_writes_nothing(self, event_store: EventStore) -> None:
        result = event_store.append([])

        assert result.recorded == []
        assert event_store.counts()["events"] == 0

    def test_append_keeps_event_fields(self, event_store: EventStore) -> None:
        event_store.append([make_record("a", 0, 1, "c1")])

        [event] = event_store.read_stream(TYPE, "a")

        assert event.type == "Counted"
        assert event.payload == {"n": 1, "note": "from c1"}
        assert event.metadata == Metadata(command_id="c1", correlation_id="c1")
        assert event.position is not None and event.position > 0
        assert event.recorded_at is not None
        assert datetime.fromisoformat(event.recorded_at).tzinfo is not None

    @pytest.mark.parametrize(("expected_version", "case"), [(1, "stale"), (3, "ahead")])
    def test_append_rejects_wrong_version(
        self, event_store: EventStore, expected_version: int, case: str
    ) -> None:
        """A wrong expected version on one stream writes nothing of the whole call."""
        event_store.append([make_record("a", 0, 2, "c1"), make_record("b", 0, 1, "c2")])
        before = event_store.counts()

        with pytest.raises(VersionConflictError, match="a is at version 2"):
            event_store.append(
                [
                    make_record("b", 1, 1, "c3"),
                    make_record("a", expected_version, 1, "c4"),
                ]
            )

        assert event_store.counts() == before
        assert versions(event_store, "a") == [1, 2]
        assert versions(event_store, "b") == [1]
        assert event_store.find_commands(["c3", "c4"]) == {}

    def test_append_rejects_stale_version(self, event_store: EventStore) -> None:
        event_store.append([make_record("a", 0, 1, "c1")])

        with pytest.raises(VersionConflictError, match="reload"):
            event_store.append([make_record("a", 0, 1, "c2")])

        assert versions(event_store, "a") == [1]

    @pytest.mark.parametrize("earlier_outcome", ["appended", "rejected"])
    def test_duplicate_command_appends_nothing(
        self, event_store: EventStore, earlier_outcome: str
    ) -> None:
        """A command id seen before is reported with its outcome, not written again."""
        if earlier_outcome == "appended":
            first = make_record("a", 0, 1, "c1")
        else:
            first = rejected_record("a", 0, "c1", "order o1 is not open")
        event_store.append([first])
        version = event_store.stream_version(TYPE, "a")

        result = event_store.append(
            [make_record("a", version, 2, "c1"), make_record("b", 0, 1, "c2")]
        )

        assert result.duplicates == {"c1": earlier_outcome}
        assert result.recorded == ["c2"]
        assert result.num_events == 1
        assert event_store.stream_version(TYPE, "a") == version
        assert event_store.find_commands(["c1"]) == {"c1": earlier_outcome}

    def test_rejected_command_recorded_with_reason(
        self, event_store: EventStore
    ) -> None:
        reason = "order o-7 is not open in shop a"

        result = event_store.append([rejected_record("a", 0, "c1", reason)])

        rows = command_rows(event_store)
        assert result.recorded == ["c1"]
        assert result.num_events == 0
        assert rows["c1"]["outcome"] == "rejected"
        assert rows["c1"]["reason"] == reason
        assert rows["c1"]["num_events"] == 0
        assert event_store.counts()["events"] == 0
        assert event_store.find_commands(["c1", "c2"]) == {"c1": "rejected"}

    def test_appended_command_has_no_reason(self, event_store: EventStore) -> None:
        event_store.append([make_record("a", 0, 3, "c1")])

        row = command_rows(event_store)["c1"]

        assert row["outcome"] == "appended"
        assert row["reason"] is None
        assert row["num_events"] == 3


class TestFailedAppend:
    @pytest.mark.parametrize(
        "records",
        [
            pytest.param(
                [
                    make_record("b", 0, 1, "c2"),
                    make_record("a", 1, 1, "c21"),
                    make_record("a", 1, 1, "c3"),
                ],
                id="second-record-breaks-chain",
            ),
            pytest.param(
                [
                    make_record("b", 0, 1, "c2"),
                    CommandRecord(
                        "c3", TYPE, "a", 1, make_record("a", 2, 1, "x").events
                    ),
                ],
                id="event-version-skips",
            ),
        ],
    )
    def test_chain_error_writes_nothing(
        self, event_store: EventStore, records: list[CommandRecord]
    ) -> None:
        event_store.append([make_record("a", 0, 1, "c1")])
        before = event_store.counts()

        with pytest.raises(ValueError, match="c3"):
            event_store.append(records)

        assert event_store.counts() == before
        assert versions(event_store, "a") == [1]
        assert versions(event_store, "b") == []

    def test_repeated_command_id_writes_nothing(self, event_store: EventStore) -> None:
        """Two records with one command id in a call fail as a conflict, atomically."""
        records = [make_record("a", 0, 1, "c1"), make_record("b", 0, 1, "c1")]

        with pytest.raises(VersionConflictError):
            event_store.append(records)

        assert event_store.counts()["events"] == 0
        assert event_store.counts()["appended_commands"] == 0

    def test_concurrent_appends_one_wins(self, event_store: EventStore) -> None:
        """Two threads appending the same version: one succeeds, the other conflicts."""
        num_rounds = 15
        winners: list[str] = []

        for version in range(num_rounds):
            outcomes = race_to_append(event_store, version)

            assert sorted(outcomes.values()) == ["appended", "conflict"], version
            winners.extend(
                w for w, outcome in outcomes.items() if outcome == "appended"
            )

        events = list(event_store.read_stream(TYPE, "race"))
        assert [event.version for event in events] == list(range(1, num_rounds + 1))
        assert [event.metadata.command_id for event in events] == [
            f"{winner}-{version}" for version, winner in enumerate(winners)
        ]
        assert event_store.counts()["appended_commands"] == num_rounds


class TestRead:
    def test_read_stream_pages_in_order(self, event_store: EventStore) -> None:
        """Pages of 7 over 50 events yield every event once, in version order."""
        for version in range(0, 50, 10):
            event_store.append(
                [
                    make_record("a", version, 10, f"a-{version}"),
                    make_record("other", version, 10, f"o-{version}"),
                ]
            )

        events = list(event_store.read_stream(TYPE, "a", page_size=7))

        assert [event.version for event in events] == list(range(1, 51))
        assert {event.aggregate_id for event in events} == {"a"}

    @pytest.mark.parametrize("after_version", [0, 7, 20, 49, 50, 60])
    def test_read_stream_after_version(
        self, event_store: EventStore, after_version: int
    ) -> None:
        event_store.append([make_record("a", 0, 50, "c1")])

        found = versions(event_store, "a", after_version=after_version, page_size=7)

        assert found == list(range(after_version + 1, 51))

    def test_read_stream_unknown_is_empty(self, event_store: EventStore) -> None:
        assert versions(event_store, "nobody") == []
        assert event_store.stream_version(TYPE, "nobody") == 0

    def test_read_stream_separates_types(self, event_store: EventStore) -> None:
        event_store.append(
            [
                make_record("a", 0, 2, "c1"),
                make_record("a", 0, 3, "c2", aggregate_type="Other"),
            ]
        )

        assert versions(event_store, "a") == [1, 2]
        assert event_store.stream_version("Other", "a") == 3

    def test_read_all_from_position(self, event_store: EventStore) -> None:
        for round_number in range(4):
            event_store.append(
                [
                    make_record(stream, 2 * round_number, 2, f"{stream}-{round_number}")
                    for stream in ("a", "b", "c")
                ]
            )
        everything = list(event_store.read_all(page_size=5))
        positions = [event.position for event in everything]
        start = positions[9]

        rest = list(event_store.read_all(after_position=start, page_size=5))

        assert len(everything) == 24
        assert positions == sorted(set(positions))
        assert [event.position for event in rest] == positions[10:]
        assert rest == everything[10:]

    def test_read_all_filters(self, event_store: EventStore) -> None:
        event_store.append(
            [
                make_record("a", 0, 2, "c1"),
                make_record("a", 0, 1, "c2", aggregate_type="Other"),
                make_record("b", 0, 1, "c3", event_type="Reset"),
            ]
        )

        by_type = list(event_store.read_all(aggregate_type="Other"))
        by_event = list(event_store.read_all(event_type="Reset", page_size=1))

        assert [(e.aggregate_type, e.aggregate_id) for e in by_type] == [("Other", "a")]
        assert [(e.aggregate_id, e.type) for e in by_event] == [("b", "Reset")]

    def test_iter_aggregate_ids_sorted_unique(self, event_store: EventStore) -> None:
        ids = ["shop-3", "shop-1", "shop-10", "shop-2", "shop-20"]
        event_store.append([make_record(i, 0, 3, f"c-{i}") for i in ids])
        event_store.append(
            [make_record("elsewhere", 0, 1, "c-x", aggregate_type="Other")]
        )

        found = list(event_store.iter_aggregate_ids(TYPE, page_size=2))

        assert found == sorted(ids)
        assert list(event_store.iter_aggregate_ids("Other")) == ["elsewhere"]
        assert list(event_store.iter_aggregate_ids("Nothing")) == []

    @pytest.mark.parametrize(
        "read",
        [
            lambda store, size: store.read_stream(TYPE, "a", page_size=size),
            lambda store, size: store.read_all(page_size=size),
            lambda store, size: store.iter_aggregate_ids(TYPE, page_size=size),
        ],
        ids=["read_stream", "read_all", "iter_aggregate_ids"],
    )
    @pytest.mark.parametrize("page_size", [0, -1])
    def test_invalid_page_size_raises(
        self, event_store: EventStore, read: Any, page_size: int
    ) -> None:
        event_store.append([make_record("a", 0, 3, "c1")])

        with pytest.raises(ValueError, match="page_size"):
            list(read(event_store, page_size))

    def test_count_aggregates(self, event_store: EventStore) -> None:
        """Aggregates of different types with one id count separately."""
        event_store.append(
            [
                make_record("a", 0, 3, "c1"),
                make_record("b", 0, 1, "c2"),
                make_record("a", 0, 1, "c3", aggregate_type="Other"),
                rejected_record("c", 0, "c4", "no"),
            ]
        )

        assert event_store.count_aggregates() == 3

    def test_counts(self, event_store: EventStore) -> None:
        event_store.append(
            [
                make_record("a", 0, 3, "c1"),
                rejected_record("a", 3, "c2", "no"),
                make_record("b", 0, 1, "c3"),
            ]
        )
        event_store.record_dead_letters([DeadLetter("bad json", b"{", offset=1)])

        assert event_store.counts() == {
            "events": 4,
            "appended_commands": 2,
            "rejected_commands": 1,
            "dead_letters": 1,
        }

    def test_to_dataframe_columns(self, event_store: EventStore) -> None:
        event_store.append([make_record("a", 0, 3, "c1")])

        frame = event_store.to_dataframe()

        assert list(frame.columns) == EVENT_COLUMNS
        assert len(frame) == 3
        assert frame["version"].tolist() == [1, 2, 3]
        assert frame["payload"].iloc[0] == {"n": 1, "note": "from c1"}

    def test_to_dataframe_empty_store(self, event_store: EventStore) -> None:
        frame = event_store.to_dataframe()

        assert list(frame.columns) == EVENT_COLUMNS
        assert len(frame) == 0


class TestDeadLetters:
    def test_dead_letters_stored_once(self, event_store: EventStore) -> None:
        """A redelivered message is stored once per (topic, partition, offset)."""
        first = DeadLetter("invalid JSON", b"{oops", b"k", "orders", 3, 41)
        second = DeadLetter("missing type", b"{}", None, "orders", 3, 42)

        num_new_first = event_store.record_dead_letters([first, second])
        num_new_again = event_store.record_dead_letters([second, first])

        stored = event_store.read_dead_letters()
        assert num_new_first == 2
        assert num_new_again == 0
        assert [row["offset"] for row in stored] == [41, 42]
        assert stored[0]["value"] == b"{oops"
        assert stored[0]["key"] == b"k"
        assert stored[0]["reason"] == "invalid JSON"
        assert stored[1]["key"] is None

    def test_dead_letters_same_offset_other_partition(
        self, event_store: EventStore
    ) -> None:
        letters = [
            DeadLetter("bad", b"x", topic="orders", partition=0, offset=7),
            DeadLetter("bad", b"x", topic="orders", partition=1, offset=7),
            DeadLetter("bad", b"x", topic="refunds", partition=0, offset=7),
        ]

        assert event_store.record_dead_letters(letters) == 3
        assert event_store.counts()["dead_letters"] == 3

    def test_dead_letters_empty_list(self, event_store: EventStore) -> None:
        assert event_store.record_dead_letters([]) == 0


class TestHostileInput:
    @pytest.mark.parametrize("text", HOSTILE_STRINGS)
    def test_hostile_ids_round_trip(self, event_store: EventStore, text: str) -> None:
        """Ids and payloads that look like SQL are stored and read back unchanged."""
        record = CommandRecord(
            command_id=text,
            aggregate_type=TYPE,
            aggregate_id=text,
            expected_version=0,
            events=[
                Event(
                    TYPE, text, 1, "Counted", {"text": text}, Metadata(command_id=text)
                )
            ],
        )
        event_store.append([record, make_record("plain", 0, 1, "plain-1")])
        event_store.record_dead_letters([DeadLetter(text, text.encode(), topic=text)])

        [event] = event_store.read_stream(TYPE, text)

        assert event.aggregate_id == text
        assert event.payload == {"text": text}
        assert event.metadata.command_id == text
        assert set(event_store.iter_aggregate_ids(TYPE)) == {text, "plain"}
        assert event_store.find_commands([text]) == {text: "appended"}
        assert event_store.read_dead_letters()[0]["reason"] == text
        assert event_store.counts() == {
            "events": 2,
            "appended_commands": 2,
            "rejected_commands": 0,
            "dead_letters": 1,
        }

    def test_hostile_id_not_a_pattern(self, event_store: EventStore) -> None:
        """A stream id with LIKE wildcards matches only itself."""
        event_store.append(
            [make_record("a%", 0, 1, "c1"), make_record("ab", 0, 2, "c2")]
        )

        assert versions(event_store, "a%") == [1]
        assert versions(event_store, "a_") == []


class TestSchema:
    def test_reopen_keeps_events(self, store_url: str) -> None:
        first = EventStore(store_url)
        first.append([make_record("a", 0, 2, "c1")])
        first.close()

        second = EventStore(store_url)
        try:
            assert versions(second, "a") == [1, 2]
        finally:
            second.close()

    def test_older_schema_version_raises(self, store_url: str) -> None:
        EventStore(store_url).close()
        engine = sa.create_engine(store_url)
        with engine.begin() as connection:
            connection.execute(
                schema.raysource_meta.update()
                .where(schema.raysource_meta.c.key == "schema_version")
                .values(value="0")
            )
        engine.dispose()

        with pytest.raises(SchemaError, match="schema version 0") as raised:
            EventStore(store_url)

        assert "migrate" in str(raised.value)

    def test_tables_without_meta_raise(self, store_url: str) -> None:
        """An events table without raysource_meta predates schema versions."""
        engine = sa.create_engine(store_url)
        schema.events.create(engine)
        engine.dispose()

        with pytest.raises(SchemaError, match="before schema versions"):
            EventStore(store_url)


class TestUnavailable:
    def test_unreachable_postgresql_raises(self) -> None:
        """A refused connection raises StoreUnavailableError without the password."""
        url = "postgresql+psycopg://raysource:s3cret@127.0.0.1:9/nowhere"

        with pytest.raises(StoreUnavailableError, match="unavailable") as raised:
            EventStore(url)

        assert "s3cret" not in str(raised.value)
        assert "127.0.0.1:9" in str(raised.value)

    def test_unopenable_sqlite_raises(self, tmp_path: Path) -> None:
        url = f"sqlite:///{tmp_path / 'missing-folder' / 'events.db'}"

        with pytest.raises(StoreUnavailableError, match="unable to open"):
            EventStore(url)
