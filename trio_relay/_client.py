"""Client helpers: the seed's producer and consumer, on trio-websocket.

Every failure surfaces as a :class:`ClientError` subclass that names the URL; trio-websocket's
exceptions are wrapped at this boundary (the original is the ``__cause__``).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
import trio_websocket
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
)

from ._exceptions import (
    ClientError,
    HandshakeRejected,
    RelayConnectionClosed,
    RelayTimeout,
    RelayUnavailable,
)

__all__ = ["DEFAULT_TIMEOUT", "MessageStream", "consume", "produce"]

DEFAULT_TIMEOUT = 10.0
"""Seconds allowed to connect and handshake, and for :func:`produce` to be acknowledged."""

_MAX_MESSAGE_SIZE = 16 * 1024 * 1024


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups, else ``exc``."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _translate(url: str, exc: BaseException, *, connected: bool) -> ClientError | None:
    exc = _leaf(exc)
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, ConnectionRejected):
        return HandshakeRejected(url, exc.status_code, exc.body)
    if isinstance(exc, HandshakeError) and isinstance(exc.__cause__, OSError):
        # trio-websocket reports a failed TCP connect as HandshakeError from OSError.
        return RelayUnavailable(url, f"cannot connect: {exc.__cause__}")
    if isinstance(exc, HandshakeError):  # ConnectionTimeout, DisconnectionTimeout
        return RelayTimeout(url, f"WebSocket handshake timed out ({exc.__class__.__name__})")
    if isinstance(exc, ConnectionClosed):
        reason = exc.reason
        code = reason.code if reason is not None else 1006
        return RelayConnectionClosed(url, code, reason.reason if reason is not None else None)
    if isinstance(exc, OSError) and not connected:
        return RelayUnavailable(url, f"cannot connect: {exc}")
    if isinstance(exc, trio.BrokenResourceError):
        return RelayConnectionClosed(url, 1006, "connection lost")
    return None


async def _open_stream(url: str) -> trio.abc.Stream:
    """A TCP (or TLS, for ``wss://``) stream to the host and port of ``url``."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    host = parts.hostname or "localhost"
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if parts.scheme == "wss":
        tls = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=host)
        await tls.do_handshake()
        stream = tls
    return stream


@asynccontextmanager
async def _open_connection(
    url: str,
    *,
    timeout: float,  # noqa: ASYNC109 - bounds connecting, the handshake and the close
    stream: trio.abc.Stream | None,
    message_queue_size: int = 1,
) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client connection to ``url``, over ``stream`` if one is given.

    The stream is always closed on exit. We open (and close) the TCP stream ourselves rather
    than use ``open_websocket_url``: trio-websocket 0.12.2 never closes a client's socket
    when the server closes first (tests/test_end_to_end.py pins this).
    """
    connected = False
    failure: BaseException | None = None
    parts = urlsplit(url)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        with trio.fail_after(timeout):
            if stream is None:
                stream = await _open_stream(url)
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(timeout):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        # Typed for sockets, documented for "an arbitrary stream".
                        stream,  # type: ignore[arg-type]
                        parts.hostname or "localhost",
                        resource,
                        message_queue_size=message_queue_size,
                        max_message_size=_MAX_MESSAGE_SIZE,
                    )
                connected = True
                try:
                    yield ws
                finally:
                    # Not shielded: when the body was cancelled, aclose() closes the stream
                    # at once (as trio-websocket's open_websocket does).
                    with trio.move_on_after(timeout):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(stream)
    except BaseException as exc:
        failure = _failure(url, exc, timeout=timeout, connected=connected)
    if failure is not None:
        # Raised outside the except block, so the exception group our internal nursery
        # wrapped it in does not become its __context__: callers see what their own code
        # raised (KeyboardInterrupt, say) or one ClientError, never a group.
        try:
            raise failure
        finally:
            failure = None


def _failure(url: str, exc: BaseException, *, timeout: float, connected: bool) -> BaseException:
    """What a client call raises for ``exc``: a ClientError, or the bare exception."""
    leaf = _leaf(exc)
    if isinstance(leaf, trio.TooSlowError):
        error: BaseException = RelayTimeout(url, f"could not connect within {timeout} s")
    else:
        error = _translate(url, leaf, connected=connected) or leaf
    if error is not leaf:
        error.__cause__ = leaf
    return error


async def produce(
    url: str,
    message: str | bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - turned into RelayTimeout with the URL
    stream: trio.abc.Stream | None = None,
) -> None:
    """Send ``message`` to the relay at ``url`` and return once the relay echoes it back.

    The echo is the seed's acknowledgement: the relay delivers every message to every
    client, the sender included, so receiving it proves the relay accepted and fanned it out.
    Messages from other producers that arrive first are skipped.

    Raises :class:`RelayTimeout` if connecting, the handshake, or the acknowledgement takes
    longer than ``timeout`` seconds in total, and another :class:`ClientError` if the relay
    is unreachable, refuses the handshake, or closes the connection. ``stream`` runs the
    connection over an already-open stream (see :mod:`trio_relay.testing`).
    """
    with trio.move_on_after(timeout) as scope:
        async with _open_connection(url, timeout=timeout, stream=stream) as ws:
            await ws.send_message(message)
            while await ws.get_message() != message:
                pass
            return
    assert scope.cancelled_caught
    raise RelayTimeout(url, f"message not acknowledged within {timeout} s")


class MessageStream:
    """The messages a :func:`consume` connection receives: ``async for message in stream``.

    Iteration ends when the relay closes normally (1000); any other close raises
    :class:`RelayConnectionClosed` with its code (1001 when the relay shuts down,
    1008 when this consumer was evicted as too slow).
    """

    def __init__(self, url: str, connection: WebSocketConnection) -> None:
        self.url = url
        self.connection = connection

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> str | bytes:
        try:
            return await self.connection.get_message()
        except ConnectionClosed as exc:
            reason = exc.reason
            if reason is not None and reason.code == 1000:
                raise StopAsyncIteration from None
            translated = _translate(self.url, exc, connected=True)
            assert translated is not None
            raise translated from exc

    async def send(self, message: str | bytes) -> None:
        """Publish ``message`` on this same connection (it comes back like any other)."""
        try:
            await self.connection.send_message(message)
        except ConnectionClosed as exc:
            translated = _translate(self.url, exc, connected=True)
            assert translated is not None
            raise translated from exc


@asynccontextmanager
async def consume(
    url: str,
    *,
    connect_timeout: float = DEFAULT_TIMEOUT,
    stream: trio.abc.Stream | None = None,
) -> AsyncIterator[MessageStream]:
    """Connect to the relay at ``url`` and yield an async iterator of the messages it sends.

    ::

        async with trio_relay.consume("ws://localhost:4000/") as messages:
            async for message in messages:
                print(message)

    The connection lives exactly as long as the ``async with`` block (structured
    concurrency: no background task outlives it), which is why this is a context manager
    rather than a bare async generator. Connecting raises a :class:`ClientError` subclass.
    """
    async with _open_connection(
        url, timeout=connect_timeout, stream=stream, message_queue_size=64
    ) as ws:
        yield MessageStream(url, ws)
