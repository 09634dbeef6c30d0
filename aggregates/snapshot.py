"""Snapshot policies: when to snapshot an aggregate and which snapshots count.

Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class SnapshotPolicy(Protocol):
    """When a snapshot is due, and the state-shape version snapshots must carry.

    ``snapshot_version`` is bumped when the state's shape changes: snapshots of
    another version are ignored (full replay) and replaced.
    """

    @property
    def snapshot_version(self) -> int: ...

    def is_due(self, base_version: int, version: int) -> bool:
        """Return whether to snapshot at ``version``.

        ``base_version`` is the stream version of the latest snapshot known for
        the aggregate (the one it was loaded from, or the last one written; 0 if
        none). Counting from it, not from the start of each incarnation, means
        an aggregate stopped after every command is still snapshotted only once
        every N events.
        """
        ...


@dataclass(frozen=True)
class EveryNEvents:
    """Snapshot once ``snapshot_every`` events have followed the latest snapshot.

    ``snapshot_every = 0`` turns snapshots off.
    """

    snapshot_every: int = 100
    snapshot_version: int = 1

    def __post_init__(self) -> None:
        if self.snapshot_every < 0:
            msg = (
                f"snapshot_every = {self.snapshot_every} is invalid: "
                "use 0 (off) or more"
            )
            raise ValueError(msg)
        if self.snapshot_version < 1:
            msg = (
                f"snapshot_version = {self.snapshot_version} is invalid: use 1 or more"
            )
            raise ValueError(msg)

    def is_due(self, base_version: int, version: int) -> bool:
        if self.snapshot_every == 0:
            return False
        return version - base_version >= self.snapshot_every


DEFAULT_SNAPSHOT_POLICY: SnapshotPolicy = EveryNEvents()
