"""Decode Kafka records into commands, or into the reason they go to the dead letters.

The default format is a flat JSON object per record value: ``type``, the
aggregate id under the aggregate's ``id_field`` (``shop_id`` for Shop), an
optional ``command_id`` and the payload fields. A configured decoder
(``kafka.decoder = "module:function"``) replaces the JSON step: it receives
``(topic, key, value)`` and returns the flat dict, and everything after that
(type lookup, validation, key check) is the same. Nothing is ever unpickled or
evaluated. May import ``aggregates`` and ``pipeline``; no Ray, no Kafka client.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aggregates.errors import InvalidCommandError
from pipeline.config import ConfigError, JobConfig
from pipeline.protocol import BatchItem
from pipeline.registry import AggregateRegistry, import_object

__all__ = ["DecodeFailure", "Decoder", "RecordDecoder"]

RecordDecoder = Callable[[str, bytes | None, bytes | None], Any]


@dataclass(frozen=True, slots=True)
class DecodeFailure:
    """The reason a record cannot become a command, and the field at fault.

    ``reason`` is a sentence that starts with the field's name. ``field`` is
    ``value`` or ``key`` for the raw record, ``type`` for the command type, and
    the command's field (``shop_id``, ``payload.amount_cents``) otherwise.
    """

    reason: str
    field: str


def _reject_constant(name: str) -> Any:
    msg = f"{name} is not a JSON number"
    raise ValueError(msg)


# NaN and Infinity are not JSON (RFC 8259), though Python's parser accepts them.
_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


class Decoder:
    """Turn Kafka records into BatchItems, validating them as a host would.

    A record key, when present, must equal the command's aggregate id, so that
    commands of one aggregate share a partition and keep their order. A null key
    is accepted, but an empty key is compared like any other and rejected unless
    the id is empty too, which validation rejects anyway. The command id is
    ``{topic}-{partition}-{offset}`` unless the message carries one, so a
    redelivered record maps to the same command id.
    """

    def __init__(
        self,
        registry: AggregateRegistry,
        max_message_bytes: int,
        record_decoder: RecordDecoder | None = None,
        decoder_name: str = "",
    ) -> None:
        self._registry = registry
        self._max_message_bytes = max_message_bytes
        self._record_decoder = record_decoder
        self._decoder_name = decoder_name or getattr(
            record_decoder, "__name__", "decoder"
        )

    @classmethod
    def from_config(cls, config: JobConfig) -> Decoder:
        """Build the decoder of a job; ConfigError if ``kafka.decoder`` is invalid."""
        registry = AggregateRegistry.from_config(config.aggregates)
        path = config.kafka.decoder
        record_decoder = None
        if path:
            record_decoder = import_object(path, "kafka.decoder")
            if not callable(record_decoder):
                msg = (
                    f"kafka.decoder = {path!r} is invalid: expected a function "
                    "taking (topic, key, value) and returning a command dict"
                )
                raise ConfigError(msg)
        return cls(registry, config.kafka.max_message_bytes, record_decoder, path)

    def decode(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
    ) -> BatchItem | DecodeFailure:
        """Return the record's command, or a DecodeFailure naming the field at fault."""
        if value is not None and len(value) > self._max_message_bytes:
            return DecodeFailure(
                f"value is {len(value)} bytes, over the limit of "
                f"{self._max_message_bytes} (kafka.max_message_bytes)",
                "value",
            )
        if self._record_decoder is None:
            message = _parse_json(value)
        else:
            message = self._call_record_decoder(topic, key, value)
        if isinstance(message, DecodeFailure):
            return message
        return self._build(message, topic, partition, offset, key)

    def _call_record_decoder(
        self, topic: str, key: bytes | None, value: bytes | None
    ) -> Any:
        try:
            return self._record_decoder(topic, key, value)  # type: ignore[misc]
        except Exception as error:
            # The configured decoder is user code: whatever it raises marks
            # this record as undecodable, and the stream goes on.
            field = getattr(error, "field", None) or "value"
            return DecodeFailure(
                f"{field} could not be decoded by {self._decoder_name}: "
                f"{type(error).__name__}: {error}",
                field,
            )

    def _build(
        self, message: Any, topic: str, partition: int, offset: int, key: bytes | None
    ) -> BatchItem | DecodeFailure:
        if not isinstance(message, dict):
            return DecodeFailure(
                f"value must be a JSON object, got {_json_type(message)}", "value"
            )
        command_type = message.get("type")
        if not isinstance(command_type, str):
            if command_type is None:
                return DecodeFailure("type is missing", "type")
            return DecodeFailure(
                f"type must be a string, got {_json_type(command_type)}", "type"
            )
        spec = self._registry.for_command(command_type)
        if spec is None:
            return DecodeFailure(self._unknown_type_reason(command_type), "type")

        source = {
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "command_id": f"{topic}-{partition}-{offset}",
        }
        try:
            command = spec.cls.command_from_message(message, source)
        except InvalidCommandError as error:
            return DecodeFailure(str(error), error.field or "value")

        if key is not None:
            failure = _check_key(key, command.aggregate_id, spec.cls.id_field, message)
            if failure is not None:
                return failure
        return BatchItem(spec.name, command)

    def _unknown_type_reason(self, command_type: str) -> str:
        known = sorted(
            name
            for spec in self._registry.specs.values()
            for name in spec.cls.command_schemas
        )
        shown = command_type if len(command_type) <= 100 else command_type[:100] + "..."
        return f"type {shown!r} is not a known command type; known: {', '.join(known)}"


def _parse_json(value: bytes | None) -> Any:
    if value is None:
        return DecodeFailure("value is missing (a null record value)", "value")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as error:
        return DecodeFailure(
            f"value is not valid UTF-8: byte {error.start} cannot be decoded", "value"
        )
    try:
        return _JSON_DECODER.decode(text)
    except json.JSONDecodeError as error:
        return DecodeFailure(
            f"value is not valid JSON: {error.msg} at line {error.lineno} "
            f"column {error.colno}",
            "value",
        )
    except ValueError as error:
        return DecodeFailure(f"value is not valid JSON: {error}", "value")
    except RecursionError:
        return DecodeFailure(
            "value is not valid JSON: it is nested too deeply", "value"
        )


def _check_key(
    key: bytes, aggregate_id: str, id_field: str, message: dict[str, Any]
) -> DecodeFailure | None:
    try:
        key_text = key.decode("utf-8")
    except UnicodeDecodeError:
        return DecodeFailure("key is not valid UTF-8", "key")
    if key_text == aggregate_id:
        return None
    field = id_field if id_field in message else "aggregate_id"
    return DecodeFailure(
        f"key {_shorten(key_text)!r} disagrees with payload {field} "
        f"{_shorten(aggregate_id)!r}",
        "key",
    )


def _shorten(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _json_type(value: Any) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)
