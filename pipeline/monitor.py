"""Sampling a running job: host and ingestor status, memory of the job's processes.

Samples go to ``samples.jsonl`` in the work folder, one JSON object a line,
and feed the progress line, the summary, the demo's plot and the notebooks.
Each sample contains the time, the job's live aggregates, memory, throughput and
consumer lag, and the same per host (live aggregates, memory, commands per
second, evictions) and per partition (lag, paused).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import ray


def process_tree_rss(root_pid: int, exclude_pids: Iterable[int] = ()) -> int:
    """Return the summed resident memory of ``root_pid`` and its descendants.

    Processes in ``exclude_pids`` and their descendants are left out (the
    embedded broker, which keeps the whole topic in memory).
    """
    excluded = set(exclude_pids)
    try:
        root = psutil.Process(root_pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for process in list(processes):
        if process.pid in excluded:
            try:
                excluded.update(child.pid for child in process.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
    total = 0
    for process in processes:
        if process.pid in excluded:
            continue
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def rss_of(pid: int) -> int:
    """Return the resident memory of one process, 0 if it is gone."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.NoSuchProcess:
        return 0


class Sampler:
    """Collect status from the controller and ingestors and append samples to a file."""

    def __init__(
        self,
        work_dir: Path,
        controller: Any,
        ingestors: list[Any],
        exclude_pids: Iterable[int] = (),
        label: str = "",
    ) -> None:
        self.path = work_dir / "samples.jsonl"
        work_dir.mkdir(parents=True, exist_ok=True)
        self._controller = controller
        self._ingestors = ingestors
        self._exclude = list(exclude_pids)
        self._label = label
        self._started = time.time()
        self._previous: tuple[float, int] | None = None
        # Executed commands per host at the last sample, for per-host rates.
        self._previous_hosts: dict[str, int] = {}
        self.peak_job_rss = 0
        self.peak_hosts_rss = 0
        self.peak_live = 0
        self.latest: dict[str, Any] = {}

    def sample(self) -> dict[str, Any]:
        """Take one sample, append it to the file and return it."""
        now = time.time()
        controller = ray.get(self._controller.status.remote(), timeout=30)
        ingestors = _gather([ingestor.status.remote() for ingestor in self._ingestors])
        hosts = controller["hosts"]
        durable = sum(_durable(status) for status in ingestors)
        rate = 0.0
        if self._previous is not None and now > self._previous[0]:
            rate = (durable - self._previous[1]) / (now - self._previous[0])
        host_rates = self._host_rates(hosts, now)
        self._previous = (now, durable)
        live = sum(h.get("live_aggregates", 0) for h in hosts.values())
        hosts_rss = sum(h.get("rss_bytes", 0) for h in hosts.values())
        job_rss = process_tree_rss(os.getpid(), self._exclude)
        sample = {
            "time": now,
            "elapsed_s": now - self._started,
            "label": self._label,
            "live_aggregates": live,
            "hibernated_aggregates": sum(
                h.get("hibernated_aggregates", 0) for h in hosts.values()
            ),
            "hosts_rss_bytes": hosts_rss,
            "job_rss_bytes": job_rss,
            "durable_commands": durable,
            "commands_per_s": rate,
            "lag": sum(_lag(status) for status in ingestors),
            "lag_by_partition": _lag_by_partition(ingestors),
            "paused_partitions": sum(
                len(status.get("paused_partitions") or ()) for status in ingestors
            ),
            "held_commands": sum(s.get("held_commands", 0) for s in ingestors),
            "hosts": {
                host_id: {
                    "live_aggregates": h.get("live_aggregates", 0),
                    "hibernated_aggregates": h.get("hibernated_aggregates", 0),
                    "rss_bytes": h.get("rss_bytes", 0),
                    "over_budget": h.get("over_budget_since") is not None,
                    "busy_fraction": h.get("busy_fraction", 0.0),
                    "executed_commands": _executed(h),
                    "commands_per_s": host_rates.get(host_id, 0.0),
                    "evictions": h.get("evictions", {}),
                }
                for host_id, h in hosts.items()
            },
        }
        self.peak_job_rss = max(self.peak_job_rss, job_rss)
        self.peak_hosts_rss = max(self.peak_hosts_rss, hosts_rss)
        self.peak_live = max(self.peak_live, live)
        self.latest = {
            "controller": controller,
            "ingestors": ingestors,
            "sample": sample,
        }
        with open(self.path, "a") as handle:
            handle.write(json.dumps(sample) + "\n")
        return sample

    def _host_rates(
        self, hosts: dict[str, dict[str, Any]], now: float
    ) -> dict[str, float]:
        """Return each host's executed commands per second since the last sample.

        A host first seen in this sample (started or replaced since) gets 0.
        """
        elapsed = now - self._previous[0] if self._previous is not None else 0.0
        rates = {}
        for host_id, status in hosts.items():
            executed = _executed(status)
            before = self._previous_hosts.get(host_id)
            is_known = before is not None and elapsed > 0 and executed >= before
            rates[host_id] = (executed - before) / elapsed if is_known else 0.0
        self._previous_hosts = {host_id: _executed(h) for host_id, h in hosts.items()}
        return rates


def evictions_by_reason(controller_status: dict[str, Any]) -> dict[str, int]:
    """Sum evictions over hosts, with aggregates lost to recycled hosts."""
    total: Counter[str] = Counter()
    for host in controller_status.get("hosts", {}).values():
        total.update(host.get("evictions", {}))
    total.update(controller_status.get("host_evictions", {}))
    return dict(total)


def _gather(refs: list[Any]) -> list[dict[str, Any]]:
    results = []
    for ref in refs:
        try:
            results.append(ray.get(ref, timeout=30))
        except Exception:
            results.append({})
    return results


def _durable(status: dict[str, Any]) -> int:
    return int(
        sum(
            status.get(key, 0)
            for key in ("appended", "rejected", "duplicates", "dead_letters")
        )
    )


def _executed(host_status: dict[str, Any]) -> int:
    counters = host_status.get("counters", {})
    names = ("commands", "rejected", "duplicates")
    return int(sum(counters.get(name, 0) for name in names))


def _lag_by_partition(ingestors: list[dict[str, Any]]) -> dict[str, int]:
    lags: dict[str, int] = {}
    for status in ingestors:
        for partition, lag in (status.get("lag") or {}).items():
            if isinstance(lag, (int, float)):
                lags[partition] = int(lag)
    return lags


def _lag(status: dict[str, Any]) -> int:
    lag = status.get("lag", {})
    if isinstance(lag, dict):
        return int(sum(v for v in lag.values() if isinstance(v, (int, float))))
    return int(lag or 0)


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """Return the samples recorded in a ``samples.jsonl`` file."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
