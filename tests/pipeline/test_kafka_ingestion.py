"""KafkaIngestor end to end: a real Tansu broker, real Ray actors, a SQLite store.

Each test produces to a fresh topic, starts a controller with one host, runs
ingestor actors in a consumer group of its own, and checks the event store and
the group's committed offsets. Committed offsets are compared with the counts
the producer reports per partition, because Tansu's end_offsets() is not the
offset after the last record.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from aggregates.shop import Shop
from aggregates.workload import generate_commands
from pipeline.config import JobConfig, config_from_dict
from pipeline.kafka_ingestor import KafkaIngestorActor
from store.event_store import EventStore
from tests.conftest import TopicFactory
from tests.pipeline.conftest import (
    assert_store_matches_fold,
    recorded_commands,
    wait_until,
)

Record = tuple[bytes | None, bytes | None]
Placement = tuple[int, int]  # (partition, offset) the producer reported

# Long enough for a consumer group join (about 3 s on Tansu) plus a rebalance.
JOIN_TIMEOUT_S = 60.0


def make_config(
    tmp_path: Path,
    bootstrap_servers: str,
    topic: str,
    kafka: dict[str, Any] | None = None,
    aggregates: dict[str, Any] | None = None,
) -> JobConfig:
    """Build a config with one host, a SQLite store in tmp_path and a fresh group."""
    table: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap_servers,
            "topics": [topic],
            "group_id": f"test-group-{uuid.uuid4().hex[:12]}",
            "commit_interval_s": 0.2,
            **(kafka or {}),
        },
        "store": {
            "database_url": f"sqlite:///{tmp_path / 'events.db'}",
            "snapshot_url": str(tmp_path / "snapshots"),
        },
        "hosts": {"min_hosts": 1, "max_hosts": 1, "num_shards": 32},
    }
    if aggregates is not None:
        table["aggregates"] = aggregates
    return config_from_dict(table)


def produce(
    bootstrap_servers: str, topic: str, records: Iterable[Record]
) -> list[Placement]:
    """Produce records in order and return where each one landed."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap_servers, linger_ms=10, batch_size=256 * 1024
    )
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in records]
        producer.flush()
        placements = []
        for future in futures:
            metadata = future.get(timeout=30)
            placements.append((metadata.partition, metadata.offset))
    finally:
        producer.close()
    return placements


def end_offsets(placements: Iterable[Placement]) -> dict[int, int]:
    """Return, per partition, the offset after the last record produced."""
    ends: dict[int, int] = {}
    for partition, offset in placements:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    return ends


def committed_offsets(config: JobConfig) -> dict[int, int]:
    """Return the group's committed offset per partition of the config's topic."""
    admin = KafkaAdminClient(bootstrap_servers=config.kafka.bootstrap_servers)
    try:
        offsets = admin.list_group_offsets({config.kafka.group_id: None})
    finally:
        admin.close()
    return {
        partition.partition: meta.offset
        for partition, meta in offsets.get(config.kafka.group_id, {}).items()
        if meta is not None and meta.offset is not None and meta.offset >= 0
    }


def shop_records(messages: Iterable[dict[str, Any]]) -> list[Record]:
    return [(m["shop_id"].encode(), json.dumps(m).encode()) for m in messages]


def shop_commands(messages: Iterable[dict[str, Any]]) -> list[Any]:
    return [Shop.command_from_message(message) for message in messages]


@pytest.fixture
def start_ingestor(ray_session: Any) -> Iterator[Callable[..., Any]]:
    """Yield ``start(ingestor_id, config, controller)``; kill every ingestor after."""
    actors: list[Any] = []

    def start(ingestor_id: str, config: JobConfig, controller: Any) -> Any:
        actor = KafkaIngestorActor.remote(ingestor_id, config, controller)
        actors.append(actor)
        return actor

    yield start

    for actor in actors:
        ray.kill(actor)


def test_ingest_reference_workload_matches_fold(
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    start_job: Callable[[JobConfig], Any],
    start_ingestor: Callable[..., Any],
) -> None:
    """5,000 reference commands end as the fold's events; commits reach every end."""
    topic = kafka_topic(8)
    messages = list(generate_commands(num_shops=200, num_commands=5000))
    placements = produce(kafka_broker, topic, shop_records(messages))
    config = make_config(tmp_path, kafka_broker, topic)
    controller = start_job(config)

    ingestor = start_ingestor("ingestor-1", config, controller)
    summary = ray.get(ingestor.run.remote(max_idle_s=2.0), timeout=120)

    assert summary["records_read"] == len(messages)
    assert summary["appended"] + summary["rejected"] == len(messages)
    assert summary["dead_letters"] == 0
    assert summary["resends"] == 0
    assert summary["max_held_commands"] <= config.kafka.max_commands_held
    assert len(end_offsets(placements)) == 8
    assert committed_offsets(config) == end_offsets(placements)
    assert_store_matches_fold(
        config.store.database_url, config.store.snapshot_url, shop_commands(messages)
    )


