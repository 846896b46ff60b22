"""The Python client of ``trio-relay.v2``: many topics on one connection.

::

    async with trio_relay.connect("ws://localhost:4000/", token=token) as session:
        await session.subscribe("news", since=41)
        report = await session.publish("chat", "hello")
        async for item in session:       # Message, Gap or Unsubscribed, each with its topic
            ...

:func:`connect` opens the connection (and, with ``resume=True``, the next ones) in a task of
its own that lives exactly as long as the ``async with`` block. The :class:`Session`'s
requests are answered by frame id; its messages wait in a bounded buffer until iterated.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from ._client import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_TIMEOUT,
    ConsumerState,
    Headers,
    closed_error,
    handshake_headers,
    leaf,
    open_connection,
)
from ._exceptions import (
    ClientError,
    HandshakeRejected,
    PublishRejected,
    RelayConnectionClosed,
    RelayTimeout,
    SubscriptionRejected,
)
from ._idempotency import check_key
from ._redact import redact, shown
from ._topics import DeliveryReport, Gap, Message, check_epoch, topic_from_path
from ._v2 import SUBPROTOCOL_V2

__all__ = ["Session", "Unsubscribed", "connect"]

logger = logging.getLogger("trio_relay.client")

DEFAULT_BUFFER = 1024
"""Messages (and gaps) a :class:`Session` holds for its reader before it stops reading."""


@dataclass(frozen=True)
class Unsubscribed:
    """The relay ended the subscription to ``topic`` on its own: ``code`` is
    ``"slow-consumer"`` when its queue on the relay overflowed (this client read too
    slowly). Nothing more of the topic arrives; ``session.subscribe(topic, since=last)``
    gets what was missed (or a gap). ``last`` is the sequence number of the topic's last
    message received (or where its subscription began)."""

    topic: str
    code: str
    detail: str
    last: int | None = None


class _Topic:
    """A topic the session wants: ``last`` is the sequence number it resumes after (the
    last message passed on, or where its subscription began), of ``epoch`` (None: not
    known); ``subscribed`` is set once the relay confirmed it on the current connection."""

    __slots__ = ("epoch", "error", "last", "request", "seq", "subscribed")

    def __init__(self, since: int | None, epoch: str | None = None) -> None:
        self.last = since
        self.epoch = epoch
        self.seq = 0  # the topic's last number when the relay confirmed the subscription
        self.subscribed = trio.Event()
        self.error: ClientError | None = None
        self.request: int | None = None  # the id of its subscribe frame in flight


class _Request:
    __slots__ = ("answer", "done", "lost")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: dict[str, Any] | None = None
        self.lost: ClientError | None = None


def _frame(url: str, data: str | bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        raise ClientError(url, f"the relay sent a frame that is not JSON: {data!r:.80}") from None
    if not isinstance(value, dict):
        raise ClientError(url, f"the relay sent a frame that is not an object: {data!r:.80}")
    return value


def _gives_up(exc: ClientError) -> bool:
    """Whether a resuming session stops on ``exc``: retrying would meet it again (a 4xx
    refusal such as a bad token, or a message over this client's ``max_message_size``)."""
    if isinstance(exc, HandshakeRejected):
        return exc.status_code < 500
    return isinstance(exc, RelayConnectionClosed) and exc.code == 1009


class Session:
    """One ``trio-relay.v2`` session: subscribe, unsubscribe and publish on many topics;
    ``async for item in session`` yields :class:`~trio_relay.Message`,
    :class:`~trio_relay.Gap` and :class:`Unsubscribed` values, each naming its topic.

    Made by :func:`connect`. Each request waits for its answer at most ``timeout``
    seconds (:class:`RelayTimeout`), a wait for a connection included when resuming.

    Backpressure: what arrives is buffered for the iterator up to ``max_buffer`` items;
    while the buffer is full the session reads nothing more from the relay, answers to
    requests included, and the relay's slow-consumer rule applies to the topics that
    pile up there. A session that subscribes must iterate.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        max_buffer: int,
        max_message_size: int,
        resume: bool,
        token: str | None = None,
    ) -> None:
        self.url = url
        self._timeout = timeout
        self._max_message_size = max_message_size
        self._resume = resume
        self._send_items, self._items = trio.open_memory_channel[Message | Gap | Unsubscribed](
            max_buffer
        )
        self._ids = itertools.count(1)
        self._topics: dict[str, _Topic] = {}
        self._requests: dict[int, _Request] = {}
        self._ws: WebSocketConnection | None = None
        self._connected = trio.Event()
        self._failure: ClientError | None = None
        self._ended = trio.Event()  # no more connections: _failure says why (None: closed)
        self._closing = False
        self._lost = trio.Event()  # set when the current connection is lost
        self._reading: trio.CancelScope | None = None  # cancelled to close the session
        self._waiting: dict[int, WebSocketConnection] = {}  # request id: its connection
        self._token = token  # the token of the next handshake (a refresh replaces it)

    def __repr__(self) -> str:
        return f"<Session {shown(redact(self.url))} topics={sorted(self._topics)}>"

    @property
    def topics(self) -> dict[str, int | None]:
        """The topics this session is subscribed to (or resubscribes after a reconnect),
        each with the sequence number it is up to: the last message passed on, or where the
        subscription began (None until the relay answered a subscribe without ``since``)."""
        return {name: topic.last for name, topic in self._topics.items()}

    # ------------------------------------------------------------------ requests

    async def subscribe(
        self, topic: str, since: int | None = None, epoch: str | None = None
    ) -> int:
        """Subscribe to ``topic``; with ``since``, the retained messages after it come
        first (or a :class:`~trio_relay.Gap` says which are lost); ``epoch`` is the epoch
        of ``since`` (:attr:`Message.epoch`): a relay whose numbering of the topic is
        another answers with a Gap whose ``reset`` is set. Returns the topic's last
        sequence number when subscribed: every message above it arrives live.

        Raises :class:`SubscriptionRejected` with the relay's code (``forbidden``,
        ``already-subscribed``, ``too-many-subscriptions``, ...), :class:`ValueError` for an
        invalid name or ``since``, and the connection's error if it is lost (without
        ``resume``) or fails for good. With ``resume``, the topic is subscribed again,
        from its last number and epoch, on every new connection."""
        topic_from_path("/" + topic)  # ValueError for a name the relay would refuse
        if since is not None and (isinstance(since, bool) or not 0 <= since < 2**63):
            raise ValueError("since must be a sequence number (a whole number >= 0)")
        if epoch is not None:
            if since is None:
                raise ValueError("epoch is the epoch of since: give both")
            check_epoch(epoch)
        if topic in self._topics:
            raise SubscriptionRejected(
                self.url, "already-subscribed", f"already subscribed to {topic!r}", topic
            )
        wanted = self._topics[topic] = _Topic(since, epoch)
        try:
            with trio.move_on_after(self._timeout) as scope:
                while True:
                    ws = await self._connection()
                    if wanted.request is None and not wanted.subscribed.is_set():
                        await self._send_subscribe(ws, topic, wanted)
                    await self._first_of(wanted.subscribed, self._ended, self._lost_event(ws))
                    if wanted.subscribed.is_set() or wanted.error is not None:
                        break
                    if self._failure is not None:
                        raise self._failure
                    if not self._resume:
                        raise self._connection_lost()
            if scope.cancelled_caught:
                raise RelayTimeout(self.url, f"subscribe to {topic!r} not answered in time")
        except BaseException:
            if self._topics.get(topic) is wanted and not wanted.subscribed.is_set():
                del self._topics[topic]
            raise
        if wanted.error is not None:
            raise wanted.error
        return wanted.seq

    async def unsubscribe(self, topic: str) -> None:
        """Unsubscribe from ``topic``: once this returns, nothing more of it arrives.

        Raises :class:`SubscriptionRejected` (``not-subscribed``) for a topic this session
        is not subscribed to."""
        wanted = self._topics.pop(topic, None)
        if wanted is None:
            raise SubscriptionRejected(
                self.url, "not-subscribed", f"not subscribed to {topic!r}", topic
            )
        ws = self._ws
        if ws is None or not wanted.subscribed.is_set():
            return  # nothing on the relay (a new connection will not subscribe it)
        try:
            answer = await self._request({"type": "unsubscribe", "topic": topic}, wait=False)
        except RelayConnectionClosed:
            if not self._resume:
                raise
            return  # that connection is gone, and the next will not subscribe it
        if answer["type"] == "error" and answer.get("code") != "not-subscribed":
            raise SubscriptionRejected(
                self.url, str(answer.get("code")), str(answer.get("detail")), topic
            )

    async def publish(
        self,
        topic: str,
        message: str | bytes,
        *,
        echo: bool = True,
        idempotency_key: str | None = None,
    ) -> DeliveryReport:
        """Publish ``message`` on ``topic`` and return the relay's delivery report (its
        sequence number; for how many subscribers it was queued, dropped or evicted).

        ``echo=False``: this session's own subscription to the topic does not get it back.
        Raises :class:`PublishRejected` with the relay's code (``forbidden``,
        ``too-many-topics``, ...), :class:`RelayTimeout`, or :class:`RelayConnectionClosed`
        if the connection was lost before the answer: then the message may or may not have
        been published, and publishing it again with the same ``idempotency_key`` is safe
        (within the relay's window the second is answered with the first one's number,
        ``duplicate`` set)."""
        frame: dict[str, Any] = {"type": "publish", "topic": topic}
        if idempotency_key is not None:
            frame["idempotency_key"] = check_key(idempotency_key)
        if isinstance(message, str):
            frame["text"] = message
        else:
            frame["binary"] = base64.b64encode(message).decode("ascii")
        if not echo:
            frame["echo"] = False
        answer = await self._request(frame)
        if answer["type"] != "ack":
            raise PublishRejected(self.url, str(answer.get("code")), str(answer.get("detail")))
        return DeliveryReport(
            str(answer["topic"]),
            int(answer["seq"]),
            1,
            int(answer["queued"]),
            int(answer["dropped"]),
            int(answer["evicted"]),
            answer.get("remote"),
            epoch=str(answer.get("epoch", "")),
            backplane="remote" in answer,
            duplicate=bool(answer.get("duplicate", False)),
        )

    async def refresh(self, token: str) -> None:
        """Give the relay a new token for this connection before the old one expires (and
        use it for later connections when resuming). Raises :class:`ClientError` with the
        relay's code (``bad-token``, ``forbidden``) if it is refused: the old one stays."""
        handshake_headers(token)  # ValueError for a token no header could carry
        answer = await self._request({"type": "refresh", "token": token})
        if answer["type"] != "refreshed":
            code, detail = answer.get("code"), shown(redact(str(answer.get("detail"))))
            raise ClientError(self.url, f"refresh refused ({code}): {detail}")
        self._token = token

    # ------------------------------------------------------------------ iteration

    def __aiter__(self) -> Session:
        return self

    async def __anext__(self) -> Message | Gap | Unsubscribed:
        """The next message, gap or notice, in the order the relay sent them. Ends when the
        session ends normally (the relay closed with 1000); raises the connection's error
        otherwise (without ``resume``, any lost connection)."""
        try:
            return await self._items.receive()
        except trio.EndOfChannel:
            if self._failure is not None:
                raise self._failure from None
            raise StopAsyncIteration from None

    # ------------------------------------------------------------------ internals

    async def _connection(self) -> WebSocketConnection:
        """The open connection, waiting for one while resuming; raises if there will be none."""
        while self._ws is None:
            if self._ended.is_set():
                raise self._failure or ClientError(self.url, "the session is closed")
            await self._first_of(self._connected, self._ended)
        return self._ws

    def _lost_event(self, ws: WebSocketConnection) -> trio.Event:
        """An event set when ``ws`` is no longer the session's connection."""
        return self._lost if self._ws is ws else _SET

    @staticmethod
    async def _first_of(*events: trio.Event) -> None:
        if any(event.is_set() for event in events):
            await trio.sleep(0)
            return
        async with trio.open_nursery() as nursery:
            for event in events:

                async def wait(event: trio.Event = event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(wait)

    def _connection_lost(self) -> ClientError:
        return self._failure or RelayConnectionClosed(self.url, 1006, "connection lost")

    async def _send_subscribe(self, ws: WebSocketConnection, topic: str, wanted: _Topic) -> None:
        request_id = next(self._ids)
        wanted.request = request_id
        frame: dict[str, Any] = {"type": "subscribe", "topic": topic, "id": request_id}
        if wanted.last is not None:
            frame["since"] = wanted.last
            if wanted.epoch:
                frame["epoch"] = wanted.epoch
        try:
            await ws.send_message(json.dumps(frame))
        except ConnectionClosed:
            wanted.request = None  # the next connection sends it again

    async def _request(self, frame: dict[str, Any], *, wait: bool = True) -> dict[str, Any]:
        """Send ``frame`` with a new id and return the relay's answer to it."""
        request_id = frame["id"] = next(self._ids)
        request = self._requests[request_id] = _Request()
        try:
            with trio.move_on_after(self._timeout) as scope:
                while True:
                    ws = await self._connection() if wait else self._ws
                    if ws is None:
                        raise self._connection_lost()
                    request.lost, request.done = None, trio.Event()  # for this attempt
                    self._waiting[request_id] = ws
                    try:
                        await ws.send_message(json.dumps(frame))
                        break
                    except ConnectionClosed as exc:
                        if not (self._resume and wait):
                            raise closed_error(
                                self.url, exc, self._max_message_size, envelope=True
                            ) from exc
                    # Not sent: the connection died before the session noticed. Resend on
                    # the next one.
                    await self._first_of(self._lost_event(ws), self._ended)
                await request.done.wait()
            if scope.cancelled_caught:
                raise RelayTimeout(self.url, f"{frame['type']} not answered in time")
        finally:
            del self._requests[request_id]
            self._waiting.pop(request_id, None)
        if request.lost is not None:
            raise request.lost
        assert request.answer is not None
        return request.answer

    async def _run(
        self,
        connector: Callable[[], Awaitable[trio.abc.Stream]] | None,
        handshake: Callable[..., Any],
        backoff: tuple[float, float],
        on_state: Callable[[ConsumerState], None] | None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep a connection (with ``resume``, one after another), and read it. Never
        raises but Cancelled: a failure ends the session (:attr:`_failure`)."""
        shown_url = shown(redact(self.url))
        delay = backoff[0]
        started = False
        try:
            while True:
                reason = "closed by the relay"
                self._report(ConsumerState("connecting", shown_url), on_state)
                try:
                    stream = None
                    if connector is not None:
                        with trio.fail_after(self._timeout):
                            stream = await connector()
                    async with handshake(stream=stream, token=self._token) as ws:
                        self._report(ConsumerState("connected", shown_url), on_state)
                        self._lost = trio.Event()
                        self._ws = ws
                        self._connected.set()
                        self._connected = trio.Event()
                        if not started:
                            started = True
                            task_status.started()
                        with trio.CancelScope() as self._reading:
                            if self._closing:
                                self._reading.cancel()
                            for name, wanted in list(self._topics.items()):
                                wanted.request = None
                                await self._send_subscribe(ws, name, wanted)
                            await self._read(ws)
                        # Leaving the block closes the connection (1000) with trio-websocket's
                        # reader still running to take the relay's answer.
                        delay = backoff[0]
                        if not self._resume or self._closing:
                            return  # closed normally (1000), or by us
                except ClientError as exc:
                    if self._closing:
                        return
                    if not self._resume or _gives_up(exc):
                        self._failure = exc
                        return
                    reason = str(exc).removeprefix(f"{exc.url}: ")
                except trio.TooSlowError:
                    reason = f"could not connect within {self._timeout} s"
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    reason = f"cannot connect: {exc or type(exc).__name__}"
                    if not self._resume:
                        self._failure = RelayConnectionClosed(self.url, 1006, reason)
                        return
                except Exception:
                    if self._closing:
                        # trio-websocket 0.12 answers a ping that crosses its own close frame
                        # and fails (wsproto's LocalProtocolError; its issue 184): the session
                        # was closing anyway. Pinned by test_session.py's
                        # test_trio_websocket_still_fails_on_a_ping_during_its_close.
                        return
                    raise
                finally:
                    self._drop_connection()
                if not started:
                    started = True
                    task_status.started()  # resuming: requests wait for a connection
                self._report(ConsumerState("retrying", shown_url, reason, delay), on_state)
                await trio.sleep(delay)
                delay = min(delay * 2, backoff[1])
        finally:
            self._ended.set()
            self._send_items.close()
            if not started:
                task_status.started()  # connect() raises the failure

    def _drop_connection(self) -> None:
        """The connection is gone: requests waiting on it fail (a publish may or may not
        have happened); subscriptions wait for the next one."""
        ws, self._ws = self._ws, None
        if ws is None:
            return
        self._lost.set()
        lost = self._connection_lost()
        for request_id, request in self._requests.items():
            if self._waiting.get(request_id) is ws and not request.done.is_set():
                request.lost = lost
                request.done.set()
        for wanted in self._topics.values():
            wanted.request = None
            if wanted.subscribed.is_set():
                wanted.subscribed = trio.Event()

    @staticmethod
    def _report(state: ConsumerState, on_state: Callable[[ConsumerState], None] | None) -> None:
        if state.state == "retrying":
            logger.info(
                "connection lost (%s); retrying in %s s", shown(state.reason), f"{state.delay:.3g}"
            )
        else:
            logger.info("%s to %s", state.state, state.url)
        if on_state is not None:
            on_state(state)

    async def _read(self, ws: WebSocketConnection) -> None:
        """Read frames until the connection ends: answers go to their requests, messages,
        gaps and notices to the iterator (deduplicated by sequence number across
        reconnects). Returns on a normal close (1000); raises its error otherwise."""
        try:
            while True:
                frame = _frame(self.url, await ws.get_message())
                await self._dispatch(frame)
        except ConnectionClosed as exc:
            reason = exc.reason
            if reason is not None and reason.code == 1000:
                return
            raise closed_error(self.url, exc, self._max_message_size, envelope=True) from exc

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        topic = frame.get("topic")
        wanted = self._topics.get(topic) if isinstance(topic, str) else None
        if kind == "message":
            assert isinstance(topic, str)
            seq = int(frame["seq"])
            epoch = str(frame.get("epoch", ""))
            if wanted is not None:
                if (
                    wanted.last is not None
                    and seq <= wanted.last
                    and (wanted.epoch or epoch) == epoch
                ):
                    return  # already passed on before a reconnect
                wanted.last, wanted.epoch = seq, epoch or None
            if "text" in frame:
                data: str | bytes = frame["text"]
            else:
                data = base64.b64decode(frame["binary"])
            await self._send_items.send(Message(topic, seq, data, epoch))
            return
        if kind == "gap":
            assert isinstance(topic, str)
            gap = Gap(
                topic,
                int(frame["since"]),
                int(frame["first"]),
                str(frame.get("epoch", "")),
                bool(frame.get("reset", False)),
            )
            if wanted is not None:
                wanted.last, wanted.epoch = gap.first - 1, gap.epoch or None
            await self._send_items.send(gap)
            return
        request_id = frame.get("id")
        if wanted is not None and request_id is not None and request_id == wanted.request:
            wanted.request = None
            if kind == "subscribed":
                wanted.seq = int(frame["seq"])
                if wanted.last is None:
                    wanted.last = wanted.seq
                    wanted.epoch = frame.get("epoch") or None
                wanted.subscribed.set()
            else:
                assert isinstance(topic, str)
                del self._topics[topic]
                wanted.error = SubscriptionRejected(
                    self.url, str(frame.get("code")), str(frame.get("detail")), topic
                )
                wanted.subscribed.set()
            return
        if kind == "unsubscribed" and request_id is None and isinstance(topic, str):
            last = None
            if wanted is not None:
                del self._topics[topic]
                last = wanted.last
            code, detail = str(frame.get("code")), str(frame.get("detail", ""))
            item = Unsubscribed(topic, code, detail, last)
            await self._send_items.send(item)
            return
        if isinstance(request_id, int):
            request = self._requests.get(request_id)
            if request is not None and not request.done.is_set():
                request.answer = frame
                request.done.set()
                return
        logger.debug("unexpected frame from %s: %s", shown(redact(self.url)), shown(frame))


_SET = trio.Event()
_SET.set()


def _session_url(url: str) -> tuple[str, str | None, int | None]:
    """The URL the session connects to (path ``/``, without ``since``), and the topic and
    ``since`` the given URL named: subscribed by frame, so that a resumed connection
    subscribes it from its last number like any other."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a ws:// or wss:// URL: {shown(redact(url))}")
    path = unquote(parts.path or "/")
    topic = topic_from_path(path) if path != "/" else None
    query = parse_qsl(parts.query)
    since_values = [value for key, value in query if key == "since"]
    since = None
    if since_values:
        if topic is None:
            raise ValueError("since= in the URL needs a topic in its path")
        if len(since_values) > 1 or not since_values[0].isdigit():
            raise ValueError("since= must be one sequence number (a whole number >= 0)")
        since = int(since_values[0])
    rest = urlencode([(key, value) for key, value in query if key != "since"])
    return urlunsplit(parts._replace(path="/", query=rest)), topic, since


@asynccontextmanager
async def connect(
    url: str,
    *,
    token: str | None = None,
    headers: Headers | None = None,
    ssl_context: ssl.SSLContext | None = None,
    resume: bool = False,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - each request's bound, as RelayTimeout
    backoff: tuple[float, float] = (0.1, 5.0),
    max_buffer: int = DEFAULT_BUFFER,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    connector: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
    on_state: Callable[[ConsumerState], None] | None = None,
) -> AsyncIterator[Session]:
    """Open a ``trio-relay.v2`` session with the relay at ``url`` for the ``async with``
    block: one connection, many topics (see :class:`Session`).

    ::

        async with trio_relay.connect("ws://localhost:4000/", token=token) as session:
            await session.subscribe("news")
            await session.subscribe("sport", since=12)
            print(await session.publish("news", "hello"))
            async for item in session:
                print(item.topic, item)

    A topic in the URL's path (``ws://host/news?since=4``) is subscribed first. ``token``
    is sent as ``Authorization: Bearer`` (never in the URL), ``headers`` are extra
    handshake headers, ``ssl_context`` verifies a ``wss://`` relay (default: the system's
    trusted CAs). ``timeout`` bounds connecting and the handshake, and each request.

    ``resume=True`` keeps the session across lost connections: it reconnects with
    exponential ``backoff`` (first delay, cap) and subscribes every topic again from the
    last sequence number it passed on, so each message arrives once, in order, or a
    :class:`~trio_relay.Gap` says which are lost. Requests wait for the connection (within
    ``timeout``); a publish whose connection was lost before its answer raises
    :class:`RelayConnectionClosed`. It stops only on what would not heal: a handshake
    refused with 4xx, or a message over ``max_message_size``. ``on_state`` hears each
    ``connecting``, ``connected`` and ``retrying`` (:class:`~trio_relay.ConsumerState`).

    ``connector`` (an async function returning a connected stream) replaces opening a TCP
    connection (:mod:`trio_relay.testing`: ``connector=relay.open_stream``). Connecting
    raises a :class:`ClientError` subclass (without ``resume``).
    """
    base, first_topic, first_since = _session_url(url)
    handshake_headers(token, headers)  # ValueError now, before any connection
    session = Session(
        url,
        timeout=timeout,
        max_buffer=max_buffer,
        max_message_size=max_message_size,
        resume=resume,
        token=token,
    )

    @asynccontextmanager
    async def handshake(
        *, stream: trio.abc.Stream | None, token: str | None
    ) -> AsyncIterator[WebSocketConnection]:
        async with open_connection(
            base,
            timeout=timeout,
            stream=stream,
            message_queue_size=64,
            subprotocol=SUBPROTOCOL_V2,
            token=token,
            headers=headers,
            ssl_context=ssl_context,
            max_message_size=max_message_size,
        ) as ws:
            yield ws

    failure: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(session._run, connector, handshake, backoff, on_state)
            if session._failure is not None:
                raise session._failure  # the first connection failed (without resume)
            try:
                if first_topic is not None:
                    await session.subscribe(first_topic, first_since)
                yield session
            finally:
                # The session's task closes its connection (1000) and ends; bounded, and at
                # once if this block was cancelled.
                session._closing = True
                if session._reading is not None:
                    session._reading.cancel()
                with trio.move_on_after(timeout):
                    await session._ended.wait()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        failure = leaf(group)
    if failure is not None:
        # Raised outside the except block, as open_connection does: the caller sees what
        # its own code raised, or one ClientError, never our nursery's group.
        try:
            raise failure
        finally:
            failure = None
