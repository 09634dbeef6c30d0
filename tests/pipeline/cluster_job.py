"""Run a job on a two-node Ray cluster on this machine and print where its hosts ran.

Run by ``test_cluster.py`` in a subprocess, because a process joins one Ray
instance only and the test process already has the session's local Ray::

    python -m tests.pipeline.cluster_job DATABASE_URL SNAPSHOT_DIR \
        NUM_SHOPS NUM_COMMANDS

It starts a head and one more node with ``ray.cluster_utils.Cluster``. On
them it starts the controller with ``hosts.spread = true`` and two hosts, and
dispatches the reference workload. The last line of stdout is one JSON object
with ``node_ids`` (the cluster's nodes), ``host_nodes`` (host id to node id),
``statuses`` (results counted by status) and ``num_results``. The cluster is
shut down before the script exits, whether the job succeeded or not.

The caller sets RAY_TMPDIR to a fresh folder, so this cluster's sessions and
address file stay apart from every other Ray instance on the machine, and
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, so its nodes bind to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from typing import Any

import ray
from ray.cluster_utils import Cluster

from aggregates import Shop
from aggregates.workload import generate_commands
from pipeline.config import config_from_dict
from pipeline.dispatch import Dispatcher
from pipeline.protocol import BatchItem
from pipeline.runtime import start_controller, stop_controller

NAMESPACE = "raysource-cluster-test"
CPUS_PER_NODE = 2
BATCH_SIZE = 100


def run_job(
    database_url: str, snapshot_dir: str, num_shops: int, num_commands: int
) -> dict[str, Any]:
    """Start the controller on the connected cluster and dispatch the workload.

    Returns the report that ``main`` prints.
    """
    config = config_from_dict(
        {
            "ray": {"namespace": NAMESPACE},
            "store": {"database_url": database_url, "snapshot_url": snapshot_dir},
            "hosts": {"num_shards": 8, "min_hosts": 2, "max_hosts": 2, "spread": True},
        }
    )
    controller = start_controller(config)
    try:
        assignment = ray.get(controller.get_assignment.remote())
        host_nodes = {
            host_id: ray.get(handle.status.remote())["node_id"]
            for host_id, handle in assignment.hosts.items()
        }
        commands = [
            Shop.command_from_message(m)
            for m in generate_commands(num_shops, num_commands)
        ]
        dispatcher = Dispatcher(controller)
        statuses: Counter[str] = Counter()
        for start in range(0, len(commands), BATCH_SIZE):
            items = [BatchItem("Shop", c) for c in commands[start : start + BATCH_SIZE]]
            statuses.update(result.status for result in dispatcher.dispatch(items))
    finally:
        stop_controller(controller)
    return {
        "node_ids": sorted(node["NodeID"] for node in ray.nodes() if node["Alive"]),
        "host_nodes": host_nodes,
        "statuses": dict(statuses),
        "num_results": sum(statuses.values()),
    }


def main(argv: list[str]) -> int:
    database_url, snapshot_dir, num_shops, num_commands = argv
    for name in ("RAY_USAGE_STATS_ENABLED", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        os.environ.setdefault(name, "0")
    head = {"num_cpus": CPUS_PER_NODE, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        cluster.add_node(num_cpus=CPUS_PER_NODE)
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        cluster.wait_for_nodes()
        report = run_job(database_url, snapshot_dir, int(num_shops), int(num_commands))
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
