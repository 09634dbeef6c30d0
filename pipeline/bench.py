"""``raysource bench``: the reference workload's figures, all from one invocation.

Parts, chosen with ``--suite``, each on the shop-orders workload of
``aggregates.workload``:

- ``throughput``: the streaming job end to end at each scale up to ``--scale``,
  timed from the first record read to the last offset committed. It reports
  the median, min and max of ``--runs`` runs.
- ``ceiling``: the same commands through one process without Ray: a Kafka
  consumer, aggregates in a dict, one event-store append per poll, and a
  commit once the append is durable. It runs in a child process, so its
  memory is measured alone. With ``throughput``, the two alternate run by
  run, and each ratio pairs a streaming run with the ceiling run after it.
- ``lifespans``: the job at ``--scale`` with the Shop lifespan set to
  INFINITY, an idle timeout and STOP, each with and without a live-aggregate
  limit per host.
- ``load``: one aggregate with a long stream, loaded by full replay and from
  a snapshot, timed, and measured with tracemalloc.
- ``scaling``: peak memory of the same three lifespans as the number of shops
  grows, with the same number of commands.

Commands are produced to an embedded Tansu broker before any timing starts.
The broker keeps every topic in memory, so its resident memory is reported on
its own. Each run gets a fresh SQLite store, snapshot folder and consumer
group under ``--out``. The store is deleted after the run and the samples are
kept. Results go to ``OUT/results.json``. Ray, Kafka and matplotlib are
imported inside functions, so ``raysource --help`` stays fast.

This module contains the command line: the options, their validation and
the subcommand's handler. The parts live in ``pipeline._bench_runner`` (the
``Bench`` runner), ``pipeline._bench_ceiling``, ``pipeline._bench_loading``,
``pipeline._bench_figures`` (summaries, targets and the report) and
``pipeline._bench_settings``.
"""

from __future__ import annotations

import argparse
import logging
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline._bench_figures import print_report
from pipeline._bench_runner import Bench
from pipeline._bench_settings import (
    SCALE_NAMES,
    SUITES,
    VARIANTS,
    BenchSettings,
    job_config,
)
from pipeline.cli import non_negative_int, positive_int


def register(commands: Any) -> None:
    """Add the ``bench`` subcommand to the ``raysource`` command line."""
    bench = commands.add_parser(
        "bench",
        help="measure throughput, the single-process ceiling, lifespans, loading "
        "and memory scaling on the reference shop-orders workload",
        description="Run the reference benchmarks in one invocation, so that every "
        "ratio compares runs on the same machine at the same time. Starts a local "
        "broker and Ray, and writes OUT/results.json with plots beside it.",
    )
    bench.set_defaults(handler=run_bench_command)

    chosen = bench.add_argument_group("what to run")
    chosen.add_argument(
        "--suite",
        default="all",
        metavar="PARTS",
        help="comma-separated parts to run: throughput, ceiling, lifespans, load, "
        "scaling, or all (default: %(default)s)",
    )
    chosen.add_argument(
        "--scale",
        choices=SCALE_NAMES,
        default="medium",
        help="largest workload scale: throughput and the ceiling run at every scale "
        "up to it, lifespans at it (default: %(default)s)",
    )
    chosen.add_argument(
        "--runs",
        type=positive_int,
        default=3,
        metavar="N",
        help="runs of each throughput, ceiling and load measurement (default: "
        "%(default)s); each lifespan and scaling variant runs once",
    )
    chosen.add_argument(
        "--out",
        default="bench-results",
        metavar="DIR",
        help="folder for results.json, plots, samples and run files "
        "(default: %(default)s)",
    )
    chosen.add_argument(
        "--run-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="fail a streaming or ceiling run that takes longer, in seconds "
        "(default: %(default)s)",
    )
    chosen.add_argument(
        "--keep-stores",
        action="store_true",
        help="keep each run's event store and snapshots (gigabytes at medium scale)",
    )

    streaming = bench.add_argument_group("streaming runs")
    streaming.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file of job settings for every streaming run; the bench still "
        "sets the store, topic, consumer group, lifespans and live limits",
    )
    streaming.add_argument(
        "--num-hosts",
        type=positive_int,
        default=2,
        metavar="N",
        help="aggregate hosts of each streaming run, all started at once "
        "(default: %(default)s)",
    )
    streaming.add_argument(
        "--note-bytes",
        type=non_negative_int,
        default=2048,
        metavar="BYTES",
        help="note size of PlaceOrder commands in the throughput, ceiling, "
        "lifespan and load parts (default: %(default)s)",
    )
    streaming.add_argument(
        "--snapshot-every",
        type=positive_int,
        default=100,
        metavar="N",
        help="events between snapshots in streaming runs and in the load part "
        "(default: %(default)s)",
    )

    lifespans = bench.add_argument_group("lifespans and scaling")
    lifespans.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        metavar="NAMES",
        help="lifespan variants to run (default: %(default)s)",
    )
    lifespans.add_argument(
        "--idle-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="lifespan of the idle variant, in seconds (default: %(default)s)",
    )
    lifespans.add_argument(
        "--max-live",
        type=non_negative_int,
        default=1000,
        metavar="N",
        help="live aggregates per host in the limited lifespan variants; 0 "
        "skips the limited variants (default: %(default)s)",
    )
    lifespans.add_argument(
        "--scaling-shops",
        default="10000,1000000",
        metavar="S,S",
        help="shop counts the scaling part compares (default: %(default)s)",
    )
    lifespans.add_argument(
        "--scaling-commands",
        type=positive_int,
        default=1_000_000,
        metavar="N",
        help="commands per scaling run (default: %(default)s)",
    )
    lifespans.add_argument(
        "--scaling-note-bytes",
        type=non_negative_int,
        default=512,
        metavar="BYTES",
        help="note size in the scaling part (default: %(default)s)",
    )

    load = bench.add_argument_group("loading one aggregate")
    load.add_argument(
        "--load-events",
        type=positive_int,
        default=100_000,
        metavar="N",
        help="events in the stream of the load part (default: %(default)s)",
    )


