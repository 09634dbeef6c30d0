"""Contract suite of SnapshotStore, run on a local folder and on S3 (moto)."""

from __future__ import annotations

import gzip
import json
import logging
from typing import Any

import pytest

from store import Snapshot, SnapshotStore

TYPE = "Shop"
STATE = {"orders_placed": 3, "open_orders": {"o-1": {"amount_cents": 500}}}


def make_snapshot(
    version: int,
    aggregate_id: str = "shop-1",
    snapshot_version: int = 1,
    state: dict[str, Any] | None = None,
) -> Snapshot:
    return Snapshot(
        aggregate_type=TYPE,
        aggregate_id=aggregate_id,
        version=version,
        snapshot_version=snapshot_version,
        state=dict(STATE if state is None else state),
        created_at="2024-01-01T00:00:00+00:00",
    )


def snapshot_files(store: SnapshotStore) -> list[str]:
    """Return every file under the store's root, sorted."""
    store.fs.invalidate_cache()
    return sorted(store.fs.find(store.root))


def only_file(store: SnapshotStore) -> str:
    [path] = snapshot_files(store)
    return path


def write_file(store: SnapshotStore, path: str, data: bytes) -> None:
    store.fs.pipe_file(path, data)
    store.fs.invalidate_cache()


def snapshot_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "store.snapshot_store" and record.levelno == logging.WARNING
    ]


def document(snapshot: Snapshot, **changes: Any) -> bytes:
    """Return the JSON bytes the store writes for ``snapshot``, with changes."""
    data = {
        "format": 1,
        "aggregate_type": snapshot.aggregate_type,
        "aggregate_id": snapshot.aggregate_id,
        "version": snapshot.version,
        "snapshot_version": snapshot.snapshot_version,
        "created_at": snapshot.created_at,
        "state": snapshot.state,
    }
    data.update(changes)
    return json.dumps(data).encode()


