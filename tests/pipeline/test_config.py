"""Config validation: a wrong TOML setting raises ConfigError naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, JobConfig, load_config


def load_toml(tmp_path: Path, text: str) -> JobConfig:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return load_config(path)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("sample_interval_s = nan\n", "sample_interval_s = nan"),
        ("[kafka]\ncommit_interval_s = inf\n", "kafka.commit_interval_s = inf"),
        ("[kafka]\ndrain_timeout_s = +inf\n", "kafka.drain_timeout_s = inf"),
        ("[hosts]\nnum_cpus = -inf\n", "hosts.num_cpus = -inf"),
        ("[kafka]\nresume_below_fraction = nan\n", "kafka.resume_below_fraction"),
    ],
)
def test_float_setting_rejects_non_finite(
    tmp_path: Path, text: str, named: str
) -> None:
    with pytest.raises(ConfigError, match="expected a finite number") as raised:
        load_toml(tmp_path, text)

    assert named in str(raised.value)


def test_dead_letter_topic_rejects_consumed_topic(tmp_path: Path) -> None:
    text = '[kafka]\ntopics = ["orders", "refunds"]\ndead_letter_topic = "refunds"\n'

    with pytest.raises(ConfigError, match="kafka.dead_letter_topic = 'refunds'"):
        load_toml(tmp_path, text)


@pytest.mark.parametrize(
    ("value", "named", "expected"),
    [
        ('"lots"', "hosts.resources.gpu = 'lots'", "expected a number"),
        ("true", "hosts.resources.gpu = True", "expected a number"),
        ("-1", "hosts.resources.gpu = -1.0", "expected at least 0.0"),
        ("inf", "hosts.resources.gpu = inf", "expected a finite number"),
    ],
)
def test_resources_rejects_bad_amount(
    tmp_path: Path, value: str, named: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected) as raised:
        load_toml(tmp_path, f"[hosts]\nresources = {{gpu = {value}}}\n")

    assert named in str(raised.value)


def test_resources_accepts_valid_amounts(tmp_path: Path) -> None:
    text = "[hosts]\nresources = {gpu = 1, ingest = 0.5}\n"

    config = load_toml(tmp_path, text)

    assert config.hosts.resources == {"gpu": 1, "ingest": 0.5}