def test_redelivery_after_kill_appends_nothing_twice(
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    start_job: Callable[[JobConfig], Any],
    start_ingestor: Callable[..., Any],
) -> None:
    """An ingestor killed before it commits leaves work that its successor dedups."""
    topic = kafka_topic(8)
    messages = list(generate_commands(num_shops=100, num_commands=2000, note_bytes=64))
    placements = produce(kafka_broker, topic, shop_records(messages))
    # No periodic commit happens in this test, and a short poll interval lets
    # the group evict the killed member soon after its session expires.
    config = make_config(
        tmp_path,
        kafka_broker,
        topic,
        kafka={"commit_interval_s": 3600.0, "max_poll_interval_ms": 10_000},
    )
    controller = start_job(config)

    first = start_ingestor("ingestor-1", config, controller)
    first.run.remote()

    def all_durable() -> bool:
        status = ray.get(first.status.remote())
        return status["appended"] + status["rejected"] == len(messages)

    wait_until(all_durable, timeout_s=JOIN_TIMEOUT_S)
    ray.kill(first, no_restart=True)
    assert committed_offsets(config) == {}

    second = start_ingestor("ingestor-1", config, controller)
    summary = ray.get(second.run.remote(max_idle_s=2.0), timeout=120)

    assert summary["records_read"] == len(messages)
    assert summary["duplicates"] == len(messages)
    assert summary["appended"] == 0
    assert summary["rejected"] == 0
    assert committed_offsets(config) == end_offsets(placements)
    assert_store_matches_fold(
        config.store.database_url, config.store.snapshot_url, shop_commands(messages)
    )


PLACE = {
    "type": "PlaceOrder",
    "shop_id": "shop-bad",
    "order_id": "ord-bad",
    "amount_cents": 500,
    "items": [{"sku": "sku-1", "qty": 1, "price_cents": 500}],
}
MAX_MESSAGE_BYTES = 4000


def _without(field: str) -> dict[str, Any]:
    return {key: value for key, value in PLACE.items() if key != field}


# (case, key, value, field named by the dead letter's reason)
BAD_MESSAGES: list[tuple[str, bytes | None, bytes | None, str]] = [
    ("not UTF-8", b"shop-bad", b"\xff\xfe\x00{", "value"),
    ("not JSON", b"shop-bad", b'{"type": "PlaceOrder",', "value"),
    ("JSON not an object", b"shop-bad", json.dumps([PLACE]).encode(), "value"),
    (
        "unknown command type",
        b"shop-bad",
        json.dumps({**PLACE, "type": "ShipOrder"}).encode(),
        "type",
    ),
    (
        "missing field",
        b"shop-bad",
        json.dumps(_without("order_id")).encode(),
        "payload.order_id",
    ),
    (
        "wrong-typed field",
        b"shop-bad",
        json.dumps({**PLACE, "amount_cents": "500"}).encode(),
        "payload.amount_cents",
    ),
    (
        "number out of range",
        b"shop-bad",
        json.dumps({**PLACE, "amount_cents": 10_000_000}).encode(),
        "payload.amount_cents",
    ),
    ("no aggregate id", None, json.dumps(_without("shop_id")).encode(), "shop_id"),
    ("key disagreeing with payload", b"shop-other", json.dumps(PLACE).encode(), "key"),
    (
        "over the size limit",
        b"shop-bad",
        json.dumps({**PLACE, "note": "n" * MAX_MESSAGE_BYTES}).encode(),
        "value",
    ),
]


