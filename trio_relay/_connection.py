"""One client connection on the relay server: handshake, reader, writer, closing handshake.

The protocol state lives in wsproto (sans-IO: handshake parsing, unmasking, UTF-8
validation, fragmentation, control frames, close codes); this module only moves bytes
between it, the trio stream, and the broadcast.

Lifecycle of a :class:`RelayConnection`::

    handshake ── rejected (HTTP 4xx) ──────────────────────────────► stream closed
        │ accepted
        ▼
    subscribe ─► reader task (client → broadcast, pongs, close replies)
                 writer task (subscription → client, batched)
                 eviction watcher
        │ first of: client close · EOF · protocol error · too big · evicted · cancelled
        ▼
    closing handshake (shielded, bounded by close_timeout) ────────► stream closed
"""

from __future__ import annotations

import contextlib
import http
import itertools
import logging

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from ._broadcast import MessageBus, Subscription
from ._config import RelayConfig
from ._exceptions import SlowConsumerError
from ._frames import CloseCode, frame_payload, split_request_head

__all__ = ["RelayConnection"]

logger = logging.getLogger("trio_relay")

MAX_REQUEST_HEAD = 16 * 1024
"""Bytes of HTTP request head accepted before answering 431."""
MAX_BATCH = 1024
"""Most queued frames joined into one ``send_all``."""

_ids = itertools.count(1)


