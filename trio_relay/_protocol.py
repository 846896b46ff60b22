"""The relay's side of one WebSocket connection, as a sans-IO state machine.

:class:`RelayProtocol` takes the bytes a client sent and the current time, and says what to
do: bytes to send, batches to publish, when to close and with which code. It does no I/O
and starts no task, in the manner of h11 and wsproto, so every rule of a connection (the
handshake decision, frame events, the envelope protocol, the publish rate, keepalive, the
close handshake) is tested without sockets (``tests/test_protocol.py``).
:class:`~trio_relay._connection.RelayConnection` is the trio shell that does the reads,
writes and waits.

States::

    HANDSHAKE ── receive_request() ─► Reject (send its bytes, close the stream)
        │        └─────────────────► Upgrade ── shell admits ─► accept(): 101 bytes
        ▼
    OPEN ── receive_data() ─► Received(steps, close, pause)
        │   render(item)    ─► bytes for a published batch (or None)
        │   keepalive(now)  ─► a ping to queue (or a close request)
        ▼
    CLOSING ── close_frame(), receive_closing() until the peer's close ─► CLOSED
"""

from __future__ import annotations

import enum
import fnmatch
import http
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from ._auth import NOBODY, OPEN, Grant, TokenError, verify_token
from ._budget import ByteBudget
from ._config import RelayConfig
from ._counters import RelayCounters
from ._envelope import (
    MAX_ECHOED,
    SUBPROTOCOL,
    EnvelopeError,
    PublishRequest,
    RefreshRequest,
    clip,
    encode_ack,
    encode_error,
    encode_gap,
    encode_refreshed,
    encode_welcome,
    parse_client_frame,
)
from ._frames import (
    PING_OPCODE,
    PONG_OPCODE,
    CloseCode,
    close_frame,
    control_frame,
    frame_header,
    split_request_head,
)
from ._parser import (
    CLOSE,
    CONTROL,
    MESSAGE,
    PING,
    UNLIMITED,
    Close,
    FrameParser,
    ProtocolError,
)
from ._redact import MAX_SHOWN, shown
from ._topics import Batch, Cursor, DeliveryReport, Gap, check_epoch, topic_from_path
from ._upgrade import BadUpgrade, accept_response, parse_upgrade
from ._v2 import (
    SUBPROTOCOL_V2,
    Subscribe,
    TopicChannel,
    Unsubscribe,
    encode_subscribed,
    encode_unsubscribed,
    parse_v2_frame,
)

__all__ = [
    "MAX_REQUEST_HEAD",
    "OVER_BUDGET",
    "LiveGap",
    "Publish",
    "Received",
    "Reject",
    "RelayProtocol",
    "State",
    "Subscribe",
    "TokenBucket",
    "Unsubscribe",
    "Upgrade",
    "http_response",
]

MAX_REQUEST_HEAD = 16 * 1024
"""Bytes of HTTP request head accepted before answering 431."""

_ping_payloads = (f"keepalive {n}".encode() for n in itertools.count(1))
OVER_BUDGET = "the relay has no room for unfinished messages now; try again later"
"""The reason of the 1013 close of a connection whose message would overrun
``max_unfinished_bytes``."""


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Reject(NamedTuple):
    """The handshake failed: send :attr:`data` (an HTTP response) and close the stream."""

    status: int
    reason: str
    data: bytes


class Upgrade(NamedTuple):
    """A valid upgrade request, awaiting the server's admission (its connection limits):
    then :meth:`RelayProtocol.accept` or :meth:`RelayProtocol.reject`. With an
    ``authorize`` hook (``RelayProtocol(hooked=True)``) it awaits the hook's grant first
    (:meth:`RelayProtocol.authorize`), and carries what the hook is asked about."""

    topic: str
    since: int | None
    envelope: bool
    v2: bool = False
    """``trio-relay.v2``: ``topic`` is subscribed only if the path names one (not ``/``)."""
    path: str = ""
    """The percent-decoded path (for the hook only)."""
    query: str = ""
    """The query string (for the hook only)."""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    """The headers, names in lower case (for the hook only)."""


class Publish:
    """Messages to publish as one batch, in the order received. For an envelope client,
    :attr:`requests` holds its ``publish`` frames, to acknowledge with
    :meth:`RelayProtocol.acknowledge` once the batch's report is known. :attr:`topic` is
    the topic they name (``trio-relay.v2``), or None for the connection's own. A publish
    frame with an idempotency key is a batch of its own (:attr:`key`)."""

    __slots__ = ("echo", "key", "payloads", "requests", "texts", "topic")

    def __init__(
        self,
        payloads: list[bytes],
        texts: list[bool],
        echo: bool = True,
        requests: list[PublishRequest] | None = None,
        topic: str | None = None,
        key: str | None = None,
    ) -> None:
        self.payloads = payloads
        self.texts = texts
        self.echo = echo
        self.requests = requests
        self.topic = topic
        self.key = key


