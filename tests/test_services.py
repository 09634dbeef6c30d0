"""Smoke tests that each service fixture starts a service that works."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray
import s3fs
import sqlalchemy
from kafka import KafkaConsumer, KafkaProducer

CONSUME_TIMEOUT_S = 30.0


def test_kafka_round_trip_through_group(
    kafka_broker: str, kafka_topic: Callable[..., str]
) -> None:
    """Produce 3 records on an 8-partition topic and read them in a group."""
    topic = kafka_topic()
    sent = {f"key-{i}".encode(): f"value-{i}".encode() for i in range(3)}

    producer = KafkaProducer(bootstrap_servers=kafka_broker)
    for key, value in sent.items():
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()

    consumer = KafkaConsumer(
        bootstrap_servers=kafka_broker,
        group_id=f"test-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        # With kafka-python 3.0's defaults, joining a group on Tansu 0.6.0 took
        # about 23 s on this project's test machine, and with these about 3 s.
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    consumer.subscribe([topic])
    received: dict[bytes, bytes] = {}
    deadline = time.monotonic() + CONSUME_TIMEOUT_S
    while len(received) < len(sent) and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            for record in records:
                received[record.key] = record.value
    consumer.close()

    assert received == sent


def test_kafka_topic_has_requested_partitions(
    kafka_broker: str, kafka_topic: Callable[..., str]
) -> None:
    topic = kafka_topic(num_partitions=3)

    consumer = KafkaConsumer(bootstrap_servers=kafka_broker)
    partitions = consumer.partitions_for_topic(topic)
    consumer.close()

    assert partitions == {0, 1, 2}


def test_s3_put_and_get_object(
    s3_bucket: str, s3_storage_options: dict[str, Any]
) -> None:
    # skip_instance_cache keeps this file system from being reused by other
    # tests that pass the same options.
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options)
    path = f"{s3_bucket}/smoke/object.bin"

    filesystem.pipe(path, b"raysource")

    assert filesystem.cat(path) == b"raysource"


def test_postgres_select_one(pg_url: str) -> None:
    engine = sqlalchemy.create_engine(pg_url)
    try:
        with engine.connect() as connection:
            value = connection.execute(sqlalchemy.text("select 1")).scalar_one()
    finally:
        engine.dispose()

    assert value == 1


def test_ray_remote_call(ray_session: Any) -> None:
    @ray.remote
    def add(left: int, right: int) -> int:
        return left + right

    assert ray.get(add.remote(2, 3)) == 5


def test_ray_binds_to_loopback(ray_session: Any) -> None:
    assert ray.util.get_node_ip_address() == "127.0.0.1"


def test_retail_parquet_has_rows(retail_parquet: Path) -> None:
    assert pq.read_metadata(retail_parquet).num_rows > 0
