"""The relay server's settings, one frozen value with documented defaults."""

from __future__ import annotations

from dataclasses import dataclass

from ._broadcast import _POLICIES, OverflowPolicy

__all__ = ["RelayConfig"]


@dataclass(frozen=True)
class RelayConfig:
    """Settings of :func:`serve_relay`. Every wait on the network has a bound here.

    Why the defaults: a consumer that falls behind gets ``queue_size`` messages of slack,
    then ``slow_consumer_timeout`` seconds to make room before it is evicted (close 1008).
    ``evict`` is the default policy because ``block`` lets one dead reader freeze every
    producer (the tutorial's flaw) and ``drop`` loses messages silently; five seconds covers
    a healthy consumer's hiccup (GC pause, brief network stall) while bounding how long a
    dead one holds up publishers.
    """

    queue_size: int = 256
    """Messages queued per consumer before its overflow policy applies."""
    overflow_policy: OverflowPolicy = "evict"
    """``block``, ``drop`` or ``evict``: see :data:`trio_relay.OverflowPolicy`."""
    slow_consumer_timeout: float = 5.0
    """Seconds a full consumer queue may stay full before eviction (policy ``evict``)."""
    max_message_size: int = 1024 * 1024
    """Largest message accepted from a client, in bytes (UTF-8 bytes for text); over it: 1009."""
    handshake_timeout: float = 10.0
    """Seconds a new connection has to complete its HTTP upgrade; then it is dropped."""
    close_timeout: float = 5.0
    """Seconds allowed for a closing handshake (and for graceful shutdown) before aborting."""
    receive_buffer_size: int = 64 * 1024
    """Bytes asked of the socket per read."""

    def __post_init__(self) -> None:
        if self.overflow_policy not in _POLICIES:
            raise ValueError(
                f"overflow_policy must be one of {sorted(_POLICIES)}, not {self.overflow_policy!r}"
            )
        for name in ("queue_size", "max_message_size", "receive_buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("slow_consumer_timeout", "handshake_timeout", "close_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
