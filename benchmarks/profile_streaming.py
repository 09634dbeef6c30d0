"""Profile a streaming run and the single-process ceiling with py-spy.

Starts a local Tansu broker, produces workload commands, then:

1. runs the streaming job over them while ``py-spy record`` samples the
   ingestor and every host, and
2. runs the ceiling loop of ``raysource bench`` under ``py-spy record``.

It prints, per process, the functions with the most samples (self and
inclusive) and keeps the raw stacks (``*.txt``, one stack a line, for
flamegraph tools) in the output folder. With ``--gil`` (the default), only
samples of the thread holding the GIL count, which shows where Python spends
CPU rather than where threads wait.

    python benchmarks/profile_streaming.py --shops 100000 --commands 100000

py-spy is not a dependency of raysource: ``pip install py-spy``.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import ray

from aggregates.workload import generate_commands
from pipeline._bench_settings import BenchSettings, job_config
from pipeline.broker import KafkaBroker
from pipeline.job import StreamingJob
from pipeline.producer import create_topic, produce_commands

TOPIC = "profile-commands"


def main() -> int:
    args = _parser().parse_args()
    if shutil.which("py-spy") is None:
        print(
            "py-spy not found on PATH; install it with: pip install py-spy",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    broker = KafkaBroker(log_path=out / "broker.log")
    bootstrap = broker.start()
    try:
        create_topic(bootstrap, TOPIC, 8)
        commands = generate_commands(args.shops, args.commands, 42, args.note_bytes)
        ends = produce_commands(bootstrap, TOPIC, commands, "shop_id")
        print(f"produced {sum(ends.values()):,} commands to {TOPIC}")
        _profile_job(args, out, bootstrap, ends, broker.pid)
        _profile_ceiling(args, out, bootstrap, ends)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        broker.stop()
    return 0


def _profile_job(
    args: argparse.Namespace,
    out: Path,
    bootstrap: str,
    ends: dict[int, int],
    broker_pid: int | None,
) -> None:
    settings = BenchSettings(out_dir=out, num_hosts=args.num_hosts)
    (out / "job").mkdir()
    config = job_config(settings, bootstrap, TOPIC, out / "job", args.lifespan, 10**9)
    expected = {(TOPIC, partition): end for partition, end in ends.items()}
    job = StreamingJob(
        config, expected_ends=expected, exclude_pids=[broker_pid] if broker_pid else []
    )
    job.start()
    recorders = []
    try:
        pids = {"ingestor": ray.get(job.ingestors[0].status.remote())["pid"]}
        handles = ray.get(job.controller.host_handles.remote())
        for host_id, handle in handles.items():
            pids[host_id] = ray.get(handle.status.remote())["pid"]
        for name, pid in pids.items():
            recorders.append(
                (name, _record(out / f"{name}.txt", args, ["--pid", str(pid)]))
            )
        job.wait(threading.Event(), timeout_s=3600)
    finally:
        summary = job.stop()
        for _, recorder in recorders:
            recorder.wait()
    print(
        f"\nstreaming job: {summary['commands_per_s']:,.0f} commands/s over "
        f"{summary['elapsed_s']:,.1f}s"
    )
    for name, _ in recorders:
        _print_top(out / f"{name}.txt", name, args.top)


def _profile_ceiling(
    args: argparse.Namespace, out: Path, bootstrap: str, ends: dict[int, int]
) -> None:
    work = out / "ceiling"
    work.mkdir()
    params = {
        "bootstrap_servers": bootstrap,
        "topic": TOPIC,
        "group_id": f"profile-ceiling-{uuid.uuid4().hex[:8]}",
        "ends": {str(p): e for p, e in ends.items()},
        "database_url": f"sqlite:///{work / 'events.db'}",
    }
    (work / "params.json").write_text(json.dumps(params))
    command = [
        sys.executable,
        "-m",
        "pipeline._bench_ceiling",
        str(work / "params.json"),
        str(work / "result.json"),
    ]
    # The ceiling runs from start to end under py-spy, so no duration is given.
    recorder = _record(out / "ceiling.txt", args, ["--", *command], duration=False)
    recorder.wait()
    result = json.loads((work / "result.json").read_text())
    print(
        f"\nceiling: {result['commands_per_s']:,.0f} commands/s over "
        f"{result['elapsed_s']:,.1f}s"
    )
    _print_top(out / "ceiling.txt", "ceiling", args.top)


def _record(
    path: Path, args: argparse.Namespace, target: list[str], duration: bool = True
) -> subprocess.Popen[bytes]:
    command = [
        "py-spy",
        "record",
        "--format",
        "raw",
        "--rate",
        str(args.rate),
        "--output",
        str(path),
    ]
    if args.gil:
        command.append("--gil")
    if duration:
        command += ["--duration", str(args.duration)]
    return subprocess.Popen(
        command + target, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _print_top(path: Path, name: str, top: int) -> None:
    """Print the functions with the most samples in a raw py-spy file."""
    if not path.exists():
        print(f"{name}: no profile written to {path}")
        return
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    print(f"\n{name}: {total:,} samples")
    print("  self")
    for frame, count in own.most_common(top):
        print(f"    {100 * count / total:5.1f}%  {frame}")
    print("  inclusive")
    for frame, count in inclusive.most_common(top):
        print(f"    {100 * count / total:5.1f}%  {frame}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--shops", type=int, default=100_000, help="number of shops")
    add("--commands", type=int, default=100_000, help="commands to produce")
    add("--note-bytes", type=int, default=2048, help="PlaceOrder note size")

    add("--num-hosts", type=int, default=2, help="aggregate hosts")
    add(
        "--lifespan",
        default="infinity",
        choices=("infinity", "idle", "stop"),
        help="Shop lifespan of the streaming run",
    )

    add(
        "--duration",
        type=int,
        default=20,
        help="seconds py-spy samples each process of the streaming run",
    )
    add("--rate", type=int, default=100, help="samples per second")
    add(
        "--no-gil",
        dest="gil",
        action="store_false",
        help="count every thread's samples, not only the GIL holder's",
    )
    add("--top", type=int, default=25, help="functions listed per process")
    add("--out", default="profile-results", help="folder for raw profiles")
    return parser


if __name__ == "__main__":
    started = time.time()
    code = main()
    print(f"\nprofiled in {time.time() - started:,.0f}s")
    sys.exit(code)
