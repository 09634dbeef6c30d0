"""Decoder: records become Shop commands, or dead-letter reasons naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.config import ConfigError, config_from_dict
from pipeline.decoding import DecodeFailure, Decoder
from pipeline.protocol import BatchItem

MAX_MESSAGE_BYTES = 2000

PLACE = {
    "type": "PlaceOrder",
    "shop_id": "shop-000001",
    "order_id": "ord-1",
    "amount_cents": 500,
    "items": [{"sku": "sku-00001", "qty": 1, "price_cents": 500}],
}


def make_decoder(**kafka: Any) -> Decoder:
    config = config_from_dict(
        {"kafka": {"max_message_bytes": MAX_MESSAGE_BYTES, **kafka}}
    )
    return Decoder.from_config(config)


def encode(message: Any) -> bytes:
    return json.dumps(message).encode()


def decode(
    value: bytes | None,
    key: bytes | None = b"shop-000001",
    decoder: Decoder | None = None,
) -> BatchItem | DecodeFailure:
    return (decoder or make_decoder()).decode("orders", 3, 42, key, value)


def test_decode_valid_command() -> None:
    item = decode(encode({**PLACE, "command_id": "cmd-1"}))

    assert isinstance(item, BatchItem)
    assert item.aggregate_type == "Shop"
    assert item.command.aggregate_id == "shop-000001"
    assert item.command.type == "PlaceOrder"
    assert item.command.command_id == "cmd-1"
    assert item.command.payload["amount_cents"] == 500


def test_decode_command_id_defaults_to_record_position() -> None:
    item = decode(encode(PLACE))

    assert isinstance(item, BatchItem)
    metadata = item.command.metadata
    assert metadata.command_id == "orders-3-42"
    assert (metadata.topic, metadata.partition, metadata.offset) == ("orders", 3, 42)


def test_decode_accepts_null_key() -> None:
    item = decode(encode(PLACE), key=None)

    assert isinstance(item, BatchItem)


BAD_RECORDS = [
    ("not UTF-8", b"\xff\xfe{}", "value"),
    ("not JSON", b"{not json", "value"),
    ("NaN constant", b'{"type": "PlaceOrder", "amount_cents": NaN}', "value"),
    ("JSON array", encode([PLACE]), "value"),
    ("JSON string", encode("PlaceOrder"), "value"),
    ("null value", None, "value"),
    ("unknown type", encode({**PLACE, "type": "ShipOrder"}), "type"),
    ("type missing", encode({k: v for k, v in PLACE.items() if k != "type"}), "type"),
    ("type not a string", encode({**PLACE, "type": ["PlaceOrder"]}), "type"),
    (
        "field missing",
        encode({k: v for k, v in PLACE.items() if k != "order_id"}),
        "payload.order_id",
    ),
    (
        "wrong-typed field",
        encode({**PLACE, "amount_cents": "500"}),
        "payload.amount_cents",
    ),
    (
        "number out of range",
        encode({**PLACE, "amount_cents": 5}),
        "payload.amount_cents",
    ),
    (
        "no aggregate id",
        encode({k: v for k, v in PLACE.items() if k != "shop_id"}),
        "shop_id",
    ),
    (
        "command id not a string",
        encode({**PLACE, "command_id": 7}),
        "metadata.command_id",
    ),
    (
        "over the size limit",
        encode({**PLACE, "note": "x" * MAX_MESSAGE_BYTES}),
        "value",
    ),
]


@pytest.mark.parametrize(
    ("value", "field"),
    [(value, field) for _, value, field in BAD_RECORDS],
    ids=[case for case, _, _ in BAD_RECORDS],
)
def test_decode_bad_record_names_field(value: bytes | None, field: str) -> None:
    failure = decode(value)

    assert isinstance(failure, DecodeFailure)
    assert failure.field == field
    assert failure.reason.startswith(field)


@pytest.mark.parametrize("key", [b"shop-000002", b"", b"\xff"])
def test_decode_key_disagreeing_with_id(key: bytes) -> None:
    failure = decode(encode(PLACE), key=key)

    assert isinstance(failure, DecodeFailure)
    assert failure.field == "key"
    assert failure.reason.startswith("key")


def test_decode_key_mismatch_reason_names_id_field() -> None:
    failure = decode(encode(PLACE), key=b"shop-000002")

    assert isinstance(failure, DecodeFailure)
    assert failure.reason == (
        "key 'shop-000002' disagrees with payload shop_id 'shop-000001'"
    )


def test_decode_size_limit_counts_bytes() -> None:
    value = encode({**PLACE, "note": "é" * (MAX_MESSAGE_BYTES // 2)})

    failure = decode(value)

    assert isinstance(failure, DecodeFailure)
    assert f"{len(value)} bytes" in failure.reason


def test_record_decoder_builds_command() -> None:
    decoder = make_decoder(decoder="tests.pipeline.support:decode_pipe_text")

    item = decode(b"CancelOrder|shop-000001|ord-9", decoder=decoder)

    assert isinstance(item, BatchItem)
    assert item.command.type == "CancelOrder"
    assert item.command.payload["order_id"] == "ord-9"
    assert item.command.command_id == "orders-3-42"


def test_record_decoder_error_becomes_dead_letter() -> None:
    decoder = make_decoder(decoder="tests.pipeline.support:decode_pipe_text")

    failure = decode(b"CancelOrder|shop-000001", decoder=decoder)

    assert isinstance(failure, DecodeFailure)
    assert failure.field == "value"
    assert "decode_pipe_text" in failure.reason
    assert "expected 3" in failure.reason


def test_record_decoder_output_is_validated() -> None:
    decoder = make_decoder(decoder="tests.pipeline.support:decode_pipe_text")

    failure = decode(b"PlaceOrder|shop-000001|ord-9", decoder=decoder)

    assert isinstance(failure, DecodeFailure)
    assert failure.field == "payload.amount_cents"


def test_record_decoder_path_invalid() -> None:
    with pytest.raises(ConfigError, match="kafka.decoder"):
        make_decoder(decoder="tests.pipeline.support:no_such_function")
