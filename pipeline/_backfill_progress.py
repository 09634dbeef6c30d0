"""Progress of a backfill: the running counts, progress lines and the summary.

``Tally`` counts the rows of a backfill by outcome, ``ProgressReporter``
passes those counts to a progress callback about twice a second, and
``summarize`` turns them into the summary that ``run_backfill`` returns. The
``format_*`` functions turn progress and the summary into the lines that
``raysource backfill`` and ``raysource rebuild-snapshots`` print.
May import the rest of ``pipeline``, and imports ``pipeline.cli`` only inside
``progress_printer``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline._backfill_workers import BatchOutcome

__all__ = [
    "ProgressCallback",
    "ProgressReporter",
    "Tally",
    "format_progress",
    "format_rebuild_progress",
    "format_summary",
    "progress_printer",
    "summarize",
]

_PROGRESS_INTERVAL_S = 0.5

ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass
class Tally:
    """Rows of a backfill so far, counted by outcome."""

    rows_read: int = 0
    appended_commands: int = 0
    rejected_commands: int = 0
    dead_letters: int = 0
    events: int = 0
    recorded_earlier: int = 0
    resent_commands: int = 0

    @property
    def rows_done(self) -> int:
        return self.appended_commands + self.rejected_commands + self.dead_letters

    def add(self, outcome: BatchOutcome) -> None:
        self.appended_commands += outcome.appended_commands
        self.rejected_commands += outcome.rejected_commands
        self.events += outcome.events
        self.recorded_earlier += outcome.recorded_earlier


def summarize(
    tally: Tally, elapsed_s: float, num_workers: int, worker_figures: dict[str, Any]
) -> dict[str, Any]:
    """Return the summary of a finished backfill: counts, rates and worker figures."""
    accounted = tally.rows_done
    return {
        "rows_read": tally.rows_read,
        "appended_commands": tally.appended_commands,
        "rejected_commands": tally.rejected_commands,
        "dead_letters": tally.dead_letters,
        "accounted": accounted,
        "is_accounted": accounted == tally.rows_read,
        "events": tally.events,
        "recorded_earlier": tally.recorded_earlier,
        "resent_commands": tally.resent_commands,
        "elapsed_s": elapsed_s,
        "rows_per_s": tally.rows_read / elapsed_s if elapsed_s > 0 else 0.0,
        "workers": num_workers,
        **worker_figures,
    }


class ProgressReporter:
    def __init__(
        self, callback: ProgressCallback | None, rows_total: int | None, started: float
    ) -> None:
        self._callback = callback
        self._rows_total = rows_total
        self._started = started
        self._last = 0.0

    def maybe_report(self, tally: Tally) -> None:
        # Called once per row: the clock is read only every 1,024 rows.
        if self._callback is None or tally.rows_read & 1023:
            return
        now = time.monotonic()
        if now - self._last >= _PROGRESS_INTERVAL_S:
            self._last = now
            self.report(tally)

    def report(self, tally: Tally) -> None:
        if self._callback is None:
            return
        elapsed = time.monotonic() - self._started
        self._callback(
            {
                "rows_read": tally.rows_read,
                "rows_done": tally.rows_done,
                "rows_total": self._rows_total,
                "elapsed_s": elapsed,
                "rows_per_s": tally.rows_done / elapsed if elapsed > 0 else 0.0,
            }
        )


def progress_printer(
    format_line: Callable[[dict[str, Any]], str] | None = None,
) -> ProgressCallback:
    """Return a callback that prints progress lines made by ``format_line``.

    The default line is ``format_progress``. On a terminal the line is
    rewritten in place; otherwise one line is printed every ten seconds.
    """
    from pipeline.cli import output

    format_line = format_line or format_progress
    is_tty = sys.stdout.isatty()
    last_printed = [0.0]

    def show(state: dict[str, Any]) -> None:
        now = time.monotonic()
        if not is_tty and now - last_printed[0] < 10:
            return
        last_printed[0] = now
        line = format_line(state)
        output(f"\r{line}\033[K" if is_tty else line, end="" if is_tty else "\n")

    return show


def format_rebuild_progress(state: dict[str, Any]) -> str:
    """Return one progress line of a snapshot rebuild: aggregates done, rate, time."""
    return (
        f"{state['aggregates_done']:,} aggregates  "
        f"{state['aggregates_per_s']:,.0f}/s  {state['elapsed_s']:,.0f}s"
    )


def format_progress(state: dict[str, Any]) -> str:
    """Return one progress line: rows done (of the total), rate, time left, elapsed."""
    done, total, rate = state["rows_done"], state["rows_total"], state["rows_per_s"]
    parts = [f"{done:,} rows"]
    if total:
        left = max(total - done, 0)
        parts = [
            f"{done:,}/{total:,} rows ({100 * done / total:.0f}%)",
            f"{left / rate:,.0f}s left" if rate > 0 else "-",
        ]
    parts += [f"{rate:,.0f} rows/s", f"{state['elapsed_s']:,.0f}s"]
    return "  ".join(parts)


def format_summary(summary: dict[str, Any]) -> list[str]:
    """Return the lines of a backfill's summary: accounting, then speed and workers."""
    rows = summary["rows_read"]
    accounted = summary["accounted"]
    check = (
        "ok: every row accounted for"
        if summary["is_accounted"]
        else f"MISMATCH: {rows - accounted:,} rows unaccounted for"
    )
    lines = [
        "",
        f"backfill of {summary['source']}"
        + (" (stopped early)" if summary.get("is_stopped") else ""),
        f"  rows read            {rows:>12,}",
        f"  commands appended    {summary['appended_commands']:>12,}  "
        f"({summary['events']:,} events appended by this run)",
        f"  commands rejected    {summary['rejected_commands']:>12,}  "
        "(reasons in the commands table)",
        f"  dead letters         {summary['dead_letters']:>12,}  "
        "(reasons in the dead_letters table)",
        f"  sum                  {accounted:>12,}  ({check})",
    ]
    if summary["recorded_earlier"]:
        lines.append(
            f"  recorded earlier     {summary['recorded_earlier']:>12,}  "
            "(command ids already in the store, counted by their recorded outcome)"
        )
    if summary.get("resent_commands"):
        lines.append(f"  commands resent      {summary['resent_commands']:>12,}")
    lines += [
        f"  rows per second      {summary['rows_per_s']:>12,.0f}  "
        f"over {summary['elapsed_s']:,.1f}s",
        f"  workers              {summary['workers']:>12,}  "
        f"(restarted {summary.get('worker_restarts', 0):,})",
        f"  snapshots written    {summary.get('snapshots_written', 0):>12,}  "
        f"(failed {summary.get('snapshots_failed', 0):,})",
    ]
    return lines
