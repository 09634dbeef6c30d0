"""A corpus of bad Kafka records for the Shop aggregate, each with its bad field.

``DEAD_LETTERS`` are records the decoder rejects: each must reach the dead
letters with a reason that starts with ``field``. ``REJECTIONS`` decode into
valid commands that the Shop rejects (a domain error), with a reason that
names ``field``. ``NULL_KEY`` and ``DUPLICATE_ID`` are the two edge cases that
are not errors. A null key is accepted, and the command is routed by its
payload. A second command with a known command id is acknowledged as a
duplicate without running, whatever its payload.

Records are built at import, so a test can produce them and look up each
case by name. Every record of the corpus is at most ``MAX_MESSAGE_BYTES``
long unless its case is the size limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# The kafka.max_message_bytes that tests using this corpus configure.
MAX_MESSAGE_BYTES = 8000
SHOP_ID = "shop-bad"
KEY = SHOP_ID.encode()

PLACE: dict[str, Any] = {
    "type": "PlaceOrder",
    "shop_id": SHOP_ID,
    "order_id": "ord-bad",
    "amount_cents": 500,
    "items": [{"sku": "sku-1", "qty": 1, "price_cents": 500}],
}


@dataclass(frozen=True)
class BadMessage:
    """One Kafka record, and the field its dead letter or rejection must name."""

    case: str
    key: bytes | None
    value: bytes | None
    field: str


def place(**changes: Any) -> dict[str, Any]:
    """Return the PlaceOrder above with ``changes`` applied; None removes a field."""
    message = {**PLACE, **changes}
    return {name: value for name, value in message.items() if value is not None}


def encode(message: Any) -> bytes:
    return json.dumps(message).encode()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


DEAD_LETTERS: list[BadMessage] = [
    # Not a JSON object at all.
    BadMessage("invalid UTF-8", KEY, b"\xff\xfe\x00{", "value"),
    BadMessage(
        "invalid UTF-8 inside a string",
        KEY,
        b'{"type": "PlaceOrder", "shop_id": "shop-\xc3\x28"}',
        "value",
    ),
    BadMessage("truncated JSON", KEY, b'{"type": "PlaceOrder",', "value"),
    BadMessage("JSON with trailing bytes", KEY, encode(PLACE) + b" {}", "value"),
    BadMessage("empty value", KEY, b"", "value"),
    BadMessage("null value", KEY, None, "value"),
    BadMessage("NaN literal", KEY, encode(PLACE)[:-1] + b', "x": NaN}', "value"),
    BadMessage(
        "number beyond a double", KEY, encode(PLACE)[:-1] + b', "x": 1e400}', "value"
    ),
    BadMessage(
        "integer of 4,400 digits",
        KEY,
        encode(PLACE)[:-1] + b', "x": ' + b"9" * 4400 + b"}",
        "value",
    ),
    BadMessage(
        "nested 600 levels",
        KEY,
        encode(PLACE)[:-1] + f', "x": {_nested(600)}}}'.encode(),
        "value",
    ),
    BadMessage(
        "nested past the parser's recursion limit",
        KEY,
        _nested(1500).encode(),
        "value",
    ),
    BadMessage("JSON array", KEY, encode([PLACE]), "value"),
    BadMessage("JSON string", KEY, encode("PlaceOrder"), "value"),
    BadMessage("JSON number", KEY, b"42", "value"),
    BadMessage("JSON null", KEY, b"null", "value"),
    BadMessage(
        "over the size limit",
        KEY,
        encode(place(note="n" * MAX_MESSAGE_BYTES)),
        "value",
    ),
    # The command type.
    BadMessage("unknown command type", KEY, encode(place(type="ShipOrder")), "type"),
    BadMessage("command type missing", KEY, encode(place(type=None)), "type"),
    BadMessage("command type not a string", KEY, encode(place(type=7)), "type"),
    # The aggregate id and the record key.
    BadMessage("aggregate id missing", None, encode(place(shop_id=None)), "shop_id"),
    BadMessage("aggregate id a number", None, encode(place(shop_id=17)), "shop_id"),
    BadMessage("aggregate id empty", b"", encode(place(shop_id="")), "shop_id"),
    BadMessage(
        "aggregate id of 300 characters",
        None,
        encode(place(shop_id="s" * 300)),
        "shop_id",
    ),
    BadMessage(
        "aggregate id with U+0000",
        b"shop-\x00",
        encode(place(shop_id="shop-\x00")),
        "shop_id",
    ),
    BadMessage("empty key", b"", encode(PLACE), "key"),
    BadMessage("key disagreeing with payload", b"shop-other", encode(PLACE), "key"),
    BadMessage("key not UTF-8", b"\xff\xfe", encode(PLACE), "key"),
    # The command id.
    BadMessage(
        "command id a number", KEY, encode(place(command_id=7)), "metadata.command_id"
    ),
    BadMessage(
        "command id empty", KEY, encode(place(command_id="")), "metadata.command_id"
    ),
    # Payload fields.
    BadMessage("field missing", KEY, encode(place(order_id=None)), "payload.order_id"),
    BadMessage(
        "field null", KEY, encode({**PLACE, "order_id": None}), "payload.order_id"
    ),
    BadMessage(
        "string for an integer",
        KEY,
        encode(place(amount_cents="500")),
        "payload.amount_cents",
    ),
    BadMessage(
        "boolean for an integer",
        KEY,
        encode(place(amount_cents=True)),
        "payload.amount_cents",
    ),
    BadMessage(
        "fraction for an integer",
        KEY,
        encode(place(amount_cents=500.5)),
        "payload.amount_cents",
    ),
    BadMessage(
        "object for a list", KEY, encode(place(items={"sku": "x"})), "payload.items"
    ),
    BadMessage(
        "number over the maximum",
        KEY,
        encode(place(amount_cents=10_000_000)),
        "payload.amount_cents",
    ),
    BadMessage(
        "number under the minimum",
        KEY,
        encode(place(amount_cents=-500)),
        "payload.amount_cents",
    ),
    BadMessage(
        "number beyond 64 bits",
        KEY,
        encode(place(amount_cents=2**64)),
        "payload.amount_cents",
    ),
    BadMessage(
        "string over its length limit",
        KEY,
        encode(place(order_id="o" * 200)),
        "payload.order_id",
    ),
    BadMessage(
        "unpaired surrogate in a nested string",
        KEY,
        encode(place(items=[{"sku": "sku-\ud800", "qty": 1, "price_cents": 500}])),
        "payload.items[0].sku",
    ),
    BadMessage(
        "U+0000 in a payload string",
        KEY,
        encode(place(note="before\x00after")),
        "payload.note",
    ),
    # The envelope form (payload and metadata keys).
    BadMessage(
        "envelope metadata not an object",
        KEY,
        encode(
            {
                "aggregate_id": SHOP_ID,
                "type": "PlaceOrder",
                "payload": {},
                "metadata": "cmd-1",
            }
        ),
        "metadata",
    ),
]

# Valid commands that the Shop rejects; each reason names the field.
REJECTIONS: list[BadMessage] = [
    BadMessage(
        "item quantity zero",
        KEY,
        encode(
            place(
                order_id="ord-qty",
                command_id="bad-qty-zero",
                items=[{"sku": "sku-1", "qty": 0, "price_cents": 500}],
            )
        ),
        "items[0].qty",
    ),
    BadMessage(
        "item not an object",
        KEY,
        encode(place(order_id="ord-item", command_id="bad-item", items=["sku-1"])),
        "items[0]",
    ),
]

# A null key is accepted: the command is routed by its payload's shop id. The
# shop is one no other record uses, so the partition it lands on cannot
# reorder it against another command of its shop.
NULL_KEY = BadMessage(
    "null key",
    None,
    encode(place(shop_id="shop-null-key", order_id="ord-1", command_id="null-key-1")),
    "",
)

# Two commands with one command id: the first is executed, the second is
# acknowledged as a duplicate without running, although its payload differs.
DUPLICATE_ID = (
    BadMessage(
        "first of a duplicate id",
        b"shop-dup",
        encode(place(shop_id="shop-dup", order_id="ord-first", command_id="dup-1")),
        "",
    ),
    BadMessage(
        "second of a duplicate id",
        b"shop-dup",
        encode(
            place(
                shop_id="shop-dup",
                order_id="ord-second",
                amount_cents=900,
                command_id="dup-1",
            )
        ),
        "",
    ),
)
