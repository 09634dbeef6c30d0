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
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUITES = ("throughput", "ceiling", "lifespans", "load", "scaling")
SCALE_NAMES = ("small", "medium", "large")
# Lifespan variants. Each gives its answer to all three questions (after an
# event, after a command without events, after a rejection).
VARIANTS = ("infinity", "idle", "stop")
# A live-aggregate limit this high never binds, so the unlimited variants show
# what the lifespan alone keeps.
UNBOUNDED_LIVE_AGGREGATES = 1_000_000_000
NUM_PARTITIONS = 8
WORKLOAD_SEED = 42
SHOP_CLASS = "aggregates.shop:Shop"
SHOP_TYPE = "Shop"

# Targets that the report compares the figures with. They are goals, not
# assertions: a missed one is reported with its measured value.
TARGET_CEILING_FRACTION = 0.8
TARGET_SCALING_GROWTH = 1.5
TARGET_STOP_MEMORY_FACTOR = 10.0
TARGET_LOAD_SPEEDUP = 50.0

_MIB = 1024 * 1024
_NAME_RELEASE_TIMEOUT_S = 30.0
_CEILING_POLL_RECORDS = 1000


@dataclass(frozen=True)
class BenchSettings:
    """Options of one ``raysource bench`` invocation."""

    out_dir: Path
    suites: tuple[str, ...] = SUITES
    scale: str = "medium"
    runs: int = 3
    note_bytes: int = 2048
    num_hosts: int = 2
    idle_timeout_s: float = 5.0
    max_live_aggregates: int = 1000
    snapshot_every: int = 100
    variants: tuple[str, ...] = VARIANTS
    load_events: int = 100_000
    scaling_shops: tuple[int, ...] = (10_000, 1_000_000)
    scaling_commands: int = 1_000_000
    scaling_note_bytes: int = 512
    sample_interval_s: float = 0.2
    commit_interval_s: float = 0.2
    run_timeout_s: float = 3600.0
    keep_stores: bool = False
    config_path: str | None = None
    # Settings read from config_path, applied to every streaming run.
    config_table: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Topic:
    """A topic of workload commands, produced once and read by many runs."""

    name: str
    num_shops: int
    num_commands: int
    note_bytes: int
    ends: dict[int, int]
    produce_s: float

    @property
    def num_records(self) -> int:
        return sum(self.ends.values())

    def expected_ends(self) -> dict[tuple[str, int], int]:
        return {(self.name, partition): end for partition, end in self.ends.items()}