class _PeerGone(Exception):
    """The stream broke or was closed under us: nothing more can be written."""


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
    return type(stream).__name__


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

    def __init__(
        self,
        stream: trio.abc.Stream,
        broadcast: MessageBus[bytes],
        config: RelayConfig,
    ) -> None:
        self.id = next(_ids)
        self.peer = peer_name(stream)
        self._stream = stream
        self._broadcast = broadcast
        self._config = config
        self._ws = WSConnection(ConnectionType.SERVER)
        self._send_lock = trio.StrictFIFOLock()
        self._tasks = trio.CancelScope()
        self._writer_done = trio.Event()
        # How the connection ended; exactly one of these paths decides the close.
        self._close_request: tuple[int, str] | None = None
        self._protocol_error = False
        self._peer_closed = False
        self._peer_gone = False
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
            self._broadcast.subscribe(
                max_buffer=config.queue_size,
                policy=config.overflow_policy,
                timeout=config.slow_consumer_timeout,
                name=f"#{self.id} {self.peer}",
            ) as subscription,
            trio.open_nursery() as nursery,
        ):
            self._tasks = nursery.cancel_scope
            nursery.start_soon(self._write_loop, subscription)
            nursery.start_soon(self._watch_eviction, subscription)
            await self._read_loop()
            nursery.cancel_scope.cancel()

    # ---------------------------------------------------------------- handshake

    async def _handshake(self) -> bool:
        buffer = bytearray()
        with trio.move_on_after(self._config.handshake_timeout):
            while (parts := split_request_head(buffer)) is None:
                if len(buffer) > MAX_REQUEST_HEAD:
                    await self._reject(431, "request head too large")
                    return False
                data = await self._stream.receive_some(self._config.receive_buffer_size)
                if not data:
                    logger.info("connection from %s closed during the handshake", self.peer)
                    return False
                buffer += data
            head, rest = parts
            if len(head) > MAX_REQUEST_HEAD:
                await self._reject(431, "request head too large")
                return False
            try:
                self._ws.receive_data(head)
                events = list(self._ws.events())
            except RemoteProtocolError as exc:
                hint = exc.event_hint
                status = getattr(hint, "status_code", 400)
                await self._reject(status, f"bad WebSocket upgrade request: {exc}")
                return False
            request = events[0] if events else None
            if not isinstance(request, Request):
                await self._reject(400, "bad WebSocket upgrade request")
                return False
            path = request.target.split("?", 1)[0]
            if path != "/":
                await self._reject(404, f"no such path {path!r}: this relay serves '/'")
                return False
            try:
                await self._send(self._ws.send(AcceptConnection()))
            except _PeerGone:
                return False
            if rest:
                # Bytes that came in the same read as the request head: frames sent right
                # after the handshake. Feed them now, not when more data arrives.
                self._ws.receive_data(rest)
            return True
        logger.info("connection from %s: handshake timed out", self.peer)
        return False

    async def _reject(self, status: int, reason: str) -> None:
        logger.info("connection from %s rejected: HTTP %d %s", self.peer, status, reason)
        with contextlib.suppress(_PeerGone):
            await self._send(http_response(status, reason))

    # ---------------------------------------------------------------- bytes out

    async def _send(self, data: bytes) -> None:
        """Write ``data`` whole, serialized with every other write of this connection.

        A write that fails or is cancelled midway may leave half a frame on the wire: the
        connection is then marked broken and never written to again.
        """
        async with self._send_lock:
            if self._write_broken:
                raise _PeerGone("an earlier write was interrupted")
            self._write_broken = True
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _PeerGone(str(exc)) from exc
            self._write_broken = False

    async def _write_loop(self, subscription: Subscription[bytes]) -> None:
        try:
            while True:
                frame = await subscription.receive()
                batch = [frame]
                try:
                    while len(batch) < MAX_BATCH:
                        batch.append(subscription.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    pass
                await self._send(frame if len(batch) == 1 else b"".join(batch))
        except SlowConsumerError:
            pass  # _watch_eviction decides what happens next
        except trio.EndOfChannel:
            self._request_close(CloseCode.GOING_AWAY, "relay shutting down")
        except _PeerGone:
            self._peer_gone = True
            self._tasks.cancel()
        finally:
            self._writer_done.set()

    async def _watch_eviction(self, subscription: Subscription[bytes]) -> None:
        await subscription.wait_evicted()
        logger.warning(
            "connection #%d from %s evicted: slow consumer (queue full for %s s)",
            self.id,
            self.peer,
            self._config.slow_consumer_timeout,
        )
        self._close_request = (CloseCode.SLOW_CONSUMER, "slow consumer")
        # Let a write in progress finish, so the close frame can follow a whole frame.
        with trio.move_on_after(self._config.close_timeout):
            await self._writer_done.wait()
        self._tasks.cancel()

    def _request_close(self, code: int, reason: str, *, protocol_error: bool = False) -> None:
        if self._close_request is None:
            self._close_request = (code, reason)
            self._protocol_error = protocol_error
        self._tasks.cancel()

    # ---------------------------------------------------------------- bytes in

    async def _read_loop(self) -> None:
        ws = self._ws
        limit = self._config.max_message_size
        parts: list[bytes] = []
        size = 0
        while True:
            for event in ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    chunk = (
                        event.data.encode("utf-8")
                        if isinstance(event, TextMessage)
                        else bytes(event.data)
                    )
                    size += len(chunk)
                    if size > limit:
                        self._request_close(
                            CloseCode.MESSAGE_TOO_BIG, f"message exceeds {limit} bytes"
                        )
                        return
                    parts.append(chunk)
                    if event.message_finished:
                        payload = parts[0] if len(parts) == 1 else b"".join(parts)
                        parts = []
                        size = 0
                        frame = frame_payload(payload, text=isinstance(event, TextMessage))
                        await self._broadcast.publish(frame)
                elif isinstance(event, Ping):
                    try:
                        await self._send(ws.send(event.response()))
                    except _PeerGone:
                        self._peer_gone = True
                        return
                elif isinstance(event, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        # The client starts the closing handshake: answer and finish.
                        self._peer_closed = True
                        self.close_code = event.code
                        try:
                            await self._send(ws.send(event.response()))
                        except _PeerGone:
                            self._peer_gone = True
                        return
                    # wsproto reports a protocol violation as the close it wants us to send.
                    self._request_close(event.code, event.reason or "", protocol_error=True)
                    return
                # Pong: nothing to do.
            try:
                data = await self._stream.receive_some(self._config.receive_buffer_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._peer_gone = True
                return
            ws.receive_data(bytes(data))

    # ---------------------------------------------------------------- closing

    async def _closing_handshake(self) -> None:
        """Send our close frame and wait for the client's answer; the caller bounds the time."""
        if self._peer_closed or self._peer_gone or self._write_broken:
            return
        code, reason = self._close_request or (CloseCode.GOING_AWAY, "relay shutting down")
        try:
            await self._send(self._ws.send(CloseConnection(code=code, reason=reason)))
        except _PeerGone:
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
            self._ws.receive_data(bytes(data))
            for event in self._ws.events():
                if isinstance(event, CloseConnection):
                    return
