"""Who may connect and do what: signed tokens (JWT, HS256) naming topic patterns.

A token's claims: ``publish`` and ``subscribe``, lists of topic patterns matched segment
by segment (:func:`topic_matches`: ``news/*``, ``news/**``, ``**``), and ``exp``, its
expiry. Clients send it as ``Authorization: Bearer <token>`` or, from
browsers, which cannot set headers, as ``?token=<token>``.

A connection lives no longer than its token: :class:`Expiries` holds the open connections
by the second their token expires in, for the server's one timer to close them (4401), and
an envelope client may send a new token (a ``refresh`` frame) before then.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

import jwt

from ._exceptions import RelayError
from ._redact import shown

__all__ = ["Expiries", "Grant", "TokenError", "mint_token", "topic_matches", "verify_token"]

ALGORITHM = "HS256"


class TokenError(RelayError):
    """The token is missing, malformed, wrongly signed or expired (HTTP 401): what
    :func:`verify_token` raises."""


@dataclass(frozen=True)
class Grant:
    """What a client may do, and until when: what a verified token allows, or what an
    ``authorize`` hook (see :func:`~trio_relay.serve_relay`) answers, say
    ``Grant(publish=("chat/*",), subscribe=("**",), expires=time.time() + 3600)``.

    ``publish`` and ``subscribe`` are topic patterns (:func:`topic_matches`). A hook's
    grant may be a subclass: one that overrides :meth:`may_publish` and
    :meth:`may_subscribe` (for rules patterns cannot say), or that carries the
    application's own fields (who the user is), which ``on_publish`` then sees."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    expires: float | None = None
    """The token's ``exp``: seconds since the epoch (the wall clock); None: never."""

    def seconds_left(self, wall_now: float | None = None) -> float:
        """Seconds until the token expires (negative once it has), ``inf`` for never;
        ``wall_now`` defaults to ``time.time()``."""
        if self.expires is None:
            return math.inf
        return self.expires - (time.time() if wall_now is None else wall_now)

    def may_publish(self, topic: str) -> bool:
        """Whether the client may publish to ``topic``."""
        return any(topic_matches(pattern, topic) for pattern in self.publish)

    def may_subscribe(self, topic: str) -> bool:
        """Whether the client may subscribe to (read) ``topic``."""
        return any(topic_matches(pattern, topic) for pattern in self.subscribe)


