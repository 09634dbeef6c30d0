"""Bad input: every record of the corpus is dead-lettered or rejected, naming its field.

The corpus is ``tests/pipeline/bad_messages.py``. Each record is checked once
against the decoder alone, and once on its way through Kafka, an ingestor, a
host and a PostgreSQL event store, mixed with valid commands of the reference
workload. PostgreSQL is the stricter store: it rejects U+0000 in text and
numbers beyond a double in jsonb, which SQLite stores.

A command id seen before is acknowledged as a duplicate without running,
whatever its payload. Telling a redelivery from a new command that reuses an
id would need a digest of each command's payload in the commands table, which
is a schema change. So a reused id with another payload is not dead-lettered:
the first command's events stand, and the second is counted as a duplicate.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import sqlalchemy as sa

from aggregates import Shop
from aggregates.workload import generate_commands
from pipeline.config import JobConfig, config_from_dict
from pipeline.decoding import DecodeFailure, Decoder
from pipeline.kafka_ingestor import KafkaIngestorActor
from pipeline.protocol import APPENDED, DUPLICATE, BatchItem
from store import EventStore, schema
from tests.conftest import TopicFactory
from tests.pipeline.bad_messages import (
    DEAD_LETTERS,
    DUPLICATE_ID,
    MAX_MESSAGE_BYTES,
    NULL_KEY,
    REJECTIONS,
    BadMessage,
)
from tests.pipeline.conftest import (
    assert_store_matches_fold,
    batch,
    recorded_commands,
    sqlite_url,
    stored_streams,
)
from tests.pipeline.test_kafka_ingestion import (
    committed_offsets,
    end_offsets,
    produce,
    shop_records,
)

RUN_TIMEOUT_S = 180.0


def make_decoder() -> Decoder:
    config = config_from_dict({"kafka": {"max_message_bytes": MAX_MESSAGE_BYTES}})
    return Decoder.from_config(config)


def decode(message: BadMessage, offset: int = 7) -> BatchItem | DecodeFailure:
    return make_decoder().decode("orders", 2, offset, message.key, message.value)


@pytest.mark.parametrize("message", DEAD_LETTERS, ids=lambda m: m.case)
def test_decoder_rejects_bad_record(message: BadMessage) -> None:
    """The decoder returns a failure whose reason starts with the bad field."""
    failure = decode(message)

    assert isinstance(failure, DecodeFailure)
    assert failure.field == message.field
    assert failure.reason.startswith(message.field + " ")


@pytest.mark.parametrize(
    "message", [*REJECTIONS, NULL_KEY, *DUPLICATE_ID], ids=lambda m: m.case
)
def test_decoder_accepts_valid_record(message: BadMessage) -> None:
    """Records that are valid commands decode, with the command id they carry."""
    item = decode(message)

    assert isinstance(item, BatchItem)
    assert item.command.command_id == json.loads(message.value or b"")["command_id"]


def test_decoder_reason_is_printable() -> None:
    """Reasons quote bad text escaped, so a dead letter's reason is storable text."""
    for message in DEAD_LETTERS:
        failure = decode(message)
        assert isinstance(failure, DecodeFailure)
        assert failure.reason.isprintable(), message.case
        assert len(failure.reason) < 400, message.case


def test_duplicate_id_other_payload_not_executed(
    tmp_path: Path, make_host: Callable[..., Any]
) -> None:
    """A second command with a known id is a duplicate; the first one's events stay."""
    host = make_host()
    first, second = (decode(message) for message in DUPLICATE_ID)
    assert isinstance(first, BatchItem)
    assert isinstance(second, BatchItem)

    results = host.execute_batch(batch([first.command])).results
    results += host.execute_batch(batch([second.command], epoch=1)).results

    assert [r.status for r in results] == [APPENDED, DUPLICATE]
    store = EventStore(sqlite_url(tmp_path))
    try:
        streams = stored_streams(store)
        recorded = recorded_commands(store)
    finally:
        store.close()
    assert [row[2]["order_id"] for row in streams["shop-dup"]] == ["ord-first"]
    assert recorded == [("dup-1", "appended")]


