"""The side HTTP port: ``/healthz``, Prometheus ``/metrics`` (see ``_metrics.py``), the
HTTP API (see ``_httpapi.py``) and the browser console with its ``/stats`` (see
``_console.py``), on a port apart from the relay's WebSocket port.

It reads the relay through :class:`~trio_relay._view.RelayView`, the server's public face,
so the server does not depend on it nor it on the server's internals. ``/healthz``,
``/metrics`` and ``/stats`` are built from running totals, so each costs the same at
20,000 topics as at 2.

The port is bounded like the relay's: at most ``config.http_max_connections`` open
connections (counted from accept; past it, HTTP 503 at once and closed), and
``config.http_request_timeout`` seconds for each request and its response. One request
per connection. :func:`serve_http` is that bounded server for any exchange (the
``--workers`` supervisor serves its merged figures with it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn

import h11
import trio
from prometheus_client import CollectorRegistry, generate_latest

from . import _console, _httpapi
from ._listen import LogThrottle, refuse_at_once, serve_listeners
from ._metrics import metrics_registry
from ._redact import shown

if TYPE_CHECKING:
    from ._view import RelayView

__all__ = [
    "METRICS_CONTENT_TYPE",
    "NOT_FOUND",
    "Answer",
    "read_request",
    "send_answer",
    "serve_http",
    "serve_metrics",
]

logger = logging.getLogger("trio_relay")

METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text format's content type."""

Answer = tuple[int, bytes, bytes, "_console.Headers"]
"""What a request gets: status, content type, body, extra headers."""

NOT_FOUND: Answer = (
    404,
    b"text/plain; charset=utf-8",
    b"try / (the console), /stats, /healthz or /metrics\n",
    [],
)
NOT_ALLOWED: Answer = (405, b"text/plain; charset=utf-8", b"use GET\n", [])


async def serve_metrics(
    server: RelayView,
    host: str | None,
    port: int,
    *,
    listeners: Sequence[trio.abc.Listener[Any]] | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``GET /healthz``, ``GET /metrics``, the HTTP API (``/api/``) and the browser
    console (``GET /``, and ``GET /stats`` in JSON) for ``server`` on ``host``:``port``, or
    on ``listeners`` if given.

    ``/healthz`` answers ``200 {"status": "ok", "connections": N}`` while the relay runs;
    ``/metrics`` answers the Prometheus text format. One request per connection, bounded
    by ``server.config.http_request_timeout``; at most ``server.config.http_max_connections``
    open at once. Supports ``nursery.start``: returns the socket listeners it opened (none
    when given ``listeners``).
    """
    registry = metrics_registry(server)
    opened: list[trio.SocketListener] = []
    if listeners is None:
        listeners = opened = await trio.open_tcp_listeners(port, host=host)
    config = server.config
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                serve_http,
                partial(_exchange, server=server, registry=registry),
                listeners,
                max_connections=config.http_max_connections,
                request_timeout=config.http_request_timeout,
            )
        )
        task_status.started(opened)
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover


async def serve_http(
    exchange: Callable[[trio.abc.HalfCloseableStream], Awaitable[None]],
    listeners: Sequence[trio.abc.Listener[Any]],
    *,
    max_connections: int,
    request_timeout: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run ``await exchange(stream)`` for each connection accepted on ``listeners``, then
    close it, until cancelled.

    At most ``max_connections`` are open at once, counted from accept: past that, a
    connection gets HTTP 503 at once (if its socket takes it without waiting) and is
    closed. Each exchange has ``request_timeout`` seconds; then its connection is closed.
    A broken connection or a malformed request ends the exchange (logged at DEBUG).
    """
    open_connections = 0
    refusals = LogThrottle()
    refusal = _refusal(f"the HTTP port is at its limit of {max_connections} connections\n")

    async def handle(stream: trio.abc.HalfCloseableStream) -> None:
        nonlocal open_connections
        if open_connections >= max_connections:
            refusals.log(
                logger,
                logging.WARNING,
                "HTTP port: connection refused, at its limit of %d connections",
                max_connections,
            )
            await refuse_at_once(stream, refusal)
            return
        open_connections += 1
        try:
            with trio.move_on_after(request_timeout):
                await exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
            logger.debug("HTTP request failed: %s", shown(exc))
        except Exception:
            # Contained: one failed request must not take the port down.
            logger.exception("HTTP request failed")
        finally:
            open_connections -= 1
            await trio.aclose_forcefully(stream)

    await serve_listeners(handle, listeners, what="the HTTP port", task_status=task_status)


def _refusal(body: str) -> bytes:
    data = body.encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + data


async def read_request(stream: trio.abc.Stream) -> tuple[h11.Connection, h11.Request] | None:
    """Read one request head from ``stream``: the connection and the request, or None if
    the stream ended first. Raises ``h11.ProtocolError`` for a malformed one."""
    connection = h11.Connection(h11.SERVER)
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16384)
            if not data:
                return None
            connection.receive_data(bytes(data))
            continue
        break
    if not isinstance(event, h11.Request):
        return None
    return connection, event


async def send_answer(
    connection: h11.Connection, stream: trio.abc.Stream, request: h11.Request, answer: Answer
) -> None:
    """Write ``answer`` to ``request`` (headers only for HEAD), then the connection closes."""
    status, kind, body, extra = answer
    headers = [
        (b"content-type", kind),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *extra,
    ]
    data = connection.send(h11.Response(status_code=status, headers=headers)) or b""
    if request.method != b"HEAD":
        data += connection.send(h11.Data(data=body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _exchange(
    stream: trio.abc.HalfCloseableStream, *, server: RelayView, registry: CollectorRegistry
) -> None:
    received = await read_request(stream)
    if received is None:
        return
    connection, request = received
    path = request.target.split(b"?", 1)[0]
    if _httpapi.is_api_path(path):
        await _httpapi.answer(server, request, connection, stream)
        return
    if request.method not in (b"GET", b"HEAD"):
        answer = NOT_ALLOWED
    else:
        answer = _page(server, registry, path)
    await send_answer(connection, stream, request, answer)


def _page(server: RelayView, registry: CollectorRegistry, path: bytes) -> Answer:
    if path == b"/healthz":
        health: dict[str, object] = {
            "status": "ok",
            "connections": server.statistics().connections,
        }
        if server.backplane is not None:
            # Still 200: the relay serves its local clients. "degraded" says that they are
            # cut off from the other relays until Redis is back.
            up = server.backplane.up
            health.update(status="ok" if up else "degraded", backplane="up" if up else "down")
        return 200, b"application/json", json.dumps(health).encode() + b"\n", []
    if path == b"/metrics":
        return 200, METRICS_CONTENT_TYPE, generate_latest(registry), []
    console = _console.answer(server, path)
    if console is not None:
        kind, body, extra = console
        return 200, kind, body, extra
    return NOT_FOUND
