"""The hand-written upgrade request parser (``trio_relay._upgrade``) against wsproto.

wsproto (with h11) parsed the relay's handshakes before, and still does on the client side:
here it is the oracle. Each request below is decided by both, and they must agree on the
status, and on what an accepted request says (target, host, subprotocols, the other
headers). The requests where the parser is stricter or more lenient on purpose (its module
docstring lists why) are checked on their own, with the reason.
"""

from __future__ import annotations

import pytest
from helpers import HOST, upgrade_request
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.utilities import RemoteProtocolError

from trio_relay._upgrade import BadUpgrade, UpgradeRequest, accept_response, parse_upgrade

VALID = upgrade_request("/news?since=3")


def ours(head: bytes) -> tuple[int, UpgradeRequest | None]:
    try:
        return 101, parse_upgrade(head)
    except BadUpgrade as exc:
        return exc.status, None


def wsproto_decides(head: bytes) -> tuple[int, Request | None]:
    connection = WSConnection(ConnectionType.SERVER)
    try:
        connection.receive_data(head)
        events = list(connection.events())
    except RemoteProtocolError as exc:
        return getattr(exc.event_hint, "status_code", 400), None
    request = events[0] if events else None
    return (101, request) if isinstance(request, Request) else (400, None)


def edit(old: bytes, new: bytes) -> bytes:
    assert old in VALID
    return VALID.replace(old, new)


# Requests both parsers decide, and the status they agree on.
AGREED = [
    (VALID, 101),
    (VALID.lower().replace(b"get /news", b"GET /news").replace(b"http/1.1", b"HTTP/1.1"), 101),
    (edit(b"Connection: Upgrade", b"Connection: keep-alive, Upgrade"), 101),
    (edit(b"Connection: Upgrade", b"Connection:upgrade  "), 101),
    (edit(b"Upgrade: websocket", b"Upgrade: WebSocket"), 101),
    (edit(b"Host: ", b"Origin: https://a.example\r\nX-Seven: a \t b\r\nHost: "), 101),
    (edit(b"Host: ", b"Sec-WebSocket-Protocol: a, trio-relay.v1\r\nHost: "), 101),
    (
        edit(b"Host: ", b"Sec-WebSocket-Protocol: a\r\nSec-WebSocket-Protocol: b,c\r\nHost: "),
        101,
    ),
    (edit(b"Host: ", b"Sec-WebSocket-Extensions: permessage-deflate\r\nHost: "), 101),
    (edit(b"Host: ", b"Content-Length: 0\r\nHost: "), 101),
    (edit(b"Host: ", b"X-Latin: caf\xe9\r\nHost: "), 101),
    (edit(b"/news?since=3", b"/a%20b?token=x&since=1"), 101),
    (edit(b"GET ", b"POST "), 400),
    (edit(b"GET ", b"G(T "), 400),
    (edit(b"GET /news", b"GET  /news"), 400),
    (edit(b"GET /news", b"GET /n\x7fws"), 400),
    (edit(b"Connection: Upgrade\r\n", b""), 400),
    (edit(b"Connection: Upgrade", b"Connection: keep-alive"), 400),
    (edit(b"Upgrade: websocket\r\n", b""), 400),
    (edit(b"Upgrade: websocket", b"Upgrade: h2c"), 400),
    (edit(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""), 400),
    (edit(b"Sec-WebSocket-Version: 13\r\n", b""), 400),
    (edit(b"Version: 13", b"Version: 8"), 426),
    (edit(b"Version: 13", b"Version: 13, 8"), 426),
    (edit(b"Host: relay.test\r\n", b""), 400),
    (edit(b"Host: relay.test\r\n", b"Host: a\r\nHost: b\r\n"), 400),
    (edit(b"Host:", b"Host :"), 400),
    (edit(b"Host:", b"Ho\x01st:"), 400),
    (edit(b"Host: relay.test", b"Host: re\x00lay"), 400),
    (edit(b"Host: relay.test", b"Host: re\rlay"), 400),
    (edit(b"Host: ", b"X-No-Colon\r\nHost: "), 400),
    (edit(b"Host: ", b"Content-Length: x\r\nHost: "), 400),
    (edit(b"Host: ", b"Transfer-Encoding: gzip\r\nHost: "), 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"\x00\xffgarbage\xfe\r\n\r\n", 400),
    (b"\r\n\r\n", 400),
]


