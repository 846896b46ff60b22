"""One client connection on the relay server: handshake, reader, writer, closing handshake.

wsproto parses the HTTP upgrade; after it, :mod:`trio_relay._parser` parses client frames
and the relay writes pre-framed bytes itself. This module only moves bytes between the
stream, the parser and the broadcast.

Lifecycle of a :class:`RelayConnection`::

    handshake ── rejected (HTTP 4xx) ──────────────────────────────► stream closed
        │ accepted
        ▼
    subscribe ─► reader task (client → broadcast, pongs, close replies)
                 writer task (subscription → client, batched)
                 eviction watcher
        │ first of: client close · EOF · protocol error · too big · evicted · stalled ·
        │           cancelled
        ▼
    closing handshake (shielded, bounded by close_timeout) ────────► stream closed

The fast path: everything one read brings in is published as one batch of frames (so a
consumer gets many messages in one write), and a consumer that is idle gets that batch
written to its socket by the publisher at once (``write_through``), without waking its
writer task; only what the socket does not take is queued.
"""

from __future__ import annotations

import contextlib
import fnmatch
import http
import itertools
import logging
import math
import os
from collections.abc import Callable
from urllib.parse import parse_qs, unquote, urlsplit

import trio
import trio.lowlevel
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.utilities import RemoteProtocolError

from ._auth import OPEN, TokenError, verify_token
from ._broadcast import Subscription
from ._config import RelayConfig
from ._counters import RelayCounters
from ._envelope import (
    SUBPROTOCOL,
    EnvelopeError,
    PublishRequest,
    encode_ack,
    encode_error,
    encode_gap,
    encode_welcome,
    parse_client_frame,
)
from ._exceptions import SlowConsumerError
from ._frames import (
    PING_OPCODE,
    PONG_OPCODE,
    CloseCode,
    close_frame,
    control_frame,
    frame_header,
    split_request_head,
)
from ._parser import CLOSE, MESSAGE, PING, Close, FrameParser, ProtocolError
from ._topics import Batch, DeliveryReport, Topics, topic_from_path

__all__ = ["RelayConnection"]

logger = logging.getLogger("trio_relay")

MAX_REQUEST_HEAD = 16 * 1024
"""Bytes of HTTP request head accepted before answering 431."""
MAX_BATCH_BYTES = 256 * 1024
"""Most bytes of queued frames the writer joins into one write."""
WRITE_CHUNK = 256 * 1024
"""The writer's unit of progress: each chunk must be accepted within slow_consumer_timeout."""

_ids = itertools.count(1)
_ping_payloads = (f"keepalive {n}".encode() for n in itertools.count(1))


class _PeerGone(Exception):
    """The stream broke or was closed under us: nothing more can be written."""


class _Stalled(Exception):
    """The client accepted no chunk of a write within slow_consumer_timeout."""


def nowait_sender(stream: trio.abc.Stream) -> Callable[[bytes], int] | None:
    """A function that writes what it can of some bytes *now*, without blocking, or None.

    For a plain :class:`trio.SocketStream` this is ``os.write`` on its file descriptor:
    trio keeps its sockets non-blocking (``tests/test_connection.py`` checks this, since
    a blocking socket here would freeze the event loop), and trio's own ``send_all`` is
    never running on it at the same time, because every write of a connection holds its
    write slot. Python ignores SIGPIPE, so a vanished peer is an ``OSError``. Streams of
    :mod:`trio_relay.testing` offer ``send_nowait``. Anything else (TLS streams, say)
    gets ``None``: every write then goes through the writer task.
    """
    if type(stream) is trio.SocketStream:
        fd = stream.socket.fileno()

        def write_now(data: bytes) -> int:
            try:
                return os.write(fd, data)
            except BlockingIOError:
                return 0

        return write_now
    send_nowait = getattr(getattr(stream, "send_stream", None), "send_nowait", None)
    return send_nowait if callable(send_nowait) else None


