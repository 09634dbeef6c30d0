"""Security properties of the stores and the job, tested against real services.

- Snapshots and dead letters are never unpickled or evaluated: a snapshot
  file that contains a pickle is unreadable, and a pickle or a Python
  expression sent as a message is kept as raw bytes.
- Every SQL statement binds its values as parameters: ids with quotes and
  SQL fragments never appear in a statement's text, and they go through the
  whole pipeline intact.
- Passwords in database URLs never reach logs, errors or ``status`` output.
- Ray's dashboard and servers listen on 127.0.0.1 unless configured otherwise.
"""

from __future__ import annotations

import ast
import gzip
import ipaddress
import json
import logging
import os
import pickle
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
import sqlalchemy as sa
from sqlalchemy import event as sa_event

from aggregates import Shop
from pipeline.aggregate_host import AggregateHost
from pipeline.config import JobConfig, KafkaConfig, config_from_dict
from pipeline.decoding import DecodeFailure, Decoder
from pipeline.dispatch import Dispatcher
from pipeline.kafka_ingestor import KafkaIngestorActor
from pipeline.protocol import FAILED
from pipeline.status import collect_status, describe_job
from store import EventStore, SnapshotStore, load_aggregate
from store.event_store import DeadLetter
from tests.conftest import TopicFactory
from tests.pipeline import conftest as pipeline_conftest
from tests.pipeline.conftest import (
    NUM_SHARDS,
    ShopCommands,
    batch,
    batch_items,
    job_config,
    recorded_commands,
    set_connections_allowed,
    sqlite_url,
    stored_streams,
    wait_until,
)

# Fixtures of tests/pipeline/conftest.py, which pytest applies only to the
# tests under that folder; as attributes of this module they apply here too.
pg_database = pipeline_conftest.pg_database
start_job = pipeline_conftest.start_job

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_PACKAGES = ("aggregates", "store", "pipeline")


class _CreatesMarker:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (open, (self.path, "w"))


def marker_pickle(marker: Path) -> bytes:
    """Return a pickle that creates ``marker`` when loaded, after checking it does."""
    payload = pickle.dumps(_CreatesMarker(marker))
    pickle.loads(payload).close()
    assert marker.exists(), "the pickle must be live for the tests to mean anything"
    marker.unlink()
    return payload


# -- nothing is unpickled or evaluated -------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_pickle_snapshot_not_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, suffix: str
) -> None:
    """A snapshot file containing a pickle is unreadable: full replay, no code runs."""
    marker = tmp_path / "marker"
    payload = marker_pickle(marker)
    commands = ShopCommands()
    store = EventStore(sqlite_url(tmp_path))
    host = AggregateHost(
        "host-pickle", job_config(tmp_path), range(NUM_SHARDS), start_idle_thread=False
    )
    try:
        host.execute_batch(
            batch([commands.place("shop-1", f"o-{n}") for n in range(3)])
        )
        folder = tmp_path / "snapshots" / "Shop" / "shop-1" / "1"
        folder.mkdir(parents=True)
        data = gzip.compress(payload) if suffix.endswith(".gz") else payload
        (folder / f"{3:012d}{suffix}").write_bytes(data)

        with caplog.at_level(logging.WARNING, logger="store.snapshot_store"):
            loaded = load_aggregate(
                Shop, "shop-1", store, SnapshotStore(str(tmp_path / "snapshots"))
            )
    finally:
        host.shutdown()
        store.close()

    assert not marker.exists()
    assert "snapshot unreadable" in caplog.text
    assert loaded.snapshot_base == 0
    assert loaded.events_replayed == 3
    assert len(loaded.aggregate.open_orders) == 3