def test_bad_messages_go_to_dead_letters(
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    start_job: Callable[[JobConfig], Any],
    start_ingestor: Callable[..., Any],
) -> None:
    """Every bad message is dead-lettered naming its field; the valid ones all run."""
    topic = kafka_topic(4)
    dead_letter_topic = kafka_topic(1)
    valid = list(generate_commands(num_shops=20, num_commands=300, note_bytes=64))
    records = shop_records(valid[:150])
    records += [(key, value) for _, key, value, _ in BAD_MESSAGES]
    records += shop_records(valid[150:])
    placements = produce(kafka_broker, topic, records)
    bad_placements = placements[150 : 150 + len(BAD_MESSAGES)]
    config = make_config(
        tmp_path,
        kafka_broker,
        topic,
        kafka={
            "max_message_bytes": MAX_MESSAGE_BYTES,
            "dead_letter_topic": dead_letter_topic,
        },
    )
    controller = start_job(config)

    ingestor = start_ingestor("ingestor-1", config, controller)
    summary = ray.get(ingestor.run.remote(max_idle_s=2.0), timeout=120)

    assert summary["records_read"] == len(records)
    assert summary["dead_letters"] == len(BAD_MESSAGES)
    assert summary["appended"] + summary["rejected"] == len(valid)
    assert committed_offsets(config) == end_offsets(placements)

    store = EventStore(config.store.database_url)
    try:
        letters = {
            (letter["partition"], letter["offset"]): letter
            for letter in store.read_dead_letters()
        }
        outcomes = Counter(outcome for _, outcome in recorded_commands(store))
    finally:
        store.close()
    assert len(letters) == len(BAD_MESSAGES)
    for (case, key, value, field), placement in zip(
        BAD_MESSAGES, bad_placements, strict=True
    ):
        letter = letters[placement]
        assert letter["reason"].startswith(field), case
        assert letter["value"] == value, case
        assert letter["key"] == key, case
        assert letter["topic"] == topic, case
    assert outcomes["appended"] + outcomes["rejected"] == len(valid)
    assert sum(outcomes.values()) + len(letters) == len(records)

    produced_letters = _read_all(kafka_broker, dead_letter_topic, len(BAD_MESSAGES))
    reasons = {
        dict(message.headers)["raysource-source"].decode(): message
        for message in produced_letters
    }
    for (case, _, value, field), (partition, offset) in zip(
        BAD_MESSAGES, bad_placements, strict=True
    ):
        message = reasons[f"{topic}:{partition}:{offset}"]
        assert dict(message.headers)["raysource-reason"].decode().startswith(field), (
            case
        )
        assert message.value == value, case


def _read_all(bootstrap_servers: str, topic: str, count: int) -> list[Any]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
    )
    try:
        messages = []
        for message in consumer:
            messages.append(message)
            if len(messages) == count:
                break
    finally:
        consumer.close()
    return messages


SLOW_COUNTERS = {"SlowCounter": {"class": "tests.pipeline.support:SlowCounter"}}


def test_backpressure_bounds_held_commands(
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    start_job: Callable[[JobConfig], Any],
    start_ingestor: Callable[..., Any],
) -> None:
    """With 100,000 commands waiting for a slow host, held commands stay bounded.

    Hosts take 2 ms per command here, so the test stops the ingestor after
    about 15 s instead of draining the topic.
    """
    topic = kafka_topic(8)
    num_commands = 100_000
    records = (
        (
            f"counter-{number % 1000}".encode(),
            json.dumps(
                {
                    "type": "AddToCounter",
                    "counter_id": f"counter-{number % 1000}",
                    "amount": 1,
                    "command_id": f"add-{number}",
                }
            ).encode(),
        )
        for number in range(num_commands)
    )
    placements = produce(kafka_broker, topic, records)
    max_held = 2000
    config = make_config(
        tmp_path,
        kafka_broker,
        topic,
        kafka={
            "max_commands_held": max_held,
            "max_poll_records": 500,
            "max_batch_commands": 200,
            "max_batches_in_flight_per_host": 2,
            "resume_below_fraction": 0.5,
        },
        aggregates=SLOW_COUNTERS,
    )
    controller = start_job(config)

    ingestor = start_ingestor("ingestor-1", config, controller)
    run = ingestor.run.remote()
    samples = _sample_status(ingestor, duration_s=15.0)
    ray.get(ingestor.stop.remote())
    summary = ray.get(run, timeout=60)

    assert len(placements) == num_commands
    assert max(sample["held_commands"] for sample in samples) <= max_held
    assert summary["max_held_commands"] <= max_held
    assert any(sample["paused_partitions"] for sample in samples)
    assert summary["pauses"] >= 2
    assert summary["resumes"] >= 1
    assert 0 < summary["records_read"] < num_commands
    assert summary["dead_letters"] == 0
    assert any((lag or 0) > 0 for lag in samples[-1]["lag"].values())

    store = EventStore(config.store.database_url)
    try:
        num_recorded = len(recorded_commands(store))
    finally:
        store.close()
    committed = committed_offsets(config)
    assert num_recorded == summary["appended"]
    assert 0 < sum(committed.values()) <= num_recorded


