"""Rows of a backfill: file rows or topic records, as commands or dead letters.

A ``FileSource`` reads JSON lines, CSV or Parquet; a ``TopicSource`` reads a
range of a Kafka topic. Both yield, in source order, one entry per row: a
``BatchItem`` for a valid command, or a ``DeadLetter`` with the reason when
the row cannot be decoded or validated. Ray, pandas and kafka-python are
imported only inside functions, so that ``raysource --help`` stays fast.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import JobConfig
from pipeline.protocol import BatchItem

if TYPE_CHECKING:
    from pipeline.registry import AggregateRegistry
    from pipeline.sources import SourceMapping
    from store.event_store import DeadLetter

DEFAULT_IDLE_TIMEOUT_S = 5.0
JSON_LINES_SUFFIXES = (".jsonl", ".json", ".ndjson")

_POLL_TIMEOUT_MS = 200


@dataclass(frozen=True)
class TopicRange:
    """A range of a Kafka topic to backfill from.

    Offsets are per partition: ``from_offset`` is the first offset read and
    ``to_offset`` the first offset not read. Timestamps select, per
    partition, the records from the first one stamped at or after
    ``from_timestamp`` up to the first one stamped at or after
    ``to_timestamp``, as Kafka's offsets-for-times lookup does. A bound left
    as None means the start or the end of the partition. A partition whose
    end is open is finished once it has returned no record for
    ``idle_timeout_s`` and the consumer has passed the broker's reported end
    offset.
    """

    topic: str
    bootstrap_servers: str
    partitions: tuple[int, ...] | None = None
    from_offset: int | None = None
    to_offset: int | None = None
    from_timestamp: datetime | None = None
    to_timestamp: datetime | None = None
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S

    def __post_init__(self) -> None:
        has_offsets = self.from_offset is not None or self.to_offset is not None
        has_times = self.from_timestamp is not None or self.to_timestamp is not None
        if has_offsets and has_times:
            msg = "a topic range takes offsets or timestamps, not both"
            raise ValueError(msg)
        for name in ("from_offset", "to_offset"):
            value = getattr(self, name)
            if value is not None and value < 0:
                msg = f"{name} must be at least 0, got {value}"
                raise ValueError(msg)


class RowSource:
    """Rows of one source, each yielded as a BatchItem or a DeadLetter, in order.

    ``label`` names the source in logs and summaries. ``rows_total`` is the
    number of rows to read, or None when it is not known before reading.
    """

    label: str
    rows_total: int | None

    def __iter__(self) -> Iterator[BatchItem | DeadLetter]:
        raise NotImplementedError


@dataclass(frozen=True)
class _Invalid:
    """A row that could not be decoded at all, with the reason."""

    reason: str


def command_item(
    message: Any, registry: AggregateRegistry, source: Mapping[str, Any] | None = None
) -> BatchItem | str:
    """Validate a flat command dict into a BatchItem, or return why it is invalid.

    The aggregate type is the one whose class handles the message's ``type``.
    ``source`` adds metadata (topic, partition, offset) and a default
    ``command_id``, as in ``Aggregate.command_from_message``.
    """
    from aggregates.errors import InvalidCommandError
    from aggregates.messages import require_id

    if isinstance(message, _Invalid):
        return message.reason
    if not isinstance(message, Mapping):
        return f"a command must be a JSON object, got {type(message).__name__}"
    try:
        command_type = require_id(message, "type")
    except InvalidCommandError as error:
        return str(error)
    spec = registry.for_command(command_type)
    if spec is None:
        known = ", ".join(sorted(registry.specs)) or "none"
        return (
            f"unknown command type {command_type!r}: no configured aggregate type "
            f"handles it (configured: {known})"
        )
    try:
        command = spec.cls.command_from_message(message, source)
    except InvalidCommandError as error:
        return str(error)
    return BatchItem(spec.name, command)


# -- files ----------------------------------------------------------------------


class FileSource(RowSource):
    """Rows of a JSON-lines, CSV or Parquet file, or of a mapping's own data set.

    A dead letter stores the file's absolute path as its topic, partition 0
    and the row number (from 0) as its offset, so a second run over the same
    file stores each dead letter once.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        mapping: SourceMapping,
        registry: AggregateRegistry,
        limit: int | None,
        chunk_rows: int,
    ) -> None:
        self._path = None if path is None else Path(path).resolve()
        self._mapping = mapping
        self._registry = registry
        self._limit = limit
        self._chunk_rows = chunk_rows
        if self._path is None:
            self.label = f"{mapping.name} data set"
        elif self._path.is_file():
            self.label = str(self._path)
        else:
            msg = f"input file not found: {str(self._path)!r}"
            raise FileNotFoundError(msg)
        self.rows_total = count_rows(self._path, limit)

    def __iter__(self) -> Iterator[BatchItem | DeadLetter]:
        path = self._path
        if path is not None and path.suffix.lower() in JSON_LINES_SUFFIXES:
            messages = self._json_lines_messages(path)
        else:
            messages = self._table_messages()
        for row_number, message, raw in messages:
            item = command_item(message, self._registry)
            if isinstance(item, BatchItem):
                yield item
            else:
                original = message if raw is None else raw
                yield self._dead_letter(row_number, item, original)

    def _table_messages(self) -> Iterator[tuple[int, Any, bytes | None]]:
        # NOTE: a CSV line with the wrong number of fields makes pandas raise,
        # which stops the backfill instead of dead-lettering the line. What came
        # before it is recorded, so a run after the line is fixed continues.
        from pipeline.sources import iter_commands

        commands = iter_commands(
            self._path, self._mapping, self._limit, self._chunk_rows
        )
        for row_number, message in enumerate(commands):
            yield row_number, message, None

    def _json_lines_messages(
        self, path: Path
    ) -> Iterator[tuple[int, Any, bytes | None]]:
        """Yield each non-blank line as a mapped command, or as why it is invalid.

        pandas' JSON-lines reader stops at the first line that is not a JSON
        object, so the lines are parsed one by one here. Blank lines are not
        rows, as in pandas.
        """
        row_number = 0
        with open(path, "rb") as lines:
            for line in lines:
                raw = line.strip()
                if not raw:
                    continue
                if self._limit is not None and row_number >= self._limit:
                    return
                yield row_number, self._map_line(raw, row_number), raw
                row_number += 1

    def _map_line(self, raw: bytes, row_number: int) -> Any:
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            return _Invalid(f"line is not valid JSON: {error}")
        if not isinstance(value, dict):
            return value
        message = self._mapping.row(value, row_number)
        if isinstance(message, dict) and message.get("command_id") is None:
            # NOTE: as in pipeline.sources, the id does not name the file, so a
            # second file with this mapping is skipped as a rerun of the first.
            message["command_id"] = f"{self._mapping.name}-{row_number}"
        return message

    def _dead_letter(self, row_number: int, reason: str, raw: Any) -> DeadLetter:
        from store.event_store import DeadLetter

        if isinstance(raw, bytes):
            value = raw
        else:
            value = json.dumps(raw, default=str, separators=(",", ":")).encode()
        return DeadLetter(reason, value, None, self.label, 0, row_number)


