"""Client helpers: the seed's producer and consumer, on trio-websocket.

Every failure surfaces as a :class:`ClientError` subclass that names the URL; trio-websocket's
exceptions are wrapped at this boundary (the original is the ``__cause__``, unless its text
would show a secret).

Credentials: ``token=`` goes in an ``Authorization: Bearer`` header of the handshake, never
in the URL (a ``?token=`` already in the URL is sent as it is); ``headers=`` adds headers of
the caller's. No error message, :class:`ConsumerState` or log line shows a token: URLs and
server-supplied text go through :func:`~trio_relay._redact.redact`, and the token given is
cut out of any error that quotes it.

The handshake pieces other client modules build on: :func:`handshake_headers`,
:func:`open_stream`, :func:`open_connection` (any subprotocol) and :func:`closed_error`.

:func:`consume` reports its connection state at INFO on the ``trio_relay.client`` logger
("connecting to URL", "connected to URL", and with ``resume=True`` "connection lost
(REASON); retrying in X s"), and to an ``on_state`` callback as :class:`ConsumerState`.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio
import trio_websocket
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
)

from ._envelope import SUBPROTOCOL, max_message_frame
from ._exceptions import (
    ClientError,
    HandshakeRejected,
    PublishRejected,
    RelayConnectionClosed,
    RelayTimeout,
    RelayUnavailable,
)
from ._redact import REDACTED, redact, shown
from ._topics import DeliveryReport, Gap, Message

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_TIMEOUT",
    "ConsumerState",
    "Headers",
    "MessageStream",
    "Producer",
    "closed_error",
    "consume",
    "handshake_headers",
    "leaf",
    "open_connection",
    "open_producer",
    "open_stream",
    "produce",
]

logger = logging.getLogger("trio_relay.client")

DEFAULT_TIMEOUT = 10.0
"""Seconds allowed to connect and handshake, and for :func:`produce` to be acknowledged."""

DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
"""The largest message a client takes from the relay, as trio-websocket counts it: ``len()``
of the payload, so characters for text and bytes for binary. A larger one ends the
connection with a :class:`RelayConnectionClosed` (code 1009) saying so.

