"""The WebSocket opening handshake, server side (RFC 6455 4.2): parse the client's upgrade
request head, check it, and write the ``101 Switching Protocols`` answer.

Sans-IO, like :mod:`._frames`: bytes in, a request or a :class:`BadUpgrade` out.

Why not wsproto (and h11 under it), which the relay used here before and which the client
side still uses: their general HTTP machinery (an h11 state machine, event objects, header
normalisation, a second pass in wsproto) cost about 40 % of the relay's CPU per connection
set-up; this one pass over the head costs a tenth of that (README "Performance"). It keeps
every check they made, with the same statuses (``tests/test_upgrade.py`` runs wsproto beside
it as an oracle), and adds a few RFC 6455 asks for that they did not make:

- the request line is ``METHOD SP request-target SP HTTP/1.1`` (h11's grammar), the method
  ``GET``; another HTTP version is refused (RFC 6455 4.1: "HTTP/1.1 or higher"; h11 also let
  HTTP/1.0 through);
- header lines are h11's grammar (a token, ``:``, a value of visible characters, spaces and
  tabs, and bytes 0x80-0xFF); a folded line (obs-fold) is refused, as RFC 7230 3.2.4 allows,
  where h11 joined it;
- exactly one ``Host``; ``Connection`` holds the token ``upgrade`` and ``Upgrade`` the token
  ``websocket`` (case-insensitive, in any of their comma-separated lists: RFC 6455 4.2.1
  items 3 and 4; wsproto read only the last ``Connection`` header and wanted ``Upgrade`` to be
  exactly ``websocket``);
- exactly one ``Sec-WebSocket-Key``, the base64 of 16 bytes (item 5; wsproto took any value);
- ``Sec-WebSocket-Version: 13``: missing, 400; another value, 426; both answers carry
  ``Sec-WebSocket-Version: 13`` (RFC 6455 4.4);
- no body: a ``Transfer-Encoding`` or a ``Content-Length`` other than 0 is refused (the bytes
  after the head are WebSocket frames);
- header values need not be ASCII: a ``Host``, ``Connection`` or ``Sec-WebSocket-Protocol``
  with bytes over 0x7F is refused or passed on, never a crash (wsproto raised
  ``UnicodeDecodeError`` on them).

Every refusal is a 400 unless said otherwise; the caller answers it, the head being at most
``MAX_REQUEST_HEAD`` bytes (431 past that, decided before this module is asked).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import NamedTuple

__all__ = ["BadUpgrade", "UpgradeRequest", "accept_response", "parse_upgrade"]

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
# h11's grammar (h11/_abnf.py): a request line, and a header line (value with its optional
# white space on either side left out of the group).
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*")
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
_VERSION_HEADER = ((b"Sec-WebSocket-Version", b"13"),)


class BadUpgrade(Exception):
    """The request is not a WebSocket upgrade the relay can accept: answer HTTP
    :attr:`status` with :attr:`headers` (RFC 6455 4.2.2: 400; a version other than 13: 426,
    saying which one is supported)."""

    def __init__(
        self, message: str, status: int = 400, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class UpgradeRequest(NamedTuple):
    """A valid upgrade request."""

    target: str
    """The request target, as sent (ASCII: path and query, still percent-encoded)."""
    host: bytes
    """The ``Host`` header's value."""
    key: bytes
    """``Sec-WebSocket-Key``, for :func:`accept_response`."""
    subprotocols: tuple[str, ...]
    """``Sec-WebSocket-Protocol``'s names, in order, from every such header (Latin-1)."""
    headers: tuple[tuple[bytes, bytes], ...]
    """The other headers in order, names in lower case (without ``Host``,
    ``Sec-WebSocket-Protocol`` and ``Sec-WebSocket-Extensions``: no extension is ever
    negotiated)."""


def _tokens(value: bytes) -> list[bytes]:
    """The elements of a comma-separated header value, stripped and in lower case."""
    return [token.strip(b" \t").lower() for token in value.split(b",")]


def parse_upgrade(head: bytes) -> UpgradeRequest:
    """Parse and check a request head (its bytes up to and including the blank line).

    Raises :class:`BadUpgrade` with the status to answer and a short reason that quotes
    nothing the client sent (the caller may add the path, cut short)."""
    lines = head.split(b"\r\n")
    if len(lines) < 3 or lines[-1] or lines[-2]:
        raise BadUpgrade("the request head does not end with a blank line")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise BadUpgrade("bad HTTP request line")
    method, target, version = match.groups()
    host: bytes | None = None
    hosts = keys = 0
    key = b""
    connection: list[bytes] = []
    upgrade: list[bytes] = []
    versions: list[bytes] = []
    subprotocols: list[str] = []
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:-2]:
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            raise BadUpgrade("bad HTTP header line")
        name = match[1].lower()
        value = match[2]
        if name == b"host":
            hosts += 1
            host = value
            continue
        if name == b"sec-websocket-protocol":
            subprotocols += (p.strip(" \t") for p in value.decode("latin-1").split(","))
            continue
        if name == b"sec-websocket-extensions":
            continue
        if name == b"connection":
            connection += _tokens(value)
        elif name == b"upgrade":
            upgrade += _tokens(value)
        elif name == b"sec-websocket-key":
            keys += 1
            key = value
        elif name == b"sec-websocket-version":
            versions.append(value)
        elif name == b"transfer-encoding" or (
            name == b"content-length" and not (value.isdigit() and not value.strip(b"0"))
        ):
            raise BadUpgrade("an upgrade request has no body")
        headers.append((name, value))
    if version != b"1.1":
        raise BadUpgrade("a WebSocket upgrade needs HTTP/1.1")
    if host is None or hosts > 1:
        raise BadUpgrade("there must be one Host header" if hosts else "no Host header")
    if method != b"GET":
        raise BadUpgrade("the method must be GET")
    if b"upgrade" not in connection:
        raise BadUpgrade("no 'Connection: Upgrade' header")
    if not versions:
        raise BadUpgrade("no Sec-WebSocket-Version header", 400, _VERSION_HEADER)
    if any(value != b"13" for value in versions):
        raise BadUpgrade("Sec-WebSocket-Version must be 13", 426, _VERSION_HEADER)
    if keys != 1:
        raise BadUpgrade("there must be one Sec-WebSocket-Key header")
    try:
        nonce = base64.b64decode(key, validate=True)
    except binascii.Error:
        nonce = b""
    if len(nonce) != 16:
        raise BadUpgrade("Sec-WebSocket-Key must be 16 bytes in base64")
    if b"websocket" not in upgrade:
        raise BadUpgrade("no 'Upgrade: websocket' header")
    return UpgradeRequest(target.decode("ascii"), host, key, tuple(subprotocols), tuple(headers))


def accept_response(key: bytes, subprotocol: str | None = None) -> bytes:
    """The ``101 Switching Protocols`` answer to a request with this ``Sec-WebSocket-Key``,
    choosing ``subprotocol`` (one the client offered) if given."""
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    head = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n"
    )
    if subprotocol is not None:
        head += b"Sec-WebSocket-Protocol: " + subprotocol.encode("ascii") + b"\r\n"
    return head + b"\r\n"
