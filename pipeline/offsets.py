"""Track which Kafka offsets are durable and how far each partition may be committed.

An offset is durable once its command's outcome is in the event store
(appended, rejected or a duplicate) or its record is a stored dead letter.
Acknowledgements arrive out of order, because batches to different hosts finish
in any order. The offset to commit for a partition is the one after the longest
run of durable offsets from the start, so a commit never passes a record that
is not durable. Offsets the consumer never returned (compacted records,
transaction markers) do not hold a commit back: only offsets registered as read
count. Pure Python; imports nothing from the project.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable

__all__ = ["OffsetTracker", "PartitionOffsets"]


class PartitionOffsets:
    """The offsets read from one partition during one assignment, and which are durable.

    Offsets must be registered in increasing order, as a consumer returns them.
    ``position`` is the offset after the last one read; ``committed`` is the
    last offset the caller reports as committed. ``is_active`` turns False when
    the partition is revoked, so that late acknowledgements for a revoked
    assignment can be recognised and ignored.
    """

    __slots__ = (
        "partition",
        "is_active",
        "position",
        "committed",
        "_read",
        "_pending",
        "_committable",
    )

    def __init__(self, partition: Hashable) -> None:
        self.partition = partition
        self.is_active = True
        self.position: int | None = None
        self.committed: int | None = None
        self._read: deque[int] = deque()
        self._pending: set[int] = set()
        self._committable: int | None = None

    def register(self, offset: int) -> None:
        """Record that ``offset`` was read and is not durable yet."""
        if self.position is not None and offset < self.position:
            msg = (
                f"offset {offset} of partition {self.partition} is below the next "
                f"expected offset {self.position}; offsets must be registered in order"
            )
            raise ValueError(msg)
        self._read.append(offset)
        self._pending.add(offset)
        self.position = offset + 1

    def register_many(self, offsets: Iterable[int]) -> None:
        """Register increasing offsets, as ``register`` does for each."""
        for offset in offsets:
            self.register(offset)

    def mark_durable(self, offset: int) -> None:
        """Record that the command or dead letter at ``offset`` is durable.

        Raises ValueError if the offset was never registered or is already durable.
        """
        try:
            self._pending.remove(offset)
        except KeyError:
            msg = (
                f"offset {offset} of partition {self.partition} is not awaiting "
                "acknowledgement: it was never registered or is already durable"
            )
            raise ValueError(msg) from None

    def committable(self) -> int | None:
        """Return the next offset to commit, or None if no read offset is durable yet.

        Everything registered below the returned offset is durable.
        """
        read, pending = self._read, self._pending
        while read and read[0] not in pending:
            self._committable = read.popleft() + 1
        return self._committable

    @property
    def num_pending(self) -> int:
        """Offsets read and not yet durable."""
        return len(self._pending)


class OffsetTracker:
    """Per-partition offset tracking for one consumer, across rebalances.

    ``assign`` starts a fresh PartitionOffsets for a partition; ``revoke``
    deactivates it and forgets it. Partition keys are any hashable value, such as
    kafka-python's TopicPartition.
    """

    def __init__(self) -> None:
        self._partitions: dict[Hashable, PartitionOffsets] = {}

    def assign(self, partition: Hashable) -> PartitionOffsets:
        """Start tracking ``partition``; a partition already tracked keeps its state."""
        state = self._partitions.get(partition)
        if state is None:
            state = PartitionOffsets(partition)
            self._partitions[partition] = state
        return state

    def revoke(self, partition: Hashable) -> PartitionOffsets | None:
        """Stop tracking ``partition`` and return its deactivated state, if any."""
        state = self._partitions.pop(partition, None)
        if state is not None:
            state.is_active = False
        return state

    def get(self, partition: Hashable) -> PartitionOffsets | None:
        """Return the state of an assigned partition, or None."""
        return self._partitions.get(partition)

    def register(self, partition: Hashable, offset: int) -> PartitionOffsets:
        """Register one offset read from ``partition``, assigning it first if needed."""
        state = self.assign(partition)
        state.register(offset)
        return state

    def mark_durable(self, partition: Hashable, offset: int) -> None:
        """Mark one offset of an assigned partition durable; KeyError if unassigned."""
        self._partitions[partition].mark_durable(offset)

    def committable(self) -> dict[Hashable, int]:
        """Return, per partition with a durable offset, the next offset to commit."""
        offsets = {}
        for partition, state in self._partitions.items():
            offset = state.committable()
            if offset is not None:
                offsets[partition] = offset
        return offsets

    def partitions(self) -> list[Hashable]:
        """Return the partitions tracked now."""
        return list(self._partitions)

    def states(self) -> list[PartitionOffsets]:
        """Return the state of every tracked partition."""
        return list(self._partitions.values())

    @property
    def num_pending(self) -> int:
        """Offsets read and not yet durable, over all partitions."""
        return sum(state.num_pending for state in self._partitions.values())
