"""The relay server: listeners, one task per connection, and the topics they share."""

from __future__ import annotations

import errno
import functools
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import trio

from ._auth import Expiries
from ._backplane import RedisBackplane
from ._broadcast import BroadcastStatistics
from ._budget import ByteBudget
from ._config import RelayConfig
from ._connection import RelayConnection, Turnstile
from ._counters import RelayCounters
from ._hooks import Authorize, OnPublish
from ._limits import ConnectionLimits
from ._listen import LogThrottle, refuse_at_once, serve_listeners
from ._protocol import http_response
from ._topics import DeliveryReport, Topics, TopicStatistics

__all__ = ["RelayServer", "RelayStatistics", "serve_relay"]

logger = logging.getLogger("trio_relay")

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 4000


class RelayStatistics:
    """Statistics of a running relay, from :meth:`RelayServer.statistics`.

    ``connections`` (open connections), ``subscribers`` (subscriptions of all topics),
    ``topic_count`` and ``totals`` (published batches, drops, evictions, and what is queued,
    over all topics) are running totals, read in constant time: what ``/metrics`` and
    ``/stats`` read, and what a :meth:`RelayServer.wait_until` on them costs, at 20,000
    topics as at 2. ``topics`` (each topic's statistics) and ``broadcast`` (the sum over
    all topics, with every subscription's queue) cost time in proportion to the topics and
    subscriptions, so they are taken when first read (and kept): for debugging.
    """

    __slots__ = (
        "_broadcast",
        "_server",
        "_topics",
        "connections",
        "subscribers",
        "topic_count",
        "totals",
    )

    def __init__(self, server: RelayServer) -> None:
        self._server = server
        self.connections = len(server._connections)
        self.subscribers = server.topics.subscriber_total
        self.topic_count = len(server.topics)
        self.totals = server.topics.totals.snapshot()
        self._topics: dict[str, TopicStatistics] | None = None
        self._broadcast: BroadcastStatistics | None = None

    def __repr__(self) -> str:
        return f"<RelayStatistics connections={self.connections} subscribers={self.subscribers}>"

    @property
    def topics(self) -> dict[str, TopicStatistics]:
        """The statistics of every topic, by name (taken when first read)."""
        if self._topics is None:
            self._topics = self._server.topics.statistics()
        return self._topics

    @property
    def broadcast(self) -> BroadcastStatistics:
        """The sum over all topics (taken when first read)."""
        if self._broadcast is None:
            topics = self.topics.values()
            subscriptions = tuple(
                subscription for topic in topics for subscription in topic.broadcast.subscriptions
            )
            self._broadcast = BroadcastStatistics(
                subscribers=sum(t.broadcast.subscribers for t in topics),
                queued=tuple(s.queued for s in subscriptions),
                published=sum(t.broadcast.published for t in topics),
                dropped=sum(t.broadcast.dropped for t in topics),
                evicted=sum(t.broadcast.evicted for t in topics),
                subscriptions=subscriptions,
            )
        return self._broadcast


ENDINGS_AT_ONCE = 256
"""How many connections whose clients went away at the same moment end at once; the rest
wait their turn, so that a mass disconnect does not hold up the connections still served
(``benchmarks/mass_disconnect.py``: the bystander's latency while 19,000 clients drop)."""


