"""Faults injected mid-run into a streaming run of the reference workload.

Each test produces the reference workload (200 shops, 4,000 commands, 64-byte
notes) to a fresh 8-partition topic and runs ingestors and hosts on the
session's Ray. It injects one fault while commands are in flight and lets the
job finish by itself. Then it checks the event store against an in-process
fold of the same commands (``assert_store_matches_fold``): every command id
recorded once with the fold's outcome, every stream equal to the fold's, and
every aggregate loaded from snapshots and events equal to the fold's. The
group's committed offsets must reach the end of every partition, and the
ingestors' counters must account for every message.

The whole-server PostgreSQL restart is marked ``pg_restart`` and runs only
with ``-m pg_restart`` or ``RAYSOURCE_PG_RESTART=1``, because it disconnects
every client of the shared server for about two seconds.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import psutil
import pytest
import ray
from ray.exceptions import RayActorError

from aggregates import fold_commands
from aggregates.shop import Shop
from aggregates.workload import generate_commands
from pipeline.config import JobConfig, config_from_dict
from pipeline.controller import CONTROLLER_NAME
from pipeline.job import committed_offsets as group_offsets
from pipeline.kafka_ingestor import KafkaIngestorActor
from pipeline.runtime import start_controller
from store import EventStore, SnapshotStore, load_aggregate
from tests.conftest import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, TopicFactory
from tests.pipeline.conftest import (
    assert_store_matches_fold,
    recorded_commands,
    set_connections_allowed,
    wait_until,
)
from tests.pipeline.test_kafka_ingestion import (
    JOIN_TIMEOUT_S,
    committed_offsets,
    end_offsets,
    produce,
    shop_commands,
    shop_records,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_SHOPS = 200
NUM_COMMANDS = 4000
# Long enough for a run of the reference workload to finish after a fault,
# with the hosts replaced and the consumer group rejoined.
RUN_TIMEOUT_S = 240.0
# Commands durable before a fault is injected, so that it lands mid-run.
FAULT_AFTER = 800

StartJob = Callable[[JobConfig], Any]
StartIngestor = Callable[[str, JobConfig, Any], Any]


@pytest.fixture(scope="module")
def messages() -> list[dict[str, Any]]:
    """Return the reference workload as flat JSON objects."""
    return list(generate_commands(NUM_SHOPS, NUM_COMMANDS, note_bytes=64))


@pytest.fixture
def start_ingestor(ray_session: Any) -> Iterator[StartIngestor]:
    """Yield ``start(ingestor_id, config, controller)``; kill every ingestor after."""
    actors: list[Any] = []

    def start(ingestor_id: str, config: JobConfig, controller: Any) -> Any:
        actor = KafkaIngestorActor.remote(ingestor_id, config, controller)
        actors.append(actor)
        return actor

    yield start

    for actor in actors:
        ray.kill(actor)


def fault_config(
    tmp_path: Path,
    bootstrap_servers: str,
    topic: str,
    *,
    database_url: str | None = None,
    snapshot_url: str | None = None,
    storage_options: dict[str, Any] | None = None,
    kafka: dict[str, Any] | None = None,
    hosts: dict[str, Any] | None = None,
    shop: dict[str, Any] | None = None,
) -> JobConfig:
    """Build a two-host job on a fresh consumer group that retries quickly.

    Batches of 100 commands keep several batches in flight per host, so a
    fault lands in the middle of one. The store defaults to SQLite in tmp_path.
    """
    table: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap_servers,
            "topics": [topic],
            "group_id": f"faults-{uuid.uuid4().hex[:12]}",
            "commit_interval_s": 0.2,
            "max_batch_commands": 100,
            "retry_backoff_initial_s": 0.05,
            "retry_backoff_max_s": 1.0,
            **(kafka or {}),
        },
        "store": {
            "database_url": database_url or f"sqlite:///{tmp_path / 'events.db'}",
            "snapshot_url": snapshot_url or str(tmp_path / "snapshots"),
            "snapshot_storage_options": storage_options or {},
        },
        "hosts": {
            "min_hosts": 2,
            "max_hosts": 2,
            "num_shards": 32,
            "reconcile_interval_s": 0.2,
            **(hosts or {}),
        },
        "aggregates": {"Shop": {"snapshot_every": 20, **(shop or {})}},
    }
    return config_from_dict(table)


def durable(status: dict[str, Any]) -> int:
    """Return the commands an ingestor status reports durable (executed or known)."""
    return int(status["appended"] + status["rejected"] + status["duplicates"])


def wait_for_durable(ingestor: Any, count: int) -> dict[str, Any]:
    """Wait until the ingestor reports ``count`` durable commands; return its status."""
    return wait_until(
        lambda: _status_if(ingestor, lambda s: durable(s) >= count),
        timeout_s=JOIN_TIMEOUT_S,
        interval_s=0.02,
    )


def _status_if(ingestor: Any, condition: Callable[[dict[str, Any]], bool]) -> Any:
    status = ray.get(ingestor.status.remote(), timeout=30)
    return status if condition(status) else None


def host_statuses(controller: Any) -> dict[str, dict[str, Any]]:
    """Return the live status of every host the controller runs now."""
    handles = ray.get(controller.host_handles.remote(), timeout=30)
    return {
        host_id: ray.get(handle.status.remote(), timeout=30)
        for host_id, handle in handles.items()
    }


def flush_snapshots(controller: Any) -> None:
    """Wait until every host has written the snapshots it has queued."""
    handles = ray.get(controller.host_handles.remote(), timeout=30)
    for handle in handles.values():
        assert ray.get(handle.flush_snapshots.remote(60.0), timeout=90)


def assert_accounted(
    config: JobConfig,
    summary: dict[str, Any],
    messages: list[dict[str, Any]],
    placements: list[tuple[int, int]],
) -> None:
    """Check that one ingestor's summary and the group's offsets cover every message.

    Each message ends with exactly one durable result: appended, rejected, or
    a duplicate of a command recorded before its result reached the ingestor.
    """
    assert summary["records_read"] == len(messages)
    assert summary["dead_letters"] == 0
    assert summary["appended"] + summary["rejected"] + summary["duplicates"] == len(
        messages
    )
    assert committed_offsets(config) == end_offsets(placements)


def assert_matches_fold(config: JobConfig, messages: list[dict[str, Any]]) -> None:
    assert_store_matches_fold(
        config.store.database_url, config.store.snapshot_url, shop_commands(messages)
    )


# -- hosts -------------------------------------------------------------------------


def _kill_with_ray(handle: Any, pid: int) -> None:
    ray.kill(handle, no_restart=True)


def _kill_with_sigkill(handle: Any, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "kill",
    [_kill_with_ray, _kill_with_sigkill],
    ids=["ray.kill", "SIGKILL"],
)
def test_host_killed_mid_batch(
    kill: Callable[[Any, int], None],
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    start_job: StartJob,
    start_ingestor: StartIngestor,
    messages: list[dict[str, Any]],
) -> None:
    """A host dies while a batch of it is in flight: resent, nothing lost or doubled."""
    topic = kafka_topic(8)
    placements = produce(kafka_broker, topic, shop_records(messages))
    config = fault_config(tmp_path, kafka_broker, topic)
    controller = start_job(config)
    victim = ray.get(controller.host_handles.remote())["host-1"]
    victim_pid = ray.get(victim.status.remote())["pid"]

    ingestor = start_ingestor("ingestor-1", config, controller)
    run = ingestor.run.remote(max_idle_s=1.0)
    at_kill = wait_until(
        lambda: _status_if(
            ingestor,
            lambda s: durable(s) >= FAULT_AFTER and "host-1" in s["in_flight_batches"],
        ),
        timeout_s=JOIN_TIMEOUT_S,
        interval_s=0.01,
    )
    kill(victim, victim_pid)
    summary = ray.get(run, timeout=RUN_TIMEOUT_S)

    assert durable(at_kill) < len(messages)
    assert summary["backoffs"] > 0
    assert summary["resends"] > 0
    history = ray.get(controller.status.remote())["history"]
    assert ("host died", "host-1") in [
        (entry["decision"], entry.get("replaced")) for entry in history
    ]
    assert _has_exited(victim_pid)
    assert_accounted(config, summary, messages, placements)
    assert_matches_fold(config, messages)


def _has_exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- ingestors -----------------------------------------------------------------------


def test_ingestor_killed_before_commit(
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    start_job: StartJob,
    start_ingestor: StartIngestor,
    messages: list[dict[str, Any]],
) -> None:
    """An ingestor killed before any commit: its successor re-reads, nothing twice.

    The commands the first ingestor made durable come back to the second as
    duplicates, acknowledged without running again.
    """
    topic = kafka_topic(8)
    placements = produce(kafka_broker, topic, shop_records(messages))
    # No periodic commit happens, and short group timeouts let the group drop
    # the killed member soon after it stops sending heartbeats.
    config = fault_config(
        tmp_path,
        kafka_broker,
        topic,
        kafka={
            "commit_interval_s": 3600.0,
            "session_timeout_ms": 3000,
            "heartbeat_interval_ms": 500,
            "max_poll_interval_ms": 6000,
        },
    )
    controller = start_job(config)

    first = start_ingestor("ingestor-1", config, controller)
    first.run.remote()
    at_kill = wait_for_durable(first, FAULT_AFTER)
    ray.kill(first, no_restart=True)
    assert committed_offsets(config) == {}

    second = start_ingestor("ingestor-2", config, controller)
    summary = ray.get(second.run.remote(max_idle_s=1.0), timeout=RUN_TIMEOUT_S)

    assert durable(at_kill) < len(messages)
    assert summary["duplicates"] >= durable(at_kill)
    assert summary["appended"] + summary["rejected"] > 0
    assert_accounted(config, summary, messages, placements)
    assert_matches_fold(config, messages)


# -- the controller --------------------------------------------------------------------


def _is_dead(actor: Any) -> bool:
    try:
        ray.get(actor.ping.remote(), timeout=30)
    except RayActorError:
        return True
    return False


def _wait_for_controller_gone(namespace: str) -> None:
    def is_gone() -> bool:
        try:
            ray.get_actor(CONTROLLER_NAME, namespace=namespace)
        except ValueError:
            return True
        return False

    wait_until(is_gone, timeout_s=30)


def test_controller_killed_and_restarted(
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    start_job: StartJob,
    start_ingestor: StartIngestor,
    messages: list[dict[str, Any]],
) -> None:
    """The controller dies mid-run; the ingestor finds its successor by name.

    The hosts die with the controller that started them, so the ingestor's
    batches fail and it backs off. The ingestor was built with the dead
    controller's handle, so its router must look up the new controller by
    name to reach the new hosts.
    """
    topic = kafka_topic(8)
    placements = produce(kafka_broker, topic, shop_records(messages))
    config = fault_config(tmp_path, kafka_broker, topic)
    first = start_controller(config)
    try:
        ray.get(first.get_assignment.remote(), timeout=120)
        ingestor = start_ingestor("ingestor-1", config, first)
        run = ingestor.run.remote(max_idle_s=1.0)
        wait_for_durable(ingestor, FAULT_AFTER)
        old_hosts = ray.get(first.host_handles.remote()).values()

        ray.kill(first, no_restart=True)
        _wait_for_controller_gone(config.ray.namespace)
        for host in old_hosts:
            wait_until(lambda host=host: _is_dead(host), timeout_s=30)
        at_restart = wait_until(
            lambda: _status_if(ingestor, lambda s: s["backoffs"] > 0),
            timeout_s=60,
        )
        second = start_job(config)
        summary = ray.get(run, timeout=RUN_TIMEOUT_S)
    finally:
        ray.kill(first)

    assert durable(at_restart) < len(messages)
    assert summary["resends"] > 0
    assert set(ray.get(second.host_handles.remote())) != set()
    assert_accounted(config, summary, messages, placements)
    assert_matches_fold(config, messages)


# -- the whole job ---------------------------------------------------------------------


def _write_job_file(tmp_path: Path, kafka_broker: str, topic: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(
        f'work_dir = "{tmp_path / "work"}"\n'
        "[kafka]\n"
        f'bootstrap_servers = "{kafka_broker}"\n'
        f'topics = ["{topic}"]\n'
        f'group_id = "faults-{topic}"\n'
        "commit_interval_s = 0.2\n"
        "max_batch_commands = 100\n"
        "[store]\n"
        f'database_url = "sqlite:///{tmp_path / "events.db"}"\n'
        f'snapshot_url = "{tmp_path / "snapshots"}"\n'
        "[ray]\n"
        "num_cpus = 2\n"
        "[hosts]\n"
        "num_shards = 32\n"
        "[aggregates.Shop]\n"
        "snapshot_every = 20\n"
    )
    return path


def _start_run(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m pipeline run`` as the leader of a new process group."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "--config", str(config_path)],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _num_recorded(database_url: str) -> int:
    store = EventStore(database_url)
    try:
        return len(recorded_commands(store))
    finally:
        store.close()


def _kill_job(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """SIGKILL the run, its process group and every process it started (Ray's)."""
    tree = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert alive == []
    return tree


def test_whole_job_killed_then_restarted(
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    messages: list[dict[str, Any]],
) -> None:
    """SIGKILL to ``raysource run`` and its Ray mid-run; a second run drains it."""
    topic = kafka_topic(8)
    placements = produce(kafka_broker, topic, shop_records(messages))
    config_path = _write_job_file(tmp_path, kafka_broker, topic)
    database_url = f"sqlite:///{tmp_path / 'events.db'}"
    group = f"faults-{topic}"
    log_path = tmp_path / "run.log"

    first = _start_run(config_path, log_path)
    try:
        wait_until(
            lambda: (
                (tmp_path / "events.db").exists()
                and _num_recorded(database_url) >= FAULT_AFTER
            ),
            timeout_s=180,
            interval_s=0.05,
        )
    finally:
        killed = _kill_job(first)
    recorded_at_kill = _num_recorded(database_url)

    second = _start_run(config_path, log_path)
    try:
        ends = end_offsets(placements)
        wait_until(
            lambda: _committed_by_group(kafka_broker, topic, group) == ends,
            timeout_s=RUN_TIMEOUT_S,
            interval_s=0.5,
        )
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=180) == 0, log_path.read_text()[-3000:]
    finally:
        if second.poll() is None:
            _kill_job(second)

    assert len(killed) > 1, "the first run had no Ray processes to kill"
    assert recorded_at_kill < len(messages)
    assert_store_matches_fold(
        database_url, str(tmp_path / "snapshots"), shop_commands(messages)
    )


