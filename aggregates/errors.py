"""Exception hierarchy of raysource; standard library only.

The root lives here, in the lowest layer, so that no package imports upward::

    RaysourceError
    +-- DomainError            command rejected by its aggregate; nothing appended
    +-- InvalidCommandError    message cannot be decoded or validated; dead letter
    +-- VersionConflictError   (store) stale expected version; reload and retry
    +-- ConfigError            (pipeline) a setting is invalid; names the setting
"""

from __future__ import annotations


class RaysourceError(Exception):
    """Root of every error raised on purpose by raysource."""


class DomainError(RaysourceError):
    """Reject a command: the aggregate's rules forbid it, and nothing is appended."""


class InvalidCommandError(RaysourceError):
    """Report a command or event that cannot be decoded or validated.

    ``field`` names the offending field when there is one, so that dead letters
    and test failures point at it.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
