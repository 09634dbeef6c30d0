"""Lifespans: when a live aggregate is stopped, kept, or hibernated.

The meaning follows Commanded's aggregate lifespans. After each command the
host asks the aggregate type's lifespan one question:

- ``after_event(event)`` with the last event, when the command produced events;
- ``after_command(command)`` when it produced none;
- ``after_error(error)`` when it was rejected or raised.

Each answer is one of:

- ``STOP``: evict the aggregate once the batch is durable;
- a ``timedelta``: evict it when no command has reached it for that long; the
  next command resets the clock;
- ``INFINITY``: keep it until a host bound (live count, memory) evicts it;
- ``HIBERNATE``: keep only its compact serialised form, restored on the next
  command.

An answer of another kind, or a hook that raises, is logged as a warning and
treated as INFINITY. Standard library only.
"""

from __future__ import annotations

import enum
import heapq
import logging
import re
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, Union

if TYPE_CHECKING:
    from aggregates.messages import Command, Event

logger = logging.getLogger(__name__)


class LifespanAction(enum.Enum):
    """The answers of a lifespan that are not durations."""

    STOP = "stop"
    INFINITY = "infinity"
    HIBERNATE = "hibernate"


STOP = LifespanAction.STOP
INFINITY = LifespanAction.INFINITY
HIBERNATE = LifespanAction.HIBERNATE

Answer = Union[LifespanAction, timedelta]


class Lifespan(Protocol):
    """The three questions a host asks after each command; see the module docstring."""

    def after_event(self, event: Event) -> Answer: ...

    def after_command(self, command: Command) -> Answer: ...

    def after_error(self, error: Exception) -> Answer: ...


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_answer(text: str | int | float, setting: str = "lifespan") -> Answer:
    """Parse "stop", "infinity", "hibernate" or a duration such as "60s" or "250ms".

    A bare number is seconds. Raises ValueError naming ``setting`` and what it
    accepts.
    """
    if isinstance(text, bool):
        text = str(text)
    if isinstance(text, (int, float)):
        if text < 0:
            msg = f"{setting} = {text!r} is invalid: a duration must not be negative"
            raise ValueError(msg)
        return timedelta(seconds=text)
    lowered = str(text).strip().lower()
    for action in LifespanAction:
        if lowered == action.value:
            return action
    match = _DURATION.match(lowered)
    if match is None:
        msg = (
            f'{setting} = {text!r} is invalid: expected "stop", "infinity", '
            '"hibernate" or a duration such as "250ms", "60s", "5m" or "1h"'
        )
        raise ValueError(msg)
    number, unit = match.groups()
    return timedelta(seconds=float(number) * _UNIT_SECONDS[unit])


def format_answer(answer: Answer) -> str:
    """Return the configuration spelling of an answer ("stop", "60s")."""
    if isinstance(answer, LifespanAction):
        return answer.value
    return f"{answer.total_seconds():g}s"


@dataclass(frozen=True)
class RuleLifespan:
    """A lifespan that gives the same answer to every question of one kind.

    This is what a configuration table such as ``after_event = "stop"``,
    ``after_command = "60s"`` builds.
    """

    on_event: Answer = timedelta(seconds=60)
    on_command: Answer = timedelta(seconds=60)
    on_error: Answer = timedelta(seconds=60)

    def after_event(self, event: Event) -> Answer:
        return self.on_event

    def after_command(self, command: Command) -> Answer:
        return self.on_command

    def after_error(self, error: Exception) -> Answer:
        return self.on_error

    @classmethod
    def from_config(
        cls, table: Mapping[str, Any], setting: str = "lifespan"
    ) -> RuleLifespan:
        """Build from ``after_event``, ``after_command`` and ``after_error`` keys.

        Missing keys keep the default idle timeout of 60 seconds; an unknown key
        raises ValueError naming it.
        """
        known = {"after_event", "after_command", "after_error"}
        unknown = set(table) - known
        if unknown:
            msg = (
                f"{setting} has unknown keys {sorted(unknown)}; "
                f"accepted keys: {sorted(known)}"
            )
            raise ValueError(msg)
        default = cls()
        return cls(
            on_event=_parse_key(table, "after_event", default.on_event, setting),
            on_command=_parse_key(table, "after_command", default.on_command, setting),
            on_error=_parse_key(table, "after_error", default.on_error, setting),
        )

    def describe(self) -> dict[str, str]:
        """Return the answers in configuration spelling."""
        return {
            "after_event": format_answer(self.on_event),
            "after_command": format_answer(self.on_command),
            "after_error": format_answer(self.on_error),
        }


