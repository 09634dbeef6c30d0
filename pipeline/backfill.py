"""Backfills: commands from a file or a Kafka offset range, run as a batch.

``raysource backfill`` reads JSON lines, CSV or Parquet in chunks, or a range
of a topic (see pipeline.backfill_sources). It validates each row into a
command and sends the commands to Ray actors that each own a fixed set of
shards. Each actor, a ``BackfillWorker``, executes its batches in an
in-process ``AggregateHost``, the same code that serves the streaming job. So
a backfill of the same commands in the same order appends the same events per
stream.
Each shard has one owner and receives its commands in row order, so the
commands of one aggregate run in row order.

Every row ends as exactly one of: an appended command (with its events), a
rejected command (the aggregate's reason is in the commands table) or a dead
letter (the validation reason is in the dead-letter table). A backfill that is
stopped or killed can be run again. Command ids come from the rows (or from
the record's topic, partition and offset), so the commands already recorded
are duplicates and are not executed again. Dead letters are stored once per
source row.

``raysource rebuild-snapshots`` writes a fresh snapshot, at the configured
``snapshot_version``, of every aggregate of one type.

This module contains the entry points and the command line, and re-exports the
public names of its helper modules: ``pipeline._backfill_workers`` (the
worker actor and the pool that runs them), ``pipeline._backfill_driver``
(routing, batches in flight and resends), ``pipeline._backfill_progress``
(counts, progress lines and the summary) and ``pipeline._snapshot_rebuild``.
It and its helpers import Ray, pandas and the host only inside functions, so
that ``raysource --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from pipeline._backfill_driver import Driver
from pipeline._backfill_progress import (
    ProgressCallback,
    ProgressReporter,
    format_progress,
    format_rebuild_progress,
    format_summary,
    progress_printer,
    summarize,
)
from pipeline._backfill_workers import (
    BackfillError,
    BackfillWorker,
    BatchOutcome,
    start_pool,
)
from pipeline._snapshot_rebuild import rebuild_snapshots
from pipeline.backfill_sources import (
    DEFAULT_IDLE_TIMEOUT_S,
    FileSource,
    RowSource,
    TopicRange,
    TopicSource,
    parse_timestamp,
)
from pipeline.config import AggregateConfig, JobConfig
from pipeline.protocol import (
    APPENDED,
    DUPLICATE,
    REJECTED,
    BatchItem,
    BatchRequest,
)

if TYPE_CHECKING:
    from pipeline.sources import SourceMapping

__all__ = [
    "BackfillError",
    "BackfillWorker",
    "BatchOutcome",
    "TopicRange",
    "backfill_config",
    "format_progress",
    "format_summary",
    "rebuild_snapshots",
    "register",
    "run_backfill",
    "run_plain_loop",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 50_000
DEFAULT_BATCH_COMMANDS = 5_000
DEFAULT_MAX_BATCHES_IN_FLIGHT = 2


# -- running a backfill ---------------------------------------------------------


def run_backfill(
    config: JobConfig,
    source: str | os.PathLike[str] | TopicRange | None = None,
    mapping: str | SourceMapping = "shop",
    limit: int | None = None,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    batch_commands: int = DEFAULT_BATCH_COMMANDS,
    max_batches_in_flight: int = DEFAULT_MAX_BATCHES_IN_FLIGHT,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Execute every row of ``source`` as a command and return the accounting.

    ``source`` is a JSON-lines, CSV or Parquet file, a TopicRange, or None for
    the mapping's own data set. ``mapping`` turns file rows into flat command
    dicts, as a built-in name or 'module:function' (see pipeline.sources).
    Topic records are decoded as JSON, or by ``kafka.decoder`` when it is set.
    ``workers`` is the number of worker actors (default: the CPUs Ray
    reports); 0 runs everything in this process, without Ray. Lifespans are
    replaced by INFINITY, so each worker keeps its aggregates until the
    host's live-aggregate or memory bound evicts them. An aggregate type that
    the mapping names and the configuration lacks is added with default
    settings.

    ``progress`` is called about twice a second with rows_read, rows_done,
    rows_total (None when unknown), elapsed_s and rows_per_s. When ``stop`` is
    set, reading stops and the commands already sent are finished.

    Returns the summary: rows_read, appended_commands, rejected_commands,
    dead_letters, accounted (their sum), is_accounted (the sum equals
    rows_read), events, recorded_earlier, elapsed_s and rows_per_s (from the
    first row read, after the workers started), startup_s, workers and worker
    figures. Raises BackfillError when a batch keeps failing.
    """
    from pipeline.registry import AggregateRegistry
    from pipeline.sources import resolve_mapping

    if limit is not None and limit < 0:
        msg = f"limit must be at least 0 or None, got {limit}"
        raise ValueError(msg)
    for name, value in (
        ("batch_commands", batch_commands),
        ("max_batches_in_flight", max_batches_in_flight),
        ("chunk_rows", chunk_rows),
    ):
        if value < 1:
            msg = f"{name} must be at least 1, got {value}"
            raise ValueError(msg)

    resolved = None if isinstance(source, TopicRange) else resolve_mapping(mapping)
    config = backfill_config(config, resolved)
    registry = AggregateRegistry.from_config(config.aggregates)
    if isinstance(source, TopicRange):
        reader: RowSource = TopicSource(source, config, limit)
    else:
        assert resolved is not None
        reader = FileSource(source, resolved, registry, limit, chunk_rows)

    starting = time.monotonic()
    pool = start_pool(config, workers)
    started = time.monotonic()
    logger.info("backfill started source=%s workers=%d", reader.label, pool.num_workers)
    driver = Driver(pool, config, batch_commands, max_batches_in_flight)
    reporter = ProgressReporter(progress, reader.rows_total, started)
    try:
        for entry in reader:
            driver.add(entry)
            reporter.maybe_report(driver.tally)
            if stop is not None and stop.is_set():
                logger.info(
                    "backfill stopping on request rows_read=%d", driver.tally.rows_read
                )
                break
        driver.finish()
        worker_figures = pool.finish()
    finally:
        pool.close()
    reporter.report(driver.tally)

    summary = summarize(
        driver.tally, time.monotonic() - started, pool.num_workers, worker_figures
    )
    summary.update(
        source=reader.label,
        rows_total=reader.rows_total,
        startup_s=started - starting,
        is_stopped=bool(stop is not None and stop.is_set()),
    )
    logger.info(
        "backfill finished source=%s rows=%d appended=%d rejected=%d dead_letters=%d "
        "events=%d elapsed_s=%.1f",
        reader.label,
        summary["rows_read"],
        summary["appended_commands"],
        summary["rejected_commands"],
        summary["dead_letters"],
        summary["events"],
        summary["elapsed_s"],
    )
    return summary


