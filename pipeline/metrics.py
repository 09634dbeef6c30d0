"""Job metrics through Ray's metrics API, so they reach Ray's dashboard and Prometheus.

Each process of a job records its own figures. Every host records its
aggregates, commands, evictions, snapshots and memory. The controller records
the aggregates lost with recycled hosts, and every ingestor its dead letters,
lag and paused partitions. ``METRICS`` lists every metric with its kind and
tags. Ray's
metrics endpoint exports them with the prefix ``ray_``, and counters also with
the suffix ``_total`` (``raysource_commands`` is scraped as
``ray_raysource_commands_total``).

Recording is a no-op outside a Ray actor (a plain AggregateHost in a unit test,
a notebook), and a failure to record is counted and logged, never raised, so a
metric can never fail a batch. Counters are fed with running totals that the
recorders turn into increments, so callers record once per batch or tick, not
once per command. May import ``ray``, and imports nothing else of the project.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

__all__ = [
    "METRICS",
    "ControllerMetrics",
    "HostMetrics",
    "IngestorMetrics",
    "MetricFactory",
    "MetricSpec",
    "NullMetricFactory",
    "RayMetricFactory",
    "default_factory",
    "describe_metrics",
]

logger = logging.getLogger(__name__)

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"

LIVE_AGGREGATES = "raysource_live_aggregates"
HIBERNATED_AGGREGATES = "raysource_hibernated_aggregates"
HOST_RSS_BYTES = "raysource_host_rss_bytes"
LOADS = "raysource_loads"
EVENTS_REPLAYED_PER_LOAD = "raysource_events_replayed_per_load"
EVICTIONS = "raysource_evictions"
COMMANDS = "raysource_commands"
EVENTS = "raysource_events"
REJECTIONS = "raysource_rejections"
DUPLICATES = "raysource_duplicates"
DEAD_LETTERS = "raysource_dead_letters"
SNAPSHOTS_WRITTEN = "raysource_snapshots_written"
SNAPSHOTS_FAILED = "raysource_snapshots_failed"
BATCH_LATENCY_SECONDS = "raysource_batch_latency_seconds"
CONSUMER_LAG = "raysource_consumer_lag"
PAUSED_PARTITIONS = "raysource_paused_partitions"
HELD_COMMANDS = "raysource_held_commands"

# Seconds between two recordings of a host's gauges. Counting live aggregates
# per type walks every live aggregate, so it is not done after every batch.
GAUGE_INTERVAL_S = 1.0
# Log the first recording failure and then one in this many.
_LOG_EVERY_FAILURES = 100

_HOST_TAGS = ("namespace", "host")
_HOST_TYPE_TAGS = ("namespace", "host", "aggregate_type")
_INGESTOR_TAGS = ("namespace", "ingestor")


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name, kind, meaning and tag keys.

    ``boundaries`` are the upper bounds of a histogram's buckets.
    """

    name: str
    kind: str
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            LIVE_AGGREGATES,
            GAUGE,
            "Aggregates live in a host's memory.",
            _HOST_TYPE_TAGS,
        ),
        MetricSpec(
            HIBERNATED_AGGREGATES,
            GAUGE,
            "Aggregates a host keeps in compact serialised form.",
            _HOST_TAGS,
        ),
        MetricSpec(
            HOST_RSS_BYTES,
            GAUGE,
            "Resident memory of a host's process, bytes.",
            _HOST_TAGS,
        ),
        MetricSpec(
            LOADS,
            COUNTER,
            "Aggregates loaded from a snapshot and events.",
            _HOST_TYPE_TAGS,
        ),
        MetricSpec(
            EVENTS_REPLAYED_PER_LOAD,
            HISTOGRAM,
            "Events read and applied to load one aggregate.",
            _HOST_TYPE_TAGS,
            (1, 10, 100, 1_000, 10_000, 100_000),
        ),
        MetricSpec(
            EVICTIONS,
            COUNTER,
            "Aggregates removed from memory, by reason: stop, idle, hibernate, "
            "count_limit, memory_budget, shard_moved, failed_batch, host_recycled.",
            ("namespace", "host", "reason"),
        ),
        MetricSpec(
            COMMANDS,
            COUNTER,
            "Commands executed and accepted (events appended, or none needed).",
            _HOST_TYPE_TAGS,
        ),
        MetricSpec(
            EVENTS, COUNTER, "Events appended to the event store.", _HOST_TYPE_TAGS
        ),
        MetricSpec(
            REJECTIONS,
            COUNTER,
            "Commands rejected by their aggregate, which append nothing.",
            _HOST_TYPE_TAGS,
        ),
        MetricSpec(
            DUPLICATES,
            COUNTER,
            "Commands whose id was already recorded, acknowledged without executing.",
            _HOST_TYPE_TAGS,
        ),
        MetricSpec(
            DEAD_LETTERS,
            COUNTER,
            "Messages that could not be decoded or validated, stored as dead letters.",
            _INGESTOR_TAGS,
        ),
        MetricSpec(SNAPSHOTS_WRITTEN, COUNTER, "Snapshots written.", _HOST_TAGS),
        MetricSpec(
            SNAPSHOTS_FAILED, COUNTER, "Snapshot writes that failed.", _HOST_TAGS
        ),
        MetricSpec(
            BATCH_LATENCY_SECONDS,
            HISTOGRAM,
            "Seconds a host spends executing one batch, appends included.",
            _HOST_TAGS,
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        ),
        MetricSpec(
            CONSUMER_LAG,
            GAUGE,
            "Records of a partition not yet read: high watermark minus position.",
            ("namespace", "ingestor", "topic", "partition"),
        ),
        MetricSpec(
            PAUSED_PARTITIONS,
            GAUGE,
            "Partitions an ingestor has paused for backpressure.",
            _INGESTOR_TAGS,
        ),
        MetricSpec(
            HELD_COMMANDS,
            GAUGE,
            "Commands an ingestor holds: decoded, queued or in flight.",
            _INGESTOR_TAGS,
        ),
    )
}

