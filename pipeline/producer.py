"""Produce command dicts to a Kafka topic, keyed by aggregate id.

The demo and the benchmarks use it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

logger = logging.getLogger(__name__)


def create_topic(bootstrap_servers: str, topic: str, num_partitions: int = 8) -> None:
    """Create ``topic`` with ``num_partitions`` partitions.

    An existing topic is kept as it is.
    """
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap_servers, client_id="raysource-admin"
    )
    try:
        admin.create_topics([NewTopic(topic, num_partitions, replication_factor=1)])
        logger.info("topic created topic=%s partitions=%d", topic, num_partitions)
    except TopicAlreadyExistsError:
        logger.info("topic exists topic=%s", topic)
    finally:
        admin.close()


def produce_commands(
    bootstrap_servers: str,
    topic: str,
    commands: Iterable[dict[str, Any]],
    key_field: str,
    progress: Callable[[int], None] | None = None,
) -> dict[int, int]:
    """Send each command as JSON with its ``key_field`` value as the key.

    A command without the key field is sent with a null key (it will become a
    dead letter downstream; nothing is dropped here). Returns, per partition,
    the offset after the last record written, from the broker's acknowledgements.
    """
    sent = 0

    def encoded() -> Iterable[tuple[bytes | None, bytes]]:
        nonlocal sent
        for command in commands:
            key = command.get(key_field)
            encoded_key = None if key is None else str(key).encode()
            yield encoded_key, json.dumps(command, separators=(",", ":")).encode()
            sent += 1
            if progress is not None and sent % 10_000 == 0:
                progress(sent)

    ends = produce_raw(bootstrap_servers, topic, encoded())
    if progress is not None:
        progress(sent)
    logger.info("commands produced topic=%s records=%d", topic, sent)
    return ends


def produce_raw(
    bootstrap_servers: str,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes]],
) -> dict[int, int]:
    """Send (key, value) records as they are; return the end offset per partition."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id="raysource-producer",
        linger_ms=20,
        batch_size=512 * 1024,
        max_request_size=8 * 1024 * 1024,
        acks=1,
        # Idempotence needs acks="all", and one loopback broker gains nothing from it.
        enable_idempotence=False,
    )
    ends: dict[int, int] = {}

    def on_sent(metadata: Any) -> None:
        end = metadata.offset + 1
        ends[metadata.partition] = max(ends.get(metadata.partition, 0), end)

    try:
        for key, value in records:
            producer.send(topic, value=value, key=key).add_callback(on_sent)
        producer.flush()
    finally:
        producer.close()
    return ends