def _parse_key(
    table: Mapping[str, Any], key: str, default: Answer, setting: str
) -> Answer:
    if key not in table:
        return default
    return parse_answer(table[key], f"{setting}.{key}")


DEFAULT_LIFESPAN: Lifespan = RuleLifespan()


def ask_lifespan(
    lifespan: Lifespan,
    events: list[Event],
    command: Command,
    error: Exception | None,
) -> Answer:
    """Ask the hook that fits the command's outcome and return a valid answer.

    An answer of the wrong kind, a negative duration or a hook that raises is
    logged as a warning and replaced by INFINITY, so a faulty lifespan can keep
    an aggregate in memory but never fails a command.
    """
    call: Callable[[], object]
    if error is not None:
        hook_name, call = "after_error", lambda: lifespan.after_error(error)
    elif events:
        hook_name, call = "after_event", lambda: lifespan.after_event(events[-1])
    else:
        hook_name, call = "after_command", lambda: lifespan.after_command(command)
    try:
        answer = call()
    except Exception:
        logger.warning(
            "lifespan hook failed, keeping aggregate hook=%s aggregate=%s",
            hook_name,
            command.aggregate_id,
            exc_info=True,
        )
        return INFINITY
    if isinstance(answer, LifespanAction):
        return answer
    if isinstance(answer, timedelta) and answer >= timedelta(0):
        return answer
    logger.warning(
        "invalid lifespan answer treated as infinity hook=%s aggregate=%s answer=%r; "
        "expected STOP, INFINITY, HIBERNATE or a non-negative timedelta",
        hook_name,
        command.aggregate_id,
        answer,
    )
    return INFINITY


class LifespanTimers:
    """Track when each live aggregate's idle timeout ends.

    A state machine over a clock: ``record`` sets or clears an aggregate's
    deadline from its latest answer, and ``pop_expired`` returns the aggregates
    whose deadline has passed. Only ``record`` moves a deadline, so reading
    state (a status query) neither extends nor cancels it. The clock is a
    function returning seconds, ``time.monotonic`` by default; tests pass a
    fake one.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._deadlines: dict[Hashable, float] = {}
        self._heap: list[tuple[float, int, Hashable]] = []
        self._serial = 0

    def record(self, aggregate_id: Hashable, answer: Answer) -> None:
        """Start the idle clock for a duration answer; clear it for any other answer."""
        if isinstance(answer, timedelta):
            deadline = self._clock() + answer.total_seconds()
            self._deadlines[aggregate_id] = deadline
            # The serial breaks ties so keys of different types are never compared.
            self._serial += 1
            heapq.heappush(self._heap, (deadline, self._serial, aggregate_id))
        else:
            self._deadlines.pop(aggregate_id, None)

    def forget(self, aggregate_id: Hashable) -> None:
        """Drop the aggregate's deadline, as when it is evicted for another reason."""
        self._deadlines.pop(aggregate_id, None)

    def deadline(self, aggregate_id: Hashable) -> float | None:
        """Return the clock time at which the aggregate expires, or None."""
        return self._deadlines.get(aggregate_id)

    def time_left(self, aggregate_id: Hashable) -> float | None:
        """Return seconds until the aggregate expires (negative once past), or None."""
        deadline = self._deadlines.get(aggregate_id)
        return None if deadline is None else deadline - self._clock()

    def pop_expired(self) -> list[Hashable]:
        """Remove and return the aggregates whose deadline is at or before now."""
        now = self._clock()
        expired: list[Hashable] = []
        while self._heap and self._heap[0][0] <= now:
            deadline, _, aggregate_id = heapq.heappop(self._heap)
            # The heap keeps superseded deadlines; only the current one counts.
            if self._deadlines.get(aggregate_id) == deadline:
                del self._deadlines[aggregate_id]
                expired.append(aggregate_id)
        self._compact_heap()
        return expired

    def __len__(self) -> int:
        return len(self._deadlines)

    def _compact_heap(self) -> None:
        # Rebuild when superseded entries dominate, so the heap stays O(live).
        if len(self._heap) > 2 * len(self._deadlines) + 1024:
            self._heap = [(d, i, a) for i, (a, d) in enumerate(self._deadlines.items())]
            heapq.heapify(self._heap)