# Host counter names, as in AggregateHost.counters, and the metric each feeds.
_HOST_COUNTER_METRICS = {
    "commands": COMMANDS,
    "events": EVENTS,
    "rejected": REJECTIONS,
    "duplicates": DUPLICATES,
    "loads": LOADS,
}


class Metric(Protocol):
    """The recording calls of a Ray metric. Each kind uses one of them."""

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...

    def set(self, value: float, tags: dict[str, str] | None = None) -> None: ...

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None: ...


class MetricFactory(Protocol):
    """Create the metric of a spec. Tests pass a factory that records in memory."""

    def create(self, spec: MetricSpec) -> Metric: ...


class _NullMetric:
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        pass

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass


class NullMetricFactory:
    """Create metrics that record nothing."""

    def create(self, spec: MetricSpec) -> Metric:
        return _NullMetric()


# Ray's metrics are meant to be created once per process, so a second recorder
# in the same worker process reuses them.
_ray_metrics: dict[str, Any] = {}


class RayMetricFactory:
    """Create metrics with ``ray.util.metrics``, one per name per process."""

    def create(self, spec: MetricSpec) -> Metric:
        metric = _ray_metrics.get(spec.name)
        if metric is None:
            from ray.util import metrics

            if spec.kind == COUNTER:
                metric = metrics.Counter(spec.name, spec.description, spec.tag_keys)
            elif spec.kind == GAUGE:
                metric = metrics.Gauge(spec.name, spec.description, spec.tag_keys)
            else:
                metric = metrics.Histogram(
                    spec.name, spec.description, list(spec.boundaries), spec.tag_keys
                )
            _ray_metrics[spec.name] = metric
        return metric  # type: ignore[no-any-return]