class TestSaveAndLoad:
    def test_save_load_round_trip(self, snapshot_store: SnapshotStore) -> None:
        snapshot = make_snapshot(10)

        written = snapshot_store.save(snapshot)

        assert written is True
        assert snapshot_store.load_latest(TYPE, "shop-1", 1) == snapshot

    def test_load_missing_returns_none(
        self, snapshot_store: SnapshotStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        """No snapshot is the normal case of a new aggregate, so it does not warn."""
        assert snapshot_store.load_latest(TYPE, "nobody", 1) is None
        assert snapshot_warnings(caplog) == []

    def test_created_at_filled_in(self, snapshot_store: SnapshotStore) -> None:
        snapshot = Snapshot(TYPE, "shop-1", 5, 1, {"x": 1})

        snapshot_store.save(snapshot)

        loaded = snapshot_store.load_latest(TYPE, "shop-1", 1)
        assert loaded is not None
        assert loaded.created_at != ""

    def test_newer_save_replaces_older(self, snapshot_store: SnapshotStore) -> None:
        snapshot_store.save(make_snapshot(10))

        written = snapshot_store.save(make_snapshot(20, state={"orders_placed": 9}))

        loaded = snapshot_store.load_latest(TYPE, "shop-1", 1)
        assert written is True
        assert loaded is not None
        assert loaded.version == 20
        assert loaded.state == {"orders_placed": 9}

    @pytest.mark.parametrize("older_version", [10, 20])
    def test_older_never_replaces_newer(
        self, snapshot_store: SnapshotStore, older_version: int
    ) -> None:
        """A save at or below the latest stored version is skipped and returns False."""
        snapshot_store.save(make_snapshot(20))

        written = snapshot_store.save(make_snapshot(older_version, state={"stale": 1}))

        loaded = snapshot_store.load_latest(TYPE, "shop-1", 1)
        assert written is False
        assert loaded is not None
        assert loaded.version == 20
        assert loaded.state == STATE
        assert snapshot_store.list_versions(TYPE, "shop-1") == {1: [20]}

    def test_older_files_deleted(self, snapshot_store: SnapshotStore) -> None:
        for version in (10, 20, 30):
            snapshot_store.save(make_snapshot(version))

        assert snapshot_store.list_versions(TYPE, "shop-1") == {1: [30]}
        assert len(snapshot_files(snapshot_store)) == 1

    def test_aggregates_kept_apart(self, snapshot_store: SnapshotStore) -> None:
        snapshot_store.save(make_snapshot(10, aggregate_id="shop-1"))
        snapshot_store.save(make_snapshot(30, aggregate_id="shop-2"))

        first = snapshot_store.load_latest(TYPE, "shop-1", 1)

        assert first is not None
        assert first.version == 10
        assert snapshot_store.list_versions(TYPE, "shop-1") == {1: [10]}

    def test_listings_not_cached(self, snapshot_store: SnapshotStore) -> None:
        """Loads of many aggregates leave no folder listings in fsspec's cache."""
        # fsspec shares one filesystem object among stores of the same options,
        # so other tests' listings may already be cached.
        snapshot_store.fs.invalidate_cache()

        for number in range(20):
            snapshot_store.save(make_snapshot(10, aggregate_id=f"shop-{number}"))
            snapshot_store.load_latest(TYPE, f"shop-{number}", 1)
            snapshot_store.list_versions(TYPE, f"shop-{number}")

        assert len(snapshot_store.fs.dircache) == 0


class TestSnapshotVersion:
    def test_other_snapshot_version_ignored(
        self, snapshot_store: SnapshotStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        snapshot_store.save(make_snapshot(50, snapshot_version=1))

        assert snapshot_store.load_latest(TYPE, "shop-1", 2) is None
        assert snapshot_warnings(caplog) == []

    def test_new_snapshot_version_removes_old(
        self, snapshot_store: SnapshotStore
    ) -> None:
        """Saving in a new state shape removes every snapshot in other shapes."""
        snapshot_store.save(make_snapshot(50, snapshot_version=1))
        snapshot_store.save(make_snapshot(60, snapshot_version=3))

        written = snapshot_store.save(make_snapshot(10, snapshot_version=2))

        assert written is True
        assert snapshot_store.list_versions(TYPE, "shop-1") == {2: [10]}
        assert snapshot_store.load_latest(TYPE, "shop-1", 1) is None
        assert snapshot_store.load_latest(TYPE, "shop-1", 2) == make_snapshot(
            10, snapshot_version=2
        )


class TestDamagedSnapshots:
    @pytest.mark.parametrize(
        "damage",
        [
            pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
            pytest.param(lambda data: b"", id="empty"),
            pytest.param(lambda data: b"\xff\xfe\x00garbage\x81\x9c", id="garbage"),
            pytest.param(lambda data: b"[1, 2, 3]", id="json-list"),
            pytest.param(lambda data: b'{"format": 1}', id="keys-missing"),
            pytest.param(lambda data: b'{"format": 2}', id="unknown-format"),
            pytest.param(
                lambda data: data.replace(b'"state":{', b'"state":[{', 1)[:-1] + b"]}",
                id="state-not-object",
            ),
            pytest.param(
                lambda data: data.replace(b'"version":10', b'"version":"ten"'),
                id="version-not-number",
            ),
            pytest.param(
                lambda data: data.replace(b'"version":10', b'"version":null'),
                id="version-null",
            ),
        ],
    )
    def test_damaged_snapshot_gives_none(
        self,
        snapshot_store: SnapshotStore,
        caplog: pytest.LogCaptureFixture,
        damage: Any,
    ) -> None:
        """An unreadable snapshot loads as None with exactly one warning."""
        snapshot_store.save(make_snapshot(10))
        path = only_file(snapshot_store)
        write_file(snapshot_store, path, damage(snapshot_store.fs.cat_file(path)))

        with caplog.at_level(logging.WARNING):
            loaded = snapshot_store.load_latest(TYPE, "shop-1", 1)

        assert loaded is None
        assert len(snapshot_warnings(caplog)) == 1

    def test_damaged_falls_back_to_older(
        self, snapshot_store: SnapshotStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A damaged newest snapshot is skipped for the next older readable one."""
        snapshot_store.save(make_snapshot(10))
        older_path = only_file(snapshot_store)
        newer_path = older_path.replace("000000000010", "000000000020")
        write_file(snapshot_store, newer_path, b'{"format": 1, "aggregate_')

        with caplog.at_level(logging.WARNING):
            loaded = snapshot_store.load_latest(TYPE, "shop-1", 1)

        assert loaded == make_snapshot(10)
        assert len(snapshot_warnings(caplog)) == 1

    @pytest.mark.parametrize(
        "changes",
        [
            pytest.param({"aggregate_id": "shop-2"}, id="other-id"),
            pytest.param({"aggregate_type": "Warehouse"}, id="other-type"),
            pytest.param({"version": 11}, id="other-version"),
            pytest.param({"snapshot_version": 2}, id="other-snapshot-version"),
        ],
    )
    def test_mismatched_key_gives_none(
        self,
        snapshot_store: SnapshotStore,
        caplog: pytest.LogCaptureFixture,
        changes: dict[str, Any],
    ) -> None:
        """A document whose fields disagree with its path is not trusted."""
        snapshot = make_snapshot(10)
        snapshot_store.save(snapshot)
        write_file(
            snapshot_store, only_file(snapshot_store), document(snapshot, **changes)
        )

        with caplog.at_level(logging.WARNING):
            loaded = snapshot_store.load_latest(TYPE, "shop-1", 1)

        assert loaded is None
        assert len(snapshot_warnings(caplog)) == 1

    def test_stray_files_ignored(
        self, snapshot_store: SnapshotStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Files not named like a snapshot are neither read nor warned about."""
        snapshot_store.save(make_snapshot(10))
        folder = only_file(snapshot_store).rsplit("/", 1)[0]
        write_file(snapshot_store, f"{folder}/README.txt", b"not a snapshot")
        write_file(snapshot_store, f"{folder}/000000000099.json.tmp-1", b"{")

        with caplog.at_level(logging.WARNING):
            loaded = snapshot_store.load_latest(TYPE, "shop-1", 1)

        assert loaded == make_snapshot(10)
        assert snapshot_warnings(caplog) == []


class TestCompression:
    @pytest.fixture
    def gzip_store(
        self, snapshot_store_url: tuple[str, dict[str, Any]]
    ) -> SnapshotStore:
        url, options = snapshot_store_url
        return SnapshotStore(url, storage_options=options, compression="gzip")

    def test_gzip_round_trip(self, gzip_store: SnapshotStore) -> None:
        snapshot = make_snapshot(10, state={"note": "x" * 10_000})

        gzip_store.save(snapshot)

        path = only_file(gzip_store)
        data = gzip_store.fs.cat_file(path)
        assert path.endswith(".json.gz")
        assert len(data) < 1_000
        assert json.loads(gzip.decompress(data))["state"] == snapshot.state
        assert gzip_store.load_latest(TYPE, "shop-1", 1) == snapshot

    def test_gzip_store_reads_plain(
        self,
        snapshot_store: SnapshotStore,
        gzip_store: SnapshotStore,
    ) -> None:
        """Turning compression on keeps the snapshots written before readable."""
        snapshot_store.save(make_snapshot(10))

        assert gzip_store.load_latest(TYPE, "shop-1", 1) == make_snapshot(10)

    def test_truncated_gzip_gives_none(
        self, gzip_store: SnapshotStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        gzip_store.save(make_snapshot(10))
        path = only_file(gzip_store)
        write_file(gzip_store, path, gzip_store.fs.cat_file(path)[:-12])

        with caplog.at_level(logging.WARNING):
            loaded = gzip_store.load_latest(TYPE, "shop-1", 1)

        assert loaded is None
        assert len(snapshot_warnings(caplog)) == 1

    def test_unknown_compression_raises(self, tmp_path: Any) -> None:
        with pytest.raises(ValueError, match="compression"):
            SnapshotStore(str(tmp_path), compression="zstd")


class TestAwkwardIds:
    @pytest.mark.parametrize(
        "aggregate_id",
        [
            "shop/with/slashes",
            "/leading-slash",
            "trailing-slash/",
            "with spaces  and  tabs\t",
            'it\'s "quoted"',
            "percent%2Fencoded",
            "back\\slash",
            "ünïcødé ✓",
            "dots.in.the.id",
        ],
    )
    def test_awkward_id_round_trip(
        self, snapshot_store: SnapshotStore, aggregate_id: str
    ) -> None:
        """Ids with path separators and quotes stay one aggregate, apart from others."""
        snapshot = make_snapshot(10, aggregate_id=aggregate_id)
        neighbour = make_snapshot(30, aggregate_id="shop")

        snapshot_store.save(neighbour)
        snapshot_store.save(snapshot)

        assert snapshot_store.load_latest(TYPE, aggregate_id, 1) == snapshot
        assert snapshot_store.load_latest(TYPE, "shop", 1) == neighbour
        assert snapshot_store.list_versions(TYPE, aggregate_id) == {1: [10]}

    @pytest.mark.parametrize(
        "aggregate_id",
        ["x" * 256, "'" * 256, "é" * 256],
        ids=["ascii", "quotes", "two-byte"],
    )
    def test_longest_id_round_trip(
        self, snapshot_store: SnapshotStore, aggregate_id: str
    ) -> None:
        """An id of the longest accepted length fits a local file name once encoded."""
        similar_id = aggregate_id[:-1] + "z"
        snapshot = make_snapshot(10, aggregate_id=aggregate_id)
        similar = make_snapshot(20, aggregate_id=similar_id)

        snapshot_store.save(snapshot)
        snapshot_store.save(similar)

        assert snapshot_store.load_latest(TYPE, aggregate_id, 1) == snapshot
        assert snapshot_store.load_latest(TYPE, similar_id, 1) == similar

    @pytest.mark.parametrize("aggregate_id", [".", ".."])
    def test_dot_ids_stay_inside_their_folder(
        self, snapshot_store: SnapshotStore, aggregate_id: str
    ) -> None:
        """Ids "." and ".." neither escape their folder nor delete other aggregates."""
        neighbour = make_snapshot(30, aggregate_id="2")
        snapshot = make_snapshot(10, aggregate_id=aggregate_id)

        snapshot_store.save(neighbour)
        snapshot_store.save(snapshot)

        assert snapshot_store.load_latest(TYPE, "2", 1) == neighbour
        assert snapshot_store.load_latest(TYPE, aggregate_id, 1) == snapshot
        assert snapshot_store.list_versions(TYPE, aggregate_id) == {1: [10]}
        assert all(
            path.startswith(f"{snapshot_store.root}/{TYPE}/")
            for path in snapshot_files(snapshot_store)
        )
