"""Observability: metrics, ``raysource status``, ``raysource top`` and run samples.

The metric recorders are checked two ways. Plain hosts in the test process
record into an in-memory fake of Ray's metric objects, which checks every
value and tag set. A streaming job on the session's Ray records through
``ray.util.metrics``, and the test reads the values back from Ray's own
Prometheus endpoint, which serves on 127.0.0.1 because the session's Ray
takes 127.0.0.1 as its node address. ``top`` is checked as a frame rendered
from a report, and in a terminal: tmux runs it against the session's Ray,
and capture-pane reads the screen.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from aggregates.workload import generate_commands
from pipeline.aggregate_host import AggregateHost
from pipeline.cli import main
from pipeline.config import JobConfig, config_from_dict, load_config
from pipeline.dispatch import Dispatcher
from pipeline.job import StreamingJob
from pipeline.metrics import (
    METRICS,
    ControllerMetrics,
    HostMetrics,
    IngestorMetrics,
    MetricSpec,
    describe_metrics,
)
from pipeline.monitor import read_samples
from pipeline.status import collect_status, describe_job, format_status, redact_url
from pipeline.top import render_frame
from store import EventStore
from tests.conftest import REPO_ROOT, TopicFactory
from tests.pipeline.conftest import (
    NUM_SHARDS,
    SHOP,
    FakeClock,
    ShopCommands,
    batch,
    batch_items,
    job_config,
    set_connections_allowed,
    wait_until,
    workload,
)

SECRET = "s3cret-pw"
# Recorded values reached Ray's endpoint within about 10 s in trials on this
# project's machines (Ray's metrics_report_interval_ms setting sets the pace),
# so this allows several export rounds.
METRICS_EXPORT_TIMEOUT_S = 45.0
TMUX_TIMEOUT_S = 60.0

Tags = frozenset[tuple[str, str]]


# -- a recording fake of Ray's metric objects ------------------------------------


class RecordingMetric:
    """Keep what a Ray metric would export, per tag set, and reject wrong tag keys."""

    def __init__(self, spec: MetricSpec) -> None:
        self.spec = spec
        self.values: dict[Tags, float] = {}
        self.observations: dict[Tags, list[float]] = defaultdict(list)

    def _key(self, tags: dict[str, str] | None) -> Tags:
        tags = tags or {}
        if set(tags) != set(self.spec.tag_keys):
            msg = (
                f"{self.spec.name}: tags {sorted(tags)} != {sorted(self.spec.tag_keys)}"
            )
            raise ValueError(msg)
        if not all(isinstance(value, str) for value in tags.values()):
            msg = f"{self.spec.name}: tag values must be strings, got {tags}"
            raise TypeError(msg)
        return frozenset(tags.items())

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        assert self.spec.kind == "counter", self.spec.name
        assert value > 0, (self.spec.name, value)
        key = self._key(tags)
        self.values[key] = self.values.get(key, 0) + value

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        assert self.spec.kind == "gauge", self.spec.name
        self.values[self._key(tags)] = value

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        assert self.spec.kind == "histogram", self.spec.name
        self.observations[self._key(tags)].append(value)


class RecordingFactory:
    """Create RecordingMetrics and sum their values by tag."""

    def __init__(self) -> None:
        self.metrics: dict[str, RecordingMetric] = {}

    def create(self, spec: MetricSpec) -> RecordingMetric:
        metric = self.metrics.setdefault(spec.name, RecordingMetric(spec))
        return metric

    def total(self, name: str, **match: str) -> float:
        metric = self.metrics.get(name)
        if metric is None:
            return 0
        expected_tags = set(match.items())
        return sum(
            value for tags, value in metric.values.items() if expected_tags <= tags
        )

    def observations(self, name: str, **match: str) -> list[float]:
        metric = self.metrics.get(name)
        if metric is None:
            return []
        expected_tags = set(match.items())
        found: list[float] = []
        for tags, values in metric.observations.items():
            if expected_tags <= tags:
                found += values
        return found


class FailingFactory:
    """Create metrics whose every call raises, as a broken metrics agent might."""

    def create(self, spec: MetricSpec) -> Any:
        class Failing:
            def inc(self, *args: Any, **kwargs: Any) -> None:
                msg = "metrics agent unavailable"
                raise RuntimeError(msg)

            set = observe = inc

        return Failing()


def recording_host(
    tmp_path: Path, clock: FakeClock, config: JobConfig
) -> tuple[AggregateHost, RecordingFactory, HostMetrics]:
    factory = RecordingFactory()
    metrics = HostMetrics("host-test", "test-ns", factory, clock, gauge_interval_s=0)
    host = AggregateHost(
        "host-test",
        config,
        range(NUM_SHARDS),
        clock=clock,
        start_idle_thread=False,
        metrics=metrics,
    )
    return host, factory, metrics


# -- metric recording, without Ray -------------------------------------------------


def test_host_metrics_match_store_and_status(tmp_path: Path, clock: FakeClock) -> None:
    """Counters, evictions, snapshots and gauges equal the store's and status counts."""
    config = job_config(
        tmp_path,
        hosts={"max_live_aggregates": 5},
        shop={"after_event": "30s", "after_error": "stop", "snapshot_every": 2},
    )
    host, factory, metrics = recording_host(tmp_path, clock, config)
    commands = workload(num_shops=20, num_commands=400, note_bytes=16)
    try:
        for start in range(0, len(commands), 50):
            host.execute_batch(batch(commands[start : start + 50]))
        resent = commands[:30]
        host.execute_batch(batch(resent, epoch=1))
        clock.advance(60)
        host.flush_snapshots()
        host.evict_idle()
        status = host.status()
    finally:
        host.shutdown()

    store = EventStore(config.store.database_url)
    try:
        counts = store.counts()
    finally:
        store.close()
    tags = {"namespace": "test-ns", "host": "host-test", "aggregate_type": SHOP}
    assert metrics.num_failures == 0
    assert counts["appended_commands"] > 0
    assert counts["rejected_commands"] > 0
    assert factory.total("raysource_commands", **tags) == counts["appended_commands"]
    assert factory.total("raysource_events", **tags) == counts["events"]
    assert factory.total("raysource_rejections", **tags) == counts["rejected_commands"]
    assert factory.total("raysource_duplicates", **tags) == len(resent)
    assert factory.total("raysource_loads", **tags) == status["counters"]["loads"]
    replayed = factory.observations("raysource_events_replayed_per_load", **tags)
    assert len(replayed) == status["counters"]["loads"]
    assert sum(replayed) == status["counters"]["events_replayed"]
    assert len(factory.observations("raysource_batch_latency_seconds")) == 9

    assert set(status["evictions"]) >= {"stop", "idle", "count_limit"}
    for reason, count in status["evictions"].items():
        assert factory.total("raysource_evictions", reason=reason) == count, reason
    assert status["snapshots_written"] > 0
    written = factory.total("raysource_snapshots_written")
    assert written == status["snapshots_written"]
    assert factory.total("raysource_snapshots_failed") == 0

    assert factory.total("raysource_live_aggregates", **tags) == 0
    assert status["live_aggregates"] == 0
    assert factory.total("raysource_host_rss_bytes") > 0
    assert status["counters_by_type"][SHOP]["commands"] == counts["appended_commands"]


