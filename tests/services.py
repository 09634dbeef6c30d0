"""Local services for the tests.

The broker is in ``pipeline.broker``, shared with the demo.
"""

from pipeline.broker import LOOPBACK_HOST, KafkaBroker, free_port, tansu_binary

__all__ = ["LOOPBACK_HOST", "KafkaBroker", "free_port", "tansu_binary"]
