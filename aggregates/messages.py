"""Command and event records, and their validation; standard library only."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aggregates.errors import InvalidCommandError

JsonObject = dict[str, Any]

MAX_ID_LENGTH = 256


@dataclass(frozen=True, slots=True)
class Metadata:
    """Where a command came from and which command caused an event.

    ``command_id`` identifies a command across redeliveries; ``causation_id`` is
    the id of the message that caused this one and ``correlation_id`` the id of
    the conversation it belongs to. ``topic``, ``partition`` and ``offset`` name
    the Kafka record it was read from, when there is one.
    """

    command_id: str
    causation_id: str | None = None
    correlation_id: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None

    def to_dict(self) -> JsonObject:
        """Return the metadata as a JSON-able dict, leaving out empty fields."""
        items = (
            ("command_id", self.command_id),
            ("causation_id", self.causation_id),
            ("correlation_id", self.correlation_id),
            ("topic", self.topic),
            ("partition", self.partition),
            ("offset", self.offset),
        )
        return {name: value for name, value in items if value is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Metadata:
        """Build metadata from a dict, raising InvalidCommandError on a bad field."""
        command_id = require_id(data, "command_id", prefix="metadata.")
        for name in ("causation_id", "correlation_id", "topic"):
            value = data.get(name)
            if value is not None and not isinstance(value, str):
                msg = f"metadata.{name} must be a string, got {type(value).__name__}"
                raise InvalidCommandError(msg, field=f"metadata.{name}")
        for name in ("partition", "offset"):
            value = data.get(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int)
            ):
                msg = f"metadata.{name} must be an integer, got {type(value).__name__}"
                raise InvalidCommandError(msg, field=f"metadata.{name}")
        return cls(
            command_id=command_id,
            causation_id=data.get("causation_id"),
            correlation_id=data.get("correlation_id"),
            topic=data.get("topic"),
            partition=data.get("partition"),
            offset=data.get("offset"),
        )


@dataclass(frozen=True, slots=True)
class Command:
    """A request to one aggregate: its id, the command type and a JSON payload."""

    aggregate_id: str
    type: str
    payload: JsonObject
    metadata: Metadata

    @property
    def command_id(self) -> str:
        return self.metadata.command_id

    def to_dict(self) -> JsonObject:
        """Return the command as a JSON-able dict that ``from_dict`` reads back."""
        return {
            "aggregate_id": self.aggregate_id,
            "type": self.type,
            "payload": self.payload,
            "metadata": self.metadata.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Command:
        """Build a command from a dict, raising InvalidCommandError naming the field."""
        if not isinstance(data, Mapping):
            msg = f"a command must be a JSON object, got {type(data).__name__}"
            raise InvalidCommandError(msg)
        aggregate_id = require_id(data, "aggregate_id")
        command_type = require_id(data, "type")
        payload = data.get("payload", {})
        if not isinstance(payload, dict):
            msg = f"payload must be a JSON object, got {type(payload).__name__}"
            raise InvalidCommandError(msg, field="payload")
        metadata = data.get("metadata")
        if not isinstance(metadata, Mapping):
            msg = "metadata must be a JSON object with a command_id"
            raise InvalidCommandError(msg, field="metadata")
        return cls(aggregate_id, command_type, payload, Metadata.from_dict(metadata))


@dataclass(frozen=True, slots=True)
class Event:
    """A fact recorded in one aggregate's stream.

    ``version`` is the event's position in its stream (1 for the first event);
    ``position`` is its place in the store's global order and ``recorded_at``
    the store's UTC timestamp in ISO 8601. Both are None until the event is read
    back from a store.
    """

    aggregate_type: str
    aggregate_id: str
    version: int
    type: str
    payload: JsonObject
    metadata: Metadata
    position: int | None = None
    recorded_at: str | None = None

    def to_dict(self) -> JsonObject:
        """Return the event as a JSON-able dict that ``from_dict`` reads back."""
        data: JsonObject = {
            "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id,
            "version": self.version,
            "type": self.type,
            "payload": self.payload,
            "metadata": self.metadata.to_dict(),
        }
        if self.position is not None:
            data["position"] = self.position
        if self.recorded_at is not None:
            data["recorded_at"] = self.recorded_at
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Event:
        """Build an event from a dict, raising InvalidCommandError naming the field."""
        if not isinstance(data, Mapping):
            msg = f"an event must be a JSON object, got {type(data).__name__}"
            raise InvalidCommandError(msg)
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            msg = f"version must be a positive integer, got {version!r}"
            raise InvalidCommandError(msg, field="version")
        payload = data.get("payload", {})
        if not isinstance(payload, dict):
            msg = f"payload must be a JSON object, got {type(payload).__name__}"
            raise InvalidCommandError(msg, field="payload")
        metadata = data.get("metadata")
        if not isinstance(metadata, Mapping):
            msg = "metadata must be a JSON object with a command_id"
            raise InvalidCommandError(msg, field="metadata")
        return cls(
            aggregate_type=require_id(data, "aggregate_type"),
            aggregate_id=require_id(data, "aggregate_id"),
            version=version,
            type=require_id(data, "type"),
            payload=payload,
            metadata=Metadata.from_dict(metadata),
            position=data.get("position"),
            recorded_at=data.get("recorded_at"),
        )


def require_id(data: Mapping[str, Any], name: str, prefix: str = "") -> str:
    """Return ``data[name]`` if it is a non-empty string of at most 256 characters."""
    value = data.get(name)
    if value is None:
        msg = f"{prefix}{name} is missing"
        raise InvalidCommandError(msg, field=prefix + name)
    if not isinstance(value, str):
        msg = f"{prefix}{name} must be a string, got {type(value).__name__}"
        raise InvalidCommandError(msg, field=prefix + name)
    if not value.strip():
        msg = f"{prefix}{name} must not be empty"
        raise InvalidCommandError(msg, field=prefix + name)
    if len(value) > MAX_ID_LENGTH:
        msg = f"{prefix}{name} is longer than {MAX_ID_LENGTH} characters"
        raise InvalidCommandError(msg, field=prefix + name)
    return value


@dataclass(frozen=True, slots=True)
class Field:
    """One payload field of a command schema: its type, bounds and whether required."""

    type: type | tuple[type, ...]
    required: bool = True
    min_value: float | None = None
    max_value: float | None = None
    max_length: int | None = None
    nullable: bool = False


@dataclass(frozen=True, slots=True)
class CommandSchema:
    """The payload fields a command type accepts, checked before it reaches a host."""

    fields: Mapping[str, Field] = field(default_factory=dict)

    def validate(self, payload: Mapping[str, Any]) -> None:
        """Raise InvalidCommandError naming the first field that is missing or wrong."""
        for name, spec in self.fields.items():
            if name not in payload or (payload[name] is None and not spec.nullable):
                if spec.required:
                    msg = f"payload.{name} is missing"
                    raise InvalidCommandError(msg, field=f"payload.{name}")
                continue
            validate_field(name, payload[name], spec)


def validate_field(name: str, value: Any, spec: Field) -> None:
    """Raise InvalidCommandError if ``value`` does not match ``spec``."""
    if value is None and spec.nullable:
        return
    expected = spec.type if isinstance(spec.type, tuple) else (spec.type,)
    is_bool = isinstance(value, bool)
    if not isinstance(value, expected) or (is_bool and bool not in expected):
        names = " or ".join(t.__name__ for t in expected)
        msg = f"payload.{name} must be {names}, got {type(value).__name__}"
        raise InvalidCommandError(msg, field=f"payload.{name}")
    if isinstance(value, float) and not math.isfinite(value):
        msg = f"payload.{name} must be a finite number, got {value!r}"
        raise InvalidCommandError(msg, field=f"payload.{name}")
    number: Any = value
    too_low = spec.min_value is not None and number < spec.min_value
    too_high = spec.max_value is not None and number > spec.max_value
    if too_low or too_high:
        msg = (
            f"payload.{name} is out of range: {value!r} is not within "
            f"{spec.min_value}..{spec.max_value}"
        )
        raise InvalidCommandError(msg, field=f"payload.{name}")
    sized: Any = value
    if spec.max_length is not None and len(sized) > spec.max_length:
        msg = f"payload.{name} is longer than {spec.max_length}"
        raise InvalidCommandError(msg, field=f"payload.{name}")
