"""Embedding hooks: an application's own say on who connects (``authorize``) and on what
is published (``on_publish``), given to :func:`~trio_relay.serve_relay`.

``authorize`` replaces the relay's token check: it gets an :class:`AuthRequest` (the
path, headers and peer of a WebSocket handshake, or of an HTTP API request) and returns a
:class:`~trio_relay.Grant` (the topic patterns the client may publish and subscribe to,
and when that ends) or a :class:`Refusal` (an HTTP status and a reason). It is a
coroutine function, so that it may look a session up in a database: it runs in the
connection's own task, bounded by ``handshake_timeout``.

``on_publish`` gets each client message as a :class:`Publication` and returns what is
published instead (the same data, another ``str`` or ``bytes``) or ``None`` to drop it.

This module holds the public types and the two helpers that call the hooks and contain
their failures (:func:`ask_authorize`, :func:`filter_publications`); the connection and
the HTTP API decide what a failure means for their client.
"""

from __future__ import annotations

import contextlib
import functools
import http
import http.cookies
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple
from urllib.parse import parse_qs

from ._auth import Grant
from ._redact import shown

__all__ = [
    "AuthRequest",
    "Authorize",
    "HookFailed",
    "OnPublish",
    "Publication",
    "Refusal",
    "ask_authorize",
    "filter_publications",
]

logger = logging.getLogger("trio_relay")


