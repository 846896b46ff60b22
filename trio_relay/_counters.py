"""The lifetime counters a relay's connections keep, as plain integers.

A module of its own, importing nothing from the package: the connections add to these on
the hot path, and the side port reads them, without either depending on the other.
"""

from __future__ import annotations

import collections

__all__ = ["REJECTION_REASONS", "RelayCounters"]

REJECTION_REASONS = (
    "handshake-timeout",
    "http-400",
    "http-401",
    "http-403",
    "http-426",
    "http-431",
    "http-500",
    "http-503",
)
"""Why a relay refuses connections: the handshake did not finish within
``handshake_timeout``, or the HTTP status it answered (400 a bad request, path or
``since``; 401 a missing or bad token; 403 a topic the token does not allow or an origin
not allowed; 426 an unsupported WebSocket version; 431 a request head over 16 KiB; 500 an
``authorize`` hook that failed; 503 a connection limit, or an ``authorize`` hook that did
not answer in time; a hook's own refusals count under their status). Each is counted from
0, so that ``/metrics`` shows every one from the start."""


class RelayCounters:
    """Lifetime counters of a relay, kept by its connections."""

    __slots__ = ("bytes_in", "bytes_out", "messages_in", "messages_out", "rejections")

    def __init__(self) -> None:
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.rejections: collections.Counter[str] = collections.Counter(
            dict.fromkeys(REJECTION_REASONS, 0)
        )
        """By reason: :data:`REJECTION_REASONS` (each from 0), and any other status."""