Room for everything a relay with ``--max-message-size`` up to 2.6 MiB sends (the default is
1 MiB): a raw message is at most that, an envelope ``message`` frame at most 6 times that
plus 310 bytes (control characters are escaped as ``\\u00XX`` in JSON)."""

# trio-websocket's close reason when a received message exceeds its max_message_size
# (trio_websocket/_impl.py, _handle_message_event): its only sign that the client, not the
# relay, closed the connection with 1009. Pinned by
# tests/test_client.py::test_a_message_over_the_clients_limit_is_a_clear_error.
_TOO_BIG = "Exceeded maximum message size: {} bytes"


Headers = Mapping[str, str] | Iterable[tuple[str, str]]
"""Extra handshake headers: a mapping, or (name, value) pairs (a name may repeat)."""

# Headers the WebSocket handshake writes itself (wsproto): a second copy would make the
# request ambiguous, so headers= may not carry them.
_HANDSHAKE_OWN = frozenset(
    {
        "host",
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
        "content-length",
        "transfer-encoding",
    }
)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's token
_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces


def handshake_headers(
    token: str | None = None, headers: Headers | None = None
) -> list[tuple[bytes, bytes]]:
    """The extra headers of a client's handshake: ``headers``, then ``Authorization: Bearer
    <token>`` if a ``token`` is given.

    Raises :class:`ValueError`, quoting neither a token nor a header's value (they may be
    credentials), for a token that is empty or not printable ASCII without spaces, a header
    name that is not an HTTP token, a value with a line break, NUL or a character outside
    Latin-1, a header the handshake writes itself (``Host``, ``Sec-WebSocket-*``...), and an
    ``Authorization`` header given together with ``token``.
    """
    if isinstance(headers, str | bytes):
        raise TypeError("headers= takes a mapping or (name, value) pairs, not a string")
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers or ())
    extra: list[tuple[bytes, bytes]] = []
    for name, value in pairs:
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"headers=: not a header name: {shown(name, 80)}")
        if name.lower() in _HANDSHAKE_OWN:
            raise ValueError(f"headers=: {name} is written by the WebSocket handshake itself")
        if name.lower() == "authorization" and token is not None:
            raise ValueError("give token= or an Authorization header in headers=, not both")
        if not isinstance(value, str) or any(char in value for char in "\r\n\0"):
            raise ValueError(f"headers=: the value of {name} must be one line of text")
        try:
            extra.append((name.encode("ascii"), value.strip().encode("latin-1")))
        except UnicodeEncodeError:
            raise ValueError(
                f"headers=: the value of {name} has a character outside Latin-1"
            ) from None
    if token is not None and not (isinstance(token, str) and _TOKEN.fullmatch(token)):
        size = f"{len(token)} characters" if isinstance(token, str) else type(token).__name__
        raise ValueError(f"token= must be printable ASCII without spaces (got {size})")
    if token is not None:
        extra.append((b"Authorization", b"Bearer " + token.encode("ascii")))
    return extra


def leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups, else ``exc``."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _translate(url: str, exc: BaseException, *, connected: bool) -> ClientError | None:
    exc = leaf(exc)
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, ConnectionRejected):
        return HandshakeRejected(url, exc.status_code, exc.body, exc.headers)
    if isinstance(exc, HandshakeError) and isinstance(exc.__cause__, OSError):
        # trio-websocket reports a failed TCP connect as HandshakeError from OSError.
        return RelayUnavailable(url, f"cannot connect: {exc.__cause__}")
    if isinstance(exc, HandshakeError):  # ConnectionTimeout, DisconnectionTimeout
        return RelayTimeout(url, f"WebSocket handshake timed out ({exc.__class__.__name__})")
    if isinstance(exc, ConnectionClosed):
        reason = exc.reason
        code = reason.code if reason is not None else 1006
        text = reason.reason if reason is not None else None
        if code == 1006 and not text:  # no close frame: the connection just ended
            text = "connection lost"
        return RelayConnectionClosed(url, code, text)
    if isinstance(exc, OSError) and not connected:
        return RelayUnavailable(url, f"cannot connect: {exc}")
    if isinstance(exc, trio.BrokenResourceError):
        return RelayConnectionClosed(url, 1006, "connection lost")
    return None


def closed_error(
    url: str, exc: ConnectionClosed, max_message_size: int, *, envelope: bool
) -> ClientError:
    """The error for a connection that closed under a receive or a send: a
    :class:`RelayConnectionClosed` with the close code and reason (1009 saying which side's
    ``max_message_size`` was passed; ``envelope`` says whether the relay sent JSON frames)."""
    reason = exc.reason
    if (
        reason is not None
        and reason.code == 1009
        and reason.reason == _TOO_BIG.format(max_message_size)
    ):
        # What the relay may send: its max_message_size for raw messages, and
        # max_message_frame() of it for envelopes. The client cannot know the setting.
        bound = (
            "a relay's message frames are at most 6 x its --max-message-size + "
            f"{max_message_frame(0)} bytes"
            if envelope
            else "a relay's messages are at most its --max-message-size"
        )
        return RelayConnectionClosed(
            url,
            1009,
            f"the relay sent a message over this client's max_message_size of "
            f"{max_message_size} (characters for text, bytes for binary): raise "
            f"max_message_size; {bound}",
        )
    translated = _translate(url, exc, connected=True)
    assert translated is not None
    return translated


async def open_stream(url: str, ssl_context: ssl.SSLContext | None = None) -> trio.abc.Stream:
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


class _WatchedStream(trio.abc.Stream):
    """A stream that notes when the peer ends it (end of stream, or broken).

    trio-websocket 0.12.2 waits for the handshake's response forever when the server closes
    the connection instead (a TLS port spoken to in plain text, say): its reader sees the
    end but the handshake wait is never told. The client watches for the end itself.
    """

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.ended = trio.Event()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.ended.set()
            raise
        if not data:
            self.ended.set()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:  # pragma: no cover - trio-websocket never half-closes
        raise trio.BrokenResourceError("half-close is not supported")

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _handshake(
    url: str,
    nursery: trio.Nursery,
    stream: _WatchedStream,
    resource: str,
    *,
    subprotocol: str | None,
    extra_headers: list[tuple[bytes, bytes]],
    message_queue_size: int,
    max_message_size: int,
) -> WebSocketConnection:
    """The WebSocket handshake over ``stream``; the connection's reader runs in ``nursery``.

    Raises :class:`RelayUnavailable` at once if the server ends the stream first.
    """
    ws: WebSocketConnection | None = None
    async with trio.open_nursery() as race:

        async def end_on_eof() -> None:
            await stream.ended.wait()
            race.cancel_scope.cancel()

        race.start_soon(end_on_eof)
        ws = await trio_websocket.wrap_client_stream(
            nursery,
            # Typed for sockets, documented for "an arbitrary stream".
            stream,  # type: ignore[arg-type]
            urlsplit(url).hostname or "localhost",
            resource,
            subprotocols=[subprotocol] if subprotocol is not None else None,
            extra_headers=extra_headers,
            message_queue_size=message_queue_size,
            max_message_size=max_message_size,
        )
        race.cancel_scope.cancel()
    if ws is None:
        hint = " (a TLS port? try wss://)" if urlsplit(url).scheme == "ws" else ""
        raise RelayUnavailable(
            url, f"the server closed the connection during the WebSocket handshake{hint}"
        )
    return ws


@asynccontextmanager
async def open_connection(
    url: str,
    *,
    timeout: float,  # noqa: ASYNC109 - bounds connecting and the handshake together, and the close
    stream: trio.abc.Stream | None = None,
    message_queue_size: int = 1,
    subprotocol: str | None = None,
    token: str | None = None,
    headers: Headers | None = None,
    ssl_context: ssl.SSLContext | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client connection to ``url``, over ``stream`` if one is given.

    Connecting and the handshake together take at most ``timeout`` seconds:
    :class:`RelayTimeout` says which one ran out. ``subprotocol`` is offered in the
    handshake and required of the answer (a :class:`ClientError` otherwise); ``token`` and
    ``headers`` are sent as :func:`handshake_headers` says (checked before connecting:
    :class:`ValueError`); ``ssl_context`` verifies a ``wss://`` relay (default: the system's
    trusted CAs). Every exception out of the block, the body's included, is translated
    as the client functions raise them (trio-websocket's as :class:`ClientError`), and no
    :class:`ClientError` quotes ``token``. The stream is always closed on exit. We open
    (and close) the TCP stream ourselves rather than use ``open_websocket_url``:
    trio-websocket 0.12.2 never closes a client's socket when the server closes first
    (tests/test_end_to_end.py pins this).
    """
    extra_headers = handshake_headers(token, headers)
    connected = False
    failure: BaseException | None = None
    parts = urlsplit(url)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    deadline = trio.current_time() + timeout
    try:
        with trio.move_on_at(deadline):
            if stream is None:
                stream = await open_stream(url, ssl_context)
        if stream is None:
            raise RelayTimeout(url, f"could not connect within {timeout} s")
        try:
            async with trio.open_nursery() as nursery:
                ws = None
                with trio.move_on_at(deadline):
                    ws = await _handshake(
                        url,
                        nursery,
                        _WatchedStream(stream),
                        resource,
                        subprotocol=subprotocol,
                        extra_headers=extra_headers,
                        message_queue_size=message_queue_size,
                        max_message_size=max_message_size,
                    )
                if ws is None:
                    raise RelayTimeout(url, f"no handshake response within {timeout} s")
                connected = True
                if subprotocol is not None and ws.subprotocol != subprotocol:
                    raise ClientError(url, f"the relay does not speak {subprotocol}")
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
        failure = _failure(url, exc, connected=connected, token=token)
    if failure is not None:
        # Raised outside the except block, so the exception group our internal nursery
        # wrapped it in does not become its __context__: callers see what their own code
        # raised (KeyboardInterrupt, say) or one ClientError, never a group.
        try:
            raise failure
        finally:
            failure = None