def _committed_by_group(kafka_broker: str, topic: str, group: str) -> dict[int, int]:
    offsets = group_offsets(kafka_broker, group)
    return {
        partition: offset
        for (name, partition), offset in offsets.items()
        if name == topic
    }


# -- PostgreSQL ------------------------------------------------------------------------


def test_postgres_unavailable_mid_run(
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    pg_database: str,
    start_job: StartJob,
    start_ingestor: StartIngestor,
    messages: list[dict[str, Any]],
) -> None:
    """The job's database refuses connections for 3 s; the job backs off and goes on.

    Blocking new connections and ending the open ones is what a database
    server stopped for a few seconds looks like to the job, without stopping
    the server that other tests share.
    """
    topic = kafka_topic(8)
    placements = produce(kafka_broker, topic, shop_records(messages))
    config = fault_config(tmp_path, kafka_broker, topic, database_url=pg_database)
    controller = start_job(config)

    ingestor = start_ingestor("ingestor-1", config, controller)
    run = ingestor.run.remote(max_idle_s=1.0)
    at_block = wait_for_durable(ingestor, FAULT_AFTER)
    set_connections_allowed(pg_database, False)
    try:
        time.sleep(3.0)
        during = ray.get(ingestor.status.remote(), timeout=30)
    finally:
        set_connections_allowed(pg_database, True)
    summary = ray.get(run, timeout=RUN_TIMEOUT_S)

    assert durable(at_block) < len(messages)
    assert durable(during) < len(messages)
    assert during["backoffs"] > 0
    assert summary["backoffs"] >= during["backoffs"]
    assert summary["resends"] > 0
    store_failures = [
        status["counters"].get("store_failures", 0)
        for status in host_statuses(controller).values()
    ]
    assert sum(store_failures) > 0
    assert_accounted(config, summary, messages, placements)
    assert_matches_fold(config, messages)


