"""Backfills: accounting, streaming equality, resumption, topic ranges, snapshots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from aggregates.customer import Customer
from aggregates.shop import Shop
from aggregates.workload import generate_commands
from pipeline import _backfill_workers
from pipeline.backfill import (
    TopicRange,
    format_progress,
    format_summary,
    rebuild_snapshots,
    run_backfill,
)
from pipeline.protocol import BatchItem
from pipeline.registry import AggregateRegistry
from store import schema
from store.event_store import EventStore
from store.loading import load_aggregate
from store.snapshot_store import SnapshotStore
from tests.pipeline.backfill_helpers import (
    command_outcomes,
    dead_letters,
    store_config,
    store_counts,
    stream_events,
    write_json_lines,
)
from tests.pipeline.conftest import set_connections_allowed

REPO_ROOT = Path(__file__).resolve().parents[2]
RETAIL_ROWS = 541_909


def shop_commands(num_commands: int, note_bytes: int = 64) -> list[dict[str, Any]]:
    return list(generate_commands(200, num_commands, note_bytes=note_bytes))


# -- the retail file ------------------------------------------------------------


@pytest.mark.slow
def test_backfill_retail_file_accounts_every_line(
    ray_session: Any, retail_parquet: Path, tmp_path: Path
) -> None:
    """Each of the 541,909 lines ends as an event, rejection or dead letter.

    It took 55 to 95 s with two workers on a shared two-core machine, so it is
    marked slow.
    """
    _check_retail_backfill(retail_parquet, tmp_path, limit=None)


def test_backfill_retail_slice_accounts_every_line(
    ray_session: Any, retail_parquet: Path, tmp_path: Path
) -> None:
    """The first 60,000 lines: the checks of the whole-file test, in seconds."""
    _check_retail_backfill(retail_parquet, tmp_path, limit=60_000)


def _check_retail_backfill(path: Path, tmp_path: Path, limit: int | None) -> None:
    """Backfill the file, then compare the store with it per line and per customer."""
    num_rows = RETAIL_ROWS if limit is None else limit
    config = store_config(tmp_path, "retail")

    summary = run_backfill(config, path, "retail", limit=limit, workers=2)

    assert summary["rows_read"] == num_rows
    assert summary["rows_total"] == num_rows
    assert summary["is_accounted"]
    accounted = (
        summary["appended_commands"]
        + summary["rejected_commands"]
        + summary["dead_letters"]
    )
    assert accounted == num_rows
    counts = store_counts(config)
    assert counts["appended_commands"] == summary["appended_commands"]
    assert counts["rejected_commands"] == summary["rejected_commands"]
    assert counts["dead_letters"] == summary["dead_letters"]
    # A customer's invoice line is one command and one event.
    assert counts["events"] == counts["appended_commands"]

    event_lines = _event_line_numbers(config)
    rejected_lines = {
        int(command_id.removeprefix("retail-"))
        for command_id, (outcome, _reason, _events) in command_outcomes(config).items()
        if outcome == "rejected"
    }
    dead_lines = {letter["offset"] for letter in dead_letters(config)}
    assert len(event_lines) + len(rejected_lines) + len(dead_lines) == num_rows
    all_lines = event_lines.index.union(pd.Index(sorted(rejected_lines)))
    all_lines = all_lines.union(pd.Index(sorted(dead_lines)))
    assert all_lines.equals(pd.RangeIndex(num_rows))

    expected = _customer_totals(path, event_lines)
    actual = _loaded_customer_totals(config, list(expected.index))
    pd.testing.assert_frame_equal(actual, expected, check_dtype=False)


def _event_line_numbers(config: Any) -> pd.Series:
    """Return the customer id of each event, indexed by the file line it came from."""
    events = schema.events
    line_number = sa.func.json_extract(events.c.payload, "$.line_number")
    query = sa.select(events.c.aggregate_id, line_number.label("line_number")).where(
        events.c.aggregate_type == "Customer"
    )
    store = EventStore(config.store.database_url)
    try:
        frame = store.to_dataframe(query)
    finally:
        store.close()
    return frame.set_index("line_number").sort_index()["aggregate_id"]


def _customer_totals(path: Path, event_lines: pd.Series) -> pd.DataFrame:
    """Sum the lines that became events per customer, as the Customer state does."""
    lines = pd.read_parquet(path).iloc[event_lines.index]
    customer = lines["CustomerID"].astype("int64").astype(str)
    assert (customer.to_numpy() == event_lines.to_numpy()).all()
    amount_pence = (lines["Quantity"] * lines["UnitPrice"] * 100).map(round)
    frame = pd.DataFrame(
        {
            "customer_id": customer,
            "lines": 1,
            "spend_pence": amount_pence,
            "quantity_purchased": lines["Quantity"].clip(lower=0),
            "quantity_returned": (-lines["Quantity"]).clip(lower=0),
            "invoice_no": lines["InvoiceNo"],
        }
    )
    totals = frame.groupby("customer_id").agg(
        lines=("lines", "sum"),
        spend_pence=("spend_pence", "sum"),
        quantity_purchased=("quantity_purchased", "sum"),
        quantity_returned=("quantity_returned", "sum"),
        invoices=("invoice_no", "nunique"),
    )
    return totals.sort_index()


def _loaded_customer_totals(config: Any, customer_ids: list[str]) -> pd.DataFrame:
    store = EventStore(config.store.database_url)
    snapshots = SnapshotStore(config.store.snapshot_url)
    rows = []
    try:
        for customer_id in customer_ids:
            customer = load_aggregate(Customer, customer_id, store, snapshots).aggregate
            assert isinstance(customer, Customer)
            rows.append(
                {
                    "customer_id": customer_id,
                    "lines": customer.lines,
                    "spend_pence": customer.spend_pence,
                    "quantity_purchased": customer.quantity_purchased,
                    "quantity_returned": customer.quantity_returned,
                    "invoices": customer.invoices,
                }
            )
    finally:
        store.close()
    return pd.DataFrame(rows).set_index("customer_id").sort_index()


# -- equality with the streaming path --------------------------------------------


def test_backfill_matches_streaming_events(ray_session: Any, tmp_path: Path) -> None:
    """The same commands give the same events per stream and the same outcomes."""
    from pipeline.dispatch import Dispatcher
    from pipeline.runtime import start_controller, stop_controller

    commands = list(generate_commands(200, 3000))
    streamed = store_config(
        tmp_path, "streamed", ray={"namespace": f"backfill-test-{os.getpid()}"}
    )
    registry = AggregateRegistry.from_config(streamed.aggregates)
    items = []
    for message in commands:
        spec = registry.for_command(message["type"])
        assert spec is not None
        items.append(BatchItem(spec.name, spec.cls.command_from_message(message)))
    controller = start_controller(streamed)
    try:
        dispatcher = Dispatcher(controller)
        for start in range(0, len(items), 500):
            dispatcher.dispatch_strict(items[start : start + 500])
    finally:
        stop_controller(controller)

    backfilled = store_config(tmp_path, "backfilled")
    path = write_json_lines(tmp_path / "commands.jsonl", commands)
    summary = run_backfill(backfilled, path, "shop", workers=2)

    assert summary["is_accounted"]
    streamed_events = stream_events(streamed)
    backfilled_events = stream_events(backfilled)
    assert sorted(backfilled_events) == sorted(streamed_events)
    for stream, events in streamed_events.items():
        assert backfilled_events[stream] == events, stream
    assert command_outcomes(backfilled) == command_outcomes(streamed)


# -- resumption -----------------------------------------------------------------


def test_backfill_killed_and_rerun_equals_one_run(
    ray_session: Any, tmp_path: Path
) -> None:
    """A backfill killed with SIGKILL and run again leaves what one run leaves."""
    commands = shop_commands(20_000)
    path = write_json_lines(tmp_path / "commands.jsonl", commands)
    resumed = store_config(tmp_path, "resumed")
    config_path = _config_file(tmp_path / "resumed.toml", resumed, ray_session)
    log_path = tmp_path / "killed-backfill.log"

    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline",
                "backfill",
                "--input",
                str(path),
                "--mapping",
                "shop",
                "--config",
                str(config_path),
                "--workers",
                "2",
                "--batch-commands",
                "500",
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            _wait_for_events(resumed, process, min_events=2_000, timeout_s=90)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
    partial = store_counts(resumed)
    assert (
        0 < partial["appended_commands"] + partial["rejected_commands"] < len(commands)
    ), log_path.read_text()[-2000:]

    summary = run_backfill(resumed, path, "shop", workers=2, batch_commands=500)
    single = store_config(tmp_path, "single")
    run_backfill(single, path, "shop", workers=2, batch_commands=500)

    assert summary["is_accounted"]
    assert (
        summary["recorded_earlier"]
        >= partial["appended_commands"] + partial["rejected_commands"]
    )
    assert stream_events(resumed) == stream_events(single)
    outcomes = command_outcomes(resumed)
    assert outcomes == command_outcomes(single)
    assert len(outcomes) == len(commands)
    assert store_counts(resumed) == store_counts(single)


def _config_file(path: Path, config: Any, ray_session: Any) -> Path:
    """Write a TOML file for ``config``'s store that joins the test session's Ray."""
    gcs_address = ray_session.address_info["gcs_address"]
    path.write_text(
        "log_level = 'WARNING'\n"
        "[store]\n"
        f"database_url = '{config.store.database_url}'\n"
        f"snapshot_url = '{config.store.snapshot_url}'\n"
        "[ray]\n"
        f"address = '{gcs_address}'\n"
    )
    return path


def _wait_for_events(
    config: Any, process: subprocess.Popen[bytes], min_events: int, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the backfill finished before it could be killed"
        if Path(config.store.database_url.removeprefix("sqlite:///")).exists():
            if store_counts(config)["events"] >= min_events:
                return
        time.sleep(0.2)
    pytest.fail(f"the backfill appended fewer than {min_events} events in {timeout_s}s")


def test_backfill_replaces_killed_worker(
    ray_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker actor killed mid-run is replaced and its batches are sent again."""
    import ray

    started: list[Any] = []
    original_start = _backfill_workers.RayPool._start

    def recording_start(pool: Any, worker: int) -> Any:
        actor = original_start(pool, worker)
        started.append(actor)
        return actor

    monkeypatch.setattr(_backfill_workers.RayPool, "_start", recording_start)
    killed: list[int] = []

    def kill_first_worker(state: dict[str, Any]) -> None:
        if not killed:
            killed.append(state["rows_read"])
            ray.kill(started[0], no_restart=True)

    commands = shop_commands(10_000)
    path = write_json_lines(tmp_path / "commands.jsonl", commands)
    config = store_config(tmp_path, "killed")
    summary = run_backfill(
        config, path, "shop", workers=2, progress=kill_first_worker, batch_commands=200
    )
    single = store_config(tmp_path, "single")
    run_backfill(single, path, "shop", workers=0)

    assert killed
    assert summary["worker_restarts"] == 1
    assert summary["resent_commands"] > 0
    assert summary["is_accounted"]
    assert stream_events(config) == stream_events(single)
    assert command_outcomes(config) == command_outcomes(single)


