"""One client connection on the relay server: the trio shell around :mod:`._protocol`.

:class:`~trio_relay._protocol.RelayProtocol` decides everything (the handshake, what
frames mean, envelopes, the publish rate, keepalive, the close handshake) from bytes and
time; this module does the reads, writes and waits, and talks to the topics.

Lifecycle of a :class:`RelayConnection`, one task (the one the server started for it)::

    handshake ── rejected (HTTP 4xx/503) ────────────────────────────► stream closed
        │ accepted (admitted by the server's limits)
        ▼
    subscribe ─► read loop (client → topics; pongs, acks, close replies)
        │        writer task, only while the client has a backlog that write-through
        │        could not place (started by the subscription, gone once it is written)
        │ first of: client close · EOF · protocol error · evicted · stalled · keepalive ·
        │           cancelled
        ▼
    closing handshake (shielded, bounded by close_timeout) ──────────► stream closed

The fast path: everything one read brings in is published as one batch of frames (so a
consumer gets many messages in one write), and a consumer that is idle gets that batch
written to its socket by the publisher at once (``write_through``), without any task of
its own waking up; only what the socket does not take is queued, and only then does a
writer task exist.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import math
import os
import types
from collections.abc import Awaitable, Callable

import trio
import trio.lowlevel

from ._auth import Expiries
from ._broadcast import Subscription
from ._budget import ByteBudget
from ._config import RelayConfig
from ._counters import RelayCounters
from ._exceptions import SlowConsumerError, TooManyTopicsError
from ._frames import CloseCode
from ._hooks import (
    Authorize,
    AuthRequest,
    HookFailed,
    OnPublish,
    Refusal,
    ask_authorize,
    filter_publications,
)
from ._limits import ConnectionLimits
from ._listen import nowait_sender, peer_name
from ._protocol import LiveGap, Publish, Reject, RelayProtocol, Subscribe, Unsubscribe, Upgrade
from ._redact import MAX_SHOWN, shown
from ._topics import Batch, Cursor, Gap, Topics
from ._v2 import TopicChannel

__all__ = ["RelayConnection"]

logger = logging.getLogger("trio_relay")

MAX_BATCH_BYTES = 256 * 1024
"""Most bytes of queued frames the writer joins into one write."""
WRITE_CHUNK = 256 * 1024
"""The writer's unit of progress: each chunk must be accepted within slow_consumer_timeout."""

_ids = itertools.count(1)

_SLOW_SUBSCRIPTION = "this subscription's queue stayed full: subscribe again with since"


def _only_cancelled(exc: BaseException) -> bool:
    """``exc`` is trio.Cancelled, or a group of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


class _PeerGone(Exception):
    """The stream broke or was closed under us: nothing more can be written."""


class _Stalled(Exception):
    """The client accepted no chunk of a write within slow_consumer_timeout."""


class _Channel:
    """One subscription of a ``trio-relay.v2`` connection: the protocol's view of it (topic,
    cursor), and the topic's subscription with its own bounded queue."""

    __slots__ = ("channel", "subscription")

    def __init__(self, channel: TopicChannel) -> None:
        self.channel = channel
        self.subscription: Subscription[Batch | bytes] | None = None


_NO_RING: collections.deque[_Channel] = collections.deque(maxlen=0)
"""The ring of a raw or v1 connection: never used (a v2 connection gets its own)."""
_NO_FRAMES: list[bytes] = []
"""The control frames of a raw or v1 connection: never added to (v2 only)."""


class Turnstile:
    """Lets the tasks that wait in it through at most ``per_trip`` at a time, one such
    group per trip through the scheduler, in the order they came; for the connections
    whose clients went away all at once (see ``RelayConnection._wait_turn``).

    A task of its own lets them through, started in the nursery given by the first
    waiter, and gone as soon as nobody waits."""

    __slots__ = ("_lot", "_per_trip", "_running")

    def __init__(self, per_trip: int) -> None:
        self._lot = trio.lowlevel.ParkingLot()
        self._per_trip = per_trip
        self._running = False

    async def wait(self, nursery: trio.Nursery) -> None:
        """Wait for a turn (a checkpoint, even when nobody else waits)."""
        if not self._running:
            self._running = True
            nursery.start_soon(self._let_through)
        await self._lot.park()

    async def _let_through(self) -> None:
        try:
            await trio.lowlevel.cancel_shielded_checkpoint()  # let them all arrive
            while self._lot:
                self._lot.unpark(count=self._per_trip)
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._running = False


class _Task:
    """A connection's writer task, run in a nursery that all connections share (the
    server's): its cancel scope, and an event set once it has ended.

    Structured concurrency holds as if the task ran in a nursery of the connection's own
    (which cost about 0.5 KB per connection, writer or not): the connection cancels it and
    waits for its end before its own task goes on to close the stream
    (:meth:`RelayConnection._stop_writer`), so no writer outlives its connection's
    :meth:`~RelayConnection.serve`; a failure in it is logged and ends that connection
    alone, never the shared nursery; and it exists only while a client has a backlog."""

    __slots__ = ("done", "scope")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.done = trio.Event()


