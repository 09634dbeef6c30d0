"""Errors of the persistence layer; they extend the root in ``aggregates.errors``."""

from __future__ import annotations

from aggregates.errors import RaysourceError


class VersionConflictError(RaysourceError):
    """Reject an append whose expected version is stale: reload the stream and retry.

    Nothing of the call that raised it was written.
    """


class StoreUnavailableError(RaysourceError):
    """Report that the database could not be reached or timed out; retry with backoff.

    Nothing of the call that raised it was written.
    """


class SchemaError(RaysourceError):
    """Reject a database whose tables were made by another schema version."""