def backfill_config(config: JobConfig, mapping: SourceMapping | None) -> JobConfig:
    """Return ``config`` with INFINITY lifespans and the mapping's aggregate type added.

    A backfill keeps aggregates live because every command of an aggregate
    arrives within one run. The host's live-aggregate and memory bounds still
    evict the least recently used ones.
    """
    aggregates = dict(config.aggregates)
    aggregate = mapping.aggregate if mapping is not None else None
    if aggregate is not None and aggregate.aggregate_type not in aggregates:
        class_path = f"{aggregate.__module__}:{aggregate.__qualname__}"
        aggregates[aggregate.aggregate_type] = AggregateConfig(class_path=class_path)
        logger.info(
            "aggregate type added with default settings aggregate=%s class=%s",
            aggregate.aggregate_type,
            class_path,
        )
    kept_live = {
        name: dataclasses.replace(
            settings,
            after_event="infinity",
            after_command="infinity",
            after_error="infinity",
            lifespan_class="",
        )
        for name, settings in aggregates.items()
    }
    return config.replace(aggregates=kept_live)


# -- plain loop, for comparison -------------------------------------------------


def run_plain_loop(
    config: JobConfig,
    source: str | os.PathLike[str] | None,
    mapping: str | SourceMapping = "shop",
    limit: int | None = None,
    batch_commands: int = DEFAULT_BATCH_COMMANDS,
) -> dict[str, Any]:
    """Run a file through one AggregateHost in this process with no driver or Ray.

    A baseline for the backfill's throughput: read, validate, execute in
    batches, record dead letters. Returns rows_read, appended_commands,
    rejected_commands, dead_letters, elapsed_s and rows_per_s.
    """
    from pipeline.aggregate_host import AggregateHost
    from pipeline.registry import AggregateRegistry
    from pipeline.sources import resolve_mapping
    from store.event_store import EventStore

    resolved = resolve_mapping(mapping)
    config = backfill_config(config, resolved)
    registry = AggregateRegistry.from_config(config.aggregates)
    reader = FileSource(source, resolved, registry, limit, DEFAULT_CHUNK_ROWS)
    host = AggregateHost(
        "plain", config, range(config.hosts.num_shards), start_idle_thread=False
    )
    events = EventStore(config.store.database_url)
    statuses: Counter[str] = Counter()
    started = time.monotonic()
    items: list[BatchItem] = []
    dead_letters = []
    num_rows = 0
    for entry in reader:
        num_rows += 1
        if isinstance(entry, BatchItem):
            items.append(entry)
        else:
            dead_letters.append(entry)
        if len(items) >= batch_commands:
            statuses.update(
                r.status
                for r in host.execute_batch(BatchRequest("plain", 0, items)).results
            )
            items = []
    if items:
        statuses.update(
            r.status
            for r in host.execute_batch(BatchRequest("plain", 0, items)).results
        )
    events.record_dead_letters(dead_letters)
    elapsed = time.monotonic() - started
    host.shutdown()
    events.close()
    return {
        "rows_read": num_rows,
        "appended_commands": statuses[APPENDED],
        "rejected_commands": statuses[REJECTED],
        "duplicates": statuses[DUPLICATE],
        "dead_letters": len(dead_letters),
        "elapsed_s": elapsed,
        "rows_per_s": num_rows / elapsed if elapsed > 0 else 0.0,
    }


