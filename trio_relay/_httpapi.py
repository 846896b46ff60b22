"""The HTTP API of the side port: ``POST /api/publish`` and ``GET /api/history`` (PROTOCOL.md,
"HTTP API"), for backends that publish without opening a WebSocket.

The decisions are plain functions of bytes and headers, tested without sockets: which route
(:func:`route`), who may do what (:func:`grant_for`), what a body or a query says
(:func:`parse_publish`, :func:`parse_history_query`), and what is answered
(:func:`report_document`, :func:`history_document`, :class:`ApiError`). :func:`answer` is
the trio shell the side port hands an ``/api/`` request to: it reads the body (bounded by
:func:`body_limit`), publishes through the relay's topics (so a message reaches raw and
envelope clients and goes through the backplane, like any publish), and writes the answer.

Tokens come only as ``Authorization: Bearer``: a ``?token=`` would land in the logs of
every proxy in front of this port, so it is not read here.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Literal
from urllib.parse import parse_qs, unquote

import h11
import trio

from ._auth import OPEN, Grant, TokenError, verify_token
from ._exceptions import TooManyTopicsError
from ._hooks import (
    Authorize,
    AuthRequest,
    HookFailed,
    OnPublish,
    Refusal,
    ask_authorize,
    filter_publications,
)
from ._idempotency import check_key
from ._listen import peer_name
from ._redact import shown
from ._topics import DeliveryReport, Gap, Message, check_epoch, topic_from_path

if TYPE_CHECKING:
    from ._view import RelayView, TopicsView

__all__ = [
    "ANSWER_TIME",
    "PUBLISH_TIMEOUT",
    "ApiError",
    "PublishItem",
    "answer",
    "body_limit",
    "grant_for",
    "history_document",
    "is_api_path",
    "parse_history_query",
    "parse_publish",
    "publish",
    "report_document",
    "route",
]

Headers = Sequence[tuple[bytes, bytes]]
Route = Literal["publish", "history"]

PUBLISH_PATH = b"/api/publish"
HISTORY_PATH = b"/api/history"
_ROUTES: dict[bytes, tuple[Route, tuple[bytes, ...]]] = {
    PUBLISH_PATH: ("publish", (b"POST",)),
    HISTORY_PATH: ("history", (b"GET", b"HEAD")),
}
_FIELDS = frozenset({"topic", "text", "binary", "idempotency_key"})
MAX_QUOTED = 128
"""Client text quoted in an error's detail is cut to this many characters."""

PUBLISH_TIMEOUT = 5.0
"""Seconds a publish may wait for room (``--overflow-policy block`` with a stalled
consumer, or a slow backplane) before the request answers 503 ``timeout``; never closer
than :data:`ANSWER_TIME` to the request's own deadline, so that the client hears why."""
ANSWER_TIME = 1.0
"""Seconds of the request's time kept for writing the answer after a publish times out."""
DRAIN_TIMEOUT = 2.0
DRAIN_LIMIT = 16 * 1024 * 1024
"""After answering without reading a body (a 413, a 401), read and discard at most this
many bytes for at most ``DRAIN_TIMEOUT`` seconds, so that closing the socket with unread
data (a TCP reset) does not destroy the answer before the client reads it."""


def body_limit(max_message_size: int) -> int:
    """The largest ``/api/publish`` body accepted, in bytes: one message of
    ``max_message_size`` bytes in base64 (4/3 of it), plus 64 KiB for the JSON around it."""
    return max_message_size * 4 // 3 + 64 * 1024