# -- command line --------------------------------------------------------------


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
        "--suite", default="all", metavar="PARTS",
        help="comma-separated parts to run: throughput, ceiling, lifespans, load, "
        "scaling, or all (default: %(default)s)",
    )
    chosen.add_argument(
        "--scale", choices=SCALE_NAMES, default="medium",
        help="largest workload scale: throughput and the ceiling run at every scale "
        "up to it, lifespans at it (default: %(default)s)",
    )
    chosen.add_argument(
        "--runs", type=_positive_int, default=3, metavar="N",
        help="runs of each throughput, ceiling and load measurement (default: "
        "%(default)s); each lifespan and scaling variant runs once",
    )
    chosen.add_argument(
        "--out", default="bench-results", metavar="DIR",
        help="folder for results.json, plots, samples and run files "
        "(default: %(default)s)",
    )
    chosen.add_argument(
        "--run-timeout", type=float, default=3600.0, metavar="SECONDS",
        help="fail a streaming or ceiling run that takes longer, in seconds "
        "(default: %(default)s)",
    )
    chosen.add_argument(
        "--keep-stores", action="store_true",
        help="keep each run's event store and snapshots (gigabytes at medium scale)",
    )

    streaming = bench.add_argument_group("streaming runs")
    streaming.add_argument(
        "--config", metavar="FILE",
        help="TOML file of job settings for every streaming run; the bench still "
        "sets the store, topic, consumer group, lifespans and live limits",
    )
    streaming.add_argument(
        "--num-hosts", type=_positive_int, default=2, metavar="N",
        help="aggregate hosts of each streaming run, all started at once "
        "(default: %(default)s)",
    )
    streaming.add_argument(
        "--note-bytes", type=_non_negative_int, default=2048, metavar="BYTES",
        help="note size of PlaceOrder commands in the throughput, ceiling, "
        "lifespan and load parts (default: %(default)s)",
    )
    streaming.add_argument(
        "--snapshot-every", type=_positive_int, default=100, metavar="N",
        help="events between snapshots in streaming runs and in the load part "
        "(default: %(default)s)",
    )

    lifespans = bench.add_argument_group("lifespans and scaling")
    lifespans.add_argument(
        "--variants", default=",".join(VARIANTS), metavar="NAMES",
        help="lifespan variants to run (default: %(default)s)",
    )
    lifespans.add_argument(
        "--idle-timeout", type=float, default=5.0, metavar="SECONDS",
        help="lifespan of the idle variant, in seconds (default: %(default)s)",
    )
    lifespans.add_argument(
        "--max-live", type=_positive_int, default=1000, metavar="N",
        help="live aggregates per host in the limited lifespan variants "
        "(default: %(default)s)",
    )
    lifespans.add_argument(
        "--scaling-shops", default="10000,1000000", metavar="S,S",
        help="shop counts the scaling part compares (default: %(default)s)",
    )
    lifespans.add_argument(
        "--scaling-commands", type=_positive_int, default=1_000_000, metavar="N",
        help="commands per scaling run (default: %(default)s)",
    )
    lifespans.add_argument(
        "--scaling-note-bytes", type=_non_negative_int, default=512, metavar="BYTES",
        help="note size in the scaling part (default: %(default)s)",
    )

    load = bench.add_argument_group("loading one aggregate")
    load.add_argument(
        "--load-events", type=_positive_int, default=100_000, metavar="N",
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


def command_line(settings: BenchSettings) -> str:
    """Return a ``raysource bench`` command that repeats this measurement."""
    defaults = BenchSettings(out_dir=Path("."))
    options = {
        "suite": ",".join(settings.suites),
        "scale": settings.scale,
        "runs": settings.runs,
        "out": settings.out_dir,
    }
    flags = {
        "note_bytes": "--note-bytes",
        "num_hosts": "--num-hosts",
        "idle_timeout_s": "--idle-timeout",
        "max_live_aggregates": "--max-live",
        "variants": "--variants",
        "load_events": "--load-events",
        "snapshot_every": "--snapshot-every",
        "scaling_shops": "--scaling-shops",
        "scaling_commands": "--scaling-commands",
        "scaling_note_bytes": "--scaling-note-bytes",
        "run_timeout_s": "--run-timeout",
        "config_path": "--config",
    }
    words = ["raysource", "bench"]
    words += [f"--{name} {value}" for name, value in options.items()]
    for name, flag in flags.items():
        value = getattr(settings, name)
        if value != getattr(defaults, name):
            text = ",".join(map(str, value)) if isinstance(value, tuple) else value
            words.append(f"{flag} {text}")
    if settings.keep_stores:
        words.append("--keep-stores")
    return " ".join(words)


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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"{text} is invalid: expected an integer of 1 or more"
        raise argparse.ArgumentTypeError(msg)
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        msg = f"{text} is invalid: expected an integer of 0 or more"
        raise argparse.ArgumentTypeError(msg)
    return value


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


# -- the bench -----------------------------------------------------------------


class Bench:
    """Run the chosen parts in order and collect their results.

    The broker and Ray start on first need and stop at the end. After every
    run, ``results.json`` is rewritten, so an interrupted or failed bench
    keeps what it measured.
    """

    def __init__(
        self,
        settings: BenchSettings,
        stop: threading.Event | None = None,
        output: Callable[[str], None] = print,
    ) -> None:
        self.settings = settings
        self.stop = stop or threading.Event()
        self.output = output
        self.results: dict[str, Any] = {}
        self._broker: Any = None
        self._topics: dict[str, Topic] = {}

    def run(self) -> dict[str, Any]:
        """Run every chosen part; return the results, also written to results.json."""
        settings = self.settings
        self.results = {
            "command": command_line(settings),
            "started_at": time.time(),
            "machine": machine_facts(),
            "settings": _settings_facts(settings),
        }
        parts = {
            "throughput": self._run_throughput,
            "lifespans": self._run_lifespans,
            "load": self._run_load,
            "scaling": self._run_scaling,
        }
        chosen = [name for name in parts if name in settings.suites]
        if "ceiling" in settings.suites and "throughput" not in chosen:
            chosen.insert(0, "throughput")
        try:
            for name in chosen:
                if self.stop.is_set():
                    break
                self.output(f"\n== {name}")
                parts[name]()
                self._save()
        except Exception as error:
            logger.exception("bench failed")
            self.results["error"] = f"{type(error).__name__}: {error}"
        finally:
            self._shut_down()
            self.results["finished_at"] = time.time()
            self.results["load_average_end"] = list(os.getloadavg())
            if self.stop.is_set():
                self.results["interrupted"] = True
            self.results["targets"] = evaluate_targets(self.results)
            self._save()
        return self.results

    # -- parts -----------------------------------------------------------------

    def _run_throughput(self) -> None:
        """Alternate streaming and ceiling runs at each scale up to --scale."""
        settings = self.settings
        streaming = "throughput" in settings.suites
        ceiling = "ceiling" in settings.suites
        scales = SCALE_NAMES[: SCALE_NAMES.index(settings.scale) + 1]
        for scale_name in scales:
            topic = self._scale_topic(scale_name)
            stream_runs: list[dict[str, Any]] = []
            ceiling_runs: list[dict[str, Any]] = []
            for number in range(1, settings.runs + 1):
                if self.stop.is_set():
                    return
                label = f"{scale_name} {number}/{settings.runs}"
                if streaming:
                    run_dir = (
                        settings.out_dir / "throughput" / scale_name / f"run-{number}"
                    )
                    run = self._streaming_run(
                        topic, run_dir, "infinity", UNBOUNDED_LIVE_AGGREGATES
                    )
                    stream_runs.append(run)
                    self._print_run(f"streaming {label}", run)
                if ceiling and not self.stop.is_set():
                    run_dir = (
                        settings.out_dir / "ceiling" / scale_name / f"run-{number}"
                    )
                    run = self._ceiling_run(topic, run_dir)
                    ceiling_runs.append(run)
                    self.output(
                        f"  ceiling {label}: {run['commands_per_s']:,.0f} commands/s "
                        f"over {run['elapsed_s']:,.1f}s, "
                        f"peak {_mib(run['peak_rss_bytes'])}"
                    )
                self._record_throughput(scale_name, topic, stream_runs, ceiling_runs)
                self._save()

    def _record_throughput(
        self,
        scale_name: str,
        topic: Topic,
        stream_runs: list[dict[str, Any]],
        ceiling_runs: list[dict[str, Any]],
    ) -> None:
        if stream_runs:
            figures = {**_topic_facts(topic), **summarize_runs(stream_runs)}
            if ceiling_runs:
                figures["ratio_to_ceiling"] = pair_ratios(stream_runs, ceiling_runs)
            self.results.setdefault("throughput", {})[scale_name] = figures
        if ceiling_runs:
            figures = {**_topic_facts(topic), **summarize_ceiling(ceiling_runs)}
            self.results.setdefault("ceiling", {})[scale_name] = figures

    def _run_lifespans(self) -> None:
        """Run each lifespan variant once, without and then with the live limit."""
        settings = self.settings
        topic = self._scale_topic(settings.scale)
        variants: dict[str, Any] = {}
        self.results["lifespans"] = {**_topic_facts(topic), "variants": variants}
        limited = f"max-live-{settings.max_live_aggregates}"
        for limit in ("", limited):
            max_live = (
                settings.max_live_aggregates if limit else UNBOUNDED_LIVE_AGGREGATES
            )
            for variant in settings.variants:
                if self.stop.is_set():
                    return
                # Unlimited variants write OUT/<variant>/samples.jsonl, the
                # layout the lifespans notebook reads. Limited ones go one
                # folder deeper, where the notebook's glob does not look.
                name = f"{variant}-{limit}" if limit else variant
                run_dir = settings.out_dir / limit / variant
                run = self._streaming_run(topic, run_dir, variant, max_live)
                run["lifespan"] = self._lifespan_answer(variant)
                run["max_live_aggregates_per_host"] = max_live if limit else None
                variants[name] = run
                self._print_run(name, run)
                self._save()
        title = f"raysource bench: lifespans at {settings.scale} scale"
        self.results["lifespans"]["plot"] = self._plot_variants(
            variants, "lifespans", title
        )

    def _run_load(self) -> None:
        settings = self.settings
        work_dir = settings.out_dir / "load"
        self.output(
            f"  building one Shop stream of {settings.load_events:,} events ..."
        )
        result = measure_load(
            work_dir,
            settings.load_events,
            settings.snapshot_every,
            settings.runs,
            settings.note_bytes,
        )
        self.results["load"] = result
        if not settings.keep_stores:
            shutil.rmtree(work_dir, ignore_errors=True)
        for mode in ("full_replay", "from_snapshot"):
            figures = result[mode]
            seconds = figures["seconds"]
            self.output(
                f"  {mode.replace('_', ' ')}: {_ms(seconds['median'])} "
                f"(min {_ms(seconds['min'])}, max {_ms(seconds['max'])}), "
                f"peak traced {_mib(figures['peak_traced_bytes'], 1)}, "
                f"{figures['events_replayed']:,} events replayed"
            )
        self.output(f"  loading from the snapshot is {result['speedup']:,.0f}x faster")

    def _run_scaling(self) -> None:
        """Run each lifespan variant on topics with more and more shops."""
        settings = self.settings
        # Scaling is the last part, so the scale topics of the parts before it
        # are deleted, which keeps the broker's memory to the scaling topics.
        for topic in list(self._topics.values()):
            self._delete_topic(topic)
        by_shops: dict[str, Any] = {}
        self.results["scaling"] = {
            "num_commands": settings.scaling_commands,
            "note_bytes": settings.scaling_note_bytes,
            "shops": by_shops,
        }
        for num_shops in settings.scaling_shops:
            topic = self._topic(
                f"bench-scaling-{num_shops}",
                num_shops,
                settings.scaling_commands,
                settings.scaling_note_bytes,
            )
            variants: dict[str, Any] = {}
            by_shops[str(num_shops)] = {**_topic_facts(topic), "variants": variants}
            for variant in settings.variants:
                if self.stop.is_set():
                    return
                run_dir = settings.out_dir / "scaling" / f"shops-{num_shops}" / variant
                run = self._streaming_run(
                    topic, run_dir, variant, UNBOUNDED_LIVE_AGGREGATES
                )
                run["lifespan"] = self._lifespan_answer(variant)
                variants[variant] = run
                self._print_run(f"{num_shops:,} shops, {variant}", run)
                self._save()
            title = (
                f"raysource bench: {num_shops:,} shops, "
                f"{settings.scaling_commands:,} commands"
            )
            by_shops[str(num_shops)]["plot"] = self._plot_variants(
                variants, f"scaling_shops_{num_shops}", title
            )
            self._delete_topic(topic)
            self.results["scaling"]["growth"] = scaling_growth(by_shops)

    # -- runs ------------------------------------------------------------------

    def _streaming_run(
        self, topic: Topic, run_dir: Path, variant: str, max_live: int
    ) -> dict[str, Any]:
        """Run the streaming job over the whole topic once and return its figures."""
        import ray

        from pipeline.job import StreamingJob
        from pipeline.monitor import read_samples, rss_of

        _reset_dir(run_dir)
        config = job_config(
            self.settings, self._bootstrap(), topic.name, run_dir, variant, max_live
        )
        broker_pid = self._broker.pid
        job = StreamingJob(
            config,
            expected_ends=topic.expected_ends(),
            exclude_pids=[broker_pid],
            label=run_dir.name,
        )
        try:
            job.start()
            job.wait(self.stop, timeout_s=self.settings.run_timeout_s)
        finally:
            summary = job.stop()
            _wait_names_released(ray, config)
        samples = read_samples(summary["samples_path"])
        run = streaming_figures(summary, samples, topic.num_records)
        run["broker_rss_bytes"] = rss_of(broker_pid)
        run["load_average"] = list(os.getloadavg())
        if not run["drained"] and not self.stop.is_set():
            msg = (
                f"streaming run in {run_dir} accounted for {run['accounted']} of "
                f"{topic.num_records} commands within {self.settings.run_timeout_s}s; "
                f"see {run_dir / 'samples.jsonl'} and the Ray logs"
            )
            raise RuntimeError(msg)
        self._remove_store(run_dir)
        return run

    def _ceiling_run(self, topic: Topic, run_dir: Path) -> dict[str, Any]:
        _reset_dir(run_dir)
        params = {
            "bootstrap_servers": self._bootstrap(),
            "topic": topic.name,
            "group_id": f"bench-ceiling-{uuid.uuid4().hex[:12]}",
            "ends": topic.ends,
            "database_url": f"sqlite:///{run_dir / 'events.db'}",
            "timeout_s": self.settings.run_timeout_s,
        }
        run = run_ceiling_subprocess(params, run_dir, self.settings.run_timeout_s + 60)
        run["load_average"] = list(os.getloadavg())
        if run["accounted"] != topic.num_records:
            msg = (
                f"ceiling run accounted for {run['accounted']} of "
                f"{topic.num_records} commands"
            )
            raise RuntimeError(msg)
        self._remove_store(run_dir)
        return run

    def _lifespan_answer(self, variant: str) -> str:
        return lifespan_answer(self.settings, variant)

    # -- topics and services ---------------------------------------------------

    def _bootstrap(self) -> str:
        if self._broker is None:
            from pipeline.broker import KafkaBroker

            self._broker = KafkaBroker(log_path=self.settings.out_dir / "broker.log")
            bootstrap = self._broker.start()
            self.output(f"  broker started on {bootstrap} (Tansu, topics in memory)")
        return str(self._broker.bootstrap_servers)

    def _scale_topic(self, scale_name: str) -> Topic:
        from aggregates.workload import SCALES

        scale = SCALES[scale_name]
        return self._topic(
            f"bench-{scale_name}",
            scale.num_shops,
            scale.num_commands,
            self.settings.note_bytes,
        )

    def _topic(
        self, name: str, num_shops: int, num_commands: int, note_bytes: int
    ) -> Topic:
        """Produce the workload to a topic once; later calls return the same topic."""
        if name in self._topics:
            return self._topics[name]
        from aggregates.workload import generate_commands
        from pipeline.monitor import rss_of
        from pipeline.producer import create_topic, produce_commands

        bootstrap = self._bootstrap()
        self.output(
            f"  producing {num_commands:,} commands for {num_shops:,} shops "
            f"to {name} ..."
        )
        create_topic(bootstrap, name, NUM_PARTITIONS)
        started = time.perf_counter()
        commands = generate_commands(num_shops, num_commands, WORKLOAD_SEED, note_bytes)
        ends = produce_commands(bootstrap, name, commands, "shop_id")
        produce_s = time.perf_counter() - started
        topic = Topic(name, num_shops, num_commands, note_bytes, ends, produce_s)
        if topic.num_records != num_commands:
            msg = (
                f"topic {name} holds {topic.num_records} records, "
                f"expected {num_commands}"
            )
            raise RuntimeError(msg)
        self._topics[name] = topic
        broker_rss = rss_of(self._broker.pid)
        broker = self.results.setdefault("broker", {})
        broker.setdefault("rss_bytes_after_produce", {})[name] = broker_rss
        self.output(f"  produced in {produce_s:,.1f}s; broker RSS {_mib(broker_rss)}")
        return topic

    def _delete_topic(self, topic: Topic) -> None:
        """Delete a topic that no later part reads, so the broker frees its memory."""
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        admin = KafkaAdminClient(
            bootstrap_servers=self._bootstrap(), client_id="raysource-bench"
        )
        try:
            admin.delete_topics([topic.name])
        except KafkaError:
            logger.warning(
                "topic not deleted topic=%s; the broker keeps it in memory",
                topic.name,
                exc_info=True,
            )
        finally:
            admin.close()
        self._topics.pop(topic.name, None)

    def _remove_store(self, run_dir: Path) -> None:
        if self.settings.keep_stores:
            return
        for name in ("events.db", "events.db-wal", "events.db-shm"):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "snapshots", ignore_errors=True)

    def _shut_down(self) -> None:
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        if self._broker is not None:
            from pipeline.monitor import rss_of

            broker = self.results.setdefault("broker", {})
            broker["rss_bytes_at_end"] = rss_of(self._broker.pid)
            self._broker.stop()
            self._broker = None

    # -- output ----------------------------------------------------------------

    def _plot_variants(
        self, variants: Mapping[str, Any], stem: str, title: str
    ) -> str | None:
        """Plot live aggregates and host memory of each variant to OUT/<stem>.png."""
        from pipeline.monitor import read_samples
        from pipeline.plots import plot_samples

        runs = {}
        for name, run in variants.items():
            path = run.get("samples_path")
            if path and Path(path).exists():
                # Samples taken before the controller first polled the hosts
                # report 0 bytes, which is no measurement.
                samples = read_samples(path)
                runs[name] = [s for s in samples if s["hosts_rss_bytes"] > 0]
        if not runs:
            return None
        return str(plot_samples(runs, self.settings.out_dir / f"{stem}.png", title))

    def _print_run(self, label: str, run: Mapping[str, Any]) -> None:
        self.output(
            f"  {label}: {run['commands_per_s']:,.0f} commands/s over "
            f"{run['elapsed_s']:,.1f}s, job {_mib(run['peak_job_rss_bytes'])}, "
            f"hosts {_mib(run['peak_hosts_rss_bytes'])} "
            f"({_mib(run['hosts_rss_above_idle_bytes'])} above idle), "
            f"peak live {run['peak_live_aggregates']:,}, "
            f"broker {_mib(run['broker_rss_bytes'])}"
        )

    def _save(self) -> None:
        path = self.settings.out_dir / "results.json"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        temporary.replace(path)