class Received:
    """What the bytes of one read call for, in order.

    ``steps`` are bytes to send and batches to publish (an envelope client's acks follow
    its batch); then, if ``close`` is set, the connection ends with that close frame:
    ``peer_closed`` when it answers the client's own close, ``protocol_error`` when the
    client broke the protocol or its message has no room (1013): send it, do not wait for
    an answer. If ``held`` is set, the connection is over one of its rates and bytes of
    this read are still unparsed: wait ``pause`` seconds, then call
    :meth:`RelayProtocol.receive_data` with ``b""`` before reading anything more from this
    client.

    Bytes steps (pongs, error frames) must be written before the batches that follow them
    are published: frames are answered in the order they arrived (RFC 6455).
    """

    __slots__ = ("close", "held", "pause", "peer_closed", "protocol_error", "steps")

    def __init__(self) -> None:
        self.steps: list[bytes | Publish | Subscribe | Unsubscribe] = []
        self.close: tuple[int, str] | None = None
        self.peer_closed = False
        self.protocol_error = False
        self.held = False
        self.pause = 0.0


class TokenBucket:
    """A rate limit: ``rate`` tokens a second, at most ``burst`` saved up.

    Tokens are counted as floats and handed out whole; times are the caller's clock.
    """

    __slots__ = ("burst", "rate", "refilled", "tokens")

    def __init__(self, rate: float, burst: int, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.refilled = now

    def available(self) -> int:
        """Whole tokens at the last refill (no more than there are now)."""
        # The epsilon: 0.1 s at 10 per second may come to 0.9999999999999999 tokens.
        return int(self.tokens + 1e-9)

    def refill(self, now: float) -> int:
        """Add the tokens earned since the last refill; return the whole tokens now."""
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        return int(self.tokens + 1e-9)

    def spend(self, count: int) -> None:
        """Take ``count`` tokens (refill first: they must be there)."""
        self.tokens -= count

    def wait(self) -> float:
        """Seconds until a whole token is there."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


def http_response(status: int, body: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with a plain-text body (and
    ``headers`` besides)."""
    payload = (body + "\n").encode("utf-8")
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Connection: close\r\n"
    ).encode("ascii")
    extra = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return head + extra + b"\r\n" + payload


def _text_frame(body: bytes) -> bytes:
    return frame_header(len(body), text=True) + body


_MAX_CACHED_GRANTS = 256
"""Topics whose publish permission a v2 connection remembers (then it starts over)."""


def _since(values: list[str] | None) -> int | None:
    """The ``since`` query parameter: a sequence number >= 0, or absent."""
    if not values:
        return None
    if len(values) > 1 or not values[0].isdigit() or len(values[0]) > 19:
        raise ValueError("'since' must be one sequence number (a whole number >= 0)")
    return int(values[0])


def _epoch(values: list[str] | None, since: int | None) -> str | None:
    """The ``epoch`` query parameter (of ``since``): as the relay sent it, or absent."""
    if not values:
        return None
    if len(values) > 1:
        raise ValueError("'epoch' must be given once")
    if since is None:
        raise ValueError("'epoch' is the epoch of 'since': give both")
    try:
        return check_epoch(values[0])
    except ValueError as exc:
        raise ValueError(f"'epoch': {exc}") from None


def gap_frame(gap: Gap) -> bytes:
    """The ``gap`` frame (framed) that tells an envelope client about ``gap``."""
    return _text_frame(encode_gap(gap.topic, gap.since, gap.first, gap.epoch, gap.reset))


def gap_reason(gap: Gap) -> str:
    """The reason of the 4410 close that tells a raw client about ``gap``."""
    if gap.reset:
        return f"the topic's numbering changed (since={gap.since}); it goes on from {gap.first}"
    return f"messages {gap.since + 1} to {gap.first - 1} are missing"


