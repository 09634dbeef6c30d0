"""Command and event records: round trips and validation errors naming the field."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from aggregates import (
    Command,
    CommandSchema,
    Event,
    Field,
    InvalidCommandError,
    Metadata,
    Shop,
)

FULL_METADATA = Metadata(
    command_id="cmd-1",
    causation_id="cmd-0",
    correlation_id="conv-9",
    topic="orders",
    partition=3,
    offset=1234,
)

VALID_COMMAND = {
    "aggregate_id": "shop-1",
    "type": "PlaceOrder",
    "payload": {"order_id": "o-1", "amount_cents": 500, "items": []},
    "metadata": {"command_id": "cmd-1"},
}

VALID_EVENT = {
    "aggregate_type": "Shop",
    "aggregate_id": "shop-1",
    "version": 1,
    "type": "OrderPlaced",
    "payload": {"order_id": "o-1"},
    "metadata": {"command_id": "cmd-1"},
}

PLACE_ORDER = {
    "type": "PlaceOrder",
    "shop_id": "shop-000001",
    "order_id": "ord-000000001",
    "amount_cents": 1500,
    "items": [{"sku": "sku-00001", "qty": 2, "price_cents": 750}],
    "note": "leave at the door",
    "command_id": "cmd-000000001",
}


def changed(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Copy ``base`` with the dotted ``path`` set to ``value`` (``...`` removes it)."""
    copy = json.loads(json.dumps(base))
    *parents, last = path.split(".")
    target = copy
    for name in parents:
        target = target[name]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return copy


class TestRoundTrip:
    def test_command_round_trip(self) -> None:
        command = Command("shop-1", "PlaceOrder", {"order_id": "o-1"}, FULL_METADATA)

        assert Command.from_dict(command.to_dict()) == command

    def test_command_survives_json(self) -> None:
        command = Command("shop-1", "PlaceOrder", {"order_id": "o-1"}, FULL_METADATA)

        decoded = json.loads(json.dumps(command.to_dict()))

        assert Command.from_dict(decoded) == command

    def test_command_id_from_metadata(self) -> None:
        command = Command.from_dict(VALID_COMMAND)

        assert command.command_id == "cmd-1"

    def test_missing_payload_is_empty(self) -> None:
        command = Command.from_dict(changed(VALID_COMMAND, "payload", ...))

        assert command.payload == {}

    @pytest.mark.parametrize(
        ("position", "recorded_at"),
        [(None, None), (42, "2024-05-01T12:00:00+00:00")],
    )
    def test_event_round_trip(
        self, position: int | None, recorded_at: str | None
    ) -> None:
        event = Event(
            "Shop",
            "shop-1",
            7,
            "OrderPlaced",
            {"order_id": "o-1", "amount_cents": 500},
            FULL_METADATA,
            position=position,
            recorded_at=recorded_at,
        )

        data = json.loads(json.dumps(event.to_dict()))

        assert Event.from_dict(data) == event

    def test_metadata_leaves_out_empty_fields(self) -> None:
        assert Metadata(command_id="c").to_dict() == {"command_id": "c"}


class TestInvalidCommand:
    @pytest.mark.parametrize(
        ("path", "value", "field"),
        [
            ("aggregate_id", ..., "aggregate_id"),
            ("aggregate_id", "", "aggregate_id"),
            ("aggregate_id", "   ", "aggregate_id"),
            ("aggregate_id", 17, "aggregate_id"),
            ("aggregate_id", "x" * 257, "aggregate_id"),
            ("type", ..., "type"),
            ("payload", ["order_id", "o-1"], "payload"),
            ("payload", "order_id=o-1", "payload"),
            ("metadata", ..., "metadata"),
            ("metadata", "cmd-1", "metadata"),
            ("metadata.command_id", ..., "metadata.command_id"),
            ("metadata.command_id", "", "metadata.command_id"),
            ("metadata.topic", 5, "metadata.topic"),
            ("metadata.partition", "3", "metadata.partition"),
            ("metadata.offset", True, "metadata.offset"),
        ],
    )
    def test_bad_command_names_field(self, path: str, value: Any, field: str) -> None:
        with pytest.raises(InvalidCommandError) as raised:
            Command.from_dict(changed(VALID_COMMAND, path, value))

        assert raised.value.field == field

    def test_longest_id_accepted(self) -> None:
        command = Command.from_dict(changed(VALID_COMMAND, "aggregate_id", "x" * 256))

        assert len(command.aggregate_id) == 256

    @pytest.mark.parametrize("message", [None, [], "text", 42, b"{}"])
    def test_non_object_command_raises(self, message: Any) -> None:
        with pytest.raises(InvalidCommandError, match="JSON object") as raised:
            Command.from_dict(message)

        assert raised.value.field is None

    @pytest.mark.parametrize(
        ("path", "value", "field"),
        [
            ("version", 0, "version"),
            ("version", -1, "version"),
            ("version", ..., "version"),
            ("version", "1", "version"),
            ("version", True, "version"),
            ("version", 1.0, "version"),
            ("aggregate_type", ..., "aggregate_type"),
            ("aggregate_id", "", "aggregate_id"),
            ("type", None, "type"),
            ("payload", [1], "payload"),
            ("metadata", ..., "metadata"),
            ("metadata.command_id", ..., "metadata.command_id"),
        ],
    )
    def test_bad_event_names_field(self, path: str, value: Any, field: str) -> None:
        with pytest.raises(InvalidCommandError) as raised:
            Event.from_dict(changed(VALID_EVENT, path, value))

        assert raised.value.field == field

    @pytest.mark.parametrize("message", [None, [VALID_EVENT], "event"])
    def test_non_object_event_raises(self, message: Any) -> None:
        with pytest.raises(InvalidCommandError, match="JSON object"):
            Event.from_dict(message)


