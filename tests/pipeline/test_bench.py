"""The bench's plumbing on tiny inputs: result shapes, not speed."""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aggregates.workload import generate_commands
from pipeline._bench_ceiling import run_ceiling_subprocess
from pipeline._bench_figures import (
    evaluate_targets,
    hosts_memory_above_idle,
    pair_ratios,
    scaling_growth,
    spread,
)
from pipeline.bench import register, settings_from_args
from pipeline.cli import main
from pipeline.producer import produce_commands

MIB = 1024 * 1024


def host_sample(**rss_mib: int) -> dict[str, Any]:
    return {"hosts": {host: {"rss_bytes": mib * MIB} for host, mib in rss_mib.items()}}


def test_load_suite_writes_results(tmp_path: Path) -> None:
    """A load of 300 events: full replay reads them all, the snapshot leaves 99."""
    out = tmp_path / "bench"

    code = main(
        [
            "bench",
            "--suite",
            "load",
            "--load-events",
            "300",
            "--runs",
            "2",
            "--out",
            str(out),
        ]
    )

    assert code == 0
    results = json.loads((out / "results.json").read_text())
    load = results["load"]
    assert load["num_events"] == 300
    assert load["states_equal"] is True
    assert load["full_replay"]["events_replayed"] == 300
    assert load["from_snapshot"]["events_replayed"] == 99
    for mode in ("full_replay", "from_snapshot"):
        seconds = load[mode]["seconds"]
        assert len(seconds["values"]) == 2
        assert seconds["min"] <= seconds["median"] <= seconds["max"]
        assert load[mode]["peak_traced_bytes"] > 0
    assert load["speedup"] > 0
    assert [t["name"] for t in results["targets"]] == [
        "snapshot load speedup over full replay"
    ]
    assert results["machine"]["cpus"] >= 1
    assert not (out / "load").exists(), (
        "the load store is deleted without --keep-stores"
    )


def test_ceiling_loop_accounts_every_command(
    kafka_broker: str, kafka_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = kafka_topic()
    commands = generate_commands(20, 300, seed=7, note_bytes=64)
    ends = produce_commands(kafka_broker, topic, commands, "shop_id")
    params = {
        "bootstrap_servers": kafka_broker,
        "topic": topic,
        "group_id": f"test-ceiling-{uuid.uuid4().hex}",
        "ends": ends,
        "database_url": f"sqlite:///{tmp_path / 'events.db'}",
        "timeout_s": 120.0,
    }

    result = run_ceiling_subprocess(params, tmp_path, timeout_s=180.0)

    assert result["accounted"] == 300
    assert result["events"] + result["rejected_commands"] == 300
    assert result["dead_letters"] == 0
    assert result["live_aggregates"] <= 20
    assert result["elapsed_s"] > 0
    assert result["commands_per_s"] > 0
    assert result["peak_rss_bytes"] > 10 * MIB


def test_unknown_suite_rejected(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--suite 'speed' is invalid"):
        main(["bench", "--suite", "speed", "--out", str(tmp_path)])


def test_bench_leaves_running_ray(tmp_path: Path, ray_session: Any) -> None:
    """The bench shuts down only a Ray that it started itself."""
    import ray

    gcs_address = ray_session.address_info["gcs_address"]
    arguments = ["--suite", "load", "--load-events", "200", "--runs", "1"]

    code = main(["bench", *arguments, "--out", str(tmp_path)])

    assert code == 0
    assert ray.is_initialized()
    assert ray.get_runtime_context().gcs_address == gcs_address


def parse_bench(*arguments: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["bench", *arguments])


def test_max_live_zero_allowed() -> None:
    """--max-live 0 is the setting that skips the limited lifespan variants."""
    settings = settings_from_args(parse_bench("--max-live", "0"))
    assert settings.max_live_aggregates == 0


def test_max_live_negative_rejected() -> None:
    with pytest.raises(SystemExit):
        parse_bench("--max-live", "-1")


def test_memory_above_idle_per_host() -> None:
    """Each host counts from its first nonzero RSS; 0 means not polled yet."""
    samples = [
        host_sample(a=0, b=0),
        host_sample(a=100, b=120),
        host_sample(a=150, b=125),
        host_sample(a=130, b=160, c=90),
        host_sample(a=110, b=121, c=200),
    ]

    idle, above = hosts_memory_above_idle(samples)

    assert idle == (100 + 120 + 90) * MIB
    assert above == (10 + 1 + 110) * MIB


def test_spread_and_pair_ratios() -> None:
    streaming = [{"commands_per_s": rate} for rate in (800.0, 900.0, 1000.0)]
    ceiling = [{"commands_per_s": rate} for rate in (1000.0, 1000.0, 1000.0)]

    ratios = pair_ratios(streaming, ceiling)

    assert ratios["median"] == pytest.approx(0.9)
    assert ratios["min"] == pytest.approx(0.8)
    assert ratios["max"] == pytest.approx(1.0)
    assert spread([3.0, 1.0, 2.0]) == {
        "median": 2.0,
        "min": 1.0,
        "max": 3.0,
        "values": [3.0, 1.0, 2.0],
    }


def test_targets_from_scaling_and_lifespans() -> None:
    def run(hosts_mib: int, above_mib: int) -> dict[str, Any]:
        return {
            "peak_hosts_rss_bytes": hosts_mib * MIB,
            "hosts_rss_above_idle_bytes": above_mib * MIB,
            "peak_job_rss_bytes": 2000 * MIB,
            "peak_live_aggregates": 10,
        }

    by_shops = {
        "10000": {"variants": {"infinity": run(400, 100), "stop": run(320, 20)}},
        "1000000": {"variants": {"infinity": run(900, 600), "stop": run(330, 40)}},
    }
    results = {
        "settings": {"scale": "medium"},
        "scaling": {"growth": scaling_growth(by_shops)},
        "lifespans": {"variants": {"infinity": run(900, 600), "stop": run(300, 30)}},
    }

    targets = {t["name"]: t for t in evaluate_targets(results)}

    infinity = targets[
        "infinity: hosts_rss_above_idle_bytes at 1,000,000 / 10,000 shops"
    ]
    assert infinity["measured"] == pytest.approx(6.0)
    assert infinity["met"] is True
    stop = targets["stop: hosts_rss_above_idle_bytes at 1,000,000 / 10,000 shops"]
    assert stop["measured"] == pytest.approx(2.0)
    assert stop["met"] is False
    factor = targets["infinity / stop, hosts_rss_above_idle_bytes"]
    assert factor["measured"] == pytest.approx(20.0)
    assert factor["met"] is True
