"""Sans-IO codec of the ``trio-relay.v2`` protocol: many topics on one connection.

A ``trio-relay.v2`` client subscribes and unsubscribes at any time and names the topic of
each publish; every frame of the relay that concerns a topic carries it (PROTOCOL.md,
"trio-relay.v2"). This module turns client frames into requests (:class:`Subscribe`,
:class:`Unsubscribe`, a :class:`~trio_relay._envelope.PublishRequest` with its topic) or an
:class:`~trio_relay._envelope.EnvelopeError`, and builds the frames only v2 has. Messages,
gaps and acks are v1's frames, which already carry their topic: a message is framed once
for v1 and v2 clients alike. It never touches a stream.
"""

from __future__ import annotations

from ._envelope import (
    EnvelopeError,
    PublishRequest,
    RefreshRequest,
    dump,
    publish_request,
    read_frame,
    refresh_request,
)
from ._redact import shown
from ._topics import Cursor, check_epoch, topic_from_path

__all__ = [
    "MAX_ECHOED_TOPIC",
    "SUBPROTOCOL_V2",
    "Subscribe",
    "SubscriptionFrame",
    "TopicChannel",
    "Unsubscribe",
    "encode_subscribed",
    "encode_unsubscribed",
    "parse_v2_frame",
]

SUBPROTOCOL_V2 = "trio-relay.v2"
"""The WebSocket subprotocol a client asks for to speak ``trio-relay.v2``."""

MAX_ECHOED_TOPIC = 128
"""Most characters of a client's ``topic`` an error frame quotes back (the rest is cut)."""

_MAX_SINCE = 2**63