def run_bench_command(args: argparse.Namespace) -> int:
    """Run the bench from parsed arguments; return the exit code."""
    from pipeline.cli import output, stop_on_signals

    settings = settings_from_args(args)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    log_handler = _log_to_file(settings.out_dir / "bench.log")
    stop = stop_on_signals()
    parts = ", ".join(settings.suites)
    output(f"raysource bench: parts {parts}, results in {settings.out_dir}")
    try:
        results = Bench(settings, stop, output).run()
    finally:
        logging.getLogger().removeHandler(log_handler)
        log_handler.close()
    print_report(results, output)
    return 1 if results.get("error") else 0


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Validate the options; SystemExit or ConfigError names a bad one."""
    suites = _parse_names(args.suite, (*SUITES, "all"), "--suite")
    if "all" in suites:
        suites = SUITES
    variants = _parse_names(args.variants, VARIANTS, "--variants")
    shops = _parse_shop_counts(args.scaling_shops)
    if args.idle_timeout <= 0:
        msg = f"--idle-timeout {args.idle_timeout} is invalid: expected seconds above 0"
        raise SystemExit(msg)

    settings = BenchSettings(
        out_dir=Path(args.out).resolve(),
        suites=tuple(s for s in SUITES if s in suites),
        scale=args.scale,
        runs=args.runs,
        note_bytes=args.note_bytes,
        num_hosts=args.num_hosts,
        idle_timeout_s=args.idle_timeout,
        max_live_aggregates=args.max_live,
        snapshot_every=args.snapshot_every,
        variants=tuple(v for v in VARIANTS if v in variants),
        load_events=args.load_events,
        scaling_shops=shops,
        scaling_commands=args.scaling_commands,
        scaling_note_bytes=args.scaling_note_bytes,
        run_timeout_s=args.run_timeout,
        keep_stores=args.keep_stores,
        config_path=args.config,
        config_table=_read_config_table(args.config),
    )

    # Build one run's configuration now, so a bad setting in --config fails
    # before the broker and Ray start.
    job_config(settings, "127.0.0.1:9092", "bench-check", settings.out_dir, "idle", 1)
    return settings


def _parse_shop_counts(text: str) -> tuple[int, ...]:
    try:
        shops = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        msg = (
            f"--scaling-shops {text!r} is invalid: expected comma-separated "
            "integers such as 10000,1000000"
        )
        raise SystemExit(msg) from error
    if not shops or min(shops) < 1:
        msg = f"--scaling-shops {text!r} is invalid: expected integers of 1 or more"
        raise SystemExit(msg)
    return tuple(sorted(set(shops)))


def _read_config_table(path: str | None) -> dict[str, Any]:
    from pipeline.config import ConfigError

    if path is None:
        return {}
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as error:
        msg = f"configuration file {path} not found"
        raise ConfigError(msg) from error
    except tomllib.TOMLDecodeError as error:
        msg = f"configuration file {path} is not valid TOML: {error}"
        raise ConfigError(msg) from error


def _parse_names(text: str, accepted: Sequence[str], option: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names or any(name not in accepted for name in names):
        msg = (
            f"{option} {text!r} is invalid: expected a comma-separated list of "
            f"{', '.join(accepted)}"
        )
        raise SystemExit(msg)
    return names


def _log_to_file(path: Path) -> logging.Handler:
    """Log INFO and above to ``path`` and only warnings to the terminal.

    kafka-python's warnings go to the file only, because on a busy machine its
    client warns about slow event-loop tasks, which do not affect the figures.
    Returns the file's handler, for the caller to remove.
    """
    from pipeline.logs import configure_logging

    configure_logging("bench", "WARNING")
    root = logging.getLogger()
    for existing in root.handlers:
        # Only the terminal handler of configure_logging; a test runner's
        # capture handlers keep their levels.
        if getattr(existing, "_raysource", False):
            existing.setLevel(logging.WARNING)
            existing.addFilter(lambda record: not record.name.startswith("kafka"))
    handler = logging.FileHandler(path)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s bench %(name)s: %(message)s")
    )
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    return handler
