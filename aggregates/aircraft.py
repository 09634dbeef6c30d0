"""The aircraft aggregate: one per tail number, fed by scheduled flights.

Built for the nycflights13 data set (every flight that left New York City in
2013), but it only assumes a stream of scheduled departures in time order.
Standard library only.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from aggregates.aggregate import Aggregate, NewEvent, applies, handles, reject
from aggregates.errors import InvalidCommandError
from aggregates.messages import Command, Field, JsonObject

# A departure more than this many minutes late counts as delayed.
DELAYED_DEPARTURE_MIN = 15

# How far back the aircraft keeps its recorded flights. A flight scheduled
# earlier than this before the aircraft's latest flight cannot be checked
# against the ones already recorded, so it is rejected as out of order.
RECENT_WINDOW_HOURS = 24
RECENT_WINDOW = timedelta(hours=RECENT_WINDOW_HOURS)

_SCHEDULE_FIELDS = {
    "carrier": Field(str, max_length=8),
    "flight_number": Field(int, min_value=1),
    "origin": Field(str, max_length=8),
    "dest": Field(str, max_length=8),
    "scheduled_departure": Field(str, max_length=64),
}

_NUMBER = (int, float)


class Aircraft(Aggregate):
    """The flights of one aircraft, identified by its tail number.

    A flight is recorded once, as flown, diverted or cancelled. A command is
    rejected when its flight is already recorded, when the aircraft is already
    recorded on another flight scheduled at the same minute, or when it is
    scheduled more than ``RECENT_WINDOW`` before the aircraft's latest flight.
    """

    id_field = "tailnum"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.flights_flown = 0
        self.diversions = 0
        self.cancellations = 0
        self.total_distance_miles = 0
        self.total_air_time_min = 0
        # Departure delays count every flight that departed, flown or
        # diverted. Arrival delays count only flights that arrived.
        self.total_dep_delay_min = 0
        self.total_arr_delay_min = 0
        self.max_dep_delay_min: int | float | None = None
        self.delayed_departures = 0
        self.carriers: dict[str, int] = {}
        # Where the aircraft was last known to be: the destination of its
        # latest flown flight, the origin of its latest cancelled flight, and
        # None after a diversion, because the data does not say where it landed.
        self.last_seen_at: str | None = None
        self.last_flight_at: str | None = None
        # [scheduled departure in UTC ISO 8601, flight code] of the flights
        # within RECENT_WINDOW of the latest one, in the order recorded.
        self.recent_flights: list[list[str]] = []

    @classmethod
    def validate(cls, command: Command) -> None:
        """Raise InvalidCommandError unless the payload and departure time are valid."""
        super().validate(command)
        parse_departure(command.payload["scheduled_departure"])

    @handles(
        "RecordFlight",
        {
            **_SCHEDULE_FIELDS,
            "dep_delay_min": Field(_NUMBER),
            "arr_delay_min": Field(_NUMBER, nullable=True),
            "distance_miles": Field(_NUMBER, min_value=1),
            "air_time_min": Field(_NUMBER, min_value=0, nullable=True),
        },
    )
    def record_flight(self, command: Command) -> list[NewEvent]:
        payload = self._scheduled_flight(command)
        payload["dep_delay_min"] = command.payload["dep_delay_min"]

        # A flight that departed and has no arrival delay landed somewhere
        # other than its destination.
        arr_delay_min = command.payload["arr_delay_min"]
        if arr_delay_min is None:
            return [("FlightDiverted", payload)]

        air_time_min = command.payload["air_time_min"]
        if air_time_min is None:
            msg = (
                f"flight {_flight_code(payload)} of aircraft {self.aggregate_id} "
                "has an arrival delay but no air time, and a flight that "
                "arrived needs both"
            )
            raise reject(msg)
        payload["arr_delay_min"] = arr_delay_min
        payload["air_time_min"] = air_time_min
        payload["distance_miles"] = command.payload["distance_miles"]
        return [("FlightFlown", payload)]

    @handles("RecordCancellation", _SCHEDULE_FIELDS)
    def record_cancellation(self, command: Command) -> list[NewEvent]:
        return [("FlightCancelled", self._scheduled_flight(command))]

    @applies("FlightFlown")
    def _flight_flown(self, payload: JsonObject) -> None:
        self._departed(payload)
        self.flights_flown += 1
        self.total_distance_miles += payload["distance_miles"]
        self.total_air_time_min += payload["air_time_min"]
        self.total_arr_delay_min += payload["arr_delay_min"]
        self.last_seen_at = payload["dest"]

    @applies("FlightDiverted")
    def _flight_diverted(self, payload: JsonObject) -> None:
        self._departed(payload)
        self.diversions += 1
        self.last_seen_at = None

    @applies("FlightCancelled")
    def _flight_cancelled(self, payload: JsonObject) -> None:
        self._remember(payload)
        self.cancellations += 1
        self.last_seen_at = payload["origin"]

    def _scheduled_flight(self, command: Command) -> JsonObject:
        """Return the schedule fields of a new flight, or reject it if it clashes."""
        departure = parse_departure(command.payload["scheduled_departure"])
        flight = {name: command.payload[name] for name in _SCHEDULE_FIELDS}
        flight["scheduled_departure"] = departure.isoformat()
        code = _flight_code(flight)

        if self.last_flight_at is not None:
            latest = datetime.fromisoformat(self.last_flight_at)
            if departure < latest - RECENT_WINDOW:
                msg = (
                    f"flight {code} scheduled at {flight['scheduled_departure']} is "
                    f"more than {RECENT_WINDOW_HOURS} hours before the latest "
                    f"flight of aircraft {self.aggregate_id} at {self.last_flight_at}. "
                    "Send each aircraft's flights in scheduled order."
                )
                raise reject(msg)

        for recorded_at, recorded_code in self.recent_flights:
            if recorded_at != flight["scheduled_departure"]:
                continue
            if recorded_code == code:
                msg = (
                    f"flight {code} scheduled at {recorded_at} is already recorded "
                    f"for aircraft {self.aggregate_id}"
                )
            else:
                msg = (
                    f"aircraft {self.aggregate_id} is already recorded on flight "
                    f"{recorded_code} scheduled at {recorded_at}, so it cannot also "
                    f"be flight {code} at the same time"
                )
            raise reject(msg)
        return flight

    def _departed(self, payload: JsonObject) -> None:
        self._remember(payload)
        dep_delay_min = payload["dep_delay_min"]
        self.total_dep_delay_min += dep_delay_min
        if self.max_dep_delay_min is None or dep_delay_min > self.max_dep_delay_min:
            self.max_dep_delay_min = dep_delay_min
        if dep_delay_min > DELAYED_DEPARTURE_MIN:
            self.delayed_departures += 1

    def _remember(self, payload: JsonObject) -> None:
        """Count the carrier and keep the flight among the recent ones."""
        carrier = payload["carrier"]
        self.carriers[carrier] = self.carriers.get(carrier, 0) + 1

        scheduled_at = payload["scheduled_departure"]
        departure = datetime.fromisoformat(scheduled_at)
        latest = departure
        if self.last_flight_at is not None:
            latest = max(departure, datetime.fromisoformat(self.last_flight_at))
        self.last_flight_at = latest.isoformat()
        self.recent_flights.append([scheduled_at, _flight_code(payload)])

        # Flights arrive in scheduled order, give or take RECENT_WINDOW, so the
        # oldest entries are at the front.
        cutoff = latest - RECENT_WINDOW
        while self.recent_flights and (
            datetime.fromisoformat(self.recent_flights[0][0]) < cutoff
        ):
            del self.recent_flights[0]


def parse_departure(value: str) -> datetime:
    """Parse an ISO 8601 time with a UTC offset and return it in UTC.

    Raises InvalidCommandError naming ``payload.scheduled_departure`` when the
    text is not such a time.
    """
    field = "payload.scheduled_departure"
    try:
        departure = datetime.fromisoformat(value)
    except ValueError as err:
        msg = f"{field} must be an ISO 8601 time, got {value!r}"
        raise InvalidCommandError(msg, field=field) from err
    if departure.tzinfo is None:
        msg = f"{field} must include a UTC offset such as +00:00, got {value!r}"
        raise InvalidCommandError(msg, field=field)
    return departure.astimezone(timezone.utc)


def _flight_code(flight: JsonObject) -> str:
    return f"{flight['carrier']}{flight['flight_number']}"
