"""Helpers and fixtures shared by the pipeline tests.

Hosts built here use a SQLite file and a snapshot folder under the test's
``tmp_path`` unless a test passes another database URL. The Ray fixtures use
the session's local Ray from ``tests/conftest.py`` and stop every controller
they start, so no host outlives its test.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import ray
import sqlalchemy as sa
from psycopg import sql

from aggregates import Command, Shop, fold_commands
from aggregates.workload import generate_commands
from pipeline.aggregate_host import AggregateHost
from pipeline.config import JobConfig, config_from_dict
from pipeline.controller import CONTROLLER_NAME
from pipeline.protocol import BatchItem, BatchRequest, CommandResult
from pipeline.runtime import start_controller, stop_controller
from store import EventStore, SnapshotStore, load_aggregate, schema

NUM_SHARDS = 8
SHOP = "Shop"
# Seconds to wait for Ray to release a stopped controller's name.
_NAME_RELEASE_TIMEOUT_S = 30.0

StreamRow = tuple[int, str, dict[str, Any], str]


class FakeClock:
    """A monotonic clock that moves only when the test advances it."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def sqlite_url(tmp_path: Path) -> str:
    """Return the URL of the SQLite event store that ``job_config`` uses by default."""
    return f"sqlite:///{tmp_path / 'events.db'}"


def job_config(
    tmp_path: Path,
    *,
    hosts: dict[str, Any] | None = None,
    shop: dict[str, Any] | None = None,
    database_url: str | None = None,
) -> JobConfig:
    """Build a validated job config on a SQLite file and snapshot folder in tmp_path.

    ``hosts`` and ``shop`` are the ``[hosts]`` and ``[aggregates.Shop]`` tables.
    """
    table = {
        "store": {
            "database_url": database_url or sqlite_url(tmp_path),
            "snapshot_url": str(tmp_path / "snapshots"),
        },
        "hosts": {"num_shards": NUM_SHARDS, **(hosts or {})},
        "aggregates": {SHOP: dict(shop or {})},
    }
    return config_from_dict(table)


class ShopCommands:
    """Build Shop commands with fresh command ids cmd-1, cmd-2, ..."""

    def __init__(self) -> None:
        self.count = 0

    def _command(self, message: dict[str, Any]) -> Command:
        self.count += 1
        return Shop.command_from_message({**message, "command_id": f"cmd-{self.count}"})

    def place(self, shop_id: str, order_id: str, amount_cents: int = 1_000) -> Command:
        return self._command(
            {
                "type": "PlaceOrder",
                "shop_id": shop_id,
                "order_id": order_id,
                "amount_cents": amount_cents,
                "items": [{"sku": "sku-1", "qty": 1, "price_cents": amount_cents}],
            }
        )

    def fulfil(self, shop_id: str, order_id: str) -> Command:
        return self._command(
            {"type": "FulfillOrder", "shop_id": shop_id, "order_id": order_id}
        )

    def cancel(self, shop_id: str, order_id: str) -> Command:
        return self._command(
            {"type": "CancelOrder", "shop_id": shop_id, "order_id": order_id}
        )


def batch_items(commands: Iterable[Command]) -> list[BatchItem]:
    return [BatchItem(SHOP, command) for command in commands]


def batch(
    commands: Iterable[Command], sender_id: str = "test", epoch: int = 0
) -> BatchRequest:
    return BatchRequest(sender_id, epoch, batch_items(commands))


def workload(num_shops: int, num_commands: int, note_bytes: int = 64) -> list[Command]:
    """Return the reference workload (seed 42) as validated Shop commands."""
    messages = generate_commands(num_shops, num_commands, note_bytes=note_bytes)
    return [Shop.command_from_message(message) for message in messages]


def count_statuses(results: Iterable[CommandResult]) -> Counter[str]:
    return Counter(result.status for result in results)


def stored_streams(store: EventStore) -> dict[str, list[StreamRow]]:
    """Return each Shop stream's events as (version, type, payload, command id)."""
    streams: dict[str, list[StreamRow]] = {}
    for event in store.read_all(aggregate_type=SHOP):
        row = (event.version, event.type, event.payload, event.metadata.command_id)
        streams.setdefault(event.aggregate_id, []).append(row)
    return streams


def folded_streams(commands: list[Command]) -> dict[str, list[StreamRow]]:
    """Return the streams an in-process fold of ``commands`` produces."""
    streams: dict[str, list[StreamRow]] = {}
    for aggregate_id, events in fold_commands(Shop, commands).events.items():
        streams[aggregate_id] = [
            (event.version, event.type, event.payload, event.metadata.command_id)
            for event in events
        ]
    return streams


