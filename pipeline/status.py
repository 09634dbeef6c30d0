"""``raysource status``: a one-shot view of a running job, as text or JSON.

``collect_status`` gathers one report from the controller, every host and every
ingestor of a job. ``format_status`` renders it for a terminal, and ``raysource
top`` redraws it live. Database, snapshot and Kafka URLs in a report have
their passwords masked, and storage options (which hold keys) are left out.
Ray is imported inside the functions that reach the cluster, so the formatting
helpers load fast.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pipeline.config import JobConfig

__all__ = [
    "aggregate_header",
    "aggregate_line",
    "collect_status",
    "decision_text",
    "describe_job",
    "evictions_text",
    "format_bytes",
    "format_status",
    "host_note",
    "host_order",
    "partition_line",
    "PARTITION_HEADER",
    "redact_url",
]

INGESTOR_PREFIX = "raysource-ingestor-"
_CALL_TIMEOUT_S = 10.0
_NUM_DECISIONS = 10
_MASK = "***"

# user:password@ in a URL or a Kafka bootstrap entry. A password may not
# contain '@', '/' or ',' unencoded, so the match stops at them.
_USERINFO_PASSWORD = re.compile(r"(?P<user>[^:/@,\s]*):(?P<password>[^@/,\s]+)@")
# Query parameters that carry a secret, as in postgresql://host/db?password=...
_SECRET_PARAMETER = re.compile(
    r"(?P<name>[?&](?:password|passwd|pwd|secret|token|sasl_plain_password)=)[^&#\s]*",
    re.IGNORECASE,
)

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``.

    Handles SQLAlchemy and fsspec URLs (``scheme://user:password@host/...``),
    comma-separated Kafka bootstrap lists whose entries may carry
    ``user:password@``, and secret query parameters such as ``?password=``.
    """
    masked = _USERINFO_PASSWORD.sub(lambda m: f"{m['user']}:{_MASK}@", url)
    return _SECRET_PARAMETER.sub(lambda m: f"{m['name']}{_MASK}", masked)


def describe_job(config: JobConfig) -> dict[str, Any]:
    """Return the settings a reader of a status report needs, with secrets masked."""
    hosts = config.hosts
    return {
        "namespace": config.ray.namespace,
        "database_url": redact_url(config.store.database_url),
        "snapshot_url": redact_url(config.store.snapshot_url),
        "kafka": {
            "bootstrap_servers": redact_url(config.kafka.bootstrap_servers),
            "topics": list(config.kafka.topics),
            "group_id": config.kafka.group_id,
            "num_ingestors": config.kafka.num_ingestors,
        },
        "hosts": {
            "min_hosts": hosts.min_hosts,
            "max_hosts": hosts.max_hosts,
            "max_live_aggregates": hosts.max_live_aggregates,
            "memory_budget_bytes": hosts.memory_budget_bytes,
            "recycle_after_s": hosts.recycle_after_s,
        },
        "aggregate_types": sorted(config.aggregates),
    }


def collect_status(config: JobConfig, num_top_aggregates: int = 5) -> dict[str, Any]:
    """Gather one report from the controller, hosts and ingestors of a running job.

    Each host is asked for its status directly, and a host that does not
    respond within 10 s is shown with the controller's last copy and
    ``"stale": true``. ``num_top_aggregates`` sets how many of the largest live
    aggregates (over all hosts) the report lists. Counter totals cover the
    hosts running now, because a host that was replaced took its counts with it.

    Raises RuntimeError naming the namespace when no job runs there.

    NOTE: with ``ray.address = "auto"`` Ray joins the cluster it recorded last
    under /tmp/ray. When that cluster has stopped, ``ray.init`` keeps retrying
    its GCS until Ray's own timeout instead of failing at once; pass the
    running job's address to avoid the wait.
    """
    import ray

    from pipeline.runtime import find_controller, init_ray

    init_ray(config.ray)
    namespace = config.ray.namespace
    try:
        controller = find_controller(namespace)
    except ValueError as error:
        msg = (
            f"no raysource job is running in Ray namespace {namespace!r} "
            f"at address {redact_url(config.ray.address)!r}; "
            "start one with 'raysource run'"
        )
        raise RuntimeError(msg) from error
    controller_status, job_config, handles = ray.get(
        [
            controller.status.remote(),
            controller.get_config.remote(),
            controller.host_handles.remote(),
        ],
        timeout=30,
    )
    hosts = _host_statuses(handles, controller_status["hosts"])
    ingestors = _ingestor_statuses(namespace)
    _add_in_flight(hosts, ingestors)
    decisions = controller_status["history"]
    return {
        "time": time.time(),
        "job": describe_job(job_config),
        "assignment_version": controller_status["assignment_version"],
        "num_shards": controller_status["num_shards"],
        "totals": _totals(hosts, ingestors),
        "hosts": hosts,
        "evictions": _evictions(hosts, controller_status.get("host_evictions", {})),
        "host_decisions": decisions[-_NUM_DECISIONS:],
        "ingestors": ingestors,
        "partitions": _partitions(ingestors),
        "top_aggregates": _top_aggregates(handles, num_top_aggregates),
    }


