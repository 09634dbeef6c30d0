"""Figures of bench runs: summaries, ratios, targets and the printed report.

Functions over the figure dictionaries that runs return, and
``machine_facts``. Imports only the standard library and
``pipeline._bench_settings`` at module level, and psutil inside
``machine_facts``.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pipeline._bench_settings import SCALE_NAMES

# Targets that the report compares the figures with. They are goals, not
# assertions: a missed one is reported with its measured value.
TARGET_CEILING_FRACTION = 0.8
TARGET_SCALING_GROWTH = 1.5
TARGET_STOP_MEMORY_FACTOR = 10.0
TARGET_LOAD_SPEEDUP = 50.0

_MIB = 1024 * 1024


def streaming_figures(
    summary: Mapping[str, Any], samples: Sequence[Mapping[str, Any]], num_records: int
) -> dict[str, Any]:
    """Return the figures of one streaming run from its summary and samples."""
    idle, above = hosts_memory_above_idle(samples)
    return {
        "commands": num_records,
        "accounted": summary["accounted"],
        "drained": summary["drained"] and summary["accounted"] == num_records,
        "elapsed_s": summary["elapsed_s"],
        "commands_per_s": summary["commands_per_s"],
        "events": summary["events"],
        "rejected_commands": summary["rejected_commands"],
        "dead_letters": summary["dead_letters"],
        "peak_job_rss_bytes": summary["peak_job_rss_bytes"],
        "peak_hosts_rss_bytes": summary["peak_hosts_rss_bytes"],
        "hosts_idle_rss_bytes": idle,
        "hosts_rss_above_idle_bytes": above,
        "peak_live_aggregates": summary["peak_live_aggregates"],
        "final_live_aggregates": samples[-1]["live_aggregates"] if samples else 0,
        "distinct_aggregates": summary["distinct_aggregates"],
        "evictions": summary["evictions"],
        "snapshots_written": summary["snapshots_written"],
        "snapshots_failed": summary["snapshots_failed"],
        "num_samples": len(samples),
        "samples_path": summary["samples_path"],
    }


def hosts_memory_above_idle(samples: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    """Return the hosts' summed idle RSS and their peak summed RSS above it.

    A host's idle RSS is the first nonzero RSS the samples report for it (the
    controller reports 0 until it has polled the host once). A job's first
    samples come before its consumer group has joined, so before any command.
    The figure above idle is what the live aggregates and the garbage of
    executing batches cost, without the Python and Ray runtime of each host.
    """
    idle: dict[str, int] = {}
    peak_above = 0
    for sample in samples:
        above = 0
        for host_id, host in sample.get("hosts", {}).items():
            rss = int(host.get("rss_bytes", 0))
            if not rss:
                continue
            idle.setdefault(host_id, rss)
            above += max(rss - idle[host_id], 0)
        peak_above = max(peak_above, above)
    return sum(idle.values()), peak_above


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Return the median, min and max of ``values``, with the values themselves."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": list(values),
    }


def summarize_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Return the spread of each streaming figure over ``runs``, and the runs."""
    keys = (
        "commands_per_s",
        "elapsed_s",
        "peak_job_rss_bytes",
        "peak_hosts_rss_bytes",
        "hosts_idle_rss_bytes",
        "hosts_rss_above_idle_bytes",
        "broker_rss_bytes",
    )
    return {
        **{key: spread([run[key] for run in runs]) for key in keys},
        "runs": list(runs),
    }


