"""Client helpers: the seed's producer and consumer, on trio-websocket.

Every failure surfaces as a :class:`ClientError` subclass that names the URL; trio-websocket's
exceptions are wrapped at this boundary (the original is the ``__cause__``).
"""

from __future__ import annotations

import base64
import json
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio
import trio_websocket
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
)

from ._envelope import SUBPROTOCOL
from ._exceptions import (
    ClientError,
    HandshakeRejected,
    PublishRejected,
    RelayConnectionClosed,
    RelayTimeout,
    RelayUnavailable,
)
from ._topics import DeliveryReport, Gap, Message

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


async def _open_stream(url: str, ssl_context: ssl.SSLContext | None = None) -> trio.abc.Stream:
    """A TCP (or TLS, for ``wss://``) stream to the host and port of ``url``.

    ``wss://`` verifies the relay's certificate with ``ssl_context``, or the system's
    trusted CAs by default; a failed TLS handshake raises :class:`RelayUnavailable`.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    host = parts.hostname or "localhost"
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if parts.scheme == "wss":
        context = ssl_context or ssl.create_default_context()
        tls = trio.SSLStream(stream, context, server_hostname=host)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(stream)
            raise RelayUnavailable(url, f"TLS handshake failed: {exc.__cause__ or exc}") from exc
        stream = tls
    return stream


@asynccontextmanager
async def _open_connection(
    url: str,
    *,
    timeout: float,  # noqa: ASYNC109 - bounds connecting, the handshake and the close
    stream: trio.abc.Stream | None,
    message_queue_size: int = 1,
    envelope: bool = False,
    ssl_context: ssl.SSLContext | None = None,
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
                stream = await _open_stream(url, ssl_context)
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(timeout):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        # Typed for sockets, documented for "an arbitrary stream".
                        stream,  # type: ignore[arg-type]
                        parts.hostname or "localhost",
                        resource,
                        subprotocols=[SUBPROTOCOL] if envelope else None,
                        message_queue_size=message_queue_size,
                        max_message_size=_MAX_MESSAGE_SIZE,
                    )
                connected = True
                if envelope and ws.subprotocol != SUBPROTOCOL:
                    raise ClientError(url, f"the relay does not speak {SUBPROTOCOL}")
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
    envelope: bool = False,
    echo: bool = True,
    ssl_context: ssl.SSLContext | None = None,
) -> DeliveryReport | None:
    """Send ``message`` to the relay at ``url`` and return once the relay acknowledges it.

    Raw (the seed's protocol): the acknowledgement is the relay echoing the message back,
    since it delivers every message to every client, the sender included; messages from
    other producers that arrive first are skipped; returns None. With ``envelope=True``
    (the ``trio-relay.v1`` protocol): returns the relay's :class:`DeliveryReport` (the
    sequence number, and how many subscribers got, missed, or were evicted for the
    message); ``echo=False`` asks the relay not to send the message back.

    Raises :class:`RelayTimeout` if connecting, the handshake, or the acknowledgement takes
    longer than ``timeout`` seconds in total, :class:`PublishRejected` if the relay refuses
    the message, and another :class:`ClientError` if the relay is unreachable, refuses the
    handshake, or closes the connection. ``stream`` runs the connection over an already-open
    stream (see :mod:`trio_relay.testing`); ``ssl_context`` verifies a ``wss://`` relay.
    """
    with trio.move_on_after(timeout) as scope:
        async with _open_connection(
            url, timeout=timeout, stream=stream, envelope=envelope, ssl_context=ssl_context
        ) as ws:
            if not envelope:
                await ws.send_message(message)
                while await ws.get_message() != message:
                    pass
                return None
            request_id = uuid.uuid4().hex
            frame: dict[str, object] = {"type": "publish", "id": request_id, "echo": echo}
            if isinstance(message, str):
                frame["text"] = message
            else:
                frame["binary"] = base64.b64encode(message).decode("ascii")
            await ws.send_message(json.dumps(frame))
            while True:
                reply = _decode(url, await ws.get_message())
                if reply.get("id") != request_id:
                    continue
                if reply.get("type") == "ack":
                    return DeliveryReport(
                        str(reply["topic"]),
                        int(reply["seq"]),
                        1,
                        int(reply["queued"]),
                        int(reply["dropped"]),
                        int(reply["evicted"]),
                        reply.get("remote"),
                    )
                raise PublishRejected(url, str(reply.get("code")), str(reply.get("detail")))
    assert scope.cancelled_caught
    raise RelayTimeout(url, f"message not acknowledged within {timeout} s")


def _decode(url: str, frame: str | bytes) -> dict[str, Any]:
    try:
        value = json.loads(frame)
    except ValueError:
        raise ClientError(url, f"the relay sent a frame that is not JSON: {frame!r:.80}") from None
    if not isinstance(value, dict):
        raise ClientError(url, f"the relay sent a frame that is not an object: {frame!r:.80}")
    return value


def _item(url: str, frame: dict[str, Any]) -> Message | Gap | None:
    """The Message or Gap an envelope frame carries; None for other frames (acks)."""
    kind = frame.get("type")
    if kind == "message":
        if "text" in frame:
            data: str | bytes = frame["text"]
        else:
            data = base64.b64decode(frame["binary"])
        return Message(frame["topic"], int(frame["seq"]), data)
    if kind == "gap":
        return Gap(frame["topic"], int(frame["since"]), int(frame["first"]))
    return None


class MessageStream:
    """The messages a :func:`consume` connection receives: ``async for message in stream``.

    Iteration ends when the relay closes normally (1000); any other close raises
    :class:`RelayConnectionClosed` with its code (1001 when the relay shuts down,
    1008 when this consumer was evicted as too slow).
    """

    def __init__(
        self, url: str, connection: WebSocketConnection, *, envelope: bool = False
    ) -> None:
        self.url = url
        self.connection = connection
        self.envelope = envelope
        self.welcome_seq: int | None = None
        """Envelope only: the topic's last sequence number when this connection subscribed."""

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> Any:
        """The next message: ``str``/``bytes`` (raw), or a Message or Gap (envelope)."""
        try:
            while True:
                frame = await self.connection.get_message()
                if not self.envelope:
                    return frame
                decoded = _decode(self.url, frame)
                if decoded.get("type") == "welcome":
                    self.welcome_seq = int(decoded["seq"])
                    continue
                item = _item(self.url, decoded)
                if item is not None:
                    return item
        except ConnectionClosed as exc:
            reason = exc.reason
            if reason is not None and reason.code == 1000:
                raise StopAsyncIteration from None
            translated = _translate(self.url, exc, connected=True)
            assert translated is not None
            raise translated from exc

    async def send(self, message: str | bytes) -> None:
        """Publish ``message`` on this same connection (it comes back like any other)."""
        if self.envelope:
            frame: dict[str, object] = {"type": "publish"}
            if isinstance(message, str):
                frame["text"] = message
            else:
                frame["binary"] = base64.b64encode(message).decode("ascii")
            message = json.dumps(frame)
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
    envelope: bool = False,
    since: int | None = None,
    resume: bool = False,
    backoff: tuple[float, float] = (0.1, 5.0),
    connector: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[AsyncIterator[Any]]:
    """Connect to the relay at ``url`` and yield an async iterator of the messages it sends.

    ::

        async with trio_relay.consume("ws://localhost:4000/news") as messages:
            async for message in messages:
                print(message)

    Raw (the default), the iterator yields ``str`` and ``bytes``. With ``envelope=True``
    (the ``trio-relay.v1`` protocol) it yields :class:`Message` values (topic, sequence
    number, data) and, when messages asked for with ``since`` are no longer retained, a
    :class:`Gap`. ``since=seq`` first replays the retained messages after ``seq``.

    ``resume=True`` (envelope implied) keeps going across dropped connections: it
    reconnects with exponential ``backoff`` (first delay, cap) and resumes after the last
    sequence number it yielded, so every message arrives exactly once, in order, or a Gap
    says which are lost. It stops only on a handshake refusal (4xx), which would not heal.
    ``connector`` (an async function returning a connected stream) replaces opening a TCP
    connection for each attempt (see :mod:`trio_relay.testing`). ``ssl_context`` verifies a
    ``wss://`` relay (default: the system's trusted CAs).

    The connection lives exactly as long as the ``async with`` block (structured
    concurrency: no background task outlives it), which is why this is a context manager
    rather than a bare async generator. Connecting raises a :class:`ClientError` subclass.
    """
    if resume:
        if stream is not None:
            raise ValueError("resume=True opens its own connections: pass a connector")
        if connector is None and ssl_context is not None:
            context = ssl_context

            async def connector() -> trio.abc.Stream:
                return await _open_stream(url, context)

        async with _resuming(url, connect_timeout, since, backoff, connector) as items:
            yield items
        return
    async with _open_connection(
        _with_since(url, since),
        timeout=connect_timeout,
        stream=stream,
        message_queue_size=64,
        envelope=envelope,
        ssl_context=ssl_context,
    ) as ws:
        yield MessageStream(url, ws, envelope=envelope)