def test_pickle_snapshot_ignored_by_host(tmp_path: Path) -> None:
    """A host loading an aggregate whose snapshot is a pickle replays its events."""
    marker = tmp_path / "marker"
    payload = marker_pickle(marker)
    commands = ShopCommands()
    config = job_config(tmp_path)
    first = AggregateHost("host-a", config, range(NUM_SHARDS), start_idle_thread=False)
    try:
        first.execute_batch(
            batch([commands.place("shop-1", f"o-{n}") for n in range(4)])
        )
    finally:
        first.shutdown()
    folder = tmp_path / "snapshots" / "Shop" / "shop-1" / "1"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{4:012d}.json").write_bytes(payload)

    second = AggregateHost("host-b", config, range(NUM_SHARDS), start_idle_thread=False)
    try:
        result = second.execute_batch(batch([commands.fulfil("shop-1", "o-2")]))
        status = second.status()
    finally:
        second.shutdown()

    assert not marker.exists()
    assert [(r.status, r.first_version) for r in result.results] == [("appended", 5)]
    assert status["counters"]["events_replayed"] == 4


def test_dead_letters_kept_as_bytes(tmp_path: Path) -> None:
    """A pickle or a Python expression sent as a message is stored and read back raw."""
    marker = tmp_path / "marker"
    expression = f"__import__('pathlib').Path({str(marker)!r}).touch()".encode()
    values = [
        marker_pickle(marker),
        expression,
        json.dumps({"type": expression.decode(), "shop_id": "s"}).encode(),
    ]
    decoder = Decoder.from_config(config_from_dict({}))
    failures = [decoder.decode("orders", 0, n, b"s", v) for n, v in enumerate(values)]
    letters = [
        DeadLetter(failure.reason, value, b"s", "orders", 0, offset)
        for offset, (failure, value) in enumerate(zip(failures, values, strict=True))
        if isinstance(failure, DecodeFailure)
    ]
    store = EventStore(sqlite_url(tmp_path))
    try:
        store.record_dead_letters(letters)
        stored = store.read_dead_letters()
    finally:
        store.close()

    assert len(letters) == len(values)
    assert [letter["value"] for letter in stored] == values
    assert not marker.exists()


_UNSAFE_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("shelve", "open"),
    ("jsonpickle", "decode"),
    ("dill", "loads"),
}


def _unsafe_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        if isinstance(function, ast.Name) and function.id in ("eval", "exec"):
            found.append(f"{path}:{node.lineno} {function.id}()")
        if isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name):
            if (function.value.id, function.attr) in _UNSAFE_CALLS:
                name = f"{function.value.id}.{function.attr}"
                found.append(f"{path}:{node.lineno} {name}()")
    return found


def test_source_has_no_deserialising_calls() -> None:
    """No module of the packages calls eval, exec or a pickle-style loader."""
    found = []
    for package in SOURCE_PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            found += _unsafe_calls(path)

    assert found == []


# -- SQL binds every value ---------------------------------------------------------

HOSTILE_IDS = [
    "shop'; DROP TABLE events; --",
    "shop' OR '1'='1",
    'shop" OR "1"="1',
    "shop\\'; SELECT pg_sleep(5); --",
    "shop%s%(id)s{0}$1?:name",
    "shop/*comment*/--",
    "shop' UNION SELECT command_id FROM commands --",
    "shop;\nDELETE FROM commands;",
    "../../etc/passwd",
    "shop ünïcødé ✓ 🛒",
]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    return str(request.getfixturevalue("pg_database"))


# Fragments of HOSTILE_IDS that no statement of the store contains on its own.
HOSTILE_FRAGMENTS = [
    "DROP TABLE",
    "pg_sleep",
    "UNION SELECT",
    "DELETE FROM",
    "'1'='1",
    '"1"="1',
    "/*comment*/",
    "etc/passwd",
    "ünïcødé",
]


