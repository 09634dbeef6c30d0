"""The reference aggregate: a shop that places, fulfils and cancels orders.

State holds every open order whole (amount, items, note) until it is fulfilled
or cancelled, so a shop costs a few tens of kilobytes while it is live.
"""

from __future__ import annotations

from typing import Any

from aggregates.aggregate import Aggregate, NewEvent, applies, handles, reject
from aggregates.messages import Command, Field, JsonObject

MAX_ORDER_ID_LENGTH = 128
MAX_NOTE_BYTES = 1_000_000


class Shop(Aggregate):
    """Orders of one shop; an order id that is not open is a domain error."""

    id_field = "shop_id"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.orders_placed = 0
        self.orders_fulfilled = 0
        self.orders_cancelled = 0
        self.revenue_cents = 0
        self.open_orders: dict[str, JsonObject] = {}

    @handles(
        "PlaceOrder",
        {
            "order_id": Field(str, max_length=MAX_ORDER_ID_LENGTH),
            "amount_cents": Field(int, min_value=100, max_value=100_000),
            "items": Field(list),
            "note": Field(str, required=False, max_length=MAX_NOTE_BYTES),
        },
    )
    def place_order(self, command: Command) -> list[NewEvent]:
        order_id = command.payload["order_id"]
        if order_id in self.open_orders:
            msg = f"order {order_id} is already open"
            raise reject(msg)
        _validate_items(command.payload["items"])
        return [("OrderPlaced", dict(command.payload))]

    @handles("FulfillOrder", {"order_id": Field(str, max_length=MAX_ORDER_ID_LENGTH)})
    def fulfill_order(self, command: Command) -> list[NewEvent]:
        order = self._open_order(command.payload["order_id"])
        payload = {
            "order_id": command.payload["order_id"],
            "amount_cents": order["amount_cents"],
        }
        return [("OrderFulfilled", payload)]

    @handles("CancelOrder", {"order_id": Field(str, max_length=MAX_ORDER_ID_LENGTH)})
    def cancel_order(self, command: Command) -> list[NewEvent]:
        self._open_order(command.payload["order_id"])
        return [("OrderCancelled", {"order_id": command.payload["order_id"]})]

    @applies("OrderPlaced")
    def _order_placed(self, payload: JsonObject) -> None:
        order = {
            key: value
            for key, value in payload.items()
            if key not in ("shop_id", "order_id")
        }
        self.open_orders[payload["order_id"]] = order
        self.orders_placed += 1

    @applies("OrderFulfilled")
    def _order_fulfilled(self, payload: JsonObject) -> None:
        order = self.open_orders.pop(payload["order_id"])
        self.orders_fulfilled += 1
        self.revenue_cents += order["amount_cents"]

    @applies("OrderCancelled")
    def _order_cancelled(self, payload: JsonObject) -> None:
        del self.open_orders[payload["order_id"]]
        self.orders_cancelled += 1

    def _open_order(self, order_id: str) -> JsonObject:
        order = self.open_orders.get(order_id)
        if order is None:
            msg = f"order {order_id} is not open in shop {self.aggregate_id}"
            raise reject(msg)
        return order


def _validate_items(items: list[Any]) -> None:
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            msg = f"items[{index}] must be an object with sku, qty and price_cents"
            raise reject(msg)
        qty = item.get("qty")
        if isinstance(qty, bool) or not isinstance(qty, int) or qty < 1:
            msg = f"items[{index}].qty must be a positive integer, got {qty!r}"
            raise reject(msg)