class _Open:
    """The open connection's tasks around its body (the read loop), as an ``async with``:
    the reader's cancel scope, and writers allowed to start (``_nursery``). On the way out
    no new writer starts and one still running is cancelled and waited for (on a
    resumable stream it keeps what it had not written for the drain), and the token's
    expiry is no longer watched.

    Cancelled from outside (the relay shuts down), not by a close of our own: what is
    queued for the client is written out before the 1001 close
    (:meth:`RelayConnection._drain`).

    A class rather than an ``@asynccontextmanager``: that one's generator, with its frame
    and trio's record of it, stayed alive for as long as the connection (0.6 KB each)."""

    __slots__ = ("connection", "scope")

    def __init__(self, connection: RelayConnection) -> None:
        self.connection = connection
        self.scope = trio.CancelScope()

    async def __aenter__(self) -> None:
        connection = self.connection
        self.scope.__enter__()
        connection._reader, connection._nursery = self.scope, connection._writers

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> bool:
        connection = self.connection
        try:
            try:
                await connection._stop_writer()
            finally:
                suppressed = self.scope.__exit__(kind, exc, traceback)
            if suppressed or exc is None:
                return suppressed
            if (
                _only_cancelled(exc)
                and connection._close_request is None
                and not (connection._peer_gone or connection._peer_closed)
            ):
                await connection._drain()
            return False
        finally:
            if connection._expiries is not None:
                connection._expiries.discard(connection)