def count_rows(path: Path | None, limit: int | None) -> int | None:
    """Return the rows of a Parquet file from its metadata; None for other files."""
    if path is None or path.suffix.lower() != ".parquet" or not path.is_file():
        return None
    import pyarrow.parquet as pq

    num_rows = int(pq.ParquetFile(path).metadata.num_rows)
    return num_rows if limit is None else min(num_rows, limit)


# -- topics ---------------------------------------------------------------------


class TopicSource(RowSource):
    """Records of a topic range, decoded as the streaming job decodes them.

    ``pipeline.decoding.Decoder`` parses each value as JSON (or with
    ``kafka.decoder``) and validates it. A record's command id, when its value
    has none, is ``<topic>-<partition>-<offset>``, so a second run over the
    same range finds the commands already recorded.
    """

    def __init__(
        self, topic_range: TopicRange, config: JobConfig, limit: int | None
    ) -> None:
        from pipeline.decoding import Decoder

        self._range = topic_range
        self._max_poll_records = config.kafka.max_poll_records
        self._decoder = Decoder.from_config(config)
        self._limit = limit
        self.label = f"topic {topic_range.topic}"
        self.rows_total = None

    def __iter__(self) -> Iterator[BatchItem | DeadLetter]:
        from store.event_store import DeadLetter

        num_read = 0
        for record in iter_topic_records(self._range, self._max_poll_records):
            if self._limit is not None and num_read >= self._limit:
                return
            num_read += 1
            topic, partition, offset = record.topic, record.partition, record.offset
            decoded = self._decoder.decode(
                topic, partition, offset, record.key, record.value
            )
            if isinstance(decoded, BatchItem):
                yield decoded
            else:
                yield DeadLetter(
                    decoded.reason, record.value, record.key, topic, partition, offset
                )


