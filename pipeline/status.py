"""``raysource status``: a one-shot view of a running job."""

from __future__ import annotations

import time
from typing import Any

import ray

from pipeline.config import JobConfig
from pipeline.monitor import evictions_by_reason
from pipeline.runtime import find_controller, init_ray

_MIB = 1024 * 1024


def collect_status(config: JobConfig) -> dict[str, Any]:
    """Gather the controller's, hosts' and ingestors' status from a running job.

    Raises RuntimeError naming the namespace when no job runs there.
    """
    init_ray(config.ray)
    try:
        controller = find_controller(config.ray.namespace)
    except ValueError as error:
        msg = (
            f"no raysource job is running in Ray namespace {config.ray.namespace!r} "
            f"at address {config.ray.address!r}; start one with 'raysource run'"
        )
        raise RuntimeError(msg) from error
    status = ray.get(controller.status.remote(), timeout=30)
    ingestors = []
    for number in range(1, 1 + max(config.kafka.num_ingestors, 16)):
        try:
            actor = ray.get_actor(f"raysource-ingestor-{number}", namespace=config.ray.namespace)
        except ValueError:
            continue
        try:
            ingestors.append(ray.get(actor.status.remote(), timeout=10))
        except Exception as error:
            ingestors.append({"ingestor_id": f"ingestor-{number}", "error": str(error)})
    return {
        "time": time.time(),
        "assignment_version": status["assignment_version"],
        "hosts": status["hosts"],
        "evictions": evictions_by_reason(status),
        "host_decisions": status["history"][-10:],
        "ingestors": ingestors,
    }


def format_status(report: dict[str, Any]) -> str:
    """Render a status report as text for a terminal."""
    lines = [f"assignment version {report['assignment_version']}", "", "hosts"]
    for host_id, host in sorted(report["hosts"].items()):
        counters = host.get("counters", {})
        lines.append(
            f"  {host_id:<10} live {host.get('live_aggregates', 0):>9,}  "
            f"hibernated {host.get('hibernated_aggregates', 0):>9,}  "
            f"rss {host.get('rss_bytes', 0) / _MIB:>7,.0f} MiB  "
            f"shards {host.get('shards', 0):>4}  busy {100 * host.get('busy_fraction', 0):>3.0f}%  "
            f"commands {counters.get('commands', 0):>10,}"
        )
    evictions = ", ".join(f"{k} {v:,}" for k, v in sorted(report["evictions"].items())) or "none"
    lines += ["", f"evictions  {evictions}", "", "ingestors"]
    for ingestor in report["ingestors"]:
        lag = ingestor.get("lag", {})
        total_lag = sum(lag.values()) if isinstance(lag, dict) else lag
        paused = ingestor.get("paused_partitions", [])
        lines.append(
            f"  {ingestor.get('ingestor_id', '?'):<12} lag {total_lag:>10,}  "
            f"paused {len(paused) if isinstance(paused, list) else paused}  "
            f"held {ingestor.get('held_commands', 0):>7,}"
        )
    if not report["ingestors"]:
        lines.append("  none found")
    return "\n".join(lines)
