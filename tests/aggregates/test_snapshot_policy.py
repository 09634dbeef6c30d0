"""EveryNEvents: when a snapshot is due, counted from the latest snapshot."""

from __future__ import annotations

from typing import Any

import pytest

from aggregates import DEFAULT_SNAPSHOT_POLICY, EveryNEvents


@pytest.mark.parametrize(
    ("base_version", "version", "is_due"),
    [
        (0, 9, False),
        (0, 10, True),
        (0, 11, True),
        (100, 105, False),
        (100, 109, False),
        (100, 110, True),
        (103, 112, False),
        (103, 113, True),
    ],
)
def test_due_counted_from_base(base_version: int, version: int, is_due: bool) -> None:
    """A snapshot is due once N events follow the base, not at multiples of N."""
    policy = EveryNEvents(snapshot_every=10)

    assert policy.is_due(base_version, version) is is_due


def test_every_one_event() -> None:
    policy = EveryNEvents(snapshot_every=1)

    assert policy.is_due(0, 1) is True
    assert policy.is_due(5, 5) is False


@pytest.mark.parametrize("version", [0, 1, 100, 10**9])
def test_zero_never_due(version: int) -> None:
    policy = EveryNEvents(snapshot_every=0)

    assert policy.is_due(0, version) is False


def test_default_policy() -> None:
    assert DEFAULT_SNAPSHOT_POLICY == EveryNEvents(100, 1)
    assert DEFAULT_SNAPSHOT_POLICY.snapshot_version == 1


@pytest.mark.parametrize(
    ("arguments", "setting"),
    [
        ({"snapshot_every": -1}, "snapshot_every"),
        ({"snapshot_every": -100}, "snapshot_every"),
        ({"snapshot_version": 0}, "snapshot_version"),
        ({"snapshot_version": -2}, "snapshot_version"),
    ],
)
def test_invalid_values_raise(arguments: dict[str, Any], setting: str) -> None:
    with pytest.raises(ValueError, match=setting):
        EveryNEvents(**arguments)
