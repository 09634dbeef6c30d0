"""The seeded shop-orders workload: determinism, mix, bounds and invalid commands."""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

import pytest

from aggregates import Shop, fold_commands
from aggregates.workload import MAX_OPEN_ORDERS, SCALES, generate_commands, shop_id

NUM_SHOPS = 100
NUM_COMMANDS = 20_000
NOTE_BYTES = 16


@pytest.fixture(scope="module")
def messages() -> list[dict[str, Any]]:
    return list(
        generate_commands(NUM_SHOPS, NUM_COMMANDS, seed=11, note_bytes=NOTE_BYTES)
    )


def kind(message: dict[str, Any]) -> str:
    """Return the message type, or "invalid" for an order id no shop ever had."""
    if message["order_id"].startswith("missing-"):
        return "invalid"
    return str(message["type"])


def test_same_seed_same_commands() -> None:
    first = list(generate_commands(50, 2_000, seed=5, note_bytes=32))
    second = list(generate_commands(50, 2_000, seed=5, note_bytes=32))

    assert first == second


def test_other_seed_other_commands() -> None:
    first = list(generate_commands(50, 2_000, seed=5, note_bytes=32))
    second = list(generate_commands(50, 2_000, seed=6, note_bytes=32))

    assert first != second


def test_mix_near_documented_shares(messages: list[dict[str, Any]]) -> None:
    """The mix is 50/40/8/2 before rewrites; rewrites move a few points to places.

    A fulfil or cancel drawn for a shop with no open order becomes a place, and
    a place drawn for a full shop becomes a fulfil. Invalid draws are never
    rewritten, and no rewrite produces a cancel.
    """
    shares = {
        name: count / NUM_COMMANDS
        for name, count in Counter(kind(message) for message in messages).items()
    }

    assert 0.47 <= shares["PlaceOrder"] <= 0.56
    assert 0.35 <= shares["FulfillOrder"] <= 0.43
    assert 0.065 <= shares["CancelOrder"] <= 0.085
    assert 0.016 <= shares["invalid"] <= 0.024


def test_rewrite_rules_hold(messages: list[dict[str, Any]]) -> None:
    """Check that places go only to shops below the limit, fulfils take the oldest
    open order, and cancels take the newest."""
    open_orders: dict[str, deque[str]] = {}
    violations = []

    for message in messages:
        orders = open_orders.setdefault(message["shop_id"], deque())
        order_id = message["order_id"]
        if kind(message) == "invalid":
            continue
        if message["type"] == "PlaceOrder":
            if len(orders) >= MAX_OPEN_ORDERS:
                violations.append(("place-on-full-shop", message["command_id"]))
            orders.append(order_id)
        elif message["type"] == "FulfillOrder":
            if not orders or orders.popleft() != order_id:
                violations.append(("fulfil-not-oldest", message["command_id"]))
        elif not orders or orders.pop() != order_id:
            violations.append(("cancel-not-newest", message["command_id"]))

    assert violations == []
    assert max(len(orders) for orders in open_orders.values()) == MAX_OPEN_ORDERS


def test_open_orders_bounded(messages: list[dict[str, Any]]) -> None:
    commands = [Shop.command_from_message(message) for message in messages]

    result = fold_commands(Shop, commands)

    sizes = [len(shop.open_orders) for shop in result.aggregates.values()]
    assert max(sizes) <= MAX_OPEN_ORDERS


def test_invalid_exactly_rejected(messages: list[dict[str, Any]]) -> None:
    """The invalid commands are exactly the ones the Shop rejects."""
    commands = [Shop.command_from_message(message) for message in messages]
    invalid_ids = {m["command_id"] for m in messages if kind(m) == "invalid"}

    result = fold_commands(Shop, commands)

    assert set(result.rejected) == invalid_ids
    assert 0.016 <= len(invalid_ids) / NUM_COMMANDS <= 0.024


def test_events_one_per_valid_command(messages: list[dict[str, Any]]) -> None:
    commands = [Shop.command_from_message(message) for message in messages]

    result = fold_commands(Shop, commands)

    num_events = sum(len(events) for events in result.events.values())
    assert num_events == NUM_COMMANDS - len(result.rejected)


def test_command_ids_unique(messages: list[dict[str, Any]]) -> None:
    command_ids = [message["command_id"] for message in messages]

    assert len(set(command_ids)) == NUM_COMMANDS


def test_order_ids_unique(messages: list[dict[str, Any]]) -> None:
    placed = [m["order_id"] for m in messages if m["type"] == "PlaceOrder"]

    assert len(set(placed)) == len(placed)


def test_every_message_validates(messages: list[dict[str, Any]]) -> None:
    """Invalid commands are wrong for the domain, not malformed."""
    for message in messages:
        Shop.command_from_message(message)


def test_busiest_shop_is_rank_one(messages: list[dict[str, Any]]) -> None:
    per_shop = Counter(message["shop_id"] for message in messages)

    assert per_shop.most_common(1)[0][0] == shop_id(1)
    assert per_shop[shop_id(1)] > per_shop[shop_id(10)] > per_shop[shop_id(100)]


def test_shop_ids_within_range(messages: list[dict[str, Any]]) -> None:
    expected = {shop_id(rank) for rank in range(1, NUM_SHOPS + 1)}

    assert {message["shop_id"] for message in messages} <= expected


@pytest.mark.parametrize("note_bytes", [0, 1, 64, 2048])
def test_note_length(note_bytes: int) -> None:
    messages = list(generate_commands(20, 500, seed=3, note_bytes=note_bytes))
    notes = [m["note"] for m in messages if m["type"] == "PlaceOrder"]

    assert notes
    assert {len(note) for note in notes} == {note_bytes}


def test_notes_differ() -> None:
    messages = list(generate_commands(20, 500, seed=3, note_bytes=64))
    notes = [m["note"] for m in messages if m["type"] == "PlaceOrder"]

    assert len(set(notes)) > 1


def test_zero_commands_yields_nothing() -> None:
    assert list(generate_commands(10, 0)) == []


@pytest.mark.parametrize(
    ("num_shops", "num_commands", "note_bytes"),
    [(0, 10, 16), (10, -1, 16), (10, 10, -1)],
)
def test_invalid_arguments_raise(
    num_shops: int, num_commands: int, note_bytes: int
) -> None:
    with pytest.raises(ValueError, match="num_shops"):
        list(generate_commands(num_shops, num_commands, note_bytes=note_bytes))


def test_scales_named() -> None:
    assert {name: scale.name for name, scale in SCALES.items()} == {
        "small": "small",
        "medium": "medium",
        "large": "large",
    }
    assert SCALES["small"].num_commands == 20_000