class RelayServer:
    """A running relay, as returned by ``await nursery.start(serve_relay, ...)``.

    It knows its bound ports (so tests can bind port 0), its broadcast, and its open
    connections. The relay stops when the task running :func:`serve_relay` is cancelled:
    it stops accepting, closes every client with 1001 within ``config.close_timeout``
    seconds, and returns.
    """

    def __init__(
        self,
        listeners: Sequence[trio.abc.Listener[Any]],
        topics: Topics,
        config: RelayConfig,
        backplane: RedisBackplane | None = None,
        *,
        authorize: Authorize | None = None,
        on_publish: OnPublish | None = None,
    ) -> None:
        self.listeners = tuple(listeners)
        self.topics = topics
        self.config = config
        self.backplane = backplane
        """The :class:`RedisBackplane` this relay shares topics through, if any."""
        self.authorize = authorize
        """The application's ``authorize`` hook, if any (see :func:`serve_relay`)."""
        self.on_publish = on_publish
        """The application's ``on_publish`` hook, if any (see :func:`serve_relay`)."""
        self._connections: set[RelayConnection] = set()
        self.counters = RelayCounters()
        """Lifetime counters (messages and bytes in and out, rejections by reason)."""
        self.limits = ConnectionLimits(
            config.max_connections, config.max_connections_per_ip, config.max_subscribers_per_topic
        )
        """The connection slots taken, in all, per client address and per topic."""
        # The connections holding a slot on their topic.
        self._admitted: set[RelayConnection] = set()
        self._refusals = LogThrottle()
        # Open connections by the time their token expires, for _tick to close.
        self._expiries: Expiries[RelayConnection] = Expiries()
        self._changed = trio.Event()
        # Turns to end for connections whose client went away: at most this many end per
        # trip through the scheduler (see RelayConnection._wait_turn).
        self._turns = Turnstile(ENDINGS_AT_ONCE)
        # Bound once, not per connection (each bound method is an object of its own).
        self._callbacks = (self._notify, self._admit)
        self.unfinished = ByteBudget(config.max_unfinished_bytes)
        """The bytes of unfinished incoming messages all connections hold
        (``unfinished.used``), against ``config.max_unfinished_bytes``."""

    @property
    def ports(self) -> tuple[int, ...]:
        """The TCP ports of the socket listeners (one per address family bound)."""
        ports: list[int] = []
        for listener in self.listeners:
            inner: object = listener
            if isinstance(inner, trio.SSLListener):
                inner = inner.transport_listener
            if isinstance(inner, trio.SocketListener):
                port = inner.socket.getsockname()[1]
                if port not in ports:
                    ports.append(port)
        return tuple(ports)

    @property
    def port(self) -> int:
        """The TCP port, when all socket listeners share one (the usual case)."""
        ports = self.ports
        if len(ports) != 1:
            raise RuntimeError(f"the relay listens on {len(ports)} distinct ports: {ports}")
        return ports[0]

    def statistics(self) -> RelayStatistics:
        """How many connections and subscriptions there are, and the statistics of every
        topic (see :class:`RelayStatistics` for what costs what)."""
        return RelayStatistics(self)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[RelayStatistics], bool]) -> RelayStatistics:
        """Wait until ``predicate(self.statistics())`` is true, and return those statistics.

        The predicate is checked now and again whenever a connection opens, subscribes or
        closes: ``await server.wait_until(lambda s: s.subscribers == 3)`` waits until three
        clients can receive. Bound it with a cancel scope.
        """
        await trio.sleep(0)
        while not predicate(statistics := self.statistics()):
            await self._changed.wait()
        return statistics

    async def publish(self, message: str | bytes, topic: str = "") -> DeliveryReport:
        """Publish ``message`` on ``topic`` (the root topic, path ``/``, by default), as if a
        client had sent it there."""
        return await self.topics.publish(topic, message)

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one already-connected stream until it closes.

        Tests and custom transports call this (with an in-memory stream, say); the
        listeners' streams are served the same way. Never raises except ``Cancelled``.

        The connection takes its slot under ``max_connections`` and
        ``max_connections_per_ip`` here, before its handshake; past either limit it gets
        HTTP 503 at once (written only if the socket takes it without waiting) and is
        closed without its request being read.
        """
        # Its writer task runs in a nursery of its own here, in the caller's task: the
        # caller's stream may outlive the relay's own nursery.
        async with trio.open_nursery() as tasks:
            await self._serve(stream, tasks)

    async def _serve(
        self, stream: trio.abc.Stream, tasks: trio.Nursery, turns: Turnstile | None = None
    ) -> None:
        """:meth:`serve_stream`, the connection's writer task in ``tasks`` (the listeners'
        connections share the relay's nursery: see ``_connection._Task``), taking its
        turn to end in ``turns`` if its client goes away (the listeners' connections: see
        ``RelayConnection._wait_turn``)."""
        connection = RelayConnection(
            stream,
            self.topics,
            self.config,
            self._callbacks[0],
            admit=self._callbacks[1],
            counters=self.counters,
            unfinished=self.unfinished,
            expiries=self._expiries if self._grants_expire else None,
            limits=self.limits,
            authorize=self.authorize,
            on_publish=self.on_publish,
            writers=tasks,
            turns=turns,
        )
        refusal = self.limits.reserve_connection(connection.host)
        if refusal is not None:
            self.counters.rejections["http-503"] += 1
            # Throttled: a flood of refused connections must not become a flood of lines.
            self._refusals.log(
                logger, logging.INFO, "connection from %s refused: %s", connection.peer, refusal
            )
            await refuse_at_once(stream, http_response(503, refusal))
            return
        self._connections.add(connection)
        self._notify()
        try:
            await connection.serve()
        finally:
            self._connections.discard(connection)
            self.limits.release_connection(connection.host)
            if connection in self._admitted:
                self._admitted.discard(connection)
                self.limits.release_subscriber(connection.topic)
            self._notify()

    @property
    def _grants_expire(self) -> bool:
        """Whether a connection's grant may expire: it comes from a token or the hook."""
        return self.config.auth_secret is not None or self.authorize is not None

    def _admit(self, connection: RelayConnection) -> str | None:
        """Take a slot on the topic of a connection whose handshake is valid, or say why it
        is refused (the slot is taken in this same step: no other handshake can slip in)."""
        if connection.protocol.v2:
            return None  # each of its subscriptions takes its own slot, when it is made
        refusal = self.limits.reserve_subscriber(connection.topic)
        if refusal is None:
            self._admitted.add(connection)
        return refusal

    async def _run(
        self, task_status: trio.TaskStatus[RelayServer] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        async with trio.open_nursery() as nursery:
            if self.backplane is not None:
                # Before accepting: histories are filled from the log first.
                await nursery.start(self.backplane.run, self.topics)
            # Every connection's writer task (only while it has a backlog) runs in this
            # nursery, joined by its connection before the connection ends.
            serve = functools.partial(self._serve, tasks=nursery, turns=self._turns)
            await nursery.start(serve_listeners, serve, self.listeners)
            for listener in self.listeners:
                logger.info("relay listening on %s", _describe(listener))
            task_status.started(self)
            await self._tick()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _tick(self) -> NoReturn:
        """One timer for all connections: keepalive pings every second (when enabled), the
        close of connections whose token expired (every second, with a secret or an
        ``authorize`` hook, whose grant may expire too: each tick
        looks only at the connections due, see :class:`Expiries`), and the sweep of
        expired histories, which expire even on topics nobody touches."""
        config = self.config
        sweep_every = min(max(config.history_age, 1.0), 60.0)
        every_second = config.ping_interval > 0 or self._grants_expire
        tick = 1.0 if every_second else sweep_every
        next_sweep = trio.current_time() + sweep_every
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            if config.ping_interval > 0:
                for connection in list(self._connections):
                    connection.keepalive(now)
            for connection in self._expiries.pop_due(now):
                connection.expire(now)
            if now >= next_sweep:
                self.topics.sweep()
                next_sweep = now + sweep_every
        raise AssertionError("unreachable")  # pragma: no cover


def _describe(listener: trio.abc.Listener[Any]) -> str:
    inner: object = listener
    scheme = "ws"
    if isinstance(inner, trio.SSLListener):
        inner, scheme = inner.transport_listener, "wss"
    if isinstance(inner, trio.SocketListener):
        host, port = inner.socket.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{port}/"
    return repr(listener)


async def open_listeners(
    host: str | None,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    *,
    reuse_port: bool = False,
) -> list[trio.abc.Listener[Any]]:
    """TCP listeners on ``host``:``port``, speaking TLS (``wss://``) with ``ssl_context``.

    The TLS handshake runs in each connection's own task, bounded by the relay's
    handshake timeout, so a client that stalls it holds up nobody else. ``reuse_port``
    sets ``SO_REUSEPORT``, so that several relay processes listen on one port (the
    kernel spreads connections over them: ``--workers``).
    """
    if reuse_port:
        tcp = await _reuse_port_listeners(host, port)
    else:
        tcp = await trio.open_tcp_listeners(port, host=host)
    if ssl_context is None:
        return list(tcp)
    return [trio.SSLListener(listener, ssl_context, https_compatible=True) for listener in tcp]


async def _reuse_port_listeners(host: str | None, port: int) -> list[trio.SocketListener]:
    # What trio.open_tcp_listeners does, plus SO_REUSEPORT (which it has no option for).
    infos = await trio.socket.getaddrinfo(
        host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _name, address in infos:
            try:
                sock = trio.socket.socket(family, kind, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    continue  # no IPv6 here, say: as trio.open_tcp_listeners does
                raise
            try:
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
                if family == trio.socket.AF_INET6:
                    sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(4096)
            except OSError:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except OSError:
        for listener in listeners:
            await listener.aclose()
        raise
    return listeners


async def serve_relay(
    host: str | None = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    config: RelayConfig | None = None,
    topics: Topics | None = None,
    listeners: Sequence[trio.abc.Listener[Any]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    backplane: RedisBackplane | None = None,
    authorize: Authorize | None = None,
    on_publish: OnPublish | None = None,
    task_status: trio.TaskStatus[RelayServer] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run a relay until cancelled; supports ``server = await nursery.start(serve_relay, ...)``.

    Binds ``host``:``port`` (port 0 picks a free one; see :attr:`RelayServer.ports`) unless
    ``listeners`` are given, in which case those are served instead (in-memory listeners in
    tests, say). ``ssl_context`` (a server context with its certificate loaded) makes the
    relay serve ``wss://``. ``topics`` defaults to a new :class:`Topics` built from ``config``.
    ``backplane`` (or ``config.backplane``, a URL, with the ``backplane_*`` settings)
    shares the topics with other relays through Redis; the relay runs it, and starts
    serving once it connected or failed to (it serves its local clients either way).

    On cancellation the listeners close, every client gets close 1001 ("going away") within
    ``config.close_timeout`` seconds, and the cancellation propagates.

    Two hooks let an application embed the relay (README "Embedding hooks"):

    ``authorize``: ``async def authorize(request: AuthRequest) -> Grant | Refusal``, asked
    for every WebSocket handshake and every request to the HTTP API (of a side port
    serving this relay). It replaces the token check: with a secret set too, the hook
    decides alone (it may call :func:`verify_token` with ``request.token`` to take the
    relay's tokens besides its own sessions); the secret then serves only ``refresh``
    frames (without a secret, those are answered ``bad-token``: reconnect to renew). A
    :class:`Grant` allows its topic patterns until its ``expires`` (then close 4401, as a
    token's); a handshake whose path names a topic the grant allows neither way gets 403.
    A :class:`Refusal` answers its HTTP status and reason. A hook that raises or answers
    anything else gets the client 500 (logged with its traceback); one that has not
    answered within ``config.handshake_timeout`` (counted from the connection's start)
    gets it 503. Either way only that client is refused.

    ``on_publish``: ``async def on_publish(message: Publication) -> str | bytes | None``,
    awaited for each message a WebSocket client (raw, ``trio-relay.v1``) or the HTTP API
    publishes, in order, before it is numbered: what it returns is published instead
    (``str``: a text message; ``bytes``: binary), ``None`` drops it (an envelope client
    gets ``error`` ``dropped`` for it; the HTTP API answers 422 ``dropped``, or that error
    in the message's place in a list). It does not see :meth:`RelayServer.publish` (the
    application's own) nor messages other relays deliver through a backplane (their relay
    ran its hook). A hook that raises, or returns anything else or a message over
    ``max_message_size``, drops the whole batch it was in (what one read brought): the
    client is closed with 1011 (the HTTP API answers 500) and the traceback logged. While
    the hook runs, that client's next messages wait (unread: back-pressure); nobody else
    does. Its cost is per message: see README "Embedding hooks" for the measured figures.
    """
    for name, hook in (("authorize", authorize), ("on_publish", on_publish)):
        if hook is not None and not callable(hook):
            raise TypeError(f"{name} must be an async function, not {type(hook).__name__}")
    config = config or RelayConfig()
    if topics is None:
        topics = Topics(
            history_size=config.history_size,
            history_bytes=config.history_bytes,
            history_age=config.history_age,
            history_total_bytes=config.history_total_bytes,
            max_topics=config.max_topics,
            max_buffer=config.queue_size,
            max_bytes=config.max_queue_bytes,
            policy=config.overflow_policy,
            timeout=config.overflow_timeout,
            idempotency_window=config.idempotency_window,
        )
    if listeners is None:
        listeners = await open_listeners(host, port, ssl_context)
    if backplane is None and config.backplane is not None:
        backplane = RedisBackplane(config.backplane, **config.backplane_options())
    server = RelayServer(
        listeners, topics, config, backplane, authorize=authorize, on_publish=on_publish
    )
    await server._run(task_status=task_status)