def default_factory() -> MetricFactory:
    """Return Ray's factory inside a Ray actor, and one that records nothing elsewhere.

    Hosts, the controller and ingestors are actors. A driver, or a host built
    directly in a test, records nothing even when Ray is running.
    """
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        return RayMetricFactory()
    return NullMetricFactory()


_Method = TypeVar("_Method", bound=Callable[..., None])


def _never_raises(method: _Method) -> _Method:
    """Skip the call when recording is off, and count and log any error it raises."""

    @functools.wraps(method)
    def guarded(self: _Recorder, *args: Any, **kwargs: Any) -> None:
        if not self.enabled:
            return
        try:
            method(self, *args, **kwargs)
        except Exception:
            self.num_failures += 1
            if self.num_failures % _LOG_EVERY_FAILURES == 1:
                logger.exception(
                    "recording metrics failed call=%s failures=%d",
                    method.__name__,
                    self.num_failures,
                )

    return guarded  # type: ignore[return-value]


class _Recorder:
    """Hold the metrics of one process's component and turn totals into increments."""

    def __init__(self, tags: dict[str, str], factory: MetricFactory | None) -> None:
        self._factory = factory if factory is not None else default_factory()
        self.enabled = not isinstance(self._factory, NullMetricFactory)
        self.num_failures = 0
        self._tags = tags
        self._metrics: dict[str, Metric] = {}
        self._totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def _metric(self, name: str) -> Metric:
        metric = self._metrics.get(name)
        if metric is None:
            metric = self._metrics[name] = self._factory.create(METRICS[name])
        return metric

    def _with_tags(self, tags: Mapping[str, str]) -> dict[str, str]:
        return {**self._tags, **tags}

    def _add_total(self, name: str, total: float, **tags: str) -> None:
        """Increase counter ``name`` by the growth of ``total`` since the last call.

        A total below the last one means its source was reset, so nothing is
        recorded and later growth counts from the new total.
        """
        key = (name, tuple(sorted(tags.items())))
        last = self._totals.get(key, 0)
        self._totals[key] = total
        if total > last:
            self._metric(name).inc(total - last, tags=self._with_tags(tags))

    def _set(self, name: str, value: float, **tags: str) -> None:
        self._metric(name).set(value, tags=self._with_tags(tags))

    def _observe(self, name: str, value: float, **tags: str) -> None:
        self._metric(name).observe(value, tags=self._with_tags(tags))


class HostMetrics(_Recorder):
    """Record one AggregateHost's metrics, tagged with its host id.

    ``record_batch`` and ``record_load`` are cheap enough for every batch and
    every load. ``record_counts`` takes the host's running totals. Gauges
    cost a walk over the live aggregates, so the host records them only when
    ``gauges_due`` returns True, at most once per ``gauge_interval_s``.
    """

    def __init__(
        self,
        host_id: str,
        namespace: str,
        factory: MetricFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
        gauge_interval_s: float = GAUGE_INTERVAL_S,
    ) -> None:
        super().__init__({"namespace": namespace, "host": host_id}, factory)
        self._clock = clock
        self._gauge_interval_s = gauge_interval_s
        self._next_gauges_at = 0.0
        self._types_seen: set[str] = set()

    @_never_raises
    def record_batch(self, elapsed_s: float) -> None:
        """Record the execution time of one batch."""
        self._observe(BATCH_LATENCY_SECONDS, elapsed_s)

    @_never_raises
    def record_load(self, aggregate_type: str, events_replayed: int) -> None:
        """Record how many events one aggregate load replayed."""
        self._observe(
            EVENTS_REPLAYED_PER_LOAD, events_replayed, aggregate_type=aggregate_type
        )

    @_never_raises
    def record_counts(
        self,
        counters_by_type: Mapping[tuple[str, str], int],
        evictions: Mapping[str, int],
        snapshots_written: int,
        snapshots_failed: int,
    ) -> None:
        """Record the host's running totals.

        ``counters_by_type`` maps (counter name, aggregate type) to a total,
        with the names of ``AggregateHost.counters``. ``evictions`` maps an
        eviction reason to a total.
        """
        for (counter, aggregate_type), total in list(counters_by_type.items()):
            name = _HOST_COUNTER_METRICS.get(counter)
            if name is not None:
                self._add_total(name, total, aggregate_type=aggregate_type)
        for reason, total in list(evictions.items()):
            self._add_total(EVICTIONS, total, reason=reason)
        self._add_total(SNAPSHOTS_WRITTEN, snapshots_written)
        self._add_total(SNAPSHOTS_FAILED, snapshots_failed)

    def gauges_due(self) -> bool:
        """Return whether ``gauge_interval_s`` has passed since the last gauges."""
        return self.enabled and self._clock() >= self._next_gauges_at

    @_never_raises
    def record_gauges(
        self, live_by_type: Mapping[str, int], num_hibernated: int, rss_bytes: int
    ) -> None:
        """Record live aggregates per type, hibernated aggregates and resident memory.

        A type with no live aggregate left is set to 0, not left at its last value.
        """
        self._next_gauges_at = self._clock() + self._gauge_interval_s
        self._types_seen.update(live_by_type)
        for aggregate_type in sorted(self._types_seen):
            count = live_by_type.get(aggregate_type, 0)
            self._set(LIVE_AGGREGATES, count, aggregate_type=aggregate_type)
        self._set(HIBERNATED_AGGREGATES, num_hibernated)
        self._set(HOST_RSS_BYTES, rss_bytes)


