"""The lifetime counters a relay's connections keep, as plain integers.

A module of its own, importing nothing from the package: the connections add to these on
the hot path, and the side port reads them, without either depending on the other.
"""

from __future__ import annotations

import collections

__all__ = ["RelayCounters"]


class RelayCounters:
    """Lifetime counters of a relay, kept by its connections."""

    __slots__ = ("bytes_in", "bytes_out", "messages_in", "messages_out", "rejections")

    def __init__(self) -> None:
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.rejections: collections.Counter[str] = collections.Counter()
        """By reason: ``http-400``, ``http-503``, ... and ``handshake-timeout``."""