class ApiError(Exception):
    """A request the API refuses: HTTP :attr:`status`, and the JSON body
    ``{"error": {"code": ..., "detail": ...}}`` (with ``"index"``, the message's place in a
    list body, when one message of a list is at fault)."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        index: int | None = None,
        headers: Headers = (),
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.index = index
        self.headers = list(headers)

    def document(self) -> dict[str, object]:
        error: dict[str, object] = {"code": self.code, "detail": self.detail}
        if self.index is not None:
            error["index"] = self.index
        return {"error": error}


def _quote(text: str) -> str:
    """Client text for an error's detail, quoted: as :func:`~trio_relay._redact.shown`
    gives it (escaped, tokens redacted), cut to :data:`MAX_QUOTED` characters."""
    return f'"{shown(text, MAX_QUOTED)}"'


def is_api_path(path: bytes) -> bool:
    """Whether the side port hands a request for ``path`` (without its query) to the API."""
    return path == b"/api" or path.startswith(b"/api/")


def route(method: bytes, path: bytes) -> Route:
    """The API route of a request: :class:`ApiError` 404 for an unknown path, 405 (with an
    ``Allow`` header) for a method the route does not take."""
    found = _ROUTES.get(path)
    if found is None:
        raise ApiError(404, "not-found", "the API has POST /api/publish and GET /api/history")
    name, methods = found
    if method not in methods:
        allowed = ", ".join(m.decode() for m in methods)
        raise ApiError(
            405,
            "method-not-allowed",
            f"{path.decode()} takes {allowed}",
            headers=[(b"allow", allowed.encode())],
        )
    return name


def _header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def grant_for(secret: str | None, headers: Headers) -> Grant:
    """What the request may do: everything without a secret; with one, what the token of
    its ``Authorization: Bearer`` header allows, or :class:`ApiError` 401."""
    if secret is None:
        return OPEN
    authorization = (_header(headers, b"authorization") or b"").decode("latin-1")
    scheme, _, token = authorization.partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    challenge = [(b"www-authenticate", b'Bearer realm="trio-relay"')]
    if not token:
        raise ApiError(
            401,
            "unauthorized",
            "a token is required: Authorization: Bearer <token> (this port never reads ?token=)",
            headers=challenge,
        )
    try:
        return verify_token(secret, token)
    except TokenError as exc:
        raise ApiError(401, "unauthorized", str(exc), headers=challenge) from None


def check_content_type(headers: Headers) -> None:
    """A publish body must say it is JSON (``Content-Type: application/json``), or 415.

    Besides saying what the body is, this keeps browsers out: a page on another site can
    send a cross-site ``text/plain`` or form POST without asking, but not a JSON one."""
    value = _header(headers, b"content-type") or b""
    if value.split(b";", 1)[0].strip().lower() != b"application/json":
        raise ApiError(415, "bad-content-type", "send the body as Content-Type: application/json")


def declared_length(headers: Headers) -> int | None:
    """The ``Content-Length`` of a request (h11 has checked that it is a number), if any."""
    value = _header(headers, b"content-length")
    return int(value) if value is not None else None


@dataclass(frozen=True)
class PublishItem:
    """One message of a publish request: its topic and payload (UTF-8 bytes for text), and
    its idempotency key, if any."""

    topic: str
    payload: bytes
    text: bool
    key: str | None = None


def parse_publish(body: bytes, max_message_size: int) -> tuple[list[PublishItem], bool]:
    """The messages of an ``/api/publish`` body, and whether it was a list.

    The body is one message ``{"topic": "news", "text": "hello"}`` (or ``"binary"``:
    base64), or a JSON list of them. Raises :class:`ApiError`: 400 ``not-json``,
    ``bad-frame`` (not an object, an unknown field, ``topic`` missing or not a string),
    ``bad-topic`` (an invalid name), ``bad-payload`` (not exactly one of ``text`` and
    ``binary``, ``text`` not a string, ``binary`` not base64); 413 ``too-large`` (a payload
    over ``max_message_size`` bytes). Nothing of a list is valid unless all of it is.
    """
    try:
        document = json.loads(body)
    except ValueError:
        raise ApiError(400, "not-json", "the body is not valid JSON (UTF-8)") from None
    except RecursionError:
        raise ApiError(400, "not-json", "the body's JSON is nested too deeply") from None
    if isinstance(document, list):
        items = [
            _parse_message(message, max_message_size, index)
            for index, message in enumerate(document)
        ]
        return items, True
    return [_parse_message(document, max_message_size, None)], False


def _parse_message(message: object, max_message_size: int, index: int | None) -> PublishItem:
    where = "" if index is None else f"message {index}: "

    def fail(status: int, code: str, detail: str) -> ApiError:
        return ApiError(status, code, where + detail, index=index)

    if not isinstance(message, dict):
        raise fail(400, "bad-frame", 'a message is a JSON object {"topic": ..., "text": ...}')
    unknown = sorted(set(message) - _FIELDS)
    if unknown:
        raise fail(400, "bad-frame", f"unknown field {_quote(unknown[0])}")
    if "topic" not in message:
        raise fail(400, "bad-frame", '"topic" is required ("" is the root topic)')
    topic = message["topic"]
    if not isinstance(topic, str):
        raise fail(400, "bad-frame", '"topic" must be a string')
    try:
        if topic_from_path("/" + topic) != topic:
            raise ValueError("a topic name does not start with '/'")
    except ValueError as exc:
        raise fail(400, "bad-topic", f"topic {_quote(topic)}: {exc}") from None
    if ("text" in message) == ("binary" in message):
        raise fail(400, "bad-payload", 'a message has exactly one of "text" and "binary"')
    if "text" in message:
        if not isinstance(message["text"], str):
            raise fail(400, "bad-payload", '"text" must be a string')
        try:
            payload = message["text"].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            raise fail(400, "bad-payload", '"text" is not valid Unicode') from None
        text = True
    else:
        try:
            if not isinstance(message["binary"], str):
                raise TypeError
            payload = base64.b64decode(message["binary"], validate=True)
        except (TypeError, binascii.Error):
            raise fail(400, "bad-payload", '"binary" must be a base64 string') from None
        text = False
    key = None
    if message.get("idempotency_key") is not None:
        try:
            key = check_key(message["idempotency_key"])
        except ValueError as exc:
            raise fail(400, "bad-frame", f'"idempotency_key": {exc}') from None
    if len(payload) > max_message_size:
        raise fail(
            413,
            "too-large",
            f"the message is {len(payload)} bytes; the relay takes at most {max_message_size}",
        )
    return PublishItem(topic, payload, text, key)


def authorize_publish(grant: Grant, items: Iterable[PublishItem]) -> None:
    """Every topic of a publish must be allowed by the token, or 403 (nothing is published)."""
    for item in items:
        if not grant.may_publish(item.topic):
            raise ApiError(
                403, "forbidden", f"the token does not allow publishing to {_quote(item.topic)}"
            )


def parse_history_query(query: bytes) -> tuple[str, int | None]:
    """``topic`` and ``since`` of an ``/api/history`` query string (percent-encoded).

    Raises :class:`ApiError` 400 ``bad-topic`` (missing, repeated or invalid: ``topic=``
    is the root topic) or ``bad-since`` (not one whole number >= 0). Other parameters are
    ignored."""
    fields = parse_qs(query.decode("ascii", "replace"), keep_blank_values=True, errors="replace")
    topics = fields.get("topic", [])
    if len(topics) != 1:
        raise ApiError(400, "bad-topic", "give one topic: ?topic=news (topic= for the root)")
    topic = topics[0]
    try:
        if topic_from_path("/" + topic) != topic:
            raise ValueError("a topic name does not start with '/'")
    except ValueError as exc:
        raise ApiError(400, "bad-topic", f"topic {_quote(topic)}: {exc}") from None
    values = fields.get("since")
    if values is None:
        return topic, None
    if len(values) != 1 or not (values[0].isascii() and values[0].isdigit()) or len(values[0]) > 18:
        raise ApiError(400, "bad-since", "since must be one sequence number (a whole number >= 0)")
    return topic, int(values[0])


def report_document(report: DeliveryReport, offset: int = 0) -> dict[str, object]:
    """The answer for one published message: ``offset`` is its place in its batch (its
    number is ``report.seq + offset`` of ``report.epoch``; the counts are those of the
    batch)."""
    document: dict[str, object] = {"topic": report.topic, "seq": report.seq + offset}
    if report.epoch:
        document["epoch"] = report.epoch
    document.update(queued=report.queued, dropped=report.dropped, evicted=report.evicted)
    if report.remote is not None or report.backplane:
        document["remote"] = report.remote
    if report.duplicate:
        document["duplicate"] = True
    return document


def history_epoch(query: bytes, since: int | None) -> str | None:
    """The ``epoch`` of an ``/api/history`` query (that of ``since``), or None; raises
    :class:`ApiError` 400 ``bad-epoch`` for one that cannot be an epoch, is repeated, or
    comes without ``since``."""
    fields = parse_qs(query.decode("ascii", "replace"), keep_blank_values=True, errors="replace")
    values = fields.get("epoch")
    if values is None:
        return None
    try:
        if len(values) != 1 or since is None:
            raise ValueError("give one epoch, with since (the epoch of since)")
        return check_epoch(values[0])
    except ValueError as exc:
        raise ApiError(400, "bad-epoch", str(exc)) from None


def batches(items: Sequence[PublishItem]) -> list[tuple[str, list[int]]]:
    """How a publish request is sent: one batch per topic, in the order each topic first
    appears, with the indices of its messages in request order; a message with an
    idempotency key is a batch of its own (in its place among its topic's)."""
    plan: dict[str, list[list[int]]] = {}
    for index, item in enumerate(items):
        runs = plan.setdefault(item.topic, [])
        if item.key is None and runs and items[runs[-1][-1]].key is None:
            runs[-1].append(index)
        else:
            runs.append([index])
    return [(topic, run) for topic, runs in plan.items() for run in runs]


async def publish(topics: TopicsView, items: Sequence[PublishItem]) -> list[dict[str, object]]:
    """Publish ``items`` (see :func:`batches`) and return each one's report, in order.

    Raises :class:`ApiError` 503 ``timeout`` if it takes over :data:`PUBLISH_TIMEOUT`, or
    until :data:`ANSWER_TIME` before the caller's deadline (the side port's request
    timeout), whichever comes first: the batch being published then may have reached some
    subscribers (numbered and retained, as a cancelled publish is), and the batches after
    it were not published. Raises 503 ``too-many-topics`` for a new topic while the relay
    is at ``max_topics`` with every topic in use: that batch and the ones after it were
    not published."""
    results: list[dict[str, object]] = [{} for _ in items]
    now = trio.current_time()
    deadline = min(now + PUBLISH_TIMEOUT, trio.current_effective_deadline() - ANSWER_TIME)
    with trio.move_on_at(deadline):
        for topic, indices in batches(items):
            try:
                report = await topics.publish_batch(
                    topic,
                    [items[i].payload for i in indices],
                    [items[i].text for i in indices],
                    idempotency_key=items[indices[0]].key,
                )
            except TooManyTopicsError as exc:
                done = sum(1 for result in results if result)
                raise ApiError(
                    503,
                    "too-many-topics",
                    f"{exc}: {done} of {len(items)} messages published, the rest not",
                ) from None
            for offset, index in enumerate(indices):
                results[index] = report_document(report, offset)
        return results
    done = sum(1 for result in results if result)
    raise ApiError(
        503,
        "timeout",
        f"publishing did not finish within {deadline - now:g} s (a consumer is not taking "
        f"messages, or the backplane is slow): {done} of {len(items)} messages published, "
        "the next may have reached some subscribers",
    )


def history_document(
    topic: str, seq: int, gap: Gap | None, messages: Iterable[Message], epoch: str = ""
) -> dict[str, object]:
    """The answer of ``/api/history``: the topic's last number (of ``epoch``), the gap (if
    any) and the retained messages (``text``, or ``binary`` in base64)."""
    document: dict[str, object] = {"topic": topic, "seq": seq}
    if epoch:
        document["epoch"] = epoch
    if gap is not None:
        document["gap"] = {"since": gap.since, "first": gap.first, "reset": gap.reset}
    document["messages"] = [
        {"seq": message.seq, "text": message.data}
        if isinstance(message.data, str)
        else {"seq": message.seq, "binary": base64.b64encode(message.data).decode("ascii")}
        for message in messages
    ]
    return document


def encode(document: dict[str, object]) -> bytes:
    """A JSON answer body (UTF-8, one line)."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


# ---------------------------------------------------------------------------- the trio shell


async def answer(
    server: RelayView,
    request: h11.Request,
    connection: h11.Connection,
    stream: trio.abc.HalfCloseableStream,
) -> None:
    """Answer one ``/api/`` request whose head ``connection`` has read from ``stream``.

    Every answer is JSON, errors included. The caller bounds the whole request (body
    included) with its timeout; cancelled, it leaves the client without an answer."""
    try:
        status, document = await _respond(server, request, connection, stream)
        headers: list[tuple[bytes, bytes]] = []
    except ApiError as error:
        status, document, headers = error.status, error.document(), error.headers
    body = encode(document)
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"connection", b"close"),
        *headers,
    ]
    reason = HTTPStatus(status).phrase.encode()
    data = connection.send(h11.Response(status_code=status, headers=head, reason=reason)) or b""
    if request.method != b"HEAD":
        data += connection.send(h11.Data(data=body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
    if connection.their_state is h11.SEND_BODY:
        await _drain(stream)


async def _respond(
    server: RelayView,
    request: h11.Request,
    connection: h11.Connection,
    stream: trio.abc.HalfCloseableStream,
) -> tuple[int, dict[str, object]]:
    path, _, query = request.target.partition(b"?")
    name = route(request.method, path)
    peer = peer_name(stream)
    if server.authorize is None:
        grant = grant_for(server.config.auth_secret, request.headers)
    else:
        grant = await ask_hook(server.authorize, request, peer)
    if name == "history":
        topic, since = parse_history_query(query)
        if not grant.may_subscribe(topic):
            raise ApiError(
                403, "forbidden", f"the token does not allow subscribing to {_quote(topic)}"
            )
        epoch = history_epoch(query, since)
        try:
            seq, gap, messages = await server.topics.retained(topic, since, epoch)
        except TooManyTopicsError as exc:
            raise ApiError(503, "too-many-topics", str(exc)) from None
        # No checkpoint since: the position is the one the answer was read at.
        here = gap.epoch if gap is not None else server.topics.position(topic)[0]
        return 200, history_document(topic, seq, gap, messages, here)
    check_content_type(request.headers)
    max_message_size = server.config.max_message_size
    limit = body_limit(max_message_size)
    length = declared_length(request.headers)
    if length is not None and length > limit:
        raise _too_large(length, limit)
    body = await _read_body(connection, stream, limit)
    items, many = parse_publish(body, max_message_size)
    authorize_publish(grant, items)
    if server.on_publish is None:
        results = await publish(server.topics, items)
        return 200, {"results": results} if many else results[0]
    kept = await filter_items(server.on_publish, items, grant, peer, max_message_size)
    detail = "the relay's on_publish hook dropped the message"
    if not many and not kept:
        raise ApiError(422, "dropped", detail)
    published = iter(await publish(server.topics, [item for _, item in kept]))
    documents = [ApiError(422, "dropped", detail, index=i).document() for i in range(len(items))]
    for index, _ in kept:
        documents[index] = next(published)
    return 200, {"results": documents} if many else documents[0]


async def ask_hook(authorize: Authorize, request: h11.Request, peer: str) -> Grant:
    """What the ``authorize`` hook allows the request, or :class:`ApiError`: its refusal
    (``unauthorized`` for 401, ``forbidden`` for 403, else ``refused``), 500
    ``internal-error`` if it failed, 503 ``timeout`` if it did not answer until
    :data:`ANSWER_TIME` before the request's deadline."""
    path, _, query = request.target.partition(b"?")
    asked = AuthRequest(
        "http",
        unquote(path.decode("ascii", "replace")),
        query.decode("ascii", "replace"),
        tuple((name.lower(), value) for name, value in request.headers),
        peer,
    )
    with trio.move_on_at(trio.current_effective_deadline() - ANSWER_TIME):
        try:
            answer = await ask_authorize(authorize, asked)
        except HookFailed:
            raise ApiError(
                500, "internal-error", "the relay could not authorize this request"
            ) from None
        if isinstance(answer, Refusal):
            code = {401: "unauthorized", 403: "forbidden"}.get(answer.status, "refused")
            raise ApiError(answer.status, code, shown(answer.text, 512))
        return answer
    raise ApiError(503, "timeout", "authorization did not finish in time; try again later")


async def filter_items(
    on_publish: OnPublish,
    items: Sequence[PublishItem],
    grant: Grant,
    peer: str,
    max_message_size: int,
) -> list[tuple[int, PublishItem]]:
    """The messages of a request as the ``on_publish`` hook leaves them, each with its
    index in the request (those it dropped are missing); :class:`ApiError` 500
    ``internal-error`` if the hook failed: then nothing of the request is published."""
    try:
        payloads, texts, kept = await filter_publications(
            on_publish,
            [item.topic for item in items],
            [item.payload for item in items],
            [item.text for item in items],
            grant,
            peer,
            "http",
            max_message_size,
        )
    except HookFailed:
        raise ApiError(
            500, "internal-error", "the relay's on_publish hook failed: nothing was published"
        ) from None
    indices = range(len(items)) if kept is None else kept
    return [
        (index, PublishItem(items[index].topic, payload, text))
        for index, payload, text in zip(indices, payloads, texts, strict=True)
    ]


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413, "too-large", f"the body is {size} bytes or more; this relay takes at most {limit}"
    )


async def _read_body(connection: h11.Connection, stream: trio.abc.Stream, limit: int) -> bytes:
    """The request's body, at most ``limit`` bytes (else 413): with ``Content-Length`` or
    chunked (h11 decodes both). A client waiting for ``100 Continue`` gets it first."""
    if connection.they_are_waiting_for_100_continue:
        informational = h11.InformationalResponse(status_code=100, headers=[])
        await stream.send_all(connection.send(informational) or b"")
    parts: list[bytes] = []
    size = 0
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            # b"" at the end of the stream: h11 then raises RemoteProtocolError, which the
            # side port handles (the client went away in the middle of its body).
            connection.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                raise _too_large(size, limit)
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
        else:  # pragma: no cover - h11 yields nothing else before EndOfMessage
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in a body")


async def _drain(stream: trio.abc.HalfCloseableStream) -> None:
    """Read and discard what the client still sends (see :data:`DRAIN_LIMIT`), so that it
    reads the answer sent before its body ends; then the caller closes the connection."""
    await stream.send_eof()
    drained = 0
    with trio.move_on_after(DRAIN_TIMEOUT):
        while drained < DRAIN_LIMIT:
            data = await stream.receive_some(65536)
            if not data:
                return
            drained += len(data)
