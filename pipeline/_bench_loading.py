"""The load part of ``raysource bench``: one long Shop stream, loaded two ways.

``measure_load`` times a full replay against a load from a snapshot and
measures both with tracemalloc. Imports only the standard library and the
other bench modules at module level, and the aggregates and store packages
inside the functions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline._bench_figures import ratio_or_none, spread
from pipeline._bench_settings import SHOP_TYPE, WORKLOAD_SEED, reset_dir


def measure_load(
    work_dir: Path,
    num_events: int,
    snapshot_every: int,
    runs: int,
    note_bytes: int = 2048,
) -> dict[str, Any]:
    """Time loading a Shop of ``num_events`` events by full replay and from a snapshot.

    The stream is built from workload commands for a single shop, on SQLite.
    Its latest snapshot is ``snapshot_every - 1`` events behind the head, the
    most that policy leaves to replay. Each mode is loaded once untimed (warm
    caches), then ``runs`` times against a clock, then once more under
    tracemalloc for its peak of Python allocations. That last load is not
    timed, because tracemalloc slows it.
    """
    import tracemalloc

    from aggregates.shop import Shop
    from store.event_store import EventStore
    from store.loading import load_aggregate
    from store.snapshot_store import SnapshotStore

    reset_dir(work_dir)
    store = EventStore(f"sqlite:///{work_dir / 'load.db'}")
    snapshots = SnapshotStore(str(work_dir / "snapshots"))
    snapshot_at = max(num_events - (snapshot_every - 1), 1)
    started = time.perf_counter()
    aggregate_id = build_long_stream(
        store, snapshots, num_events, snapshot_at, note_bytes
    )
    results: dict[str, Any] = {
        "num_events": num_events,
        "snapshot_every": snapshot_every,
        "snapshot_at_version": snapshot_at,
        "note_bytes": note_bytes,
        "database": "sqlite",
        "build_s": time.perf_counter() - started,
    }
    states = {}
    try:
        for mode, snapshot_store in (
            ("full_replay", None),
            ("from_snapshot", snapshots),
        ):

            def load(snapshot_store: Any = snapshot_store) -> Any:
                return load_aggregate(Shop, aggregate_id, store, snapshot_store)

            load()
            seconds = []
            for _ in range(runs):
                started = time.perf_counter()
                loaded = load()
                seconds.append(time.perf_counter() - started)
            tracemalloc.start()
            load()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            if loaded.aggregate.version != num_events:
                version = loaded.aggregate.version
                msg = f"{mode} loaded version {version}, expected {num_events}"
                raise RuntimeError(msg)
            states[mode] = loaded.aggregate.snapshot_state()
            results[mode] = {
                "seconds": spread(seconds),
                "peak_traced_bytes": peak,
                "events_replayed": loaded.events_replayed,
            }
    finally:
        store.close()
    results["states_equal"] = states["full_replay"] == states["from_snapshot"]
    if not results["states_equal"]:
        msg = "the Shop loaded from its snapshot differs from the one fully replayed"
        raise RuntimeError(msg)
    results["speedup"] = ratio_or_none(
        results["full_replay"]["seconds"]["median"],
        results["from_snapshot"]["seconds"]["median"],
    )
    results["memory_ratio"] = ratio_or_none(
        results["full_replay"]["peak_traced_bytes"],
        results["from_snapshot"]["peak_traced_bytes"],
    )
    return results


def build_long_stream(
    store: Any, snapshots: Any, num_events: int, snapshot_at: int, note_bytes: int
) -> str:
    """Append one shop's workload commands until its stream has ``num_events`` events.

    Rejected commands are recorded as a host records them. The state at
    version ``snapshot_at`` is saved as a snapshot. Returns the shop's id.
    """
    from aggregates.errors import DomainError
    from aggregates.shop import Shop
    from aggregates.workload import generate_commands, shop_id
    from store.event_store import CommandRecord
    from store.loading import snapshot_of

    # Each command adds one event or is rejected (2 % are), so twice as many
    # commands as events is more than the stream needs.
    commands = generate_commands(1, 2 * num_events + 100, WORKLOAD_SEED, note_bytes)
    aggregate = Shop(shop_id(1))
    snapshot_version = Shop.snapshot_policy.snapshot_version
    records: list[CommandRecord] = []
    for message in commands:
        if aggregate.version >= num_events:
            break
        command = Shop.command_from_message(message)
        version = aggregate.version
        try:
            events = aggregate.execute(command)
        except DomainError as error:
            records.append(
                CommandRecord(
                    command.command_id,
                    SHOP_TYPE,
                    aggregate.aggregate_id,
                    version,
                    (),
                    str(error),
                )
            )
            continue
        for event in events:
            aggregate.apply(event)
        records.append(
            CommandRecord(
                command.command_id, SHOP_TYPE, aggregate.aggregate_id, version, events
            )
        )
        if aggregate.version == snapshot_at:
            snapshots.save(snapshot_of(aggregate, snapshot_version))
        if len(records) >= 1000:
            store.append(records)
            records = []
    store.append(records)
    if aggregate.version != num_events:
        msg = (
            f"the workload ran out after {aggregate.version} events, "
            f"expected {num_events}"
        )
        raise RuntimeError(msg)
    return aggregate.aggregate_id