# -- command line ---------------------------------------------------------------


def register(commands: Any) -> None:
    """Add the ``backfill`` and ``rebuild-snapshots`` subcommands to the CLI."""
    backfill = commands.add_parser(
        "backfill",
        help="run commands from a file or a Kafka offset range through the aggregates",
        description="Run every row of a JSON-lines, CSV or Parquet file, or every "
        "record "
        "of a Kafka topic range, as a command, over Ray workers split by aggregate id. "
        "Running it again after an interruption finishes the work: commands already "
        "recorded are skipped.",
    )
    inputs = backfill.add_mutually_exclusive_group(required=True)
    inputs.add_argument(
        "--input",
        metavar="FILE",
        help="JSON-lines (.jsonl, .json, .ndjson), CSV or Parquet file",
    )
    inputs.add_argument(
        "--topic", metavar="TOPIC", help="Kafka topic to read a range of"
    )
    backfill.add_argument(
        "--mapping",
        metavar="NAME",
        help="row-to-command mapping for --input: flights, retail, shop, "
        "or 'module:function' (default: shop, rows that already are commands)",
    )
    backfill.add_argument("--config", metavar="FILE", help="TOML configuration file")
    backfill.add_argument(
        "--limit", type=int, metavar="N", help="read only the first N rows or records"
    )
    backfill.add_argument(
        "--chunk-rows",
        type=int,
        default=DEFAULT_CHUNK_ROWS,
        metavar="N",
        help="rows read from CSV or Parquet at a time (default: %(default)s)",
    )
    backfill.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker actors (default: the CPUs Ray reports; 0 runs in this "
        "process without Ray)",
    )
    backfill.add_argument(
        "--batch-commands",
        type=int,
        default=DEFAULT_BATCH_COMMANDS,
        metavar="N",
        help="commands per batch sent to a worker (default: %(default)s)",
    )
    backfill.add_argument(
        "--max-batches-in-flight",
        type=int,
        default=DEFAULT_MAX_BATCHES_IN_FLIGHT,
        metavar="N",
        help="batches sent to a worker and not yet finished before reading "
        "waits (default: %(default)s)",
    )
    kafka = backfill.add_argument_group("Kafka range (with --topic)")
    kafka.add_argument(
        "--bootstrap-servers",
        metavar="HOST:PORT",
        help="Kafka bootstrap servers (default: kafka.bootstrap_servers)",
    )
    kafka.add_argument(
        "--partitions", metavar="LIST", help="comma-separated partitions (default: all)"
    )
    kafka.add_argument(
        "--from-offset", type=int, metavar="N", help="first offset read, per partition"
    )
    kafka.add_argument(
        "--to-offset",
        type=int,
        metavar="M",
        help="first offset not read, per partition",
    )
    kafka.add_argument(
        "--from-timestamp",
        metavar="ISO",
        help="start each partition at its first record stamped at or after this "
        "time (ISO 8601; UTC without an offset)",
    )
    kafka.add_argument(
        "--to-timestamp",
        metavar="ISO",
        help="stop each partition at its first record stamped at or after this time",
    )
    kafka.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT_S,
        metavar="SECONDS",
        help="a partition with an open end is done after this long without "
        "records (default: %(default)s)",
    )
    backfill.set_defaults(handler=_backfill_command)

    rebuild = commands.add_parser(
        "rebuild-snapshots",
        help="write fresh snapshots of every aggregate of a type at its "
        "snapshot_version",
    )
    rebuild.add_argument(
        "--aggregate", required=True, metavar="TYPE", help="aggregate type, e.g. Shop"
    )
    rebuild.add_argument("--config", metavar="FILE", help="TOML configuration file")
    rebuild.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="Ray tasks at once (default: the CPUs Ray reports; 0 runs in this "
        "process)",
    )
    rebuild.set_defaults(handler=_rebuild_command)