@pytest.mark.parametrize(("head", "status"), AGREED)
def test_the_parser_decides_as_wsproto_did(head: bytes, status: int) -> None:
    theirs, request = wsproto_decides(head)
    assert theirs == status  # the oracle, so that the table itself is checked
    mine, parsed = ours(head)
    assert mine == status
    if request is not None:
        assert parsed is not None
        assert parsed.target == request.target
        assert parsed.host.decode("ascii") == request.host
        assert list(parsed.subprotocols) == request.subprotocols
        assert list(parsed.headers) == [(n.lower(), v) for n, v in request.extra_headers]


@pytest.mark.parametrize(
    ("head", "status", "why"),
    [
        (edit(b"HTTP/1.1", b"HTTP/1.0"), 400, "RFC 6455 4.1: HTTP/1.1 or higher"),
        (edit(b"HTTP/1.1", b"HTTP/2.0"), 400, "no other HTTP/1.1 upgrade"),
        (edit(b"Q==", b"Q"), 400, "RFC 6455 4.2.1 item 5: 16 bytes in base64"),
        (edit(b"dGhlIHNhbXBsZSBub25jZQ==", b"dGhlIHNhbXBsZSBub25jZQ"), 400, "padding missing"),
        (edit(b"dGhlIHNhbXBsZSBub25jZQ==", b"dGhlIHNhbXBsZSBub25jZSE="), 400, "17 bytes"),
        (edit(b"dGhlIHNhbXBsZSBub25jZQ==", b"dGhlIHNhbXBsZSBub25j*Q=="), 400, "not base64"),
        (
            edit(
                b"Version: 13\r\n",
                b"Version: 13\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
            ),
            400,
            "two keys",
        ),
        (edit(b"Host: ", b"X: a\r\n folded\r\nHost: "), 400, "obs-fold, RFC 7230 3.2.4"),
        (
            edit(b"Host: ", b"Content-Length: 5\r\nHost: "),
            400,
            "the bytes after the head are frames",
        ),
        (edit(b"Host: ", b"Transfer-Encoding: chunked\r\nHost: "), 400, "nor a chunked body"),
        (edit(b"Host: relay.test", b"Host: r\xc3\xa9lay.test"), 101, "wsproto raised here"),
        (edit(b"Connection: Upgrade", b"Connection: \xff"), 400, "wsproto raised here"),
        (edit(b"Upgrade: websocket", b"Upgrade: websocket, h2c"), 101, "RFC 6455 4.2.1 item 3"),
        (
            edit(b"Connection: Upgrade", b"Connection: Upgrade\r\nConnection: close"),
            101,
            "RFC 6455 4.2.1 item 4: the token is in the combined list",
        ),
    ],
)
def test_the_parser_departs_from_wsproto_where_the_rfcs_say(
    head: bytes, status: int, why: str
) -> None:
    assert ours(head)[0] == status, why


def test_a_subprotocol_header_with_any_bytes_is_passed_on_not_a_crash() -> None:
    request = parse_upgrade(edit(b"Host: ", b"Sec-WebSocket-Protocol: \xe9t\xe9, v1\r\nHost: "))
    assert request.subprotocols == ("\xe9t\xe9", "v1")


def test_a_refused_version_is_told_which_one_is_supported() -> None:
    for head, status in (
        (edit(b"Version: 13", b"Version: 7"), 426),
        (edit(b"Sec-WebSocket-Version: 13\r\n", b""), 400),
    ):
        with pytest.raises(BadUpgrade) as caught:
            parse_upgrade(head)
        assert caught.value.status == status
        assert caught.value.headers == ((b"Sec-WebSocket-Version", b"13"),)  # RFC 6455 4.4


@pytest.mark.parametrize("subprotocol", [None, "trio-relay.v2"])
def test_the_101_answer_is_the_one_wsproto_writes(subprotocol: str | None) -> None:
    head = edit(b"Host: ", b"Sec-WebSocket-Protocol: trio-relay.v2\r\nHost: ")
    connection = WSConnection(ConnectionType.SERVER)
    connection.receive_data(head)
    next(connection.events())
    theirs = connection.send(AcceptConnection(subprotocol=subprotocol))
    mine = accept_response(parse_upgrade(head).key, subprotocol)
    assert mine.startswith(b"HTTP/1.1 101 ") and mine.endswith(b"\r\n\r\n")
    assert sorted(mine.lower().split(b"\r\n")[1:]) == sorted(theirs.lower().split(b"\r\n")[1:])
    # RFC 6455 1.3's example: this key is answered with this accept value.
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in accept_response(b"dGhlIHNhbXBsZSBub25jZQ==")
    assert HOST.encode() == parse_upgrade(head).host
