"""Sans-IO codec of the ``trio-relay.v1`` envelope protocol (see PROTOCOL.md).

Clients that negotiate the subprotocol exchange JSON text frames with the relay. This module
turns client frames into :class:`PublishRequest` and :class:`RefreshRequest` values (or
:class:`EnvelopeError`) and builds the relay's frames; it never touches a stream.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

from ._idempotency import check_key
from ._redact import shown

__all__ = [
    "MAX_ECHOED",
    "MESSAGE_FRAME_OVERHEAD",
    "SUBPROTOCOL",
    "EnvelopeError",
    "PublishRequest",
    "RefreshRequest",
    "clip",
    "dump",
    "encode_ack",
    "encode_error",
    "encode_gap",
    "encode_message",
    "encode_refreshed",
    "encode_welcome",
    "max_message_frame",
    "parse_client_frame",
    "publish_request",
    "read_frame",
    "refresh_request",
    "request_id_of",
]

SUBPROTOCOL = "trio-relay.v1"
"""The WebSocket subprotocol a client asks for to speak the envelope protocol."""

MAX_ID_LENGTH = 128
MAX_ECHOED = 128
"""Most characters of a client's value that an error frame quotes back; the rest is cut."""


def clip(value: object) -> str:
    """``repr(value)`` as :func:`~trio_relay._redact.shown` gives it, at most
    :data:`MAX_ECHOED` characters (the rest cut, with a note of the length): error frames
    quote what the client sent, but never amplify it (a 100 KB topic, say)."""
    return shown(repr(value), MAX_ECHOED)


@dataclass(frozen=True)
class PublishRequest:
    """A client's ``publish`` frame: the payload, whether it is text, its id, and echo;
    ``topic`` is the topic it names (``trio-relay.v2``; None in v1, where the connection's
    path names it); ``key`` its idempotency key, if any."""

    payload: bytes
    text: bool
    id: str | int | None = None
    echo: bool = True
    topic: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class RefreshRequest:
    """A client's ``refresh`` frame: a new token for the connection, and the frame's id."""

    token: str = field(repr=False)
    id: str | int | None = None