def _backfill_command(args: argparse.Namespace) -> int:
    from kafka.errors import KafkaError

    from pipeline.cli import load_job_config, output, stop_on_signals
    from pipeline.logs import configure_logging

    config = load_job_config(args)
    configure_logging("driver", config.log_level)
    try:
        source = _source_from_args(args, config)
    except ValueError as error:
        output(f"raysource backfill: {error}")
        return 2
    stop = stop_on_signals()
    try:
        summary = run_backfill(
            config,
            source,
            args.mapping or "shop",
            args.limit,
            args.workers,
            progress_printer(),
            chunk_rows=args.chunk_rows,
            batch_commands=args.batch_commands,
            max_batches_in_flight=args.max_batches_in_flight,
            stop=stop,
        )
    except (BackfillError, FileNotFoundError, ValueError, KafkaError) as error:
        output(f"\nraysource backfill: {error}")
        return 1
    for line in format_summary(summary):
        output(line)
    if summary["is_stopped"]:
        return 130
    return 0 if summary["is_accounted"] else 1


def _source_from_args(args: argparse.Namespace, config: JobConfig) -> str | TopicRange:
    kafka_options = (
        "bootstrap_servers",
        "partitions",
        "from_offset",
        "to_offset",
        "from_timestamp",
        "to_timestamp",
    )
    if args.input is not None:
        kafka_flags = [
            f"--{name.replace('_', '-')}"
            for name in kafka_options
            if getattr(args, name) is not None
        ]
        if kafka_flags:
            msg = f"{', '.join(kafka_flags)} apply to --topic only, not --input"
            raise ValueError(msg)
        return str(args.input)
    if args.mapping is not None:
        msg = (
            "--mapping applies to --input only: topic records are decoded as JSON "
            "or by kafka.decoder"
        )
        raise ValueError(msg)
    partitions = None
    if args.partitions:
        try:
            partitions = tuple(int(p) for p in args.partitions.split(","))
        except ValueError as error:
            msg = (
                f"--partitions {args.partitions!r} is invalid: expected numbers "
                "such as 0,1,2"
            )
            raise ValueError(msg) from error
    return TopicRange(
        topic=args.topic,
        bootstrap_servers=args.bootstrap_servers or config.kafka.bootstrap_servers,
        partitions=partitions,
        from_offset=args.from_offset,
        to_offset=args.to_offset,
        from_timestamp=parse_timestamp(args.from_timestamp)
        if args.from_timestamp
        else None,
        to_timestamp=parse_timestamp(args.to_timestamp) if args.to_timestamp else None,
        idle_timeout_s=args.idle_timeout,
    )


def _rebuild_command(args: argparse.Namespace) -> int:
    from pipeline.cli import load_job_config, output
    from pipeline.logs import configure_logging

    config = load_job_config(args)
    configure_logging("driver", config.log_level)
    summary = rebuild_snapshots(
        config, args.aggregate, args.workers, progress_printer(format_rebuild_progress)
    )
    output("")
    output(
        f"snapshots of {summary['aggregate_type']} at snapshot_version "
        f"{summary['snapshot_version']}: {summary['aggregates']:,} aggregates, "
        f"{summary['written']:,} written, "
        f"{summary['already_current']:,} already current, "
        f"{summary['failed']:,} failed; {summary['events_replayed']:,} events replayed "
        f"in {summary['elapsed_s']:,.1f}s"
    )
    return 0 if summary["failed"] == 0 else 1
