"""Start or join Ray, and start, find or stop the job's controller."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from pipeline.config import JobConfig, RayConfig
from pipeline.controller import CONTROLLER_NAME, ControllerActor

logger = logging.getLogger(__name__)

# Set before Ray starts or is joined, unless the environment sets them. Ray's
# usage statistics are sent to an outside server unless switched off. On Linux,
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes a local Ray take 127.0.0.1 as its
# node address and bind its servers there, so a local instance serves loopback
# only. A process that joins needs the switch too. With the switch on, Ray
# replaces a loopback host in the address with this machine's outside address,
# where such an instance does not listen, so ray.init waits on the GCS until it
# times out. Other hosts are used as given either way (checked with Ray 2.60,
# in ray._private.services.resolve_ip_for_localhost).
_RAY_ENVIRONMENT = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def init_ray(config: RayConfig) -> None:
    """Start a local Ray or join a cluster, as ``config.address`` selects.

    Do nothing if Ray is already initialized.
    """
    if ray.is_initialized():
        return
    for name, value in _RAY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    _apply_cluster_switch()
    if config.address == "local":
        options: dict[str, Any] = {
            # "local" always starts a new instance. Without an address,
            # ray.init joins the instance whose address a `ray start` on this
            # machine left in the Ray temp folder.
            "address": "local",
            "namespace": config.namespace,
            "include_dashboard": config.include_dashboard,
            "dashboard_host": config.dashboard_host,
            "log_to_driver": config.log_to_driver,
        }
        if config.num_cpus:
            options["num_cpus"] = config.num_cpus
        if config.object_store_memory_bytes:
            options["object_store_memory"] = config.object_store_memory_bytes
        ray.init(**options)
    else:
        ray.init(address=config.address, namespace=config.namespace)
    logger.info(
        "ray started address=%s gcs_address=%s namespace=%s",
        config.address,
        ray.get_runtime_context().gcs_address,
        config.namespace,
    )


def _apply_cluster_switch() -> None:
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, into
    # ray._private.ray_constants.ENABLE_RAY_CLUSTER, when `import ray` runs, which
    # is before this module sets it. That constant is what picks the node address
    # (ray._private.services.get_node_ip_address in Ray 2.60), so it is updated too.
    from ray._private import ray_constants

    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        ray_constants.ENABLE_RAY_CLUSTER = False


def start_controller(config: JobConfig, detached: bool = False) -> Any:
    """Start the named controller, or return the running one of the namespace."""
    options: dict[str, Any] = {
        "name": CONTROLLER_NAME,
        "namespace": config.ray.namespace,
        "get_if_exists": True,
        "num_cpus": 0,
        "max_restarts": 0,
    }
    if detached:
        options["lifetime"] = "detached"
    return ControllerActor.options(**options).remote(config)


def find_controller(namespace: str) -> Any:
    """Return the running controller of ``namespace``; ValueError if there is none."""
    return ray.get_actor(CONTROLLER_NAME, namespace=namespace)


def stop_controller(controller: Any) -> None:
    """Shut the hosts down (queued snapshots are written) and kill the controller."""
    try:
        ray.get(controller.shutdown.remote(), timeout=120)
    finally:
        ray.kill(controller)