class TestShopMessages:
    def test_flat_message_becomes_command(self) -> None:
        command = Shop.command_from_message(PLACE_ORDER)

        assert command.aggregate_id == "shop-000001"
        assert command.type == "PlaceOrder"
        assert command.command_id == "cmd-000000001"
        assert command.payload["order_id"] == "ord-000000001"
        assert "type" not in command.payload
        assert "command_id" not in command.payload

    def test_source_metadata_added(self) -> None:
        source = {"topic": "orders", "partition": 2, "offset": 99}

        command = Shop.command_from_message(PLACE_ORDER, source)

        assert command.metadata.topic == "orders"
        assert command.metadata.partition == 2
        assert command.metadata.offset == 99

    def test_source_gives_missing_command_id(self) -> None:
        message = changed(PLACE_ORDER, "command_id", ...)

        command = Shop.command_from_message(message, {"command_id": "orders-2-99"})

        assert command.command_id == "orders-2-99"

    def test_aggregate_id_accepted_for_shop_id(self) -> None:
        message = changed(PLACE_ORDER, "shop_id", ...)
        message["aggregate_id"] = "shop-7"

        assert Shop.command_from_message(message).aggregate_id == "shop-7"

    def test_envelope_message_accepted(self) -> None:
        command = Shop.command_from_message(VALID_COMMAND)

        assert command == Command.from_dict(VALID_COMMAND)

    @pytest.mark.parametrize(
        ("path", "value", "field"),
        [
            ("type", "RefundOrder", "type"),
            ("type", ..., "type"),
            ("shop_id", ..., "shop_id"),
            ("shop_id", "", "shop_id"),
            ("command_id", ..., "metadata.command_id"),
            ("order_id", ..., "payload.order_id"),
            ("order_id", None, "payload.order_id"),
            ("order_id", 12, "payload.order_id"),
            ("order_id", "o" * 129, "payload.order_id"),
            ("amount_cents", 99, "payload.amount_cents"),
            ("amount_cents", 100_001, "payload.amount_cents"),
            ("amount_cents", True, "payload.amount_cents"),
            ("amount_cents", 500.0, "payload.amount_cents"),
            ("amount_cents", math.nan, "payload.amount_cents"),
            ("amount_cents", "500", "payload.amount_cents"),
            ("items", {"sku": "a"}, "payload.items"),
            ("items", ..., "payload.items"),
            ("note", 5, "payload.note"),
        ],
    )
    def test_bad_flat_message_names_field(
        self, path: str, value: Any, field: str
    ) -> None:
        message = dict(PLACE_ORDER)
        if value is ...:
            del message[path]
        else:
            message[path] = value

        with pytest.raises(InvalidCommandError) as raised:
            Shop.command_from_message(message)

        assert raised.value.field == field

    @pytest.mark.parametrize("amount", [100, 100_000])
    def test_amount_bounds_inclusive(self, amount: int) -> None:
        message = dict(PLACE_ORDER, amount_cents=amount)

        assert Shop.command_from_message(message).payload["amount_cents"] == amount

    def test_note_optional(self) -> None:
        message = changed(PLACE_ORDER, "note", ...)

        assert "note" not in Shop.command_from_message(message).payload

    def test_unknown_type_lists_known(self) -> None:
        message = dict(PLACE_ORDER, type="RefundOrder")

        with pytest.raises(InvalidCommandError, match="PlaceOrder"):
            Shop.command_from_message(message)

    @pytest.mark.parametrize("message", [None, ["PlaceOrder"], "PlaceOrder", 1])
    def test_non_object_message_raises(self, message: Any) -> None:
        with pytest.raises(InvalidCommandError, match="JSON object"):
            Shop.command_from_message(message)


class TestSchema:
    @pytest.mark.parametrize(
        "value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"]
    )
    def test_float_must_be_finite(self, value: float) -> None:
        schema = CommandSchema({"price": Field(float, min_value=0)})

        with pytest.raises(InvalidCommandError, match="finite") as raised:
            schema.validate({"price": value})

        assert raised.value.field == "payload.price"

    def test_bool_allowed_when_declared(self) -> None:
        schema = CommandSchema({"flag": Field(bool)})

        schema.validate({"flag": False})

    def test_nullable_field_accepts_none(self) -> None:
        schema = CommandSchema({"note": Field(str, nullable=True)})

        schema.validate({"note": None})

    def test_optional_field_may_be_absent(self) -> None:
        schema = CommandSchema({"note": Field(str, required=False)})

        schema.validate({})
