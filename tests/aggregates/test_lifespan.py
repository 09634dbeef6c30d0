"""Lifespans: parsing answers, choosing the hook, and idle timers on a fake clock."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest

from aggregates import (
    DEFAULT_LIFESPAN,
    HIBERNATE,
    INFINITY,
    STOP,
    Answer,
    Command,
    DomainError,
    Event,
    LifespanTimers,
    Metadata,
    RuleLifespan,
    ask_lifespan,
    parse_answer,
)

COMMAND = Command("shop-1", "FulfillOrder", {"order_id": "o-1"}, Metadata("cmd-1"))


def make_event(version: int, event_type: str = "OrderPlaced") -> Event:
    return Event("Shop", "shop-1", version, event_type, {}, Metadata("cmd-1"))


class FakeClock:
    """A clock that moves only when the test advances it."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingLifespan:
    """A lifespan that gives a distinct answer per hook and records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def after_event(self, event: Event) -> Answer:
        self.calls.append(("after_event", event))
        return STOP

    def after_command(self, command: Command) -> Answer:
        self.calls.append(("after_command", command))
        return HIBERNATE

    def after_error(self, error: Exception) -> Answer:
        self.calls.append(("after_error", error))
        return timedelta(seconds=5)


class FixedAnswerLifespan:
    """A lifespan whose every hook returns the same, possibly invalid, answer."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def after_event(self, event: Event) -> Any:
        return self.answer

    def after_command(self, command: Command) -> Any:
        return self.answer

    def after_error(self, error: Exception) -> Any:
        return self.answer


BUG_MESSAGE = "lifespan bug"


class RaisingLifespan:
    """A lifespan whose every hook raises, as a buggy user class would."""

    def after_event(self, event: Event) -> Answer:
        raise RuntimeError(BUG_MESSAGE)

    def after_command(self, command: Command) -> Answer:
        raise KeyError(BUG_MESSAGE)

    def after_error(self, error: Exception) -> Answer:
        raise ValueError(BUG_MESSAGE)


class StopOnCancelLifespan:
    """A user lifespan: stop a shop once an order is cancelled, else keep it 30 s."""

    def after_event(self, event: Event) -> Answer:
        return STOP if event.type == "OrderCancelled" else timedelta(seconds=30)

    def after_command(self, command: Command) -> Answer:
        return INFINITY

    def after_error(self, error: Exception) -> Answer:
        return STOP


def lifespan_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "aggregates.lifespan" and record.levelno == logging.WARNING
    ]


class TestParseAnswer:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("stop", STOP),
            ("STOP", STOP),
            ("  Stop ", STOP),
            ("infinity", INFINITY),
            ("hibernate", HIBERNATE),
            ("250ms", timedelta(milliseconds=250)),
            ("60s", timedelta(seconds=60)),
            ("1.5s", timedelta(seconds=1.5)),
            ("5m", timedelta(minutes=5)),
            ("1h", timedelta(hours=1)),
            ("0s", timedelta(0)),
            (" 10 s ", timedelta(seconds=10)),
            (30, timedelta(seconds=30)),
            (0, timedelta(0)),
            (0.25, timedelta(milliseconds=250)),
        ],
    )
    def test_parse_answer(self, text: str | int | float, expected: Answer) -> None:
        assert parse_answer(text) == expected

    @pytest.mark.parametrize(
        "text",
        ["forever", "", "60", "5d", "-5s", "s", "1e3s", "60 seconds", True, -1, -0.5],
    )
    def test_invalid_answer_names_setting(self, text: Any) -> None:
        with pytest.raises(ValueError, match=r"aggregates\.Shop\.lifespan"):
            parse_answer(text, "aggregates.Shop.lifespan")

    def test_invalid_answer_lists_accepted(self) -> None:
        with pytest.raises(ValueError, match="hibernate") as raised:
            parse_answer("forever")

        assert "250ms" in str(raised.value)