def _failure(
    url: str, exc: BaseException, *, connected: bool, token: str | None = None
) -> BaseException:
    """What a client call raises for ``exc``: a ClientError, or the bare exception.

    A ClientError that quotes ``token`` (a server that echoed it back) has it cut out:
    :func:`redact` only knows the shapes of tokens (JWTs, ``Bearer ...``), not opaque ones.
    """
    inner = leaf(exc)
    error = _translate(url, inner, connected=connected) or inner
    if error is not inner:
        cause = str(inner)
        if (token and token in cause) or redact(cause) != cause:
            # trio-websocket's exception quotes what the server sent (a rejection's body
            # and headers, a close reason) as it is: it would print the secret in a
            # traceback. The translation carries all of it, redacted.
            error.__suppress_context__ = True
        else:
            error.__cause__ = inner
    if token and isinstance(error, ClientError) and token in str(error):
        error.args = (str(error).replace(token, REDACTED),)
        for name in ("reason", "detail"):
            value = getattr(error, name, None)
            if isinstance(value, str):
                setattr(error, name, value.replace(token, REDACTED))
    return error


def _publish_frame(
    message: str | bytes, request_id: str | None, echo: bool = True, key: str | None = None
) -> str:
    """A ``trio-relay.v1`` publish frame carrying ``message`` (and idempotency ``key``)."""
    frame: dict[str, object] = {"type": "publish"}
    if request_id is not None:
        frame["id"] = request_id
    if not echo:
        frame["echo"] = False
    if key is not None:
        frame["idempotency_key"] = key
    if isinstance(message, str):
        frame["text"] = message
    else:
        frame["binary"] = base64.b64encode(message).decode("ascii")
    return json.dumps(frame)