def job_config(
    settings: BenchSettings,
    bootstrap_servers: str,
    topic: str,
    run_dir: Path,
    variant: str,
    max_live: int,
) -> Any:
    """Return the JobConfig of one streaming run.

    The bench's defaults come first, then the --config file, then what each
    run must own: its store, topic, consumer group, lifespan and live limit.
    Hosts are all started at once (``min_hosts = max_hosts``), so that their
    idle memory is measured before the first command.
    """
    from pipeline.config import config_from_dict

    answer = lifespan_answer(settings, variant)
    defaults: dict[str, Any] = {
        "sample_interval_s": settings.sample_interval_s,
        "log_level": "WARNING",
        "ray": {"log_to_driver": False},
        "kafka": {"commit_interval_s": settings.commit_interval_s},
        "hosts": {"min_hosts": settings.num_hosts, "max_hosts": settings.num_hosts},
    }
    fixed: dict[str, Any] = {
        "work_dir": str(run_dir),
        "kafka": {
            "bootstrap_servers": bootstrap_servers,
            "topics": [topic],
            "group_id": f"bench-{run_dir.name}-{uuid.uuid4().hex[:12]}",
        },
        "store": {
            "database_url": f"sqlite:///{run_dir / 'events.db'}",
            "snapshot_url": str(run_dir / "snapshots"),
        },
        "hosts": {"max_live_aggregates": max_live},
        "aggregates": {
            SHOP_TYPE: {
                "class": SHOP_CLASS,
                "after_event": answer,
                "after_command": answer,
                "after_error": answer,
                "snapshot_every": settings.snapshot_every,
            }
        },
    }
    from_file = {k: v for k, v in settings.config_table.items() if k != "aggregates"}
    return config_from_dict(_deep_merge(_deep_merge(defaults, from_file), fixed))


