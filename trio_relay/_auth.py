"""Who may connect and do what: signed tokens (JWT, HS256) naming topic patterns.

A token's claims: ``publish`` and ``subscribe``, lists of topic patterns (``fnmatch``
syntax: ``news/*``, ``*``; the root topic is ``""``, matched by ``*`` or ``""``), and
``exp``, its expiry. Clients send it as ``Authorization: Bearer <token>`` or, from
browsers, which cannot set headers, as ``?token=<token>``.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass

import jwt

__all__ = ["Grant", "TokenError", "mint_token", "verify_token"]

ALGORITHM = "HS256"


class TokenError(Exception):
    """The token is missing, malformed, wrongly signed or expired (HTTP 401)."""


@dataclass(frozen=True)
class Grant:
    """What a verified token allows."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def may_publish(self, topic: str) -> bool:
        return any(fnmatch.fnmatchcase(topic, pattern) for pattern in self.publish)

    def may_subscribe(self, topic: str) -> bool:
        return any(fnmatch.fnmatchcase(topic, pattern) for pattern in self.subscribe)


OPEN = Grant(publish=("*",), subscribe=("*",))
"""What every client may do when the relay has no secret: anything."""


def mint_token(
    secret: str,
    *,
    publish: tuple[str, ...] | list[str] = (),
    subscribe: tuple[str, ...] | list[str] = (),
    ttl: float = 3600.0,
    now: float | None = None,
) -> str:
    """A token for ``publish`` and ``subscribe`` topic patterns, valid ``ttl`` seconds."""
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
        raise TokenError(f"invalid token: {exc}") from None
    if now is not None and claims["exp"] <= now:
        raise TokenError("the token has expired")
    publish, subscribe = claims.get("publish", []), claims.get("subscribe", [])
    if not _patterns(publish) or not _patterns(subscribe):
        raise TokenError('invalid token: "publish" and "subscribe" must be lists of strings')
    return Grant(tuple(publish), tuple(subscribe))


def _patterns(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)