class TopicChannel:
    """One topic of a v2 connection, as the protocol sees it: the topic and the epoch and
    highest sequence number of it already sent (its :class:`~trio_relay._topics.Cursor`:
    the replay and live batches meet there without duplicates, and a skip is told).
    ``open`` is False while the subscription is being made."""

    __slots__ = ("cursor", "open", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.cursor = Cursor("", 0)
        self.open = False

    def __repr__(self) -> str:
        return f"<TopicChannel {self.topic!r} cursor={self.cursor}>"


class Subscribe:
    """A ``subscribe`` request, accepted by the protocol, for the shell to carry out: make
    the subscription (the server's limits may still refuse it), then answer with
    :meth:`RelayProtocol.subscribed` or :meth:`RelayProtocol.refused`."""

    __slots__ = ("channel", "epoch", "id", "since")

    def __init__(
        self,
        channel: TopicChannel,
        since: int | None,
        request_id: str | int | None,
        epoch: str | None = None,
    ):
        self.channel = channel
        self.since = since
        self.id = request_id
        self.epoch = epoch
        """The epoch of ``since``, None if not given."""

    def __repr__(self) -> str:
        return f"<Subscribe {self.channel.topic!r} since={self.since} id={self.id!r}>"


class Unsubscribe:
    """An ``unsubscribe`` request for a topic the connection is subscribed to (or about
    to be): end its subscription, then answer with :meth:`RelayProtocol.unsubscribed`."""

    __slots__ = ("channel", "id")

    def __init__(self, channel: TopicChannel, request_id: str | int | None) -> None:
        self.channel = channel
        self.id = request_id

    def __repr__(self) -> str:
        return f"<Unsubscribe {self.channel.topic!r} id={self.id!r}>"


class SubscriptionFrame:
    """A parsed ``subscribe`` or ``unsubscribe`` frame (``kind``), not yet checked against
    the connection (``since`` and ``epoch`` are None for ``unsubscribe``)."""

    __slots__ = ("epoch", "id", "kind", "since", "topic")

    def __init__(
        self,
        kind: str,
        topic: str,
        since: int | None,
        request_id: str | int | None,
        epoch: str | None = None,
    ) -> None:
        self.kind = kind
        self.topic = topic
        self.since = since
        self.id = request_id
        self.epoch = epoch


def quoted_topic(value: object) -> str | None:
    """A client's ``topic`` value as an error frame quotes it back: a string, cut to
    :data:`MAX_ECHOED_TOPIC` characters; None for anything that is not a string."""
    if not isinstance(value, str):
        return None
    return value if len(value) <= MAX_ECHOED_TOPIC else value[:MAX_ECHOED_TOPIC]


def _topic(frame: dict[str, object], request_id: str | int | None) -> str:
    value = frame.get("topic")
    if not isinstance(value, str):
        raise EnvelopeError(
            "bad-frame", f'a {frame["type"]} frame needs "topic", a string', request_id
        )
    try:
        return topic_from_path("/" + value)
    except ValueError as exc:
        raise EnvelopeError("bad-topic", str(exc), request_id, quoted_topic(value)) from None


def parse_v2_frame(
    data: bytes, *, text: bool
) -> PublishRequest | SubscriptionFrame | RefreshRequest:
    """Parse one message a ``trio-relay.v2`` client sent.

    Returns a :class:`PublishRequest` (with its ``topic``), a parsed ``subscribe`` /
    ``unsubscribe`` frame, or a ``refresh`` (as in v1). Raises :class:`EnvelopeError`
    with code ``binary-frame``, ``not-json``, ``bad-frame``, ``unknown-type``,
    ``bad-topic``, ``bad-since``, ``bad-epoch`` or ``bad-payload``, carrying the frame's ``id`` and
    ``topic`` where they were readable.
    Fields a frame does not use are ignored.
    """
    frame, request_id = read_frame(data, text, SUBPROTOCOL_V2)
    kind = frame.get("type")
    if kind == "publish":
        topic = _topic(frame, request_id)
        try:
            return publish_request(frame, request_id, topic)
        except EnvelopeError as exc:
            exc.topic = topic
            raise
    if kind == "subscribe":
        topic = _topic(frame, request_id)
        since = frame.get("since")
        if since is not None and (
            not isinstance(since, int) or isinstance(since, bool) or not 0 <= since < _MAX_SINCE
        ):
            raise EnvelopeError(
                "bad-since",
                '"since" must be a sequence number (a whole number >= 0)',
                request_id,
                topic,
            )
        epoch = frame.get("epoch")
        if epoch is not None:
            try:
                if not isinstance(epoch, str) or since is None:
                    raise ValueError('"epoch" is the epoch of "since": a string, with "since"')
                check_epoch(epoch)
            except ValueError as exc:
                raise EnvelopeError("bad-epoch", str(exc), request_id, topic) from None
        return SubscriptionFrame("subscribe", topic, since, request_id, epoch)
    if kind == "refresh":
        return refresh_request(frame, request_id)
    if kind == "unsubscribe":
        return SubscriptionFrame("unsubscribe", _topic(frame, request_id), None, request_id)
    raise EnvelopeError(
        "unknown-type", f'unknown "type": {shown(repr(kind), MAX_ECHOED_TOPIC)}', request_id
    )


def encode_subscribed(topic: str, seq: int, request_id: str | int | None, epoch: str = "") -> bytes:
    """The JSON of a ``subscribed`` frame: the topic's epoch and last sequence number when
    the subscription was made (what v1's ``welcome`` says)."""
    frame: dict[str, object] = {"type": "subscribed", "topic": topic, "seq": seq}
    if epoch:
        frame["epoch"] = epoch
    if request_id is not None:
        frame["id"] = request_id
    return dump(frame)


def encode_unsubscribed(
    topic: str,
    request_id: str | int | None = None,
    code: str | None = None,
    detail: str | None = None,
) -> bytes:
    """The JSON of an ``unsubscribed`` frame: the answer to an ``unsubscribe`` (with its
    ``id``), or, with a ``code``, the relay ending that one subscription on its own."""
    frame: dict[str, object] = {"type": "unsubscribed", "topic": topic}
    if request_id is not None:
        frame["id"] = request_id
    if code is not None:
        frame["code"] = code
        frame["detail"] = detail or ""
    return dump(frame)
