"""The command line as a user runs it: the demo on real data, bad settings, SIGTERM.

Each test starts ``python -m pipeline`` in a subprocess, which starts its own
local Ray, so these tests do not share the session's Ray instance.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from kafka import KafkaAdminClient, KafkaProducer

from aggregates import Customer, Shop
from aggregates.workload import generate_commands
from pipeline.cli import main
from pipeline.sources import iter_commands
from store import EventStore, SnapshotStore, load_aggregate
from tests.pipeline.conftest import assert_store_matches_fold

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_TIMEOUT_S = 600


def run_cli(
    *args: str, timeout_s: float = DEMO_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pipeline ARGS`` and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def demo_counts(work_dir: Path) -> dict[str, int]:
    store = EventStore(f"sqlite:///{work_dir / 'events.db'}")
    try:
        return store.counts()
    finally:
        store.close()


def test_demo_flight_slice_accounts_rows(tmp_path: Path) -> None:
    """The demo on 3,000 flights records each row as event, rejection or dead letter."""
    work_dir = tmp_path / "demo"
    finished = run_cli("demo", "--work-dir", str(work_dir), "--limit", "3000")

    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "every row accounted for" in finished.stdout
    counts = demo_counts(work_dir)
    accounted = (
        counts["appended_commands"]
        + counts["rejected_commands"]
        + counts["dead_letters"]
    )
    assert accounted == 3000
    assert counts["dead_letters"] > 0, (
        "the first flights include rows without a tail number"
    )
    assert (work_dir / "samples.jsonl").stat().st_size > 0
    assert (work_dir / "live_and_memory.png").exists()


@pytest.mark.slow
def test_demo_all_flights_accounts_rows(tmp_path: Path) -> None:
    """The demo on all 336,776 flights of 2013 accounts for every row."""
    work_dir = tmp_path / "demo"
    finished = run_cli("demo", "--work-dir", str(work_dir), timeout_s=1500)

    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    counts = demo_counts(work_dir)
    accounted = (
        counts["appended_commands"]
        + counts["rejected_commands"]
        + counts["dead_letters"]
    )
    assert accounted == 336_776


def retail_expectations(path: Path, limit: int | None) -> pd.DataFrame:
    """Return per-customer lines and spend in pence computed with pandas alone."""
    frame = pd.read_parquet(path)
    if limit is not None:
        frame = frame.head(limit)
    frame = frame[frame["CustomerID"].notna()].copy()
    frame["customer_id"] = frame["CustomerID"].astype(int).astype(str)
    return frame.groupby("customer_id").size().rename("lines").to_frame()


def run_retail_demo(
    work_dir: Path, retail: Path, limit: int | None
) -> subprocess.CompletedProcess[str]:
    args = [
        "demo",
        "--work-dir",
        str(work_dir),
        "--input",
        str(retail),
        "--mapping",
        "retail",
    ]
    if limit is not None:
        args += ["--limit", str(limit)]
    return run_cli(*args, timeout_s=1500)


def check_retail_store(work_dir: Path, retail: Path, limit: int | None) -> None:
    """Check that every line is recorded and customer totals equal a fold of rows."""
    commands = list(iter_commands(str(retail), "retail", limit=limit))
    counts = demo_counts(work_dir)
    accounted = (
        counts["appended_commands"]
        + counts["rejected_commands"]
        + counts["dead_letters"]
    )
    assert accounted == len(commands)

    expected = retail_expectations(retail, limit)
    assert counts["dead_letters"] == len(commands) - int(expected["lines"].sum())

    store = EventStore(f"sqlite:///{work_dir / 'events.db'}")
    snapshots = SnapshotStore(str(work_dir / "snapshots"))
    frame = store.to_dataframe()
    try:
        events_per_customer = frame.groupby("aggregate_id").size()
        for customer_id, row in expected.iterrows():
            aggregate = load_aggregate(
                Customer, str(customer_id), store, snapshots
            ).aggregate
            assert aggregate.version == events_per_customer.get(customer_id, 0), (
                customer_id
            )
            assert aggregate.version <= row["lines"], customer_id
        purchases = frame[frame["event_type"] == "ItemPurchased"]
        pence = purchases["payload"].map(
            lambda p: round(p["quantity"] * p["unit_price"] * 100)
        )
        spend_from_events = pence.groupby(purchases["aggregate_id"]).sum()
        frame_source = pd.read_parquet(retail)
        if limit is not None:
            frame_source = frame_source.head(limit)
        bought = frame_source[
            frame_source["CustomerID"].notna()
            & (frame_source["Quantity"] > 0)
            & (frame_source["UnitPrice"] > 0)
            & ~frame_source["InvoiceNo"].astype(str).str.startswith(("C", "A"))
        ].copy()
        bought["customer_id"] = bought["CustomerID"].astype(int).astype(str)
        bought["pence"] = (
            (bought["Quantity"] * bought["UnitPrice"] * 100).round().astype(int)
        )
        spend_from_file = bought.groupby("customer_id")["pence"].sum()
        pd.testing.assert_series_equal(
            spend_from_events.sort_index().astype(int),
            spend_from_file.sort_index().astype(int),
            check_names=False,
        )
    finally:
        store.close()


def test_demo_retail_slice_matches_groupby(
    tmp_path: Path, retail_parquet: Path
) -> None:
    """20,000 retail lines through the streaming job match a pandas groupby."""
    work_dir = tmp_path / "retail"
    finished = run_retail_demo(work_dir, retail_parquet, limit=20_000)

    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    check_retail_store(work_dir, retail_parquet, limit=20_000)


@pytest.mark.slow
def test_demo_retail_file_matches_groupby(tmp_path: Path, retail_parquet: Path) -> None:
    """All 541,909 retail lines through the streaming job match a pandas groupby."""
    work_dir = tmp_path / "retail"
    finished = run_retail_demo(work_dir, retail_parquet, limit=None)

    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    check_retail_store(work_dir, retail_parquet, limit=None)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[hosts]\nmax_hosts = 0\n", "hosts.max_hosts = 0"),
        ('[kafka]\ntopics = "shop-commands"\n', "kafka.topics"),
        ('[kafka]\nbootstrap = "x"\n', "kafka.bootstrap is not a setting"),
        (
            '[aggregates.Shop]\nafter_event = "sometimes"\n',
            "aggregates.Shop.after_event",
        ),
        ('[aggregates.Shop]\nclass = "nowhere:Shop"\n', "aggregates.Shop.class"),
        ("[hosts]\nmin_hosts = 3\nmax_hosts = 2\n", "hosts.min_hosts = 3"),
        ("not toml [", "is not valid TOML"),
    ],
)
def test_run_rejects_bad_setting(tmp_path: Path, text: str, named: str) -> None:
    """A wrong setting stops ``run`` before anything starts, naming the setting."""
    config = tmp_path / "job.toml"
    config.write_text(text)

    finished = run_cli("run", "--config", str(config), timeout_s=60)

    assert finished.returncode == 2
    assert named in finished.stderr
    assert "Traceback" not in finished.stderr


@pytest.mark.parametrize(
    ("option", "value"),
    [("--limit", "-5"), ("--num-ingestors", "0"), ("--timeout", "nan")],
)
def test_demo_rejects_bad_option(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad option stops the demo before it starts a broker, naming the option."""
    with pytest.raises(SystemExit) as stopped:
        main(["demo", option, value])

    assert stopped.value.code == 2
    assert option in capsys.readouterr().err