# A string condition, so that pytest evaluates it with the run's config
# before any fixture starts a service.
PG_RESTART_NOT_SELECTED = (
    "os.environ.get('RAYSOURCE_PG_RESTART') != '1' and 'pg_restart' not in "
    "(config.getoption('markexpr') or '').replace('not pg_restart', '')"
)


@pytest.mark.pg_restart
@pytest.mark.skipif(
    PG_RESTART_NOT_SELECTED,
    reason="stops the shared PostgreSQL server; run with -m pg_restart",
)
def test_postgres_server_restart_mid_run(
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    pg_database: str,
    start_job: StartJob,
    start_ingestor: StartIngestor,
    messages: list[dict[str, Any]],
) -> None:
    """The whole PostgreSQL server stops for about 2 s mid-run; the job goes on."""
    cluster = os.listdir("/etc/postgresql")[0]
    topic = kafka_topic(8)
    placements = produce(kafka_broker, topic, shop_records(messages))
    config = fault_config(tmp_path, kafka_broker, topic, database_url=pg_database)
    controller = start_job(config)

    ingestor = start_ingestor("ingestor-1", config, controller)
    run = ingestor.run.remote(max_idle_s=1.0)
    wait_for_durable(ingestor, FAULT_AFTER)
    stopped_at = time.monotonic()
    _pg_ctlcluster(cluster, "stop")
    try:
        time.sleep(1.0)
    finally:
        _pg_ctlcluster(cluster, "start")
    stopped_s = time.monotonic() - stopped_at
    summary = ray.get(run, timeout=RUN_TIMEOUT_S)

    assert stopped_s < 5.0
    assert summary["backoffs"] > 0
    assert summary["resends"] > 0
    assert_accounted(config, summary, messages, placements)
    assert_matches_fold(config, messages)


