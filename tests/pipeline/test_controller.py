"""The controller on the session's local Ray: hosts, assignment, replacement, scaling.

Every test turns the controller's own loop down to one tick an hour and calls
``reconcile`` itself, so each decision happens at a known moment.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError

from pipeline.config import JobConfig
from pipeline.controller import Assignment
from pipeline.dispatch import Dispatcher
from pipeline.protocol import APPENDED
from tests.pipeline.conftest import (
    NUM_SHARDS,
    assert_store_matches_fold,
    batch_items,
    count_statuses,
    job_config,
    sqlite_url,
    wait_until,
    workload,
)

StartJob = Callable[[JobConfig], Any]

MANUAL_TICKS = {"reconcile_interval_s": 3600.0}


def assignment_of(controller: Any) -> Assignment:
    return ray.get(controller.get_assignment.remote())


def history_of(controller: Any) -> list[dict[str, Any]]:
    return ray.get(controller.status.remote())["history"]


def shards_by_host(assignment: Assignment) -> dict[str, set[int]]:
    owned: dict[str, set[int]] = {}
    for shard, host_id in enumerate(assignment.shard_hosts):
        owned.setdefault(host_id, set()).add(shard)
    return owned


def assert_covers_every_shard(assignment: Assignment) -> None:
    assert len(assignment.shard_hosts) == NUM_SHARDS
    assert set(assignment.shard_hosts) <= set(assignment.hosts)


def wait_until_dead(handle: Any) -> None:
    def is_dead() -> bool:
        try:
            ray.get(handle.ping.remote(), timeout=5)
        except RayActorError:
            return True
        return False

    wait_until(is_dead, timeout_s=30)


def test_starts_min_hosts(start_job: StartJob, tmp_path: Path) -> None:
    """The controller starts min_hosts hosts and covers every shard at version 1."""
    config = job_config(
        tmp_path, hosts={**MANUAL_TICKS, "min_hosts": 2, "max_hosts": 3}
    )

    controller = start_job(config)

    assignment = assignment_of(controller)
    assert assignment.version == 1
    assert sorted(assignment.hosts) == ["host-1", "host-2"]
    assert_covers_every_shard(assignment)
    assert set(assignment.shard_hosts) == {"host-1", "host-2"}
    assert sorted(ray.get(controller.status.remote())["hosts"]) == ["host-1", "host-2"]


def test_dead_host_replaced(start_job: StartJob, tmp_path: Path) -> None:
    """A killed host is replaced, and its shards, and only those, go to the new host."""
    config = job_config(
        tmp_path, hosts={**MANUAL_TICKS, "min_hosts": 2, "max_hosts": 2}
    )
    controller = start_job(config)
    before = assignment_of(controller)
    victim = before.hosts["host-1"]

    ray.kill(victim)
    wait_until_dead(victim)
    ray.get(controller.reconcile.remote())

    after = assignment_of(controller)
    assert after.version == before.version + 1
    assert sorted(after.hosts) == ["host-2", "host-3"]
    assert_covers_every_shard(after)
    assert shards_by_host(after)["host-3"] == shards_by_host(before)["host-1"]
    assert shards_by_host(after)["host-2"] == shards_by_host(before)["host-2"]
    [entry] = history_of(controller)
    assert entry["decision"] == "host died"
    assert entry["replaced"] == "host-1"
    assert entry["host"] == "host-3"

    sent = workload(num_shops=20, num_commands=100)
    results = Dispatcher(controller).dispatch(batch_items(sent))
    assert all(result.is_durable for result in results)
    assert_store_matches_fold(sqlite_url(tmp_path), str(tmp_path / "snapshots"), sent)


def test_over_budget_host_recycled(start_job: StartJob, tmp_path: Path) -> None:
    """A host that stays over its memory budget is restarted with the same shards."""
    hosts = {
        **MANUAL_TICKS,
        "min_hosts": 1,
        "max_hosts": 1,
        "memory_budget_bytes": 1,
        "recycle_after_s": 0.0,
    }
    controller = start_job(job_config(tmp_path, hosts=hosts))
    dispatcher = Dispatcher(controller)
    first = workload(num_shops=10, num_commands=60)
    assert all(r.is_durable for r in dispatcher.dispatch(batch_items(first)))

    ray.get(controller.reconcile.remote())

    assignment = assignment_of(controller)
    assert assignment.version == 2
    assert sorted(assignment.hosts) == ["host-2"]
    assert set(assignment.shard_hosts) == {"host-2"}
    status = ray.get(controller.status.remote())
    [entry] = status["history"]
    assert entry["decision"] == "host recycled"
    assert entry["replaced"] == "host-1"
    assert entry["rss_bytes"] > 1
    assert "host_recycled" in status["host_evictions"]

    # The recycled job goes on from the store: later commands see earlier state.
    second = workload(num_shops=10, num_commands=120)[60:]
    assert all(
        r.is_durable for r in Dispatcher(controller).dispatch(batch_items(second))
    )
    assert_store_matches_fold(
        sqlite_url(tmp_path), str(tmp_path / "snapshots"), first + second
    )


def test_scales_up_then_down(start_job: StartJob, tmp_path: Path) -> None:
    """Saturated hosts gain a host, and an empty host idle past its timeout stops.

    saturation_fraction = 0 makes every host count as saturated, so the first
    tick adds a host. A later tick, once both are idle, stops one of them.
    """
    hosts = {
        **MANUAL_TICKS,
        "min_hosts": 1,
        "max_hosts": 2,
        "saturation_fraction": 0.0,
        "idle_timeout_s": 3.0,
    }
    controller = start_job(job_config(tmp_path, hosts=hosts))

    ray.get(controller.reconcile.remote())

    assert history_of(controller)[0]["decision"] == "scaled up"
    scaled_up = assignment_of(controller)
    assert scaled_up.version >= 2

    def stopped_one() -> bool:
        ray.get(controller.reconcile.remote())
        return any(
            e["decision"] == "host idle, stopped" for e in history_of(controller)
        )

    wait_until(stopped_one, timeout_s=30, interval_s=0.5)
    after = assignment_of(controller)
    assert after.version > scaled_up.version
    assert len(after.hosts) == 1
    assert_covers_every_shard(after)
    [remaining] = after.hosts
    assert set(after.shard_hosts) == {remaining}

    sent = workload(num_shops=10, num_commands=50)
    results = Dispatcher(controller).dispatch(batch_items(sent))
    assert set(count_statuses(results)) <= {APPENDED, "rejected"}


def test_placement_options_reach_hosts(start_job: StartJob, tmp_path: Path) -> None:
    """num_cpus, memory_bytes and resources are what Ray reserves for each host."""
    node_resource = f"node:{ray.util.get_node_ip_address()}"
    memory_bytes = 123 * 1024 * 1024
    hosts = {
        **MANUAL_TICKS,
        "min_hosts": 2,
        "max_hosts": 2,
        "num_cpus": 0.75,
        "memory_bytes": memory_bytes,
        "resources": {node_resource: 0.03},
    }
    expected = {"CPU": 1.5, "memory": 2 * memory_bytes, node_resource: 0.06}

    start_job(job_config(tmp_path, hosts=hosts))

    def reserved() -> dict[str, float]:
        total, available = ray.cluster_resources(), ray.available_resources()
        return {
            name: round(total[name] - available.get(name, 0.0), 4) for name in expected
        }

    # Ray publishes available resources with a short delay.
    deadline = time.monotonic() + 15
    while reserved() != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert reserved() == expected