def test_metrics_failure_never_fails_a_batch(
    tmp_path: Path, clock: FakeClock, commands: ShopCommands
) -> None:
    """A metrics backend that raises on every call leaves batches untouched."""
    metrics = HostMetrics("host-test", "test-ns", FailingFactory(), clock, 0)
    host = AggregateHost(
        "host-test",
        job_config(tmp_path),
        range(NUM_SHARDS),
        clock=clock,
        start_idle_thread=False,
        metrics=metrics,
    )
    try:
        results = host.execute_batch(
            batch([commands.place("shop-1", "o-1"), commands.place("shop-2", "o-2")])
        ).results
    finally:
        host.shutdown()

    assert [result.status for result in results] == ["appended", "appended"]
    assert metrics.num_failures > 0


def test_metrics_off_outside_ray_actor(ray_session: Any) -> None:
    """Recorders built in a driver, even with Ray running, record nothing."""
    assert ray.is_initialized()
    assert not HostMetrics("host-1", "ns").enabled
    assert not ControllerMetrics("ns").enabled
    assert not IngestorMetrics("ingestor-1", "ns").enabled


def test_ingestor_metrics_lag_paused_dead_letters() -> None:
    """Lag is set per partition, a revoked partition drops to 0, dead letters add up."""
    factory = RecordingFactory()
    metrics = IngestorMetrics("ingestor-1", "ns", factory)

    metrics.record_status(
        {
            "dead_letters": 3,
            "lag": {"orders:0": 120, "orders:1": None, "orders:2": 7},
            "paused_partitions": ["orders:0", "orders:2"],
            "held_commands": 900,
        }
    )
    metrics.record_status(
        {
            "dead_letters": 5,
            "lag": {"orders:0": 10},
            "paused_partitions": [],
            "held_commands": 20,
        }
    )

    assert metrics.num_failures == 0
    assert factory.total("raysource_dead_letters", ingestor="ingestor-1") == 5
    assert factory.total("raysource_consumer_lag", topic="orders", partition="0") == 10
    assert factory.total("raysource_consumer_lag", topic="orders", partition="2") == 0
    assert factory.total("raysource_paused_partitions") == 0
    assert factory.total("raysource_held_commands") == 20