class LiveGap(Exception):
    """A raw client's topic skipped numbers or changed epoch while it was subscribed (raised
    by :meth:`RelayProtocol.render`): a raw client cannot be told in-band, so the shell
    closes it with 4410 and :attr:`reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RelayProtocol:
    """One connection's protocol state: feed it bytes and time, act on what it returns.

    Published batches carry the protocol object itself as their ``source``, so that
    :meth:`render` knows its own messages (sent with ``echo: false``).
    """

    # Slots: with tens of thousands of connections, a __dict__ each costs a kilobyte each.
    __slots__ = (
        "_buffer",
        "_claim",
        "_control_bucket",
        "_counters",
        "_cursor",
        "_hooked",
        "_key",
        "_next_ping",
        "_parser",
        "_ping_payload",
        "_ping_sent",
        "_publish_bucket",
        "_publish_grants",
        "channels",
        "config",
        "envelope",
        "epoch",
        "expires",
        "grant",
        "may_read",
        "may_write",
        "path_topic",
        "since",
        "state",
        "topic",
        "v2",
    )

    def __init__(
        self,
        config: RelayConfig,
        counters: RelayCounters | None = None,
        unfinished: ByteBudget | None = None,
        *,
        hooked: bool = False,
    ) -> None:
        self.config = config
        # An authorize hook decides what the client may do, not the token: the handshake
        # waits for its grant (authorize()), and the client may do nothing until then.
        self._hooked = hooked
        self._counters = counters if counters is not None else RelayCounters()
        self.state = State.HANDSHAKE
        # The request head until it is complete; then what came after it, until the first
        # receive_data() (b"", shared, when nothing did).
        self._buffer: bytes | bytearray = bytearray()
        self._key: bytes | None = None  # Sec-WebSocket-Key, from the request until accept()
        # Set by the handshake: the topic the path names, whether the client speaks the
        # envelope protocol, what its token allows, and the sequence number it resumes
        # after (query "since").
        self.topic = ""
        self.since: int | None = None
        self.epoch: str | None = None
        """The epoch of ``since`` (query ``epoch``), None if not given."""
        self.envelope = False
        self.may_read = self.may_write = not hooked
        self.grant: Grant = NOBODY if hooked else OPEN
        """What the client may do: its token's grant, the ``authorize`` hook's, or
        everything on a relay that checks neither."""
        self.expires = math.inf
        """When the token expires, on the clock of ``now`` (set by :meth:`opening`; moved
        by a ``refresh`` frame). From then on the connection publishes nothing more and
        the server's timer closes it with 4401."""
        # trio-relay.v2 (many topics): its subscriptions by topic (made and being made),
        # the topic its path names (if any), and what its token allows it to publish, by
        # topic (a cache, checked per frame; emptied by a refresh).
        self.v2 = False
        self.channels: dict[str, TopicChannel] = {}
        self.path_topic: str | None = None
        self._publish_grants: dict[str, bool] | None = None  # made by the first publish
        # The epoch and highest sequence number of this topic already sent to this client:
        # replays and live batches meet here without duplicates, and a skip is told.
        self._cursor = Cursor("", 0)
        self._parser = FrameParser(config.max_message_size)
        # This connection's share of the relay's budget for unfinished incoming messages
        # (shared by all its connections; a budget of its own when none is given).
        budget = unfinished or ByteBudget(config.max_unfinished_bytes)
        self._claim = budget.claim()
        self._ping_payload: bytes | None = None  # of the keepalive ping awaiting its pong
        self._ping_sent = 0.0
        self._next_ping = float("inf")
        # The rate limits (None: off): messages published, and frames the relay answers
        # or handles itself (pings, pongs, refused envelope frames).
        self._publish_bucket = (
            TokenBucket(config.publish_rate, config.publish_burst) if config.publish_rate else None
        )
        self._control_bucket = (
            TokenBucket(config.control_rate, config.control_burst) if config.control_rate else None
        )

    # ------------------------------------------------------------------ handshake

    def receive_request(self, data: bytes | bytearray) -> Upgrade | Reject | None:
        """Feed bytes of the HTTP upgrade request; None while its head is incomplete.

        Bytes after the head (frames sent right behind the request) are kept for the first
        :meth:`receive_data` (call it with ``b""``)."""
        assert self.state is State.HANDSHAKE
        buffer = self._buffer
        assert isinstance(buffer, bytearray)
        buffer += data
        parts = split_request_head(buffer)
        if parts is None:
            if len(buffer) > MAX_REQUEST_HEAD:
                return self.reject(431, "request head too large")
            return None
        head, rest = parts
        if len(head) > MAX_REQUEST_HEAD:
            return self.reject(431, "request head too large")
        self._buffer = bytearray(rest) if rest else b""
        try:
            request = parse_upgrade(head)
        except BadUpgrade as exc:
            reason = f"bad WebSocket upgrade request: {exc}"
            return self.reject(exc.status, reason, exc.headers)
        target = urlsplit(request.target)
        try:
            self.topic = topic_from_path(unquote(target.path))
            query = parse_qs(target.query)
            self.since = _since(query.get("since"))
            self.epoch = _epoch(query.get("epoch"), self.since)
        except ValueError as exc:
            # The path only, cut short: the query may hold the token.
            path = shown(target.path, 128)
            return self.reject(400, f"bad request for path {path!r}: {exc}")
        self.v2 = SUBPROTOCOL_V2 in request.subprotocols
        self.envelope = self.v2 or SUBPROTOCOL in request.subprotocols
        if self.v2 and self.since is not None and target.path in ("", "/"):
            return self.reject(400, "'since' needs a topic in the path (trio-relay.v2)")
        if self.v2:
            # Checked per topic, per frame; the path's topic (if any) is subscribed like
            # any other, by subscribe_path() once the connection is open.
            self.path_topic = None if target.path in ("", "/") else self.topic
        headers = dict(request.headers)
        config = self.config
        origin = headers.get(b"origin")
        if origin is not None and config.allowed_origins:
            text = origin.decode("latin-1")
            if not any(fnmatch.fnmatchcase(text, p) for p in config.allowed_origins):
                return self.reject(403, f"origin {shown(text, 128)!r} is not allowed")
        if self._hooked:
            self._key = request.key
            path = unquote(target.path)
            # The parser keeps Host and the subprotocols apart from the other headers.
            pairs: tuple[tuple[bytes, bytes], ...] = ((b"host", request.host),)
            if request.subprotocols:
                protocols = ", ".join(request.subprotocols).encode("latin-1")
                pairs += ((b"sec-websocket-protocol", protocols),)
            pairs += request.headers
            query_string = target.query
            return Upgrade(
                self.topic, self.since, self.envelope, self.v2, path, query_string, pairs
            )
        grant: Grant = OPEN
        if config.auth_secret is not None:
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, bearer = authorization.partition(" ")
            token = bearer.strip() if scheme.lower() == "bearer" else ""
            token = token or (query.get("token") or [""])[0]
            try:
                grant = verify_token(config.auth_secret, token)
            except TokenError as exc:
                return self.reject(401, str(exc))
        self._key = request.key
        return self.authorize(grant) or Upgrade(self.topic, self.since, self.envelope, self.v2)

    def authorize(self, grant: Grant) -> Reject | None:
        """Let the client do what ``grant`` allows (from its token, or the shell's
        ``authorize`` hook): None, or the 403 :class:`Reject` of a grant that allows
        neither publishing nor subscribing to the path's topic. (A ``trio-relay.v2``
        client whose path is ``/`` names no topic yet: each of its subscribes and
        publishes is checked on its own.)"""
        assert self.state is State.HANDSHAKE and self._key is not None
        topic = self.topic
        may_read, may_write = grant.may_subscribe(topic), grant.may_publish(topic)
        if not (may_read or may_write) and not (self.v2 and self.path_topic is None):
            if self._hooked:
                return self.reject(403, f"topic {topic!r} is not allowed for this connection")
            return self.reject(403, f"the token does not allow topic {topic!r}")
        self.grant = grant
        if not self.v2:
            self.may_read, self.may_write = may_read, may_write
        return None

    def reject(
        self, status: int, reason: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> Reject:
        """Refuse the handshake with HTTP ``status`` (the server's limits call this too).

        ``reason`` goes into the response body and the log as :func:`shown` makes it:
        tokens redacted, control characters escaped, at most 512 characters (the client's
        own values in it are cut to 128 or 200 where they are quoted)."""
        reason = shown(reason, 2 * MAX_SHOWN)
        self.state = State.CLOSED
        self._key = None
        self._counters.rejections[f"http-{status}"] += 1
        return Reject(status, reason, http_response(status, reason, headers))

    def accept(self) -> bytes:
        """The ``101 Switching Protocols`` response for an admitted :class:`Upgrade`."""
        assert self.state is State.HANDSHAKE and self._key is not None
        subprotocol = SUBPROTOCOL_V2 if self.v2 else SUBPROTOCOL if self.envelope else None
        data = accept_response(self._key, subprotocol)
        self._key = None
        if self.envelope:
            self._parser.too_big = (
                "envelope frame of {size} bytes (JSON, base64 payload) over the {limit}-byte limit"
            )
        self.state = State.OPEN
        return data

    def opening(
        self, gap: Gap | None, replay: Batch | None, cursor: Cursor, now: float
    ) -> tuple[bytes, tuple[int, str] | None]:
        """What the client gets first once subscribed (welcome, gap, replayed messages), or
        a close instead: a raw client cannot be told about a gap in-band (close 4410); a
        token that expired meanwhile gets 4401. From here the token's expiry counts on the
        clock of ``now`` (:attr:`expires`)."""
        self._cursor = cursor
        for bucket in (self._publish_bucket, self._control_bucket):
            if bucket is not None:
                bucket.refilled = now
        self.expires = now + self.grant.seconds_left()
        if self.expires <= now:
            return b"", (CloseCode.TOKEN_EXPIRED, "token expired")
        if self.config.ping_interval > 0:
            self._next_ping = now + self.config.ping_interval
        if gap is not None and not self.envelope:
            if gap.reset:
                reason = f"since={gap.since} is not of this topic's numbering (a reset)"
            else:
                reason = f"messages {gap.since + 1} to {gap.first - 1} are no longer retained"
            return b"", (CloseCode.GAP, reason)
        first: list[bytes] = []
        if self.envelope and not self.v2:
            first.append(_text_frame(encode_welcome(self.topic, cursor.seq, cursor.epoch)))
        if gap is not None:
            first.append(gap_frame(gap))
        if replay is not None and self.may_read:
            first.append(replay.envelope() if self.envelope else replay.raw)
        return b"".join(first), None

    # ------------------------------------------------------------------ bytes in

    def receive_data(self, data: bytes | bytearray, now: float) -> Received:
        """Feed bytes the client sent (``b""`` once, after :meth:`accept`, to process bytes
        that came with the request); return what they call for, in the order the frames
        arrived.

        Frames are parsed only as far as the connection's rates allow (``publish_rate``
        for messages, ``control_rate`` for pings, pongs and refused envelope frames). The
        rest of the bytes are held, unparsed: then :attr:`Received.held` is set, and after
        :attr:`Received.pause` the shell calls this again with ``b""`` before it reads any
        more (so what is held is at most one read, and the rest waits in the kernel)."""
        received = Received()
        if self._buffer:
            data, self._buffer = self._buffer + data, b""
        if data:
            self._counters.bytes_in += len(data)
        elif self._parser.stopped is None:
            return received
        parser = self._parser
        publish_bucket, control_bucket = self._publish_bucket, self._control_bucket
        envelope = self.envelope
        steps = received.steps
        batch: Publish | None = None  # the batch later messages join, if nothing came between
        pong = -1  # the index in steps of a pong that a next ping replaces (coalescing)
        close: Close | None = None
        error: ProtocolError | None = None
        while True:
            messages = UNLIMITED if publish_bucket is None else publish_bucket.refill(now)
            controls = UNLIMITED if control_bucket is None else control_bucket.available()
            if envelope and controls < messages:
                messages = controls  # any envelope frame may be refused: an error reply
            try:
                events = parser.feed(data, messages, controls)
            except ProtocolError as exc:
                events, error = exc.events, exc
            data = b""
            if (
                error is None
                and parser.unfinished != self._claim.held
                and not self._hold_unfinished()
            ):
                # Failed as a protocol error is (no waiting for the client's close), though
                # the client did nothing wrong: its message does not fit now.
                error = ProtocolError(CloseCode.TRY_AGAIN_LATER, OVER_BUDGET)
            published = controlled = 0
            for kind, payload, text in events:
                if kind == MESSAGE:
                    if now >= self.expires:
                        # Expired, and the server's timer (once a second) has not closed
                        # the connection yet: nothing more is published, not even a refresh.
                        steps.clear()
                        received.close = (CloseCode.TOKEN_EXPIRED, "token expired")
                        return received
                    if not self.may_write and not envelope:
                        detail = f"the token does not allow publishing to topic {self.topic!r}"
                        received.close = (CloseCode.SLOW_CONSUMER, detail)  # 1008: policy
                        return received
                    published += 1
                    if envelope:
                        reply = self._envelope_frame(payload, text, now)
                        if isinstance(reply, bytes):
                            steps += (frame_header(len(reply), text=True), reply)
                            controlled += 1
                            batch = None
                        elif not isinstance(reply, PublishRequest):  # v2: (un)subscribe
                            steps.append(reply)
                            controlled += 1
                            batch = None
                        else:
                            if (
                                batch is None
                                or batch.echo != reply.echo
                                or batch.topic != reply.topic
                                or batch.key is not None
                                or reply.key is not None
                            ):
                                batch = Publish([], [], reply.echo, [], reply.topic, reply.key)
                                steps.append(batch)
                            assert batch.requests is not None
                            batch.payloads.append(reply.payload)
                            batch.texts.append(reply.text)
                            batch.requests.append(reply)
                    else:
                        if batch is None:
                            batch = Publish([], [])
                            steps.append(batch)
                        batch.payloads.append(payload)
                        batch.texts.append(text)
                    pong = -1
                elif kind == PING:
                    # Answered in arrival order: before the echo of any later message. A
                    # ping right behind another replaces its unsent pong (RFC 6455 5.5.3).
                    controlled += 1
                    if pong >= 0:
                        steps[pong] = control_frame(PONG_OPCODE, payload)
                    else:
                        pong = len(steps)
                        steps.append(control_frame(PONG_OPCODE, payload))
                        batch = None
                elif kind == CLOSE:
                    try:
                        close = Close.parse(payload)
                    except ProtocolError as exc:
                        error = exc
                    break
                else:  # a pong
                    controlled += 1
                    if payload == self._ping_payload:  # the pong to our keepalive ping
                        self._ping_payload = None
                        self._next_ping = now + self.config.ping_interval
            if published:
                self._counters.messages_in += published
                if publish_bucket is not None:
                    publish_bucket.spend(published)
            if controlled and control_bucket is not None:
                control_bucket.refill(now)
                control_bucket.spend(controlled)
            if close is not None or error is not None or parser.stopped is None:
                break
            # Stopped at an allowance: go on if time has added to it, else wait for it.
            pause = 0.0
            stopped = parser.stopped
            bucket = publish_bucket if stopped == MESSAGE else None
            if bucket is not None and not bucket.refill(now):
                pause = bucket.wait()
            bucket = control_bucket if envelope or stopped == CONTROL else None
            if bucket is not None and not bucket.refill(now):
                pause = max(pause, bucket.wait())
            if pause:
                received.pause = pause
                received.held = True
                break
        if close is not None:
            # The client starts the closing handshake: answer with its own code.
            received.close = (close.code, close.reason)
            received.peer_closed = True
            self.state = State.CLOSED
        elif error is not None:
            received.close = (error.code, error.reason)
            received.protocol_error = True
        return received

    def _hold_unfinished(self) -> bool:
        """Hold what the parser keeps of an unfinished message against the relay's budget
        for them; False if that would go past it: the parser then lets the message go, and
        the connection is to be failed with 1013 (others keep what they hold)."""
        if self._claim.resize(self._parser.unfinished):
            return True
        self._parser.abandon()
        self._claim.release()
        return False

    def release(self) -> None:
        """Give back what this connection holds of the relay's budgets: called once it
        ended, on every path (safe to call again)."""
        self._parser.abandon()
        self._claim.release()

    def _envelope_frame(
        self, payload: bytes, text: bool, now: float
    ) -> PublishRequest | Subscribe | Unsubscribe | bytes:
        """An envelope client's frame as a request to publish (or, in v2, to subscribe or
        unsubscribe), or the JSON of the error frame that refuses it (with the frame's
        ``id`` when it has a readable one, and in v2 its ``topic``), or of the answer to a
        ``refresh`` (which counts toward ``control_rate`` as errors do)."""
        try:
            if self.v2:
                request = self._v2_request(payload, text)
            else:
                request = parse_client_frame(payload, text=text, topic=self.topic)
        except EnvelopeError as exc:
            return encode_error(exc.code, exc.detail, exc.request_id, exc.topic)
        if isinstance(request, RefreshRequest):
            return self._refresh(request, now)
        if self.v2:
            return request  # checked against the token, per topic, by _v2_request
        if not self.may_write:
            detail = f"the token does not allow publishing to topic {clip(self.topic)}"
            return encode_error("forbidden", detail, request.id)
        return request

    def _refresh(self, request: RefreshRequest, now: float) -> bytes:
        """Verify a ``refresh`` frame's token: if it allows this connection's topic, its
        grant replaces the old one (what may be published and read, and the expiry) and
        the answer is a ``refreshed`` frame; otherwise an ``error`` frame and nothing
        changes (the old token still expires when it would have)."""
        secret = self.config.auth_secret
        if secret is None and self._hooked:
            # The authorize hook decided, and no token can change that: reconnect.
            detail = "this relay takes no tokens (it authorizes connections itself): reconnect"
            return encode_error("bad-token", detail, request.id)
        if secret is None:
            return encode_refreshed(request.id, None)  # nothing expires here
        try:
            grant = verify_token(secret, request.token)
        except TokenError as exc:
            # The error may quote the token's header: cut as any echoed client value is.
            return encode_error("bad-token", shown(exc, MAX_ECHOED), request.id)
        if self.v2:
            # The new token must allow every subscription the connection has; then it
            # decides each later subscribe and publish.
            for topic in self.channels:
                if not grant.may_subscribe(topic):
                    detail = f"the new token does not allow subscribing to topic {clip(topic)}"
                    return encode_error("forbidden", detail, request.id, topic)
            self.grant = grant
            self._publish_grants = None
            self.expires = now + grant.seconds_left()
            return encode_refreshed(request.id, grant.expires)
        topic = self.topic
        may_read, may_write = grant.may_subscribe(topic), grant.may_publish(topic)
        if not (may_read or may_write):
            detail = f"the new token does not allow topic {clip(topic)}"
            return encode_error("forbidden", detail, request.id)
        self.grant, self.may_read, self.may_write = grant, may_read, may_write
        self.expires = now + grant.seconds_left()
        return encode_refreshed(request.id, grant.expires)

    def refuse_publish(self, publish: Publish, code: str, detail: str) -> bytes:
        """The ``error`` frames of an envelope client's batch that could not be published
        (nothing of it was), one per ``publish`` frame, with its ``id`` and topic."""
        frames = [
            _text_frame(encode_error(code, detail, request.id, request.topic))
            for request in publish.requests or ()
        ]
        return b"".join(frames)

    def acknowledge(self, publish: Publish, report: DeliveryReport) -> bytes:
        """The ``ack`` frames of an envelope client's batch, once published (raw clients
        get none: their echo is the acknowledgement)."""
        if publish.requests is None:
            return b""
        frames: list[bytes] = []
        for offset, request in enumerate(publish.requests):
            body = encode_ack(
                report.topic,
                report.seq + offset,
                request.id,
                report.queued,
                report.dropped,
                report.evicted,
                report.remote,
                report.epoch,
                report.backplane,
                report.duplicate,
            )
            frames += (frame_header(len(body), text=True), body)
        return b"".join(frames)

    # ------------------------------------------------------------------ trio-relay.v2

    def _v2_request(
        self, payload: bytes, text: bool
    ) -> PublishRequest | Subscribe | Unsubscribe | RefreshRequest:
        """A v2 client frame as a request, checked against the token and this connection's
        subscriptions; :class:`EnvelopeError` if it is refused."""
        request = parse_v2_frame(payload, text=text)
        if isinstance(request, RefreshRequest):
            return request
        if isinstance(request, PublishRequest):
            topic = request.topic
            assert topic is not None
            grants = self._publish_grants
            if grants is None or len(grants) >= _MAX_CACHED_GRANTS:
                grants = self._publish_grants = {}
            allowed = grants.get(topic)
            if allowed is None:
                allowed = grants[topic] = self.grant.may_publish(topic)
            if not allowed:
                detail = f"the token does not allow publishing to topic {topic!r}"
                raise EnvelopeError("forbidden", detail, request.id, topic)
            return request
        if request.kind == "subscribe":
            return self._subscribe(request.topic, request.since, request.id, request.epoch)
        channel = self.channels.pop(request.topic, None)
        if channel is None:
            detail = f"this connection is not subscribed to topic {request.topic!r}"
            raise EnvelopeError("not-subscribed", detail, request.id, request.topic)
        return Unsubscribe(channel, request.id)

    def _subscribe(
        self,
        topic: str,
        since: int | None,
        request_id: str | int | None,
        epoch: str | None = None,
    ) -> Subscribe:
        if not self.grant.may_subscribe(topic):
            detail = f"the token does not allow subscribing to topic {topic!r}"
            raise EnvelopeError("forbidden", detail, request_id, topic)
        if topic in self.channels:
            detail = f"this connection is already subscribed to topic {topic!r}"
            raise EnvelopeError("already-subscribed", detail, request_id, topic)
        cap = self.config.max_subscriptions_per_connection
        if len(self.channels) >= cap:
            detail = f"this connection is at its limit of {cap} subscriptions"
            raise EnvelopeError("too-many-subscriptions", detail, request_id, topic)
        channel = self.channels[topic] = TopicChannel(topic)
        return Subscribe(channel, since, request_id, epoch)

    def subscribe_path(self) -> Subscribe | bytes | None:
        """v2: the subscription the connection's path asks for (with the query's ``since``),
        as a ``subscribe`` frame without ``id`` would: the request, the error frame that
        refuses it, or None for the path ``/``. Called once, right after :meth:`opening`."""
        if self.path_topic is None:
            return None
        try:
            return self._subscribe(self.path_topic, self.since, None, self.epoch)
        except EnvelopeError as exc:
            return _text_frame(encode_error(exc.code, exc.detail, None, exc.topic))

    def subscribed(
        self, request: Subscribe, gap: Gap | None, replay: Batch | None, cursor: Cursor
    ) -> bytes:
        """The shell made the subscription: the ``subscribed`` frame, then the gap (if any)
        and the replayed messages, all of which go out before any live message of it."""
        channel = request.channel
        channel.cursor = cursor
        channel.open = True
        subscribed = encode_subscribed(channel.topic, cursor.seq, request.id, cursor.epoch)
        first = [_text_frame(subscribed)]
        if gap is not None:
            first.append(gap_frame(gap))
        if replay is not None:
            first.append(replay.envelope())
        return b"".join(first)

    def refused(self, request: Subscribe, code: str, detail: str) -> bytes:
        """The shell could not make the subscription (the server's limits): its error frame."""
        channel = request.channel
        if self.channels.get(channel.topic) is channel:
            del self.channels[channel.topic]
        return _text_frame(encode_error(code, detail, request.id, channel.topic))

    def unsubscribed(self, request: Unsubscribe) -> bytes:
        """The shell ended the subscription: the ``unsubscribed`` answer. Nothing of the
        topic may be sent after it."""
        return _text_frame(encode_unsubscribed(request.channel.topic, request.id))

    def refused_unsubscribe(self, request: Unsubscribe) -> bytes:
        """The error for an ``unsubscribe`` read while its topic's subscription was being
        made, which was then refused: there is nothing to unsubscribe."""
        topic = request.channel.topic
        detail = f"this connection is not subscribed to topic {topic!r}"
        return _text_frame(encode_error("not-subscribed", detail, request.id, topic))

    def dropped(self, channel: TopicChannel, code: str, detail: str) -> bytes:
        """The relay ended the subscription of ``channel`` on its own (``slow-consumer``):
        the unsolicited ``unsubscribed`` frame, or nothing if the client's own unsubscribe
        for it is already under way (its answer says it)."""
        if self.channels.get(channel.topic) is not channel:
            return b""
        del self.channels[channel.topic]
        return _text_frame(encode_unsubscribed(channel.topic, None, code, detail))

    def render_channel(self, channel: TopicChannel, item: Batch | bytes) -> bytes | None:
        """:meth:`render` for one v2 subscription, with that topic's own cursor."""
        if isinstance(item, bytes):
            return item
        cursor = channel.cursor
        if item.epoch == cursor.epoch and item.first_seq == cursor.seq + 1:
            cursor.seq = item.last_seq  # the common case, inline: what Cursor.take does
        else:
            gap, fresh = cursor.take(item)
            if gap is not None:
                rest = None if fresh is None else self._rendered(fresh, True)
                return gap_frame(gap) if rest is None else gap_frame(gap) + rest
            if fresh is None:
                return None
            item = fresh
        return self._rendered(item, True)

    def _rendered(self, item: Batch, envelope: bool) -> bytes | None:
        if item.source is self and not item.echo:
            return None
        self._counters.messages_out += len(item.payloads)
        return item.envelope() if envelope else item.raw

    # ------------------------------------------------------------------ bytes out

    def render(self, item: Batch | bytes) -> bytes | None:
        """The bytes this client gets for a published batch (or an item of its own, passed
        through), or None if it gets nothing: its own message without echo, messages the
        replay already gave it, or anything with a publish-only token. Where the topic
        skipped numbers or changed epoch since the client's last message, an envelope
        client gets a ``gap`` frame first; a raw client cannot: :class:`LiveGap` is
        raised (close it with 4410)."""
        if isinstance(item, bytes):
            return item
        if not self.may_read:
            return None
        cursor = self._cursor
        if item.epoch == cursor.epoch and item.first_seq == cursor.seq + 1:
            cursor.seq = item.last_seq  # the common case, inline: what Cursor.take does
            if item.source is self and not item.echo:
                return None
            self._counters.messages_out += len(item.payloads)
            return item.envelope() if self.envelope else item.raw
        gap, fresh = cursor.take(item)
        if gap is not None:
            if not self.envelope:
                self.may_read = False  # nothing more: the 4410 close is all it gets
                raise LiveGap(gap_reason(gap))
            rest = None if fresh is None else self._rendered(fresh, True)
            return gap_frame(gap) if rest is None else gap_frame(gap) + rest
        return None if fresh is None else self._rendered(fresh, self.envelope)

    def keepalive(self, now: float) -> bytes | tuple[int, str] | None:
        """Ping every ``ping_interval`` seconds: the ping frame to queue like any message
        (so a client that stopped reading never answers), a close ``(1011, reason)`` if a
        ping went unanswered for ``ping_timeout`` seconds, or None."""
        if self.state is not State.OPEN:
            return None
        config = self.config
        if self._parser.stopped is not None:
            # Not reading from the client on purpose (over a rate): its pong may be waiting
            # behind what is held. Its ping_timeout starts again once reading resumes.
            self._ping_sent = now
            return None
        if self._ping_payload is not None:
            if now - self._ping_sent >= config.ping_timeout:
                return (CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
            return None
        if now >= self._next_ping:
            self._ping_payload = next(_ping_payloads)
            self._ping_sent = now
            return control_frame(PING_OPCODE, self._ping_payload)
        return None

    # ------------------------------------------------------------------ closing

    def close_frame(self, code: int, reason: str) -> bytes:
        """Our close frame; after it, feed :meth:`receive_closing` until it says done."""
        self.state = State.CLOSING
        return close_frame(code, reason)

    def receive_closing(self, data: bytes | bytearray) -> bool:
        """Feed bytes received while closing; True once the client's close frame arrived
        (or the stream ended, or it broke the protocol): the stream may be closed."""
        if not data:
            self.state = State.CLOSED
            return True
        try:
            events = self._parser.feed(data)
        except ProtocolError:
            self.state = State.CLOSED
            return True
        if self._parser.unfinished != self._claim.held and not self._hold_unfinished():
            self.state = State.CLOSED  # no room for what it still sends: stop waiting
            return True
        if any(kind == CLOSE for kind, _, _ in events):
            self.state = State.CLOSED
            return True
        return False