def test_config_output_into_closed_pipe() -> None:
    """A reader that stops early (`| head -1`) gets no traceback on stderr."""
    finished = subprocess.run(
        f"{sys.executable} -m pipeline config | head -1",
        shell=True,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert finished.stdout.strip()
    assert "Traceback" not in finished.stderr
    assert "BrokenPipeError" not in finished.stderr


def test_config_check_accepts_valid_file(tmp_path: Path) -> None:
    config = tmp_path / "job.toml"
    config.write_text('[aggregates.Shop]\nafter_event = "stop"\nsnapshot_every = 10\n')

    finished = run_cli("config", "--check", str(config), timeout_s=60)

    assert finished.returncode == 0, finished.stderr
    assert "valid" in finished.stdout


def produce_workload(
    bootstrap: str, topic: str, commands: list[dict[str, Any]]
) -> dict[int, list[tuple[int, str]]]:
    """Produce commands keyed by shop; return (offset, command_id) per partition."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=10, enable_idempotence=False, acks=1
    )
    futures = [
        (
            producer.send(
                topic, key=c["shop_id"].encode(), value=json.dumps(c).encode()
            ),
            c["command_id"],
        )
        for c in commands
    ]
    producer.flush()
    producer.close()
    placed: dict[int, list[tuple[int, str]]] = {}
    for future, command_id in futures:
        metadata = future.get(timeout=30)
        placed.setdefault(metadata.partition, []).append((metadata.offset, command_id))
    return placed


def committed(bootstrap: str, group: str) -> dict[int, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets({group: None}).get(group, {})
    finally:
        admin.close()
    return {
        tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0
    }


def start_run(config: Path, log: Path) -> subprocess.Popen[bytes]:
    handle = open(log, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--config", str(config)],
        cwd=REPO_ROOT,
        stdout=handle,
        stderr=subprocess.STDOUT,
    )


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    msg = f"timed out after {timeout_s}s waiting for {what}"
    raise AssertionError(msg)


def test_sigterm_commits_only_durable(
    tmp_path: Path, kafka_broker: str, kafka_topic: Any
) -> None:
    """SIGTERM commits only durable offsets; a second run records nothing twice."""
    topic = kafka_topic(8)
    group = f"group-{topic}"
    database = f"sqlite:///{tmp_path / 'events.db'}"
    snapshots = str(tmp_path / "snapshots")
    config = tmp_path / "job.toml"
    config.write_text(
        f'work_dir = "{tmp_path / "work"}"\n'
        f'[kafka]\nbootstrap_servers = "{kafka_broker}"\ntopics = ["{topic}"]\n'
        f'group_id = "{group}"\ncommit_interval_s = 0.5\nmax_batch_commands = 200\n'
        f'[store]\ndatabase_url = "{database}"\nsnapshot_url = "{snapshots}"\n'
        "[ray]\nnum_cpus = 2\n"
        '[aggregates.Shop]\nafter_event = "stop"\nsnapshot_every = 10\n'
    )
    messages = list(generate_commands(300, 20_000, note_bytes=64))
    placed = produce_workload(kafka_broker, topic, messages)
    log = tmp_path / "run.log"

    def appended() -> int:
        store = EventStore(database)
        try:
            return store.counts()["appended_commands"]
        finally:
            store.close()

    first = start_run(config, log)
    try:
        wait_for(
            lambda: appended() > 2_000, 180, "the first run to append 2,000 commands"
        )
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert "follow it with: raysource top --address 127.0.0.1:" in log.read_text()

    offsets = committed(kafka_broker, group)
    store = EventStore(database)
    recorded = set(store.find_commands(m["command_id"] for m in messages))
    store.close()
    assert offsets, "the first run committed nothing"
    for partition, committed_offset in offsets.items():
        below = [
            command_id
            for offset, command_id in placed[partition]
            if offset < committed_offset
        ]
        missing = [command_id for command_id in below if command_id not in recorded]
        assert not missing, (
            f"partition {partition} committed past {len(missing)} commands not durable"
        )
    assert len(recorded) < len(messages), "the first run should stop before the end"

    ends = {
        partition: max(offset for offset, _ in rows) + 1
        for partition, rows in placed.items()
    }
    second = start_run(config, log)
    try:
        wait_for(
            lambda: all(
                committed(kafka_broker, group).get(p, 0) >= end
                for p, end in ends.items()
            ),
            300,
            "the second run to commit every partition",
        )
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        if second.poll() is None:
            second.kill()

    commands = [Shop.command_from_message(m) for m in messages]
    assert_store_matches_fold(database, snapshots, commands)