def test_controller_metrics_count_recycled() -> None:
    """A recycled host's live aggregates count as host_recycled evictions."""
    factory = RecordingFactory()
    metrics = ControllerMetrics("ns", factory)

    metrics.record_recycled("host-1", 40)
    metrics.record_recycled("host-2", 0)
    metrics.record_recycled("host-3", 2)

    assert factory.total("raysource_evictions", reason="host_recycled") == 42
    assert factory.total("raysource_evictions", host="host-1") == 40


def test_every_metric_documented() -> None:
    """Each metric has a raysource_ name, a description and a README row."""
    rows = describe_metrics()

    assert len(rows) == len(METRICS)
    for spec in METRICS.values():
        assert spec.name.startswith("raysource_")
        assert spec.description
        assert "namespace" in spec.tag_keys
    assert any("ray_raysource_commands_total" in row for row in rows)


# -- secrets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            f"postgresql+psycopg://app:{SECRET}@db.internal:5432/events",
            "postgresql+psycopg://app:***@db.internal:5432/events",
        ),
        (
            f"postgresql://db/events?sslmode=require&password={SECRET}",
            "postgresql://db/events?sslmode=require&password=***",
        ),
        (
            f"user:{SECRET}@broker-1:9092,broker-2:9092",
            "user:***@broker-1:9092,broker-2:9092",
        ),
        (f"SASL_SSL://svc:{SECRET}@broker:9093", "SASL_SSL://svc:***@broker:9093"),
        ("sqlite:///work/events.db", "sqlite:///work/events.db"),
        ("s3://bucket/snapshots", "s3://bucket/snapshots"),
        ("127.0.0.1:9092", "127.0.0.1:9092"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_describe_job_hides_secrets() -> None:
    """Database and Kafka passwords and snapshot storage keys never reach a report."""
    config = config_from_dict(
        {
            "store": {
                "database_url": f"postgresql+psycopg://app:{SECRET}@db/events",
                "snapshot_url": "s3://bucket/snapshots",
                "snapshot_storage_options": {"key": "AKIAKEY", "secret": SECRET},
            },
            "kafka": {"bootstrap_servers": f"svc:{SECRET}@broker:9093"},
        }
    )

    text = json.dumps(describe_job(config))

    assert SECRET not in text
    assert "AKIAKEY" not in text
    assert "app:***@db/events" in text


def test_store_failure_log_hides_password(
    tmp_path: Path,
    clock: FakeClock,
    commands: ShopCommands,
    pg_database: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch failing on an unreachable store logs once, with the password masked."""
    # The server trusts local connections, so any password is accepted.
    url = pg_database.replace("postgres@", f"postgres:{SECRET}@")
    host = AggregateHost(
        "host-test",
        job_config(tmp_path, database_url=url),
        range(NUM_SHARDS),
        clock=clock,
        start_idle_thread=False,
    )
    try:
        host.execute_batch(batch([commands.place("shop-1", "o-1")]))
        set_connections_allowed(url, False)
        try:
            results = host.execute_batch(
                batch([commands.place("shop-1", "o-2")], epoch=1)
            ).results
        finally:
            set_connections_allowed(url, True)
    finally:
        host.shutdown()

    failed = [r for r in caplog.records if r.getMessage().startswith("batch failed")]
    assert [result.status for result in results] == ["failed"]
    assert len(failed) == 1
    assert SECRET not in caplog.text
    assert SECRET not in (results[0].reason or "")


# -- top, rendered from a report ---------------------------------------------------


def sample_report(now: float, commands_done: int) -> dict[str, Any]:
    """Return a status report shaped like collect_status's, with two hosts."""
    return {
        "time": now,
        "job": {"namespace": "shop-job"},
        "assignment_version": 4,
        "totals": {"live_aggregates": 1_500, "rss_bytes": 3 * 2**30, "lag": 130},
        "hosts": {
            "host-2": {
                "live_aggregates": 1_000,
                "hibernated_aggregates": 0,
                "rss_bytes": 2 * 2**30,
                "memory_budget_bytes": 2**30,
                "over_budget_since": now - 12,
                "counters": {"commands": commands_done, "rejected": 0},
                "evictions": {"memory_budget": 250, "idle": 40},
                "in_flight_batches": 3,
            },
            "host-3": {
                "live_aggregates": 500,
                "hibernated_aggregates": 7,
                "rss_bytes": 2**30,
                "memory_budget_bytes": 2**30,
                "over_budget_since": None,
                "counters": {"commands": 10, "rejected": 0},
                "evictions": {},
                "in_flight_batches": 0,
            },
        },
        "evictions": {"memory_budget": 250, "idle": 40, "host_recycled": 900},
        "host_decisions": [
            {
                "time": now - 30,
                "decision": "host recycled",
                "host": "host-3",
                "version": 4,
                "replaced": "host-1",
                "rss_bytes": 3 * 2**30,
                "memory_budget_bytes": 2**30,
                "live_aggregates": 900,
            }
        ],
        "ingestors": [{"ingestor_id": "ingestor-1"}],
        "partitions": [
            {
                "partition": "orders:0",
                "ingestor_id": "ingestor-1",
                "lag": 120,
                "paused": True,
                "committed_offset": 5_000,
            },
            {
                "partition": "orders:1",
                "ingestor_id": "ingestor-1",
                "lag": 10,
                "paused": False,
                "committed_offset": 4_000,
            },
        ],
        "top_aggregates": [
            {
                "aggregate_type": "Shop",
                "aggregate_id": "shop-000042",
                "version": 812,
                "estimated_bytes": 48_000,
                "idle_s": 2.5,
                "host_id": "host-2",
            },
        ],
    }


def test_render_frame_shows_hosts_partitions_aggregates() -> None:
    """A frame lists each host with rate and notes, each partition, large aggregates."""
    previous = sample_report(1_000.0, commands_done=1_000)
    report = sample_report(1_002.0, commands_done=5_000)

    frame = "\n".join(render_frame(report, previous))

    host_2 = next(line for line in frame.splitlines() if line.startswith("host-2"))
    host_3 = next(line for line in frame.splitlines() if line.startswith("host-3"))
    assert "2,000" in host_2  # (5,000 - 1,000) commands over 2 s
    assert "over memory budget for 12s" in host_2
    assert "290" in host_2  # evictions in total
    assert "memory_budget 250  idle 40" in frame
    assert "replaced host-1: recycled" in host_3
    assert "3.0 GiB stayed over budget 1.0 GiB" in host_3
    partition_0 = next(line for line in frame.splitlines() if "orders:0" in line)
    assert "120" in partition_0
    assert "paused" in partition_0
    assert "running" in next(line for line in frame.splitlines() if "orders:1" in line)
    assert "shop-000042" in frame
    assert "46.9 KiB" in frame
    assert "aggregates lost with recycled hosts: 900" in frame


def test_render_frame_first_refresh_has_no_rate() -> None:
    """Without an earlier report, the rate column shows '-' rather than a guess."""
    frame = render_frame(sample_report(1_000.0, commands_done=1_000))

    host_2 = next(line for line in frame if line.startswith("host-2"))
    assert " - " in host_2
    assert frame[1].startswith("commands/s -")


def test_render_frame_bounds_partitions() -> None:
    """Past the bound, the paused and most lagging partitions show, then a count."""
    report = sample_report(1_000.0, commands_done=0)
    report["partitions"] = [
        {
            "partition": f"orders:{n}",
            "ingestor_id": "ingestor-1",
            "lag": n,
            "paused": n == 3,
            "committed_offset": 0,
        }
        for n in range(40)
    ]

    frame = render_frame(report, max_partitions=5)

    rows = [line for line in frame if line.startswith("  orders:")]
    assert [row.split()[0] for row in rows] == [
        "orders:3",
        "orders:39",
        "orders:38",
        "orders:37",
        "orders:36",
    ]
    assert "  ... 35 more partitions, none paused or lagging more" in frame


# -- a streaming job on Ray: status, metrics, samples ------------------------------


def produce_messages(
    bootstrap: str, topic: str, messages: list[dict[str, Any]]
) -> dict[int, int]:
    """Produce messages keyed by shop id and one bad message; return end offsets."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=10)
    try:
        futures = [
            producer.send(
                topic, key=m["shop_id"].encode(), value=json.dumps(m).encode()
            )
            for m in messages
        ]
        futures.append(producer.send(topic, key=b"shop-bad", value=b"not json"))
        producer.flush()
        ends: dict[int, int] = {}
        for future in futures:
            metadata = future.get(timeout=30)
            ends[metadata.partition] = max(
                ends.get(metadata.partition, 0), metadata.offset + 1
            )
    finally:
        producer.close()
    return ends


def metrics_endpoint() -> str:
    """Return the URL of the session Ray's Prometheus endpoint, checked to be local."""
    [node] = [node for node in ray.nodes() if node["Alive"]]
    address, port = node["NodeManagerAddress"], node["MetricsExportPort"]
    assert address == "127.0.0.1"
    listening = [
        connection.laddr.ip
        for connection in psutil.net_connections(kind="tcp")
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
    ]
    assert listening, f"nothing listens on the metrics port {port}"
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip in listening), listening
    return f"http://127.0.0.1:{port}/metrics"


def scrape(url: str, namespace: str) -> dict[str, float]:
    """Return ``{name{label=value,...}: value}`` of a namespace's raysource samples."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("ray_raysource_"):
                continue
            if sample.labels.get("namespace") != namespace:
                continue
            keep = (
                "host",
                "reason",
                "aggregate_type",
                "ingestor",
                "topic",
                "partition",
            )
            labels = ",".join(
                f"{k}={sample.labels[k]}" for k in keep if k in sample.labels
            )
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def metric_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, value in samples.items():
        sample_name, _, label_text = key.partition("{")
        if sample_name != name:
            continue
        if all(f"{k}={v}" in label_text for k, v in labels.items()):
            total += value
    return total


@pytest.fixture
def streaming_job(
    tmp_path: Path, kafka_broker: str, kafka_topic: TopicFactory, ray_session: Any
) -> Iterator[tuple[StreamingJob, Path]]:
    """Run a job of two hosts over 600 Shop commands and one bad message until drained.

    Yields the job, still running, and its configuration file.
    """
    topic = kafka_topic(4)
    namespace = f"observability-{uuid.uuid4().hex[:8]}"
    config_path = tmp_path / "job.toml"
    config_path.write_text(
        f'work_dir = "{tmp_path / "work"}"\nsample_interval_s = 0.5\n'
        f'[ray]\nnamespace = "{namespace}"\n'
        f'[kafka]\nbootstrap_servers = "{kafka_broker}"\ntopics = ["{topic}"]\n'
        f'group_id = "group-{namespace}"\ncommit_interval_s = 0.2\n'
        f'[store]\ndatabase_url = "sqlite:///{tmp_path / "events.db"}"\n'
        f'snapshot_url = "{tmp_path / "snapshots"}"\n'
        "[hosts]\nmin_hosts = 2\nmax_hosts = 2\nnum_shards = 16\n"
        '[aggregates.Shop]\nafter_event = "60s"\nsnapshot_every = 5\n'
    )
    config = load_config(config_path)
    messages = list(generate_commands(num_shops=40, num_commands=600, note_bytes=32))
    ends = produce_messages(kafka_broker, topic, messages)
    job = StreamingJob(config, {(topic, p): end for p, end in ends.items()})
    job.start()
    try:
        assert job.wait(threading.Event(), timeout_s=120), "the topic was not drained"
        yield job, config_path
    finally:
        job.stop()


def test_status_json_matches_event_store(
    streaming_job: tuple[StreamingJob, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``status --json`` totals, hosts and partitions agree with the event store."""
    job, config_path = streaming_job
    counts = EventStore(job.config.store.database_url).counts()

    assert main(["status", "--json", "--config", str(config_path)]) == 0
    report = json.loads(capsys.readouterr().out)

    totals = report["totals"]
    assert totals["commands"] == counts["appended_commands"]
    assert totals["events"] == counts["events"]
    assert totals["rejected"] == counts["rejected_commands"]
    assert totals["dead_letters"] == counts["dead_letters"] == 1
    assert totals["duplicates"] == 0
    assert sorted(report["hosts"]) == ["host-1", "host-2"]
    assert report["job"]["namespace"] == job.config.ray.namespace
    assert len(report["partitions"]) == 4
    assert all(row["lag"] == 0 for row in report["partitions"])
    assert report["top_aggregates"], "no live aggregate listed"
    text = format_status(report)
    assert "host-1" in text
    assert "host-2" in text


def test_metrics_reach_ray_prometheus_endpoint(
    streaming_job: tuple[StreamingJob, Path],
) -> None:
    """Ray's Prometheus endpoint serves the job's metrics, equal to store counts."""
    job, _ = streaming_job
    namespace = job.config.ray.namespace
    counts = EventStore(job.config.store.database_url).counts()
    url = metrics_endpoint()
    expected = {
        "ray_raysource_commands_total": counts["appended_commands"],
        "ray_raysource_events_total": counts["events"],
        "ray_raysource_rejections_total": counts["rejected_commands"],
        "ray_raysource_dead_letters_total": counts["dead_letters"],
    }

    def exported() -> dict[str, float] | None:
        samples = scrape(url, namespace)
        sums = {name: metric_sum(samples, name) for name in expected}
        return samples if sums == expected else None

    samples = wait_until(exported, timeout_s=METRICS_EXPORT_TIMEOUT_S, interval_s=1.0)

    report = collect_status(job.config, num_top_aggregates=0)
    for host_id in report["hosts"]:
        rss = metric_sum(samples, "ray_raysource_host_rss_bytes", host=host_id)
        assert rss > 0, host_id
    assert metric_sum(samples, "ray_raysource_live_aggregates") > 0
    assert metric_sum(samples, "ray_raysource_batch_latency_seconds_count") > 0
    assert metric_sum(samples, "ray_raysource_loads_total") == report["totals"]["loads"]
    assert metric_sum(samples, "ray_raysource_duplicates_total") == 0
    # Snapshots are written on the hosts' writer threads, after the batch
    # that made them due, so their counter may reach the endpoint a tick later.
    written = report["totals"]["snapshots_written"]

    def snapshots_exported() -> bool:
        exported_now = scrape(url, namespace)
        exported = metric_sum(exported_now, "ray_raysource_snapshots_written_total")
        return exported == written

    assert wait_until(
        snapshots_exported, timeout_s=METRICS_EXPORT_TIMEOUT_S, interval_s=1.0
    )
    assert written > 0

    lags = [key for key in samples if key.startswith("ray_raysource_consumer_lag{")]
    assert len(lags) == 4
    assert metric_sum(samples, "ray_raysource_consumer_lag") == 0
    assert metric_sum(samples, "ray_raysource_paused_partitions") == 0


def test_run_records_samples(streaming_job: tuple[StreamingJob, Path]) -> None:
    """samples.jsonl contains time, hosts, live aggregates, memory, throughput, lag."""
    job, _ = streaming_job
    sampler = job.sampler
    assert sampler is not None

    def samples_with_host_rate() -> list[dict[str, Any]] | None:
        # The controller refreshes host counters once per tick, so the samples
        # up to the drain can predate them. The job samples on while it runs.
        sampler.sample()
        samples = read_samples(sampler.path)
        hosts = [host for sample in samples for host in sample["hosts"].values()]
        return samples if any(host["commands_per_s"] > 0 for host in hosts) else None

    samples = wait_until(samples_with_host_rate, timeout_s=10, interval_s=0.5)

    assert len(samples) >= 2
    last = samples[-1]
    for key in (
        "time",
        "live_aggregates",
        "hosts_rss_bytes",
        "commands_per_s",
        "lag",
        "lag_by_partition",
        "paused_partitions",
    ):
        assert key in last, key
    assert sorted(last["hosts"]) == ["host-1", "host-2"]
    for host in last["hosts"].values():
        for key in ("live_aggregates", "rss_bytes", "commands_per_s", "evictions"):
            assert key in host, key
    assert max(sample["commands_per_s"] for sample in samples) > 0


# -- top in a terminal ---------------------------------------------------------------


class Tmux:
    """A tmux server of this test's own, on a private socket."""

    def __init__(self) -> None:
        if shutil.which("tmux") is None:
            pytest.fail(
                "tmux is not installed; install it with: apt-get install -y tmux"
            )
        self.socket = f"raysource-test-{uuid.uuid4().hex[:8]}"

    def run(self, *args: str) -> str:
        # The environment is passed explicitly: inheriting the process's own
        # would pass on COLUMNS=80 and LINES=24, which something in the pytest
        # process exports at the C level without os.environ seeing it, and
        # curses would then draw 80 columns in a wider pane.
        environment = {
            name: value
            for name, value in os.environ.items()
            if name not in ("COLUMNS", "LINES")
        }
        finished = subprocess.run(
            ["tmux", "-L", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            env=environment,
        )
        return finished.stdout

    def start(self, session: str, command: str) -> None:
        """Run ``command`` in a new 160x50 session, in the repository folder."""
        size = ["-x", "160", "-y", "50"]
        self.run(
            "new-session", "-d", "-s", session, *size, "-c", str(REPO_ROOT), command
        )

    def screen(self, session: str) -> str:
        return self.run("capture-pane", "-p", "-t", session)

    def wait_for(
        self, session: str, condition: Callable[[str], bool], what: str
    ) -> str:
        deadline = time.monotonic() + TMUX_TIMEOUT_S
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen(session)
            if condition(screen):
                return screen
            time.sleep(0.5)
        pytest.fail(
            f"the screen did not show {what} within {TMUX_TIMEOUT_S} s:\n{screen}"
        )

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    server = Tmux()
    yield server
    server.kill()


def test_top_in_terminal_shows_recycled_host(
    tmp_path: Path,
    tmux: Tmux,
    start_job: Callable[[JobConfig], Any],
    ray_session: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """top shows every host, one over its memory budget, then why it was recycled."""
    namespace = f"top-{uuid.uuid4().hex[:8]}"
    config_path = tmp_path / "job.toml"
    config_path.write_text(
        f'[ray]\nnamespace = "{namespace}"\n'
        f'[store]\ndatabase_url = "sqlite:///{tmp_path / "events.db"}"\n'
        f'snapshot_url = "{tmp_path / "snapshots"}"\n'
        f"[hosts]\nnum_shards = {NUM_SHARDS}\nmin_hosts = 2\nmax_hosts = 2\n"
        # A budget of one byte puts every host that ran a batch over it. The
        # controller's loop is slowed so that the test decides when it recycles.
        "memory_budget_bytes = 1\nrecycle_after_s = 0.0\n"
        "reconcile_interval_s = 3600.0\n"
    )
    config = load_config(config_path)
    controller = start_job(config)
    assert all(
        result.is_durable
        for result in Dispatcher(controller).dispatch(batch_items(workload(20, 200)))
    )

    assert main(["top", "--once", "--config", str(config_path)]) == 0
    once = capsys.readouterr().out
    assert "host-1" in once
    assert "host-2" in once
    assert once.count("over memory budget") == 2

    gcs_address = ray_session.address_info["gcs_address"]
    # A user's shell does not set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, which this
    # test process has set, and top must still join a Ray on 127.0.0.1.
    command = (
        f"env -u RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER {sys.executable} -m pipeline top "
        f"--config {config_path} --address {gcs_address} --interval 0.5; "
        "echo top exited with $?; sleep 600"
    )
    tmux.start("top", command)

    screen = tmux.wait_for(
        "top",
        lambda s: "host-1" in s and "host-2" in s and "HOSTS (2)" in s,
        "hosts 1 and 2",
    )
    assert screen.count("over memory budget") == 2, screen

    ray.get(controller.reconcile.remote())
    screen = tmux.wait_for(
        "top",
        lambda s: "host-3" in s and "host-4" in s and "HOSTS (2)" in s,
        "hosts 3 and 4 after recycling",
    )
    host_rows = {
        line.split()[0]: line
        for line in screen.splitlines()
        if line.startswith("host-")
    }
    assert sorted(host_rows) == ["host-3", "host-4"]
    assert "replaced host-1: recycled" in screen
    assert "replaced host-2: recycled" in screen
    assert "stayed over budget 1 B" in screen

    tmux.run("send-keys", "-t", "top", "q")
    tmux.wait_for("top", lambda s: "top exited with 0" in s, "top exiting after q")

    tmux.start("interrupted", command)
    tmux.wait_for("interrupted", lambda s: "host-4" in s, "a second top running")
    tmux.run("send-keys", "-t", "interrupted", "C-c")
    tmux.wait_for(
        "interrupted", lambda s: "top exited with 0" in s, "top exiting after Ctrl-C"
    )

    status = ray.get(controller.status.remote())
    assert status["host_evictions"]["host_recycled"] > 0
