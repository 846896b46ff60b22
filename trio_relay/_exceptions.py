"""Everything trio_relay raises on purpose derives from :class:`RelayError`.

The tree::

    RelayError
    ├── SlowConsumerError        a subscription was evicted because it fell behind
    ├── TooManyTopicsError       a new topic would exceed the topic cap (``max_topics``)
    ├── TokenError               verify_token: a token missing, malformed, forged or expired
    └── ClientError              a client call (produce / consume) failed; has .url
        ├── RelayUnavailable     no TCP connection could be made (refused, unreachable, DNS)
        ├── HandshakeRejected    the relay answered the upgrade with an HTTP error (.status_code)
        ├── RelayTimeout         a bounded wait ran out (connect, handshake, acknowledgement)
        ├── RelayConnectionClosed the relay closed an open connection (.code, .reason)
        ├── PublishRejected      the relay answered a publish with an error frame (.code)
        └── SubscriptionRejected the relay refused a v2 subscribe or unsubscribe (.code, .topic)

trio-websocket's own exceptions never escape the client functions: they are
wrapped at the boundary, with the original attached as ``__cause__`` unless its text
would show a secret (a rejection's body quoting a token, say). No :class:`ClientError`
message shows a token: see :class:`ClientError`.
"""

from __future__ import annotations

from ._redact import redact

__all__ = [
    "ClientError",
    "HandshakeRejected",
    "PublishRejected",
    "RelayConnectionClosed",
    "RelayError",
    "RelayTimeout",
    "RelayUnavailable",
    "SlowConsumerError",
    "SubscriptionRejected",
    "TooManyTopicsError",
]


class RelayError(Exception):
    """Root of every exception trio_relay raises on purpose."""


class SlowConsumerError(RelayError):
    """The subscription was evicted: its buffer stayed full for longer than its timeout.

    Raised by :meth:`Subscription.receive` from the moment of eviction; messages
    that were still queued for the subscription are discarded.
    """


class TooManyTopicsError(RelayError):
    """A new topic was asked for while :class:`~trio_relay.Topics` is at its ``max_topics``
    and every topic is in use (subscribed, or being published to): nothing was published
    or subscribed. Topics kept only for their history make room instead (the one used
    longest ago is forgotten), so this means the cap is taken by live topics. The relay
    answers a handshake for such a topic with HTTP 503.
    """


class ClientError(RelayError):
    """A client operation against the relay at :attr:`url` failed.

    Neither the message nor :attr:`url` carries a token: both go through
    :func:`~trio_relay._redact.redact` (``?token=<redacted>``, ``Bearer <redacted>``, any
    JWT), so a URL with ``?token=`` and a server that quotes credentials back stay safe to log.
    """

    def __init__(self, url: str, message: str) -> None:
        url = redact(url)
        super().__init__(f"{url}: {redact(message)}")
        self.url = url


class RelayUnavailable(ClientError):
    """No connection could be made to the relay (refused, unreachable, name not resolved)."""


class HandshakeRejected(ClientError):
    """The server answered the WebSocket handshake with an HTTP status other than 101.

    The message is one line: a 4xx or 5xx status with the first line of a plain-text body
    (the relay's reason; at most 200 characters, an HTML page left out), any other status
    as "not a WebSocket endpoint" (an HTTP server, such as the relay's side port). The
    whole body is :attr:`body` and the response's headers :attr:`headers` (name, value
    pairs of bytes), both as received: unlike the message, they are not redacted.
    """

    def __init__(
        self,
        url: str,
        status_code: int,
        body: bytes | None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        if status_code < 400:
            message = f"not a WebSocket endpoint (HTTP {status_code})"
        else:
            text = (body or b"").decode("utf-8", "replace").strip()
            first, *more = text.splitlines() or [""]
            if first.startswith("<"):  # markup: an HTTP server's error page, not a reason
                first, more = "", []
            if len(first) > 200 or more:
                first = first[:200] + " ..."
            detail = f": {first}" if first else ""
            message = f"handshake rejected with HTTP {status_code}{detail}"
        super().__init__(url, message)
        self.status_code = status_code
        self.body = body
        self.headers = headers


class RelayTimeout(ClientError):
    """A bounded wait (connect, handshake, or acknowledgement) ran out."""


class RelayConnectionClosed(ClientError):
    """The relay closed the connection with WebSocket close :attr:`code`."""

    def __init__(self, url: str, code: int, reason: str | None) -> None:
        detail = f" ({reason})" if reason else ""
        super().__init__(url, f"connection closed with code {code}{detail}")
        self.code = code
        self.reason = reason


class PublishRejected(ClientError):
    """The relay refused a ``trio-relay.v1`` or ``v2`` publish with an ``error`` frame
    (:attr:`code`)."""

    def __init__(self, url: str, code: str, detail: str) -> None:
        super().__init__(url, f"publish rejected ({code}): {detail}")
        self.code = code
        self.detail = detail


class SubscriptionRejected(ClientError):
    """The relay refused a ``trio-relay.v2`` ``subscribe`` (or ``unsubscribe``) of
    :attr:`topic` with an ``error`` frame: :attr:`code` is ``forbidden``,
    ``already-subscribed``, ``not-subscribed``, ``too-many-subscriptions``,
    ``too-many-subscribers``, ``too-many-topics``, ... (PROTOCOL.md). The session and its
    other subscriptions go on."""

    def __init__(self, url: str, code: str, detail: str, topic: str) -> None:
        super().__init__(url, f"subscription to {topic!r} rejected ({code}): {detail}")
        self.code = code
        self.detail = detail
        self.topic = topic
