"""A plain in-process fold of commands: the reference result for tests and checks.

Standard library only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from aggregates.aggregate import Aggregate
from aggregates.errors import DomainError
from aggregates.messages import Command, Event


@dataclass
class FoldResult:
    """Aggregates by id, the events of each stream, and the rejected command ids."""

    aggregates: dict[str, Aggregate] = field(default_factory=dict)
    events: dict[str, list[Event]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)


def fold_commands(
    aggregate_type: type[Aggregate], commands: Iterable[Command]
) -> FoldResult:
    """Execute and apply each command in order, skipping command ids seen before."""
    result = FoldResult()
    seen: set[str] = set()
    for command in commands:
        if command.command_id in seen:
            continue
        seen.add(command.command_id)
        aggregate = result.aggregates.get(command.aggregate_id)
        if aggregate is None:
            aggregate = aggregate_type(command.aggregate_id)
            result.aggregates[command.aggregate_id] = aggregate
        try:
            events = aggregate.execute(command)
        except DomainError as error:
            result.rejected[command.command_id] = str(error)
            continue
        for event in events:
            aggregate.apply(event)
        result.events.setdefault(command.aggregate_id, []).extend(events)
    return result