OPEN = Grant(publish=("**",), subscribe=("**",))
"""What every client may do when the relay has no secret: anything."""
NOBODY = Grant(publish=(), subscribe=())
"""What a client may do before it is authorized: nothing."""


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether a token's topic ``pattern`` covers ``topic``, segment by segment.

    Both are split at ``/``; each pattern segment matches one topic segment, with
    ``fnmatch`` wildcards inside it (``*`` any characters, ``?`` one, ``[ab]`` a set), never
    across a ``/``. A segment that is exactly ``**`` matches any number of segments, none
    included. So ``news/*`` covers ``news/sport`` but not ``news/sport/live`` nor ``news``;
    ``news/**`` covers ``news``, ``news/sport`` and ``news/sport/live``; ``**`` covers every
    topic. The root topic ``""`` is one empty segment: ``""``, ``*`` and ``**`` cover it.
    Segment-wise, so ``*`` can never reach into a deeper level (``fnmatch`` on the whole
    name would let ``news/*`` cover ``news/a/b``).
    """
    segments = topic.split("/")
    # reached[i]: the pattern's segments so far match the topic's first i segments. The
    # table keeps the time linear in the segments of both, however many "**" there are.
    reached = [True] + [False] * len(segments)
    for part in pattern.split("/"):
        if part == "**":
            for i in range(1, len(reached)):
                reached[i] = reached[i] or reached[i - 1]
        else:
            reached = [False] + [
                reached[i] and fnmatch.fnmatchcase(segment, part)
                for i, segment in enumerate(segments)
            ]
    return reached[-1]


def mint_token(
    secret: str,
    *,
    publish: tuple[str, ...] | list[str] = (),
    subscribe: tuple[str, ...] | list[str] = (),
    ttl: float = 3600.0,
    now: float | None = None,
) -> str:
    """A token (an HS256 JWT signed with the relay's ``secret``) allowing the ``publish``
    and ``subscribe`` topic patterns (matched segment by segment: ``news/*``, ``news/**``,
    ``**``; see :func:`topic_matches`), valid ``ttl`` seconds from ``now`` (default: the
    wall clock).

    What ``trio-relay token`` prints; for a backend that hands tokens to its clients::

        token = trio_relay.mint_token(secret, subscribe=["news/*"], ttl=600)
    """
    issued = time.time() if now is None else now
    claims = {
        "publish": list(publish),
        "subscribe": list(subscribe),
        "iat": int(issued),
        "exp": int(issued + ttl),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str | None, *, now: float | None = None) -> Grant:
    """The grant of a valid token; :class:`TokenError` saying why otherwise."""
    if not token:
        raise TokenError("a token is required: Authorization: Bearer <token>, or ?token=")
    # PyJWT checks "exp" against the wall clock; a caller passing `now` checks it here.
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp"], "verify_iat": False, "verify_exp": now is None},
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("the token has expired") from None
    except jwt.InvalidTokenError as exc:
        # PyJWT's messages quote the token's header ("Unsupported critical extension: ...").
        raise TokenError(f"invalid token: {shown(exc, 200)}") from None
    expires = claims["exp"]
    # PyJWT takes int(exp), so it lets the string "123" pass: a NumericDate is a number.
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        raise TokenError('invalid token: "exp" must be a number')
    if now is not None and expires <= now:
        raise TokenError("the token has expired")
    publish, subscribe = claims.get("publish", []), claims.get("subscribe", [])
    if not _patterns(publish) or not _patterns(subscribe):
        raise TokenError('invalid token: "publish" and "subscribe" must be lists of strings')
    return Grant(tuple(publish), tuple(subscribe), float(expires))


def _patterns(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


T = TypeVar("T", bound=Hashable)


class Expiries(Generic[T]):
    """Items (the server's connections) by the time their token expires, for one timer to
    find those that are due without looking at the others.

    A wheel of one-second slots: :meth:`schedule` and :meth:`discard` cost O(1), and
    :meth:`pop_due` costs O(1 + seconds since its last call + items due), whatever the
    number of items. Times are those of the caller's clock (``trio.current_time()``).
    """

    __slots__ = ("_done", "_entries", "_slots")

    def __init__(self) -> None:
        self._slots: dict[int, set[T]] = {}
        self._entries: dict[T, tuple[float, int]] = {}  # item: (deadline, its slot)
        # Every slot before this second was emptied by pop_due (None: it never ran).
        self._done: int | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def schedule(self, item: T, deadline: float) -> None:
        """Make ``item`` due at ``deadline`` (replacing any earlier schedule); an infinite
        deadline just discards it."""
        self.discard(item)
        if math.isinf(deadline):
            return
        second = math.floor(deadline)
        if self._done is not None and second < self._done:
            second = self._done  # already past: the next pop_due finds it
        self._entries[item] = (deadline, second)
        self._slots.setdefault(second, set()).add(item)

    def discard(self, item: T) -> None:
        """Forget ``item`` (a connection that closed), if it was scheduled."""
        entry = self._entries.pop(item, None)
        if entry is not None:
            slot = self._slots[entry[1]]
            slot.discard(item)
            if not slot:
                del self._slots[entry[1]]

    def pop_due(self, now: float) -> list[T]:
        """The items whose deadline is ``now`` or earlier, forgotten as they are returned."""
        last = math.floor(now)
        seconds: Iterable[int]
        if self._done is None or last - self._done >= len(self._slots):
            seconds = sorted(second for second in self._slots if second <= last)
        else:
            seconds = range(self._done, last + 1)
        due: list[T] = []
        for second in seconds:
            slot = self._slots.pop(second, None)
            if slot is None:
                continue
            if second == last:  # the current second: some of it may still be ahead
                later = {item for item in slot if self._entries[item][0] > now}
                if later:
                    self._slots[second] = later
                    slot -= later
            for item in slot:
                del self._entries[item]
            due += slot
        # The current second stays open: what is scheduled in it later is still found.
        self._done = last if self._done is None else max(self._done, last)
        return due
