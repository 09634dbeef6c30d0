"""Snapshots of aggregate state in object storage, through fsspec.

A snapshot is a JSON document (gzip-compressed when the store is built with
``compression="gzip"``) at
``<root>/<aggregate_type>/<aggregate_id>/<snapshot_version>/<stream_version>.json``,
with the type and id percent-encoded (``_path_segment`` also encodes the dots
of "." and ".." and shortens long names). May import ``aggregates``; never
``pipeline`` or Ray. Snapshots are never unpickled or evaluated.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import fsspec
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

DEFAULT_URL = "snapshots"
FORMAT_VERSION = 1
# Linux filesystems such as ext4 limit a file name to 255 bytes, but an id of 256
# characters can take nine times that once percent-encoded, so longer segments
# are shortened.
_MAX_SEGMENT_LENGTH = 200
_KEPT_PREFIX_LENGTH = 120
_LOG_EVERY_READ_FAILURES = 100


@dataclass(frozen=True)
class Snapshot:
    """An aggregate's state as of stream ``version``.

    ``state`` has the state shape numbered ``snapshot_version``.
    """

    aggregate_type: str
    aggregate_id: str
    version: int
    snapshot_version: int
    state: dict[str, Any]
    created_at: str = ""


class SnapshotStore:
    """Save and load the latest snapshot of each aggregate.

    ``url`` is a local folder (the default) or any fsspec URL: ``s3://bucket/prefix``,
    ``memory://name``. ``storage_options`` go to the filesystem (for S3: key,
    secret, client_kwargs with endpoint_url). Saving never replaces a newer
    snapshot; loading treats a missing, truncated or unreadable snapshot as no
    snapshot, with one warning, and falls back to the next older one.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        storage_options: dict[str, Any] | None = None,
        compression: str | None = None,
    ) -> None:
        if compression not in (None, "gzip"):
            msg = f"compression = {compression!r} is invalid: use None or 'gzip'"
            raise ValueError(msg)
        self.url = url
        self.compression = compression
        options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(url, **options)
        self.root = root.rstrip("/")
        self._is_local = isinstance(self.fs, LocalFileSystem)
        self.num_read_failures = 0
        if self._is_local:
            self.fs.makedirs(self.root, exist_ok=True)

    def save(self, snapshot: Snapshot) -> bool:
        """Write a snapshot unless one at the same or a newer version exists.

        Older snapshots of the aggregate, and snapshots of other state-shape
        versions, are deleted after the write. Returns whether it was written.
        """
        return self.save_encoded(snapshot, self.encode(snapshot))

    def encode(self, snapshot: Snapshot) -> bytes:
        """Return the stored form of a snapshot: JSON, gzip-compressed if configured.

        Encoding apart from writing lets a caller copy the state while it owns it
        and leave the write to another thread.
        """
        document = {
            "format": FORMAT_VERSION,
            "aggregate_type": snapshot.aggregate_type,
            "aggregate_id": snapshot.aggregate_id,
            "version": snapshot.version,
            "snapshot_version": snapshot.snapshot_version,
            "created_at": snapshot.created_at or datetime.now(UTC).isoformat(),
            "state": snapshot.state,
        }
        data = json.dumps(document, separators=(",", ":")).encode()
        if self.compression == "gzip":
            data = gzip.compress(data, compresslevel=5)
        return data

    def save_encoded(self, snapshot: Snapshot, data: bytes) -> bool:
        """Write ``data`` from ``encode`` as the snapshot described by ``snapshot``.

        Only the type, id and versions of ``snapshot`` are read, so its state
        may be empty. Returns whether it was written.
        """
        folder = self._folder(
            snapshot.aggregate_type, snapshot.aggregate_id, snapshot.snapshot_version
        )
        existing = self._versions(folder)
        if existing and max(existing) >= snapshot.version:
            return False
        self._write(f"{folder}/{snapshot.version:012d}{self._suffix()}", data)
        self._delete_older(snapshot, existing)
        return True

    def load_latest(
        self, aggregate_type: str, aggregate_id: str, snapshot_version: int
    ) -> Snapshot | None:
        """Return the newest readable snapshot in shape ``snapshot_version``, or None.

        A store that cannot be reached counts as one with no readable
        snapshot, so the caller replays the stream in place of failing.
        """
        folder = self._folder(aggregate_type, aggregate_id, snapshot_version)
        try:
            paths = self._paths(folder)
        except Exception as error:
            # Each fsspec backend raises errors of its own for an unreachable
            # store (botocore's EndpointConnectionError for S3, for one).
            self._warn_unreachable(folder, error)
            return None
        for version, path in sorted(paths.items(), reverse=True):
            snapshot = self._read(
                path, aggregate_type, aggregate_id, snapshot_version, version
            )
            if snapshot is not None:
                return snapshot
        return None

    def list_versions(
        self, aggregate_type: str, aggregate_id: str
    ) -> dict[int, list[int]]:
        """Return the stream versions stored for each state-shape version."""
        base = self._aggregate_folder(aggregate_type, aggregate_id)
        found: dict[int, list[int]] = {}
        for entry in self._ls(base):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.isdigit():
                found[int(name)] = sorted(self._versions(f"{base}/{name}"))
        return found

    # -- internals -------------------------------------------------------------

    def _aggregate_folder(self, aggregate_type: str, aggregate_id: str) -> str:
        type_segment = _path_segment(aggregate_type)
        return f"{self.root}/{type_segment}/{_path_segment(aggregate_id)}"

    def _folder(
        self, aggregate_type: str, aggregate_id: str, snapshot_version: int
    ) -> str:
        return (
            f"{self._aggregate_folder(aggregate_type, aggregate_id)}/{snapshot_version}"
        )

    def _suffix(self) -> str:
        return ".json.gz" if self.compression == "gzip" else ".json"

    def _ls(self, folder: str) -> list[str]:
        # Listings are read fresh and not kept: backends with a listings
        # cache (s3fs) would otherwise keep one entry per aggregate ever
        # loaded, so a host's memory would grow with the number of aggregates.
        self.fs.invalidate_cache(folder)
        try:
            return list(self.fs.ls(folder, detail=False))
        except FileNotFoundError:
            return []
        finally:
            self.fs.invalidate_cache(folder)

    def _paths(self, folder: str) -> dict[int, str]:
        paths = {}
        for path in self._ls(folder):
            name = path.rsplit("/", 1)[-1]
            stem = name.split(".", 1)[0]
            if stem.isdigit() and name.endswith((".json", ".json.gz")):
                paths[int(stem)] = path
        return paths

    def _versions(self, folder: str) -> list[int]:
        return list(self._paths(folder))

    def _write(self, path: str, data: bytes) -> None:
        if not self._is_local:
            self.fs.pipe_file(path, data)
            return
        # A local write goes to a temporary name first, so a crash mid-write
        # leaves no truncated file under a snapshot's name.
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        self.fs.pipe_file(temporary, data)
        self.fs.mv(temporary, path)

    def _warn_unreachable(self, path: str, error: Exception) -> None:
        """Log the first failed read and then one in 100; count every one."""
        self.num_read_failures += 1
        if self.num_read_failures % _LOG_EVERY_READ_FAILURES == 1:
            logger.warning(
                "snapshot store unreachable, loading without a snapshot path=%s "
                "failures=%d error=%s: %s",
                path,
                self.num_read_failures,
                type(error).__name__,
                str(error)[:200],
            )

    def _delete_older(self, snapshot: Snapshot, older: list[int]) -> None:
        folder = self._folder(
            snapshot.aggregate_type, snapshot.aggregate_id, snapshot.snapshot_version
        )
        paths = self._paths(folder)
        stale = [paths[v] for v in older if v < snapshot.version and v in paths]
        base = self._aggregate_folder(snapshot.aggregate_type, snapshot.aggregate_id)
        for entry in self._ls(base):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.isdigit() and int(name) != snapshot.snapshot_version:
                stale.append(entry)
        for path in stale:
            try:
                self.fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass

    def _read(
        self,
        path: str,
        aggregate_type: str,
        aggregate_id: str,
        snapshot_version: int,
        version: int,
    ) -> Snapshot | None:
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        except Exception as error:
            self._warn_unreachable(path, error)
            return None
        try:
            if path.endswith(".gz"):
                data = gzip.decompress(data)
            document = json.loads(data)
            snapshot = _snapshot_from_document(document)
        except (OSError, EOFError, ValueError, KeyError, TypeError) as error:
            logger.warning(
                "snapshot unreadable, ignoring it path=%s error=%s",
                path,
                str(error)[:200],
            )
            return None
        expected = (aggregate_type, aggregate_id, snapshot_version, version)
        found = (
            snapshot.aggregate_type,
            snapshot.aggregate_id,
            snapshot.snapshot_version,
            snapshot.version,
        )
        if found != expected:
            logger.warning(
                "snapshot does not match its key, ignoring it path=%s found=%s",
                path,
                found,
            )
            return None
        return snapshot


