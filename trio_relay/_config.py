"""The relay server's settings, one frozen value with documented defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, get_args

from ._backplane import CLUSTER_SCHEMES, cluster_url
from ._broadcast import OverflowPolicy

__all__ = ["BACKPLANE_SETTINGS", "RelayConfig", "check_backplane_prefix"]

_POLICIES: frozenset[str] = frozenset(get_args(OverflowPolicy))

BACKPLANE_SETTINGS = {
    "backplane_prefix": "prefix",
    "backplane_timeout": "timeout",
    "backplane_log_size": "log_size",
    "backplane_log_bytes": "log_bytes",
    "backplane_log_age": "log_age",
    "backplane_log_total_bytes": "log_total_bytes",
    "backplane_topic_ttl": "topic_ttl",
}
"""The :class:`RelayConfig` fields that set the Redis backplane the relay builds from
``backplane``, each with its :class:`~trio_relay.RedisBackplane` parameter."""


def check_backplane_prefix(prefix: str) -> str:
    """``prefix`` if it can namespace the backplane's keys, else ``ValueError`` saying why:
    not empty, and no ``{`` or ``}`` (the keys are hash-tagged by topic, ``{topic}``, for
    Redis Cluster: a brace in the prefix would make the prefix the hash tag)."""
    if not prefix:
        raise ValueError("must not be empty")
    if "{" in prefix or "}" in prefix:
        raise ValueError(
            f"must not contain '{{' or '}}' (keys are hash-tagged by topic for Redis "
            f"Cluster): {prefix!r}"
        )
    return prefix


@dataclass(frozen=True)
class RelayConfig:
    """Settings of :func:`serve_relay`. Every wait on the network has a bound here.

    The slow-consumer rule, and why. Each consumer may have up to ``max_queue_bytes``
    (256 KiB; and ``queue_size`` batches) queued in the relay beyond what its socket's
    kernel buffers hold. When a consumer is past that, publishers wait for it to make room
    (backpressure: no message is lost and memory stays bounded), but only until
    ``overflow_timeout`` (1 s) after that consumer last made progress; then the ``evict``
    policy disconnects it (close 1008). A consumer that is merely behind keeps draining, so
    it keeps making progress and gets every message; a dead reader makes none, and costs
    the others at most that one bounded pause. A consumer whose socket accepts nothing for
    ``slow_consumer_timeout`` (5 s) while the relay has data for it is disconnected too: a
    dead reader on a quiet relay. ``block`` would let one dead reader freeze every producer
    (the tutorial's flaw) and ``drop`` loses messages silently.
    """

    queue_size: int = 4096
    """Most batches queued per consumer (a batch: the messages of one read from a client)."""
    max_queue_bytes: int = 256 * 1024
    """Most bytes queued per consumer in the relay, beyond its socket's buffers."""
    overflow_policy: OverflowPolicy = "evict"
    """``block``, ``drop`` or ``evict``: see :data:`trio_relay.OverflowPolicy`."""
    overflow_timeout: float = 1.0
    """How long after a full consumer's last progress publishers stop waiting and ``evict``
    applies (0: evict at once, never wait)."""
    slow_consumer_timeout: float = 5.0
    """Seconds a consumer's socket may accept nothing while the relay writes to it."""
    max_message_size: int = 1024 * 1024
    """Largest message accepted from a client, in bytes (UTF-8 bytes for text); over it: 1009."""
    max_unfinished_bytes: int = 64 * 1024 * 1024
    """Bytes of unfinished incoming messages (sent in part, or in fragments still coming) all
    connections together may make the relay hold; a connection whose message would go past
    it is closed with 1013 (try again later). At least ``max_message_size``."""
    handshake_timeout: float = 10.0
    """Seconds a new connection has to complete its HTTP upgrade; then it is dropped."""
    close_timeout: float = 5.0
    """Seconds allowed for a closing handshake (and for graceful shutdown) before aborting."""
    receive_buffer_size: int = 64 * 1024
    """Bytes asked of the socket per read."""
    ping_interval: float = 20.0
    """Seconds between keepalive pings to a client (0: no pings)."""
    ping_timeout: float = 20.0
    """Seconds a client has to answer a ping; then it is closed with 1011."""
    max_connections: int = 10_000
    """Open connections the relay accepts in all; more get HTTP 503 at the handshake."""
    max_connections_per_ip: int = 10_000
    """Open connections the relay accepts from one client address; more get HTTP 503."""
    max_subscribers_per_topic: int = 10_000
    """Clients one topic accepts; more get HTTP 503 at the handshake."""
    http_max_connections: int = 64
    """Open connections the HTTP side port (``serve_metrics``: the API, ``/metrics``,
    ``/healthz``, the console) accepts, counted from accept; more get HTTP 503 at once and
    are closed."""
    http_request_timeout: float = 10.0
    """Seconds an HTTP side-port client has for its whole request and the response; then
    it is closed (a half-sent request holds its connection no longer). Keep it above the
    API's 5 s publish timeout, so that a publish that cannot finish is answered 503."""
    max_subscriptions_per_connection: int = 100
    """Topics one ``trio-relay.v2`` connection may be subscribed to at once; a ``subscribe``
    past it gets the error ``too-many-subscriptions`` (raw and v1 connections have one)."""
    publish_rate: float = 0.0
    """Messages per second one connection may publish, on average (0: no limit). A client
    above it is not read from until it is back under: TCP slows it down, nothing is lost.
    Envelope frames the relay refuses (answered with an ``error`` frame) count too."""
    publish_burst: int = 1000
    """Messages one connection may publish at once above ``publish_rate`` (the bucket size)."""
    control_rate: float = 20.0
    """Frames per second one connection may send that the relay answers or handles itself
    rather than publishing, on average: pings, pongs, and envelope frames refused with an
    ``error`` frame (0: no limit). On by default, unlike ``publish_rate``: a flood of
    these costs the relay CPU and reply bytes and serves nobody. A client above it is
    not read from until it is back under, like one over ``publish_rate``."""
    control_burst: int = 100
    """Frames of those kinds one connection may send at once above ``control_rate``."""
    auth_secret: str | None = field(default=None, repr=False)
    """Secret (at least 32 characters) that client tokens must be signed with (HS256 JWT);
    None lets every client publish and subscribe to every topic. Prefer setting it through
    the environment (TRIO_RELAY_AUTH_SECRET) to a command line others can read. Left out
    of the settings' ``repr``, so that printing them shows no secret."""
    allowed_origins: tuple[str, ...] = ()
    """Origin patterns (fnmatch) a browser's ``Origin`` header must match, against
    cross-site WebSocket hijacking; empty allows every origin. Clients that send no Origin
    (not browsers) are not affected."""
    history_size: int = 1000
    """Messages each topic retains for clients that resume with ``since`` (0: none)."""
    history_bytes: int = 1024 * 1024
    """Payload bytes each topic retains at most."""
    history_age: float = 600.0
    """Seconds a message stays retained at most."""
    history_total_bytes: int = 64 * 1024 * 1024
    """Bytes all topics' histories retain together (payloads, plus about 170 bytes a message
    and 2 KiB a topic); past it, the oldest messages of all topics go first."""
    idempotency_window: float = 120.0
    """Seconds a publish's idempotency key keeps another publish of it to the same topic
    from being published (it is answered with the first one's number instead); with a
    backplane, the keys are kept in Redis for as long. 0: no deduplication."""
    max_topics: int = 10_000
    """Topics at once. A new topic past it forgets the idle topic (one kept only for its
    history) used longest ago; if every topic has clients, the handshake gets HTTP 503."""
    backplane: str | None = field(default=None, repr=False)
    """``redis://host:port/db`` of a Redis that relay processes share topics through, or
    ``redis+cluster://host:port`` naming a node of a Redis Cluster (``rediss`` for TLS; see
    :class:`~trio_relay.RedisBackplane`); None keeps topics in this process. Left out of
    the ``repr``: it may hold a password (``redis://:PASSWORD@host``)."""
    backplane_prefix: str | None = None
    """Namespace of the backplane's keys in Redis (None: ``trio-relay``); relays with
    another prefix share nothing. Not empty, no ``{`` or ``}`` (keys are hash-tagged by
    topic for Redis Cluster). This and the other ``backplane_*`` settings need
    ``backplane`` (a :class:`~trio_relay.RedisBackplane` given to
    :func:`~trio_relay.serve_relay` keeps its own); None leaves the backplane's default."""
    backplane_timeout: float | None = None
    """Seconds each Redis command may take (None: 2 s)."""
    backplane_log_size: int | None = None
    """Entries each topic's log in Redis holds at most (None: the relay's ``history_size``)."""
    backplane_log_bytes: int | None = None
    """Payload bytes each topic's log in Redis holds at most (None: ``history_bytes``)."""
    backplane_log_age: float | None = None
    """Seconds an entry stays in its topic's log in Redis at most (None: ``history_age``)."""
    backplane_log_total_bytes: int | None = None
    """Payload bytes the logs in Redis of the topics this relay published to hold together
    at most (None: ``history_total_bytes``); past it, those published to longest ago are
    dropped."""
    backplane_topic_ttl: float | None = None
    """Seconds after its last publish a topic's keys in Redis expire (None: 86,400)."""

    def __post_init__(self) -> None:
        if self.backplane is not None:
            if not self.backplane.startswith(
                ("redis://", "rediss://", "unix://", *CLUSTER_SCHEMES)
            ):
                raise ValueError(
                    "backplane must be a redis://, rediss://, unix://, redis+cluster:// or "
                    "rediss+cluster:// URL"
                )
            try:
                cluster_url(self.backplane)
            except ValueError as exc:
                raise ValueError(f"backplane: {exc}") from None
        for name in BACKPLANE_SETTINGS:
            value = getattr(self, name)
            if value is None:
                continue
            if self.backplane is None:
                raise ValueError(f"{name} needs backplane (it sets the Redis backplane)")
            if name == "backplane_prefix":
                try:
                    check_backplane_prefix(value)
                except ValueError as exc:
                    raise ValueError(f"{name} {exc}") from None
            elif name in ("backplane_log_size", "backplane_log_bytes", "backplane_log_total_bytes"):
                if value < 1:
                    raise ValueError(f"{name} must be at least 1")
            elif not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a number of seconds > 0")
        if self.auth_secret is not None and len(self.auth_secret) < 32:
            raise ValueError("auth_secret must be at least 32 characters (HS256 needs 256 bits)")
        if self.overflow_policy not in _POLICIES:
            raise ValueError(
                f"overflow_policy must be one of {sorted(_POLICIES)}, not {self.overflow_policy!r}"
            )
        for name in ("history_size", "history_bytes", "history_total_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in (
            "queue_size",
            "max_queue_bytes",
            "max_message_size",
            "receive_buffer_size",
            "max_connections",
            "max_connections_per_ip",
            "max_subscribers_per_topic",
            "http_max_connections",
            "max_subscriptions_per_connection",
            "publish_burst",
            "max_topics",
            "control_burst",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_unfinished_bytes < self.max_message_size:
            raise ValueError(
                "max_unfinished_bytes must be at least max_message_size, or a message of "
                "that size sent over several reads could never be received"
            )
        for name in (
            "overflow_timeout",
            "slow_consumer_timeout",
            "handshake_timeout",
            "close_timeout",
            "history_age",
            "idempotency_window",
            "ping_interval",
            "ping_timeout",
            "publish_rate",
            "control_rate",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be a number of seconds >= 0")
        if not self.http_request_timeout > 0:
            raise ValueError("http_request_timeout must be a number of seconds > 0")

    def backplane_options(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~trio_relay.RedisBackplane` that the
        ``backplane_*`` settings give (those left None are left out: the backplane's
        defaults hold)."""
        options = {parameter: getattr(self, name) for name, parameter in BACKPLANE_SETTINGS.items()}
        return {parameter: value for parameter, value in options.items() if value is not None}