class RelayConnection:
    """Serves one accepted stream until it closes; never raises except ``Cancelled``.

    Created by the server for every stream its listeners accept (or that a test hands to
    :meth:`RelayServer.serve_stream`).
    """

    # Slots: with thousands of connections, a __dict__ each is a kilobyte each.
    __slots__ = (
        "_admit",
        "_authorize",
        "_channel_writer",
        "_channels",
        "_close_request",
        "_config",
        "_control",
        "_counters",
        "_expiries",
        "_handoff",
        "_held_topic",
        "_limits",
        "_nursery",
        "_on_publish",
        "_on_subscribed",
        "_peer_closed",
        "_peer_gone",
        "_protocol_error",
        "_read_fd",
        "_reader",
        "_remainder",
        "_ring",
        "_send_nowait",
        "_shutdown_deadline",
        "_stream",
        "_subscription",
        "_topics",
        "_turns",
        "_unsent",
        "_write_broken",
        "_write_slot",
        "_writer",
        "_writers",
        "_writing",
        "close_code",
        "host",
        "id",
        "peer",
        "protocol",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        topics: Topics,
        config: RelayConfig,
        on_subscribed: Callable[[], None] = lambda: None,
        admit: Callable[[RelayConnection], str | None] = lambda _connection: None,
        counters: RelayCounters | None = None,
        unfinished: ByteBudget | None = None,
        expiries: Expiries[RelayConnection] | None = None,
        limits: ConnectionLimits | None = None,
        *,
        writers: trio.Nursery,
        turns: Turnstile | None = None,
        authorize: Authorize | None = None,
        on_publish: OnPublish | None = None,
    ) -> None:
        self.id = next(_ids)
        # Where the writer task runs: a nursery shared by the server's connections (see
        # _Task); the connection's own cancel scope is around its reader alone.
        self._writers = writers
        # Turns to end, shared by the server's connections: see _wait_turn.
        self._turns = turns
        # The embedding application's hooks (see serve_relay), if any.
        self._authorize = authorize
        self._on_publish = on_publish
        # Where the open connection waits for its token to expire (the server's timer
        # calls expire()); None: the connection is not watched for expiry.
        self._expiries = expiries
        self._on_subscribed = on_subscribed
        self._admit = admit
        self._counters = counters or RelayCounters()
        self.protocol = RelayProtocol(
            config, self._counters, unfinished, hooked=authorize is not None
        )
        """The connection's sans-IO protocol state (topic, envelope, rules)."""
        self.peer = peer_name(stream)
        self.host = self.peer.rpartition(":")[0].strip("[]") or self.peer
        self._stream = stream
        self._topics = topics
        self._config = config
        self._subscription: Subscription[Batch | bytes] | None = None
        # Where a writer task may start: the shared nursery while the client is
        # subscribed, None before and once closing. The reader's cancel scope (set while
        # the client is subscribed) and the writer task while one runs.
        self._nursery: trio.Nursery | None = None
        self._reader: trio.CancelScope | None = None
        self._writer: _Task | None = None
        # The right to write to the stream. A Semaphore, not a Lock: write_through takes it
        # synchronously in the publisher's task and, after a partial write, hands it to the
        # writer task, which releases it once the rest of the frame is out.
        self._write_slot: trio.Semaphore | None = None  # made when first needed
        # Tasks holding or waiting for the slot: a plain int for the hot path to read. (Not the
        # semaphore's value: acquiring it yields *after* taking it, so a write-through
        # could slip in between.)
        self._writing = 0
        self._handoff = False
        self._send_nowait = nowait_sender(stream)
        self._read_fd = stream.socket.fileno() if type(stream) is trio.SocketStream else None
        # How the connection ended; exactly one of these paths decides the close.
        self._close_request: tuple[int, str] | None = None
        self._protocol_error = False
        self._peer_closed = False
        self._peer_gone = False
        # True while the stream may hold half a frame: a write in progress, or one that was
        # interrupted (then nothing more may be written, not even a close frame).
        self._write_broken = False
        # Resumable writes (streams with a non-blocking send): the rest of a frame whose
        # write was interrupted, which must go out before anything else, and whole frames the
        # writer took from the queue but had not begun. Both are written on shutdown.
        self._remainder: memoryview | None = None
        self._unsent: list[bytes] = []
        # Set when the relay shuts down: the drain and the closing handshake end by then.
        self._shutdown_deadline: float | None = None
        self.close_code: int | None = None
        """The close code sent or received (1006 if the connection ended without one)."""
        # The topic held for this client from its handshake until it is subscribed (see
        # Topics.hold): the topic cap is checked once, and stays true.
        self._held_topic: str | None = None
        # trio-relay.v2 (many topics): its subscriptions by topic (None for raw and v1
        # clients), those with a backlog in the order the writer serves them, frames of the
        # connection's own (pings, notices) to go out first, whether the writer runs, and
        # the server's limits, taken subscription by subscription.
        self._channels: dict[str, _Channel] | None = None
        self._ring: collections.deque[_Channel] = _NO_RING
        self._control: list[bytes] = _NO_FRAMES  # a list of its own for v2 (_run_channels)
        self._channel_writer = False
        self._limits = limits

    def __repr__(self) -> str:
        return f"<RelayConnection #{self.id} {self.peer}>"

    @property
    def topic(self) -> str:
        """The topic the client's path names (``""`` until the handshake is done)."""
        return self.protocol.topic

    # ---------------------------------------------------------------- lifecycle

    async def serve(self) -> None:
        """Run the connection to its end. Per-connection failures are logged and contained."""
        try:
            if not await self._handshake():
                return
            # DEBUG, not INFO: at thousands of connections a second, two lines each cost
            # more CPU than the connection itself (README "Running in production").
            logger.debug("connection #%d from %s open", self.id, self.peer)
            try:
                if self.protocol.v2:
                    await self._run_channels()
                else:
                    await self._run_open()
            except Exception:
                logger.exception("connection #%d from %s failed", self.id, self.peer)
                if self._close_request is None:
                    self._close_request = (CloseCode.INTERNAL_ERROR, "internal error")
            finally:
                if not (self._peer_closed or self._peer_gone or self._write_broken):
                    with trio.CancelScope(shield=True) as scope:
                        scope.deadline = self._shutdown_deadline or (
                            trio.current_time() + self._config.close_timeout
                        )
                        try:
                            await self._closing_handshake()
                        except Exception:
                            logger.exception("connection #%d: closing handshake failed", self.id)
                if self.close_code is None:
                    self.close_code = 1006
                logger.debug(
                    "connection #%d from %s closed (code %d)", self.id, self.peer, self.close_code
                )
        except Exception:
            logger.exception("connection #%d from %s failed", self.id, self.peer)
        finally:
            self._release_topic()
            self.protocol.release()  # its share of the unfinished-message budget
            stream = self._stream
            if type(stream) is trio.SocketStream:
                # What its aclose() does, without the checkpoint after (cancelled, in
                # aclose_forcefully): a trip through the scheduler and an exception per
                # connection, a third of the CPU of a mass disconnect.
                stream.socket.close()
            else:
                await trio.aclose_forcefully(stream)

    async def _run_open(self) -> None:
        config = self._config
        protocol = self.protocol
        topic = protocol.topic
        subscription, gap, replay, cursor = await self._topics.join(
            topic,
            since=protocol.since,
            epoch=protocol.epoch,
            max_buffer=config.queue_size,
            max_bytes=config.max_queue_bytes,
            policy=config.overflow_policy,
            timeout=config.overflow_timeout,
            subscription_name=f"#{self.id} {self.peer}",
            write_through=self._write_through if self._send_nowait is not None else None,
            on_evict=self._evicted,
            on_backlog=self._start_writer,
        )
        self._release_topic()  # the subscription keeps the topic now
        self._subscription = subscription  # before any backlog can need it
        try:
            async with _Open(self):
                first = self._opening(gap, replay, cursor)
                if first is None or (first and not await self._send_first(first)):
                    return
                self._on_subscribed()  # after the welcome: a test waiting may cut us
                await self._read_loop()
        finally:
            self._subscription = None
            self._topics.leave(topic, subscription)

    def _opening(self, gap: Gap | None, replay: Batch | None, cursor: Cursor) -> bytes | None:
        """The protocol's opening frames (v1's welcome, gap and replay; nothing in raw and
        v2), with the token's expiry now watched; None if the token expired during the
        handshake (the connection closes 4401 at once)."""
        first, close = self.protocol.opening(gap, replay, cursor, trio.current_time())
        if close is not None:
            self._request_close(*close)
            return None
        if self._expiries is not None:
            self._expiries.schedule(self, self.protocol.expires)
        return first

    async def _send_first(self, data: bytes) -> bool:
        """Write the connection's first frames; False if the client is gone or stalled."""
        try:
            await self._send(data)
        except (_PeerGone, _Stalled):
            self._peer_gone = True
            return False
        return True

    # ---------------------------------------------------------------- handshake

    async def _handshake(self) -> bool:
        protocol = self.protocol
        with trio.move_on_after(self._config.handshake_timeout) as handshake:
            while True:
                try:
                    data = await self._stream.receive_some(self._config.receive_buffer_size)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    logger.debug(
                        "connection #%d from %s closed during the handshake", self.id, self.peer
                    )
                    return False
                outcome = protocol.receive_request(data)
                if outcome is None:
                    continue
                if self._authorize is not None and not isinstance(outcome, Reject):
                    outcome = await self._authorized(self._authorize, outcome, handshake)
                if isinstance(outcome, Reject):
                    await self._reject(outcome)
                    return False
                refusal = self._admit(self) or self._hold_topic()
                if refusal is not None:
                    await self._reject(protocol.reject(503, refusal))
                    return False
                try:
                    await self._write_handshake(protocol.accept())
                except (_PeerGone, _Stalled):
                    return False
                return True
        logger.info("connection #%d from %s: handshake timed out", self.id, self.peer)
        self._counters.rejections["handshake-timeout"] += 1
        return False

    async def _authorized(
        self, authorize: Authorize, upgrade: Upgrade, handshake: trio.CancelScope
    ) -> Upgrade | Reject:
        """Ask the ``authorize`` hook about ``upgrade``, within what is left of the
        handshake's time: its grant applied, or the reject to answer (its refusal; 500 if
        it failed; 503 if it did not answer in time, with ``close_timeout`` more seconds to
        write that)."""
        protocol = self.protocol
        # A v2 connection to "/" names no topic: it subscribes by frame.
        topic = None if protocol.v2 and protocol.path_topic is None else upgrade.topic
        request = AuthRequest(
            "websocket", upgrade.path, upgrade.query, upgrade.headers, self.peer, topic
        )
        # This scope times the hook instead of the handshake's, so that a hook that runs
        # out of time is told apart (the innermost of two expired scopes would not catch).
        deadline, handshake.deadline = handshake.deadline, math.inf
        try:
            with trio.move_on_at(deadline) as scope:
                answer = await ask_authorize(authorize, request)
        except HookFailed:
            return protocol.reject(500, "the relay could not authorize this request")
        finally:
            handshake.deadline = deadline
        if scope.cancelled_caught:
            logger.warning(
                "connection #%d from %s: the authorize hook did not answer within %s s",
                self.id,
                self.peer,
                self._config.handshake_timeout,
            )
            handshake.deadline = trio.current_time() + self._config.close_timeout
            return protocol.reject(503, "authorization timed out; try again later")
        if isinstance(answer, Refusal):
            return protocol.reject(answer.status, answer.text)
        return protocol.authorize(answer) or upgrade

    def _hold_topic(self) -> str | None:
        """Hold the client's topic until it is subscribed, or say why it cannot be made.
        (A v2 client's topics are checked subscription by subscription instead.)"""
        if self.protocol.v2:
            return None
        try:
            self._topics.hold(self.protocol.topic)
        except TooManyTopicsError as exc:
            return str(exc)
        self._held_topic = self.protocol.topic
        return None

    def _release_topic(self) -> None:
        if self._held_topic is not None:
            self._topics.release(self._held_topic)
            self._held_topic = None

    async def _reject(self, reject: Reject) -> None:
        logger.info(
            "connection #%d from %s rejected: HTTP %d %s",
            self.id,
            self.peer,
            reject.status,
            shown(reject.reason, 2 * MAX_SHOWN),
        )
        with contextlib.suppress(_PeerGone, _Stalled):
            await self._write_handshake(reject.data)

    # ---------------------------------------------------------------- bytes out

    async def _write_handshake(self, data: bytes) -> None:
        """Write the handshake's answer (101 or a refusal). Nothing else can be writing
        yet (nothing is subscribed), so this takes no write slot; and a socket that
        takes it all at once, as a fresh one does, costs no trip through the scheduler
        (the handshake's read was the checkpoint)."""
        send_nowait = self._send_nowait
        if send_nowait is not None and self._remainder is None:
            try:
                sent = send_nowait(data)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _PeerGone(str(exc)) from exc
            self._counters.bytes_out += sent
            if sent == len(data):
                return
            data = data[sent:]
        await self._write_all(data)

    def _slot(self) -> trio.Semaphore:
        """The right to write to the stream (see ``_write_slot``), made on first use: an
        idle raw client may never need it (0.3 KB at 20,000 connections)."""
        slot = self._write_slot
        if slot is None:
            slot = self._write_slot = trio.Semaphore(1)
        return slot

    async def _send(self, data: bytes, *, keep: bool = False) -> None:
        """Write ``data`` whole, after any write in progress (pongs, close frames, HTTP).

        ``keep``: the bytes are messages taken from the client's queue; if cancelled before
        the write begins, they are kept for the shutdown drain instead of lost.
        """
        self._writing += 1
        slot = self._slot()
        try:
            try:
                await slot.acquire()
            except trio.Cancelled:
                if keep:
                    self._unsent.append(data)
                raise
            try:
                await self._write_all(data)
            finally:
                slot.release()
        finally:
            self._writing -= 1

    async def _write_all(self, data: bytes) -> None:
        """Write ``data``; the caller holds the write slot.

        Each chunk of :data:`WRITE_CHUNK` bytes must be accepted within
        ``slow_consumer_timeout`` seconds, or :class:`_Stalled` is raised. On streams with a
        non-blocking send (plain sockets, the testing kit's streams) the write is resumable:
        interrupted midway (cancelled, stalled), the rest of the frame is kept in
        ``_remainder`` and goes out first with the next write. On other streams (TLS) an
        interrupted write leaves ``_write_broken`` set for good.
        """
        if self._write_broken and not self._handoff:
            raise _PeerGone("an earlier write was interrupted")
        send_nowait = self._send_nowait
        if send_nowait is None:
            await self._write_all_blocking(data)
        else:
            if self._remainder is not None:
                data = bytes(self._remainder) + data
                self._remainder = None
            try:
                await self._write_resumable(send_nowait, data)
            except BaseException as exc:
                # Cancelled: the stream holds whole frames plus _remainder, which can still
                # be finished. Stalled or gone: the client takes nothing; nothing may follow.
                self._handoff = False
                self._write_broken = not isinstance(exc, trio.Cancelled)
                raise
        self._handoff = False
        self._write_broken = False

    async def _write_resumable(self, send_nowait: Callable[[bytes], int], data: bytes) -> None:
        view = memoryview(data)
        stream = self._stream
        timeout = self._config.slow_consumer_timeout
        position, size = 0, len(view)
        progress_at = WRITE_CHUNK  # the next chunk boundary: it renews the deadline
        deadline = trio.current_time() + timeout
        waited = False
        try:
            # As trio's socket send: a cancelled write raises before it begins (the data
            # then waits in _remainder), and one that completed never raises Cancelled.
            await trio.lowlevel.checkpoint_if_cancelled()
            while position < size:
                try:
                    sent = send_nowait(view[position:])  # type: ignore[arg-type]
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise _PeerGone(str(exc)) from exc
                if sent:
                    position += sent
                    self._counters.bytes_out += sent
                    if position >= progress_at:
                        progress_at = position + WRITE_CHUNK
                        deadline = trio.current_time() + timeout
                    continue
                waited = True
                with trio.move_on_at(deadline) as scope:
                    try:
                        await stream.wait_send_all_might_not_block()
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        raise _PeerGone(str(exc)) from exc
                if scope.cancelled_caught:
                    raise _Stalled
        finally:
            if position < size:
                self._remainder = view[position:]
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _write_all_blocking(self, data: bytes) -> None:
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

    async def _drain(self) -> None:
        """The relay is shutting down: write out everything queued for the client (the
        rest of an interrupted frame, then the frames :meth:`_queued` or
        :meth:`_queued_channels` collects, again until it collects none or says None:
        nothing more may go out), within ``close_timeout``.
        The 1001 close follows in the closing handshake, by the same deadline. A client
        that cannot take it all in time loses the rest: the stream is then aborted."""
        deadline = trio.current_time() + self._config.close_timeout
        self._shutdown_deadline = deadline
        if self._send_nowait is None:
            return  # not resumable (TLS): an interrupted frame cannot be finished
        queued = self._queued_channels if self._channels is not None else self._queued
        with trio.CancelScope(shield=True, deadline=deadline):
            try:
                while True:
                    frames = queued()
                    if frames is None or (not frames and self._remainder is None):
                        return
                    await self._send(b"".join(frames))
            except (_PeerGone, _Stalled):
                self._peer_gone = True

    def _queued(self) -> list[bytes] | None:
        """For :meth:`_drain`: the frames left unsent, then the subscription's queue as the
        client gets it; None once the subscription was evicted (it gets no more)."""
        subscription = self._subscription
        if subscription is None:
            return None
        frames, self._unsent = self._unsent, []
        render = self.protocol.render
        try:
            while True:
                rendered = render(subscription.receive_nowait())
                if rendered is not None:
                    frames.append(rendered)
        except (
            trio.WouldBlock,
            trio.EndOfChannel,
            trio.ClosedResourceError,
            LiveGap,  # nothing more renders: the 1001 close follows
        ):
            pass
        except SlowConsumerError:
            return None
        return frames

    def _write_through(self, item: Batch | bytes) -> Batch | bytes | None:
        """The broadcast's synchronous delivery to an idle consumer: write what the socket
        takes now; return the rest (queued by the broadcast for a writer task) or None."""
        send_nowait = self._send_nowait
        assert send_nowait is not None
        try:
            data = self.protocol.render(item)
        except LiveGap as exc:
            self._request_close(CloseCode.GAP, exc.reason)
            return None
        if data is None:
            return None
        if self._writing or self._write_broken or self._remainder is not None:
            return data  # a pong, ack or close frame is being written: queue behind it
        if self._nursery is None:
            return data  # closing: the drain (on shutdown) or nobody writes it
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
        self._slot().acquire_nowait()
        self._writing += 1
        self._handoff = True
        self._write_broken = True
        return data[sent:]

    def _start_writer(self) -> None:
        """The subscription has a backlog: start a writer task to drain it."""
        self._spawn(self._write_backlog)

    def _spawn(self, write: Callable[[], Awaitable[None]]) -> bool:
        """Start ``write`` as the connection's writer task (see :class:`_Task`), unless
        the connection is not open or a writer runs already (it writes until nothing is
        queued, so it takes the new backlog too). Whether it started."""
        if self._nursery is None or self._writer is not None:
            return False
        task = self._writer = _Task()
        self._nursery.start_soon(self._run_writer, task, write)
        return True

    async def _run_writer(self, task: _Task, write: Callable[[], Awaitable[None]]) -> None:
        try:
            with task.scope:
                await write()
        except Exception:
            # As a failure of the connection's own task: logged, and this connection
            # closes; the shared nursery and the other connections go on.
            logger.exception("connection #%d from %s: writer failed", self.id, self.peer)
            self._request_close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            if self._writer is task:
                self._writer = None
            task.done.set()

    async def _stop_writer(self) -> None:
        """The connection stops being open: no writer starts from here on, and the one
        running (if any) is cancelled and waited for (shielded: it ends at its next
        checkpoint), as a nursery's exit would."""
        self._nursery = None
        self._reader = None
        task = self._writer
        if task is not None:
            task.scope.cancel()
            with trio.CancelScope(shield=True):
                await task.done.wait()

    async def _write_backlog(self) -> None:
        """Write what is queued for the client, in batches, until nothing is; then end
        (the subscription is idle again and publishers write through)."""
        subscription = self._subscription
        if subscription is None:
            return
        render = self.protocol.render
        try:
            while True:
                batch: list[bytes] = []
                size = 0
                close: tuple[int, str] | None = None
                try:
                    while size < MAX_BATCH_BYTES:
                        rendered = render(subscription.receive_nowait())
                        if rendered is not None:
                            batch.append(rendered)
                            size += len(rendered)
                except trio.WouldBlock:
                    pass
                except SlowConsumerError:
                    # Evicted. A write in progress finished first (each of its chunks is
                    # bounded by slow_consumer_timeout), so the close frame follows whole
                    # frames.
                    close = (CloseCode.SLOW_CONSUMER, "slow consumer")
                except trio.EndOfChannel:
                    close = (CloseCode.GOING_AWAY, "relay shutting down")
                except LiveGap as exc:
                    close = (CloseCode.GAP, exc.reason)  # after what came before the gap
                except trio.ClosedResourceError:
                    return  # unsubscribed: the connection is closing
                if batch:
                    data = batch[0] if len(batch) == 1 else b"".join(batch)
                    if self._handoff:
                        # We own the write slot already: a publisher wrote part of it.
                        try:
                            await self._write_all(data)
                        finally:
                            self._writing -= 1
                            self._slot().release()
                    else:
                        await self._send(data, keep=True)
                if close is not None:
                    self._request_close(*close)
                    return
                if not batch and subscription.park():
                    return
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
        """Called every second or so by the server: the protocol's keepalive rule (ping
        every ``ping_interval`` seconds, close 1011 after ``ping_timeout`` without a pong).

        The ping is queued like any message, so a client that stopped reading never sees
        it, never answers, and is closed: the case a ping written past a full buffer (as
        in other servers) would miss.
        """
        subscription = self._subscription
        if self._close_request is not None:
            return
        if subscription is None and (self._channels is None or self._nursery is None):
            return
        action = self.protocol.keepalive(now)
        if action is None:
            return
        if isinstance(action, bytes):
            if subscription is None:  # v2: ahead of the next batch the writer takes
                assert self._control is not _NO_FRAMES
                self._control.append(action)
                self._start_channel_writer()
                return
            with contextlib.suppress(trio.ClosedResourceError):
                subscription.push(action, len(action))
            return
        logger.info(
            "connection #%d from %s: no pong within %s s",
            self.id,
            self.peer,
            self._config.ping_timeout,
        )
        self._request_close(*action)

    def expire(self, now: float) -> None:
        """Called by the server's timer once the token's expiry is due: close 4401 "token
        expired", unless a ``refresh`` frame moved the expiry meanwhile (then wait for the
        new one)."""
        if self._close_request is not None:
            return
        if self._subscription is None and (self._channels is None or self._nursery is None):
            return  # not open (a v2 connection has its channels, and no one subscription)
        expires = self.protocol.expires
        if expires > now:
            if self._expiries is not None:
                self._expiries.schedule(self, expires)
            return
        logger.info("connection #%d from %s: token expired", self.id, self.peer)
        self._request_close(CloseCode.TOKEN_EXPIRED, "token expired")

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
        if self._reader is not None:
            self._reader.cancel()
        if self._writer is not None:
            self._writer.scope.cancel()

    # ---------------------------------------------------------------- bytes in

    async def _read_loop(self) -> None:
        """Read from the client, act on what the protocol makes of it, until the end.

        On a plain socket this waits with :func:`trio.lowlevel.wait_readable`, then reads
        with ``os.read``: one trip through the scheduler per read, where trio's
        ``receive_some`` makes two (a speculative ``recv`` that usually finds nothing
        when clients send one message at a time, then a schedule point after the read).
        It is safe for the same reasons as write-through (trio's sockets are
        non-blocking; only this task reads), which ``tests/test_connection.py`` checks.
        The wait is here, not in a method of its own: at 20,000 idle connections that
        method's suspended frame cost 0.2 KB each (and a coroutine per read).
        """
        protocol = self.protocol
        topics = self._topics
        topic = protocol.topic
        on_publish = self._on_publish
        fd, stream = self._read_fd, self._stream
        size = self._config.receive_buffer_size
        data: bytes | bytearray = b""  # first: the bytes that came with the handshake
        while True:
            received = protocol.receive_data(data, trio.current_time())
            replies: list[bytes] = []
            close = received.close
            try:
                for step in received.steps:
                    if type(step) is bytes:
                        replies.append(step)
                        continue
                    if type(step) is not Publish:  # trio-relay.v2: (un)subscribe, in order
                        assert isinstance(step, Subscribe | Unsubscribe)
                        if not await self._subscription_step(step, replies):
                            return
                        continue
                    if replies:  # pongs and errors go out before later messages' echoes
                        await self._send(b"".join(replies))
                        replies = []
                    if on_publish is not None:
                        kept = await self._filter(on_publish, step, replies)
                        if kept is None:
                            continue  # all dropped
                        step = kept
                    if step.requests is None:
                        try:  # the hot path: publish synchronously when nobody must wait
                            topics.deliver_nowait(topic, step.payloads, step.texts, source=protocol)
                        except trio.WouldBlock:
                            await topics.publish_batch(
                                topic, step.payloads, step.texts, source=protocol
                            )
                    else:
                        replies.append(await self._publish(step))
                if replies:
                    await self._send(b"".join(replies))
                if close is not None and received.peer_closed:
                    # The client started the closing handshake: answer and finish.
                    self._peer_closed = True
                    self.close_code = close[0]
                    await self._send(protocol.close_frame(*close))
                    return
            except (_PeerGone, _Stalled):
                self._peer_gone = True
                return
            except HookFailed:  # logged by the hook's caller
                self._request_close(CloseCode.INTERNAL_ERROR, "internal error")
                return
            if close is not None:
                self._request_close(*close, protocol_error=received.protocol_error)
                return
            if received.pause:
                await trio.sleep(received.pause)
            if received.held:
                data = b""  # over a rate: what this read brought first, then read again
                continue
            del received, replies, close  # nothing of this read is kept while waiting
            try:
                if fd is None:
                    data = await stream.receive_some(size)
                else:
                    while True:
                        await trio.lowlevel.wait_readable(fd)
                        try:
                            data = os.read(fd, size)
                        except BlockingIOError:
                            continue  # woken without data after all: wait again
                        except OSError:
                            data = b""  # reset by the peer: the same as end of stream
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._peer_gone = True
                await self._wait_turn()
                return

    async def _wait_turn(self) -> None:
        """The client went away: wait for a turn to end (released when the connection
        has ended, see :meth:`serve`).

        When thousands of clients drop at once (a load balancer restart, a network
        blip), their readers all wake in one trip through the scheduler. Each ending
        costs tens of microseconds; all of them in one trip would hold up every other
        connection for the whole of it (a second at 19,000). With a turn each, at most
        ``turns`` of them end per trip and the rest wait their turn in order, parked for
        a few microseconds each, while the connections still being served get a look in
        between (``benchmarks/mass_disconnect.py``)."""
        if self._turns is not None:
            await self._turns.wait(self._writers)

    async def _filter(
        self, on_publish: OnPublish, publish: Publish, replies: list[bytes]
    ) -> Publish | None:
        """``publish`` as the ``on_publish`` hook leaves it (None: it dropped every
        message), with an ``error`` (``dropped``) in ``replies`` for each envelope message
        it dropped. Raises :class:`HookFailed` if the hook failed: nothing is published."""
        protocol = self.protocol
        payloads, texts, kept = await filter_publications(
            on_publish,
            protocol.topic if publish.topic is None else publish.topic,
            publish.payloads,
            publish.texts,
            protocol.grant,
            self.peer,
            "websocket",
            self._config.max_message_size,
        )
        requests = publish.requests
        if kept is not None and requests is not None:
            chosen = set(kept)
            refused = [request for i, request in enumerate(requests) if i not in chosen]
            dropped = Publish([], [], requests=refused, topic=publish.topic)
            detail = "the relay's on_publish hook dropped the message"
            replies.append(protocol.refuse_publish(dropped, "dropped", detail))
            requests = [requests[i] for i in kept]
        if not payloads:
            return None
        return Publish(payloads, texts, publish.echo, requests, publish.topic, publish.key)

    async def _publish(self, publish: Publish) -> bytes:
        """Publish an envelope client's batch (synchronously when nobody has to be waited
        for, which is nearly always); return its acks, or the errors that refuse it (a v2
        publish to a new topic past ``max_topics``)."""
        topics, protocol = self._topics, self.protocol
        topic = protocol.topic if publish.topic is None else publish.topic
        args = (topic, publish.payloads, publish.texts)
        echo, key = publish.echo, publish.key
        try:
            try:
                report = topics.publish_nowait(
                    *args, source=protocol, echo=echo, idempotency_key=key
                )
            except trio.WouldBlock:
                report = await topics.publish_batch(
                    *args, source=protocol, echo=echo, idempotency_key=key
                )
        except TooManyTopicsError as exc:
            return protocol.refuse_publish(publish, "too-many-topics", str(exc))
        return protocol.acknowledge(publish, report)

    # ---------------------------------------------------------------- trio-relay.v2

    async def _run_channels(self) -> None:
        """A ``trio-relay.v2`` connection: subscriptions come and go by frame, each with its
        own bounded queue; one writer task, only while some of them have a backlog, serves
        them in turn and joins what is ready into one write."""
        self._channels = {}
        self._ring = collections.deque()
        self._control = []
        try:
            async with _Open(self):
                if self._opening(None, None, Cursor("", 0)) is None:
                    return
                first = self.protocol.subscribe_path()
                replies: list[bytes] = []
                if isinstance(first, bytes):
                    replies.append(first)
                elif first is not None and not await self._subscription_step(first, replies):
                    return
                if replies and not await self._send_first(b"".join(replies)):
                    return
                self._on_subscribed()
                await self._read_loop()
        finally:
            for channel in list(self._channels.values()):
                self._end_channel(channel)

    async def _subscription_step(self, step: Subscribe | Unsubscribe, replies: list[bytes]) -> bool:
        """Carry out a v2 ``subscribe`` or ``unsubscribe`` and add its answer to ``replies``.

        A subscription's answer (``subscribed``, gap, replay) is written at once, with the
        replies before it: nothing published to the topic can reach the client before it.
        Returns False if the client is gone or stalled (the connection ends)."""
        protocol = self.protocol
        channels = self._channels
        assert channels is not None
        if type(step) is Unsubscribe:
            channel = channels.get(step.channel.topic)
            if channel is not None and channel.channel is step.channel:
                self._end_channel(channel)
                replies.append(protocol.unsubscribed(step))
            else:  # its subscription was refused after the unsubscribe was read
                replies.append(protocol.refused_unsubscribe(step))
            self._on_subscribed()
            return True
        assert type(step) is Subscribe
        replies.append(await self._open_channel(step))
        try:
            await self._send(b"".join(replies))
        except (_PeerGone, _Stalled):
            self._peer_gone = True
            return False
        finally:
            replies.clear()
        self._on_subscribed()
        return True

    async def _open_channel(self, step: Subscribe) -> bytes:
        """Make the subscription ``step`` asks for, within the server's limits; return the
        frames that answer it (``subscribed`` and what precedes live messages, or an
        ``error``)."""
        protocol, config = self.protocol, self._config
        topic = step.channel.topic
        limits = self._limits
        if limits is not None:
            refusal = limits.reserve_subscriber(topic)
            if refusal is not None:
                return protocol.refused(step, "too-many-subscribers", refusal)
        channel = _Channel(step.channel)
        joined = self._topics.join(
            topic,
            since=step.since,
            epoch=step.epoch,
            max_buffer=config.queue_size,
            max_bytes=config.max_queue_bytes,
            policy=config.overflow_policy,
            timeout=config.overflow_timeout,
            subscription_name=f"#{self.id} {self.peer} {shown(topic, MAX_SHOWN)}",
            write_through=(
                functools.partial(self._write_channel, channel)
                if self._send_nowait is not None
                else None
            ),
            on_evict=functools.partial(self._channel_evicted, channel),
            on_backlog=functools.partial(self._channel_backlog, channel),
        )
        try:
            subscription, gap, replay, cursor = await joined
        except TooManyTopicsError as exc:
            if limits is not None:
                limits.release_subscriber(topic)
            return protocol.refused(step, "too-many-topics", str(exc))
        except BaseException:
            if limits is not None:
                limits.release_subscriber(topic)
            raise
        channel.subscription = subscription
        assert self._channels is not None
        self._channels[topic] = channel
        # No checkpoint since the subscription was made: its first frames are written
        # before anything published to it from now on (write-through sees the write).
        return protocol.subscribed(step, gap, replay, cursor)

    def _end_channel(self, channel: _Channel) -> None:
        """End one subscription (its queue is dropped) and give back its slot on the topic.
        Never checkpoints, so it runs to its end even when cancelled."""
        channels = self._channels
        topic = channel.channel.topic
        if channels is None or channels.get(topic) is not channel:
            return
        del channels[topic]
        if self._limits is not None:
            self._limits.release_subscriber(topic)
        if channel.subscription is not None:
            self._topics.leave(topic, channel.subscription)

    def _write_channel(self, channel: _Channel, item: Batch | bytes) -> Batch | bytes | None:
        """Write-through for one v2 subscription (see :meth:`_write_through`): write what
        the socket takes now, return the rest to queue, or None. Half a frame written is
        kept in ``_remainder``, which every next write sends first."""
        send_nowait = self._send_nowait
        assert send_nowait is not None
        data = self.protocol.render_channel(channel.channel, item)
        if data is None:
            return None
        if self._writing or self._write_broken or self._remainder is not None:
            return data  # a write is under way: queue behind it
        if self._nursery is None:
            return data  # closing: the drain (on shutdown) or nobody writes it
        try:
            sent = send_nowait(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            sent = 0  # the writer task will meet the error through trio
        self._counters.bytes_out += sent
        if sent == len(data):
            return None
        if sent == 0:
            return data
        self._remainder = memoryview(data)[sent:]
        self._start_channel_writer()
        return None

    def _channel_backlog(self, channel: _Channel) -> None:
        """A v2 subscription has a backlog: it joins the writer's round."""
        self._ring.append(channel)
        self._start_channel_writer()

    def _start_channel_writer(self) -> None:
        if not self._channel_writer and self._spawn(self._write_channels):
            self._channel_writer = True

    def _channel_evicted(self, channel: _Channel) -> None:
        logger.warning(
            "connection #%d from %s: subscription to %r evicted: slow consumer (over %d "
            "batches or %d bytes queued, no progress for %s s)",
            self.id,
            self.peer,
            shown(channel.channel.topic, MAX_SHOWN),
            self._config.queue_size,
            self._config.max_queue_bytes,
            self._config.overflow_timeout,
        )

    async def _write_channels(self) -> None:
        """The v2 writer: take one batch from each subscription with a backlog in turn (a
        busy topic gets no more turns than a quiet one), join them, with the connection's
        own frames first, into writes of up to :data:`MAX_BATCH_BYTES`, until nothing is
        queued; then end (idle subscriptions are written through again).

        A subscription evicted for its own backlog gets an ``unsubscribed`` frame with
        code ``slow-consumer``; the connection and its other subscriptions go on."""
        ring, render = self._ring, self.protocol.render_channel
        try:
            while True:
                frames, self._control = self._control, []
                size = sum(map(len, frames))
                close: tuple[int, str] | None = None
                while ring and size < MAX_BATCH_BYTES:
                    channel = ring.popleft()
                    subscription = channel.subscription
                    assert subscription is not None
                    try:
                        item = subscription.receive_nowait()
                    except trio.WouldBlock:
                        subscription.park()  # idle: publishers write through to it again
                        continue
                    except SlowConsumerError:
                        notice = self.protocol.dropped(
                            channel.channel, "slow-consumer", _SLOW_SUBSCRIPTION
                        )
                        self._end_channel(channel)
                        self._on_subscribed()
                        if notice:
                            frames.append(notice)
                            size += len(notice)
                        continue
                    except trio.EndOfChannel:
                        close = (CloseCode.GOING_AWAY, "relay shutting down")
                        break
                    except trio.ClosedResourceError:
                        continue  # unsubscribed
                    rendered = render(channel.channel, item)
                    if rendered is not None:
                        frames.append(rendered)
                        size += len(rendered)
                    ring.append(channel)
                if frames or self._remainder is not None:
                    await self._send(b"".join(frames), keep=True)
                if close is not None:
                    self._request_close(*close)
                    return
                if not (frames or ring or self._control or self._remainder is not None):
                    return
        except _Stalled:
            logger.warning(
                "connection #%d from %s: slow consumer, no write progress for %s s",
                self.id,
                self.peer,
                self._config.slow_consumer_timeout,
            )
            self._request_close(CloseCode.SLOW_CONSUMER, "slow consumer")
        except _PeerGone:
            self._peer_gone = True
            self._cancel_tasks()
        finally:
            self._channel_writer = False

    def _queued_channels(self) -> list[bytes] | None:
        """:meth:`_queued` for a v2 connection: the frames left unsent, the connection's
        own frames, then every subscription's queue."""
        if self._channels is None:
            return None
        frames, self._unsent, self._control = self._unsent + self._control, [], []
        render = self.protocol.render_channel
        for channel in self._channels.values():
            subscription = channel.subscription
            assert subscription is not None
            try:
                while True:
                    rendered = render(channel.channel, subscription.receive_nowait())
                    if rendered is not None:
                        frames.append(rendered)
            except (
                trio.WouldBlock,
                trio.EndOfChannel,
                trio.ClosedResourceError,
                SlowConsumerError,
            ):
                pass
        return frames

    # ---------------------------------------------------------------- closing

    async def _closing_handshake(self) -> None:
        """Send our close frame and wait for the client's answer; the caller bounds the time."""
        if self._peer_closed or self._peer_gone or self._write_broken:
            return
        code, reason = self._close_request or (CloseCode.GOING_AWAY, "relay shutting down")
        try:
            await self._send(self.protocol.close_frame(code, reason))
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
            if self.protocol.receive_closing(data):
                return
