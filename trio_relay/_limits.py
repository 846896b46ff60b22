"""The relay's connection limits as counts that are reserved the moment they are checked.

A connection counts toward ``max_connections`` and ``max_connections_per_ip`` from the
moment it is accepted (:meth:`ConnectionLimits.reserve_connection`), not once its handshake
is done, so half-sent upgrade requests hold no more than the limits allow. Its slot on
its topic (``max_subscribers_per_topic``) is taken when its handshake is checked against
the limit (:meth:`ConnectionLimits.reserve_subscriber`), in the same synchronous step,
so 200 handshakes at once on a topic with room for 5 admit exactly 5. Each slot is given
back when the connection ends. Plain counters, no I/O: every check and release costs the
same at 20,000 connections as at 2.
"""

from __future__ import annotations

import collections

__all__ = ["ConnectionLimits"]


class ConnectionLimits:
    """Reserved connection slots, in all, per client address and per topic."""

    __slots__ = (
        "_per_host",
        "_per_topic",
        "connections",
        "max_connections",
        "max_per_host",
        "max_per_topic",
    )

    def __init__(self, max_connections: int, max_per_host: int, max_per_topic: int) -> None:
        self.max_connections = max_connections
        self.max_per_host = max_per_host
        self.max_per_topic = max_per_topic
        self.connections = 0
        """Connections holding a slot now (accepted and not yet ended)."""
        self._per_host: collections.Counter[str] = collections.Counter()
        self._per_topic: collections.Counter[str] = collections.Counter()

    def reserve_connection(self, host: str) -> str | None:
        """Take a slot for a connection just accepted from ``host``, or say why not."""
        if self.connections >= self.max_connections:
            return f"the relay is at its limit of {self.max_connections} connections"
        if self._per_host[host] >= self.max_per_host:
            return f"{host} is at the limit of {self.max_per_host} connections per client address"
        self.connections += 1
        self._per_host[host] += 1
        return None

    def release_connection(self, host: str) -> None:
        """Give back the slot of a connection from ``host`` that ended."""
        self.connections -= 1
        _decrement(self._per_host, host)

    def reserve_subscriber(self, topic: str) -> str | None:
        """Take a slot on ``topic`` for a connection whose handshake asks for it, or say why
        not."""
        if self._per_topic[topic] >= self.max_per_topic:
            return f"topic {topic!r} is at its limit of {self.max_per_topic} subscribers"
        self._per_topic[topic] += 1
        return None

    def release_subscriber(self, topic: str) -> None:
        """Give back a slot on ``topic``."""
        _decrement(self._per_topic, topic)

    def host_connections(self, host: str) -> int:
        """Slots ``host`` holds now."""
        return self._per_host.get(host, 0)

    def topic_subscribers(self, topic: str) -> int:
        """Slots reserved on ``topic`` now."""
        return self._per_topic.get(topic, 0)


def _decrement(counter: collections.Counter[str], key: str) -> None:
    # Forget keys at zero: an address or topic seen once costs nothing afterwards.
    left = counter[key] - 1
    if left > 0:
        counter[key] = left
    else:
        del counter[key]