def lifespan_answer(settings: BenchSettings, variant: str) -> str:
    """Return the configuration spelling of a variant's lifespan ("stop", "5s")."""
    if variant == "idle":
        return f"{settings.idle_timeout_s:g}s"
    return variant


def _settings_facts(settings: BenchSettings) -> dict[str, Any]:
    facts = asdict(settings)
    facts["out_dir"] = str(settings.out_dir)
    return facts


def _topic_facts(topic: Topic) -> dict[str, Any]:
    return {
        "topic": topic.name,
        "num_shops": topic.num_shops,
        "num_commands": topic.num_commands,
        "note_bytes": topic.note_bytes,
        "produce_s": topic.produce_s,
    }


def _reset_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _deep_merge(
    base: Mapping[str, Any], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _wait_names_released(ray: Any, config: Any) -> None:
    """Wait until Ray has released the names of a stopped job's actors.

    The next run creates actors with the same names (controller, hosts,
    ingestors), and Ray frees a killed actor's name only once the actor is
    dead. Hosts are looked up by the numbers the controller may have used.
    """
    from pipeline.controller import CONTROLLER_NAME
    from pipeline.job import INGESTOR_NAME

    namespace = config.ray.namespace
    names = [CONTROLLER_NAME]
    names += [INGESTOR_NAME.format(n) for n in range(1, config.kafka.num_ingestors + 1)]
    names += [f"raysource-host-{n}" for n in range(1, 4 * config.hosts.max_hosts + 64)]
    deadline = time.monotonic() + _NAME_RELEASE_TIMEOUT_S
    for name in names:
        while True:
            try:
                ray.get_actor(name, namespace=namespace)
            except ValueError:
                break
            if time.monotonic() > deadline:
                msg = (
                    f"actor {namespace}/{name} still exists "
                    f"{_NAME_RELEASE_TIMEOUT_S}s after its job stopped"
                )
                raise RuntimeError(msg)
            time.sleep(0.05)


# -- figures of runs -------------------------------------------------------------


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
                key: _ratio(largest[variant][key], smallest[variant][key])
                for key in keys
            },
        }
    return growth


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


