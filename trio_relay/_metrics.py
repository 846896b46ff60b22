"""Prometheus ``/metrics`` for the side port: a custom collector that reads a relay's
counters and running totals when ``/metrics`` is scraped, plus prometheus-client's
standard process, platform and garbage-collector metrics.

The hot path only adds to plain integers (:class:`~trio_relay._counters.RelayCounters`,
:class:`~trio_relay.RunningTotals`); the Prometheus text is built from them at scrape
time, so that serving messages never touches prometheus-client, and a scrape costs the
same at 20,000 topics as at 2 (nothing here iterates over topics or subscriptions).

Names follow the Prometheus naming guide: ``trio_relay_<noun>_<verb>_total`` for
counters, the unit last (``_bytes``). A *batch* is what one read from a producer brought
in on one topic (see README "The fast path"); drops are counted per batch and consumer.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import metadata
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

if TYPE_CHECKING:
    from ._view import RelayView

__all__ = ["metrics_registry", "version"]


def version() -> str:
    """The installed version of trio-relay ("unknown" when run from an uninstalled tree)."""
    try:
        return metadata.version("trio-relay")
    except metadata.PackageNotFoundError:  # pragma: no cover - always installed in tests
        return "unknown"


class _RelayCollector:
    """Reads a relay's counters and running totals at scrape time."""

    def __init__(self, server: RelayView) -> None:
        self._server = server
        self._version = version()

    def collect(self) -> Iterator[Metric]:
        server = self._server
        counters = server.counters
        stats = server.statistics()
        totals = stats.totals
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        # Exposed as the gauge trio_relay_build_info{version="..."} 1.
        yield InfoMetricFamily(
            "trio_relay_build", "The relay's version.", value={"version": self._version}
        )
        yield gauge("trio_relay_connections", "Open client connections.", stats.connections)
        yield gauge("trio_relay_topics", "Topics in use.", stats.topic_count)
        yield gauge("trio_relay_subscribers", "Subscriptions of all topics.", stats.subscribers)
        yield counter(
            "trio_relay_messages_received", "Messages received from clients.", counters.messages_in
        )
        yield counter(
            "trio_relay_messages_sent",
            "Messages handed to clients (one per message and recipient).",
            counters.messages_out,
        )
        yield counter(
            "trio_relay_received_bytes", "Bytes received from clients.", counters.bytes_in
        )
        yield counter("trio_relay_sent_bytes", "Bytes written to clients.", counters.bytes_out)
        yield counter(
            "trio_relay_batches_published",
            "Batches published (one per read from a producer, per topic).",
            totals.published,
        )
        yield counter(
            "trio_relay_batches_dropped",
            "Batches a full consumer missed under the drop policy (one per batch and consumer).",
            totals.dropped,
        )
        yield counter(
            "trio_relay_subscribers_evicted",
            "Consumers disconnected as too slow (close 1008).",
            totals.evicted,
        )
        rejected = counter(
            "trio_relay_connections_rejected", "Connections refused, by reason.", labels=["reason"]
        )
        for reason, count in sorted(counters.rejections.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield gauge("trio_relay_queued_batches", "Batches queued for all consumers.", totals.queued)
        yield gauge(
            "trio_relay_queued_bytes", "Bytes queued for all consumers.", totals.queued_bytes
        )
        yield gauge(
            "trio_relay_history_bytes",
            "What all topics' histories count against history_total_bytes (payloads and "
            "overheads).",
            server.topics.retained_bytes,
        )
        yield gauge(
            "trio_relay_unfinished_message_bytes",
            "Bytes of unfinished incoming messages all connections hold, against "
            "max_unfinished_bytes.",
            server.unfinished.used,
        )
        if server.backplane is not None:
            backplane = server.backplane.statistics()
            yield gauge(
                "trio_relay_backplane_up", "1 while the Redis backplane is reachable.", backplane.up
            )
            yield counter(
                "trio_relay_backplane_batches_published",
                "Batches appended to the backplane's log.",
                backplane.published,
            )
            yield counter(
                "trio_relay_backplane_batches_received",
                "Batches of other relays read from the backplane's log.",
                backplane.received,
            )
            yield counter(
                "trio_relay_backplane_batches_local_only",
                "Batches delivered to local clients only, the backplane being unreachable.",
                backplane.local_only,
            )
            yield counter(
                "trio_relay_backplane_reconnects",
                "Reconnections to the backplane after losing it.",
                backplane.reconnects,
            )
            yield counter(
                "trio_relay_backplane_entries_skipped",
                "Log entries skipped: this relay had their names already (read again, or "
                "named twice by a Redis that went back to an older snapshot).",
                backplane.conflicts,
            )
            yield counter(
                "trio_relay_backplane_epochs_started",
                "Topics this relay started a fresh epoch of, finding that Redis went back.",
                backplane.epochs,
            )
            yield counter(
                "trio_relay_backplane_entries_dropped",
                "Log entries not delivered here: their topic's slow subscribers held 10,000 "
                "entries already (its subscribers get a gap).",
                backplane.dropped,
            )


def metrics_registry(server: RelayView) -> CollectorRegistry:
    """A Prometheus registry holding the relay's metrics, and prometheus-client's standard
    ``process_*`` (CPU, memory, descriptors), ``python_info`` and ``python_gc_*`` ones."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_RelayCollector(server))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