def test_backfill_resends_while_store_unavailable(
    ray_session: Any, pg_database: str, tmp_path: Path
) -> None:
    """Batches that fail while PostgreSQL refuses connections are resent in order."""
    commands = shop_commands(6_000)
    path = write_json_lines(tmp_path / "commands.jsonl", commands)
    config = store_config(
        tmp_path,
        "postgres",
        store={"database_url": pg_database},
        kafka={"retry_backoff_initial_s": 0.2},
    )
    blocked: list[threading.Timer] = []

    def block_store_once(state: dict[str, Any]) -> None:
        if not blocked:
            set_connections_allowed(pg_database, False)
            timer = threading.Timer(1.5, set_connections_allowed, (pg_database, True))
            timer.start()
            blocked.append(timer)

    try:
        summary = run_backfill(
            config,
            path,
            "shop",
            workers=2,
            progress=block_store_once,
            batch_commands=250,
        )
    finally:
        for timer in blocked:
            timer.join()
        set_connections_allowed(pg_database, True)
    single = store_config(tmp_path, "single")
    run_backfill(single, path, "shop", workers=0)

    assert blocked
    assert summary["resent_commands"] > 0
    assert summary["is_accounted"]
    assert stream_events(config) == stream_events(single)
    assert command_outcomes(config) == command_outcomes(single)


