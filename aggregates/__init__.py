"""The domain kit of raysource: aggregates, commands, events, lifespans, snapshots.

Standard library only; imports nothing from ``store`` or ``pipeline``.
"""

from aggregates.aggregate import Aggregate, NewEvent, applies, handles, reject
from aggregates.aircraft import Aircraft
from aggregates.customer import Customer
from aggregates.errors import DomainError, InvalidCommandError, RaysourceError
from aggregates.fold import FoldResult, fold_commands
from aggregates.lifespan import (
    DEFAULT_LIFESPAN,
    HIBERNATE,
    INFINITY,
    STOP,
    Answer,
    Lifespan,
    LifespanAction,
    LifespanTimers,
    RuleLifespan,
    ask_lifespan,
    parse_answer,
)
from aggregates.messages import (
    Command,
    CommandSchema,
    Event,
    Field,
    JsonObject,
    Metadata,
)
from aggregates.shop import Shop
from aggregates.snapshot import DEFAULT_SNAPSHOT_POLICY, EveryNEvents, SnapshotPolicy

__all__ = [
    "DEFAULT_LIFESPAN",
    "DEFAULT_SNAPSHOT_POLICY",
    "HIBERNATE",
    "INFINITY",
    "STOP",
    "Aggregate",
    "Aircraft",
    "Answer",
    "Command",
    "CommandSchema",
    "Customer",
    "DomainError",
    "Event",
    "EveryNEvents",
    "Field",
    "FoldResult",
    "InvalidCommandError",
    "JsonObject",
    "Lifespan",
    "LifespanAction",
    "LifespanTimers",
    "Metadata",
    "NewEvent",
    "RaysourceError",
    "RuleLifespan",
    "Shop",
    "SnapshotPolicy",
    "applies",
    "ask_lifespan",
    "fold_commands",
    "handles",
    "parse_answer",
    "reject",
]
