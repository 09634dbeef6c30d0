"""AggregateHost as a plain object: lifespans, snapshots, bounds, outcomes, shards.

No Ray here: each host runs in the test process on a fake clock, with its idle
thread off, over a SQLite file in ``tmp_path`` (PostgreSQL where a test must make
the store unavailable).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aggregates import Aggregate, Command, Shop, fold_commands
from pipeline.aggregate_host import AggregateHost
from pipeline.protocol import (
    APPENDED,
    DUPLICATE,
    FAILED,
    NOT_OWNER,
    REJECTED,
    CommandResult,
    shard_of,
)
from store import EventStore, SnapshotStore
from tests.pipeline.conftest import (
    NUM_SHARDS,
    SHOP,
    FakeClock,
    ShopCommands,
    assert_store_matches_fold,
    batch,
    count_statuses,
    job_config,
    recorded_commands,
    set_connections_allowed,
    sqlite_url,
    stored_streams,
    workload,
)

MakeHost = Callable[..., AggregateHost]

STOP_ALWAYS = {"after_event": "stop", "after_command": "stop", "after_error": "stop"}
KEEP_ALWAYS = {
    "after_event": "infinity",
    "after_command": "infinity",
    "after_error": "infinity",
}


def execute(
    host: AggregateHost, *commands: Command, **request: Any
) -> list[CommandResult]:
    """Send ``commands`` as one batch and return the per-command results."""
    return host.execute_batch(batch(commands, **request)).results


def live_aggregate(host: AggregateHost, aggregate_id: str) -> Aggregate:
    # No public call returns a live aggregate's state, so this reads the host's table.
    return host._live[(SHOP, aggregate_id)].aggregate


def snapshot_versions(tmp_path: Path, aggregate_id: str) -> dict[int, list[int]]:
    return SnapshotStore(str(tmp_path / "snapshots")).list_versions(SHOP, aggregate_id)


def place_one_by_one(
    host: AggregateHost, commands: ShopCommands, shop_id: str, count: int
) -> list[Command]:
    """Place ``count`` orders, one batch each, and wait for snapshots after each."""
    placed = []
    for _ in range(count):
        command = commands.place(shop_id, f"o-{commands.count + 1}")
        assert execute(host, command)[0].status == APPENDED
        assert host.flush_snapshots()
        placed.append(command)
    return placed


class TestLifespans:
    def test_stop_evicts_after_batch(
        self, make_host: MakeHost, tmp_path: Path, commands: ShopCommands
    ) -> None:
        """STOP evicts once the batch is durable, and reloading changes no outcome."""
        host = make_host(job_config(tmp_path, shop=STOP_ALWAYS))
        sent = [
            commands.place("shop-1", "o-1"),
            commands.fulfil("shop-1", "o-1"),
            commands.cancel("shop-1", "o-1"),
            commands.place("shop-1", "o-2", 2_500),
        ]

        results = []
        for command in sent:
            results.extend(execute(host, command))
            assert host.status()["live_aggregates"] == 0

        fold = fold_commands(Shop, sent)
        expected = [
            REJECTED if c.command_id in fold.rejected else APPENDED for c in sent
        ]
        assert [r.status for r in results] == expected
        assert [r.last_version for r in results] == [1, 2, 0, 3]
        assert host.evictions["stop"] == 4
        # The first command finds no stream, so the aggregate starts empty
        # without a load; the other three are loaded from the store.
        assert host.counters["new_aggregates"] == 1
        assert host.counters["loads"] == 3
        assert_store_matches_fold(
            sqlite_url(tmp_path), str(tmp_path / "snapshots"), sent
        )

    def test_duration_evicts_when_idle(
        self,
        make_host: MakeHost,
        tmp_path: Path,
        clock: FakeClock,
        commands: ShopCommands,
    ) -> None:
        """A duration evicts after that long idle, and status() never moves it."""
        host = make_host(job_config(tmp_path, shop={"after_event": "30s"}))
        execute(host, commands.place("shop-1", "o-1"))

        clock.advance(29)
        assert host.evict_idle() == 0
        assert host.status()["live_aggregates"] == 1
        clock.advance(1)

        assert host.evict_idle() == 1
        assert host.status()["live_aggregates"] == 0
        assert host.evictions["idle"] == 1

    def test_command_resets_idle_clock(
        self,
        make_host: MakeHost,
        tmp_path: Path,
        clock: FakeClock,
        commands: ShopCommands,
    ) -> None:
        host = make_host(job_config(tmp_path, shop={"after_event": "30s"}))
        execute(host, commands.place("shop-1", "o-1"))
        clock.advance(20)
        execute(host, commands.fulfil("shop-1", "o-1"))

        clock.advance(29)
        assert host.evict_idle() == 0
        assert host.status()["live_aggregates"] == 1
        clock.advance(1)
        assert host.evict_idle() == 1
        assert host.status()["live_aggregates"] == 0

    def test_infinity_keeps_aggregate(
        self,
        make_host: MakeHost,
        tmp_path: Path,
        clock: FakeClock,
        commands: ShopCommands,
    ) -> None:
        host = make_host(job_config(tmp_path, shop=KEEP_ALWAYS))
        execute(host, commands.place("shop-1", "o-1"))

        clock.advance(10 * 365 * 24 * 3600)

        assert host.evict_idle() == 0
        assert host.status()["live_aggregates"] == 1
        assert dict(host.evictions) == {}

    def test_hibernate_restores_exact_state(
        self, make_host: MakeHost, tmp_path: Path, commands: ShopCommands
    ) -> None:
        """HIBERNATE keeps a compact form that restores without reading the store."""
        lifespan = {
            "after_event": "hibernate",
            "after_command": "hibernate",
            "after_error": "infinity",
        }
        host = make_host(job_config(tmp_path, shop=lifespan))
        placed = [
            commands.place("shop-1", "o-1"),
            commands.place("shop-1", "o-2", 2_500),
        ]
        execute(host, *placed)

        status = host.status()
        assert status["live_aggregates"] == 0
        assert status["hibernated_aggregates"] == 1
        assert host.evictions["hibernate"] == 1

        # A rejected command changes nothing, and after_error = infinity keeps the
        # aggregate live, so the restored state can be compared with the fold.
        results = execute(host, commands.cancel("shop-1", "o-missing"))
        assert results[0].status == REJECTED
        status = host.status()
        assert status["live_aggregates"] == 1
        assert status["hibernated_aggregates"] == 0
        assert host.counters["restores"] == 1
        assert host.counters["new_aggregates"] == 1
        assert host.counters["loads"] == 0
        assert host.counters["events_replayed"] == 0
        restored = live_aggregate(host, "shop-1")
        expected = fold_commands(Shop, placed).aggregates["shop-1"]
        assert restored.version == expected.version
        assert restored.snapshot_state() == expected.snapshot_state()

    def test_stop_with_three_commands_in_batch(
        self, make_host: MakeHost, tmp_path: Path, commands: ShopCommands
    ) -> None:
        """Three commands of one aggregate in one batch under STOP all succeed."""
        host = make_host(job_config(tmp_path, shop=STOP_ALWAYS))
        sent = [
            commands.place("shop-1", "o-1"),
            commands.place("shop-1", "o-2"),
            commands.fulfil("shop-1", "o-1"),
        ]

        results = execute(host, *sent)

        assert [r.status for r in results] == [APPENDED] * 3
        assert [(r.first_version, r.last_version) for r in results] == [
            (1, 1),
            (2, 2),
            (3, 3),
        ]
        assert host.status()["live_aggregates"] == 0
        assert host.evictions["stop"] == 1
        assert_store_matches_fold(
            sqlite_url(tmp_path), str(tmp_path / "snapshots"), sent
        )


class TestSnapshots:
    def test_snapshots_follow_policy(
        self, make_host: MakeHost, tmp_path: Path, commands: ShopCommands
    ) -> None:
        """With snapshot_every = 10, a snapshot follows 10 events after the last one."""
        host = make_host(
            job_config(tmp_path, shop={**KEEP_ALWAYS, "snapshot_every": 10})
        )
        expected_after_batch = [{}, {1: [14]}, {1: [14]}, {1: [28]}]

        for expected in expected_after_batch:
            sent = [
                commands.place("shop-1", f"o-{commands.count + 1}") for _ in range(7)
            ]
            assert count_statuses(execute(host, *sent)) == {APPENDED: 7}
            assert host.flush_snapshots()
            assert snapshot_versions(tmp_path, "shop-1") == expected

    def test_load_replays_after_snapshot(
        self, make_host: MakeHost, tmp_path: Path, commands: ShopCommands
    ) -> None:
        """After an eviction only the events after the latest snapshot are read."""
        host = make_host(
            job_config(tmp_path, shop={**STOP_ALWAYS, "snapshot_every": 10})
        )
        sent = place_one_by_one(host, commands, "shop-1", 25)
        assert snapshot_versions(tmp_path, "shop-1") == {1: [20]}

        replayed_before = host.counters["events_replayed"]
        sent += place_one_by_one(host, commands, "shop-1", 1)

        assert host.counters["events_replayed"] - replayed_before == 5
        assert_store_matches_fold(
            sqlite_url(tmp_path), str(tmp_path / "snapshots"), sent
        )

    def test_stop_does_not_snapshot_each_command(
        self, make_host: MakeHost, tmp_path: Path, commands: ShopCommands
    ) -> None:
        """Under STOP the policy counts from the loaded snapshot, not from each load."""
        host = make_host(
            job_config(tmp_path, shop={**STOP_ALWAYS, "snapshot_every": 10})
        )

        place_one_by_one(host, commands, "shop-1", 25)

        assert host.status()["snapshots_written"] == 2
        assert host.counters["new_aggregates"] == 1
        assert host.counters["loads"] == 24

    def test_bumped_snapshot_version_replays(
        self, make_host: MakeHost, tmp_path: Path, commands: ShopCommands
    ) -> None:
        """Snapshot version 2 ignores version 1 snapshots and replaces them."""
        old_host = make_host(
            job_config(tmp_path, shop={**STOP_ALWAYS, "snapshot_every": 10})
        )
        sent = [commands.place("shop-1", f"o-{number}") for number in range(1, 26)]
        execute(old_host, *sent)
        assert old_host.flush_snapshots()
        assert snapshot_versions(tmp_path, "shop-1") == {1: [25]}

        shop = {**STOP_ALWAYS, "snapshot_every": 10, "snapshot_version": 2}
        new_host = make_host(job_config(tmp_path, shop=shop), host_id="host-new")
        sent.append(commands.place("shop-1", "o-26"))
        assert execute(new_host, sent[-1])[0].last_version == 26
        assert new_host.flush_snapshots()

        assert new_host.counters["events_replayed"] == 25
        assert snapshot_versions(tmp_path, "shop-1") == {2: [26]}
        assert_store_matches_fold(
            sqlite_url(tmp_path), str(tmp_path / "snapshots"), sent
        )


class TestBounds:
    def test_live_count_never_exceeds_limit(
        self, make_host: MakeHost, tmp_path: Path
    ) -> None:
        max_live = 5
        host = make_host(
            job_config(
                tmp_path, hosts={"max_live_aggregates": max_live}, shop=KEEP_ALWAYS
            )
        )
        sent = workload(num_shops=200, num_commands=600)
        assert len({c.aggregate_id for c in sent}) > 10 * max_live

        for start in range(0, len(sent), 20):
            execute(host, *sent[start : start + 20])
            assert host.status()["live_aggregates"] <= max_live

        assert host.evictions["count_limit"] > 0
        assert_store_matches_fold(
            sqlite_url(tmp_path), str(tmp_path / "snapshots"), sent
        )

    def test_memory_budget_evicts(
        self, make_host: MakeHost, tmp_path: Path, commands: ShopCommands
    ) -> None:
        """A budget below the process's resident memory evicts after every batch."""
        host = make_host(
            job_config(tmp_path, hosts={"memory_budget_bytes": 1}, shop=KEEP_ALWAYS)
        )
        sent = [commands.place(f"shop-{number}", "o-1") for number in range(8)]

        execute(host, *sent)

        status = host.status()
        assert host.evictions["memory_budget"] > 0
        assert status["over_budget_since"] is not None
        assert status["live_aggregates"] < len(sent)