# -- accounting of bad rows -------------------------------------------------------

BAD_ROWS: list[tuple[str, str, str]] = [
    # (line of the file, expected outcome, part of the reason)
    (
        json.dumps(
            {
                "type": "PlaceOrder",
                "shop_id": "s1",
                "order_id": "o1",
                "amount_cents": 500,
                "items": [],
                "note": "n",
            }
        ),
        "appended",
        "",
    ),
    ("[1, 2]", "dead_letter", "must be a JSON object, got list"),
    ('"a string"', "dead_letter", "must be a JSON object, got str"),
    ("{not json", "dead_letter", "not valid JSON"),
    (
        json.dumps(
            {
                "type": "PlaceOrder",
                "order_id": "o2",
                "amount_cents": 1,
                "items": [],
                "note": "",
            }
        ),
        "dead_letter",
        "shop_id is missing",
    ),
    (
        json.dumps(
            {
                "type": "PlaceOrder",
                "shop_id": "s1",
                "order_id": "o3",
                "amount_cents": "12",
                "items": [],
                "note": "",
            }
        ),
        "dead_letter",
        "amount_cents",
    ),
    (
        json.dumps(
            {
                "type": "PlaceOrder",
                "shop_id": 7,
                "order_id": "o4",
                "amount_cents": 12,
                "items": [],
                "note": "",
            }
        ),
        "dead_letter",
        "shop_id must be a string",
    ),
    (
        json.dumps({"type": "CloseShop", "shop_id": "s1"}),
        "dead_letter",
        "unknown command type",
    ),
    (json.dumps({"shop_id": "s1", "order_id": "o5"}), "dead_letter", "type is missing"),
    (
        json.dumps({"type": "FulfillOrder", "shop_id": "s1", "order_id": "never"}),
        "rejected",
        "never",
    ),
    (
        json.dumps({"type": "FulfillOrder", "shop_id": "s1", "order_id": "o1"}),
        "appended",
        "",
    ),
]