def _host_statuses(
    handles: dict[str, Any], cached: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    import ray

    refs = {host_id: handle.status.remote() for host_id, handle in handles.items()}
    hosts = {}
    for host_id in sorted(set(refs) | set(cached)):
        last = cached.get(host_id, {})
        placement = {
            "shards": last.get("shards", 0),
            "started_at": last.get("started_at"),
        }
        try:
            fresh = ray.get(refs[host_id], timeout=_CALL_TIMEOUT_S)
        except Exception as error:
            hosts[host_id] = {**last, "stale": True, "error": _error_text(error)}
            continue
        hosts[host_id] = {**fresh, **placement}
    return hosts


def _ingestor_statuses(namespace: str) -> list[dict[str, Any]]:
    import ray
    from ray.util import list_named_actors

    names = sorted(
        entry["name"]
        for entry in list_named_actors(all_namespaces=True)
        if entry["namespace"] == namespace and entry["name"].startswith(INGESTOR_PREFIX)
    )
    refs = {}
    for name in names:
        try:
            refs[name] = ray.get_actor(name, namespace=namespace).status.remote()
        except ValueError:
            continue  # It stopped between the listing and the lookup.
    ingestors = []
    for name, ref in refs.items():
        try:
            ingestors.append(ray.get(ref, timeout=_CALL_TIMEOUT_S))
        except Exception as error:
            ingestor_id = name.removeprefix("raysource-")
            ingestors.append({"ingestor_id": ingestor_id, "error": _error_text(error)})
    return ingestors


def _top_aggregates(handles: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    import ray

    if limit <= 0:
        return []
    refs = {
        host_id: handle.top_aggregates.remote(limit)
        for host_id, handle in handles.items()
    }
    rows = []
    for host_id, ref in refs.items():
        try:
            rows += [
                {**row, "host_id": host_id}
                for row in ray.get(ref, timeout=_CALL_TIMEOUT_S)
            ]
        except Exception:
            continue  # The host's row shows its status error.
    rows.sort(key=lambda row: row["estimated_bytes"], reverse=True)
    return rows[:limit]


def _add_in_flight(
    hosts: dict[str, dict[str, Any]], ingestors: list[dict[str, Any]]
) -> None:
    in_flight: Counter[str] = Counter()
    for ingestor in ingestors:
        in_flight.update(ingestor.get("in_flight_batches") or {})
    for host_id, host in hosts.items():
        host["in_flight_batches"] = in_flight.get(host_id, 0)


def _totals(
    hosts: dict[str, dict[str, Any]], ingestors: list[dict[str, Any]]
) -> dict[str, int]:
    counters: Counter[str] = Counter()
    for host in hosts.values():
        counters.update(host.get("counters", {}))
    totals = {
        name: counters.get(name, 0)
        for name in ("commands", "events", "rejected", "duplicates", "loads")
    }
    for key in (
        "live_aggregates",
        "hibernated_aggregates",
        "rss_bytes",
        "snapshots_written",
        "snapshots_failed",
    ):
        totals[key] = sum(host.get(key, 0) for host in hosts.values())
    for key in ("records_read", "dead_letters", "held_commands"):
        totals[key] = sum(int(ingestor.get(key, 0)) for ingestor in ingestors)
    totals["lag"] = sum(_known_lags(ingestors))
    return totals


def _evictions(
    hosts: dict[str, dict[str, Any]], host_evictions: dict[str, int]
) -> dict[str, int]:
    total: Counter[str] = Counter()
    for host in hosts.values():
        total.update(host.get("evictions", {}))
    total.update(host_evictions)
    return dict(sorted(total.items()))


def _partitions(ingestors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for ingestor in ingestors:
        paused = set(ingestor.get("paused_partitions") or ())
        committed = ingestor.get("committed_offsets") or {}
        assigned = set(ingestor.get("assigned_partitions") or ()) | set(
            ingestor.get("lag") or {}
        )
        for name in sorted(assigned):
            topic, _, partition = name.rpartition(":")
            rows.append(
                {
                    "partition": name,
                    "topic": topic,
                    "partition_number": int(partition)
                    if partition.isdigit()
                    else partition,
                    "ingestor_id": ingestor.get("ingestor_id"),
                    "lag": (ingestor.get("lag") or {}).get(name),
                    "paused": name in paused,
                    "committed_offset": committed.get(name),
                }
            )
    rows.sort(key=lambda row: (row["topic"], str(row["partition_number"]).zfill(9)))
    return rows


def _known_lags(ingestors: Iterable[dict[str, Any]]) -> list[int]:
    lags = []
    for ingestor in ingestors:
        lag = ingestor.get("lag") or {}
        lags += [value for value in lag.values() if isinstance(value, int)]
    return lags


def _error_text(error: Exception) -> str:
    # Ray errors repeat the remote traceback, and the first line names the failure.
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}"[:200]


# -- formatting ------------------------------------------------------------------


def format_bytes(num_bytes: float | None) -> str:
    """Return a size with a binary unit: ``512 B``, ``1.5 KiB``, ``4.0 GiB``."""
    if num_bytes is None:
        return "-"
    value = float(num_bytes)
    index = 0
    while abs(value) >= 1024 and index < len(_BYTE_UNITS) - 1:
        value /= 1024
        index += 1
    if index == 0:
        return f"{value:.0f} B"
    return f"{value:.1f} {_BYTE_UNITS[index]}"


def host_order(host_id: str) -> tuple[int, str]:
    """Return a sort key that puts host-10 after host-9."""
    _, _, number = host_id.rpartition("-")
    return (int(number) if number.isdigit() else 0, host_id)


def host_note(
    host_id: str, host: dict[str, Any], decisions: list[dict[str, Any]], now: float
) -> str:
    """Return why a host needs attention: no status, over budget, or a replacement.

    ``decisions`` are the controller's recent decisions. The newest one that
    started ``host_id`` in place of another host gives the reason.
    """
    notes = []
    if host.get("error"):
        notes.append(f"status unavailable ({host['error']})")
    since = host.get("over_budget_since")
    if since is not None:
        notes.append(
            f"over memory budget for {max(0.0, now - since):.0f}s "
            f"(rss {format_bytes(host.get('rss_bytes'))} > "
            f"{format_bytes(host.get('memory_budget_bytes'))})"
        )
    for decision in reversed(decisions):
        if decision.get("host") == host_id and decision.get("replaced"):
            notes.append(_replacement_text(decision))
            break
    return "; ".join(notes)


def _replacement_text(decision: dict[str, Any]) -> str:
    reason = str(decision.get("decision", "")).removeprefix("host ")
    text = f"replaced {decision['replaced']}: {reason}"
    if reason == "recycled":
        text += (
            f", rss {format_bytes(decision.get('rss_bytes'))} stayed over budget "
            f"{format_bytes(decision.get('memory_budget_bytes'))}"
        )
    return text


def decision_text(decision: dict[str, Any]) -> str:
    """Return one line for a controller decision: time, decision, hosts, memory."""
    clock = datetime.fromtimestamp(decision.get("time", 0)).strftime("%H:%M:%S")
    text = (
        f"{clock}  v{decision.get('version', '?')}  "
        f"{decision.get('decision')}  {decision.get('host')}"
    )
    if decision.get("replaced"):
        text += f" in place of {decision['replaced']}"
    if decision.get("rss_bytes") is not None:
        text += (
            f"  (rss {format_bytes(decision.get('rss_bytes'))}, budget "
            f"{format_bytes(decision.get('memory_budget_bytes'))}, "
            f"{decision.get('live_aggregates') or 0:,} live aggregates evicted)"
        )
    return text


def evictions_text(evictions: dict[str, int]) -> str:
    """Return ``reason count`` pairs, largest first, or ``none``."""
    pairs = sorted(evictions.items(), key=lambda item: (-item[1], item[0]))
    return (
        "  ".join(f"{reason} {count:,}" for reason, count in pairs if count) or "none"
    )


def format_status(report: dict[str, Any]) -> str:
    """Render a status report as text for a terminal."""
    now = report.get("time", time.time())
    lines = _job_lines(report, now)
    lines += ["", "hosts", _HOST_HEADER]
    decisions = report.get("host_decisions", [])
    for host_id in sorted(report["hosts"], key=host_order):
        host = report["hosts"][host_id]
        lines.append(_host_line(host_id, host, decisions, now))
        evictions = evictions_text(host.get("evictions", {}))
        lines.append(f"  {'':<10} evictions {evictions}")
    lines += ["", "ingestors"]
    lines += [_ingestor_line(ingestor) for ingestor in report.get("ingestors", [])]
    if not report.get("ingestors"):
        lines.append("  none found")
    if report.get("partitions"):
        lines += ["", "partitions", PARTITION_HEADER]
        lines += [partition_line(row) for row in report["partitions"]]
    if report.get("top_aggregates"):
        lines += ["", "largest live aggregates (estimated size)", aggregate_header()]
        lines += [aggregate_line(row) for row in report["top_aggregates"]]
    if decisions:
        lines += ["", "recent host decisions"]
        lines += [f"  {decision_text(decision)}" for decision in decisions]
    return "\n".join(lines)


_HOST_HEADER = (
    f"  {'HOST':<10} {'LIVE':>9} {'HIBERNATED':>10} {'RSS':>10} {'BUDGET':>10} "
    f"{'SHARDS':>6} {'BUSY':>5} {'COMMANDS':>10} {'IN FLIGHT':>9}  NOTE"
)
PARTITION_HEADER = (
    f"  {'PARTITION':<32} {'INGESTOR':<12} {'LAG':>10} {'COMMITTED':>12}  STATE"
)


def _job_lines(report: dict[str, Any], now: float) -> list[str]:
    job = report.get("job", {})
    kafka = job.get("kafka", {})
    totals = report.get("totals", {})
    stamp = datetime.fromtimestamp(now).strftime("%Y-%m-%d %H:%M:%S")
    counts = _pairs(totals, ("commands", "events", "rejected", "duplicates"))
    return [
        f"raysource status  namespace {job.get('namespace', '?')}  "
        f"assignment version {report['assignment_version']}  {stamp}",
        f"store      {job.get('database_url', '?')}  "
        f"snapshots {job.get('snapshot_url', '?')}",
        f"kafka      {kafka.get('bootstrap_servers', '?')}  "
        f"topics {','.join(kafka.get('topics', []))}  "
        f"group {kafka.get('group_id', '?')}",
        f"totals     {counts}  dead letters {totals.get('dead_letters', 0):,}",
        f"           {_pairs(totals, ('loads', 'lag'))}  snapshots written "
        f"{totals.get('snapshots_written', 0):,} "
        f"(failed {totals.get('snapshots_failed', 0):,})",
        f"evictions  {evictions_text(report.get('evictions', {}))}",
    ]


def _pairs(values: dict[str, Any], names: Iterable[str]) -> str:
    return "  ".join(f"{name} {values.get(name, 0):,}" for name in names)


def _host_line(
    host_id: str, host: dict[str, Any], decisions: list[dict[str, Any]], now: float
) -> str:
    busy = 100 * host.get("busy_fraction", 0)
    commands = host.get("counters", {}).get("commands", 0)
    return (
        f"  {host_id:<10} {host.get('live_aggregates', 0):>9,} "
        f"{host.get('hibernated_aggregates', 0):>10,} "
        f"{format_bytes(host.get('rss_bytes')):>10} "
        f"{format_bytes(host.get('memory_budget_bytes')):>10} "
        f"{host.get('shards', 0):>6} {busy:>4.0f}% {commands:>10,} "
        f"{host.get('in_flight_batches', 0):>9}  "
        f"{host_note(host_id, host, decisions, now)}"
    )


def _ingestor_line(ingestor: dict[str, Any]) -> str:
    name = ingestor.get("ingestor_id", "?")
    if ingestor.get("error"):
        return f"  {name:<12} status unavailable ({ingestor['error']})"
    in_flight = sum((ingestor.get("in_flight_batches") or {}).values())
    return (
        f"  {name:<12} read {ingestor.get('records_read', 0):>10,}  "
        f"held {ingestor.get('held_commands', 0):>7,}  "
        f"in flight {in_flight:>3} batches  "
        f"paused {len(ingestor.get('paused_partitions') or ()):>3}  "
        f"dead letters {ingestor.get('dead_letters', 0):,}"
    )


def partition_line(row: dict[str, Any]) -> str:
    """Return one partition row: name, ingestor, lag, committed offset, state."""
    lag = "-" if row.get("lag") is None else f"{row['lag']:,}"
    committed = (
        "-" if row.get("committed_offset") is None else f"{row['committed_offset']:,}"
    )
    state = "paused" if row.get("paused") else "running"
    return (
        f"  {row['partition']:<32} {row.get('ingestor_id') or '?':<12} {lag:>10} "
        f"{committed:>12}  {state}"
    )


def aggregate_header() -> str:
    """Return the column titles of ``aggregate_line``."""
    return f"  {'SIZE':>10}  {'TYPE':<12} {'ID':<24} {'VERSION':>8} {'IDLE':>8}  HOST"


def aggregate_line(row: dict[str, Any]) -> str:
    """Return one live aggregate row: estimated size, type, id, version, idle, host."""
    return (
        f"  {format_bytes(row.get('estimated_bytes')):>10}  "
        f"{row.get('aggregate_type', '?'):<12} "
        f"{row.get('aggregate_id', '?'):<24} {row.get('version', 0):>8,} "
        f"{row.get('idle_s', 0.0):>7.1f}s  {row.get('host_id', '?')}"
    )