class TestRuleLifespan:
    def test_from_config_reads_keys(self) -> None:
        lifespan = RuleLifespan.from_config(
            {"after_event": "stop", "after_command": "60s"}
        )

        assert lifespan.after_event(make_event(1)) == STOP
        assert lifespan.after_command(COMMAND) == timedelta(seconds=60)
        assert lifespan.after_error(DomainError("no")) == timedelta(seconds=60)

    def test_from_config_all_keys(self) -> None:
        lifespan = RuleLifespan.from_config(
            {"after_event": "250ms", "after_command": "infinity", "after_error": 5}
        )

        assert lifespan.describe() == {
            "after_event": "0.25s",
            "after_command": "infinity",
            "after_error": "5s",
        }

    def test_from_config_unknown_key(self) -> None:
        with pytest.raises(ValueError, match="after_evnt"):
            RuleLifespan.from_config({"after_evnt": "stop"}, "aggregates.Shop.lifespan")

    def test_from_config_bad_value(self) -> None:
        with pytest.raises(
            ValueError, match=r"aggregates\.Shop\.lifespan\.after_command"
        ):
            RuleLifespan.from_config(
                {"after_command": "soon"}, "aggregates.Shop.lifespan"
            )

    def test_default_is_idle_timeout(self) -> None:
        """Without configuration an aggregate is evicted after being idle, not kept."""
        answers = [
            DEFAULT_LIFESPAN.after_event(make_event(1)),
            DEFAULT_LIFESPAN.after_command(COMMAND),
            DEFAULT_LIFESPAN.after_error(DomainError("no")),
        ]

        for answer in answers:
            assert isinstance(answer, timedelta)
            assert answer > timedelta(0)

    def test_empty_config_is_default(self) -> None:
        assert RuleLifespan.from_config({}) == RuleLifespan()


class TestAskLifespan:
    def test_events_ask_after_event_with_last(self) -> None:
        lifespan = RecordingLifespan()
        events = [make_event(1), make_event(2), make_event(3, "OrderFulfilled")]

        answer = ask_lifespan(lifespan, events, COMMAND, None)

        assert answer == STOP
        assert lifespan.calls == [("after_event", events[-1])]

    def test_no_events_ask_after_command(self) -> None:
        lifespan = RecordingLifespan()

        answer = ask_lifespan(lifespan, [], COMMAND, None)

        assert answer == HIBERNATE
        assert lifespan.calls == [("after_command", COMMAND)]

    def test_error_asks_after_error(self) -> None:
        """An error wins over events, as when applying the events failed."""
        lifespan = RecordingLifespan()
        error = DomainError("order o-1 is not open")

        answer = ask_lifespan(lifespan, [make_event(1)], COMMAND, error)

        assert answer == timedelta(seconds=5)
        assert lifespan.calls == [("after_error", error)]

    @pytest.mark.parametrize(
        "answer",
        ["stop", None, 60, 1.5, timedelta(seconds=-1), object()],
        ids=["string", "none", "int", "float", "negative-duration", "object"],
    )
    def test_wrong_answer_warns_infinity(
        self, caplog: pytest.LogCaptureFixture, answer: Any
    ) -> None:
        with caplog.at_level(logging.WARNING):
            result = ask_lifespan(FixedAnswerLifespan(answer), [], COMMAND, None)

        warnings = lifespan_warnings(caplog)
        assert result == INFINITY
        assert len(warnings) == 1
        assert "shop-1" in warnings[0].getMessage()

    @pytest.mark.parametrize(
        ("events", "error"),
        [([make_event(1)], None), ([], None), ([], DomainError("no"))],
        ids=["after_event", "after_command", "after_error"],
    )
    def test_raising_hook_warns_infinity(
        self,
        caplog: pytest.LogCaptureFixture,
        events: list[Event],
        error: Exception | None,
    ) -> None:
        with caplog.at_level(logging.WARNING):
            result = ask_lifespan(RaisingLifespan(), events, COMMAND, error)

        warnings = lifespan_warnings(caplog)
        assert result == INFINITY
        assert len(warnings) == 1
        assert warnings[0].exc_info is not None

    @pytest.mark.parametrize("answer", [STOP, INFINITY, HIBERNATE, timedelta(0)])
    def test_valid_answer_no_warning(
        self, caplog: pytest.LogCaptureFixture, answer: Answer
    ) -> None:
        with caplog.at_level(logging.WARNING):
            result = ask_lifespan(FixedAnswerLifespan(answer), [], COMMAND, None)

        assert result == answer
        assert lifespan_warnings(caplog) == []

    @pytest.mark.parametrize(
        ("events", "error", "expected"),
        [
            ([make_event(1, "OrderCancelled")], None, STOP),
            (
                [make_event(1, "OrderCancelled"), make_event(2)],
                None,
                timedelta(seconds=30),
            ),
            ([], None, INFINITY),
            ([], DomainError("no"), STOP),
        ],
    )
    def test_user_class_lifespan(
        self, events: list[Event], error: Exception | None, expected: Answer
    ) -> None:
        assert ask_lifespan(StopOnCancelLifespan(), events, COMMAND, error) == expected