@pytest.fixture
def statements() -> Iterator[list[str]]:
    """Yield the text of every SQL statement that any engine in this process runs."""
    captured: list[str] = []

    def record(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        captured.append(statement)

    sa_event.listen(sa.Engine, "before_cursor_execute", record)
    yield captured
    sa_event.remove(sa.Engine, "before_cursor_execute", record)


def hostile_place(number: int, shop_id: str) -> Any:
    """Return a PlaceOrder for ``shop_id`` whose command id is hostile too."""
    return Shop.command_from_message(
        {
            "type": "PlaceOrder",
            "shop_id": shop_id,
            "order_id": f"ord-{number}",
            "amount_cents": 500,
            "items": [{"sku": shop_id, "qty": 1, "price_cents": 500}],
            "command_id": f"{shop_id}#{number}",
        }
    )


def test_store_binds_hostile_ids(
    tmp_path: Path, database_url: str, statements: list[str]
) -> None:
    """Ids with quotes and SQL fragments are parameters, never statement text."""
    items = [hostile_place(n, shop_id) for n, shop_id in enumerate(HOSTILE_IDS)]
    letters = [
        DeadLetter(f"value {text}", text.encode(), text.encode(), text, 0, n)
        for n, text in enumerate(HOSTILE_IDS)
    ]
    host = AggregateHost(
        "host-sql",
        job_config(tmp_path, database_url=database_url),
        range(NUM_SHARDS),
        start_idle_thread=False,
    )
    try:
        results = host.execute_batch(batch(items)).results
    finally:
        host.shutdown()
    store = EventStore(database_url)
    try:
        store.record_dead_letters(letters)
        versions = store.stream_versions(("Shop", shop_id) for shop_id in HOSTILE_IDS)
        known = store.find_commands(item.command_id for item in items)
        ids = list(store.iter_aggregate_ids("Shop"))
        streams = {
            shop_id: list(store.read_stream("Shop", shop_id)) for shop_id in HOSTILE_IDS
        }
        stored_letters = store.read_dead_letters()
        counts = store.counts()
    finally:
        store.close()

    assert [r.status for r in results] == ["appended"] * len(HOSTILE_IDS)
    assert versions == {("Shop", shop_id): 1 for shop_id in HOSTILE_IDS}
    assert known == {item.command_id: "appended" for item in items}
    assert sorted(ids) == sorted(HOSTILE_IDS)
    for shop_id, events in streams.items():
        assert [e.aggregate_id for e in events] == [shop_id]
        assert events[0].payload["items"][0]["sku"] == shop_id
        assert events[0].metadata.command_id.startswith(shop_id + "#")
    assert [row["key"] for row in stored_letters] == [t.encode() for t in HOSTILE_IDS]
    assert [row["topic"] for row in stored_letters] == HOSTILE_IDS
    assert counts["events"] == len(HOSTILE_IDS)
    assert counts["dead_letters"] == len(HOSTILE_IDS)
    assert len(statements) > 10
    for text in HOSTILE_IDS + HOSTILE_FRAGMENTS:
        assert [s for s in statements if text in s] == [], text


def test_hostile_ids_through_pipeline(
    tmp_path: Path, pg_database: str, start_job: Callable[[JobConfig], Any]
) -> None:
    """Hostile ids pass through hosts, the store and snapshots intact."""
    config = job_config(
        tmp_path,
        database_url=pg_database,
        hosts={"min_hosts": 2, "max_hosts": 2},
        shop={"snapshot_every": 1, "after_event": "stop"},
    )
    controller = start_job(config)
    commands = []
    for number, shop_id in enumerate(HOSTILE_IDS):
        commands.append(hostile_place(number, shop_id))
        fulfil = {
            "type": "FulfillOrder",
            "shop_id": shop_id,
            "order_id": f"ord-{number}",
            "command_id": f"{HOSTILE_IDS[-1 - number]}#fulfil",
        }
        commands.append(Shop.command_from_message(fulfil))

    results = Dispatcher(controller).dispatch_strict(batch_items(commands))
    for handle in ray.get(controller.host_handles.remote()).values():
        assert ray.get(handle.flush_snapshots.remote())

    assert [r.status for r in results] == ["appended"] * len(commands)
    store = EventStore(pg_database)
    snapshots = SnapshotStore(config.store.snapshot_url)
    try:
        recorded = dict(recorded_commands(store))
        streams = stored_streams(store)
        loaded = {
            shop_id: load_aggregate(Shop, shop_id, store, snapshots)
            for shop_id in HOSTILE_IDS
        }
        counts = store.counts()
    finally:
        store.close()
    assert recorded == {c.command_id: "appended" for c in commands}
    assert sorted(streams) == sorted(HOSTILE_IDS)
    for shop_id in HOSTILE_IDS:
        assert [row[1] for row in streams[shop_id]] == ["OrderPlaced", "OrderFulfilled"]
        assert loaded[shop_id].snapshot_base == 2, shop_id
        assert loaded[shop_id].aggregate.revenue_cents == 500, shop_id
    assert counts["events"] == 2 * len(HOSTILE_IDS)
    assert not (tmp_path / "etc").exists()


# -- passwords stay out of logs and status --------------------------------------------

SECRET = f"s3cret{uuid.uuid4().hex[:8]}"


def _url_with_password(database_url: str) -> str:
    return (
        sa.make_url(database_url)
        .set(password=SECRET)
        .render_as_string(hide_password=False)
    )


def test_host_hides_database_password(
    tmp_path: Path,
    pg_database: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A host's logs, failure reasons and status never contain the database password.

    The server trusts loopback connections, so it ignores the password.
    """
    url = _url_with_password(pg_database)
    commands = ShopCommands()
    with caplog.at_level(logging.DEBUG):
        host = AggregateHost(
            "host-secret",
            job_config(tmp_path, database_url=url),
            range(NUM_SHARDS),
            start_idle_thread=False,
        )
        try:
            ok = host.execute_batch(batch([commands.place("shop-1", "o-1")]))
            set_connections_allowed(pg_database, False)
            try:
                failed = host.execute_batch(
                    batch([commands.place("shop-1", "o-2")], epoch=1)
                )
            finally:
                set_connections_allowed(pg_database, True)
            status = json.dumps(host.status(), default=str)
        finally:
            host.shutdown()
    output = capfd.readouterr()

    assert [r.status for r in ok.results] == ["appended"]
    assert [r.status for r in failed.results] == [FAILED]
    reason = failed.results[0].reason or ""
    assert "unavailable" in reason
    assert "***" in reason
    assert SECRET not in reason
    assert SECRET not in caplog.text
    assert SECRET not in output.out + output.err
    assert SECRET not in status
    assert "store unavailable" in caplog.text


def test_job_status_hides_passwords(
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    pg_database: str,
    ray_session: Any,
    start_job: Callable[[JobConfig], Any],
) -> None:
    """``status`` output and every Ray log file of the job leave the password out."""
    config = job_config(tmp_path, database_url=_url_with_password(pg_database))
    config = config.replace(
        kafka=KafkaConfig(
            bootstrap_servers=kafka_broker,
            topics=[kafka_topic(2)],
            group_id=f"security-{uuid.uuid4().hex[:8]}",
        )
    )
    controller = start_job(config)
    ingestor = KafkaIngestorActor.options(
        name="raysource-ingestor-1", namespace=config.ray.namespace
    ).remote("ingestor-1", config, controller)
    try:
        run = ingestor.run.remote()
        wait_until(lambda: ray.get(ingestor.status.remote())["running"], timeout_s=60)
        set_connections_allowed(pg_database, False)
        try:
            results = Dispatcher(controller, max_attempts=2, backoff_s=0.05).dispatch(
                batch_items([ShopCommands().place("shop-1", "o-1")])
            )
        finally:
            set_connections_allowed(pg_database, True)
        report = json.dumps(collect_status(config), default=str)
        ingestor.stop.remote()
        ray.get(run, timeout=60)
    finally:
        ray.kill(ingestor)
    # Workers write their log lines to files as they go; a moment lets the
    # last ones land.
    time.sleep(1.0)
    logs_dir = Path(ray_session.address_info["session_dir"]) / "logs"
    contents = {
        path.name: path.read_bytes() for path in logs_dir.rglob("*") if path.is_file()
    }
    leaked = [name for name, data in contents.items() if SECRET.encode() in data]
    started = b"ingestor started ingestor=ingestor-1"

    assert [r.status for r in results] == [FAILED]
    assert SECRET not in (results[0].reason or "")
    assert "***" in report
    assert SECRET not in report
    assert any(started in data for data in contents.values())
    assert leaked == []


def test_describe_job_masks_every_secret() -> None:
    """Secrets in database, snapshot and Kafka settings are masked in job reports."""
    config = config_from_dict(
        {
            "kafka": {"bootstrap_servers": f"user:{SECRET}@127.0.0.1:9092,h2:9093"},
            "store": {
                "database_url": f"postgresql+psycopg://u@127.0.0.1/db?password={SECRET}",
                "snapshot_url": f"s3://key:{SECRET}@bucket/prefix",
                "snapshot_storage_options": {"secret": SECRET},
            },
        }
    )

    report = json.dumps(describe_job(config))

    assert SECRET not in report
    assert report.count("***") == 3


# -- listening addresses ------------------------------------------------------------


def test_config_defaults_are_loopback() -> None:
    """Every address a default configuration uses is on this machine."""
    config = config_from_dict({})

    assert config.ray.address == "local"
    assert config.ray.include_dashboard is False
    assert config.ray.dashboard_host == "127.0.0.1"
    assert config.kafka.bootstrap_servers.startswith("127.0.0.1:")
    assert config.store.database_url.startswith("sqlite:///")
    assert "://" not in config.store.snapshot_url


_RAY_WITH_DASHBOARD = """
import json, os, sys
import ray
from pipeline.config import RayConfig
from pipeline.runtime import init_ray

init_ray(RayConfig(include_dashboard=True, num_cpus=1, namespace="listen-test"))

@ray.remote
def worker_pid():
    return os.getpid()

started = {"pid": os.getpid(), "worker": ray.get(worker_pid.remote())}
print(json.dumps(started), flush=True)
sys.stdin.read()
"""


def _listening(processes: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """Return (process name, address, port) of every listening or bound socket."""
    sockets = []
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
            name = process.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for connection in connections:
            is_listening = connection.status == psutil.CONN_LISTEN
            is_bound_udp = connection.status == psutil.CONN_NONE and connection.laddr
            if is_listening or is_bound_udp:
                address = _ipv4_of(connection.laddr.ip)
                sockets.append((name, address, connection.laddr.port))
    return sockets


def _ipv4_of(address: str) -> str:
    """Return an IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) as its IPv4 form.

    gRPC binds IPv6 sockets to the mapped form of 127.0.0.1, which accept
    IPv4 loopback connections only.
    """
    mapped = ipaddress.ip_address(address)
    if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None:
        return str(mapped.ipv4_mapped)
    return address


@pytest.fixture
def ray_with_dashboard() -> Iterator[psutil.Process]:
    """Start a local Ray with its dashboard through ``init_ray`` in a subprocess.

    The Ray variables that the test session sets are removed, so that only
    ``init_ray`` decides where Ray listens.
    """
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED")
    }
    process = subprocess.Popen(
        [sys.executable, "-c", _RAY_WITH_DASHBOARD],
        cwd=REPO_ROOT,
        env=environment,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    root = psutil.Process(process.pid)
    tree: list[psutil.Process] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith(b'{"pid"'):
                break
        else:
            pytest.fail("Ray with its dashboard did not start in the subprocess")
        yield root
    finally:
        # Killing the whole tree takes a moment; ray.shutdown() takes seconds.
        tree = [root, *root.children(recursive=True)]
        for member in tree:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        process.wait(timeout=30)
        psutil.wait_procs(tree, timeout=30)


def test_ray_dashboard_listens_on_loopback(ray_with_dashboard: psutil.Process) -> None:
    """Ray started by ``init_ray`` with its dashboard listens on 127.0.0.1 only."""

    def dashboard_sockets() -> list[tuple[str, str, int]]:
        processes = [ray_with_dashboard, *ray_with_dashboard.children(recursive=True)]
        dashboards = [p for p in processes if "dashboard" in " ".join(p.cmdline())]
        return _listening(dashboards)

    wait_until(dashboard_sockets, timeout_s=90, interval_s=0.5)
    processes = [ray_with_dashboard, *ray_with_dashboard.children(recursive=True)]
    sockets = _listening(processes)

    assert len(sockets) > 3
    assert [s for s in sockets if s[1] != "127.0.0.1"] == []
