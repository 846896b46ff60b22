"""Operations: counters the connections keep, and ``/healthz`` and Prometheus ``/metrics``
on a separate HTTP port (which also serves the browser console: see ``_console.py``).

The hot path only adds to plain integers (:class:`RelayCounters`); the Prometheus text is
built from them and from the relay's statistics when ``/metrics`` is scraped, by a custom
collector, so that serving messages never touches prometheus-client.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn

import h11
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import _console

if TYPE_CHECKING:
    from ._server import RelayServer

__all__ = ["RelayCounters", "metrics_registry", "serve_metrics"]

logger = logging.getLogger("trio_relay")

REQUEST_TIMEOUT = 10.0
"""Seconds a client of the metrics port has to send its request."""


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


class _RelayCollector:
    """Reads a relay's counters and statistics at scrape time."""

    def __init__(self, server: RelayServer) -> None:
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


def metrics_registry(server: RelayServer) -> CollectorRegistry:
    """A Prometheus registry holding the relay's metrics (and nothing else)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_RelayCollector(server))
    return registry


async def serve_metrics(
    server: RelayServer,
    host: str | None,
    port: int,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``GET /healthz``, ``GET /metrics`` and the browser console (``GET /``, and
    ``GET /stats`` in JSON) for ``server`` on ``host``:``port``.

    ``/healthz`` answers ``200 {"status": "ok", "connections": N}`` while the relay runs;
    ``/metrics`` answers the Prometheus text format. One request per connection, each
    bounded by :data:`REQUEST_TIMEOUT`. Supports ``nursery.start``: returns the listeners.
    """
    registry = metrics_registry(server)
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await _answer(stream, server, registry)
        except (trio.BrokenResourceError, h11.ProtocolError) as exc:
            logger.debug("metrics request failed: %s", exc)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(listeners)
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover


async def _answer(
    stream: trio.SocketStream, server: RelayServer, registry: CollectorRegistry
) -> None:
    connection = h11.Connection(h11.SERVER)
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16384)
            if not data:
                return
            connection.receive_data(data)
            continue
        break
    if not isinstance(event, h11.Request):
        return
    path = event.target.split(b"?", 1)[0]
    extra: _console.Headers = []
    if event.method not in (b"GET", b"HEAD"):
        status, kind, body = 405, b"text/plain; charset=utf-8", b"use GET\n"
    elif path == b"/healthz":
        health: dict[str, object] = {
            "status": "ok",
            "connections": server.statistics().connections,
        }
        if server.backplane is not None:
            # Still 200: the relay serves its local clients. "degraded" says that they are
            # cut off from the other relays until Redis is back.
            up = server.backplane.up
            health.update(status="ok" if up else "degraded", backplane="up" if up else "down")
        status, kind, body = 200, b"application/json", json.dumps(health).encode() + b"\n"
    elif path == b"/metrics":
        status, kind, body = (
            200,
            b"text/plain; version=0.0.4; charset=utf-8",
            generate_latest(registry),
        )
    elif (console := _console.answer(server, path)) is not None:
        status = 200
        kind, body, extra = console
    else:
        status, kind, body = (
            404,
            b"text/plain; charset=utf-8",
            b"try / (the console), /stats, /healthz or /metrics\n",
        )
    headers = [
        (b"content-type", kind),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *extra,
    ]
    data = connection.send(h11.Response(status_code=status, headers=headers)) or b""
    if event.method != b"HEAD":
        data += connection.send(h11.Data(data=body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
