"""Helpers for the ingestion tests: a deliberately slow aggregate and a text decoder.

Hosts and ingestors import these by path (``tests.pipeline.support:SlowCounter``),
so they live in a module of their own rather than in a test file.
"""

from __future__ import annotations

import time
from typing import Any

from aggregates.aggregate import Aggregate, NewEvent, applies, handles
from aggregates.messages import Command, Field, JsonObject

# Seconds each AddToCounter command takes, so that hosts fall behind the consumer.
SLOW_COMMAND_S = 0.002


class SlowCounter(Aggregate):
    """A counter whose only command sleeps before it decides, to make hosts slow."""

    id_field = "counter_id"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.total = 0

    @handles("AddToCounter", {"amount": Field(int, min_value=1, max_value=1000)})
    def add(self, command: Command) -> list[NewEvent]:
        time.sleep(SLOW_COMMAND_S)
        return [("CounterAdded", {"amount": command.payload["amount"]})]

    @applies("CounterAdded")
    def _added(self, payload: JsonObject) -> None:
        self.total += payload["amount"]


def decode_pipe_text(
    topic: str, key: bytes | None, value: bytes | None
) -> dict[str, Any]:
    """Decode ``type|shop_id|order_id`` text records into flat Shop commands.

    Raises ValueError on a record with another number of fields.
    """
    if value is None:
        msg = "value is missing"
        raise ValueError(msg)
    parts = value.decode("utf-8").split("|")
    if len(parts) != 3:
        msg = f"value has {len(parts)} fields separated by '|', expected 3"
        raise ValueError(msg)
    command_type, shop_id, order_id = parts
    return {"type": command_type, "shop_id": shop_id, "order_id": order_id}
