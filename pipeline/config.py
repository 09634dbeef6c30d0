"""Job configuration: one TOML file loaded into frozen, validated dataclasses.

Every setting has a default that runs on one machine. A wrong setting raises
ConfigError naming the setting, the value and what it accepts, before anything
starts. Each field's metadata carries its documentation, which ``raysource
config`` prints and the README reproduces.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregates.errors import RaysourceError
from aggregates.lifespan import parse_answer


class ConfigError(RaysourceError):
    """Reject a configuration: names the setting, the value and what it accepts."""


def setting(
    default: Any,
    doc: str,
    *,
    minimum: float | None = None,
    choices: tuple[Any, ...] | None = None,
) -> Any:
    """Declare a setting with its default, documentation and bounds."""
    meta = {"doc": doc, "minimum": minimum, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class KafkaConfig:
    """Kafka source settings and the bounds on ingestion."""

    bootstrap_servers: str = setting(
        "127.0.0.1:9092", "Kafka bootstrap servers, comma-separated host:port."
    )
    topics: list[str] = setting(["shop-commands"], "Topics to consume commands from.")
    group_id: str = setting("raysource", "Consumer group shared by all ingestors.")
    num_ingestors: int = setting(
        1, "KafkaIngestor actors in the consumer group.", minimum=1
    )
    max_poll_records: int = setting(2000, "Records fetched by one poll.", minimum=1)
    max_batch_commands: int = setting(
        1000, "Commands in one batch sent to a host.", minimum=1
    )
    max_batches_in_flight_per_host: int = setting(
        4,
        "Batches an ingestor may have unanswered at one host; at the bound it "
        "stops dispatching to that host.",
        minimum=1,
    )
    max_commands_held: int = setting(
        20_000,
        "Commands an ingestor may hold (decoded, queued or in flight); at "
        "the bound it pauses its partitions.",
        minimum=1,
    )
    resume_below_fraction: float = setting(
        0.5,
        "Paused partitions resume when held commands fall below this fraction "
        "of max_commands_held.",
        minimum=0.0,
    )
    max_message_bytes: int = setting(
        1_000_000, "Larger messages go to the dead letters.", minimum=1
    )
    decoder: str = setting(
        "",
        "Python callable 'module:function' mapping (topic, key, value) to a "
        "flat command dict; empty for JSON.",
    )
    dead_letter_topic: str = setting(
        "", "Topic that also receives dead letters; empty for the table only."
    )
    auto_offset_reset: str = setting(
        "earliest",
        "Where a group with no committed offset starts.",
        choices=("earliest", "latest"),
    )
    session_timeout_ms: int = setting(
        6000, "Consumer group session timeout, ms.", minimum=1000
    )
    heartbeat_interval_ms: int = setting(
        1000, "Consumer heartbeat interval, ms.", minimum=100
    )
    max_poll_interval_ms: int = setting(
        300_000,
        "Longest gap between polls before the group evicts a member, ms.",
        minimum=1000,
    )
    commit_interval_s: float = setting(
        1.0, "Seconds between offset commits.", minimum=0.0
    )
    retry_backoff_initial_s: float = setting(
        0.2, "First wait after a failed batch (store unavailable), s.", minimum=0.0
    )
    retry_backoff_max_s: float = setting(
        10.0, "Longest wait between retries, s.", minimum=0.0
    )
    drain_timeout_s: float = setting(
        20.0,
        "How long a revocation or shutdown waits for batches in flight, s; keep "
        "it below the rebalance timeout.",
        minimum=0.0,
    )


@dataclass(frozen=True)
class StoreConfig:
    """Locations of the event store and the snapshot store."""

    database_url: str = setting(
        "sqlite:///raysource.db",
        "SQLAlchemy URL of the event store; "
        "postgresql+psycopg://user@host/db for PostgreSQL.",
    )
    snapshot_url: str = setting(
        "snapshots",
        "fsspec URL of the snapshot store: a folder, s3://bucket/prefix, memory://x.",
    )
    snapshot_compression: str = setting(
        "", "'gzip' to compress snapshots.", choices=("", "gzip")
    )
    snapshot_storage_options: dict[str, Any] = setting(
        {},
        "Options for the snapshot filesystem "
        "(for S3: client_kwargs.endpoint_url, key, secret).",
    )
    page_size: int = setting(
        1000, "Events read per query when loading an aggregate.", minimum=1
    )


@dataclass(frozen=True)
class RayConfig:
    """Connection to Ray: a local instance or a cluster."""

    address: str = setting(
        "local",
        "'local' starts Ray in this process; 'auto' joins the running "
        "cluster; ray://host:port uses Ray Client.",
    )
    namespace: str = setting("raysource", "Ray namespace of the named controller.")
    num_cpus: int = setting(0, "CPUs of a local Ray; 0 means all.", minimum=0)
    include_dashboard: bool = setting(False, "Start Ray's dashboard with a local Ray.")
    dashboard_host: str = setting("127.0.0.1", "Address Ray's dashboard binds to.")
    log_to_driver: bool = setting(
        True, "Show the actors' log lines in the driver's output."
    )
    object_store_memory_bytes: int = setting(
        0, "Object store size of a local Ray; 0 lets Ray choose.", minimum=0
    )


@dataclass(frozen=True)
class HostsConfig:
    """Aggregate hosts: how many, where, and the bounds each one keeps."""

    num_shards: int = setting(
        256, "Shards aggregate ids hash to; fixed for a deployment.", minimum=1
    )
    min_hosts: int = setting(1, "Hosts kept running however idle.", minimum=1)
    max_hosts: int = setting(2, "Hosts the controller may run at once.", minimum=1)
    max_live_aggregates: int = setting(
        100_000,
        "Live aggregates per host; beyond it the least recently used are evicted.",
        minimum=1,
    )
    max_hibernated_aggregates: int = setting(
        1_000_000,
        "Hibernated aggregates per host; "
        "beyond it the least recently used are dropped.",
        minimum=0,
    )
    memory_budget_bytes: int = setting(
        4 * 1024**3,
        "Resident memory per host; above it the least recently used "
        "aggregates are evicted, and a host that stays above is recycled.",
        minimum=1,
    )
    recycle_after_s: float = setting(
        30.0,
        "Seconds a host may stay over its memory budget before it is recycled.",
        minimum=0.0,
    )
    idle_timeout_s: float = setting(
        300.0,
        "Seconds a host may hold no aggregate and receive no batch before it "
        "is stopped (down to min_hosts).",
        minimum=0.0,
    )
    saturation_fraction: float = setting(
        0.9,
        "A host busy this fraction of the last interval is saturated; when all "
        "are, a host is added (up to max_hosts).",
        minimum=0.0,
    )
    max_concurrent_loads: int = setting(
        4, "Aggregate loads a host runs at once.", minimum=1
    )
    max_conflict_retries: int = setting(
        5, "Times a batch is reloaded and retried after a version conflict.", minimum=0
    )
    reconcile_interval_s: float = setting(
        1.0, "Seconds between controller ticks.", minimum=0.05
    )
    idle_check_interval_s: float = setting(
        0.5, "Seconds between a host's checks for idle aggregates.", minimum=0.01
    )
    snapshot_queue_size: int = setting(
        10_000,
        "Snapshots waiting to be written per host; beyond it new ones are skipped.",
        minimum=1,
    )
    num_cpus: float = setting(0.5, "CPUs Ray reserves for each host.", minimum=0.0)
    memory_bytes: int = setting(
        0, "Memory Ray reserves for each host; 0 for none.", minimum=0
    )
    resources: dict[str, float] = setting(
        {}, "Custom Ray resources each host requires.", minimum=0.0
    )
    spread: bool = setting(False, "Spread hosts over the cluster's nodes.")


@dataclass(frozen=True)
class AggregateConfig:
    """One aggregate type: its class, lifespan and snapshot policy."""

    class_path: str = setting(
        "aggregates.shop:Shop", "Import path 'module:Class' of the aggregate."
    )
    after_event: str = setting(
        "60s", "Lifespan answer after a command produced events."
    )
    after_command: str = setting(
        "60s", "Lifespan answer after a command produced no events."
    )
    after_error: str = setting("60s", "Lifespan answer after a command was rejected.")
    lifespan_class: str = setting(
        "", "Import path of a Lifespan class; replaces the three answers above."
    )
    snapshot_every: int = setting(
        100, "Events between snapshots; 0 turns snapshots off.", minimum=0
    )
    snapshot_version: int = setting(
        1, "State shape version; bump it when the state changes shape.", minimum=1
    )


@dataclass(frozen=True)
class JobConfig:
    """The whole job."""

    work_dir: str = setting(
        "work", "Folder for run files: samples, logs, the demo's store."
    )
    sample_interval_s: float = setting(
        1.0, "Seconds between recorded samples.", minimum=0.05
    )
    log_level: str = setting(
        "INFO", "Logging level.", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    hosts: HostsConfig = field(default_factory=HostsConfig)
    aggregates: dict[str, AggregateConfig] = field(
        default_factory=lambda: {"Shop": AggregateConfig()}
    )

    def replace(self, **changes: Any) -> JobConfig:
        """Return a copy with top-level fields or whole sections replaced."""
        return dataclasses.replace(self, **changes)


_SECTIONS = {
    "kafka": KafkaConfig,
    "store": StoreConfig,
    "ray": RayConfig,
    "hosts": HostsConfig,
}


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    file_wins: bool = False,
) -> JobConfig:
    """Load and validate a TOML file merged with ``overrides``, a dict of that shape.

    ``overrides`` win over the file, unless ``file_wins`` makes them defaults
    that the file may change.
    """
    table: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                table = tomllib.load(handle)
        except FileNotFoundError as error:
            msg = f"configuration file {path} not found"
            raise ConfigError(msg) from error
        except tomllib.TOMLDecodeError as error:
            msg = f"configuration file {path} is not valid TOML: {error}"
            raise ConfigError(msg) from error
    if overrides:
        table = _merge(overrides, table) if file_wins else _merge(table, overrides)
    return config_from_dict(table)


def config_from_dict(table: Mapping[str, Any]) -> JobConfig:
    """Build a JobConfig from a dict shaped like the TOML file.

    Every value is validated.
    """
    sections = {
        name: _build(cls, table.get(name, {}), name) for name, cls in _SECTIONS.items()
    }
    aggregates = _build_aggregates(table.get("aggregates"))
    top = {k: v for k, v in table.items() if k not in _SECTIONS and k != "aggregates"}
    base = _build(JobConfig, top, "")
    config = dataclasses.replace(base, aggregates=aggregates, **sections)
    _check_consistency(config)
    return config


def _build_aggregates(table: Any) -> dict[str, AggregateConfig]:
    if table is None:
        return {"Shop": AggregateConfig()}
    if not isinstance(table, Mapping) or not table:
        msg = "aggregates must be a table of aggregate types, e.g. [aggregates.Shop]"
        raise ConfigError(msg)
    built = {}
    for name, section in table.items():
        entry = dict(section) if isinstance(section, Mapping) else section
        if isinstance(entry, dict) and "class" in entry:
            entry["class_path"] = entry.pop("class")
        config = _build(AggregateConfig, entry, f"aggregates.{name}")
        for answer in ("after_event", "after_command", "after_error"):
            try:
                parse_answer(getattr(config, answer), f"aggregates.{name}.{answer}")
            except ValueError as error:
                raise ConfigError(str(error)) from error
        built[name] = config
    return built


def _build(cls: type[Any], table: Any, prefix: str) -> Any:
    if not isinstance(table, Mapping):
        msg = f"{prefix or 'configuration'} must be a table, got {type(table).__name__}"
        raise ConfigError(msg)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("doc")}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        msg = f"{name} is not a setting; settings here: {', '.join(sorted(fields))}"
        raise ConfigError(msg)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in table.items():
        full = f"{prefix}.{name}" if prefix else name
        values[name] = _check_value(full, value, hints[name], fields[name].metadata)
    return cls(**values)


def _check_value(name: str, value: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(hint) or hint
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if origin is float and isinstance(value, float) and not math.isfinite(value):
        # TOML accepts nan and inf, which pass every minimum check.
        msg = f"{name} = {value!r} is invalid: expected a finite number"
        raise ConfigError(msg)
    expected = {list: list, dict: dict}.get(origin, origin)
    if isinstance(expected, types.UnionType) or not isinstance(expected, type):
        return value
    is_bool_mismatch = isinstance(value, bool) and expected is not bool
    if not isinstance(value, expected) or is_bool_mismatch:
        msg = f"{name} = {value!r} is invalid: expected {_type_name(expected)}"
        raise ConfigError(msg)
    if origin is list:
        item_type = typing.get_args(hint)[0]
        if not all(isinstance(item, item_type) for item in value):
            msg = (
                f"{name} = {value!r} is invalid: "
                f"expected a list of {_type_name(item_type)}"
            )
            raise ConfigError(msg)
    if origin is dict and typing.get_args(hint)[1:] == (float,):
        # Each value is checked like a float setting, against this setting's minimum.
        for key, item in value.items():
            _check_value(f"{name}.{key}", item, float, meta)
        return value
    minimum = meta.get("minimum")
    if minimum is not None and value < minimum:
        msg = f"{name} = {value!r} is invalid: expected at least {minimum}"
        raise ConfigError(msg)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        msg = f"{name} = {value!r} is invalid: expected one of {accepted}"
        raise ConfigError(msg)
    return value


def _type_name(expected: type) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }
    return names.get(expected, expected.__name__)


def _check_consistency(config: JobConfig) -> None:
    hosts = config.hosts
    if hosts.min_hosts > hosts.max_hosts:
        msg = (
            f"hosts.min_hosts = {hosts.min_hosts} is invalid: expected at most "
            f"hosts.max_hosts = {hosts.max_hosts}"
        )
        raise ConfigError(msg)
    if not config.kafka.topics:
        msg = "kafka.topics = [] is invalid: expected at least one topic"
        raise ConfigError(msg)
    dead_letter_topic = config.kafka.dead_letter_topic
    if dead_letter_topic and dead_letter_topic in config.kafka.topics:
        msg = (
            f"kafka.dead_letter_topic = {dead_letter_topic!r} is "
            "invalid: expected a topic not in kafka.topics, because the job "
            "would consume its own dead letters"
        )
        raise ConfigError(msg)
    if not 0 < config.kafka.resume_below_fraction <= 1:
        msg = (
            f"kafka.resume_below_fraction = {config.kafka.resume_below_fraction} is "
            "invalid: expected a fraction above 0 and at most 1"
        )
        raise ConfigError(msg)


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def describe_settings() -> list[tuple[str, str, str]]:
    """Return (setting, default, documentation) for every setting, in file order."""
    rows = []
    for prefix, cls in [
        ("", JobConfig),
        *_SECTIONS.items(),
        ("aggregates.<Type>", AggregateConfig),
    ]:
        for f in dataclasses.fields(cls):
            if not f.metadata.get("doc"):
                continue
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else f.default_factory()
            )  # type: ignore[misc]
            name = f"{prefix}.{f.name}" if prefix else f.name
            if cls is AggregateConfig and f.name == "class_path":
                name = f"{prefix}.class"
            rows.append((name, repr(default), f.metadata["doc"]))
    return rows