class Producer:
    """An open connection that publishes messages one at a time, each acknowledged.

    Get one from :func:`open_producer`; :func:`produce` is one of these for one message.
    """

    def __init__(
        self,
        url: str,
        connection: WebSocketConnection,
        *,
        envelope: bool,
        echo: bool,
        timeout: float,
        max_message_size: int,
    ) -> None:
        self.url = url
        self.connection = connection
        self.envelope = envelope
        self.echo = echo
        self.timeout = timeout
        self._max_message_size = max_message_size

    async def produce(
        self, message: str | bytes, *, idempotency_key: str | None = None
    ) -> DeliveryReport | None:
        """Send ``message`` and return once the relay acknowledges it, as :func:`produce`
        does: None raw, the :class:`DeliveryReport` with the envelope protocol.

        Raises :class:`RelayTimeout` after ``timeout`` seconds without the acknowledgement,
        :class:`PublishRejected` if the relay refuses it, :class:`RelayConnectionClosed` if
        the connection ends. ``idempotency_key`` (envelope only): see :func:`produce`.
        """
        deadline = trio.current_time() + self.timeout
        return await self._produce(message, deadline, idempotency_key)

    async def _produce(
        self, message: str | bytes, deadline: float, key: str | None = None
    ) -> DeliveryReport | None:
        if key is not None and not self.envelope:
            raise ValueError("an idempotency key needs the envelope protocol (envelope=True)")
        with trio.move_on_at(deadline):
            try:
                return await self._acknowledged(message, key)
            except ConnectionClosed as exc:
                raise closed_error(
                    self.url, exc, self._max_message_size, envelope=self.envelope
                ) from exc
        raise RelayTimeout(self.url, f"message not acknowledged within {self.timeout} s")

    async def _acknowledged(
        self, message: str | bytes, key: str | None = None
    ) -> DeliveryReport | None:
        ws = self.connection
        if not self.envelope:
            await ws.send_message(message)
            while await ws.get_message() != message:
                pass
            return None
        request_id = uuid.uuid4().hex
        await ws.send_message(_publish_frame(message, request_id, self.echo, key))
        while True:
            reply = _decode(self.url, await ws.get_message())
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
                    epoch=str(reply.get("epoch", "")),
                    backplane="remote" in reply,
                    duplicate=bool(reply.get("duplicate", False)),
                )
            raise PublishRejected(self.url, str(reply.get("code")), str(reply.get("detail")))