# -- the single-process ceiling ------------------------------------------------


def run_ceiling_loop(
    bootstrap_servers: str,
    topic: str,
    group_id: str,
    ends: Mapping[int, int],
    database_url: str,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Consume ``topic`` in one process without Ray: decode, execute, append, commit.

    Aggregates stay in a dict for the whole run (an INFINITY lifespan, no
    snapshots). Records are decoded and validated by the job's own Decoder.
    Each poll of up to 1,000 records becomes one event-store append, and the
    polled offsets are committed once the append has returned. The loop ends
    when every partition has been read up to ``ends``. Timing runs from the
    first record read to the last commit. ``peak_rss_bytes`` in the returned
    figures is this process's peak resident memory.
    """
    from kafka import KafkaConsumer, OffsetAndMetadata

    from pipeline.config import config_from_dict
    from pipeline.decoding import DecodeFailure, Decoder
    from pipeline.registry import AggregateRegistry
    from store.event_store import DeadLetter, EventStore

    config = config_from_dict({"aggregates": {SHOP_TYPE: {"class": SHOP_CLASS}}})
    decoder = Decoder.from_config(config)
    registry = AggregateRegistry.from_config(config.aggregates)
    store = EventStore(database_url)
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        client_id="raysource-bench-ceiling",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        max_poll_records=_CEILING_POLL_RECORDS,
    )
    consumer.subscribe([topic])
    aggregates: dict[tuple[str, str], Any] = {}
    read_up_to: dict[int, int] = {}
    first_read_at: float | None = None
    last_commit_at = 0.0
    deadline = time.monotonic() + timeout_s
    try:
        while any(read_up_to.get(p, 0) < end for p, end in ends.items()):
            if time.monotonic() > deadline:
                msg = (
                    f"ceiling loop did not read {topic} to its end within {timeout_s}s"
                )
                raise TimeoutError(msg)
            polled = consumer.poll(timeout_ms=100, max_records=_CEILING_POLL_RECORDS)
            if not polled:
                continue
            if first_read_at is None:
                first_read_at = time.time()
            records, letters, offsets = [], [], {}
            for partition, batch in polled.items():
                for record in batch:
                    item = decoder.decode(
                        partition.topic,
                        partition.partition,
                        record.offset,
                        record.key,
                        record.value,
                    )
                    if isinstance(item, DecodeFailure):
                        letters.append(
                            DeadLetter(
                                item.reason,
                                record.value,
                                record.key,
                                partition.topic,
                                partition.partition,
                                record.offset,
                            )
                        )
                    else:
                        records.append(_execute(aggregates, registry, item))
                offsets[partition] = OffsetAndMetadata(batch[-1].offset + 1, "", -1)
            store.append(records)
            store.record_dead_letters(letters)
            consumer.commit(offsets)
            last_commit_at = time.time()
            for partition, meta in offsets.items():
                read_up_to[partition.partition] = meta.offset
        counts = store.counts()
    finally:
        consumer.close()
        store.close()
    accounted = sum(
        counts[key]
        for key in ("appended_commands", "rejected_commands", "dead_letters")
    )
    elapsed = max(last_commit_at - (first_read_at or last_commit_at), 1e-9)
    return {
        "accounted": accounted,
        "events": counts["events"],
        "rejected_commands": counts["rejected_commands"],
        "dead_letters": counts["dead_letters"],
        "live_aggregates": len(aggregates),
        "elapsed_s": elapsed,
        "commands_per_s": accounted / elapsed,
        # ru_maxrss is in kilobytes on Linux.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _execute(aggregates: dict[tuple[str, str], Any], registry: Any, item: Any) -> Any:
    """Execute one command, creating its aggregate on first use; return its record."""
    from aggregates.errors import DomainError
    from store.event_store import CommandRecord

    command = item.command
    key = (item.aggregate_type, command.aggregate_id)
    aggregate = aggregates.get(key)
    if aggregate is None:
        aggregate_class = registry.get(item.aggregate_type).cls
        aggregate = aggregates[key] = aggregate_class(command.aggregate_id)
    version = aggregate.version
    try:
        events = aggregate.execute(command)
    except DomainError as error:
        return CommandRecord(
            command.command_id, key[0], key[1], version, (), str(error)
        )
    for event in events:
        aggregate.apply(event)
    return CommandRecord(command.command_id, key[0], key[1], version, events)


def run_ceiling_subprocess(
    params: Mapping[str, Any], work_dir: Path, timeout_s: float
) -> dict[str, Any]:
    """Run ``run_ceiling_loop`` in a new Python process and return its figures.

    A process of its own keeps the driver's memory, and Ray's, out of the
    ceiling's peak RSS. ``params`` are the loop's keyword arguments.
    """
    params_path = work_dir / "ceiling_params.json"
    result_path = work_dir / "ceiling_result.json"
    ends = {str(partition): end for partition, end in params["ends"].items()}
    params_path.write_text(json.dumps({**params, "ends": ends}))
    completed = subprocess.run(
        [sys.executable, "-m", "pipeline.bench", str(params_path), str(result_path)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if completed.returncode != 0 or not result_path.exists():
        msg = (
            f"ceiling process failed with exit code {completed.returncode}; "
            f"the end of its error output:\n{completed.stderr[-2000:]}"
        )
        raise RuntimeError(msg)
    result: dict[str, Any] = json.loads(result_path.read_text())
    return result


def _ceiling_main(argv: Sequence[str]) -> int:
    """Run the ceiling in this process: read parameters, run, write the figures."""
    params_path, result_path = argv
    params = json.loads(Path(params_path).read_text())
    ends = {int(partition): int(end) for partition, end in params.pop("ends").items()}
    result = run_ceiling_loop(ends=ends, **params)
    Path(result_path).write_text(json.dumps(result))
    return 0


# -- loading one long stream -----------------------------------------------------


def measure_load(
    work_dir: Path,
    num_events: int,
    snapshot_every: int,
    runs: int,
    note_bytes: int = 2048,
) -> dict[str, Any]:
    """Time loading a Shop of ``num_events`` events by full replay and from a snapshot.

    The stream is built from workload commands for a single shop, on SQLite.
    Its latest snapshot is ``snapshot_every - 1`` events behind the head, the
    most that policy leaves to replay. Each mode is loaded once untimed (warm
    caches), then ``runs`` times against a clock, then once more under
    tracemalloc for its peak of Python allocations. That last load is not
    timed, because tracemalloc slows it.
    """
    import tracemalloc

    from aggregates.shop import Shop
    from store.event_store import EventStore
    from store.loading import load_aggregate
    from store.snapshot_store import SnapshotStore

    _reset_dir(work_dir)
    store = EventStore(f"sqlite:///{work_dir / 'load.db'}")
    snapshots = SnapshotStore(str(work_dir / "snapshots"))
    snapshot_at = max(num_events - (snapshot_every - 1), 1)
    started = time.perf_counter()
    aggregate_id = build_long_stream(
        store, snapshots, num_events, snapshot_at, note_bytes
    )
    results: dict[str, Any] = {
        "num_events": num_events,
        "snapshot_every": snapshot_every,
        "snapshot_at_version": snapshot_at,
        "note_bytes": note_bytes,
        "database": "sqlite",
        "build_s": time.perf_counter() - started,
    }
    states = {}
    try:
        for mode, snapshot_store in (
            ("full_replay", None),
            ("from_snapshot", snapshots),
        ):

            def load(snapshot_store: Any = snapshot_store) -> Any:
                return load_aggregate(Shop, aggregate_id, store, snapshot_store)

            load()
            seconds = []
            for _ in range(runs):
                started = time.perf_counter()
                loaded = load()
                seconds.append(time.perf_counter() - started)
            tracemalloc.start()
            load()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            if loaded.aggregate.version != num_events:
                version = loaded.aggregate.version
                msg = f"{mode} loaded version {version}, expected {num_events}"
                raise RuntimeError(msg)
            states[mode] = loaded.aggregate.snapshot_state()
            results[mode] = {
                "seconds": spread(seconds),
                "peak_traced_bytes": peak,
                "events_replayed": loaded.events_replayed,
            }
    finally:
        store.close()
    results["states_equal"] = states["full_replay"] == states["from_snapshot"]
    if not results["states_equal"]:
        msg = "the Shop loaded from its snapshot differs from the one fully replayed"
        raise RuntimeError(msg)
    results["speedup"] = _ratio(
        results["full_replay"]["seconds"]["median"],
        results["from_snapshot"]["seconds"]["median"],
    )
    results["memory_ratio"] = _ratio(
        results["full_replay"]["peak_traced_bytes"],
        results["from_snapshot"]["peak_traced_bytes"],
    )
    return results


def build_long_stream(
    store: Any, snapshots: Any, num_events: int, snapshot_at: int, note_bytes: int
) -> str:
    """Append one shop's workload commands until its stream has ``num_events`` events.

    Rejected commands are recorded as a host records them. The state at
    version ``snapshot_at`` is saved as a snapshot. Returns the shop's id.
    """
    from aggregates.errors import DomainError
    from aggregates.shop import Shop
    from aggregates.workload import generate_commands, shop_id
    from store.event_store import CommandRecord
    from store.loading import snapshot_of

    # Each command adds one event or is rejected (2 % are), so twice as many
    # commands as events is more than the stream needs.
    commands = generate_commands(1, 2 * num_events + 100, WORKLOAD_SEED, note_bytes)
    aggregate = Shop(shop_id(1))
    snapshot_version = Shop.snapshot_policy.snapshot_version
    records: list[CommandRecord] = []
    for message in commands:
        if aggregate.version >= num_events:
            break
        command = Shop.command_from_message(message)
        version = aggregate.version
        try:
            events = aggregate.execute(command)
        except DomainError as error:
            records.append(
                CommandRecord(
                    command.command_id,
                    SHOP_TYPE,
                    aggregate.aggregate_id,
                    version,
                    (),
                    str(error),
                )
            )
            continue
        for event in events:
            aggregate.apply(event)
        records.append(
            CommandRecord(
                command.command_id, SHOP_TYPE, aggregate.aggregate_id, version, events
            )
        )
        if aggregate.version == snapshot_at:
            snapshots.save(snapshot_of(aggregate, snapshot_version))
        if len(records) >= 1000:
            store.append(records)
            records = []
    store.append(records)
    if aggregate.version != num_events:
        msg = (
            f"the workload ran out after {aggregate.version} events, "
            f"expected {num_events}"
        )
        raise RuntimeError(msg)
    return aggregate.aggregate_id


# -- targets and the report --------------------------------------------------------


def evaluate_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Compare the figures with the targets; a target without figures is left out."""
    targets = _throughput_targets(results) + _scaling_targets(results)
    variants = results.get("lifespans", {}).get("variants", {})
    if "infinity" in variants and "stop" in variants:
        for key in ("peak_hosts_rss_bytes", "hosts_rss_above_idle_bytes"):
            factor = _ratio(variants["infinity"][key], variants["stop"][key])
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
            f"{_mib(figures['peak_job_rss_bytes']['median'])}, hosts "
            f"{_mib(figures['hosts_rss_above_idle_bytes']['median'])} above idle"
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
            f"peak {_mib(figures['peak_rss_bytes']['median'])}"
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
            f"{_mib(broker['rss_bytes_at_end'])} at the end"
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
        f"{run['peak_live_aggregates']:,}, hosts {_mib(run['peak_hosts_rss_bytes'])} "
        f"({_mib(run['hosts_rss_above_idle_bytes'])} above idle), "
        f"job {_mib(run['peak_job_rss_bytes'])}"
    )


def _rates(figures: Mapping[str, float]) -> str:
    return (
        f"{figures['median']:,.0f} commands/s "
        f"(min {figures['min']:,.0f}, max {figures['max']:,.0f})"
    )


def _mib(num_bytes: float, digits: int = 0) -> str:
    return f"{num_bytes / _MIB:,.{digits}f} MiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


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


if __name__ == "__main__":
    sys.exit(_ceiling_main(sys.argv[1:]))