def iter_topic_records(topic_range: TopicRange, max_poll_records: int) -> Iterator[Any]:
    """Yield the records of the range: each partition in offset order, interleaved.

    The consumer is assigned the partitions by hand and belongs to no group,
    so nothing is committed. Raises ValueError when the topic does not exist.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=topic_range.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        client_id="raysource-backfill",
        max_poll_records=max_poll_records,
    )
    try:
        partitions = topic_range.partitions
        if partitions is None:
            found = consumer.partitions_for_topic(topic_range.topic)
            if not found:
                msg = (
                    f"topic {topic_range.topic!r} not found at "
                    f"{topic_range.bootstrap_servers}"
                )
                raise ValueError(msg)
            partitions = tuple(sorted(found))
        tps = [TopicPartition(topic_range.topic, p) for p in partitions]
        consumer.assign(tps)
        ranges = _partition_ranges(consumer, tps, topic_range)
        yield from _read_ranges(consumer, ranges, topic_range.idle_timeout_s)
    finally:
        consumer.close()


@dataclass
class _PartitionRange:
    """The bounds of reading one partition: a start offset, an end offset or times.

    ``start`` is the offset sought first. With ``from_ms``, the records before
    the first one stamped at or after it are skipped. With ``to_ms``, reading
    stops at the first record stamped at or after it. Both are the offsets
    that Kafka's offsets-for-times lookup returns, found by reading.
    """

    start: int
    end: int | None
    from_ms: int | None = None
    to_ms: int | None = None
    is_started: bool = True


def _partition_ranges(
    consumer: Any, tps: list[Any], topic_range: TopicRange
) -> dict[Any, _PartitionRange]:
    beginnings = consumer.beginning_offsets(tps)
    ranges = {tp: _PartitionRange(beginnings[tp], topic_range.to_offset) for tp in tps}
    if topic_range.from_offset is not None:
        for partition_range in ranges.values():
            partition_range.start = max(partition_range.start, topic_range.from_offset)
    if topic_range.from_timestamp is not None:
        from_ms = _epoch_ms(topic_range.from_timestamp)
        found = consumer.offsets_for_times(dict.fromkeys(tps, from_ms))
        for tp in tps:
            if found.get(tp) is None:
                # No record is stamped at or after the start time.
                del ranges[tp]
                continue
            # Tansu 0.6.0 returns the first offset of the record batch, and
            # offset 0 when no record matches, so its result is only where to
            # start reading. The records are then checked one by one.
            ranges[tp].start = found[tp].offset
            ranges[tp].from_ms = from_ms
            ranges[tp].is_started = False
    if topic_range.to_timestamp is not None:
        for partition_range in ranges.values():
            partition_range.to_ms = _epoch_ms(topic_range.to_timestamp)
    return {
        tp: partition_range
        for tp, partition_range in ranges.items()
        if partition_range.end is None or partition_range.start < partition_range.end
    }


def _read_ranges(
    consumer: Any, ranges: dict[Any, _PartitionRange], idle_timeout_s: float
) -> Iterator[Any]:
    """Yield each partition's records in range until every partition is finished.

    Tansu 0.6.0 returns from end_offsets the first offset of the last record
    batch, not the offset after the last record, so that offset is only a
    lower bound of the end. A partition that has no end offset, or whose end
    offset lies past its records, is finished once it has returned no record
    for ``idle_timeout_s`` and the consumer has passed that lower bound.
    """
    consumer.assign(list(ranges))
    if not ranges:
        return
    for tp, partition_range in ranges.items():
        consumer.seek(tp, partition_range.start)
    reported_ends = consumer.end_offsets(list(ranges))
    active = dict(ranges)
    last_record_at = dict.fromkeys(active, time.monotonic())

    while active:
        fetched = consumer.poll(timeout_ms=_POLL_TIMEOUT_MS)
        now = time.monotonic()
        for tp, records in fetched.items():
            if tp not in active:
                continue
            last_record_at[tp] = now
            for record in records:
                state = _range_state(active[tp], record)
                if state == _PAST_END:
                    del active[tp]
                    consumer.pause(tp)
                    break
                if state == _IN_RANGE:
                    yield record

        for tp in list(active):
            position = consumer.position(tp)
            end = active[tp].end
            is_past_end = end is not None and position >= end
            is_idle = now - last_record_at[tp] >= idle_timeout_s
            if is_past_end or (is_idle and position >= reported_ends[tp]):
                del active[tp]
                consumer.pause(tp)


_BEFORE_START, _IN_RANGE, _PAST_END = "before_start", "in_range", "past_end"


def _range_state(partition_range: _PartitionRange, record: Any) -> str:
    if partition_range.end is not None and record.offset >= partition_range.end:
        return _PAST_END
    to_ms = partition_range.to_ms
    if to_ms is not None and record.timestamp >= to_ms:
        return _PAST_END
    if not partition_range.is_started:
        if record.timestamp < (partition_range.from_ms or 0):
            return _BEFORE_START
        partition_range.is_started = True
    return _IN_RANGE


def _epoch_ms(moment: datetime) -> int:
    """Return milliseconds since the epoch, taking a time without an offset as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def parse_timestamp(text: str) -> datetime:
    """Parse an ISO 8601 time, taking a time without a UTC offset as UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        msg = (
            f"invalid timestamp {text!r}: expected ISO 8601, "
            "such as 2024-05-01T12:00:00+00:00"
        )
        raise ValueError(msg) from error
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