@pytest.fixture
def start_ingestor(ray_session: Any) -> Iterator[Callable[[str, JobConfig, Any], Any]]:
    """Yield ``start(ingestor_id, config, controller)``; kill every ingestor after."""
    actors: list[Any] = []

    def start(ingestor_id: str, config: JobConfig, controller: Any) -> Any:
        actor = KafkaIngestorActor.remote(ingestor_id, config, controller)
        actors.append(actor)
        return actor

    yield start

    for actor in actors:
        ray.kill(actor)


def test_bad_input_through_kafka_accounted(
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    pg_database: str,
    start_job: Callable[[JobConfig], Any],
    start_ingestor: Callable[[str, JobConfig, Any], Any],
) -> None:
    """Bad records mixed into valid ones: each accounted for, the valid ones all run.

    Every record ends as exactly one of: a dead letter naming its field, a
    recorded command (appended or rejected), or the duplicate of a recorded
    command id.
    """
    topic = kafka_topic(4)
    valid = list(generate_commands(num_shops=40, num_commands=600, note_bytes=64))
    middle = len(DEAD_LETTERS) // 2
    corpus: list[BadMessage] = [
        *DEAD_LETTERS[:middle],
        *REJECTIONS,
        NULL_KEY,
        DUPLICATE_ID[0],
    ]
    corpus_after: list[BadMessage] = [*DEAD_LETTERS[middle:], DUPLICATE_ID[1]]
    records = shop_records(valid[:200])
    records += [(m.key, m.value) for m in corpus]
    records += shop_records(valid[200:400])
    records += [(m.key, m.value) for m in corpus_after]
    records += shop_records(valid[400:])
    placements = produce(kafka_broker, topic, records)
    placed = dict(
        zip(
            [m.case for m in corpus + corpus_after],
            placements[200 : 200 + len(corpus)]
            + placements[400 + len(corpus) : 400 + len(corpus) + len(corpus_after)],
            strict=True,
        )
    )
    config = config_from_dict(
        {
            "kafka": {
                "bootstrap_servers": kafka_broker,
                "topics": [topic],
                "group_id": f"bad-input-{uuid.uuid4().hex[:12]}",
                "commit_interval_s": 0.2,
                "max_message_bytes": MAX_MESSAGE_BYTES,
            },
            "store": {
                "database_url": pg_database,
                "snapshot_url": str(tmp_path / "snapshots"),
            },
            "hosts": {"min_hosts": 1, "max_hosts": 1, "num_shards": 16},
        }
    )
    controller = start_job(config)

    ingestor = start_ingestor("ingestor-1", config, controller)
    summary = ray.get(ingestor.run.remote(max_idle_s=2.0), timeout=RUN_TIMEOUT_S)

    num_commands = len(valid) + len(REJECTIONS) + 2
    assert summary["records_read"] == len(records)
    assert summary["dead_letters"] == len(DEAD_LETTERS)
    assert summary["appended"] + summary["rejected"] == num_commands
    assert summary["duplicates"] == 1
    assert summary["resends"] == 0
    assert committed_offsets(config) == end_offsets(placements)

    store = EventStore(pg_database)
    try:
        letters = {
            (letter["partition"], letter["offset"]): letter
            for letter in store.read_dead_letters()
        }
        reasons = {
            row.command_id: row.reason
            for row in _command_rows(store)
            if row.outcome == "rejected"
        }
        num_recorded = len(recorded_commands(store))
    finally:
        store.close()
    assert len(letters) == len(DEAD_LETTERS)
    for message in DEAD_LETTERS:
        letter = letters[placed[message.case]]
        assert letter["reason"].startswith(message.field + " "), message.case
        assert letter["key"] == message.key, message.case
        assert letter["value"] == message.value, message.case
        assert letter["topic"] == topic, message.case
    for message in REJECTIONS:
        command_id = json.loads(message.value or b"")["command_id"]
        assert message.field in reasons[command_id], message.case
    assert num_recorded == num_commands
    assert num_recorded + len(letters) + summary["duplicates"] == len(records)

    accepted = [*REJECTIONS, NULL_KEY, *DUPLICATE_ID]
    commands = [Shop.command_from_message(m) for m in valid]
    commands += [
        Shop.command_from_message(json.loads(m.value or b"")) for m in accepted
    ]
    assert_store_matches_fold(pg_database, config.store.snapshot_url, commands)


def _command_rows(store: EventStore) -> list[Any]:
    with store.engine.connect() as connection:
        return list(connection.execute(sa.select(schema.commands)))
