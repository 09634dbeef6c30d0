"""``raysource top``: a live terminal view of a running job, redrawn in place.

Each refresh takes one report with ``pipeline.status.collect_status`` and draws
it with curses. A host's row shows live aggregates, resident memory, commands
per second (from the change of its counters since the last refresh), batches in
flight, evictions in total and by reason, and why the controller recycled or
replaced it. Below come the largest live aggregates, one row per partition
(lag, paused or running) and the controller's recent decisions. ``q`` or
Ctrl-C quits.
``--once`` prints one frame without curses, for scripts and logs.

Ray is imported only when the subcommand runs (by ``collect_status``), so
registering the subcommand keeps ``raysource --help`` fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pipeline.status import (
    PARTITION_HEADER,
    aggregate_header,
    aggregate_line,
    decision_text,
    evictions_text,
    format_bytes,
    host_note,
    host_order,
    partition_line,
)

__all__ = ["register", "render_frame", "run_live"]

_MIN_INTERVAL_S = 0.2
# Keys are read between refreshes with this timeout, so q takes effect within it.
_KEY_POLL_MS = 100
_NUM_DECISIONS = 5
_LIVE_MAX_PARTITIONS = 20

Report = dict[str, Any]


def register(commands: Any) -> None:
    """Add the ``top`` subcommand to the command line."""
    top = commands.add_parser(
        "top",
        help="show a running job live: hosts, memory, partitions, largest aggregates",
        description="Redraw a running job's hosts, partitions and largest aggregates "
        "every --interval seconds until q or Ctrl-C.",
    )
    top.add_argument(
        "--config",
        metavar="FILE",
        help="the job's configuration (for its Ray namespace)",
    )
    top.add_argument(
        "--address",
        default="auto",
        help="Ray address of the running job (default: %(default)s, the local cluster)",
    )
    top.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between refreshes (default: %(default)s)",
    )
    top.add_argument(
        "--aggregates",
        type=int,
        default=10,
        metavar="N",
        help="largest live aggregates to list (default: %(default)s)",
    )
    top.add_argument(
        "--once",
        action="store_true",
        help="print one frame and exit, without taking over the terminal",
    )
    top.set_defaults(handler=_top)


def _top(args: argparse.Namespace) -> int:
    from pipeline.cli import load_job_config, output
    from pipeline.status import collect_status

    if args.interval < _MIN_INTERVAL_S:
        msg = (
            f"--interval {args.interval} is invalid: expected at least "
            f"{_MIN_INTERVAL_S} seconds"
        )
        raise SystemExit(msg)
    config = load_job_config(args, {"ray": {"address": args.address}})

    def collect() -> Report:
        return collect_status(config, args.aggregates)

    try:
        report = collect()
    except (RuntimeError, ConnectionError) as error:
        print(f"raysource top: {error}", file=sys.stderr)
        return 1
    if args.once:
        output("\n".join(render_frame(report)))
        return 0
    return run_live(collect, args.interval, first=report)


def render_frame(
    report: Report,
    previous: Report | None = None,
    *,
    max_partitions: int | None = None,
    error: str | None = None,
) -> list[str]:
    """Return the lines of one frame for ``report``.

    With ``previous`` (the report of the last refresh) each host shows its
    commands per second, and without it the rate is ``-``. ``max_partitions``
    bounds the partition rows, listing paused and most lagging ones first.
    ``error`` is shown under the title when the last refresh failed.
    """
    lines = _title(report, previous, error)
    lines += _host_rows(report, previous)
    lines += _aggregate_rows(report)
    lines += _partition_rows(report, max_partitions)
    lines += _decision_rows(report)
    return lines


def _title(report: Report, previous: Report | None, error: str | None) -> list[str]:
    totals = report.get("totals", {})
    rates = _command_rates(report, previous)
    known = [rate for rate in rates.values() if rate is not None]
    total_rate = f"{sum(known):,.0f}" if known else "-"
    clock = datetime.fromtimestamp(report.get("time", time.time())).strftime("%H:%M:%S")
    lines = [
        f"raysource top  namespace {report.get('job', {}).get('namespace', '?')}  "
        f"assignment v{report.get('assignment_version', '?')}  {clock}  (q quits)",
        f"commands/s {total_rate}  live {totals.get('live_aggregates', 0):,}  "
        f"hibernated {totals.get('hibernated_aggregates', 0):,}  hosts rss "
        f"{format_bytes(totals.get('rss_bytes'))}  lag {totals.get('lag', 0):,}  "
        f"held {totals.get('held_commands', 0):,}  "
        f"dead letters {totals.get('dead_letters', 0):,}",
    ]
    if error:
        lines.append(f"last refresh failed, showing the one before: {error}")
    return lines


def _host_rows(report: Report, previous: Report | None) -> list[str]:
    hosts = report.get("hosts", {})
    rates = _command_rates(report, previous)
    decisions = report.get("host_decisions", [])
    now = report.get("time", time.time())
    lines = [
        "",
        f"HOSTS ({len(hosts)})",
        f"{'HOST':<10} {'LIVE':>9} {'HIBERNATED':>10} {'RSS':>10} {'BUDGET':>10} "
        f"{'CMD/S':>8} {'IN FLIGHT':>9} {'EVICTED':>9}  NOTE",
    ]
    for host_id in sorted(hosts, key=host_order):
        host = hosts[host_id]
        evictions = host.get("evictions", {})
        rate = rates.get(host_id)
        lines.append(
            f"{host_id:<10} {host.get('live_aggregates', 0):>9,} "
            f"{host.get('hibernated_aggregates', 0):>10,} "
            f"{format_bytes(host.get('rss_bytes')):>10} "
            f"{format_bytes(host.get('memory_budget_bytes')):>10} "
            f"{'-' if rate is None else f'{rate:,.0f}':>8} "
            f"{host.get('in_flight_batches', 0):>9} {sum(evictions.values()):>9,}  "
            f"{host_note(host_id, host, decisions, now)}"
        )
        lines.append(f"{'':<10} evictions {evictions_text(evictions)}")
    recycled = report.get("evictions", {}).get("host_recycled", 0)
    if recycled:
        lines.append(f"aggregates lost with recycled hosts: {recycled:,}")
    return lines


def _aggregate_rows(report: Report) -> list[str]:
    rows = report.get("top_aggregates", [])
    lines = ["", "LARGEST LIVE AGGREGATES (estimated size)", aggregate_header()]
    lines += [aggregate_line(row) for row in rows] or ["  none live"]
    return lines


def _partition_rows(report: Report, max_partitions: int | None) -> list[str]:
    rows = report.get("partitions", [])
    ingestors = report.get("ingestors", [])
    lines = ["", f"PARTITIONS ({len(rows)}, {len(ingestors)} ingestors)"]
    if not rows:
        lines.append("  none assigned" if ingestors else "  no ingestor found")
        return lines
    lines.append(PARTITION_HEADER)
    visible = rows
    if max_partitions is not None and len(rows) > max_partitions:
        visible = sorted(
            rows, key=lambda row: (not row.get("paused"), -(row.get("lag") or 0))
        )
        visible = visible[:max_partitions]
    lines += [partition_line(row) for row in visible]
    if len(visible) < len(rows):
        lines.append(
            f"  ... {len(rows) - len(visible)} more partitions, "
            "none paused or lagging more"
        )
    return lines


def _decision_rows(report: Report) -> list[str]:
    decisions = report.get("host_decisions", [])[-_NUM_DECISIONS:]
    if not decisions:
        return []
    return [
        "",
        "RECENT HOST DECISIONS",
        *(f"  {decision_text(d)}" for d in reversed(decisions)),
    ]


def _command_rates(report: Report, previous: Report | None) -> dict[str, float | None]:
    """Return commands per second of each host since ``previous``, None where unknown.

    A host counts executed commands: accepted, rejected and duplicates. A host
    absent from ``previous`` (just started) or whose counters went down has no rate.
    """
    rates: dict[str, float | None] = {
        host_id: None for host_id in report.get("hosts", {})
    }
    if previous is None:
        return rates
    elapsed = report.get("time", 0.0) - previous.get("time", 0.0)
    if elapsed <= 0:
        return rates
    for host_id, host in report.get("hosts", {}).items():
        before = previous.get("hosts", {}).get(host_id)
        if before is None or host.get("stale") or before.get("stale"):
            continue
        delta = _executed(host) - _executed(before)
        if delta >= 0:
            rates[host_id] = delta / elapsed
    return rates


def _executed(host: dict[str, Any]) -> int:
    counters = host.get("counters", {})
    return int(
        sum(counters.get(name, 0) for name in ("commands", "rejected", "duplicates"))
    )


def run_live(
    collect: Callable[[], Report], interval_s: float, first: Report | None = None
) -> int:
    """Redraw a frame every ``interval_s`` until q or Ctrl-C; return the exit code 0.

    A refresh that fails keeps the last frame and shows the error above it.
    Log records are held back while the screen is in use, because a line
    written to the terminal would break the frame.
    """
    import curses

    state: dict[str, Any] = {
        "report": first or collect(),
        "previous": None,
        "error": None,
    }

    def loop(screen: Any) -> None:
        _hide_cursor(curses)
        screen.timeout(_KEY_POLL_MS)
        _draw(screen, state)
        next_refresh = time.monotonic() + interval_s
        while True:
            key = screen.getch()
            if key in (ord("q"), ord("Q")):
                return
            if time.monotonic() >= next_refresh:
                _refresh(collect, state)
                next_refresh = time.monotonic() + interval_s
                _draw(screen, state)
            elif key == curses.KEY_RESIZE:
                _draw(screen, state)

    logging.disable(logging.CRITICAL)
    try:
        curses.wrapper(loop)
    except KeyboardInterrupt:
        pass
    finally:
        logging.disable(logging.NOTSET)
    return 0


def _refresh(collect: Callable[[], Report], state: dict[str, Any]) -> None:
    try:
        report = collect()
    except Exception as error:
        # Shown on screen in place of a log line; the next refresh tries again.
        state["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        return
    state["previous"], state["report"], state["error"] = state["report"], report, None


def _draw(screen: Any, state: dict[str, Any]) -> None:
    import curses

    height, width = screen.getmaxyx()
    lines = render_frame(
        state["report"],
        state["previous"],
        max_partitions=_LIVE_MAX_PARTITIONS,
        error=state["error"],
    )
    screen.erase()
    for row, line in enumerate(lines[:height]):
        try:
            screen.addnstr(row, 0, line, max(0, width - 1))
        except curses.error:
            # Writing into the bottom-right cell raises once the text is drawn.
            pass
    screen.refresh()


def _hide_cursor(curses: Any) -> None:
    try:
        curses.curs_set(0)
    except curses.error:
        pass  # Some terminals cannot hide the cursor.
