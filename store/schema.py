"""Tables of the event store, described with SQLAlchemy Core.

``events``        one row per event; ``position`` is the global order and
                  (aggregate_type, aggregate_id, version) is unique, which is
                  what stops two writers from appending the same version.
``commands``      one row per command id ever handled: its outcome
                  ("appended" or "rejected"), the rejection reason and how many
                  events it appended; a command id found here is a duplicate.
``dead_letters``  messages that could not be decoded or validated, with the
                  raw bytes and the reason.
``raysource_meta`` the schema version of the database.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

SCHEMA_VERSION = 1

metadata = sa.MetaData()

_Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_Position = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

events = sa.Table(
    "events",
    metadata,
    sa.Column("position", _Position, primary_key=True, autoincrement=True),
    sa.Column("aggregate_type", sa.String(128), nullable=False),
    sa.Column("aggregate_id", sa.String(256), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("event_type", sa.String(128), nullable=False),
    sa.Column("payload", _Json, nullable=False),
    sa.Column("metadata", _Json, nullable=False),
    sa.Column("command_id", sa.String(256), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint(
        "aggregate_type", "aggregate_id", "version", name="uq_events_stream_version"
    ),
    sa.Index("ix_events_event_type", "event_type"),
    sa.Index("ix_events_recorded_at", "recorded_at"),
)

commands = sa.Table(
    "commands",
    metadata,
    sa.Column("command_id", sa.String(256), primary_key=True),
    sa.Column("aggregate_type", sa.String(128), nullable=False),
    sa.Column("aggregate_id", sa.String(256), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("num_events", sa.Integer, nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_commands_aggregate", "aggregate_type", "aggregate_id"),
)

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", _Position, primary_key=True, autoincrement=True),
    sa.Column("topic", sa.String(256), nullable=True),
    sa.Column("partition", sa.Integer, nullable=True),
    sa.Column("offset", sa.BigInteger, nullable=True),
    sa.Column("key", sa.LargeBinary, nullable=True),
    sa.Column("value", sa.LargeBinary, nullable=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("topic", "partition", "offset", name="uq_dead_letters_source"),
)

raysource_meta = sa.Table(
    "raysource_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)
