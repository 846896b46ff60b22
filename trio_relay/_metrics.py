"""Prometheus ``/metrics`` for the side port: a custom collector that reads a relay's
counters and statistics when ``/metrics`` is scraped.

The hot path only adds to plain integers (:class:`~trio_relay._counters.RelayCounters`);
the Prometheus text is built from them at scrape time, so that serving messages never
touches prometheus-client.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from ._view import RelayView

__all__ = ["metrics_registry"]


class _RelayCollector:
    """Reads a relay's counters and statistics at scrape time."""

    def __init__(self, server: RelayView) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        server = self._server
        counters = server.counters
        stats = server.statistics()
        gauge = GaugeMetricFamily
        yield gauge("trio_relay_connections", "Open client connections.", stats.connections)
        yield gauge("trio_relay_topics", "Topics in use.", len(stats.topics))
        yield gauge(
            "trio_relay_subscribers", "Subscriptions of all topics.", stats.broadcast.subscribers
        )
        yield CounterMetricFamily(
            "trio_relay_messages_received", "Messages received from clients.", counters.messages_in
        )
        yield CounterMetricFamily(
            "trio_relay_messages_sent",
            "Messages handed to clients (one per message and recipient).",
            counters.messages_out,
        )
        yield CounterMetricFamily(
            "trio_relay_received_bytes", "Bytes received from clients.", counters.bytes_in
        )
        yield CounterMetricFamily(
            "trio_relay_sent_bytes", "Bytes written to clients.", counters.bytes_out
        )
        yield CounterMetricFamily(
            "trio_relay_published_batches",
            "Batches published (one per read from a producer).",
            stats.broadcast.published,
        )
        yield CounterMetricFamily(
            "trio_relay_dropped", "Batches dropped for full consumers.", stats.broadcast.dropped
        )
        yield CounterMetricFamily(
            "trio_relay_evicted", "Consumers evicted as too slow.", stats.broadcast.evicted
        )
        rejected = CounterMetricFamily(
            "trio_relay_rejected", "Connections refused, by reason.", labels=["reason"]
        )
        for reason, count in sorted(counters.rejections.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield gauge(
            "trio_relay_queued_batches",
            "Batches queued for all consumers.",
            sum(stats.broadcast.queued),
        )
        yield gauge(
            "trio_relay_queued_bytes",
            "Bytes queued for all consumers.",
            sum(s.queued_bytes for s in stats.broadcast.subscriptions),
        )
        if server.backplane is not None:
            backplane = server.backplane.statistics()
            yield gauge(
                "trio_relay_backplane_up", "1 while the Redis backplane is reachable.", backplane.up
            )
            yield CounterMetricFamily(
                "trio_relay_backplane_published",
                "Batches appended to the backplane's log.",
                backplane.published,
            )
            yield CounterMetricFamily(
                "trio_relay_backplane_received",
                "Batches of other relays read from the backplane's log.",
                backplane.received,
            )
            yield CounterMetricFamily(
                "trio_relay_backplane_local_only",
                "Batches delivered to local clients only, the backplane being unreachable.",
                backplane.local_only,
            )
            yield CounterMetricFamily(
                "trio_relay_backplane_reconnects",
                "Reconnections to the backplane after losing it.",
                backplane.reconnects,
            )
            yield CounterMetricFamily(
                "trio_relay_backplane_conflicts",
                "Batches renumbered after relays numbered a topic alone during an outage.",
                backplane.conflicts,
            )


def metrics_registry(server: RelayView) -> CollectorRegistry:
    """A Prometheus registry holding the relay's metrics (and nothing else)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_RelayCollector(server))
    return registry
