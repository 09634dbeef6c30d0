"""Ray instances of their own: a two-node cluster, and a local Ray from init_ray.

Each runs in a subprocess with its own Ray temp folder, because a process joins
one Ray instance only, and this one is on the session's local Ray. On the
cluster (``tests/pipeline/cluster_job.py``), spread hosts must land on both
nodes and the store must match an in-process fold.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.pipeline.conftest import assert_store_matches_fold, sqlite_url, workload

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_SHOPS = 50
NUM_COMMANDS = 1000
JOB_TIMEOUT_S = 180


@pytest.fixture
def ray_temp_dir() -> Iterator[str]:
    """Yield a fresh Ray temp folder, then kill any process still using it.

    The folder is short because Ray puts Unix sockets under it, and a socket
    path may not exceed 107 bytes.
    """
    folder = tempfile.mkdtemp(prefix="rs-", dir="/tmp")

    yield folder

    # Ray's servers name the folder on their command lines (session and log
    # paths). Workers rename their process titles, so they are found as the
    # servers' children.
    leftovers = processes_using(folder)
    for process in leftovers:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    shutil.rmtree(folder, ignore_errors=True)
    assert leftovers == [], f"cluster processes outlived the job: {leftovers}"


def processes_using(folder: str) -> list[psutil.Process]:
    """Return the processes naming ``folder`` on their command line, and children."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        if folder in " ".join(process.info["cmdline"] or []):
            found[process.pid] = process
            try:
                found.update(
                    {child.pid: child for child in process.children(recursive=True)}
                )
            except psutil.NoSuchProcess:
                pass
    return list(found.values())


def run_python(
    arguments: list[str], ray_temp_dir: str, environment: dict[str, str]
) -> dict[str, Any]:
    """Run ``python ARGUMENTS`` in the repository and return the JSON it prints last.

    ``environment`` is the whole environment of the child, to which
    RAY_TMPDIR is added. A child still running after JOB_TIMEOUT_S is killed
    with its process group.
    """
    command = [sys.executable, *arguments]
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env={**environment, "RAY_TMPDIR": ray_temp_dir},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(
            f"timed out after {JOB_TIMEOUT_S} s: {' '.join(command)}\n{stderr[-3000:]}"
        )
    if process.returncode != 0:
        pytest.fail(
            f"exited with {process.returncode}: {' '.join(command)}\n{stderr[-3000:]}"
        )
    report: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return report


def loopback_environment() -> dict[str, str]:
    """Return this environment with Ray kept on loopback and off any cluster."""
    environment = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    environment.pop("RAY_ADDRESS", None)
    return environment


def test_spread_hosts_on_two_nodes(tmp_path: Path, ray_temp_dir: str) -> None:
    arguments = [
        "-m",
        "tests.pipeline.cluster_job",
        sqlite_url(tmp_path),
        str(tmp_path / "snapshots"),
        str(NUM_SHOPS),
        str(NUM_COMMANDS),
    ]

    report = run_python(arguments, ray_temp_dir, loopback_environment())

    node_ids = report["node_ids"]
    host_nodes = report["host_nodes"]
    assert isinstance(node_ids, list)
    assert isinstance(host_nodes, dict)
    assert len(node_ids) == 2
    assert sorted(host_nodes.values()) == sorted(node_ids)
    assert report["num_results"] == NUM_COMMANDS
    statuses = report["statuses"]
    assert isinstance(statuses, dict)
    assert set(statuses) <= {"appended", "rejected"}
    assert_store_matches_fold(
        sqlite_url(tmp_path),
        str(tmp_path / "snapshots"),
        workload(NUM_SHOPS, NUM_COMMANDS, note_bytes=2048),
    )


# Starts Ray through init_ray with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER unset, and
# prints the node address and every address a process of that Ray listens on.
# Ray's lookup of an outward address is replaced by an error first, so a
# regression fails here without Ray ever binding outside loopback.
INIT_RAY_SCRIPT = """
import json, os, sys
import psutil, ray
from ray._private import services

def reject_outward_lookup(*args, **kwargs):
    raise RuntimeError("Ray looked up an outward node address")

services.node_ip_address_from_perspective = reject_outward_lookup
from pipeline.config import RayConfig
from pipeline.runtime import init_ray

init_ray(RayConfig(num_cpus=1))
try:
    node_address = ray.nodes()[0]["NodeManagerAddress"]
    folder = os.environ["RAY_TMPDIR"]
    pids = {os.getpid()}
    for process in psutil.process_iter(["cmdline"]):
        if folder in " ".join(process.info["cmdline"] or []):
            pids.add(process.pid)
            pids.update(child.pid for child in process.children(recursive=True))
    listening = sorted({
        connection.laddr.ip
        for connection in psutil.net_connections("inet")
        if connection.status == psutil.CONN_LISTEN and connection.pid in pids
    })
finally:
    ray.shutdown()
print(json.dumps({"node_address": node_address, "listening": listening}))
"""


def test_init_ray_stays_on_loopback(ray_temp_dir: str) -> None:
    """init_ray keeps a local Ray on 127.0.0.1 even after ``import ray`` ran first."""
    environment = loopback_environment()
    del environment["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]

    report = run_python(["-c", INIT_RAY_SCRIPT], ray_temp_dir, environment)

    assert report["node_address"] == "127.0.0.1"
    assert report["listening"] != []
    assert set(report["listening"]) <= {"127.0.0.1", "::ffff:127.0.0.1"}