def test_backfill_accounts_bad_json_lines(tmp_path: Path) -> None:
    lines = [line for line, _, _ in BAD_ROWS]
    path = tmp_path / "bad.jsonl"
    # A blank line is not a row, as in pandas.
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    config = store_config(tmp_path, "bad")

    summary = run_backfill(config, path, "shop", workers=0)

    expected = [outcome for _, outcome, _ in BAD_ROWS]
    assert summary["rows_read"] == len(BAD_ROWS)
    assert summary["appended_commands"] == expected.count("appended")
    assert summary["rejected_commands"] == expected.count("rejected")
    assert summary["dead_letters"] == expected.count("dead_letter")
    assert summary["is_accounted"]
    letters = {letter["offset"]: letter for letter in dead_letters(config)}
    outcomes = command_outcomes(config)
    for row_number, (line, outcome, reason) in enumerate(BAD_ROWS):
        if outcome == "dead_letter":
            letter = letters[row_number]
            assert reason in letter["reason"], (row_number, letter["reason"])
            assert letter["topic"] == str(path.resolve())
            assert letter["partition"] == 0
            assert letter["value"] == line.encode()
        else:
            recorded = outcomes[f"shop-{row_number}"]
            assert recorded[0] == outcome, (row_number, recorded)
            assert reason in (recorded[1] or ""), (row_number, recorded)


def test_backfill_reads_each_file_format(tmp_path: Path) -> None:
    """JSON lines, CSV and Parquet of the same rows give the same events."""
    rows = [
        {
            "shop": f"shop-{n // 3}",
            "order": f"o-{n - n % 3}" if n % 3 == 2 else f"o-{n}",
            "amount": 100 + n,
            "action": "fulfill" if n % 3 == 2 else "place",
        }
        for n in range(40)
    ]
    frame = pd.DataFrame(rows)
    paths = [
        write_json_lines(tmp_path / "orders.jsonl", rows),
        tmp_path / "orders.csv",
        tmp_path / "orders.parquet",
    ]
    frame.to_csv(paths[1], index=False)
    frame.to_parquet(paths[2])
    mapping = "tests.pipeline.backfill_helpers:order_command"

    events = []
    for path in paths:
        config = store_config(tmp_path, path.suffix.lstrip("."))
        summary = run_backfill(config, path, mapping, workers=0, chunk_rows=7)
        assert summary["rows_read"] == 40, path
        assert summary["appended_commands"] == 40, path
        assert summary["rows_total"] == (40 if path.suffix == ".parquet" else None), (
            path
        )
        events.append(stream_events(config))

    assert events[0] == events[1]
    assert events[0] == events[2]
    assert sum(len(stream) for stream in events[0].values()) == 40