def test_host_death_resends_in_order(
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    start_job: Callable[[JobConfig], Any],
    start_ingestor: Callable[..., Any],
) -> None:
    """A host killed mid-stream: the ingestor backs off, resends, and loses nothing."""
    topic = kafka_topic(4)
    num_counters, num_commands = 50, 3000
    records = [
        (
            f"counter-{number % num_counters}".encode(),
            json.dumps(
                {
                    "type": "AddToCounter",
                    "counter_id": f"counter-{number % num_counters}",
                    "amount": 1 + number % 7,
                    "command_id": f"add-{number}",
                }
            ).encode(),
        )
        for number in range(num_commands)
    ]
    placements = produce(kafka_broker, topic, records)
    config = make_config(
        tmp_path,
        kafka_broker,
        topic,
        kafka={"max_batch_commands": 100, "retry_backoff_initial_s": 0.1},
        aggregates=SLOW_COUNTERS,
    )
    controller = start_job(config)

    ingestor = start_ingestor("ingestor-1", config, controller)
    run = ingestor.run.remote(max_idle_s=2.0)
    wait_until(
        lambda: ray.get(ingestor.status.remote())["appended"] > 300,
        timeout_s=JOIN_TIMEOUT_S,
    )
    (host,) = ray.get(controller.host_handles.remote()).values()
    ray.kill(host, no_restart=True)
    summary = ray.get(run, timeout=120)

    assert summary["resends"] > 0
    assert summary["backoffs"] > 0
    assert summary["appended"] + summary["duplicates"] >= num_commands
    assert committed_offsets(config) == end_offsets(placements)
    store = EventStore(config.store.database_url)
    try:
        recorded = [command_id for command_id, _ in recorded_commands(store)]
        streams: dict[str, list[tuple[int, int]]] = {}
        for event in store.read_all(aggregate_type="SlowCounter"):
            streams.setdefault(event.aggregate_id, []).append(
                (event.version, event.payload["amount"])
            )
    finally:
        store.close()
    assert sorted(recorded) == sorted(f"add-{n}" for n in range(num_commands))
    for counter in range(num_counters):
        numbers = range(counter, num_commands, num_counters)
        expected = [(version, 1 + n % 7) for version, n in enumerate(numbers, start=1)]
        assert streams[f"counter-{counter}"] == expected


def _sample_status(ingestor: Any, duration_s: float) -> list[dict[str, Any]]:
    samples = []
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        samples.append(ray.get(ingestor.status.remote(), timeout=10))
        time.sleep(0.05)
    return samples


def test_group_rebalance_keeps_order_and_dedups(
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    start_job: Callable[[JobConfig], Any],
    start_ingestor: Callable[..., Any],
) -> None:
    """Two ingestors and a third joining mid-stream keep order and apply once."""
    topic = kafka_topic(8)
    messages = list(generate_commands(num_shops=200, num_commands=8000, note_bytes=128))
    config = make_config(tmp_path, kafka_broker, topic)
    controller = start_job(config)

    records = shop_records(messages)
    half = len(records) // 2
    placements: list[Placement] = []
    first_half = threading.Thread(
        target=_produce_paced,
        args=(kafka_broker, topic, records[:half], 6.0, placements),
    )
    ingestors = [start_ingestor(f"ingestor-{n}", config, controller) for n in (1, 2)]
    runs = [ingestor.run.remote() for ingestor in ingestors]
    first_half.start()
    time.sleep(2.0)
    ingestors.append(start_ingestor("ingestor-3", config, controller))
    runs.append(ingestors[2].run.remote())
    # The second half goes out only once the third member owns partitions, so
    # it reads some of it whatever the join takes.
    wait_until(
        lambda: ray.get(ingestors[2].status.remote())["assigned_partitions"],
        timeout_s=JOIN_TIMEOUT_S,
    )
    first_half.join()
    _produce_paced(kafka_broker, topic, records[half:], 4.0, placements)

    ends = end_offsets(placements)
    wait_until(lambda: committed_offsets(config) == ends, timeout_s=JOIN_TIMEOUT_S)
    for ingestor in ingestors:
        ingestor.stop.remote()
    summaries = ray.get(runs, timeout=60)

    assert len(placements) == len(messages)
    assert summaries[2]["records_read"] > 0
    assert sum(s["appended"] + s["rejected"] for s in summaries) <= len(messages)
    assert sum(
        s["appended"] + s["rejected"] + s["duplicates"] for s in summaries
    ) >= len(messages)
    assert committed_offsets(config) == ends
    assert_store_matches_fold(
        config.store.database_url, config.store.snapshot_url, shop_commands(messages)
    )


def _produce_paced(
    bootstrap_servers: str,
    topic: str,
    records: list[Record],
    duration_s: float,
    placements: list[Placement],
) -> None:
    """Produce ``records`` in 20 even slices over ``duration_s`` seconds."""
    slices = 20
    size = -(-len(records) // slices)
    for start in range(0, len(records), size):
        placements.extend(
            produce(bootstrap_servers, topic, records[start : start + size])
        )
        time.sleep(duration_s / slices)
