"""The aggregate base class: decide events from commands, fold events into state.

Standard library only. A subclass declares its command handlers with
``@handles`` and its event appliers with ``@applies``::

    class Counter(Aggregate):
        id_field = "counter_id"

        def __init__(self, aggregate_id: str) -> None:
            super().__init__(aggregate_id)
            self.total = 0

        @handles("Add", {"amount": Field(int, min_value=1)})
        def add(self, command: Command) -> list[NewEvent]:
            return [("Added", {"amount": command.payload["amount"]})]

        @applies("Added")
        def _added(self, payload: JsonObject) -> None:
            self.total += payload["amount"]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from aggregates.errors import DomainError, InvalidCommandError
from aggregates.lifespan import DEFAULT_LIFESPAN, Lifespan
from aggregates.messages import (
    Command,
    CommandSchema,
    Event,
    Field,
    JsonObject,
    Metadata,
    require_id,
)
from aggregates.snapshot import DEFAULT_SNAPSHOT_POLICY, SnapshotPolicy

NewEvent = tuple[str, JsonObject]
Handler = Callable[[Any, Command], list[NewEvent]]
Applier = Callable[[Any, JsonObject], None]
F = TypeVar("F", bound=Callable[..., Any])

# Attributes of the base class that are bookkeeping, not domain state.
_BOOKKEEPING = frozenset({"aggregate_id", "version"})


def handles(
    command_type: str, fields: Mapping[str, Field] | None = None
) -> Callable[[F], F]:
    """Mark a method as the handler of ``command_type`` with its payload schema."""

    def mark(method: F) -> F:
        method._raysource_handles = (command_type, CommandSchema(dict(fields or {})))  # type: ignore[attr-defined]
        return method

    return mark


def applies(event_type: str) -> Callable[[F], F]:
    """Mark a method as the applier of ``event_type``; it receives the payload."""

    def mark(method: F) -> F:
        method._raysource_applies = event_type  # type: ignore[attr-defined]
        return method

    return mark


class Aggregate:
    """One entity's state, changed only by folding its events in stream order.

    ``execute`` is pure: it returns the events a command causes (versions
    numbered after the current one) or raises DomainError, and changes nothing.
    ``apply`` folds one event and advances ``version``. The default snapshot form
    is every public attribute set in ``__init__`` other than ``aggregate_id``
    and ``version``, which works when those attributes are plain JSON values;
    override ``snapshot_state`` and ``restore_state`` otherwise.

    Class attributes: ``aggregate_type`` (default: the class name), ``id_field``
    (the payload field that carries the aggregate id in flat JSON messages),
    ``lifespan`` and ``snapshot_policy`` (defaults, overridden by configuration).
    """

    aggregate_type: ClassVar[str]
    id_field: ClassVar[str] = "aggregate_id"
    lifespan: ClassVar[Lifespan] = DEFAULT_LIFESPAN
    snapshot_policy: ClassVar[SnapshotPolicy] = DEFAULT_SNAPSHOT_POLICY
    command_schemas: ClassVar[dict[str, CommandSchema]]
    _handlers: ClassVar[dict[str, Handler]]
    _appliers: ClassVar[dict[str, Applier]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "aggregate_type" not in cls.__dict__:
            cls.aggregate_type = cls.__name__
        cls.command_schemas = {}
        cls._handlers = {}
        cls._appliers = {}
        for klass in reversed(cls.__mro__):
            for attribute in vars(klass).values():
                if hasattr(attribute, "_raysource_handles"):
                    command_type, schema = attribute._raysource_handles
                    cls.command_schemas[command_type] = schema
                    cls._handlers[command_type] = attribute
                if hasattr(attribute, "_raysource_applies"):
                    cls._appliers[attribute._raysource_applies] = attribute

    def __init__(self, aggregate_id: str) -> None:
        self.aggregate_id = aggregate_id
        self.version = 0

    @classmethod
    def validate(cls, command: Command) -> None:
        """Raise InvalidCommandError if the command's type or payload is invalid."""
        schema = cls.command_schemas.get(command.type)
        if schema is None:
            known = ", ".join(sorted(cls.command_schemas)) or "none"
            msg = (
                f"unknown command type {command.type!r} for {cls.aggregate_type}; "
                f"known types: {known}"
            )
            raise InvalidCommandError(msg, field="type")
        schema.validate(command.payload)

    @classmethod
    def command_from_message(
        cls, message: Any, source: Mapping[str, Any] | None = None
    ) -> Command:
        """Build a validated command from a flat JSON object.

        The object carries ``type``, the aggregate id under ``id_field``, an
        optional ``command_id`` and the payload fields; ``aggregate_id`` is
        accepted in place of ``id_field``. An envelope with ``payload`` and
        ``metadata`` keys is read as is. ``source`` adds metadata such as
        topic, partition and offset, and gives ``command_id`` when the object
        has none. Raises InvalidCommandError naming the field at fault.
        """
        if (
            isinstance(message, Mapping)
            and "payload" in message
            and "metadata" in message
        ):
            command = Command.from_dict(message)
        else:
            command = _command_from_flat(cls, message, source or {})
        cls.validate(command)
        return command

    def execute(self, command: Command) -> list[Event]:
        """Return the events ``command`` causes, or raise DomainError.

        The aggregate itself is not changed.
        """
        if command.aggregate_id != self.aggregate_id:
            msg = (
                f"command {command.command_id} is for {command.aggregate_id!r}, "
                f"not {self.aggregate_id!r}"
            )
            raise ValueError(msg)
        self.validate(command)
        new_events = self._handlers[command.type](self, command)
        metadata = Metadata(
            command_id=command.command_id,
            causation_id=command.command_id,
            correlation_id=command.metadata.correlation_id or command.command_id,
        )
        return [
            Event(
                self.aggregate_type,
                self.aggregate_id,
                self.version + number,
                event_type,
                payload,
                metadata,
            )
            for number, (event_type, payload) in enumerate(new_events, start=1)
        ]

    def apply(self, event: Event) -> None:
        """Fold one event into the state; it must be the next version of the stream."""
        if event.version != self.version + 1:
            msg = (
                f"{self.aggregate_type}/{self.aggregate_id} is at version "
                f"{self.version}; cannot apply event version {event.version}"
            )
            raise ValueError(msg)
        applier = self._appliers.get(event.type)
        if applier is None:
            msg = f"{self.aggregate_type} has no applier for event type {event.type!r}"
            raise InvalidCommandError(msg, field="type")
        applier(self, event.payload)
        self.version = event.version

    def snapshot_state(self) -> JsonObject:
        """Return the state as a JSON-able dict that ``restore_state`` reads back."""
        return {
            name: value
            for name, value in vars(self).items()
            if not name.startswith("_") and name not in _BOOKKEEPING
        }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Set the state from a dict produced by ``snapshot_state``."""
        expected = set(self.snapshot_state())
        unknown = set(state) - expected
        if unknown:
            msg = (
                f"snapshot of {self.aggregate_type} has unknown fields: "
                f"{sorted(unknown)}"
            )
            raise InvalidCommandError(msg, field=sorted(unknown)[0])
        for name, value in state.items():
            setattr(self, name, value)

    @classmethod
    def from_snapshot(
        cls, aggregate_id: str, version: int, state: Mapping[str, Any]
    ) -> Aggregate:
        """Build an aggregate at ``version`` from its snapshot state."""
        aggregate = cls(aggregate_id)
        aggregate.restore_state(state)
        aggregate.version = version
        return aggregate


def _command_from_flat(
    cls: type[Aggregate], message: Any, source: Mapping[str, Any]
) -> Command:
    if not isinstance(message, Mapping):
        msg = f"a command must be a JSON object, got {type(message).__name__}"
        raise InvalidCommandError(msg)
    id_field = cls.id_field if cls.id_field in message else "aggregate_id"
    if id_field not in message:
        id_field = cls.id_field
    aggregate_id = require_id(message, id_field)
    command_type = require_id(message, "type")
    command_id = message.get("command_id", source.get("command_id"))
    metadata = Metadata.from_dict({**source, "command_id": command_id})
    payload = {k: v for k, v in message.items() if k not in ("type", "command_id")}
    return Command(aggregate_id, command_type, payload, metadata)


def reject(message: str) -> DomainError:
    """Return a DomainError for a handler to raise: ``raise reject("...")``."""
    return DomainError(message)
