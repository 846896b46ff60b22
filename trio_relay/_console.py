"""The browser console on the HTTP side port: the page (``GET /``, with its script and style
sheet from ``trio_relay/console/``) and ``GET /stats``, the relay's figures as JSON, which
the page's live panel reads and which tells the page where the relay's WebSocket port is.

The page is plain HTML, JavaScript and CSS, shipped in the package: no build step, no
third-party code. It is served with a Content-Security-Policy that allows only its own
script and style sheet, ``fetch`` to this port, and WebSocket connections (to the relay's
port, which differs from this one).

The same folder holds ``trio-relay.js``, the JavaScript client (an ES module) the console
uses, served at ``GET /trio-relay.js`` for applications too: with
``Access-Control-Allow-Origin: *``, because a page of another origin can import a module
only with CORS. It is a public file, sent without credentials, so any origin may read it.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ._view import RelayView

__all__ = ["CLIENT_PATH", "CONTENT_SECURITY_POLICY", "answer", "relay_stats"]

CLIENT_PATH = "/trio-relay.js"
"""Where the side port serves the JavaScript client."""

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

Headers = list[tuple[bytes, bytes]]

_PAGE_HEADERS: Headers = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]

_CLIENT_HEADERS: Headers = [
    (b"access-control-allow-origin", b"*"),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-cache"),
]

_JAVASCRIPT = b"text/javascript; charset=utf-8"
_ASSETS = {
    b"/": ("index.html", b"text/html; charset=utf-8", _PAGE_HEADERS),
    b"/index.html": ("index.html", b"text/html; charset=utf-8", _PAGE_HEADERS),
    b"/console.js": ("console.js", _JAVASCRIPT, _PAGE_HEADERS),
    b"/console.css": ("console.css", b"text/css; charset=utf-8", _PAGE_HEADERS),
    CLIENT_PATH.encode(): ("trio-relay.js", _JAVASCRIPT, _CLIENT_HEADERS),
}


@functools.cache
def _asset(name: str) -> bytes:
    return (resources.files("trio_relay") / "console" / name).read_bytes()


def relay_stats(server: RelayView) -> dict[str, object]:
    """The figures ``GET /stats`` answers: lifetime counters, current gauges, and where and
    how to connect (the relay's ports, whether it speaks TLS, whether it needs a token)."""
    counters = server.counters
    statistics = server.statistics()
    totals = statistics.totals  # running totals: this costs the same at any number of topics
    return {
        "connections": statistics.connections,
        "topics": statistics.topic_count,
        "subscribers": statistics.subscribers,
        "messages_in": counters.messages_in,
        "messages_out": counters.messages_out,
        "bytes_in": counters.bytes_in,
        "bytes_out": counters.bytes_out,
        "published": totals.published,
        "dropped": totals.dropped,
        "evicted": totals.evicted,
        "rejected": dict(sorted(counters.rejections.items())),
        "ports": list(server.ports),
        "tls": any(isinstance(listener, trio.SSLListener) for listener in server.listeners),
        "auth": server.config.auth_secret is not None,
        "backplane": None
        if server.backplane is None
        else ("up" if server.backplane.up else "down"),
    }


def answer(server: RelayView, path: bytes) -> tuple[bytes, bytes, Headers] | None:
    """``(content type, body, extra headers)`` for a console path, ``None`` for others."""
    if path == b"/stats":
        body = json.dumps(relay_stats(server)).encode() + b"\n"
        return b"application/json", body, [(b"cache-control", b"no-store")]
    asset = _ASSETS.get(path)
    if asset is None:
        return None
    name, kind, headers = asset
    return kind, _asset(name), headers