@asynccontextmanager
async def open_producer(
    url: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - turned into RelayTimeout with the URL
    stream: trio.abc.Stream | None = None,
    envelope: bool = False,
    echo: bool = True,
    token: str | None = None,
    headers: Headers | None = None,
    ssl_context: ssl.SSLContext | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> AsyncIterator[Producer]:
    """Connect to the relay at ``url`` for publishing several messages on one connection.

    ::

        async with trio_relay.open_producer("ws://localhost:4000/news") as producer:
            for line in lines:
                await producer.produce(line)  # returns once acknowledged

    Connecting and the handshake take at most ``timeout`` seconds, and so does each
    acknowledgement. The arguments are :func:`produce`'s; ``max_message_size`` bounds what
    the connection takes from the relay (see :data:`DEFAULT_MAX_MESSAGE_SIZE`).
    """
    async with open_connection(
        url,
        timeout=timeout,
        stream=stream,
        subprotocol=SUBPROTOCOL if envelope else None,
        token=token,
        headers=headers,
        ssl_context=ssl_context,
        max_message_size=max_message_size,
    ) as ws:
        yield Producer(
            url,
            ws,
            envelope=envelope,
            echo=echo,
            timeout=timeout,
            max_message_size=max_message_size,
        )


async def produce(
    url: str,
    message: str | bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - turned into RelayTimeout with the URL
    stream: trio.abc.Stream | None = None,
    envelope: bool = False,
    echo: bool = True,
    token: str | None = None,
    headers: Headers | None = None,
    ssl_context: ssl.SSLContext | None = None,
    idempotency_key: str | None = None,
) -> DeliveryReport | None:
    """Send ``message`` to the relay at ``url`` and return once the relay acknowledges it.

    Raw (the seed's protocol): the acknowledgement is the relay echoing the message back,
    since it delivers every message to every client, the sender included; messages from
    other producers that arrive first are skipped; returns None. With ``envelope=True``
    (the ``trio-relay.v1`` protocol): returns the relay's :class:`DeliveryReport` (the
    sequence number, and how many subscribers got, missed, or were evicted for the
    message); ``echo=False`` asks the relay not to send the message back;
    ``idempotency_key`` makes publishing it again (after an ``ack`` with ``remote=None``,
    a timeout, a lost connection) safe: within the relay's ``idempotency_window`` the
    second one is answered with the first one's number (``DeliveryReport.duplicate``).

    Raises :class:`RelayTimeout` if connecting, the handshake, or the acknowledgement takes
    longer than ``timeout`` seconds in total (saying which), :class:`PublishRejected` if the
    relay refuses the message, and another :class:`ClientError` if the relay is unreachable,
    refuses the handshake (a missing or bad token: 401; a topic the token does not allow:
    403), is not a WebSocket endpoint, or closes the connection. ``stream`` runs the
    connection over an already-open stream (see :mod:`trio_relay.testing`). For several
    messages on one connection, see :func:`open_producer`.

    Credentials: ``token`` is sent as ``Authorization: Bearer <token>``, never in the URL
    (a ``?token=`` in ``url`` is sent as it is; where both are given the relay takes the
    header); ``headers`` (a mapping or name, value pairs) adds headers to the handshake
    (an ``Origin``, a proxy's credentials); ``ssl_context`` verifies a ``wss://`` relay
    (default: the system's trusted CAs). A bad token or header raises :class:`ValueError`
    before connecting. No error message quotes the token.
    """
    deadline = trio.current_time() + timeout
    async with open_producer(
        url,
        timeout=timeout,
        stream=stream,
        envelope=envelope,
        echo=echo,
        token=token,
        headers=headers,
        ssl_context=ssl_context,
    ) as producer:
        return await producer._produce(message, deadline, idempotency_key)


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
        return Message(frame["topic"], int(frame["seq"]), data, str(frame.get("epoch", "")))
    if kind == "gap":
        return Gap(
            frame["topic"],
            int(frame["since"]),
            int(frame["first"]),
            str(frame.get("epoch", "")),
            bool(frame.get("reset", False)),
        )
    return None


class MessageStream:
    """The messages a :func:`consume` connection receives: ``async for message in stream``.

    Iteration ends when the relay closes normally (1000); any other close raises
    :class:`RelayConnectionClosed` with its code (1001 when the relay shuts down,
    1008 when this consumer was evicted as too slow, 1009 when a message was over this
    client's ``max_message_size``).
    """

    def __init__(
        self,
        url: str,
        connection: WebSocketConnection,
        *,
        envelope: bool = False,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.url = url
        self.connection = connection
        self.envelope = envelope
        self.max_message_size = max_message_size
        self.welcome_seq: int | None = None
        """Envelope only: the topic's last sequence number when this connection subscribed."""
        self.welcome_epoch: str | None = None
        """Envelope only: the epoch of :attr:`welcome_seq`."""

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
                    self.welcome_epoch = decoded.get("epoch")
                    continue
                item = _item(self.url, decoded)
                if item is not None:
                    return item
        except ConnectionClosed as exc:
            reason = exc.reason
            if reason is not None and reason.code == 1000:
                raise StopAsyncIteration from None
            raise closed_error(
                self.url, exc, self.max_message_size, envelope=self.envelope
            ) from exc

    async def send(self, message: str | bytes) -> None:
        """Publish ``message`` on this same connection (it comes back like any other)."""
        if self.envelope:
            message = _publish_frame(message, None)
        try:
            await self.connection.send_message(message)
        except ConnectionClosed as exc:
            raise closed_error(
                self.url, exc, self.max_message_size, envelope=self.envelope
            ) from exc


@dataclass(frozen=True)
class ConsumerState:
    """What a :func:`consume` connection is doing, as its ``on_state`` callback hears it.

    ``state`` is ``"connecting"`` (an attempt begins), ``"connected"`` (the handshake
    succeeded), or, with ``resume=True`` only, ``"retrying"``: the connection was lost or
    could not be made (``reason`` says why) and the next attempt comes in ``delay`` seconds.
    """

    state: Literal["connecting", "connected", "retrying"]
    url: str
    reason: str | None = None
    delay: float | None = None


def _report(state: ConsumerState, on_state: Callable[[ConsumerState], None] | None) -> None:
    # shown(): a URL may carry ?token=, and a reason may quote what a server sent.
    if state.state == "retrying":
        logger.info(
            "connection lost (%s); retrying in %s s", shown(state.reason), f"{state.delay:.3g}"
        )
    else:
        logger.info("%s to %s", state.state, shown(state.url))
    if on_state is not None:
        on_state(state)


@asynccontextmanager
async def consume(
    url: str,
    *,
    connect_timeout: float = DEFAULT_TIMEOUT,
    stream: trio.abc.Stream | None = None,
    envelope: bool = False,
    since: int | None = None,
    epoch: str | None = None,
    resume: bool = False,
    backoff: tuple[float, float] = (0.1, 5.0),
    connector: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
    token: str | None = None,
    headers: Headers | None = None,
    ssl_context: ssl.SSLContext | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    on_state: Callable[[ConsumerState], None] | None = None,
) -> AsyncIterator[AsyncIterator[Any]]:
    """Connect to the relay at ``url`` and yield an async iterator of the messages it sends.

    ::

        async with trio_relay.consume("ws://localhost:4000/news") as messages:
            async for message in messages:
                print(message)

    Raw (the default), the iterator yields ``str`` and ``bytes``. With ``envelope=True``
    (the ``trio-relay.v1`` protocol) it yields :class:`Message` values (topic, sequence
    number, data) and, when messages asked for with ``since`` are no longer retained, a
    :class:`Gap`. ``since=seq`` first replays the retained messages after ``seq``;
    ``epoch`` is the epoch of ``seq`` (as :attr:`Message.epoch` has it): a relay whose
    numbering of the topic is another (it restarted, say) answers with a :class:`Gap`
    whose ``reset`` is set, never with numbers of its own taken for yours.

    ``resume=True`` (envelope implied) keeps going across dropped connections: it
    reconnects with exponential ``backoff`` (first delay, cap) and resumes after the last
    epoch and sequence number it yielded, so every message arrives exactly once, in order,
    or a Gap says which are lost (or, ``reset``, that the numbering changed). The backoff
    starts over only once a connection has delivered something (a relay that accepts and
    then drops every connection is retried ever more slowly). It stops, raising the error
    from the iterator, on what would not heal: a handshake answered with anything but 101
    or a 5xx status (a refusal, or a server that is not a WebSocket endpoint), and a
    message over ``max_message_size``.
    ``connector`` (an async function returning a connected stream) replaces opening a TCP
    connection for each attempt (see :mod:`trio_relay.testing`).

    ``token``, ``headers`` and ``ssl_context`` are :func:`produce`'s: the token goes in an
    ``Authorization: Bearer`` header of every handshake (each reconnection's too), never in
    the URL; a refused token (401, 403) stops ``resume`` too. The URL in
    :class:`ConsumerState` and in the log has any ``?token=`` redacted.

    ``max_message_size`` is the largest message taken from the relay (see
    :data:`DEFAULT_MAX_MESSAGE_SIZE`); a larger one raises :class:`RelayConnectionClosed`
    with code 1009 and a reason saying so. ``on_state`` is called with a
    :class:`ConsumerState` on every change of the connection's state (it must not block);
    the same changes are logged at INFO on the ``trio_relay.client`` logger.

    The connection lives exactly as long as the ``async with`` block (structured
    concurrency: no background task outlives it), which is why this is a context manager
    rather than a bare async generator. Connecting raises a :class:`ClientError` subclass.
    """
    handshake = partial(
        open_connection,
        timeout=connect_timeout,
        message_queue_size=64,
        token=token,
        headers=headers,
        ssl_context=ssl_context,
        max_message_size=max_message_size,
    )
    handshake_headers(token, headers)  # a bad token or header fails here, before connecting
    if resume:
        if stream is not None:
            raise ValueError("resume=True opens its own connections: pass a connector")
        async with _resuming(
            url,
            connect_timeout,
            handshake,
            (since, epoch),
            backoff,
            connector,
            max_message_size,
            on_state,
        ) as items:
            yield items
        return
    _report(ConsumerState("connecting", redact(url)), on_state)
    async with handshake(
        _with_since(url, since, epoch),
        stream=stream,
        subprotocol=SUBPROTOCOL if envelope else None,
    ) as ws:
        _report(ConsumerState("connected", redact(url)), on_state)
        yield MessageStream(url, ws, envelope=envelope, max_message_size=max_message_size)


def _with_since(url: str, since: int | None, epoch: str | None = None) -> str:
    if since is None:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("since", "epoch")]
    query.append(("since", str(since)))
    if epoch:
        query.append(("epoch", epoch))
    return urlunsplit(parts._replace(query=urlencode(query)))


def _fatal(exc: ClientError) -> bool:
    """Whether a resuming consumer gives up on ``exc``: retrying would meet it again."""
    if isinstance(exc, HandshakeRejected):
        return exc.status_code < 500
    return isinstance(exc, RelayConnectionClosed) and exc.code == 1009


def _without_url(exc: ClientError) -> str:
    return str(exc).removeprefix(f"{exc.url}: ")


@asynccontextmanager
async def _resuming(
    url: str,
    connect_timeout: float,
    handshake: Callable[..., AbstractAsyncContextManager[WebSocketConnection]],
    position: tuple[int | None, str | None],
    backoff: tuple[float, float],
    connector: Callable[[], Awaitable[trio.abc.Stream]] | None,
    max_message_size: int,
    on_state: Callable[[ConsumerState], None] | None,
) -> AsyncIterator[AsyncIterator[Any]]:
    """A background task keeps an envelope connection open and feeds a bounded channel;
    ``handshake`` is :func:`open_connection` with the consumer's settings."""
    shown_url = redact(url)
    send, receive = trio.open_memory_channel[Any](64)

    async def keep_consuming() -> None:
        last, last_epoch = position  # where to resume: the last message's number and epoch
        delay = backoff[0]
        # Closed without a checkpoint: with `async with`, aclose()'s checkpoint could turn an
        # exception on its way out (KeyboardInterrupt raised in this task) into Cancelled
        # once the reader, woken by the close, cancels this task; the exception were lost.
        with send:
            while True:
                connection: MessageStream | None = None
                reason = "closed by the relay"
                _report(ConsumerState("connecting", shown_url), on_state)
                try:
                    stream = None
                    if connector is not None:
                        with trio.fail_after(connect_timeout):
                            stream = await connector()
                    async with handshake(
                        _with_since(url, last, last_epoch), stream=stream, subprotocol=SUBPROTOCOL
                    ) as ws:
                        _report(ConsumerState("connected", shown_url), on_state)
                        connection = MessageStream(
                            url, ws, envelope=True, max_message_size=max_message_size
                        )
                        async for item in connection:
                            if isinstance(item, Message):
                                if (
                                    last is not None
                                    and item.seq <= last
                                    and item.epoch == (last_epoch or item.epoch)
                                ):
                                    continue
                                last, last_epoch = item.seq, item.epoch or None
                            elif isinstance(item, Gap):
                                last, last_epoch = item.first - 1, item.epoch or None
                            await send.send(item)
                            delay = backoff[0]  # it delivered: the backoff starts over
                except ClientError as exc:
                    if _fatal(exc):
                        await send.send(exc)
                        return
                    reason = _without_url(exc)
                except trio.TooSlowError:
                    reason = f"could not connect within {connect_timeout} s"
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    reason = f"cannot connect: {exc or type(exc).__name__}"
                if last is None and connection is not None:
                    # Dropped before any message: go on from where that connection started,
                    # as its welcome frame said, so nothing published meanwhile is lost.
                    last, last_epoch = connection.welcome_seq, connection.welcome_epoch
                _report(ConsumerState("retrying", shown_url, reason, delay), on_state)
                await trio.sleep(delay)
                delay = min(delay * 2, backoff[1])

    failure: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_consuming)
            try:
                yield _Resumed(receive)
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        failure = leaf(group)
    if failure is not None:
        # Raised outside the except block, as in open_connection: the caller sees what its
        # own code raised (KeyboardInterrupt at Ctrl-C, say), never our nursery's group.
        try:
            raise failure
        finally:
            failure = None


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
