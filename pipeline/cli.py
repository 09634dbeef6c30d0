"""The ``raysource`` command line (also ``python -m pipeline``).

Each subcommand's work lives in its own module, imported only when that
subcommand runs, so ``--help`` returns at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from pipeline.config import ConfigError, JobConfig, describe_settings, load_config
from pipeline.logs import configure_logging

EXIT_CONFIG_ERROR = 2
# The shell's code for a process ended by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the subcommand and return its exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_CONFIG_ERROR
    try:
        return int(args.handler(args) or 0)
    except ConfigError as error:
        print(f"raysource: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except BrokenPipeError:
        # The reader of the output went away (`raysource config | head`).
        # Python flushes stdout again at exit, so it goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def output(text: str = "", *, end: str = "\n") -> None:
    """Write user-facing output; the one place the command line prints."""
    sys.stdout.write(text + end)
    sys.stdout.flush()


def load_job_config(
    args: argparse.Namespace, overrides: dict[str, Any] | None = None
) -> JobConfig:
    """Load --config (if given) with overrides from other options."""
    return load_config(getattr(args, "config", None), overrides)


def check_imports(config: JobConfig) -> None:
    """Import every class and callable that the configuration names.

    A failed import raises ConfigError.
    Done before anything starts, so a wrong import path stops the job at once
    instead of failing inside an actor.
    """
    from pipeline.registry import AggregateRegistry, import_object

    AggregateRegistry.from_config(config.aggregates)
    if config.kafka.decoder:
        import_object(config.kafka.decoder, "kafka.decoder")


def stop_on_signals(stop: threading.Event | None = None) -> threading.Event:
    """Set ``stop`` on the first SIGINT or SIGTERM, and exit on a second signal.

    A new event is created and returned when ``stop`` is None.
    Call it again after ``ray.init``: Ray installs its own SIGTERM handler in
    the driver, which would end the process without committing.
    """
    event = stop if stop is not None else threading.Event()

    def handle(signum: int, _frame: Any) -> None:
        if event.is_set():
            raise SystemExit(128 + signum)
        output(
            f"\nraysource: {signal.Signals(signum).name} received, stopping after "
            "durable commands are committed (send again to exit at once)"
        )
        event.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return event


def _run(args: argparse.Namespace) -> int:
    from pipeline.job import StreamingJob
    from pipeline.report import print_summary, progress_printer

    config = load_job_config(args, _work_dir_override(args))
    check_imports(config)
    configure_logging("driver", config.log_level)
    stop = stop_on_signals()
    job = StreamingJob(config)
    job.start()
    stop_on_signals(stop)
    _print_ray_address(config, args.config)
    try:
        job.wait(stop, progress_printer(expected=None))
    finally:
        summary = job.stop()
    print_summary(summary, rows_read=None)
    return 0


def positive_int(text: str) -> int:
    """Parse an option value that must be an integer of 1 or more."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """Parse an option value that must be an integer of 0 or more."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    value = int(text)
    if value < minimum:
        msg = f"{text} is invalid: expected an integer of {minimum} or more"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        msg = f"{text} is invalid: expected a finite number of seconds above 0"
        raise argparse.ArgumentTypeError(msg)
    return value


def _print_ray_address(config: JobConfig, config_path: str | None) -> None:
    """Print where status and top from another shell can join this job's Ray."""
    import ray

    address = ray.get_runtime_context().gcs_address
    config_option = f" --config {config_path}" if config_path else ""
    output(
        f"raysource run: Ray at {address}, namespace {config.ray.namespace}; "
        f"follow it with: raysource top --address {address}{config_option}"
    )


def _demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    try:
        return run_demo(args)
    except (OSError, ValueError) as error:
        # Bad input (missing file, unreadable rows, unknown mapping) or a work
        # folder that cannot be used: one line for the user, no traceback.
        print(f"raysource: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def _status(args: argparse.Namespace) -> int:
    from pipeline.status import collect_status, format_status

    config = load_job_config(args, {"ray": {"address": args.address}})
    try:
        report = collect_status(config)
    except RuntimeError as error:
        print(f"raysource: {error}", file=sys.stderr)
        return 1
    output(
        json.dumps(report, indent=2, default=str)
        if args.json
        else format_status(report)
    )
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.check:
        check_imports(load_config(args.check))
        output(f"{args.check}: valid")
        return 0
    for name, default, doc in describe_settings():
        output(f"{name} = {default}\n    {doc}")
    return 0


def _work_dir_override(args: argparse.Namespace) -> dict[str, Any]:
    return {"work_dir": args.work_dir} if getattr(args, "work_dir", None) else {}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysource",
        description="Event-sourcing stream processor on Ray: commands from Kafka, "
        "events to a SQL store, aggregates with lifespans and snapshots.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run the streaming job until SIGINT or SIGTERM"
    )
    run.add_argument(
        "--config",
        required=True,
        metavar="FILE",
        help="TOML configuration file (see 'raysource config' for every setting)",
    )
    run.add_argument(
        "--work-dir",
        metavar="DIR",
        help="folder for samples and run files (overrides work_dir)",
    )
    run.set_defaults(handler=_run)

    demo = commands.add_parser(
        "demo",
        help="run the job on embedded defaults: a local broker, Ray, SQLite and "
        "snapshot folder, fed with real data",
    )
    demo.add_argument(
        "--work-dir",
        default="raysource-demo",
        metavar="DIR",
        help="folder for the event store, snapshots, samples and logs "
        "(default: %(default)s)",
    )
    demo.add_argument(
        "--input",
        metavar="FILE",
        help="Parquet, CSV or JSON-lines file to load instead of the 2013 "
        "New York flights",
    )
    demo.add_argument(
        "--mapping",
        metavar="NAME",
        help="row-to-command mapping for --input: flights, retail, shop, or "
        "'module:function' (default: guessed from the file name)",
    )
    demo.add_argument(
        "--limit",
        type=non_negative_int,
        metavar="ROWS",
        help="read only the first ROWS rows",
    )
    demo.add_argument(
        "--config", metavar="FILE", help="TOML file overriding the demo's settings"
    )
    demo.add_argument(
        "--num-ingestors",
        type=positive_int,
        metavar="N",
        help="KafkaIngestor actors (default 1)",
    )
    demo.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="give up if the topic is not drained after this long "
        "(default: %(default)s)",
    )
    demo.set_defaults(handler=_demo)

    status = commands.add_parser("status", help="print what a running job is doing")
    status.add_argument(
        "--config",
        metavar="FILE",
        help="the job's configuration (for its namespace and Kafka group)",
    )
    status.add_argument(
        "--address",
        default="auto",
        help="Ray address of the running job (default: %(default)s, the local cluster)",
    )
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.set_defaults(handler=_status)

    config = commands.add_parser(
        "config", help="list every setting with its default, or check a file"
    )
    config.add_argument("--check", metavar="FILE", help="validate FILE and exit")
    config.set_defaults(handler=_config)

    _add_optional_commands(commands)
    return parser


def _add_optional_commands(commands: Any) -> None:
    """Register subcommands whose modules add their own arguments."""
    import importlib
    import importlib.util

    for module_name in ("pipeline.backfill", "pipeline.bench", "pipeline.top"):
        if importlib.util.find_spec(module_name) is None:
            continue
        importlib.import_module(module_name).register(commands)


if __name__ == "__main__":
    sys.exit(main())