class EnvelopeError(Exception):
    """A client frame that is not valid ``trio-relay.v1`` (or ``v2``); :attr:`code` names the
    error; :attr:`request_id` and :attr:`topic` are the frame's, where readable (``topic``:
    v2 only, as its error frame quotes it)."""

    def __init__(
        self,
        code: str,
        detail: str,
        request_id: str | int | None = None,
        topic: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.request_id = request_id
        self.topic = topic


def parse_client_frame(data: bytes, *, text: bool, topic: str) -> PublishRequest | RefreshRequest:
    """Parse one message a client sent over ``trio-relay.v1``.

    Raises :class:`EnvelopeError` with code ``not-json``, ``binary-frame``, ``bad-frame``,
    ``unknown-type``, ``bad-payload`` or ``wrong-topic``.
    """
    frame, request_id = read_frame(data, text, SUBPROTOCOL)
    kind = frame.get("type")
    if kind == "refresh":
        return refresh_request(frame, request_id)
    if kind != "publish":
        raise EnvelopeError("unknown-type", f'unknown "type": {clip(kind)}', request_id)
    if "topic" in frame and frame["topic"] != topic:
        raise EnvelopeError(
            "wrong-topic",
            f"this connection publishes to topic {clip(topic)}, not {clip(frame['topic'])}",
            request_id,
        )
    return publish_request(frame, request_id)


def read_frame(
    data: bytes, text: bool, subprotocol: str
) -> tuple[dict[str, object], str | int | None]:
    """The JSON object a client's frame holds (``trio-relay.v1`` or ``v2``), and its ``id``.

    Raises :class:`EnvelopeError` ``binary-frame`` (not a text frame), ``not-json``
    (not JSON, or nested too deeply for the parser) or ``bad-frame`` (not an object, or a
    bad ``id``)."""
    if not text:
        raise EnvelopeError(
            "binary-frame", f'{subprotocol} uses JSON text frames: send {{"binary": "<base64>"}}'
        )
    try:
        frame = json.loads(data)
    except ValueError:
        raise EnvelopeError("not-json", "the frame is not valid JSON") from None
    except RecursionError:
        raise EnvelopeError("not-json", "the frame's JSON is nested too deeply") from None
    if not isinstance(frame, dict):
        raise EnvelopeError("bad-frame", "the frame must be a JSON object")
    return frame, request_id_of(frame)


def refresh_request(frame: dict[str, object], request_id: str | int | None) -> RefreshRequest:
    """A ``refresh`` frame's new token (v1 and v2 alike); raises :class:`EnvelopeError`
    ``bad-frame`` without a non-empty string ``token``."""
    token = frame.get("token")
    if not isinstance(token, str) or not token:
        raise EnvelopeError("bad-frame", '"token" must be a non-empty string', request_id)
    return RefreshRequest(token, request_id)


def request_id_of(frame: dict[str, object]) -> str | int | None:
    """A client frame's ``id``: a string of at most 128 characters or a 64-bit integer,
    or None; anything else raises :class:`EnvelopeError` ``bad-frame``."""
    request_id = frame.get("id")
    if request_id is None or (isinstance(request_id, str) and len(request_id) <= MAX_ID_LENGTH):
        return request_id
    if (
        isinstance(request_id, int)
        and not isinstance(request_id, bool)
        and -(2**63) <= request_id < 2**63
    ):
        return request_id
    raise EnvelopeError(
        "bad-frame", f'"id" must be a string of at most {MAX_ID_LENGTH} characters or an integer'
    )


def publish_request(
    frame: dict[str, object], request_id: str | int | None, topic: str | None = None
) -> PublishRequest:
    """The payload and ``echo`` of a ``publish`` frame (v1 or v2): exactly one of ``text``
    (a string) and ``binary`` (base64), and an optional ``idempotency_key``. Raises
    :class:`EnvelopeError` ``bad-frame`` or ``bad-payload``."""
    echo = frame.get("echo", True)
    if not isinstance(echo, bool):
        raise EnvelopeError("bad-frame", '"echo" must be true or false', request_id)
    key = None
    if frame.get("idempotency_key") is not None:
        try:
            key = check_key(frame["idempotency_key"])
        except ValueError as exc:
            raise EnvelopeError("bad-frame", f'"idempotency_key": {exc}', request_id) from None
    has_text, has_binary = "text" in frame, "binary" in frame
    if has_text == has_binary:
        raise EnvelopeError(
            "bad-payload", 'a publish frame has exactly one of "text" and "binary"', request_id
        )
    if has_text:
        text = frame["text"]
        if not isinstance(text, str):
            raise EnvelopeError("bad-payload", '"text" must be a string', request_id)
        try:
            encoded = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            raise EnvelopeError("bad-payload", '"text" is not valid Unicode', request_id) from None
        return PublishRequest(encoded, True, request_id, echo, topic, key)
    value = frame["binary"]
    try:
        if not isinstance(value, str):
            raise TypeError
        payload = base64.b64decode(value, validate=True)
    except (TypeError, ValueError):  # binascii.Error, and ValueError for non-ASCII text
        raise EnvelopeError("bad-payload", '"binary" must be base64', request_id) from None
    return PublishRequest(payload, False, request_id, echo, topic, key)


def dump(frame: dict[str, object]) -> bytes:
    """A relay frame's JSON as UTF-8 bytes, compact (what every ``encode_*`` returns)."""
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


_dump = dump


def encode_message(topic: str, seq: int, payload: bytes, *, text: bool, epoch: str = "") -> bytes:
    """The JSON of a ``message`` frame (UTF-8 bytes, to be sent as a text frame); at most
    :func:`max_message_frame` of ``len(payload)`` bytes. ``epoch``: of ``seq`` (the relay
    always has one; left out when empty)."""
    frame: dict[str, object] = {"type": "message", "topic": topic, "seq": seq}
    if epoch:
        frame["epoch"] = epoch
    if text:
        frame["text"] = payload.decode()
    else:
        frame["binary"] = base64.b64encode(payload).decode("ascii")
    return _dump(frame)


def encode_ack(
    topic: str,
    seq: int,
    request_id: str | int | None,
    queued: int,
    dropped: int,
    evicted: int,
    remote: bool | None = None,
    epoch: str = "",
    backplane: bool = False,
    duplicate: bool = False,
) -> bytes:
    """The JSON of an ``ack`` frame: the delivery report of one publish. ``remote`` (only
    with a ``backplane``): whether the message reached the other relays (``null``:
    unknown). ``epoch``: of ``seq``. ``duplicate``: the publish's idempotency key was
    used already; ``seq`` names that first one, and nothing was published again."""
    frame: dict[str, object] = {"type": "ack", "topic": topic, "seq": seq}
    if epoch:
        frame["epoch"] = epoch
    if request_id is not None:
        frame["id"] = request_id
    frame.update(queued=queued, dropped=dropped, evicted=evicted)
    if remote is not None or backplane:
        frame["remote"] = remote
    if duplicate:
        frame["duplicate"] = True
    return _dump(frame)


def encode_welcome(topic: str, seq: int, epoch: str = "") -> bytes:
    """The JSON of a ``welcome`` frame: the topic's epoch and last sequence number at
    subscription."""
    frame: dict[str, object] = {"type": "welcome", "topic": topic, "seq": seq}
    if epoch:
        frame["epoch"] = epoch
    return _dump(frame)


def encode_gap(topic: str, since: int, first: int, epoch: str = "", reset: bool = False) -> bytes:
    """The JSON of a ``gap`` frame: messages ``since + 1`` to ``first - 1`` are missing;
    or, with ``reset``, the topic's numbering changed (``since`` was of another epoch, or
    beyond it). What follows starts at ``first`` of ``epoch``."""
    frame: dict[str, object] = {"type": "gap", "topic": topic, "since": since, "first": first}
    if epoch:
        frame["epoch"] = epoch
    frame["reset"] = reset or first <= since
    return _dump(frame)


def encode_refreshed(request_id: str | int | None, expires: float | None) -> bytes:
    """The JSON of a ``refreshed`` frame: the answer to a valid ``refresh``, with the new
    token's ``exp`` (None where the relay needs no token: the connection never expires)."""
    frame: dict[str, object] = {"type": "refreshed"}
    if request_id is not None:
        frame["id"] = request_id
    frame["exp"] = int(expires) if expires is not None and expires.is_integer() else expires
    return _dump(frame)


def encode_error(
    code: str, detail: str, request_id: str | int | None = None, topic: str | None = None
) -> bytes:
    """The JSON of an ``error`` frame (``topic``: v2, when the request named one)."""
    frame: dict[str, object] = {"type": "error", "code": code, "detail": detail}
    if request_id is not None:
        frame["id"] = request_id
    if topic is not None:
        frame["topic"] = topic
    return _dump(frame)


MESSAGE_FRAME_OVERHEAD = len(encode_message("t" * 200, 2**63 - 1, b"", text=False, epoch="e" * 32))
"""Bytes of a ``message`` frame's JSON around its payload, at most: a topic of 200
characters (names are ASCII: nothing in them is escaped), a 19-digit sequence number and
an epoch of 32 characters (relays make 8)."""


def max_message_frame(max_payload: int) -> int:
    """The largest ``message`` frame (its JSON, in bytes, which is also the most characters)
    the relay sends for a payload of at most ``max_payload`` bytes.

    The worst case is text of control characters: JSON escapes each of U+0000 to U+001F
    (but for ``\\n``, ``\\t`` and three more) as ``\\u00XX``, 6 bytes for 1. Other
    characters cost at most 2 bytes per byte (``\\"`` and ``\\\\``; the relay sends
    UTF-8, not ``\\u`` escapes), and binary payloads 4 per 3 (base64).
    """
    return 6 * max_payload + MESSAGE_FRAME_OVERHEAD