def _pg_ctlcluster(cluster: str, action: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", action],
        check=True,
        timeout=30,
    )


# -- snapshots ------------------------------------------------------------


class _MotoServer:
    """A moto S3 server of this test's own on a fixed loopback port."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()
        self.is_running = True

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if self.is_running:
            self.server.stop()
            self.is_running = False

    def start_again(self) -> None:
        # Buckets live in moto's in-process backend, so they outlast the server.
        self.server = self._cls(ip_address=self.host, port=self.port, verbose=False)
        self.server.start()
        self.is_running = True


@pytest.fixture
def own_s3() -> Iterator[_MotoServer]:
    """Start a moto S3 server that only this test uses, so it may stop it."""
    # The server logs every request at INFO, thousands of lines in this test.
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)
    server = _MotoServer()
    yield server
    server.stop()
    werkzeug.setLevel(level)


def test_snapshot_store_unreachable(
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    own_s3: _MotoServer,
    start_job: StartJob,
    start_ingestor: StartIngestor,
    messages: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """S3 goes away mid-run: commands go on, failures are counted, snapshots resume."""
    bucket = f"faults-{uuid.uuid4().hex[:16]}"
    boto3.client(
        "s3",
        endpoint_url=own_s3.url,
        region_name=S3_REGION,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
    ).create_bucket(Bucket=bucket)
    snapshot_url = f"s3://{bucket}/snapshots"
    # One attempt per request, so that each failure takes a fraction of a second.
    storage_options = {
        "key": S3_ACCESS_KEY,
        "secret": S3_SECRET_KEY,
        "client_kwargs": {"endpoint_url": own_s3.url, "region_name": S3_REGION},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    topic = kafka_topic(8)
    half = len(messages) // 2
    placements = produce(kafka_broker, topic, shop_records(messages[:half]))
    # Few live aggregates per host, so that some are evicted and loaded again
    # while the store is away.
    config = fault_config(
        tmp_path,
        kafka_broker,
        topic,
        snapshot_url=snapshot_url,
        storage_options=storage_options,
        hosts={"max_live_aggregates": 60},
    )
    controller = start_job(config)
    ingestor = start_ingestor("ingestor-1", config, controller)
    # Without an idle limit, because the ingestor waits for the second half.
    run = ingestor.run.remote()
    wait_for_durable(ingestor, FAULT_AFTER)
    wait_until(lambda: _sum_hosts(controller, "snapshots_written") > 0, timeout_s=60)

    own_s3.stop()
    placements += produce(kafka_broker, topic, shop_records(messages[half:]))
    during = wait_for_durable(ingestor, half + 300)
    wait_until(lambda: _sum_hosts(controller, "snapshots_failed") > 0, timeout_s=60)
    with caplog.at_level(logging.WARNING, logger="store.snapshot_store"):
        loaded = _load_busiest_shop(config, storage_options)
    written_during = _sum_hosts(controller, "snapshots_written")
    own_s3.start_again()
    ends = end_offsets(placements)
    wait_until(lambda: committed_offsets(config) == ends, timeout_s=RUN_TIMEOUT_S)
    ray.get(ingestor.stop.remote())
    summary = ray.get(run, timeout=RUN_TIMEOUT_S)
    flush_snapshots(controller)

    assert durable(during) < len(messages)
    assert loaded.snapshot_base == 0
    assert loaded.events_replayed == loaded.aggregate.version
    assert "snapshot store unreachable" in caplog.text
    assert _sum_hosts(controller, "snapshots_failed") > 0
    assert _sum_hosts(controller, "snapshots_written") > written_during
    assert_accounted(config, summary, messages, placements)
    # The fold check reads snapshots from an empty folder (a full replay of
    # every stream); the S3 snapshots are checked against the fold after it.
    assert_store_matches_fold(
        config.store.database_url, str(tmp_path / "empty"), shop_commands(messages)
    )
    _assert_snapshots_match_fold(config, storage_options, messages)


def _sum_hosts(controller: Any, name: str) -> int:
    return sum(status[name] for status in host_statuses(controller).values())


def _load_busiest_shop(config: JobConfig, storage_options: dict[str, Any]) -> Any:
    """Load the busiest shop in this process while its snapshot store is down."""
    store = EventStore(config.store.database_url)
    try:
        snapshots = SnapshotStore(config.store.snapshot_url, storage_options)
        return load_aggregate(Shop, "shop-000001", store, snapshots)
    finally:
        store.close()


def _assert_snapshots_match_fold(
    config: JobConfig, storage_options: dict[str, Any], messages: list[dict[str, Any]]
) -> None:
    """Check that loading each shop from the S3 snapshots gives the fold's state."""
    fold = fold_commands(Shop, shop_commands(messages))
    store = EventStore(config.store.database_url)
    snapshots = SnapshotStore(config.store.snapshot_url, storage_options)
    num_from_snapshot = 0
    try:
        for aggregate_id, expected in fold.aggregates.items():
            loaded = load_aggregate(Shop, aggregate_id, store, snapshots)
            assert loaded.aggregate.version == expected.version, aggregate_id
            assert loaded.aggregate.snapshot_state() == expected.snapshot_state()
            num_from_snapshot += loaded.snapshot_base > 0
    finally:
        store.close()
    assert num_from_snapshot > 0