def _path_segment(name: str) -> str:
    """Percent-encode a type or id into one path segment of at most 200 characters.

    The segment is never "." or "..", and a longer encoding keeps its first 120
    characters followed by the SHA-256 of the name.
    """
    segment = quote(name, safe="")
    # quote() leaves dots alone, and a local filesystem resolves "." and "..",
    # so an id "." would name the type's folder and its save would delete the
    # snapshots of every aggregate whose id is a number.
    if segment in (".", ".."):
        segment = segment.replace(".", "%2E")
    if len(segment) > _MAX_SEGMENT_LENGTH:
        # quote() always follows "%" with two hex digits, so a shortened segment
        # never equals a segment that was not shortened, and the digest of the
        # whole name keeps shortened ones apart.
        digest = hashlib.sha256(name.encode()).hexdigest()
        segment = f"{segment[:_KEPT_PREFIX_LENGTH]}%sha256-{digest}"
    return segment


def _snapshot_from_document(document: Any) -> Snapshot:
    if not isinstance(document, dict):
        msg = f"snapshot must be a JSON object, got {type(document).__name__}"
        raise ValueError(msg)
    if document.get("format") != FORMAT_VERSION:
        msg = f"snapshot format {document.get('format')!r} is not {FORMAT_VERSION}"
        raise ValueError(msg)
    state = document["state"]
    if not isinstance(state, dict):
        msg = "snapshot state must be a JSON object"
        raise ValueError(msg)
    return Snapshot(
        aggregate_type=str(document["aggregate_type"]),
        aggregate_id=str(document["aggregate_id"]),
        version=int(document["version"]),
        snapshot_version=int(document["snapshot_version"]),
        state=state,
        created_at=str(document.get("created_at", "")),
    )
