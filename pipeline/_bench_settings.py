"""Settings of ``raysource bench`` and the job configuration of each run.

Contains the workload and lifespan constants, ``BenchSettings``, the
command that repeats a bench, and ``job_config``, which builds one streaming
run's ``JobConfig``. Imports only the standard library at module level, and
``pipeline.config`` inside ``job_config``.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def reset_dir(path: Path) -> None:
    """Delete ``path`` with everything in it and create it again, empty."""
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
