"""The single-process ceiling of ``raysource bench``: the job's work without Ray.

``run_ceiling_subprocess`` starts ``python -m pipeline._bench_ceiling PARAMS
RESULT``, which runs ``run_ceiling_loop`` with the keyword arguments in the
JSON file PARAMS and writes its figures to RESULT as JSON. Imports only the
standard library and ``pipeline._bench_settings`` at module level, and
kafka-python, the decoder and the event store inside the loop.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline._bench_settings import SHOP_CLASS, SHOP_TYPE

_CEILING_POLL_RECORDS = 1000


def run_ceiling_loop(
    bootstrap_servers: str,
    topic: str,
    group_id: str,
    ends: Mapping[int, int],
    database_url: str,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Consume ``topic`` in one process without Ray: decode, execute, append, commit.

    Aggregates stay in a dict for the whole run (an INFINITY lifespan, no
    snapshots). Records are decoded and validated by the job's own Decoder.
    Each poll of up to 1,000 records becomes one event-store append, and the
    polled offsets are committed once the append has returned. The loop ends
    when every partition has been read up to ``ends``. Timing runs from the
    first record read to the last commit. ``peak_rss_bytes`` in the returned
    figures is this process's peak resident memory.
    """
    from kafka import KafkaConsumer, OffsetAndMetadata

    from pipeline.config import config_from_dict
    from pipeline.decoding import DecodeFailure, Decoder
    from pipeline.registry import AggregateRegistry
    from store.event_store import DeadLetter, EventStore

    config = config_from_dict({"aggregates": {SHOP_TYPE: {"class": SHOP_CLASS}}})
    decoder = Decoder.from_config(config)
    registry = AggregateRegistry.from_config(config.aggregates)
    store = EventStore(database_url)
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        client_id="raysource-bench-ceiling",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        max_poll_records=_CEILING_POLL_RECORDS,
    )
    consumer.subscribe([topic])
    aggregates: dict[tuple[str, str], Any] = {}
    read_up_to: dict[int, int] = {}
    first_read_at: float | None = None
    last_commit_at = 0.0
    deadline = time.monotonic() + timeout_s
    try:
        while any(read_up_to.get(p, 0) < end for p, end in ends.items()):
            if time.monotonic() > deadline:
                msg = (
                    f"ceiling loop did not read {topic} to its end within {timeout_s}s"
                )
                raise TimeoutError(msg)
            polled = consumer.poll(timeout_ms=100, max_records=_CEILING_POLL_RECORDS)
            if not polled:
                continue
            if first_read_at is None:
                first_read_at = time.time()
            records, letters, offsets = [], [], {}
            for partition, batch in polled.items():
                for record in batch:
                    item = decoder.decode(
                        partition.topic,
                        partition.partition,
                        record.offset,
                        record.key,
                        record.value,
                    )
                    if isinstance(item, DecodeFailure):
                        letters.append(
                            DeadLetter(
                                item.reason,
                                record.value,
                                record.key,
                                partition.topic,
                                partition.partition,
                                record.offset,
                            )
                        )
                    else:
                        records.append(_execute(aggregates, registry, item))
                offsets[partition] = OffsetAndMetadata(batch[-1].offset + 1, "", -1)
            store.append(records)
            store.record_dead_letters(letters)
            consumer.commit(offsets)
            last_commit_at = time.time()
            for partition, meta in offsets.items():
                read_up_to[partition.partition] = meta.offset
        counts = store.counts()
    finally:
        consumer.close()
        store.close()
    accounted = sum(
        counts[key]
        for key in ("appended_commands", "rejected_commands", "dead_letters")
    )
    elapsed = max(last_commit_at - (first_read_at or last_commit_at), 1e-9)
    return {
        "accounted": accounted,
        "events": counts["events"],
        "rejected_commands": counts["rejected_commands"],
        "dead_letters": counts["dead_letters"],
        "live_aggregates": len(aggregates),
        "elapsed_s": elapsed,
        "commands_per_s": accounted / elapsed,
        # ru_maxrss is in kilobytes on Linux.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _execute(aggregates: dict[tuple[str, str], Any], registry: Any, item: Any) -> Any:
    """Execute one command, creating its aggregate on first use; return its record."""
    from aggregates.errors import DomainError
    from store.event_store import CommandRecord

    command = item.command
    key = (item.aggregate_type, command.aggregate_id)
    aggregate = aggregates.get(key)
    if aggregate is None:
        aggregate_class = registry.get(item.aggregate_type).cls
        aggregate = aggregates[key] = aggregate_class(command.aggregate_id)
    version = aggregate.version
    try:
        events = aggregate.execute(command)
    except DomainError as error:
        return CommandRecord(
            command.command_id, key[0], key[1], version, (), str(error)
        )
    for event in events:
        aggregate.apply(event)
    return CommandRecord(command.command_id, key[0], key[1], version, events)


def run_ceiling_subprocess(
    params: Mapping[str, Any], work_dir: Path, timeout_s: float
) -> dict[str, Any]:
    """Run ``run_ceiling_loop`` in a new Python process and return its figures.

    A process of its own keeps the driver's memory, and Ray's, out of the
    ceiling's peak RSS. ``params`` are the loop's keyword arguments.
    """
    params_path = work_dir / "ceiling_params.json"
    result_path = work_dir / "ceiling_result.json"
    ends = {str(partition): end for partition, end in params["ends"].items()}
    params_path.write_text(json.dumps({**params, "ends": ends}))
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline._bench_ceiling",
            str(params_path),
            str(result_path),
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if completed.returncode != 0 or not result_path.exists():
        msg = (
            f"ceiling process failed with exit code {completed.returncode}; "
            f"the end of its error output:\n{completed.stderr[-2000:]}"
        )
        raise RuntimeError(msg)
    result: dict[str, Any] = json.loads(result_path.read_text())
    return result


def _ceiling_main(argv: Sequence[str]) -> int:
    """Run the ceiling in this process: read parameters, run, write the figures."""
    params_path, result_path = argv
    params = json.loads(Path(params_path).read_text())
    ends = {int(partition): int(end) for partition, end in params.pop("ends").items()}
    result = run_ceiling_loop(ends=ends, **params)
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_ceiling_main(sys.argv[1:]))
