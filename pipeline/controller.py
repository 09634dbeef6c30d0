"""Controller: places aggregate shards on hosts, and starts, stops and replaces hosts.

Aggregate ids hash to a fixed number of shards (``protocol.shard_of``); the
controller assigns every shard to one host and publishes the assignment with a
version number that grows on every change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from pipeline.aggregate_host import AggregateHostActor
from pipeline.config import JobConfig
from pipeline.logs import configure_logging
from pipeline.metrics import ControllerMetrics

logger = logging.getLogger(__name__)

CONTROLLER_NAME = "raysource-controller"
_HOST_START_TIMEOUT_S = 120.0
_STATUS_TIMEOUT_S = 5.0
_SLOW_TICK_S = 5.0


@dataclass(frozen=True)
class Assignment:
    """Assignment of shards to hosts at a version.

    ``shard_hosts[shard]`` is a host id; ``hosts`` maps host ids to actor handles.
    """

    version: int
    shard_hosts: list[str]
    hosts: dict[str, Any]


@dataclass
class _Host:
    host_id: str
    handle: Any
    shards: set[int]
    started_at: float = field(default_factory=time.time)
    status: dict[str, Any] = field(default_factory=dict)


class Controller:
    """Own placement: shards to hosts, host start, stop, replacement and recycling.

    Crash behaviour: the controller stores no data. If it dies, Ray also ends
    the hosts it owns, and batches in flight to them fail and are resent. A
    restarted controller starts fresh hosts (any old one still found by name is
    killed), so every aggregate is reloaded from the stores. ``reconcile`` and
    ``get_assignment`` are safe to repeat. Each step of a reconcile tick is
    guarded on its own, so one failing step never stops the loop.
    """

    def __init__(self, config: JobConfig, start_loop: bool = True) -> None:
        configure_logging("controller", config.log_level)
        self._config = config
        self._hosts_config = config.hosts
        self._lock = threading.RLock()
        self._hosts: dict[str, _Host] = {}
        self._version = 0
        self._next_host = 1
        self._history: deque[dict[str, Any]] = deque(maxlen=200)
        self.host_evictions: Counter[str] = Counter()
        self._metrics = ControllerMetrics(config.ray.namespace)
        self._stopping = threading.Event()
        self._kill_stale_hosts()
        num_hosts = self._hosts_config.min_hosts
        num_shards = self._hosts_config.num_shards
        shards_per_host: list[set[int]] = [set() for _ in range(num_hosts)]
        for shard in range(num_shards):
            shards_per_host[shard % num_hosts].add(shard)
        for shards in shards_per_host:
            self._start_host(shards)
        self._version = 1
        logger.info(
            "assignment published version=%d hosts=%d shards=%d",
            self._version,
            num_hosts,
            num_shards,
        )
        if start_loop:
            threading.Thread(target=self._loop, name="reconcile", daemon=True).start()

    # -- reading ---------------------------------------------------------------

    def get_assignment(self) -> Assignment:
        """Return the current assignment of shards to hosts."""
        with self._lock:
            shard_hosts = [""] * self._hosts_config.num_shards
            for host in self._hosts.values():
                for shard in host.shards:
                    shard_hosts[shard] = host.host_id
            handles = {host_id: host.handle for host_id, host in self._hosts.items()}
            return Assignment(self._version, shard_hosts, handles)

    def status(self) -> dict[str, Any]:
        """Return the assignment version, last status per host and recent decisions."""
        with self._lock:
            return {
                "assignment_version": self._version,
                "num_shards": self._hosts_config.num_shards,
                "hosts": {
                    host_id: {
                        **host.status,
                        "shards": len(host.shards),
                        "started_at": host.started_at,
                    }
                    for host_id, host in self._hosts.items()
                },
                "host_evictions": dict(self.host_evictions),
                "history": list(self._history),
            }

    def get_config(self) -> JobConfig:
        """Return the job's configuration, secrets included; mask them before output."""
        return self._config

    def host_handles(self) -> dict[str, Any]:
        """Return the actor handle of every host by id."""
        with self._lock:
            return {host_id: host.handle for host_id, host in self._hosts.items()}

    # -- reconciling -----------------------------------------------------------

    def reconcile(self) -> None:
        """Run one tick: refresh statuses, replace dead hosts, recycle, scale."""
        started = time.monotonic()
        with self._lock:
            for step in (
                self._refresh_statuses,
                self._recycle_over_budget,
                self._scale_up,
                self._scale_down,
            ):
                try:
                    step()
                except Exception:
                    logger.exception("reconcile step failed step=%s", step.__name__)
        elapsed = time.monotonic() - started
        if elapsed > _SLOW_TICK_S:
            logger.warning(
                "reconcile tick slow elapsed_s=%.1f; "
                "hosts may be overloaded or starting",
                elapsed,
            )

    def _loop(self) -> None:
        while not self._stopping.wait(self._hosts_config.reconcile_interval_s):
            self.reconcile()

    def _refresh_statuses(self) -> None:
        refs = {
            host_id: host.handle.status.remote()
            for host_id, host in self._hosts.items()
        }
        for host_id, ref in refs.items():
            try:
                self._hosts[host_id].status = ray.get(ref, timeout=_STATUS_TIMEOUT_S)
            except RayActorError:
                self._replace(host_id, "died")
            except GetTimeoutError:
                logger.warning("host status timed out host=%s", host_id)

    def _recycle_over_budget(self) -> None:
        now = time.time()
        for host_id, host in list(self._hosts.items()):
            since = host.status.get("over_budget_since")
            if since is not None and now - since >= self._hosts_config.recycle_after_s:
                self._replace(host_id, "recycled")

    def _scale_up(self) -> None:
        hosts = list(self._hosts.values())
        if len(hosts) >= self._hosts_config.max_hosts or not hosts:
            return
        threshold = self._hosts_config.saturation_fraction
        if not all(
            host.status.get("busy_fraction", 0.0) >= threshold for host in hosts
        ):
            return
        share = self._hosts_config.num_shards // (len(hosts) + 1)
        moved: set[int] = set()
        for host in sorted(hosts, key=lambda h: -len(h.shards)):
            take = sorted(host.shards)[: max(0, len(host.shards) - share)][
                : share - len(moved)
            ]
            if take:
                self._set_shards(host, host.shards - set(take))
                moved.update(take)
        new = self._start_host(moved)
        self._publish("scaled up", new.host_id)

    def _scale_down(self) -> None:
        if len(self._hosts) <= self._hosts_config.min_hosts:
            return
        for host_id, host in list(self._hosts.items()):
            status = host.status
            is_empty = (
                status.get("live_aggregates", 1) == 0
                and status.get("hibernated_aggregates", 1) == 0
            )
            if (
                is_empty
                and status.get("idle_s", 0.0) >= self._hosts_config.idle_timeout_s
            ):
                self._retire(host_id)
                return

    # -- changes -----------------------------------------------------------------

    def _start_host(self, shards: set[int]) -> _Host:
        host_id = f"host-{self._next_host}"
        self._next_host += 1
        options = self._host_options(host_id)
        handle = AggregateHostActor.options(**options).remote(
            host_id, self._config, sorted(shards)
        )
        ray.get(handle.ping.remote(), timeout=_HOST_START_TIMEOUT_S)
        host = _Host(host_id, handle, set(shards))
        self._hosts[host_id] = host
        logger.info("host started host=%s shards=%d", host_id, len(shards))
        return host

    def _host_options(self, host_id: str) -> dict[str, Any]:
        config = self._hosts_config
        options: dict[str, Any] = {
            "name": f"raysource-{host_id}",
            "num_cpus": config.num_cpus,
            "max_restarts": 0,
        }
        if config.memory_bytes:
            options["memory"] = config.memory_bytes
        if config.resources:
            options["resources"] = dict(config.resources)
        if config.spread:
            options["scheduling_strategy"] = "SPREAD"
        return options

    def _set_shards(self, host: _Host, shards: set[int]) -> None:
        # Runs after the batches already queued at the host: the fence of a move.
        ray.get(
            host.handle.set_shards.remote(sorted(shards)), timeout=_HOST_START_TIMEOUT_S
        )
        host.shards = set(shards)

    def _replace(self, host_id: str, reason: str) -> None:
        old = self._hosts.pop(host_id)
        # Copied first, because releasing the shards below empties ``old.shards``.
        shards = set(old.shards)
        status = old.status
        if reason == "recycled":
            num_live = status.get("live_aggregates", 0)
            logger.info(
                "host recycled host=%s rss=%s budget=%s live_aggregates=%d",
                host_id,
                status.get("rss_bytes"),
                status.get("memory_budget_bytes"),
                num_live,
            )
            self.host_evictions["host_recycled"] += num_live
            self._metrics.record_recycled(host_id, num_live)
            try:
                self._set_shards(old, set())
            except (RayActorError, GetTimeoutError):
                logger.warning(
                    "recycled host did not release its shards host=%s", host_id
                )
            _stop_actor(old.handle)
        else:
            logger.warning(
                "host %s, replacing it host=%s shards=%d", reason, host_id, len(shards)
            )
        new = self._start_host(shards)
        self._publish(
            f"host {reason}",
            new.host_id,
            replaced=host_id,
            rss_bytes=status.get("rss_bytes"),
            memory_budget_bytes=status.get("memory_budget_bytes"),
            live_aggregates=status.get("live_aggregates"),
        )

    def _retire(self, host_id: str) -> None:
        host = self._hosts.pop(host_id)
        # Copied first, because releasing the shards below empties ``host.shards``.
        shards = set(host.shards)
        self._set_shards(host, set())
        others = sorted(self._hosts.values(), key=lambda h: len(h.shards))
        for index, shard in enumerate(sorted(shards)):
            target = others[index % len(others)]
            target.shards.add(shard)
        for target in others:
            self._set_shards(target, target.shards)
        _stop_actor(host.handle)
        self._publish("host idle, stopped", host_id)

    def _publish(self, decision: str, host_id: str, **details: Any) -> None:
        self._version += 1
        entry = {
            "time": time.time(),
            "decision": decision,
            "host": host_id,
            "version": self._version,
            **details,
        }
        self._history.append(entry)
        logger.info(
            "assignment published version=%d decision=%s host=%s hosts=%d",
            self._version,
            decision,
            host_id,
            len(self._hosts),
        )

    def _kill_stale_hosts(self) -> None:
        """Kill hosts left by an earlier controller of the same namespace."""
        for number in range(1, 1 + 4 * self._hosts_config.max_hosts + 64):
            try:
                handle = ray.get_actor(f"raysource-host-{number}")
            except ValueError:
                continue
            logger.info("stale host killed host=host-%d", number)
            ray.kill(handle)

    # -- stopping ----------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the loop, let hosts write queued snapshots, and kill them."""
        self._stopping.set()
        with self._lock:
            for host in self._hosts.values():
                _stop_actor(host.handle)
            self._hosts.clear()
        logger.info("controller stopped")


def _stop_actor(handle: Any) -> None:
    try:
        ray.get(handle.shutdown.remote(), timeout=30)
    except Exception:
        logger.warning("host did not shut down cleanly; killing it", exc_info=True)
    ray.kill(handle)


ControllerActor = ray.remote(max_concurrency=8)(Controller)