class TestOutcomes:
    def test_duplicates_not_appended_twice(
        self, make_host: MakeHost, tmp_path: Path, commands: ShopCommands
    ) -> None:
        host = make_host()
        placed = [commands.place("shop-1", "o-1"), commands.place("shop-1", "o-2")]
        fulfil = commands.fulfil("shop-1", "o-1")
        execute(host, *placed)

        resent = execute(host, *placed)
        twice_in_batch = execute(host, fulfil, fulfil)

        assert [r.status for r in resent] == [DUPLICATE, DUPLICATE]
        assert [r.status for r in twice_in_batch] == [APPENDED, DUPLICATE]
        store = EventStore(sqlite_url(tmp_path))
        assert store.counts()["events"] == 3
        assert store.counts()["appended_commands"] == 3
        store.close()
        assert_store_matches_fold(
            sqlite_url(tmp_path), str(tmp_path / "snapshots"), [*placed, fulfil]
        )

    def test_domain_error_rejected_and_recorded(
        self, make_host: MakeHost, tmp_path: Path, commands: ShopCommands
    ) -> None:
        host = make_host()
        command = commands.fulfil("shop-1", "o-missing")

        [result] = execute(host, command)

        assert result.status == REJECTED
        assert result.reason == "order o-missing is not open in shop shop-1"
        store = EventStore(sqlite_url(tmp_path))
        assert recorded_commands(store) == [(command.command_id, "rejected")]
        assert store.counts()["events"] == 0
        store.close()
        assert host.counters["rejected"] == 1

    def test_handler_crash_rejects_one_command(
        self,
        make_host: MakeHost,
        tmp_path: Path,
        commands: ShopCommands,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A handler raising a non-domain exception rejects only its own command."""

        def crash(shop: Shop, command: Command) -> list[Any]:
            msg = "handler bug"
            raise RuntimeError(msg)

        monkeypatch.setitem(Shop._handlers, "CancelOrder", crash)
        host = make_host()
        sent = [
            commands.place("shop-1", "o-1"),
            commands.cancel("shop-1", "o-1"),
            commands.place("shop-1", "o-2"),
        ]

        results = execute(host, *sent)

        assert [r.status for r in results] == [APPENDED, REJECTED, APPENDED]
        assert results[1].reason == "RuntimeError: handler bug"
        assert results[2].last_version == 2

    def test_applier_crash_rejects_one_command(
        self,
        make_host: MakeHost,
        tmp_path: Path,
        commands: ShopCommands,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """An event that fails to apply rejects its command, and the rest still land."""

        def crash(shop: Shop, payload: dict[str, Any]) -> None:
            msg = "applier bug"
            raise RuntimeError(msg)

        monkeypatch.setitem(Shop._appliers, "OrderFulfilled", crash)
        host = make_host()
        placed = [commands.place("shop-1", "o-1"), commands.place("shop-1", "o-2")]
        fulfil = commands.fulfil("shop-1", "o-1")
        last = commands.place("shop-1", "o-3")

        results = execute(host, *placed, fulfil, last)

        assert [r.status for r in results] == [APPENDED, APPENDED, REJECTED, APPENDED]
        assert results[2].reason == "RuntimeError: applier bug"
        assert results[3].last_version == 3
        monkeypatch.undo()
        store = EventStore(sqlite_url(tmp_path))
        versions = [row[0] for row in stored_streams(store)["shop-1"]]
        store.close()
        assert versions == [1, 2, 3]

    def test_version_conflict_reloads_and_retries(
        self, make_host: MakeHost, tmp_path: Path, commands: ShopCommands
    ) -> None:
        """Of two hosts writing one aggregate, the stale one reloads and retries."""
        config = job_config(tmp_path, shop=KEEP_ALWAYS)
        first = make_host(config, host_id="host-a")
        second = make_host(config, host_id="host-b")
        sent = [
            commands.place("shop-1", "o-1"),
            commands.place("shop-1", "o-2"),
            commands.place("shop-1", "o-3"),
        ]

        assert execute(first, sent[0])[0].last_version == 1
        assert execute(second, sent[1])[0].last_version == 2
        [result] = execute(first, sent[2])

        assert result.status == APPENDED
        assert result.last_version == 3
        assert first.counters["version_conflicts"] == 1
        assert_store_matches_fold(
            sqlite_url(tmp_path), str(tmp_path / "snapshots"), sent
        )

    def test_store_unavailable_fails_and_fences(
        self,
        make_host: MakeHost,
        tmp_path: Path,
        pg_database: str,
        commands: ShopCommands,
    ) -> None:
        """An unavailable store fails commands and fences the sender until epoch + 1."""
        host = make_host(job_config(tmp_path, database_url=pg_database))
        first, second = commands.place("shop-1", "o-1"), commands.place("shop-1", "o-2")
        assert execute(host, first, sender_id="ingestor")[0].status == APPENDED

        set_connections_allowed(pg_database, False)
        try:
            [failed] = execute(host, second, sender_id="ingestor", epoch=0)
        finally:
            set_connections_allowed(pg_database, True)

        assert failed.status == FAILED
        assert failed.reason is not None
        assert failed.reason.startswith("store unavailable")
        assert host.counters["store_failures"] == 1
        [fenced] = execute(host, second, sender_id="ingestor", epoch=0)
        assert fenced.status == FAILED
        assert "higher epoch" in (fenced.reason or "")
        [resent] = execute(host, second, sender_id="ingestor", epoch=1)
        assert resent.status == APPENDED
        assert resent.last_version == 2
        assert_store_matches_fold(
            pg_database, str(tmp_path / "snapshots"), [first, second]
        )


class TestShards:
    def test_not_owner_for_unowned_shard(
        self, make_host: MakeHost, tmp_path: Path, commands: ShopCommands
    ) -> None:
        owned_shards = set(range(NUM_SHARDS // 2))
        host = make_host(shards=owned_shards)
        owned = next(
            f"shop-{n}" for n in range(100) if _shard(f"shop-{n}") in owned_shards
        )
        foreign = next(
            f"shop-{n}" for n in range(100) if _shard(f"shop-{n}") not in owned_shards
        )

        results = execute(
            host, commands.place(owned, "o-1"), commands.place(foreign, "o-1")
        )

        assert [r.status for r in results] == [APPENDED, NOT_OWNER]
        store = EventStore(sqlite_url(tmp_path))
        assert list(stored_streams(store)) == [owned]
        store.close()

    def test_set_shards_drops_given_up(
        self, make_host: MakeHost, tmp_path: Path, commands: ShopCommands
    ) -> None:
        host = make_host(job_config(tmp_path, shop=KEEP_ALWAYS))
        shop_ids = [f"shop-{n}" for n in range(24)]
        execute(host, *[commands.place(shop_id, "o-1") for shop_id in shop_ids])
        kept_shards = {0, 1, 2}
        kept = [s for s in shop_ids if _shard(s) in kept_shards]
        assert 0 < len(kept) < len(shop_ids)

        dropped = host.set_shards(kept_shards)

        assert dropped == len(shop_ids) - len(kept)
        assert host.status()["live_aggregates"] == len(kept)
        assert host.evictions["shard_moved"] == dropped
        given_up = next(s for s in shop_ids if s not in kept)
        [result] = execute(host, commands.fulfil(given_up, "o-1"))
        assert result.status == NOT_OWNER


def _shard(shop_id: str) -> int:
    return shard_of(SHOP, shop_id, NUM_SHARDS)
