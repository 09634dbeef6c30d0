"""A seeded generator of the reference shop-orders workload.

``S`` shops with Zipf(1.1) popularity receive ``N`` commands: 50 % PlaceOrder,
40 % FulfillOrder, 8 % CancelOrder and 2 % invalid on purpose (fulfil or cancel
an order id the shop never had). A shop has at most 20 open orders: a place
drawn for a full shop fulfils its oldest open order instead, and a fulfil or
cancel drawn for a shop with none becomes a place. Each command is a flat JSON
object with a unique ``command_id``. The same seed gives the same commands.

Standard library only.
"""

from __future__ import annotations

import itertools
import random
import string
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

MAX_OPEN_ORDERS = 20
ZIPF_EXPONENT = 1.1
_CHUNK = 4096


@dataclass(frozen=True)
class Scale:
    """A named size of the workload: shops and commands."""

    name: str
    num_shops: int
    num_commands: int


SCALES = {
    "small": Scale("small", 1_000, 20_000),
    "medium": Scale("medium", 100_000, 500_000),
    "large": Scale("large", 1_000_000, 5_000_000),
}


def shop_id(rank: int) -> str:
    """Return the id of the shop of popularity rank ``rank`` (1 is the busiest)."""
    return f"shop-{rank:06d}"


def generate_commands(
    num_shops: int,
    num_commands: int,
    seed: int = 42,
    note_bytes: int = 2048,
) -> Iterator[dict[str, Any]]:
    """Yield ``num_commands`` workload commands as flat JSON-able dicts."""
    if num_shops < 1 or num_commands < 0 or note_bytes < 0:
        msg = (
            "num_shops must be at least 1 and num_commands and note_bytes at least 0, "
            f"got {num_shops}, {num_commands}, {note_bytes}"
        )
        raise ValueError(msg)
    rng = random.Random(seed)
    cum_weights = list(
        itertools.accumulate(r**-ZIPF_EXPONENT for r in range(1, num_shops + 1))
    )
    ranks = range(1, num_shops + 1)
    # One random text twice as long as a note; each note is a slice of it, so
    # notes differ without paying for fresh random bytes per command.
    text = "".join(
        rng.choices(string.ascii_letters + string.digits, k=max(2 * note_bytes, 1))
    )
    open_orders: dict[int, deque[str]] = {}
    serial = 0

    for start in range(0, num_commands, _CHUNK):
        count = min(_CHUNK, num_commands - start)
        drawn = rng.choices(ranks, cum_weights=cum_weights, k=count)
        for rank in drawn:
            serial += 1
            orders = open_orders.setdefault(rank, deque())
            yield _next_command(rng, rank, orders, serial, text, note_bytes)


def _next_command(
    rng: random.Random,
    rank: int,
    orders: deque[str],
    serial: int,
    text: str,
    note_bytes: int,
) -> dict[str, Any]:
    draw = rng.random()
    shop = shop_id(rank)
    command_id = f"cmd-{serial:09d}"
    if draw < 0.98 and (draw < 0.5 or not orders):
        if len(orders) < MAX_OPEN_ORDERS:
            return _place(rng, shop, orders, serial, command_id, text, note_bytes)
        draw = 0.5
    if draw < 0.98:
        command_type = "FulfillOrder" if draw < 0.9 else "CancelOrder"
        order_id = orders.popleft() if command_type == "FulfillOrder" else orders.pop()
    else:
        command_type = rng.choice(("FulfillOrder", "CancelOrder"))
        order_id = f"missing-{serial:09d}"
    return {
        "type": command_type,
        "shop_id": shop,
        "order_id": order_id,
        "command_id": command_id,
    }


def _place(
    rng: random.Random,
    shop: str,
    orders: deque[str],
    serial: int,
    command_id: str,
    text: str,
    note_bytes: int,
) -> dict[str, Any]:
    order_id = f"ord-{serial:09d}"
    orders.append(order_id)
    items = [
        {
            "sku": f"sku-{rng.randrange(10_000):05d}",
            "qty": rng.randint(1, 5),
            "price_cents": rng.randint(100, 20_000),
        }
        for _ in range(rng.randint(1, 5))
    ]
    offset = serial % max(note_bytes, 1)
    return {
        "type": "PlaceOrder",
        "shop_id": shop,
        "order_id": order_id,
        "amount_cents": rng.randint(100, 100_000),
        "items": items,
        "note": text[offset : offset + note_bytes],
        "command_id": command_id,
    }
