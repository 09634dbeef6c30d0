"""The ``Bench`` runner: topics, streaming and ceiling runs, and results.json.

``Bench`` starts the broker and Ray on first need, produces each workload
topic once, runs the chosen parts in order and rewrites ``results.json``
after every run. Imports only the standard library and the other bench
modules at module level, and Ray, Kafka and the job inside methods.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline._bench_ceiling import run_ceiling_subprocess
from pipeline._bench_figures import (
    evaluate_targets,
    format_mib,
    machine_facts,
    pair_ratios,
    scaling_growth,
    streaming_figures,
    summarize_ceiling,
    summarize_runs,
)
from pipeline._bench_loading import measure_load
from pipeline._bench_settings import (
    NUM_PARTITIONS,
    SCALE_NAMES,
    UNBOUNDED_LIVE_AGGREGATES,
    WORKLOAD_SEED,
    BenchSettings,
    command_line,
    job_config,
    lifespan_answer,
    reset_dir,
)

logger = logging.getLogger(__name__)

_NAME_RELEASE_TIMEOUT_S = 30.0


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
        # A Ray that runs before the bench (a caller's own) is left running.
        self._ray_was_running = _ray_is_running()

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
                        f"peak {format_mib(run['peak_rss_bytes'])}"
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
        """Run each lifespan variant once, without and then with the live limit.

        A limit of 0 runs the variants without the limit only.
        """
        settings = self.settings
        topic = self._scale_topic(settings.scale)
        variants: dict[str, Any] = {}
        self.results["lifespans"] = {**_topic_facts(topic), "variants": variants}
        limits = [""]
        if settings.max_live_aggregates > 0:
            limits.append(f"max-live-{settings.max_live_aggregates}")
        for limit in limits:
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
                f"peak traced {format_mib(figures['peak_traced_bytes'], 1)}, "
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

        reset_dir(run_dir)
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
        reset_dir(run_dir)
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
        self.output(
            f"  produced in {produce_s:,.1f}s; broker RSS {format_mib(broker_rss)}"
        )
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
        if _ray_is_running() and not self._ray_was_running:
            import ray

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
            f"{run['elapsed_s']:,.1f}s, job {format_mib(run['peak_job_rss_bytes'])}, "
            f"hosts {format_mib(run['peak_hosts_rss_bytes'])} "
            f"({format_mib(run['hosts_rss_above_idle_bytes'])} above idle), "
            f"peak live {run['peak_live_aggregates']:,}, "
            f"broker {format_mib(run['broker_rss_bytes'])}"
        )

    def _save(self) -> None:
        path = self.settings.out_dir / "results.json"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        temporary.replace(path)


def _ray_is_running() -> bool:
    # Checked without importing Ray, which takes seconds.
    if "ray" not in sys.modules:
        return False
    import ray

    return bool(ray.is_initialized())


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


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"