def summarize_ceiling(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Return the spread of each ceiling figure over ``runs``, and the runs."""
    keys = ("commands_per_s", "elapsed_s", "peak_rss_bytes")
    return {
        **{key: spread([run[key] for run in runs]) for key in keys},
        "runs": list(runs),
    }


def pair_ratios(
    streaming: Sequence[Mapping[str, Any]], ceiling: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Return the spread of streaming/ceiling throughput over pairs of runs."""
    ratios = [
        s["commands_per_s"] / c["commands_per_s"]
        for s, c in zip(streaming, ceiling, strict=False)
        if c["commands_per_s"] > 0
    ]
    return spread(ratios) if ratios else {}


def scaling_growth(by_shops: Mapping[str, Any]) -> dict[str, Any]:
    """Return, per variant, each memory figure at the most shops over the fewest."""
    if len(by_shops) < 2:
        return {}
    counts = sorted(by_shops, key=int)
    smallest = by_shops[counts[0]]["variants"]
    largest = by_shops[counts[-1]]["variants"]
    keys = (
        "peak_hosts_rss_bytes",
        "hosts_rss_above_idle_bytes",
        "peak_job_rss_bytes",
        "peak_live_aggregates",
    )
    growth = {}
    for variant in sorted(smallest.keys() & largest.keys()):
        growth[variant] = {
            "from_shops": int(counts[0]),
            "to_shops": int(counts[-1]),
            **{
                key: ratio_or_none(largest[variant][key], smallest[variant][key])
                for key in keys
            },
        }
    return growth


def ratio_or_none(numerator: float, denominator: float) -> float | None:
    """Return ``numerator / denominator``, or None when the denominator is 0."""
    return numerator / denominator if denominator else None


def evaluate_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Compare the figures with the targets; a target without figures is left out."""
    targets = _throughput_targets(results) + _scaling_targets(results)
    variants = results.get("lifespans", {}).get("variants", {})
    if "infinity" in variants and "stop" in variants:
        for key in ("peak_hosts_rss_bytes", "hosts_rss_above_idle_bytes"):
            factor = ratio_or_none(variants["infinity"][key], variants["stop"][key])
            if factor is not None:
                targets.append(
                    {
                        "name": f"infinity / stop, {key}",
                        "scale": results["settings"]["scale"],
                        "target": f">= {TARGET_STOP_MEMORY_FACTOR:g} (at large scale)",
                        "measured": factor,
                        "met": factor >= TARGET_STOP_MEMORY_FACTOR,
                    }
                )
    load = results.get("load")
    if load and load.get("speedup") is not None:
        targets.append(
            {
                "name": "snapshot load speedup over full replay",
                "scale": f"{load['num_events']:,} events",
                "target": f">= {TARGET_LOAD_SPEEDUP:g}",
                "measured": load["speedup"],
                "met": load["speedup"] >= TARGET_LOAD_SPEEDUP,
            }
        )
    return targets


def _throughput_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    throughput = results.get("throughput", {})
    scales = [s for s in SCALE_NAMES if throughput.get(s, {}).get("ratio_to_ceiling")]
    if not scales:
        return []
    scale = "medium" if "medium" in scales else scales[-1]
    ratio = throughput[scale]["ratio_to_ceiling"]["median"]
    return [
        {
            "name": "streaming throughput / single-process ceiling",
            "scale": scale,
            "target": f">= {TARGET_CEILING_FRACTION:.2f} (at medium scale)",
            "measured": ratio,
            "met": ratio >= TARGET_CEILING_FRACTION,
        }
    ]


def _scaling_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    # INFINITY is expected to grow past the bound that the others must keep.
    targets = []
    growth = results.get("scaling", {}).get("growth", {})
    for variant, figures in sorted(growth.items()):
        for key in ("peak_hosts_rss_bytes", "hosts_rss_above_idle_bytes"):
            value = figures.get(key)
            if value is None:
                continue
            if variant == "infinity":
                target, met = (
                    f"> {TARGET_SCALING_GROWTH}",
                    value > TARGET_SCALING_GROWTH,
                )
            else:
                target, met = (
                    f"<= {TARGET_SCALING_GROWTH}",
                    value <= TARGET_SCALING_GROWTH,
                )
            shops = f"{figures['to_shops']:,} / {figures['from_shops']:,} shops"
            targets.append(
                {
                    "name": f"{variant}: {key} at {shops}",
                    "scale": "scaling",
                    "target": target,
                    "measured": value,
                    "met": met,
                }
            )
    return targets


def print_report(results: Mapping[str, Any], output: Callable[[str], None]) -> None:
    """Print the figures of ``results``, one line each."""
    output("\nsummary")
    machine = results.get("machine", {})
    output(
        f"  machine: {machine.get('cpus')} CPUs, "
        f"{machine.get('memory_bytes', 0) / 1024**3:,.1f} GiB; load average "
        f"{_loads(machine.get('load_average_start'))} at the start, "
        f"{_loads(results.get('load_average_end'))} at the end"
    )

    for scale, figures in results.get("throughput", {}).items():
        line = (
            f"  streaming {scale}: {_rates(figures['commands_per_s'])}; job peak "
            f"{format_mib(figures['peak_job_rss_bytes']['median'])}, hosts "
            f"{format_mib(figures['hosts_rss_above_idle_bytes']['median'])} above idle"
        )
        ratio = figures.get("ratio_to_ceiling")
        if ratio:
            line += (
                f"; {ratio['median']:.2f} of the ceiling "
                f"(min {ratio['min']:.2f}, max {ratio['max']:.2f})"
            )
        output(line)
    for scale, figures in results.get("ceiling", {}).items():
        output(
            f"  ceiling {scale}: {_rates(figures['commands_per_s'])}; "
            f"peak {format_mib(figures['peak_rss_bytes']['median'])}"
        )

    for name, run in results.get("lifespans", {}).get("variants", {}).items():
        output(f"  lifespan {name}: {_memory_line(run)}")
    for shops, entry in results.get("scaling", {}).get("shops", {}).items():
        for name, run in entry["variants"].items():
            output(f"  {int(shops):,} shops, {name}: {_memory_line(run)}")

    broker = results.get("broker", {})
    if broker.get("rss_bytes_at_end"):
        output(
            f"  broker (Tansu, keeps topics in memory): "
            f"{format_mib(broker['rss_bytes_at_end'])} at the end"
        )

    for target in results.get("targets", []):
        verdict = "met" if target["met"] else "MISSED"
        output(
            f"  target {target['name']} ({target['scale']}): "
            f"{target['measured']:.2f}, target {target['target']}: {verdict}"
        )
    if results.get("error"):
        output(f"  bench failed: {results['error']}")


def _memory_line(run: Mapping[str, Any]) -> str:
    return (
        f"{run['commands_per_s']:,.0f} commands/s, peak live "
        f"{run['peak_live_aggregates']:,}, "
        f"hosts {format_mib(run['peak_hosts_rss_bytes'])} "
        f"({format_mib(run['hosts_rss_above_idle_bytes'])} above idle), "
        f"job {format_mib(run['peak_job_rss_bytes'])}"
    )


def _rates(figures: Mapping[str, float]) -> str:
    return (
        f"{figures['median']:,.0f} commands/s "
        f"(min {figures['min']:,.0f}, max {figures['max']:,.0f})"
    )


def format_mib(num_bytes: float, digits: int = 0) -> str:
    """Format a byte count in MiB, such as ``1,024 MiB``."""
    return f"{num_bytes / _MIB:,.{digits}f} MiB"


def _loads(loads: Sequence[float] | None) -> str:
    return "/".join(f"{value:.1f}" for value in loads) if loads else "unknown"


def machine_facts() -> dict[str, Any]:
    """Return the CPU count, memory, load and versions that the figures depend on."""
    from importlib.metadata import PackageNotFoundError, version

    import psutil

    versions: dict[str, str | None] = {}
    for package in ("ray", "kafka-python", "crc32c", "sqlalchemy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "load_average_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }
