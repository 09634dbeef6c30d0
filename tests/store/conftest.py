"""Fixtures that run each store contract suite on every backend.

The event store suite runs on a SQLite file and on PostgreSQL; the snapshot
store suite runs on a local folder and on S3 (a moto server on loopback). The
PostgreSQL and S3 cases use the session services of ``tests/conftest.py``,
which fail the test when their server cannot start, so these cases are never
skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from store import EventStore, SnapshotStore, schema


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[sa.Engine]:
    """Yield one engine on the session's PostgreSQL test database."""
    engine = sa.create_engine(pg_url)

    yield engine

    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Return the URL of an empty database: a SQLite file or the PostgreSQL one.

    On PostgreSQL every raysource table is dropped first, so each test starts
    from an empty database without paying for a new one.
    """
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'events.db'}"

    engine: sa.Engine = request.getfixturevalue("pg_engine")
    schema.metadata.drop_all(engine)
    return engine.url.render_as_string(hide_password=False)


@pytest.fixture
def event_store(store_url: str) -> Iterator[EventStore]:
    """Yield an EventStore on an empty database, closed after the test."""
    store = EventStore(store_url)

    yield store

    store.close()


@pytest.fixture(params=["local", "s3"])
def snapshot_store_url(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[str, dict[str, Any]]:
    """Return the URL and storage options of an empty snapshot location."""
    if request.param == "local":
        return str(tmp_path / "snaps"), {}

    bucket: str = request.getfixturevalue("s3_bucket")
    options: dict[str, Any] = request.getfixturevalue("s3_storage_options")
    return f"s3://{bucket}/snaps", options


@pytest.fixture
def snapshot_store(snapshot_store_url: tuple[str, dict[str, Any]]) -> SnapshotStore:
    """Return an uncompressed SnapshotStore on an empty local folder or S3 prefix."""
    url, options = snapshot_store_url
    return SnapshotStore(url, storage_options=options)
