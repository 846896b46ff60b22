"""Idempotency keys: a publish that carries one is published once per topic and window.

A client that did not hear whether its publish went through (an ``ack`` with ``"remote":
null``, a lost connection) publishes it again with the same key; within the window, the
relay answers with the first one's name instead of publishing it twice. With a Redis
backplane the keys are kept in Redis (every relay sees them); this module keeps them for a
relay on its own, and for what a relay publishes alone while Redis is unreachable.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["MAX_KEYS", "MAX_KEY_LENGTH", "RecentKeys", "check_key"]

MAX_KEY_LENGTH = 128
"""Most characters of an idempotency key."""
MAX_KEYS = 100_000
"""Most keys a relay remembers on its own (about 200 bytes each); the oldest go first."""


def check_key(value: object) -> str:
    """``value`` if it can be an idempotency key (a string of 1 to 128 characters), else
    ``ValueError`` saying so."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_KEY_LENGTH:
        raise ValueError(f"an idempotency key is a string of 1 to {MAX_KEY_LENGTH} characters")
    return value


class RecentKeys:
    """The idempotency keys seen in the last ``window`` seconds, by topic, with the name
    (epoch, first number) of the publish that carried each: O(1) a lookup and an entry,
    at most ``max_keys`` kept (the oldest forgotten first, as are those past the window)."""

    def __init__(self, window: float, max_keys: int = MAX_KEYS) -> None:
        if not window >= 0:
            raise ValueError("the idempotency window must be a number of seconds >= 0")
        self.window = window
        self.max_keys = max_keys
        self._seen: OrderedDict[tuple[str, str], tuple[float, str, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now: float) -> None:
        seen, oldest = self._seen, now - self.window
        while seen and next(iter(seen.values()))[0] < oldest:
            seen.popitem(last=False)

    def get(self, topic: str, key: str, now: float) -> tuple[str, int] | None:
        """The name of the publish to ``topic`` that carried ``key`` within the window."""
        self._expire(now)
        found = self._seen.get((topic, key))
        return None if found is None else found[1:]

    def add(self, topic: str, key: str, epoch: str, seq: int, now: float) -> None:
        """Remember that ``key`` named the publish (``epoch``, ``seq``) of ``topic``."""
        if self.window <= 0:
            return
        self._seen[(topic, key)] = (now, epoch, seq)
        self._seen.move_to_end((topic, key))
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
