"""The streaming job: controller, hosts and ingestors.

They are started, watched and stopped together.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ray
from kafka import KafkaAdminClient

from pipeline.config import JobConfig
from pipeline.monitor import Sampler, evictions_by_reason
from pipeline.runtime import init_ray, start_controller, stop_controller
from store.event_store import EventStore

logger = logging.getLogger(__name__)

INGESTOR_NAME = "raysource-ingestor-{}"
_STOP_TIMEOUT_S = 120.0


class StreamingJob:
    """Run the controller, its hosts and the Kafka ingestors until stopped or drained.

    ``expected_ends`` maps (topic, partition) to the offset after the last
    record to process; with it, ``wait`` returns once the consumer group has
    committed every partition up to there (the demo and benchmarks know it
    from the producer). Without it, ``wait`` returns only when ``stop_event``
    is set (SIGINT, SIGTERM).
    """

    def __init__(
        self,
        config: JobConfig,
        expected_ends: dict[tuple[str, int], int] | None = None,
        exclude_pids: Iterable[int] = (),
        label: str = "",
    ) -> None:
        self.config = config
        self.work_dir = Path(config.work_dir)
        self.expected_ends = expected_ends
        self._exclude = list(exclude_pids)
        self._label = label
        self.controller: Any = None
        self.ingestors: list[Any] = []
        self._runs: list[Any] = []
        self.sampler: Sampler | None = None
        self.started_at = 0.0
        self.drained_at: float | None = None

    def start(self) -> None:
        """Start Ray (or join it), the controller with its hosts, and the ingestors."""
        from pipeline.kafka_ingestor import KafkaIngestorActor

        init_ray(self.config.ray)
        self.started_at = time.time()
        self.controller = start_controller(self.config)
        ray.get(self.controller.get_assignment.remote())
        for number in range(1, self.config.kafka.num_ingestors + 1):
            name = INGESTOR_NAME.format(number)
            ingestor = KafkaIngestorActor.options(
                name=name, namespace=self.config.ray.namespace
            ).remote(f"ingestor-{number}", self.config, self.controller)
            self.ingestors.append(ingestor)
            self._runs.append(ingestor.run.remote())
        self.sampler = Sampler(
            self.work_dir, self.controller, self.ingestors, self._exclude, self._label
        )
        logger.info(
            "job started ingestors=%d topics=%s group=%s",
            len(self.ingestors),
            ",".join(self.config.kafka.topics),
            self.config.kafka.group_id,
        )

    def wait(
        self,
        stop_event: threading.Event,
        progress: Callable[[dict[str, Any]], None] | None = None,
        timeout_s: float | None = None,
    ) -> bool:
        """Sample until ``stop_event`` is set, the input is drained, or the timeout.

        Returns whether the input was drained.
        """
        assert self.sampler is not None, "start() first"
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not stop_event.is_set():
            sample = self.sampler.sample()
            if progress is not None:
                progress(sample)
            self._check_ingestors()
            if self.expected_ends is not None and self._is_drained():
                self.drained_at = time.time()
                logger.info(
                    "input drained elapsed_s=%.1f", self.drained_at - self.started_at
                )
                return True
            if deadline is not None and time.monotonic() > deadline:
                logger.warning("job timed out before the input was drained")
                return False
            stop_event.wait(self.config.sample_interval_s)
        return False

    def stop(self) -> dict[str, Any]:
        """Stop the ingestors, which commit what is durable, then the hosts.

        Return a summary of the run.
        """
        final = self.sampler.sample() if self.sampler is not None else {}
        for ingestor in self.ingestors:
            ingestor.stop.remote()
        ingestor_summaries = []
        for run in self._runs:
            try:
                ingestor_summaries.append(ray.get(run, timeout=_STOP_TIMEOUT_S))
            except Exception:
                logger.exception("ingestor did not stop cleanly")
        controller_status = (
            ray.get(self.controller.status.remote()) if self.controller else {}
        )
        if self.controller is not None:
            stop_controller(self.controller)
        for ingestor in self.ingestors:
            ray.kill(ingestor)
        logger.info("job stopped")
        return self._summary(final, controller_status, ingestor_summaries)

    def _check_ingestors(self) -> None:
        ready, _ = ray.wait(self._runs, num_returns=len(self._runs), timeout=0)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as error:
                msg = f"an ingestor stopped with an error: {error}"
                raise RuntimeError(msg) from error

    def _is_drained(self) -> bool:
        assert self.expected_ends is not None
        committed = committed_offsets(
            self.config.kafka.bootstrap_servers, self.config.kafka.group_id
        )
        return all(
            committed.get(tp, 0) >= end for tp, end in self.expected_ends.items()
        )

    def _summary(
        self,
        final: Any,
        controller_status: dict[str, Any],
        ingestors: list[dict[str, Any]],
    ) -> dict[str, Any]:
        store = EventStore(self.config.store.database_url)
        try:
            counts = store.counts()
            distinct = store.count_aggregates()
        finally:
            store.close()
        # A message repeating a command id already recorded is acknowledged
        # without running: it adds no row to the store but is accounted for.
        duplicates = sum(int(i.get("duplicates", 0)) for i in ingestors)
        durable = (
            counts["appended_commands"]
            + counts["rejected_commands"]
            + counts["dead_letters"]
            + duplicates
        )
        elapsed = max(self._processing_time(ingestors), 1e-9)
        hosts = controller_status.get("hosts", {})
        sampler = self.sampler
        return {
            "events": counts["events"],
            "appended_commands": counts["appended_commands"],
            "rejected_commands": counts["rejected_commands"],
            "dead_letters": counts["dead_letters"],
            "duplicates": duplicates,
            "accounted": durable,
            "distinct_aggregates": distinct,
            "peak_live_aggregates": sampler.peak_live if sampler else 0,
            "evictions": evictions_by_reason(controller_status),
            "snapshots_written": sum(
                h.get("snapshots_written", 0) for h in hosts.values()
            ),
            "snapshots_failed": sum(
                h.get("snapshots_failed", 0) for h in hosts.values()
            ),
            "elapsed_s": elapsed,
            "commands_per_s": durable / elapsed,
            "peak_job_rss_bytes": sampler.peak_job_rss if sampler else 0,
            "peak_hosts_rss_bytes": sampler.peak_hosts_rss if sampler else 0,
            "drained": self.drained_at is not None,
            "samples_path": str(sampler.path) if sampler else None,
            "ingestors": ingestors,
            "host_decisions": controller_status.get("history", []),
        }

    def _processing_time(self, ingestors: list[dict[str, Any]]) -> float:
        """Return seconds from the first record read to the input drained.

        Without a drain (a stopped ``run``), the end is the ingestors' last commit.
        """
        first_reads = [i["first_read_at"] for i in ingestors if i.get("first_read_at")]
        last_commits = [
            i["last_commit_at"] for i in ingestors if i.get("last_commit_at")
        ]
        start = min(first_reads) if first_reads else self.started_at
        end = self.drained_at or (max(last_commits) if last_commits else time.time())
        return end - start


def committed_offsets(
    bootstrap_servers: str, group_id: str
) -> dict[tuple[str, int], int]:
    """Return the consumer group's committed offset per (topic, partition)."""
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap_servers, client_id="raysource-monitor"
    )
    try:
        offsets = admin.list_group_offsets({group_id: None}).get(group_id, {})
    finally:
        admin.close()
    return {
        (tp.topic, tp.partition): meta.offset
        for tp, meta in offsets.items()
        if meta is not None and meta.offset is not None and meta.offset >= 0
    }
