"""Plots of a run's samples: live aggregates and memory over time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

_MIB = 1024 * 1024


def plot_samples(
    runs: dict[str, Sequence[dict[str, Any]]], path: str | Path, title: str = ""
) -> Path:
    """Draw live aggregates and host memory over time, one line per run, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (live_axis, memory_axis) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for label, samples in runs.items():
        elapsed = [s["elapsed_s"] for s in samples]
        live_axis.plot(elapsed, [s["live_aggregates"] for s in samples], label=label)
        memory_axis.plot(
            elapsed, [s["hosts_rss_bytes"] / _MIB for s in samples], label=label
        )
    live_axis.set_ylabel("live aggregates")
    memory_axis.set_ylabel("host memory (MiB RSS)")
    memory_axis.set_xlabel("seconds since start")
    live_axis.legend(loc="upper left")
    live_axis.grid(alpha=0.3)
    memory_axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    output = Path(path)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output
