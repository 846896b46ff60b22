"""What the side port reads of a relay: :class:`RelayView`, a Protocol of the public
attributes of :class:`~trio_relay.RelayServer` that ``/healthz``, ``/metrics``, the
console's ``/stats`` and the HTTP API (``/api/publish``, ``/api/history``) use.

So the side port (``_sideport``, ``_metrics``, ``_console``) depends on the server's
public face only, not on ``_server``, and the server knows nothing of the side port.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import trio

    from ._backplane import BackplaneStatistics
    from ._broadcast import BroadcastTotals
    from ._config import RelayConfig
    from ._counters import RelayCounters
    from ._hooks import Authorize, OnPublish
    from ._topics import DeliveryReport, Gap, Message

__all__ = ["BackplaneView", "BudgetView", "RelayView", "StatisticsView", "TopicsView"]


class StatisticsView(Protocol):
    """The figures of a relay's ``statistics()`` that the side port reads: running totals
    only, so that a scrape costs the same whatever the number of topics and subscribers."""

    @property
    def connections(self) -> int: ...

    @property
    def subscribers(self) -> int: ...

    @property
    def topic_count(self) -> int: ...

    @property
    def totals(self) -> BroadcastTotals: ...


class BackplaneView(Protocol):
    """What the side port reads of a relay's backplane: up or down, and its counts."""

    @property
    def up(self) -> bool: ...

    def statistics(self) -> BackplaneStatistics: ...


class BudgetView(Protocol):
    """What the side port reads of a :class:`~trio_relay._budget.ByteBudget`."""

    @property
    def used(self) -> int: ...

    @property
    def limit(self) -> int: ...


class TopicsView(Protocol):
    """What the HTTP API uses of a relay's :class:`~trio_relay.Topics`: publishing (through
    the backplane, if any, as every publish) and reading a topic's history."""

    async def publish_batch(
        self,
        name: str,
        payloads: list[bytes],
        texts: list[bool],
        *,
        source: object = None,
        echo: bool = True,
        idempotency_key: str | None = None,
    ) -> DeliveryReport: ...

    async def retained(
        self, name: str, since: int | None = None, epoch: str | None = None
    ) -> tuple[int, Gap | None, list[Message]]: ...

    @property
    def retained_bytes(self) -> int: ...

    def position(self, name: str) -> tuple[str, int]: ...


class RelayView(Protocol):
    """A running relay as the side port sees it (:class:`~trio_relay.RelayServer` is one)."""

    @property
    def counters(self) -> RelayCounters: ...

    @property
    def config(self) -> RelayConfig: ...

    @property
    def topics(self) -> TopicsView: ...

    @property
    def unfinished(self) -> BudgetView: ...

    @property
    def backplane(self) -> BackplaneView | None: ...

    @property
    def listeners(self) -> Sequence[trio.abc.Listener[Any]]: ...

    @property
    def ports(self) -> tuple[int, ...]: ...

    @property
    def authorize(self) -> Authorize | None: ...

    @property
    def on_publish(self) -> OnPublish | None: ...

    def statistics(self) -> StatisticsView: ...