def _since(values: list[str] | None) -> int | None:
    """The ``since`` query parameter: a sequence number >= 0, or absent."""
    if not values:
        return None
    if len(values) > 1 or not values[0].isdigit() or len(values[0]) > 19:
        raise ValueError("'since' must be one sequence number (a whole number >= 0)")
    return int(values[0])


def peer_name(stream: trio.abc.Stream) -> str:
    """``host:port`` of the remote end for socket streams, a short tag for anything else."""
    inner: object = stream
    while isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    if isinstance(inner, trio.SocketStream):
        try:
            address = inner.socket.getpeername()
        except OSError:
            return "unknown"
        if isinstance(address, tuple):
            host, port = address[0], address[1]
            return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        return str(address) or "unix"
    return "in-memory"


def http_response(status: int, body: str) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with a plain-text body."""
    payload = (body + "\n").encode("utf-8")
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + payload


class RelayConnection:
    """Serves one accepted stream until it closes; never raises except ``Cancelled``.

    Created by the server for every stream its listeners accept (or that a test hands to
    :meth:`RelayServer.serve_stream`).
    """

    # Slots: with thousands of connections, a __dict__ each is a kilobyte each.
    __slots__ = (
        "_admit",
        "_close_request",
        "_config",
        "_counters",
        "_cursor",
        "_early",
        "_envelope",
        "_grant",
        "_handoff",
        "_may_read",
        "_may_write",
        "_next_ping",
        "_on_subscribed",
        "_parser",
        "_peer_closed",
        "_peer_gone",
        "_ping_payload",
        "_ping_sent",
        "_protocol_error",
        "_read_fd",
        "_send_nowait",
        "_since",
        "_stream",
        "_subscription",
        "_tasks",
        "_topics",
        "_write_broken",
        "_write_slot",
        "_writing",
        "close_code",
        "host",
        "id",
        "peer",
        "topic",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        topics: Topics,
        config: RelayConfig,
        on_subscribed: Callable[[], None] = lambda: None,
        admit: Callable[[RelayConnection], str | None] = lambda _connection: None,
        counters: RelayCounters | None = None,
    ) -> None:
        self.id = next(_ids)
        self._on_subscribed = on_subscribed
        self._admit = admit
        self._counters = counters or RelayCounters()
        self.peer = peer_name(stream)
        self.host = self.peer.rpartition(":")[0].strip("[]") or self.peer
        self._stream = stream
        self._topics = topics
        self._config = config
        # Set by the handshake: the topic the path names, whether the client speaks the
        # envelope protocol, and the sequence number it resumes after (query "since").
        self.topic = ""
        self._envelope = False
        self._since: int | None = None
        # The highest sequence number of this topic already sent to this client: replays
        # and live batches meet here without duplicates.
        self._cursor = 0
        self._early = b""  # bytes that came with the handshake, for the reader
        self._grant = OPEN  # what the client's token allows (everything without auth)
        self._may_read = True
        self._may_write = True
        # Keepalive, driven by the server's ticker (see keepalive()): no timer per connection.
        self._subscription: Subscription[Batch | bytes] | None = None
        self._ping_payload: bytes | None = None  # of the keepalive ping awaiting its pong
        self._ping_sent = 0.0
        self._next_ping = math.inf
        self._parser = FrameParser(config.max_message_size)
        # The right to write to the stream. A Semaphore, not a Lock: write_through takes it
        # synchronously in the publisher's task and, after a partial write, hands it to the
        # writer task, which releases it once the rest of the frame is out.
        self._write_slot = trio.Semaphore(1)
        # Tasks holding or waiting for the slot: a plain int for the hot path to read. (Not the
        # semaphore's value: acquiring it yields *after* taking it, so a write-through
        # could slip in between.)
        self._writing = 0
        self._handoff = False
        self._send_nowait = nowait_sender(stream)
        self._read_fd = stream.socket.fileno() if type(stream) is trio.SocketStream else None
        self._tasks: trio.CancelScope | None = None  # the reader's and writer's scope
        # How the connection ended; exactly one of these paths decides the close.
        self._close_request: tuple[int, str] | None = None
        self._protocol_error = False
        self._peer_closed = False
        self._peer_gone = False
        # True while the stream may hold half a frame: a write in progress, or one that was
        # interrupted (then nothing more may be written, not even a close frame).
        self._write_broken = False
        self.close_code: int | None = None
        """The close code sent or received (1006 if the connection ended without one)."""

    def __repr__(self) -> str:
        return f"<RelayConnection #{self.id} {self.peer}>"

    # ---------------------------------------------------------------- lifecycle

    async def serve(self) -> None:
        """Run the connection to its end. Per-connection failures are logged and contained."""
        try:
            if not await self._handshake():
                return
            logger.info("connection #%d from %s open", self.id, self.peer)
            try:
                await self._run_open()
            except Exception:
                logger.exception("connection #%d from %s failed", self.id, self.peer)
                if self._close_request is None:
                    self._close_request = (CloseCode.INTERNAL_ERROR, "internal error")
            finally:
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + self._config.close_timeout
                    try:
                        await self._closing_handshake()
                    except Exception:
                        logger.exception("connection #%d: closing handshake failed", self.id)
                if self.close_code is None:
                    self.close_code = 1006
                logger.info(
                    "connection #%d from %s closed (code %d)", self.id, self.peer, self.close_code
                )
        except Exception:
            logger.exception("connection #%d from %s failed", self.id, self.peer)
        finally:
            await trio.aclose_forcefully(self._stream)

    async def _run_open(self) -> None:
        config = self._config
        async with (
            self._topics.open_subscription(
                self.topic,
                since=self._since,
                max_buffer=config.queue_size,
                max_bytes=config.max_queue_bytes,
                policy=config.overflow_policy,
                timeout=config.overflow_timeout,
                subscription_name=f"#{self.id} {self.peer}",
                write_through=self._write_through if self._send_nowait is not None else None,
                on_evict=self._evicted,
            ) as (subscription, gap, replay, cursor),
            trio.open_nursery() as nursery,
        ):
            self._tasks = nursery.cancel_scope
            self._cursor = cursor
            if gap is not None and not self._envelope:
                if gap.first > gap.since:
                    reason = f"messages {gap.since + 1} to {gap.first - 1} are no longer retained"
                else:
                    reason = f"since={gap.since} is beyond this topic's last sequence number"
                self._request_close(CloseCode.GAP, reason)
                return
            first: list[bytes] = []
            if self._envelope:
                body = encode_welcome(self.topic, cursor)
                first += (frame_header(len(body), text=True), body)
            if gap is not None:
                body = encode_gap(gap.topic, gap.since, gap.first)
                first += (frame_header(len(body), text=True), body)
            if replay is not None and self._may_read:
                first.append(replay.envelope() if self._envelope else replay.raw)
            if first:
                try:
                    await self._send(b"".join(first))
                except (_PeerGone, _Stalled):
                    self._peer_gone = True
                    return
            self._on_subscribed()  # after the welcome: a test that waits for it may cut us
            if self._config.ping_interval > 0:
                self._next_ping = trio.current_time() + self._config.ping_interval
            self._subscription = subscription
            nursery.start_soon(self._write_loop, subscription)
            await self._read_loop()
            nursery.cancel_scope.cancel()

    # ---------------------------------------------------------------- handshake

    async def _handshake(self) -> bool:
        buffer = bytearray()
        ws = WSConnection(ConnectionType.SERVER)
        with trio.move_on_after(self._config.handshake_timeout):
            while (parts := split_request_head(buffer)) is None:
                if len(buffer) > MAX_REQUEST_HEAD:
                    await self._reject(431, "request head too large")
                    return False
                try:
                    data = await self._stream.receive_some(self._config.receive_buffer_size)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    logger.info(
                        "connection #%d from %s closed during the handshake", self.id, self.peer
                    )
                    return False
                buffer += data
            head, rest = parts
            if len(head) > MAX_REQUEST_HEAD:
                await self._reject(431, "request head too large")
                return False
            try:
                ws.receive_data(head)
                events = list(ws.events())
            except RemoteProtocolError as exc:
                hint = exc.event_hint
                status = getattr(hint, "status_code", 400)
                await self._reject(status, f"bad WebSocket upgrade request: {exc}")
                return False
            request = events[0] if events else None
            if not isinstance(request, Request):
                await self._reject(400, "bad WebSocket upgrade request")
                return False
            target = urlsplit(request.target)
            try:
                self.topic = topic_from_path(unquote(target.path))
                self._since = _since(parse_qs(target.query).get("since"))
            except ValueError as exc:
                await self._reject(400, f"bad request {request.target!r}: {exc}")
                return False
            self._envelope = SUBPROTOCOL in request.subprotocols
            headers = {name.lower(): value for name, value in request.extra_headers}
            origin = headers.get(b"origin")
            patterns = self._config.allowed_origins
            if origin is not None and patterns:
                text = origin.decode("latin-1")
                if not any(fnmatch.fnmatchcase(text, pattern) for pattern in patterns):
                    await self._reject(403, f"origin {text!r} is not allowed")
                    return False
            if self._config.auth_secret is not None:
                authorization = headers.get(b"authorization", b"").decode("latin-1")
                scheme, _, bearer = authorization.partition(" ")
                token = bearer.strip() if scheme.lower() == "bearer" else ""
                token = token or (parse_qs(target.query).get("token") or [""])[0]
                try:
                    self._grant = verify_token(self._config.auth_secret, token)
                except TokenError as exc:
                    await self._reject(401, str(exc))
                    return False
                if not (
                    self._grant.may_subscribe(self.topic) or self._grant.may_publish(self.topic)
                ):
                    await self._reject(403, f"the token does not allow topic {self.topic!r}")
                    return False
            self._may_read = self._grant.may_subscribe(self.topic)
            self._may_write = self._grant.may_publish(self.topic)
            refusal = self._admit(self)
            if refusal is not None:
                await self._reject(503, refusal)
                return False
            try:
                subprotocol = SUBPROTOCOL if self._envelope else None
                await self._send(ws.send(AcceptConnection(subprotocol=subprotocol)))
            except (_PeerGone, _Stalled):
                return False
            if rest:
                # Bytes that came in the same read as the request head: frames sent right
                # after the handshake. They are parsed with the first read of the reader.
                self._early = rest
            return True
        logger.info("connection #%d from %s: handshake timed out", self.id, self.peer)
        self._counters.rejections["handshake-timeout"] += 1
        return False

    async def _reject(self, status: int, reason: str) -> None:
        logger.info(
            "connection #%d from %s rejected: HTTP %d %s", self.id, self.peer, status, reason
        )
        self._counters.rejections[f"http-{status}"] += 1
        with contextlib.suppress(_PeerGone, _Stalled):
            await self._send(http_response(status, reason))

    # ---------------------------------------------------------------- bytes out

    async def _send(self, data: bytes) -> None:
        """Write ``data`` whole, after any write in progress (pongs, close frames, HTTP)."""
        self._writing += 1
        try:
            async with self._write_slot:
                await self._write_all(data)
        finally:
            self._writing -= 1

    async def _write_all(self, data: bytes) -> None:
        """Write ``data``; the caller holds the write slot.

        Each chunk of :data:`WRITE_CHUNK` bytes must be accepted within
        ``slow_consumer_timeout`` seconds, or :class:`_Stalled` is raised. A write that
        fails, stalls or is cancelled midway leaves ``_write_broken`` set for good.
        """
        if self._write_broken and not self._handoff:
            raise _PeerGone("an earlier write was interrupted")
        self._write_broken = True
        timeout = self._config.slow_consumer_timeout
        try:
            if len(data) <= WRITE_CHUNK:
                with trio.move_on_after(timeout) as scope:
                    await self._stream.send_all(data)
                if scope.cancelled_caught:
                    raise _Stalled
            else:
                view = memoryview(data)
                for start in range(0, len(view), WRITE_CHUNK):
                    with trio.move_on_after(timeout) as scope:
                        await self._stream.send_all(view[start : start + WRITE_CHUNK])
                    if scope.cancelled_caught:
                        raise _Stalled
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _PeerGone(str(exc)) from exc
        self._counters.bytes_out += len(data)
        self._handoff = False
        self._write_broken = False

    def _render(self, item: Batch | bytes) -> bytes | None:
        """The bytes this client gets for a queued item, or None if it gets nothing."""
        if isinstance(item, bytes):
            return item  # the rest of a partial write-through, already rendered
        if not self._may_read:
            return None  # a publish-only token: the client gets acks, not messages
        if item.source is self and not item.echo:
            self._cursor = item.last_seq
            return None
        if item.first_seq <= self._cursor:
            fresh = item.after(self._cursor)  # already sent by the replay
            if fresh is None:
                return None
            item = fresh
        self._cursor = item.last_seq
        self._counters.messages_out += len(item.payloads)
        return item.envelope() if self._envelope else item.raw

    def _write_through(self, item: Batch | bytes) -> Batch | bytes | None:
        """The broadcast's synchronous delivery for an idle consumer: write what the socket
        takes now; return the rest (queued by the broadcast for the writer task) or None."""
        send_nowait = self._send_nowait
        assert send_nowait is not None
        data = self._render(item)
        if data is None:
            return None
        if self._writing or self._write_broken:
            return data  # a pong, ack or close frame is being written: queue behind it
        # No task can run until this function returns, so a write that completes needs no
        # slot; only a partial one must hold it, for the writer task to finish the frame.
        try:
            sent = send_nowait(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            sent = 0  # the writer task will meet the error through trio
        self._counters.bytes_out += sent
        if sent == len(data):
            return None
        if sent == 0:
            return data
        # Half a frame is out: the rest must follow before anything else. The writer task
        # inherits the write slot with the rest, which is the next thing it receives.
        self._write_slot.acquire_nowait()
        self._writing += 1
        self._handoff = True
        self._write_broken = True
        return data[sent:]

    async def _write_loop(self, subscription: Subscription[Batch | bytes]) -> None:
        try:
            while True:
                item = await subscription.receive()
                batch: list[bytes] = []
                size = 0
                try:
                    while True:
                        rendered = self._render(item)
                        if rendered is not None:
                            batch.append(rendered)
                            size += len(rendered)
                        if size >= MAX_BATCH_BYTES:
                            break
                        item = subscription.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    pass
                if not batch:
                    continue
                data = batch[0] if len(batch) == 1 else b"".join(batch)
                if self._handoff:
                    # We own the write slot already: the publisher wrote part of `first`.
                    try:
                        await self._write_all(data)
                    finally:
                        self._writing -= 1
                        self._write_slot.release()
                else:
                    await self._send(data)
        except SlowConsumerError:
            # Evicted. A write in progress finished first (each of its chunks is bounded by
            # slow_consumer_timeout), so the close frame can follow whole frames.
            self._request_close(CloseCode.SLOW_CONSUMER, "slow consumer")
        except trio.EndOfChannel:
            self._request_close(CloseCode.GOING_AWAY, "relay shutting down")
        except _Stalled:
            timeout = self._config.slow_consumer_timeout
            logger.warning(
                "connection #%d from %s: slow consumer, no write progress for %s s",
                self.id,
                self.peer,
                timeout,
            )
            self._request_close(CloseCode.SLOW_CONSUMER, "slow consumer")
        except _PeerGone:
            self._peer_gone = True
            self._cancel_tasks()

    def keepalive(self, now: float) -> None:
        """Called every second or so by the server: ping the client every ``ping_interval``
        seconds, and close it with 1011 if a ping is unanswered after ``ping_timeout``.

        The ping is queued like any message, so a client that stopped reading never sees
        it, never answers, and is closed: the case a ping written past a full buffer (as
        in other servers) would miss.
        """
        subscription = self._subscription
        if subscription is None or self._close_request is not None:
            return
        config = self._config
        if self._ping_payload is not None:
            if now - self._ping_sent >= config.ping_timeout:
                logger.info(
                    "connection #%d from %s: no pong within %s s",
                    self.id,
                    self.peer,
                    config.ping_timeout,
                )
                self._request_close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
            return
        if now >= self._next_ping:
            self._ping_payload = next(_ping_payloads)
            self._ping_sent = now
            ping = control_frame(PING_OPCODE, self._ping_payload)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                subscription._put(ping, len(ping))

    def _evicted(self) -> None:
        logger.warning(
            "connection #%d from %s evicted: slow consumer (over %d batches or %d bytes "
            "queued, no progress for %s s)",
            self.id,
            self.peer,
            self._config.queue_size,
            self._config.max_queue_bytes,
            self._config.overflow_timeout,
        )

    def _request_close(self, code: int, reason: str, *, protocol_error: bool = False) -> None:
        if self._close_request is None:
            self._close_request = (code, reason)
            self._protocol_error = protocol_error
        self._cancel_tasks()

    def _cancel_tasks(self) -> None:
        if self._tasks is not None:
            self._tasks.cancel()

    # ---------------------------------------------------------------- bytes in

    async def _receive(self) -> bytes | bytearray:
        """The next bytes from the client; ``b""`` at end of stream.

        On a plain socket this waits with :func:`trio.lowlevel.wait_readable`, then reads
        with ``os.read``: one trip through the scheduler per read, where trio's
        ``receive_some`` makes two (a speculative ``recv`` that usually finds nothing
        when clients send one message at a time, then a schedule point after the read).
        It is safe for the same reasons as write-through (trio's sockets are
        non-blocking; only this task reads), which ``tests/test_connection.py`` checks.
        """
        fd = self._read_fd
        if fd is None:
            return await self._stream.receive_some(self._config.receive_buffer_size)
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                return os.read(fd, self._config.receive_buffer_size)
            except BlockingIOError:
                continue  # woken without data after all: wait again
            except OSError:
                return b""  # reset by the peer: the same as end of stream here

    async def _read_loop(self) -> None:
        parser = self._parser
        config = self._config
        data: bytes | bytearray = self._early
        self._early = b""
        # Publish rate limit: a token bucket refilled at publish_rate messages per second.
        rate = config.publish_rate
        tokens = float(config.publish_burst)
        refilled = trio.current_time()
        while True:
            if data:
                error: ProtocolError | None = None
                self._counters.bytes_in += len(data)
                try:
                    events = parser.feed(data)
                except ProtocolError as exc:
                    events, error = exc.events, exc
                payloads: list[bytes] = []
                texts: list[bool] = []
                replies: list[bytes] = []
                close: Close | None = None
                for kind, payload, text in events:
                    if kind == MESSAGE:
                        payloads.append(payload)
                        texts.append(text)
                    elif kind == PING:
                        replies.append(control_frame(PONG_OPCODE, payload))
                    elif kind == CLOSE:
                        close = Close.parse(payload)
                    elif payload == self._ping_payload:  # the pong to our keepalive ping
                        self._ping_payload = None
                        self._next_ping = trio.current_time() + config.ping_interval
                if payloads and not self._may_write:
                    if not self._envelope:
                        self._request_close(
                            CloseCode.SLOW_CONSUMER,  # 1008: policy violation
                            f"the token does not allow publishing to topic {self.topic!r}",
                        )
                        return
                    body = encode_error(
                        "forbidden",
                        f"the token does not allow publishing to topic {self.topic!r}",
                    )
                    replies += [frame_header(len(body), text=True), body] * len(payloads)
                    payloads = []
                if payloads:
                    self._counters.messages_in += len(payloads)
                    if self._envelope:
                        replies += await self._publish_envelopes(payloads, texts)
                    else:
                        try:  # the hot path, without building a DeliveryReport
                            self._topics._publish_nowait(self.topic, payloads, texts, self, True)
                        except trio.WouldBlock:
                            await self._publish(payloads, texts, echo=True)
                try:
                    if replies:
                        await self._send(b"".join(replies))
                    if close is not None:
                        # The client starts the closing handshake: answer and finish.
                        self._peer_closed = True
                        self.close_code = close.code
                        await self._send(close_frame(close.code, close.reason))
                        return
                except (_PeerGone, _Stalled):
                    self._peer_gone = True
                    return
                if error is not None:
                    self._request_close(error.code, error.reason, protocol_error=True)
                    return
                if rate > 0 and payloads:
                    now = trio.current_time()
                    tokens = min(config.publish_burst, tokens + (now - refilled) * rate)
                    refilled = now
                    tokens -= len(payloads)
                    if tokens < 0:
                        # Over the rate: read nothing more from this client until the debt is
                        # paid. TCP backpressure slows the client down; nothing is lost.
                        await trio.sleep(-tokens / rate)
            try:
                data = await self._receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._peer_gone = True
                return

    async def _publish(
        self, payloads: list[bytes], texts: list[bool], *, echo: bool
    ) -> DeliveryReport:
        """Publish what one read brought in as one batch: synchronously when nobody has to
        be waited for, which is nearly always."""
        try:
            return self._topics.publish_nowait(self.topic, payloads, texts, source=self, echo=echo)
        except trio.WouldBlock:
            return await self._topics.publish_batch(
                self.topic, payloads, texts, source=self, echo=echo
            )

    async def _publish_envelopes(self, payloads: list[bytes], texts: list[bool]) -> list[bytes]:
        """Publish the ``publish`` frames of an envelope client; return its acks and errors.

        Consecutive frames with the same ``echo`` go out as one batch.
        """
        replies: list[bytes] = []
        requests: list[PublishRequest] = []

        async def flush() -> None:
            if not requests:
                return
            report = await self._publish(
                [r.payload for r in requests], [r.text for r in requests], echo=requests[0].echo
            )
            for offset, request in enumerate(requests):
                body = encode_ack(
                    self.topic,
                    report.seq + offset,
                    request.id,
                    report.queued,
                    report.dropped,
                    report.evicted,
                    report.remote,
                )
                replies.extend((frame_header(len(body), text=True), body))
            requests.clear()

        for payload, text in zip(payloads, texts, strict=True):
            try:
                request = parse_client_frame(payload, text=text, topic=self.topic)
            except EnvelopeError as exc:
                await flush()
                body = encode_error(exc.code, exc.detail, exc.request_id)
                replies.extend((frame_header(len(body), text=True), body))
                continue
            if requests and requests[0].echo != request.echo:
                await flush()
            requests.append(request)
        await flush()
        return replies

    # ---------------------------------------------------------------- closing

    async def _closing_handshake(self) -> None:
        """Send our close frame and wait for the client's answer; the caller bounds the time."""
        if self._peer_closed or self._peer_gone or self._write_broken:
            return
        code, reason = self._close_request or (CloseCode.GOING_AWAY, "relay shutting down")
        try:
            await self._send(close_frame(code, reason))
        except (_PeerGone, _Stalled):
            return
        self.close_code = code
        if self._protocol_error:
            return  # RFC 6455 7.1.7: fail the connection, do not wait for an answer
        while True:
            try:
                data = await self._stream.receive_some(self._config.receive_buffer_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            try:
                events = self._parser.feed(data)
            except ProtocolError:
                return
            if any(kind == CLOSE for kind, _, _ in events):
                return
