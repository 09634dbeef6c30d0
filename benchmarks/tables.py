"""Print the figures of a ``raysource bench`` results.json as Markdown tables.

    python benchmarks/tables.py benchmarks/results/results.json

BENCHMARKS.md quotes these tables.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/tables.py RESULTS_JSON", file=sys.stderr)
        return 2
    results = json.loads(Path(argv[0]).read_text())
    for section in (
        _machine(results),
        _throughput(results),
        _lifespans(results),
        _load(results),
        _scaling(results),
        _broker(results),
        _targets(results),
    ):
        if section:
            print(section)
            print()
    return 0


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / MIB:,.0f}"


def _spread(figures: Mapping[str, float], scale: float = 1.0, digits: int = 0) -> str:
    low, high = figures["min"] * scale, figures["max"] * scale
    return (
        f"{figures['median'] * scale:,.{digits}f} "
        f"({low:,.{digits}f} to {high:,.{digits}f})"
    )


def _machine(results: Mapping[str, Any]) -> str:
    machine = results["machine"]
    start = "/".join(f"{v:.1f}" for v in machine["load_average_start"])
    end = "/".join(f"{v:.1f}" for v in results.get("load_average_end", []))
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    return (
        f"Command: `{results['command']}`\n\n"
        f"Machine: {machine['cpus']} CPUs, "
        f"{machine['memory_bytes'] / 1024**3:.1f} GiB, "
        f"Python {machine['python']}, {versions}. Load average (1/5/15 min) "
        f"{start} at the start, {end} at the end."
    )


def _throughput(results: Mapping[str, Any]) -> str:
    throughput = results.get("throughput", {})
    ceiling = results.get("ceiling", {})
    rows = []
    for scale in ("small", "medium", "large"):
        stream = throughput.get(scale)
        loop = ceiling.get(scale)
        if not stream and not loop:
            continue
        ratio = stream.get("ratio_to_ceiling") if stream else None
        facts = stream or loop
        rows.append(
            [
                scale,
                f"{facts['num_shops']:,} / {facts['num_commands']:,}",
                _spread(stream["commands_per_s"]) if stream else "",
                _spread(loop["commands_per_s"]) if loop else "",
                _spread(ratio, digits=2) if ratio else "",
                _mib(stream["peak_job_rss_bytes"]["median"]) if stream else "",
                _mib(stream["hosts_idle_rss_bytes"]["median"]) if stream else "",
                _mib(stream["hosts_rss_above_idle_bytes"]["median"]) if stream else "",
                _mib(loop["peak_rss_bytes"]["median"]) if loop else "",
            ]
        )
    if not rows:
        return ""
    header = [
        "scale",
        "shops / commands",
        "streaming commands/s, median (min to max)",
        "ceiling commands/s",
        "streaming / ceiling, pairs",
        "job peak RSS MiB",
        "hosts idle RSS MiB",
        "hosts peak above idle MiB",
        "ceiling peak RSS MiB",
    ]
    return _table(header, rows)


def _run_rows(variants: Mapping[str, Any], prefix: str = "") -> list[list[Any]]:
    rows = []
    for name, run in variants.items():
        evictions = ", ".join(f"{k} {v:,}" for k, v in sorted(run["evictions"].items()))
        rows.append(
            [
                f"{prefix}{name}",
                f"{run['commands_per_s']:,.0f}",
                f"{run['peak_live_aggregates']:,}",
                _mib(run["peak_hosts_rss_bytes"]),
                _mib(run["hosts_rss_above_idle_bytes"]),
                _mib(run["peak_job_rss_bytes"]),
                evictions or "none",
            ]
        )
    return rows


_RUN_HEADER = [
    "variant",
    "commands/s",
    "peak live aggregates",
    "hosts peak RSS MiB",
    "hosts above idle MiB",
    "job peak RSS MiB",
    "evictions",
]


def _lifespans(results: Mapping[str, Any]) -> str:
    lifespans = results.get("lifespans")
    if not lifespans:
        return ""
    intro = (
        f"Lifespans: {lifespans['num_shops']:,} shops, {lifespans['num_commands']:,} "
        f"commands, notes of {lifespans['note_bytes']:,} bytes, one run per variant."
    )
    return intro + "\n\n" + _table(_RUN_HEADER, _run_rows(lifespans["variants"]))


def _load(results: Mapping[str, Any]) -> str:
    load = results.get("load")
    if not load:
        return ""
    rows = []
    for mode in ("full_replay", "from_snapshot"):
        figures = load[mode]
        rows.append(
            [
                mode.replace("_", " "),
                f"{figures['events_replayed']:,}",
                _spread(figures["seconds"], scale=1000, digits=1),
                f"{figures['peak_traced_bytes'] / MIB:,.2f}",
            ]
        )
    intro = (
        f"Load: one Shop of {load['num_events']:,} events on SQLite, snapshot at "
        f"version {load['snapshot_at_version']:,} (snapshot_every = "
        f"{load['snapshot_every']}). Snapshot load is {load['speedup']:,.0f}x faster."
    )
    header = ["mode", "events replayed", "ms, median (min to max)", "peak traced MiB"]
    return intro + "\n\n" + _table(header, rows)


def _scaling(results: Mapping[str, Any]) -> str:
    scaling = results.get("scaling")
    if not scaling:
        return ""
    rows = []
    for shops, entry in scaling["shops"].items():
        rows += _run_rows(entry["variants"], prefix=f"{int(shops):,} shops, ")
    intro = (
        f"Scaling: {scaling['num_commands']:,} commands per run, notes of "
        f"{scaling['note_bytes']:,} bytes."
    )
    parts = [intro, _table(_RUN_HEADER, rows)]
    growth = scaling.get("growth", {})
    if growth:
        growth_rows = [
            [
                variant,
                _ratio(figures["peak_hosts_rss_bytes"]),
                _ratio(figures["hosts_rss_above_idle_bytes"]),
                _ratio(figures["peak_live_aggregates"]),
            ]
            for variant, figures in growth.items()
        ]
        header = ["variant", "hosts peak RSS", "hosts above idle", "peak live"]
        parts.append("Growth from the fewest to the most shops:")
        parts.append(_table(header, growth_rows))
    return "\n\n".join(parts)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _broker(results: Mapping[str, Any]) -> str:
    broker = results.get("broker")
    if not broker:
        return ""
    rows = [
        [topic, _mib(rss)]
        for topic, rss in broker.get("rss_bytes_after_produce", {}).items()
    ]
    if broker.get("rss_bytes_at_end"):
        rows.append(["at the end", _mib(broker["rss_bytes_at_end"])])
    return _table(["broker RSS after producing", "MiB"], rows)


def _targets(results: Mapping[str, Any]) -> str:
    rows = [
        [
            t["name"],
            t["scale"],
            t["target"],
            f"{t['measured']:.2f}",
            "met" if t["met"] else "missed",
        ]
        for t in results.get("targets", [])
    ]
    return (
        _table(["figure", "measured at", "target", "measured", "verdict"], rows)
        if rows
        else ""
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
