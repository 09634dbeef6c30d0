"""Logging set-up for the command line and for each actor's process."""

from __future__ import annotations

import logging

_FORMAT = "%(asctime)s %(levelname)s {component} %(name)s: %(message)s"


def configure_logging(component: str, level: str = "INFO") -> None:
    """Send this process's log records to stderr, each line naming ``component``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_raysource", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._raysource = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(_FORMAT.format(component=component)))
    root.addHandler(handler)
    root.setLevel(level)
    # kafka-python logs every connection step at INFO.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
