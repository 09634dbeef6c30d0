"""Snapshot rebuild: a fresh snapshot of every aggregate of one type.

``rebuild_snapshots`` is the work of ``raysource rebuild-snapshots``. It
splits the aggregate ids into chunks and runs ``rebuild_chunk`` on each, as
Ray tasks or in this process. Ray and the stores are imported only inside
functions, so that ``raysource --help`` stays fast. May import ``store`` and
the rest of ``pipeline``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pipeline._backfill_progress import ProgressCallback
from pipeline._backfill_workers import resolve_num_workers
from pipeline.config import ConfigError, JobConfig

__all__ = ["RebuildRunner", "rebuild_chunk", "rebuild_snapshots"]

logger = logging.getLogger(__name__)

_REBUILD_CHUNK_IDS = 200


def rebuild_snapshots(
    config: JobConfig,
    aggregate_type: str,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Write a snapshot at the configured snapshot_version of every aggregate of a type.

    Each aggregate is loaded with that snapshot_version, so snapshots of other
    versions are ignored and its whole stream is replayed (a snapshot already
    at the new version is used). The new snapshot replaces the others. The ids
    are split into chunks run as Ray tasks, at most ``workers`` at a time
    (default: the CPUs Ray reports); 0 runs everything in this process.
    ``progress`` receives aggregates_done, elapsed_s and aggregates_per_s.

    Returns aggregates, written, already_current (a snapshot of that stream
    version existed), failed, events_replayed, snapshot_version, elapsed_s
    and workers (0 in this process).
    Raises ConfigError when the type is not configured.
    """
    from store.event_store import EventStore

    settings = config.aggregates.get(aggregate_type)
    if settings is None:
        known = ", ".join(sorted(config.aggregates))
        msg = (
            f"aggregate type {aggregate_type!r} is not configured; configured: {known}"
        )
        raise ConfigError(msg)
    if workers is not None and workers < 0:
        msg = f"workers must be at least 0, got {workers}"
        raise ValueError(msg)

    run: RebuildRunner
    if workers == 0:
        num_tasks, run = 0, _local_rebuild
    else:
        num_tasks = resolve_num_workers(config, workers)
        run = _ray_rebuild(num_tasks)
    started = time.monotonic()
    totals: Counter[str] = Counter()
    events = EventStore(config.store.database_url)
    try:
        ids = events.iter_aggregate_ids(aggregate_type, page_size=_REBUILD_CHUNK_IDS)
        for figures in run(config, aggregate_type, _chunks(ids, _REBUILD_CHUNK_IDS)):
            totals.update(figures)
            if progress is not None:
                elapsed = time.monotonic() - started
                progress(
                    {
                        "aggregates_done": totals["aggregates"],
                        "elapsed_s": elapsed,
                        "aggregates_per_s": totals["aggregates"] / elapsed
                        if elapsed
                        else 0.0,
                    }
                )
    finally:
        events.close()

    elapsed = time.monotonic() - started
    summary = {
        "aggregate_type": aggregate_type,
        "snapshot_version": settings.snapshot_version,
        "aggregates": totals["aggregates"],
        "written": totals["written"],
        "already_current": totals["already_current"],
        "failed": totals["failed"],
        "events_replayed": totals["events_replayed"],
        "elapsed_s": elapsed,
        "workers": num_tasks,
    }
    logger.info(
        "snapshots rebuilt aggregate=%s snapshot_version=%d aggregates=%d "
        "written=%d failed=%d",
        aggregate_type,
        settings.snapshot_version,
        summary["aggregates"],
        summary["written"],
        summary["failed"],
    )
    return summary


RebuildRunner = Callable[
    [JobConfig, str, Iterator[list[str]]], Iterator[dict[str, int]]
]


def _local_rebuild(
    config: JobConfig, aggregate_type: str, chunks: Iterator[list[str]]
) -> Iterator[dict[str, int]]:
    for chunk in chunks:
        yield rebuild_chunk(config, aggregate_type, chunk)


def _ray_rebuild(num_tasks: int) -> RebuildRunner:
    import ray

    task = ray.remote(num_cpus=1)(rebuild_chunk)

    def run(
        config: JobConfig, aggregate_type: str, chunks: Iterator[list[str]]
    ) -> Iterator[dict[str, int]]:
        config_ref = ray.put(config)
        in_flight: list[Any] = []
        for chunk in chunks:
            if len(in_flight) >= num_tasks:
                done, in_flight = ray.wait(in_flight, num_returns=1)
                yield ray.get(done[0])
            in_flight.append(task.remote(config_ref, aggregate_type, chunk))
        while in_flight:
            done, in_flight = ray.wait(in_flight, num_returns=1)
            yield ray.get(done[0])

    return run


def rebuild_chunk(
    config: JobConfig, aggregate_type: str, aggregate_ids: list[str]
) -> dict[str, int]:
    """Load each aggregate by full replay and save its snapshot; return the counts.

    An aggregate whose events cannot be applied (an applier raises) is counted
    as failed and logged; the others go on.
    """
    from pipeline.registry import AggregateRegistry
    from store.event_store import EventStore
    from store.loading import load_aggregate, snapshot_of
    from store.snapshot_store import SnapshotStore

    spec = AggregateRegistry.from_config(config.aggregates).get(aggregate_type)
    version = spec.snapshot_policy.snapshot_version
    events = EventStore(config.store.database_url, pool_size=1)
    snapshots = SnapshotStore(
        config.store.snapshot_url,
        config.store.snapshot_storage_options,
        config.store.snapshot_compression or None,
    )
    counts = Counter(
        {
            "aggregates": 0,
            "written": 0,
            "already_current": 0,
            "failed": 0,
            "events_replayed": 0,
        }
    )
    try:
        for aggregate_id in aggregate_ids:
            counts["aggregates"] += 1
            try:
                loaded = load_aggregate(
                    spec.cls,
                    aggregate_id,
                    events,
                    snapshots,
                    page_size=config.store.page_size,
                    snapshot_version=version,
                )
            except Exception:
                # Aggregate code that cannot fold its own stream fails this one only.
                logger.exception(
                    "aggregate cannot be loaded aggregate=%s/%s",
                    aggregate_type,
                    aggregate_id,
                )
                counts["failed"] += 1
                continue
            counts["events_replayed"] += loaded.events_replayed
            if snapshots.save(snapshot_of(loaded.aggregate, version)):
                counts["written"] += 1
            else:
                counts["already_current"] += 1
    finally:
        events.close()
    return dict(counts)


def _chunks(values: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for value in values:
        chunk.append(value)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
