"""A host killed in the middle of a stream of commands loses and doubles nothing.

The reference workload (200 shops, 4,000 commands) goes through a Dispatcher in
batches while another thread kills one of the two hosts, once with
``ray.kill`` and once with SIGKILL to the host's worker process. The
controller's loop replaces the dead host and the Dispatcher resends what was
not durable. Afterwards the store must hold exactly what an in-process fold of
the same commands gives.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray

from aggregates import Command
from pipeline.config import JobConfig
from pipeline.dispatch import Dispatcher
from pipeline.protocol import CommandResult
from tests.pipeline.conftest import (
    assert_store_matches_fold,
    batch_items,
    job_config,
    sqlite_url,
    workload,
)

StartJob = Callable[[JobConfig], Any]

BATCH_SIZE = 100
# The kill is sent as the batch at this index is dispatched, about halfway.
KILL_AT_BATCH = 20
HOSTS = {"min_hosts": 2, "max_hosts": 2, "reconcile_interval_s": 0.2}
SHOP = {"snapshot_every": 20}


def dispatch_while_killing(
    controller: Any, commands: list[Command], kill: Callable[[], None]
) -> list[CommandResult]:
    """Dispatch ``commands`` in batches while another thread calls ``kill`` midway."""
    dispatcher = Dispatcher(controller, backoff_s=0.05, max_backoff_s=1.0)
    kill_now = threading.Event()

    def killer() -> None:
        kill_now.wait()
        kill()

    thread = threading.Thread(target=killer, name="killer")
    thread.start()
    results: list[CommandResult] = []
    try:
        for number, start in enumerate(range(0, len(commands), BATCH_SIZE)):
            if number == KILL_AT_BATCH:
                kill_now.set()
            results += dispatcher.dispatch(
                batch_items(commands[start : start + BATCH_SIZE])
            )
    finally:
        kill_now.set()
        thread.join()
    return results


def assert_host_replaced(controller: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Check that the dispatcher saw the host die and the controller replaced it."""
    died = [
        r
        for r in caplog.records
        if r.getMessage().startswith("host died during a batch")
    ]
    assert died != []
    history = ray.get(controller.status.remote())["history"]
    assert [(e["decision"], e["replaced"]) for e in history] == [
        ("host died", "host-1")
    ]


def test_ray_kill_mid_stream(
    start_job: StartJob, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ray.kill of a host while batches are in flight, over a SQLite store."""
    controller = start_job(job_config(tmp_path, hosts=HOSTS, shop=SHOP))
    victim = ray.get(controller.get_assignment.remote()).hosts["host-1"]
    commands = workload(num_shops=200, num_commands=4000, note_bytes=2048)

    results = dispatch_while_killing(controller, commands, lambda: ray.kill(victim))

    assert len(results) == len(commands)
    assert [r for r in results if not r.is_durable] == []
    assert_host_replaced(controller, caplog)
    assert_store_matches_fold(
        sqlite_url(tmp_path), str(tmp_path / "snapshots"), commands
    )


def test_sigkill_mid_stream(
    start_job: StartJob,
    tmp_path: Path,
    pg_database: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGKILL to a host's worker process while batches are in flight, on PostgreSQL."""
    config = job_config(tmp_path, hosts=HOSTS, shop=SHOP, database_url=pg_database)
    controller = start_job(config)
    victim = ray.get(controller.get_assignment.remote()).hosts["host-1"]
    pid = ray.get(victim.status.remote())["pid"]
    assert pid != os.getpid()
    commands = workload(num_shops=200, num_commands=4000, note_bytes=2048)

    results = dispatch_while_killing(
        controller, commands, lambda: os.kill(pid, signal.SIGKILL)
    )

    assert len(results) == len(commands)
    assert [r for r in results if not r.is_durable] == []
    assert_host_replaced(controller, caplog)
    assert_store_matches_fold(pg_database, str(tmp_path / "snapshots"), commands)