def recorded_commands(store: EventStore) -> list[tuple[str, str]]:
    """Return (command id, outcome) of every row of the commands table."""
    query = sa.select(schema.commands.c.command_id, schema.commands.c.outcome)
    with store.engine.connect() as connection:
        return [(row.command_id, row.outcome) for row in connection.execute(query)]


def assert_store_matches_fold(
    database_url: str, snapshot_url: str, commands: list[Command]
) -> None:
    """Check that the store contains exactly what a fold of ``commands`` gives.

    Every command id is recorded once with the fold's outcome, every stream
    contains the fold's events, and every aggregate loaded from snapshots and
    events has the fold's state and version.
    """
    fold = fold_commands(Shop, commands)
    store = EventStore(database_url)
    try:
        recorded = recorded_commands(store)
        recorded_ids = [command_id for command_id, _ in recorded]
        assert sorted(recorded_ids) == sorted({c.command_id for c in commands})
        rejected = {
            command_id for command_id, outcome in recorded if outcome == "rejected"
        }
        assert rejected == set(fold.rejected)

        assert stored_streams(store) == folded_streams(commands)

        snapshots = SnapshotStore(snapshot_url)
        for aggregate_id, expected in fold.aggregates.items():
            loaded = load_aggregate(Shop, aggregate_id, store, snapshots).aggregate
            assert loaded.version == expected.version, aggregate_id
            assert loaded.snapshot_state() == expected.snapshot_state(), aggregate_id
    finally:
        store.close()


# -- plain hosts -----------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def commands() -> ShopCommands:
    return ShopCommands()


@pytest.fixture
def make_host(
    tmp_path: Path, clock: FakeClock
) -> Iterator[Callable[..., AggregateHost]]:
    """Yield a factory of plain AggregateHosts on the fake clock, and shut them down.

    The factory is ``make_host(config=None, shards=all, host_id="host-test")``,
    and without a config the defaults of ``job_config(tmp_path)`` apply.
    """
    hosts: list[AggregateHost] = []

    def make(
        config: JobConfig | None = None,
        shards: Iterable[int] = range(NUM_SHARDS),
        host_id: str = "host-test",
    ) -> AggregateHost:
        host = AggregateHost(
            host_id,
            config or job_config(tmp_path),
            shards,
            clock=clock,
            start_idle_thread=False,
        )
        hosts.append(host)
        return host

    yield make

    for host in hosts:
        host.shutdown()


@pytest.fixture
def pg_database(pg_url: str) -> Iterator[str]:
    """Create an empty PostgreSQL database for one test, yield its URL, then drop it.

    A database of its own lets a test block connections to it without
    disturbing the session database that other tests share.
    """
    url = sa.make_url(pg_url)
    name = f"raysource_pipeline_{uuid.uuid4().hex[:12]}"
    with _admin_connection(url) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    yield url.set(database=name).render_as_string(hide_password=False)

    with _admin_connection(url) as connection:
        connection.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )


def set_connections_allowed(database_url: str, allowed: bool) -> None:
    """Allow or block new connections to a database. Blocking also ends open ones."""
    url = sa.make_url(database_url)
    name = sql.Identifier(str(url.database))
    with _admin_connection(url) as connection:
        connection.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                name, sql.Literal(allowed)
            )
        )
        if not allowed:
            connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (url.database,),
            )


def _admin_connection(url: sa.URL) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        dbname="postgres",
        autocommit=True,
        connect_timeout=5,
    )


# -- Ray -------------------------------------------------------------------------


@pytest.fixture
def start_job(ray_session: Any) -> Iterator[Callable[[JobConfig], Any]]:
    """Yield a function that starts a job's controller, and stop each one after.

    The function waits until the controller has published its first assignment.
    Teardown waits until Ray has released the controller's name, so the next
    test starts a new controller instead of finding the dying one.
    """
    started: list[tuple[Any, str]] = []

    def start(config: JobConfig) -> Any:
        controller = start_controller(config)
        started.append((controller, config.ray.namespace))
        ray.get(controller.get_assignment.remote())
        return controller

    yield start

    for controller, namespace in started:
        stop_controller(controller)
        _wait_for_name_release(namespace)


def _wait_for_name_release(namespace: str) -> None:
    deadline = time.monotonic() + _NAME_RELEASE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            ray.get_actor(CONTROLLER_NAME, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.05)
    msg = (
        f"controller {namespace}/{CONTROLLER_NAME} still exists "
        f"{_NAME_RELEASE_TIMEOUT_S} s after it was stopped"
    )
    raise RuntimeError(msg)


def wait_until(
    condition: Callable[[], Any], timeout_s: float, interval_s: float = 0.1
) -> Any:
    """Poll ``condition`` until it returns a true value, and return that value.

    The test fails if no true value comes within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s: {condition}")
        time.sleep(interval_s)
