"""Helpers of the backfill tests: configurations, JSON-lines files, store contents."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from pipeline.config import JobConfig, config_from_dict
from store import schema
from store.event_store import EventStore

StreamEvents = dict[tuple[str, str], list[tuple[int, str, Any]]]


def store_config(tmp_path: Path, name: str, **sections: Any) -> JobConfig:
    """Return a configuration with its own SQLite file and snapshot folder.

    ``sections`` are merged into the configuration table, e.g. ``aggregates=...``.
    """
    table: dict[str, Any] = {
        "log_level": "WARNING",
        "store": {
            "database_url": f"sqlite:///{tmp_path / f'{name}.db'}",
            "snapshot_url": str(tmp_path / f"{name}-snapshots"),
        },
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(table.get(key), dict):
            table[key] = {**table[key], **value}
        else:
            table[key] = value
    return config_from_dict(table)


def write_json_lines(path: Path, rows: Iterable[Any]) -> Path:
    """Write each row as one JSON line and return the path."""
    with open(path, "w") as lines:
        for row in rows:
            lines.write(json.dumps(row) + "\n")
    return path


def stream_events(config: JobConfig) -> StreamEvents:
    """Return each stream's events as (version, event type, payload), in order."""
    events = EventStore(config.store.database_url)
    streams: StreamEvents = {}
    try:
        for event in events.read_all(page_size=5000):
            key = (event.aggregate_type, event.aggregate_id)
            streams.setdefault(key, []).append(
                (event.version, event.type, event.payload)
            )
    finally:
        events.close()
    return streams


def command_outcomes(config: JobConfig) -> dict[str, tuple[str, str | None, int]]:
    """Return each command id with its outcome, rejection reason and event count."""
    events = EventStore(config.store.database_url)
    table = schema.commands
    query = sa.select(
        table.c.command_id, table.c.outcome, table.c.reason, table.c.num_events
    )
    try:
        frame = events.to_dataframe(query)
    finally:
        events.close()
    # pandas reads a missing reason as NaN.
    return {
        row.command_id: (
            row.outcome,
            row.reason if isinstance(row.reason, str) else None,
            int(row.num_events),
        )
        for row in frame.itertuples(index=False)
    }


def dead_letters(config: JobConfig) -> list[dict[str, Any]]:
    """Return every dead letter of the store, oldest first."""
    events = EventStore(config.store.database_url)
    try:
        return events.read_dead_letters()
    finally:
        events.close()


def store_counts(config: JobConfig) -> dict[str, int]:
    """Return the store's counts of events, commands by outcome and dead letters."""
    events = EventStore(config.store.database_url)
    try:
        return events.counts()
    finally:
        events.close()


def order_command(row: dict[str, Any], row_number: int) -> dict[str, Any]:
    """Map a flat order row (shop, order, amount, action) to a Shop command.

    A mapping given as 'module:function', for tests of files whose rows are
    not commands yet.
    """
    if row.get("action") == "fulfill":
        return {
            "type": "FulfillOrder",
            "shop_id": row.get("shop"),
            "order_id": row.get("order"),
        }
    return {
        "type": "PlaceOrder",
        "shop_id": row.get("shop"),
        "order_id": row.get("order"),
        "amount_cents": row.get("amount"),
        "items": [],
        "command_id": f"orders-{row_number}",
    }