def _corrupt(path: Path, kind: int) -> None:
    """Truncate a snapshot, or overwrite it with random bytes or misshapen JSON."""
    data = path.read_bytes()
    if kind == 0:
        path.write_bytes(data[: len(data) // 2])
    elif kind == 1:
        path.write_bytes(os.urandom(len(data)))
    else:
        path.write_bytes(json.dumps({"format": 1, "state": []}).encode())


def _snapshot_files(root: Path) -> dict[str, tuple[Path, int]]:
    """Return each shop's snapshot file and the stream version in its name."""
    files = {}
    for path in root.glob("Shop/*/1/*.json"):
        files[path.parent.parent.name] = (path, int(path.name.split(".")[0]))
    return files


def _wait_until_all_evicted(controller: Any) -> None:
    def is_empty() -> bool:
        statuses = host_statuses(controller).values()
        return all(status["live_aggregates"] == 0 for status in statuses)

    wait_until(is_empty, timeout_s=30, interval_s=0.2)
    flush_snapshots(controller)


def test_corrupt_snapshots_replayed(
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    start_job: StartJob,
    start_ingestor: StartIngestor,
    messages: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Truncated or garbage snapshots: a full replay with a warning, then a fresh one.

    Aggregates live one second after their last command, so between the two
    halves of the workload every shop is evicted (with its snapshot written)
    and the second half loads each shop it touches from its corrupted file.
    """
    topic = kafka_topic(8)
    half = len(messages) // 2
    placements = produce(kafka_broker, topic, shop_records(messages[:half]))
    lifespan = {"after_event": "1s", "after_command": "1s", "after_error": "1s"}
    config = fault_config(
        tmp_path,
        kafka_broker,
        topic,
        hosts={"idle_check_interval_s": 0.1},
        shop={"snapshot_every": 10, **lifespan},
    )
    controller = start_job(config)
    first = start_ingestor("ingestor-1", config, controller)
    ray.get(first.run.remote(max_idle_s=1.0), timeout=RUN_TIMEOUT_S)
    _wait_until_all_evicted(controller)

    root = Path(config.store.snapshot_url)
    corrupted = _snapshot_files(root)
    for number, (path, _) in enumerate(sorted(corrupted.values())):
        _corrupt(path, number % 3)
    busiest = min(corrupted)
    with caplog.at_level(logging.WARNING, logger="store.snapshot_store"):
        store = EventStore(config.store.database_url)
        try:
            loaded = load_aggregate(Shop, busiest, store, SnapshotStore(str(root)))
        finally:
            store.close()
    replayed_before = _sum_counters(controller, "events_replayed")

    placements += produce(kafka_broker, topic, shop_records(messages[half:]))
    second = start_ingestor("ingestor-2", config, controller)
    summary = ray.get(second.run.remote(max_idle_s=1.0), timeout=RUN_TIMEOUT_S)
    _wait_until_all_evicted(controller)

    assert len(corrupted) > 10
    assert "snapshot unreadable" in caplog.text
    assert loaded.snapshot_base == 0
    assert loaded.events_replayed == loaded.aggregate.version
    assert loaded.aggregate.version >= corrupted[busiest][1]
    touched = {m["shop_id"] for m in messages[half:]} & set(corrupted)
    replayed = _sum_counters(controller, "events_replayed") - replayed_before
    assert replayed >= sum(corrupted[shop][1] for shop in touched)
    fresh = _snapshot_files(root)
    renewed = [shop for shop in touched if fresh[shop][1] > corrupted[shop][1]]
    assert len(renewed) > 0
    snapshots = SnapshotStore(str(root))
    for shop in renewed:
        snapshot = snapshots.load_latest("Shop", shop, 1)
        assert snapshot is not None, shop
        assert snapshot.version == fresh[shop][1], shop
    assert summary["records_read"] == len(messages) - half
    assert committed_offsets(config) == end_offsets(placements)
    assert_matches_fold(config, messages)


def _sum_counters(controller: Any, name: str) -> int:
    statuses = host_statuses(controller).values()
    return sum(status["counters"].get(name, 0) for status in statuses)


# -- memory ---------------------------------------------------------------


def test_host_over_memory_budget_recycled(
    tmp_path: Path,
    kafka_broker: str,
    kafka_topic: TopicFactory,
    start_job: StartJob,
    start_ingestor: StartIngestor,
    messages: list[dict[str, Any]],
) -> None:
    """Hosts over their memory budget are recycled mid-run without losing commands.

    A budget of one byte puts every host over it from its first batch, so the
    controller recycles each host two seconds later, again and again, while
    batches are in flight to it.
    """
    topic = kafka_topic(8)
    placements = produce(kafka_broker, topic, shop_records(messages))
    config = fault_config(
        tmp_path,
        kafka_broker,
        topic,
        hosts={"memory_budget_bytes": 1, "recycle_after_s": 2.0},
    )
    controller = start_job(config)

    ingestor = start_ingestor("ingestor-1", config, controller)
    summary = ray.get(ingestor.run.remote(max_idle_s=1.0), timeout=RUN_TIMEOUT_S)

    status = ray.get(controller.status.remote())
    recycled = [e for e in status["history"] if e["decision"] == "host recycled"]
    assert len(recycled) >= 1
    assert all(e["memory_budget_bytes"] == 1 for e in recycled)
    assert all(e["rss_bytes"] > 1 for e in recycled)
    assert_accounted(config, summary, messages, placements)
    assert_matches_fold(config, messages)
