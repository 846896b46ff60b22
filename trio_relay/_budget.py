"""A byte budget that many holders share: plain counting, no I/O, no trio.

The relay has one :class:`ByteBudget` for the bytes of unfinished incoming messages
(``RelayConfig.max_unfinished_bytes``): every connection takes a :class:`Claim` on it and
resizes the claim to what its frame parser holds after each read. A claim that cannot grow
says so, and that connection (only that one) is closed with 1013; what it held goes back
to the budget when its message completes or the connection ends.
"""

from __future__ import annotations

__all__ = ["ByteBudget", "Claim"]


class ByteBudget:
    """``limit`` bytes shared by every :class:`Claim` taken with :meth:`claim`.

    ``used`` is the sum of what the claims hold now (a running total: constant time to
    read, and never above ``limit``).
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("a budget must not be negative")
        self.limit = limit
        self.used = 0

    def __repr__(self) -> str:
        return f"<ByteBudget {self.used}/{self.limit} bytes>"

    def claim(self) -> Claim:
        """A new claim on this budget, holding nothing."""
        return Claim(self)


class Claim:
    """What one holder (a connection) has of a :class:`ByteBudget`: :attr:`held` bytes."""

    __slots__ = ("_budget", "held")

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self.held = 0

    def resize(self, size: int) -> bool:
        """Hold ``size`` bytes from now on, instead of :attr:`held`.

        Shrinking always succeeds. Growing succeeds if the budget has room for the
        difference; if not, returns False and the claim keeps what it held.
        """
        budget = self._budget
        grow = size - self.held
        if grow > 0 and budget.used + grow > budget.limit:
            return False
        budget.used += grow
        self.held = size
        return True

    def release(self) -> None:
        """Give back everything held (safe to call again: the second call does nothing)."""
        self._budget.used -= self.held
        self.held = 0
