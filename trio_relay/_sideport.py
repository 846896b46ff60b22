"""The side HTTP port: ``/healthz``, Prometheus ``/metrics`` (see ``_metrics.py``) and the
browser console with its ``/stats`` (see ``_console.py``), for operators, on a port apart
from the relay's WebSocket port.

It reads the relay through :class:`~trio_relay._view.RelayView`, the server's public face,
so the server does not depend on it nor it on the server's internals.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, NoReturn

import h11
import trio
from prometheus_client import CollectorRegistry, generate_latest

from . import _console, _httpapi
from ._metrics import metrics_registry
from ._redact import shown

if TYPE_CHECKING:
    from ._view import RelayView

__all__ = ["REQUEST_TIMEOUT", "serve_metrics"]

logger = logging.getLogger("trio_relay")

REQUEST_TIMEOUT = 10.0
"""Seconds a client of the metrics port has to send its request."""


async def serve_metrics(
    server: RelayView,
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
            logger.debug("metrics request failed: %s", shown(exc))

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(listeners)
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover


async def _answer(
    stream: trio.SocketStream, server: RelayView, registry: CollectorRegistry
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
    if _httpapi.is_api_path(path):
        await _httpapi.answer(server, event, connection, stream)
        return
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
