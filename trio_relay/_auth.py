"""Who may connect and do what: signed tokens (JWT, HS256) naming topic patterns.

A token's claims: ``publish`` and ``subscribe``, lists of topic patterns matched segment
by segment (:func:`topic_matches`: ``news/*``, ``news/**``, ``**``), and ``exp``, its
expiry. Clients send it as ``Authorization: Bearer <token>`` or, from
browsers, which cannot set headers, as ``?token=<token>``.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass

import jwt

from ._redact import shown

__all__ = ["Grant", "TokenError", "mint_token", "topic_matches", "verify_token"]

ALGORITHM = "HS256"


class TokenError(Exception):
    """The token is missing, malformed, wrongly signed or expired (HTTP 401)."""


@dataclass(frozen=True)
class Grant:
    """What a verified token allows."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def may_publish(self, topic: str) -> bool:
        return any(topic_matches(pattern, topic) for pattern in self.publish)

    def may_subscribe(self, topic: str) -> bool:
        return any(topic_matches(pattern, topic) for pattern in self.subscribe)


OPEN = Grant(publish=("**",), subscribe=("**",))
"""What every client may do when the relay has no secret: anything."""


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
    if now is not None and claims["exp"] <= now:
        raise TokenError("the token has expired")
    publish, subscribe = claims.get("publish", []), claims.get("subscribe", [])
    if not _patterns(publish) or not _patterns(subscribe):
        raise TokenError('invalid token: "publish" and "subscribe" must be lists of strings')
    return Grant(tuple(publish), tuple(subscribe))


def _patterns(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)