def _with_since(url: str, since: int | None) -> str:
    if since is None:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "since"] + [("since", str(since))]
    return urlunsplit(parts._replace(query=urlencode(query)))


@asynccontextmanager
async def _resuming(
    url: str,
    connect_timeout: float,
    since: int | None,
    backoff: tuple[float, float],
    connector: Callable[[], Awaitable[trio.abc.Stream]] | None,
) -> AsyncIterator[AsyncIterator[Any]]:
    """A background task keeps an envelope connection open and feeds a bounded channel."""
    send, receive = trio.open_memory_channel[Any](64)

    async def keep_consuming() -> None:
        last = since
        delay = backoff[0]
        async with send:
            while True:
                connection: MessageStream | None = None
                try:
                    stream = None if connector is None else await connector()
                    async with consume(
                        url,
                        connect_timeout=connect_timeout,
                        stream=stream,
                        envelope=True,
                        since=last,
                    ) as items:
                        assert isinstance(items, MessageStream)
                        connection = items
                        delay = backoff[0]
                        async for item in items:
                            if isinstance(item, Message):
                                if last is not None and item.seq <= last:
                                    continue
                                last = item.seq
                            elif isinstance(item, Gap):
                                last = item.first - 1
                            await send.send(item)
                except HandshakeRejected as exc:
                    if 400 <= exc.status_code < 500:
                        await send.send(exc)
                        return
                except (ClientError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the relay is unreachable or the connection dropped: retry
                if last is None and connection is not None:
                    # Dropped before any message: go on from where that connection started,
                    # as its welcome frame said, so nothing published meanwhile is lost.
                    last = connection.welcome_seq
                await trio.sleep(delay)
                delay = min(delay * 2, backoff[1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_consuming)
        try:
            yield _Resumed(receive)
        finally:
            nursery.cancel_scope.cancel()


class _Resumed:
    def __init__(self, receive: trio.MemoryReceiveChannel[Any]) -> None:
        self._receive = receive

    def __aiter__(self) -> _Resumed:
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        if isinstance(item, BaseException):
            raise item
        return item