@dataclass(frozen=True, repr=False)
class AuthRequest:
    """What ``authorize`` is asked about: one WebSocket handshake (``kind="websocket"``)
    or one request to the HTTP API (``kind="http"``: ``/api/publish``, ``/api/history``).

    Its ``repr`` shows the kind, path and peer only: the headers and query may hold
    credentials (cookies, tokens)."""

    kind: Literal["websocket", "http"]
    path: str
    """The request's path, percent-decoded (``"/news"``; ``"/api/publish"``)."""
    query: str
    """The query string, as sent (without the ``?``)."""
    headers: tuple[tuple[bytes, bytes], ...]
    """The request's headers as ``(name, value)`` byte pairs, names in lower case (as ASGI
    gives them). For a WebSocket: ``host`` first, ``sec-websocket-protocol`` if sent, then
    the others in the order sent (all but ``sec-websocket-extensions``)."""
    peer: str
    """The client's address, ``host:port`` (``[v6]:port``), or a tag such as
    ``"in-memory"`` for streams that are not sockets."""
    topic: str | None = None
    """The topic a WebSocket's path names (``""``: the root); None for the HTTP API and
    for a ``trio-relay.v2`` connection to ``/`` (their topics come later, in the body, the
    query or by frame: the grant is checked against each)."""

    def __repr__(self) -> str:
        return f"<AuthRequest {self.kind} {shown(self.path, 128)!r} from {self.peer}>"

    @property
    def host(self) -> str:
        """The client's host, without its port (``"[::1]:5"`` gives ``"::1"``)."""
        return self.peer.rpartition(":")[0].strip("[]") or self.peer

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), decoded as Latin-1; the first of them
        if it was sent more than once; None if absent."""
        key = name.lower().encode("latin-1")
        for header, value in self.headers:
            if header == key:
                return value.decode("latin-1")
        return None

    def cookie(self, name: str) -> str | None:
        """The value of cookie ``name`` from the ``Cookie`` header (a browser sends its
        cookies for the relay's host with the WebSocket handshake), or None."""
        return self._cookies.get(name)

    @functools.cached_property
    def _cookies(self) -> dict[str, str]:
        jar = http.cookies.SimpleCookie()
        with contextlib.suppress(http.cookies.CookieError):  # malformed: no cookies
            jar.load(self.header("cookie") or "")
        return {key: morsel.value for key, morsel in jar.items()}

    @property
    def token(self) -> str | None:
        """The token the client sent, as the relay would read it: ``Authorization: Bearer``,
        or (WebSocket only: browsers cannot set headers there) the ``token`` query
        parameter; None if neither. For a hook that also takes the relay's tokens
        (``trio_relay.verify_token(secret, request.token)``)."""
        scheme, _, value = (self.header("authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        if self.kind == "websocket":
            values = parse_qs(self.query).get("token")
            if values and values[0]:
                return values[0]
        return None


@dataclass(frozen=True)
class Refusal:
    """``authorize``'s "no": the client gets HTTP :attr:`status` (400 to 599) and
    :attr:`reason` (its standard phrase when empty) in the body, as the relay shows client
    text (escaped, tokens redacted, cut to 512 characters). The reason reaches the client
    and the relay's log: put no secret in it."""

    status: int = 403
    reason: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.status, int) or not 400 <= self.status <= 599:
            raise ValueError(f"a refusal's status is 400 to 599, not {self.status!r}")

    @property
    def text(self) -> str:
        """The reason, or the status's standard phrase if there is none."""
        if self.reason:
            return self.reason
        try:
            return http.HTTPStatus(self.status).phrase
        except ValueError:
            return "refused"


class Publication(NamedTuple):
    """One message a client publishes, as ``on_publish`` sees it (immutable; a named
    tuple, not a frozen dataclass: it is made for every message, and this is the cheaper
    of the two by half a microsecond)."""

    topic: str
    data: str | bytes
    """The message: ``str`` for a text message, ``bytes`` for a binary one."""
    grant: Grant
    """What the publisher may do: from its token, from ``authorize``, or everything
    (:data:`~trio_relay.Grant` with ``**``) on a relay that checks neither. A subclass of
    Grant returned by ``authorize`` comes back here as it was, identity fields and all."""
    peer: str
    """The publisher's address (``host:port``)."""
    kind: Literal["websocket", "http"]
    """Where it came from: a WebSocket client (raw or envelope) or the HTTP API."""


Authorize = Callable[[AuthRequest], Awaitable[Grant | Refusal]]
"""``async def authorize(request: AuthRequest) -> Grant | Refusal``."""
OnPublish = Callable[[Publication], Awaitable[str | bytes | None]]
"""``async def on_publish(message: Publication) -> str | bytes | None``."""


class HookFailed(Exception):
    """A hook raised, or returned something it may not (logged where it happened)."""


async def ask_authorize(authorize: Authorize, request: AuthRequest) -> Grant | Refusal:
    """What ``authorize`` answers; :class:`HookFailed` (the traceback logged) if it raised
    or answered neither a Grant nor a Refusal. Cancellation passes through."""
    try:
        answer = await authorize(request)
    except Exception:
        logger.exception("the authorize hook failed on %r", request)
        raise HookFailed("authorize raised") from None
    if not isinstance(answer, Grant | Refusal):
        logger.error(
            "the authorize hook returned %s for %r: a Grant or a Refusal is needed",
            shown(type(answer).__name__, 64),
            request,
        )
        raise HookFailed("authorize answered neither a Grant nor a Refusal")
    return answer


async def filter_publications(
    on_publish: OnPublish,
    topic: str | Sequence[str],
    payloads: list[bytes],
    texts: list[bool],
    grant: Grant,
    peer: str,
    kind: Literal["websocket", "http"],
    max_message_size: int,
) -> tuple[list[bytes], list[bool], list[int] | None]:
    """Run ``on_publish`` on each message (in order; ``topic`` is the topic of all of
    them, or one per message) and return what is to be published: the payloads and their
    text flags, and the indices (in ``payloads``) of the messages kept, or None when every
    one was kept.

    A hook that returns the message it was given costs no copy. Raises
    :class:`HookFailed` (the traceback logged) if the hook raises, returns something that
    is neither ``str``, ``bytes`` nor None, or a message over ``max_message_size`` bytes:
    then nothing of the batch is to be published."""
    kept_payloads: list[bytes] = []
    kept_texts: list[bool] = []
    kept: list[int] = []
    one_topic = topic if isinstance(topic, str) else None
    for index, payload in enumerate(payloads):
        text = texts[index]
        name = one_topic if one_topic is not None else topic[index]
        data: str | bytes = payload.decode("utf-8") if text else payload
        try:
            result = await on_publish(Publication(name, data, grant, peer, kind))
        except Exception:
            logger.exception(
                "the on_publish hook failed on a message from %s to topic %r",
                peer,
                shown(name, 128),
            )
            raise HookFailed("on_publish raised") from None
        if result is data:  # unchanged (the usual case): the bytes as received
            kept_payloads.append(payload)
            kept_texts.append(text)
            kept.append(index)
        elif result is not None:
            converted = _converted(result, name, max_message_size)
            kept_payloads.append(converted)
            kept_texts.append(isinstance(result, str))
            kept.append(index)
    return kept_payloads, kept_texts, None if len(kept) == len(payloads) else kept


def _converted(result: object, topic: str, max_message_size: int) -> bytes:
    """The payload of what ``on_publish`` returned in place of a message; :class:`HookFailed`
    (logged) for anything but ``str`` or ``bytes``, or a message over the size limit."""
    if isinstance(result, str):
        payload = result.encode("utf-8")
    elif isinstance(result, bytes | bytearray | memoryview):
        payload = bytes(result)
    else:
        logger.error(
            "the on_publish hook returned %s for a message to topic %r: str, bytes or None "
            "is needed",
            shown(type(result).__name__, 64),
            shown(topic, 128),
        )
        raise HookFailed("on_publish returned neither str, bytes nor None")
    if len(payload) > max_message_size:
        logger.error(
            "the on_publish hook returned %d bytes for a message to topic %r, over "
            "max_message_size (%d)",
            len(payload),
            shown(topic, 128),
            max_message_size,
        )
        raise HookFailed("on_publish returned a message over max_message_size")
    return payload