def test_backfill_limit_reads_first_rows(tmp_path: Path) -> None:
    path = write_json_lines(tmp_path / "commands.jsonl", shop_commands(300))
    config = store_config(tmp_path, "limit")

    summary = run_backfill(config, path, "shop", limit=120, workers=0)

    assert summary["rows_read"] == 120
    assert set(command_outcomes(config)) == {f"cmd-{n:09d}" for n in range(1, 121)}


def test_backfill_rerun_counts_recorded_outcomes(tmp_path: Path) -> None:
    """A second run over the same file executes nothing and still accounts every row."""
    path = write_json_lines(tmp_path / "commands.jsonl", shop_commands(500))
    config = store_config(tmp_path, "rerun")
    first = run_backfill(config, path, "shop", workers=0)

    second = run_backfill(config, path, "shop", workers=0)

    assert second["recorded_earlier"] == 500
    assert second["events"] == 0
    assert second["appended_commands"] == first["appended_commands"]
    assert second["rejected_commands"] == first["rejected_commands"]
    assert second["is_accounted"]


# -- topic ranges -----------------------------------------------------------------


def _produce(bootstrap: str, topic: str, values: list[tuple[int, bytes, int]]) -> None:
    """Send (partition, value, timestamp in ms) records in order and wait for them."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, client_id="backfill-test")
    try:
        for partition, value, timestamp_ms in values:
            producer.send(
                topic, value=value, partition=partition, timestamp_ms=timestamp_ms
            )
        producer.flush()
    finally:
        producer.close()


def _topic_records(
    num_per_partition: int, start_ms: int
) -> list[tuple[int, bytes, int]]:
    """Return a shop's PlaceOrder records per partition, bad at partition 1 offset 3."""
    records = []
    for offset in range(num_per_partition):
        for partition in range(2):
            command = {
                "type": "PlaceOrder",
                "shop_id": f"shop-{partition}",
                "order_id": f"o-{partition}-{offset}",
                "amount_cents": 100,
                "items": [],
                "note": "",
            }
            value = json.dumps(command).encode()
            if partition == 1 and offset == 3:
                value = b"{not json"
            records.append((partition, value, start_ms + offset * 1000))
    return records


def test_backfill_topic_offset_range(
    ray_session: Any, kafka_broker: str, kafka_topic: Any, tmp_path: Path
) -> None:
    topic = kafka_topic(2)
    _produce(kafka_broker, topic, _topic_records(10, 1_700_000_000_000))
    config = store_config(tmp_path, "topic")
    topic_range = TopicRange(
        topic, kafka_broker, from_offset=2, to_offset=6, idle_timeout_s=1.0
    )

    summary = run_backfill(config, topic_range, workers=1)

    assert summary["rows_read"] == 8
    assert summary["appended_commands"] == 7
    assert summary["dead_letters"] == 1
    assert summary["is_accounted"]
    [letter] = dead_letters(config)
    assert (letter["topic"], letter["partition"], letter["offset"]) == (topic, 1, 3)
    assert "not valid JSON" in letter["reason"]
    assert set(command_outcomes(config)) == {
        f"{topic}-{partition}-{offset}"
        for partition in range(2)
        for offset in range(2, 6)
    } - {f"{topic}-1-3"}


def test_backfill_topic_time_range_to_end(
    kafka_broker: str, kafka_topic: Any, tmp_path: Path
) -> None:
    """A time range starts at the first record at or after its start time.

    Without an end time, the range reaches the end of each partition.
    """
    topic = kafka_topic(2)
    start_ms = 1_700_000_000_000
    _produce(kafka_broker, topic, _topic_records(10, start_ms))
    config = store_config(tmp_path, "times")
    from_time = datetime.fromtimestamp((start_ms + 6_500) / 1000, UTC)
    to_time = datetime.fromtimestamp((start_ms + 8_000) / 1000, UTC)

    bounded = run_backfill(
        config,
        TopicRange(
            topic,
            kafka_broker,
            from_timestamp=from_time,
            to_timestamp=to_time,
            idle_timeout_s=1.0,
        ),
        workers=0,
    )
    to_end = run_backfill(
        config,
        TopicRange(topic, kafka_broker, from_timestamp=from_time, idle_timeout_s=1.0),
        workers=0,
    )

    # The bounded range reads offset 7 of each partition, the open one 7 to 9.
    assert bounded["rows_read"] == 2
    assert to_end["rows_read"] == 6
    assert to_end["recorded_earlier"] == 2
    assert set(command_outcomes(config)) == {
        f"{topic}-{partition}-{offset}"
        for partition in range(2)
        for offset in (7, 8, 9)
    }


