"""The reference Shop aggregate: decisions, state, and snapshot round trips."""

from __future__ import annotations

import json
from typing import Any

import pytest

from aggregates import (
    Command,
    DomainError,
    Event,
    InvalidCommandError,
    Metadata,
    Shop,
    fold_commands,
)

SHOP_ID = "shop-1"


class Serial:
    """Hands out command ids cmd-1, cmd-2, ..."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        return f"cmd-{self.count}"


def place(order_id: str, amount_cents: int = 1_000, **extra: Any) -> dict[str, Any]:
    return {
        "type": "PlaceOrder",
        "shop_id": SHOP_ID,
        "order_id": order_id,
        "amount_cents": amount_cents,
        "items": [{"sku": "sku-1", "qty": 1, "price_cents": amount_cents}],
        **extra,
    }


def fulfil(order_id: str) -> dict[str, Any]:
    return {"type": "FulfillOrder", "shop_id": SHOP_ID, "order_id": order_id}


def cancel(order_id: str) -> dict[str, Any]:
    return {"type": "CancelOrder", "shop_id": SHOP_ID, "order_id": order_id}


@pytest.fixture
def next_id() -> Serial:
    return Serial()


def command(message: dict[str, Any], next_id: Serial) -> Command:
    return Shop.command_from_message({**message, "command_id": next_id()})


def run(shop: Shop, message: dict[str, Any], next_id: Serial) -> list[Event]:
    """Execute one message against the shop and apply its events."""
    events = shop.execute(command(message, next_id))
    for event in events:
        shop.apply(event)
    return events


@pytest.fixture
def shop(next_id: Serial) -> Shop:
    """A shop with orders o-1 (1,000 cents) and o-2 (2,500 cents) open."""
    shop = Shop(SHOP_ID)
    run(shop, place("o-1", 1_000), next_id)
    run(shop, place("o-2", 2_500, note="gift wrap"), next_id)
    return shop


class TestDecisions:
    def test_place_order(self, next_id: Serial) -> None:
        shop = Shop(SHOP_ID)

        [event] = run(shop, place("o-1", 1_500), next_id)

        assert event.type == "OrderPlaced"
        assert event.version == 1
        assert event.aggregate_type == "Shop"
        assert event.payload["amount_cents"] == 1_500
        assert shop.version == 1
        assert shop.orders_placed == 1
        assert list(shop.open_orders) == ["o-1"]

    def test_open_order_keeps_details(self, shop: Shop) -> None:
        order = shop.open_orders["o-2"]

        assert order["amount_cents"] == 2_500
        assert order["note"] == "gift wrap"
        assert order["items"] == [{"sku": "sku-1", "qty": 1, "price_cents": 2_500}]

    def test_fulfil_order(self, shop: Shop, next_id: Serial) -> None:
        [event] = run(shop, fulfil("o-2"), next_id)

        assert event.type == "OrderFulfilled"
        assert event.payload == {"order_id": "o-2", "amount_cents": 2_500}
        assert shop.orders_fulfilled == 1
        assert shop.revenue_cents == 2_500
        assert list(shop.open_orders) == ["o-1"]

    def test_cancel_order(self, shop: Shop, next_id: Serial) -> None:
        [event] = run(shop, cancel("o-1"), next_id)

        assert event.type == "OrderCancelled"
        assert shop.orders_cancelled == 1
        assert shop.revenue_cents == 0
        assert list(shop.open_orders) == ["o-2"]

    def test_counters_and_revenue(self, shop: Shop, next_id: Serial) -> None:
        run(shop, fulfil("o-1"), next_id)
        run(shop, cancel("o-2"), next_id)
        run(shop, place("o-3", 700), next_id)
        run(shop, fulfil("o-3"), next_id)

        assert shop.version == 6
        assert shop.orders_placed == 3
        assert shop.orders_fulfilled == 2
        assert shop.orders_cancelled == 1
        assert shop.revenue_cents == 1_700
        assert shop.open_orders == {}

    @pytest.mark.parametrize(
        "message",
        [fulfil("o-9"), cancel("o-9")],
        ids=["fulfil", "cancel"],
    )
    def test_unknown_order_rejected(
        self, shop: Shop, next_id: Serial, message: dict[str, Any]
    ) -> None:
        with pytest.raises(DomainError, match="o-9 is not open"):
            shop.execute(command(message, next_id))

    @pytest.mark.parametrize(
        "message",
        [fulfil("o-1"), cancel("o-1")],
        ids=["fulfil", "cancel"],
    )
    def test_closed_order_rejected(
        self, shop: Shop, next_id: Serial, message: dict[str, Any]
    ) -> None:
        run(shop, fulfil("o-1"), next_id)

        with pytest.raises(DomainError, match="o-1 is not open"):
            shop.execute(command(message, next_id))

    def test_duplicate_order_rejected(self, shop: Shop, next_id: Serial) -> None:
        with pytest.raises(DomainError, match="already open"):
            shop.execute(command(place("o-1"), next_id))

    @pytest.mark.parametrize(
        "items",
        [
            ["sku-1"],
            [{"sku": "a", "qty": 0}],
            [{"sku": "a", "qty": True}],
            [{"sku": "a"}],
        ],
        ids=["not-object", "zero-qty", "bool-qty", "missing-qty"],
    )
    def test_bad_items_rejected(self, next_id: Serial, items: list[Any]) -> None:
        with pytest.raises(DomainError, match=r"items\[0\]"):
            Shop(SHOP_ID).execute(command(place("o-1", items=items), next_id))

    def test_rejection_changes_nothing(self, shop: Shop, next_id: Serial) -> None:
        before = shop.snapshot_state()

        with pytest.raises(DomainError):
            shop.execute(command(fulfil("o-9"), next_id))

        assert shop.snapshot_state() == before
        assert shop.version == 2

    def test_execute_is_pure(self, shop: Shop, next_id: Serial) -> None:
        """Execute decides events but leaves applying them to the caller."""
        before = json.dumps(shop.snapshot_state(), sort_keys=True)

        events = shop.execute(command(fulfil("o-1"), next_id))

        assert [event.version for event in events] == [3]
        assert json.dumps(shop.snapshot_state(), sort_keys=True) == before
        assert shop.version == 2

    def test_event_metadata_names_command(self, next_id: Serial) -> None:
        shop = Shop(SHOP_ID)
        message = {**place("o-1"), "command_id": "cmd-77"}

        [event] = shop.execute(Shop.command_from_message(message))

        assert event.metadata.command_id == "cmd-77"
        assert event.metadata.causation_id == "cmd-77"
        assert event.metadata.correlation_id == "cmd-77"

    def test_command_for_other_shop_raises(self, shop: Shop, next_id: Serial) -> None:
        message = {**fulfil("o-1"), "shop_id": "shop-2"}

        with pytest.raises(ValueError, match="shop-2"):
            shop.execute(command(message, next_id))

    def test_apply_out_of_order_raises(self, shop: Shop) -> None:
        event = Event(
            "Shop", SHOP_ID, 5, "OrderCancelled", {"order_id": "o-1"}, Metadata("c")
        )

        with pytest.raises(ValueError, match="version 5"):
            shop.apply(event)

    def test_apply_unknown_event_raises(self, shop: Shop) -> None:
        event = Event(
            "Shop", SHOP_ID, 3, "OrderLost", {"order_id": "o-1"}, Metadata("c")
        )

        with pytest.raises(InvalidCommandError, match="OrderLost"):
            shop.apply(event)


class TestSnapshotState:
    def test_snapshot_round_trip(self, shop: Shop, next_id: Serial) -> None:
        run(shop, fulfil("o-1"), next_id)
        state = json.loads(json.dumps(shop.snapshot_state()))

        restored = Shop.from_snapshot(SHOP_ID, shop.version, state)

        assert isinstance(restored, Shop)
        assert restored.snapshot_state() == shop.snapshot_state()
        assert restored.version == shop.version
        assert restored.aggregate_id == SHOP_ID

    def test_restored_shop_continues(self, shop: Shop, next_id: Serial) -> None:
        """A restored shop decides the same events as the original."""
        state = json.loads(json.dumps(shop.snapshot_state()))
        restored = Shop.from_snapshot(SHOP_ID, shop.version, state)
        follow_up = command(fulfil("o-2"), next_id)

        assert restored.execute(follow_up) == shop.execute(follow_up)

    def test_snapshot_leaves_out_bookkeeping(self, shop: Shop) -> None:
        state = shop.snapshot_state()

        assert "aggregate_id" not in state
        assert "version" not in state
        assert set(state) == {
            "orders_placed",
            "orders_fulfilled",
            "orders_cancelled",
            "revenue_cents",
            "open_orders",
        }

    def test_restore_unknown_field_raises(self) -> None:
        with pytest.raises(InvalidCommandError, match="colour") as raised:
            Shop.from_snapshot(SHOP_ID, 3, {"orders_placed": 3, "colour": "red"})

        assert raised.value.field == "colour"


class TestFold:
    def test_fold_matches_stepwise(self, next_id: Serial) -> None:
        messages = [
            place("o-1", 1_000),
            place("o-2", 2_000),
            fulfil("o-1"),
            fulfil("o-7"),
            cancel("o-2"),
        ]
        commands = [command(message, next_id) for message in messages]

        result = fold_commands(Shop, commands)

        shop = result.aggregates[SHOP_ID]
        assert isinstance(shop, Shop)
        assert shop.revenue_cents == 1_000
        assert shop.orders_cancelled == 1
        assert list(result.rejected) == ["cmd-4"]
        assert [event.version for event in result.events[SHOP_ID]] == [1, 2, 3, 4]

    def test_fold_skips_repeated_command(self, next_id: Serial) -> None:
        placed = command(place("o-1"), next_id)

        result = fold_commands(Shop, [placed, placed])

        assert len(result.events[SHOP_ID]) == 1
        assert result.rejected == {}
