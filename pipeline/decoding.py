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
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aggregates.errors import InvalidCommandError
from aggregates.messages import Command
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


def _parse_finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        msg = f"number {_shorten(text, 40)} is out of the range of a double"
        raise ValueError(msg)
    return number


# NaN and Infinity are not JSON (RFC 8259), though Python's parser accepts them.
# A number such as 1e400 parses to infinity, which PostgreSQL's jsonb rejects.
_JSON_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_parse_finite_float
)

# Nesting levels a command may have. Ray pickles every batch it sends to a host,
# and the store encodes payloads as JSON; both recurse per level under Python's
# recursion limit of 1,000 frames. A payload nested 500 levels deep already
# failed to pickle (Python 3.11), which failed its whole batch at every resend.
MAX_NESTING_DEPTH = 100

# U+0000 cannot be stored in PostgreSQL text or jsonb, and a lone surrogate
# cannot be encoded as UTF-8 for any database. Either would fail every append
# of the batch that carries it, again at each resend, so such a record is
# dead-lettered here. In JSON both can only arrive as \u escapes.
_UNSTORABLE_CHARACTER = re.compile("[\x00\ud800-\udfff]")


class Decoder:
    """Turn Kafka records into BatchItems, validating them as a host would.

    Records that no batch could carry to the store are rejected here too:
    JSON nested deeper than ``MAX_NESTING_DEPTH``, numbers beyond a double, and
    strings with U+0000 or an unpaired surrogate.

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
        is_custom = self._record_decoder is not None
        # A JSON value with no more brackets than the limit cannot nest deeper,
        # so only other values are walked.
        brackets = 0 if value is None else value.count(b"[") + value.count(b"{")
        if is_custom or brackets > MAX_NESTING_DEPTH:
            if _is_nested_deeper(message, MAX_NESTING_DEPTH):
                return DecodeFailure(
                    f"value is nested deeper than {MAX_NESTING_DEPTH} levels",
                    "value",
                )
        # Only a \u escape can put U+0000 or a surrogate into parsed JSON.
        check_characters = is_custom or (value is not None and b"\\u" in value)
        return self._build(message, topic, partition, offset, key, check_characters)

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
        self,
        message: Any,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        check_characters: bool,
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
        if check_characters:
            field = _unstorable_field(command, spec.cls.id_field)
            if field is not None:
                return DecodeFailure(
                    f"{field} contains U+0000 or an unpaired surrogate, which "
                    "the event store cannot store",
                    field,
                )
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


def _is_nested_deeper(value: Any, limit: int) -> bool:
    """Return whether objects and arrays in ``value`` nest over ``limit`` levels."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in children)
    return False


def _unstorable_field(command: Command, id_field: str) -> str | None:
    """Return the first field that contains U+0000 or a lone surrogate, or None."""
    metadata = command.metadata
    named = (
        (id_field, command.aggregate_id),
        ("metadata.command_id", metadata.command_id),
        ("metadata.causation_id", metadata.causation_id),
        ("metadata.correlation_id", metadata.correlation_id),
    )
    for name, text in named:
        if text is not None and _UNSTORABLE_CHARACTER.search(text):
            return name
    return _unstorable_in("payload", command.payload)


def _unstorable_in(path: str, value: Any) -> str | None:
    if isinstance(value, str):
        return path if _UNSTORABLE_CHARACTER.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _UNSTORABLE_CHARACTER.search(key):
                return f"{path}.{key!r}"
            found = _unstorable_in(f"{path}.{key}", item)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _unstorable_in(f"{path}[{index}]", item)
            if found is not None:
                return found
    return None


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