# -- snapshots --------------------------------------------------------------------


def test_rebuild_snapshots_writes_new_version(ray_session: Any, tmp_path: Path) -> None:
    path = write_json_lines(tmp_path / "commands.jsonl", shop_commands(3000))
    old = store_config(tmp_path, "rebuild", aggregates={"Shop": {"snapshot_every": 20}})
    run_backfill(old, path, "shop", workers=0)
    new = store_config(
        tmp_path,
        "rebuild",
        aggregates={"Shop": {"snapshot_every": 20, "snapshot_version": 2}},
    )

    summary = rebuild_snapshots(new, "Shop", workers=2)

    store = EventStore(new.store.database_url)
    snapshots = SnapshotStore(new.store.snapshot_url)
    try:
        shop_ids = list(store.iter_aggregate_ids("Shop"))
        assert summary["aggregates"] == len(shop_ids)
        assert summary["written"] == len(shop_ids)
        assert summary["failed"] == 0
        for shop_id in shop_ids:
            version = store.stream_version("Shop", shop_id)
            assert snapshots.list_versions("Shop", shop_id) == {2: [version]}, shop_id
            snapshot = snapshots.load_latest("Shop", shop_id, 2)
            assert snapshot is not None
            replayed = load_aggregate(Shop, shop_id, store, None).aggregate
            assert snapshot.state == replayed.snapshot_state(), shop_id
    finally:
        store.close()


def test_rebuild_snapshots_rejects_unknown_type(tmp_path: Path) -> None:
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="'Warehouse' is not configured"):
        rebuild_snapshots(store_config(tmp_path, "unknown"), "Warehouse", workers=0)


# -- command line -----------------------------------------------------------------


def test_backfill_command_prints_accounting(tmp_path: Path) -> None:
    path = write_json_lines(tmp_path / "commands.jsonl", shop_commands(200))
    config = store_config(tmp_path, "cli")
    config_path = tmp_path / "cli.toml"
    config_path.write_text(
        f"[store]\ndatabase_url = '{config.store.database_url}'\n"
        f"snapshot_url = '{config.store.snapshot_url}'\n"
    )

    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "backfill",
            "--input",
            str(path),
            "--config",
            str(config_path),
            "--workers",
            "0",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "ok: every row accounted for" in finished.stdout
    assert store_counts(config)["appended_commands"] > 0


def test_backfill_command_rejects_mixed_options(tmp_path: Path) -> None:
    from pipeline.cli import main

    path = write_json_lines(tmp_path / "commands.jsonl", shop_commands(5))

    assert main(["backfill", "--input", str(path), "--from-offset", "3"]) == 2


def test_progress_shows_time_left_with_total() -> None:
    state = {
        "rows_done": 500,
        "rows_total": 1000,
        "rows_per_s": 100.0,
        "elapsed_s": 5.0,
    }

    assert format_progress(state) == "500/1,000 rows (50%)  5s left  100 rows/s  5s"
    assert format_progress({**state, "rows_total": None}) == "500 rows  100 rows/s  5s"


def test_format_summary_flags_mismatch() -> None:
    summary = {
        "source": "f.jsonl",
        "rows_read": 10,
        "appended_commands": 5,
        "rejected_commands": 2,
        "dead_letters": 2,
        "accounted": 9,
        "is_accounted": False,
        "events": 5,
        "recorded_earlier": 0,
        "elapsed_s": 1.0,
        "rows_per_s": 10.0,
        "workers": 1,
    }

    lines = format_summary(summary)

    assert any("MISMATCH: 1 rows unaccounted for" in line for line in lines)
