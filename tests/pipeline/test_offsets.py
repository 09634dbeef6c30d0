"""OffsetTracker: commits stop at the first offset that is not durable."""

from __future__ import annotations

import random

import pytest

from pipeline.offsets import OffsetTracker, PartitionOffsets


def test_committable_none_before_durable() -> None:
    state = PartitionOffsets("p0")
    state.register_many(range(5))

    assert state.committable() is None


def test_committable_advances_in_order() -> None:
    state = PartitionOffsets("p0")
    state.register_many(range(3))

    state.mark_durable(0)
    assert state.committable() == 1
    state.mark_durable(1)
    state.mark_durable(2)
    assert state.committable() == 3


def test_committable_stops_at_gap() -> None:
    """Acks for later offsets never move the commit past an earlier pending one."""
    state = PartitionOffsets("p0")
    state.register_many(range(10, 20))

    for offset in (13, 11, 12):
        state.mark_durable(offset)
    assert state.committable() is None

    state.mark_durable(10)
    assert state.committable() == 14

    for offset in (19, 18, 16, 15):
        state.mark_durable(offset)
    assert state.committable() == 14

    state.mark_durable(14)
    assert state.committable() == 17

    state.mark_durable(17)
    assert state.committable() == 20
    assert state.num_pending == 0


def test_committable_skips_offsets_never_read() -> None:
    """Offsets never returned (compacted records, markers) do not block commits."""
    state = PartitionOffsets("p0")
    state.register_many([0, 1, 4, 7])

    for offset in (7, 4, 1, 0):
        state.mark_durable(offset)

    assert state.committable() == 8


def test_committable_random_ack_orders() -> None:
    """For any ack order, the commit is the lowest offset not yet durable."""
    rng = random.Random(7)
    for _ in range(50):
        state = PartitionOffsets("p0")
        offsets = list(range(100))
        state.register_many(offsets)
        rng.shuffle(offsets)
        durable: set[int] = set()
        for offset in offsets:
            state.mark_durable(offset)
            durable.add(offset)
            lowest_pending = next((o for o in range(100) if o not in durable), 100)
            expected = None if lowest_pending == 0 else lowest_pending
            assert state.committable() == expected


def test_mark_durable_rejects_unregistered_offset() -> None:
    state = PartitionOffsets("p0")
    state.register_many(range(3))

    with pytest.raises(ValueError, match="offset 5"):
        state.mark_durable(5)


def test_mark_durable_rejects_repeat() -> None:
    state = PartitionOffsets("p0")
    state.register(0)
    state.mark_durable(0)

    with pytest.raises(ValueError, match="already durable"):
        state.mark_durable(0)


def test_register_rejects_offset_below_position() -> None:
    state = PartitionOffsets("p0")
    state.register_many([3, 4])

    with pytest.raises(ValueError, match="in order"):
        state.register(2)
    assert state.position == 5


def test_tracker_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    for offset in range(4):
        tracker.register("a", offset)
        tracker.register("b", offset)

    tracker.mark_durable("a", 0)
    tracker.mark_durable("a", 1)
    tracker.mark_durable("b", 1)

    assert tracker.committable() == {"a": 2}
    assert tracker.num_pending == 5


def test_tracker_revoke_deactivates_state() -> None:
    tracker = OffsetTracker()
    state = tracker.register("a", 0)

    revoked = tracker.revoke("a")

    assert revoked is state
    assert not state.is_active
    assert tracker.get("a") is None
    assert tracker.committable() == {}
    assert tracker.assign("a") is not state


def test_tracker_mark_durable_unassigned_raises() -> None:
    tracker = OffsetTracker()

    with pytest.raises(KeyError):
        tracker.mark_durable("missing", 0)
