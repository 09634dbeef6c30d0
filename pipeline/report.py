"""Progress lines and the end-of-run summary printed by the command line."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from pipeline.cli import output

_MIB = 1024 * 1024


def progress_printer(expected: int | None) -> Callable[[dict[str, Any]], None]:
    """Return a callback that prints one progress line per sample.

    On a terminal the line is rewritten in place; otherwise one line is printed
    every ten seconds, so logs stay short.
    """
    is_tty = sys.stdout.isatty()
    last_printed = [0.0]
    started = time.time()

    def show(sample: dict[str, Any]) -> None:
        now = time.time()
        if not is_tty and now - last_printed[0] < 10:
            return
        last_printed[0] = now
        done = sample["durable_commands"]
        rate = sample["commands_per_s"]
        parts = [f"{done:,}"]
        if expected:
            left = max(expected - done, 0)
            eta = f"{left / rate:,.0f}s left" if rate > 0 else "-"
            parts = [f"{done:,}/{expected:,} ({100 * done / expected:.0f}%)", eta]
        parts += [
            f"{rate:,.0f} cmd/s",
            f"live {sample['live_aggregates']:,}",
            f"hosts {sample['hosts_rss_bytes'] / _MIB:,.0f} MiB",
            f"job {sample['job_rss_bytes'] / _MIB:,.0f} MiB",
            f"{now - started:,.0f}s",
        ]
        line = "  ".join(parts)
        if is_tty:
            output(f"\r{line}\033[K", end="")
        else:
            output(line)

    return show


def print_summary(summary: dict[str, Any], rows_read: int | None) -> None:
    """Print the run's accounting, memory and lifespan figures."""
    output("")
    output("summary")
    if rows_read is not None:
        check = "ok" if summary["accounted"] == rows_read else "MISMATCH"
        output(f"  rows read            {rows_read:>12,}")
    output(
        f"  commands appended    {summary['appended_commands']:>12,}  "
        f"({summary['events']:,} events)"
    )
    output(f"  commands rejected    {summary['rejected_commands']:>12,}")
    output(f"  dead letters         {summary['dead_letters']:>12,}")
    if summary.get("duplicates"):
        output(
            f"  duplicate ids        {summary['duplicates']:>12,}"
            "  (acknowledged, not run again)"
        )
    if rows_read is not None:
        output(
            (
                f"  sum                  {summary['accounted']:>12,}  "
                f"({check}: every row accounted for)"
            )
            if check == "ok"
            else (
                f"  sum                  {summary['accounted']:>12,}  "
                f"({check}: rows read {rows_read:,})"
            )
        )
    output(f"  distinct aggregates  {summary['distinct_aggregates']:>12,}")
    output(f"  peak live aggregates {summary['peak_live_aggregates']:>12,}")
    evictions = (
        ", ".join(f"{k} {v:,}" for k, v in sorted(summary["evictions"].items()))
        or "none"
    )
    output(f"  evictions            {evictions}")
    output(
        f"  snapshots written    {summary['snapshots_written']:>12,}  "
        f"(failed {summary['snapshots_failed']:,})"
    )
    output(
        f"  commands per second  {summary['commands_per_s']:>12,.0f}  "
        f"over {summary['elapsed_s']:,.1f}s"
    )
    output(
        f"  peak memory, job     {summary['peak_job_rss_bytes'] / _MIB:>12,.0f} MiB  "
        "(driver and Ray processes, broker apart)"
    )
    output(
        f"  peak memory, hosts   {summary['peak_hosts_rss_bytes'] / _MIB:>12,.0f} MiB"
    )
    if summary.get("broker_rss_bytes"):
        output(
            f"  broker memory        {summary['broker_rss_bytes'] / _MIB:>12,.0f} MiB  "
            "(keeps the whole topic in memory)"
        )
    if summary.get("samples_path"):
        output(f"  samples              {summary['samples_path']}")