class ControllerMetrics(_Recorder):
    """Record the controller's metrics: aggregates lost when a host is recycled."""

    def __init__(self, namespace: str, factory: MetricFactory | None = None) -> None:
        super().__init__({"namespace": namespace}, factory)

    @_never_raises
    def record_recycled(self, host_id: str, num_live_aggregates: int) -> None:
        """Count a recycled host's live aggregates as host_recycled evictions."""
        if num_live_aggregates > 0:
            tags = self._with_tags({"host": host_id, "reason": "host_recycled"})
            self._metric(EVICTIONS).inc(num_live_aggregates, tags=tags)


class IngestorMetrics(_Recorder):
    """Record one KafkaIngestor's metrics from its ``status()`` dict.

    Call ``record_status`` periodically. It turns the dead-letter total into
    increments and sets the lag of every partition (``"topic:partition"``
    keys). A partition no longer assigned to the ingestor is set to lag 0, so
    that summing lag over ingestors does not count it twice after a rebalance.
    """

    def __init__(
        self, ingestor_id: str, namespace: str, factory: MetricFactory | None = None
    ) -> None:
        super().__init__({"namespace": namespace, "ingestor": ingestor_id}, factory)
        self._partitions_seen: set[str] = set()

    @_never_raises
    def record_status(self, status: Mapping[str, Any]) -> None:
        """Record dead letters, lag per partition, paused partitions, held commands."""
        self._add_total(DEAD_LETTERS, int(status.get("dead_letters", 0)))
        lag = status.get("lag") or {}
        self._partitions_seen.update(lag)
        for name in sorted(self._partitions_seen):
            topic, _, partition = name.rpartition(":")
            value = lag.get(name, 0)
            if value is not None:
                self._set(CONSUMER_LAG, value, topic=topic, partition=partition)
        self._set(PAUSED_PARTITIONS, len(status.get("paused_partitions") or ()))
        self._set(HELD_COMMANDS, int(status.get("held_commands", 0)))


def describe_metrics(specs: Iterable[MetricSpec] = METRICS.values()) -> list[str]:
    """Return one Markdown table row per metric: exported name, kind, tags, meaning."""
    rows = []
    for spec in specs:
        exported = f"ray_{spec.name}" + ("_total" if spec.kind == COUNTER else "")
        tags = ", ".join(spec.tag_keys)
        rows.append(f"| `{exported}` | {spec.kind} | {tags} | {spec.description} |")
    return rows