class TestLifespanTimers:
    def test_expires_exactly_once(self) -> None:
        clock = FakeClock()
        timers = LifespanTimers(clock)
        timers.record("shop-1", timedelta(seconds=10))

        clock.advance(9.999)
        before = timers.pop_expired()
        clock.advance(0.001)
        at_deadline = timers.pop_expired()
        clock.advance(100)
        after = timers.pop_expired()

        assert before == []
        assert at_deadline == ["shop-1"]
        assert after == []
        assert timers.deadline("shop-1") is None
        assert len(timers) == 0

    def test_new_command_extends_deadline(self) -> None:
        clock = FakeClock()
        timers = LifespanTimers(clock)
        timers.record("shop-1", timedelta(seconds=10))
        clock.advance(5)
        timers.record("shop-1", timedelta(seconds=10))

        clock.advance(7)
        at_first_deadline = timers.pop_expired()
        clock.advance(3)
        at_second_deadline = timers.pop_expired()

        assert at_first_deadline == []
        assert at_second_deadline == ["shop-1"]

    def test_shorter_answer_moves_deadline_earlier(self) -> None:
        clock = FakeClock()
        timers = LifespanTimers(clock)
        timers.record("shop-1", timedelta(seconds=60))
        timers.record("shop-1", timedelta(seconds=1))

        clock.advance(1)

        assert timers.pop_expired() == ["shop-1"]

    def test_reading_keeps_deadline(self) -> None:
        """Status queries read the deadline without extending or cancelling it."""
        clock = FakeClock(now=100.0)
        timers = LifespanTimers(clock)
        timers.record("shop-1", timedelta(seconds=10))

        clock.advance(4)
        first_deadline = timers.deadline("shop-1")
        first_idle = timers.time_left("shop-1")
        clock.advance(4)
        second_deadline = timers.deadline("shop-1")
        second_idle = timers.time_left("shop-1")
        clock.advance(2)

        assert first_deadline == 110.0
        assert second_deadline == 110.0
        assert first_idle == pytest.approx(6.0)
        assert second_idle == pytest.approx(2.0)
        assert timers.pop_expired() == ["shop-1"]

    def test_time_left_negative_when_past(self) -> None:
        clock = FakeClock()
        timers = LifespanTimers(clock)
        timers.record("shop-1", timedelta(seconds=1))

        clock.advance(3)

        assert timers.time_left("shop-1") == pytest.approx(-2.0)

    @pytest.mark.parametrize("answer", [INFINITY, STOP, HIBERNATE])
    def test_action_clears_deadline(self, answer: Answer) -> None:
        clock = FakeClock()
        timers = LifespanTimers(clock)
        timers.record("shop-1", timedelta(seconds=10))

        timers.record("shop-1", answer)
        clock.advance(60)

        assert timers.deadline("shop-1") is None
        assert timers.time_left("shop-1") is None
        assert timers.pop_expired() == []
        assert len(timers) == 0

    def test_forget_drops_deadline(self) -> None:
        clock = FakeClock()
        timers = LifespanTimers(clock)
        timers.record("shop-1", timedelta(seconds=10))
        timers.record("shop-2", timedelta(seconds=10))

        timers.forget("shop-1")
        timers.forget("never-recorded")
        clock.advance(10)

        assert timers.deadline("shop-1") is None
        assert timers.pop_expired() == ["shop-2"]

    def test_zero_duration_expires_now(self) -> None:
        timers = LifespanTimers(FakeClock())
        timers.record("shop-1", timedelta(0))

        assert timers.pop_expired() == ["shop-1"]

    def test_expired_in_deadline_order(self) -> None:
        clock = FakeClock()
        timers = LifespanTimers(clock)
        for name, seconds in [("c", 3), ("a", 1), ("d", 30), ("b", 2)]:
            timers.record(name, timedelta(seconds=seconds))

        clock.advance(3)

        assert timers.pop_expired() == ["a", "b", "c"]
        assert len(timers) == 1

    def test_rerecord_same_deadline_once(self) -> None:
        """Recording the same deadline twice still expires the aggregate once."""
        clock = FakeClock()
        timers = LifespanTimers(clock)
        timers.record("shop-1", timedelta(seconds=10))
        timers.record("shop-1", STOP)
        timers.record("shop-1", timedelta(seconds=10))

        clock.advance(10)

        assert timers.pop_expired() == ["shop-1"]
        assert timers.pop_expired() == []

    def test_many_extensions_stay_correct(self) -> None:
        """Thousands of superseded deadlines are dropped without losing live ones."""
        clock = FakeClock()
        timers = LifespanTimers(clock)
        for step in range(5_000):
            timers.record(f"shop-{step % 50}", timedelta(seconds=10))
            clock.advance(0.001)
            assert timers.pop_expired() == []

        clock.advance(10)

        assert sorted(timers.pop_expired()) == sorted(f"shop-{n}" for n in range(50))
        assert len(timers) == 0
