"""Who may connect and do what: tokens, topic permissions, the origin allow-list."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import jwt
import pytest
import trio
import trio.testing
from helpers import HOST, RawClient, masked_frame, rejected, upgrade_request, wall_clock
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from trio_relay import SUBPROTOCOL, CloseCode, RelayConfig
from trio_relay._auth import Expiries, Grant, TokenError, mint_token, topic_matches, verify_token
from trio_relay._protocol import Publish, Received, RelayProtocol, Upgrade
from trio_relay._redact import redact, shown
from trio_relay._topics import Cursor
from trio_relay.testing import MemoryRelay, open_memory_relay

__all__ = ["wall_clock"]  # the fixture, used by name

SECRET = "s" * 40
CONFIG = RelayConfig(auth_secret=SECRET, allowed_origins=("https://*.example.com",))


async def _connect(
    relay: MemoryRelay,
    path: str,
    *,
    token: str | None = None,
    origin: str | None = None,
    envelope: bool = False,
) -> RawClient:
    client = RawClient(await relay.open_stream())
    headers = []
    if token is not None:
        headers.append((b"Authorization", f"Bearer {token}".encode()))
    if origin is not None:
        headers.append((b"Origin", origin.encode()))
    subprotocols = [SUBPROTOCOL] if envelope else []
    await client.send(
        Request(host=HOST, target=path, extra_headers=headers, subprotocols=subprotocols)
    )
    assert isinstance(await client.next_event(), AcceptConnection)
    return client


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 characters"):
        RelayConfig(auth_secret="short")


def test_a_minted_token_carries_its_patterns() -> None:
    token = mint_token(SECRET, publish=["news/*"], subscribe=["*"], ttl=60, now=1_000_000.5)
    grant = verify_token(SECRET, token, now=1_000_030)
    assert grant == Grant(publish=("news/*",), subscribe=("*",), expires=1_000_060)
    assert grant.seconds_left(1_000_030) == 30.0


@pytest.mark.parametrize(
    ("pattern", "covered", "not_covered"),
    [
        ("news/*", ["news/a", "news/sport"], ["news", "news/a/b", "news/a/b/c", "sport/a"]),
        ("news/**", ["news", "news/a", "news/a/b/c"], ["newsroom", "sport/news"]),
        ("**", ["", "news", "news/a/b/c"], []),
        ("*", ["", "news"], ["news/a"]),
        ("", [""], ["news"]),
        ("news", ["news"], ["news/a", "new"]),
        ("*/live", ["news/live", "sport/live"], ["live", "news/a/live"]),
        ("a/**/z", ["a/z", "a/b/z", "a/b/c/z"], ["a", "a/b", "z"]),
        ("news/sp*", ["news/sport", "news/sp"], ["news/sport/x", "news/other"]),
    ],
    ids=[
        "star",
        "any-depth",
        "everything",
        "one-level",
        "root",
        "exact",
        "lead",
        "middle",
        "in-segment",
    ],
)
def test_patterns_match_segment_by_segment(
    pattern: str, covered: list[str], not_covered: list[str]
) -> None:
    assert [topic for topic in covered if not topic_matches(pattern, topic)] == []
    assert [topic for topic in not_covered if topic_matches(pattern, topic)] == []


def test_many_any_depth_segments_match_in_linear_time() -> None:
    # A table, not backtracking: 40 "**" against 100 segments that almost match.
    assert not topic_matches("**/" * 40 + "z", "a/" * 99 + "b")
    assert topic_matches("**/" * 40 + "z", "a/" * 99 + "z")


JWT = mint_token(SECRET, subscribe=["news"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"/news?since=x&token={JWT}", "/news?since=x&token=<redacted>"),
        (f"/news?access_token={JWT}&since=1", "/news?access_token=<redacted>&since=1"),
        (f"Authorization: Bearer {JWT}", "Authorization: Bearer <redacted>"),
        (f"bearer  {JWT}x", "bearer  <redacted>"),
        (f"a token {JWT} in prose", "a token <redacted> in prose"),
        (f"half a token {JWT[:60]}", "half a token <redacted>"),
        ("redis://:hunter2@db:6379/0", "redis://:<redacted>@db:6379/0"),
        ("rediss://user:p@ss@db/0", "rediss://user:<redacted>@db/0"),
        ("unix://:pw@/run/redis.sock?db=0", "unix://:<redacted>@/run/redis.sock?db=0"),
        ("redis://db/0?password=pw&db=1", "redis://db/0?password=<redacted>&db=1"),
        ("redis://user@db:6379/0 and ws://host:80/a", "redis://user@db:6379/0 and ws://host:80/a"),
    ],
    ids=[
        "query",
        "access-token",
        "bearer",
        "bearer-lower",
        "bare-jwt",
        "cut-jwt",
        "redis-password",
        "user-and-password",
        "unix-socket",
        "password-parameter",
        "nothing-secret",
    ],
)
def test_redact_hides_tokens_and_passwords(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text, 'quoted' & \\ kept", "plain text, 'quoted' & \\ kept"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x1b[2Kred\x00", "\\x1b[2Kred\\x00"),
        ("line\u2028sep\x85next", "line\\u2028sep\\x85next"),
        ("café ✓", "café ✓"),
    ],
    ids=["printable", "whitespace", "escape-sequence", "unicode-breaks", "non-ascii"],
)
def test_shown_escapes_what_could_end_a_log_line(text: str, expected: str) -> None:
    assert shown(text) == expected


def test_shown_cuts_long_text_and_is_idempotent() -> None:
    text = "\n" + "x" * 10_000
    once = shown(text)
    assert len(once) == 256
    assert once.startswith("\\nxxx") and once.endswith("... (10001 characters)")
    assert shown(once) == once
    assert shown(f"?token={JWT}\n") == shown(shown(f"?token={JWT}\n")) == "?token=<redacted>\\n"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, b"a token is required"),
        ("not.a.token", b"invalid token"),
        (mint_token("x" * 40, subscribe=["*"]), b"Signature verification failed"),
        (mint_token(SECRET, subscribe=["*"], ttl=10, now=1_000_000), b"expired"),
    ],
    ids=["missing", "malformed", "wrong-secret", "expired"],
)
async def test_no_valid_token_is_refused_with_401(
    autojump_clock: trio.testing.MockClock, token: str | None, reason: bytes
) -> None:
    async with open_memory_relay(CONFIG) as relay:
        query = "" if token is None else f"?token={token}"
        status, body = await rejected(relay, upgrade_request("/news" + query))
        assert status == 401
        assert reason in body


async def test_a_token_for_other_topics_is_refused_with_403(
    autojump_clock: trio.testing.MockClock,
) -> None:
    token = mint_token(SECRET, publish=["sport"], subscribe=["sport/*"])
    async with open_memory_relay(CONFIG) as relay:
        status, body = await rejected(relay, upgrade_request(f"/news?token={token}"))
        assert status == 403
        assert b"does not allow topic 'news'" in body


async def test_the_token_works_in_the_header_and_in_the_query(
    autojump_clock: trio.testing.MockClock,
) -> None:
    token = mint_token(SECRET, publish=["*"], subscribe=["*"])
    async with open_memory_relay(CONFIG) as relay:
        by_header = await _connect(relay, "/news", token=token)
        by_query = await _connect(relay, f"/news?token={token}")
        await by_header.send_text("both in")
        assert await by_query.next_message() == "both in"


async def test_publishing_without_permission_closes_a_raw_client_with_1008(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reader = mint_token(SECRET, subscribe=["news"])
    async with open_memory_relay(CONFIG) as relay:
        client = await _connect(relay, "/news", token=reader)
        await client.send_text("may I?")
        close = await client.next_close()
        assert close.code == 1008
        assert close.reason == "the token does not allow publishing to topic 'news'"
        assert relay.server.statistics().broadcast.published == 0


async def test_publishing_without_permission_is_an_error_frame_for_an_envelope_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reader = mint_token(SECRET, subscribe=["news"])
    async with open_memory_relay(CONFIG) as relay:
        client = await _connect(relay, "/news", token=reader, envelope=True)
        assert json.loads(await client.next_message())["type"] == "welcome"
        await client.send(TextMessage(data=json.dumps({"type": "publish", "text": "x"})))
        error = json.loads(await client.next_message())
        assert (error["type"], error["code"]) == ("error", "forbidden")
        await relay.publish("the connection is still open", "news")
        assert json.loads(await client.next_message())["text"] == "the connection is still open"


async def test_a_publish_only_token_gets_acks_but_no_messages(
    autojump_clock: trio.testing.MockClock,
) -> None:
    writer = mint_token(SECRET, publish=["news"])
    async with open_memory_relay(CONFIG) as relay:
        client = await _connect(relay, "/news", token=writer, envelope=True)
        assert json.loads(await client.next_message())["type"] == "welcome"
        await relay.publish("not for you", "news")
        await client.send(TextMessage(data=json.dumps({"type": "publish", "text": "mine"})))
        ack = json.loads(await client.next_message())
        assert (ack["type"], ack["seq"]) == ("ack", 2)


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [("https://app.example.com", True), ("https://evil.test", False), (None, True)],
    ids=["allowed", "other-site", "no-origin"],
)
async def test_browsers_from_other_origins_are_refused_with_403(
    autojump_clock: trio.testing.MockClock, origin: str | None, allowed: bool
) -> None:
    token = mint_token(SECRET, subscribe=["*"])
    async with open_memory_relay(CONFIG) as relay:
        if allowed:
            await _connect(relay, "/news", token=token, origin=origin)
            return
        request = upgrade_request(f"/news?token={token}", extra=f"Origin: {origin}\r\n")
        status, body = await rejected(relay, request)
        assert status == 403
        assert b"origin 'https://evil.test' is not allowed" in body


def test_the_token_command_mints_a_token_the_relay_accepts() -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "trio_relay", "token", "--secret", SECRET),
            *("--publish", "news/*", "--subscribe", "*", "--ttl", "1h"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    grant = verify_token(SECRET, result.stdout.strip())
    assert (grant.publish, grant.subscribe) == (("news/*",), ("*",))
    assert 3598 < grant.seconds_left() <= 3600


async def test_without_a_secret_everyone_may_do_everything(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        client = await RawClient.connect(relay, "/anything")
        await client.send_text("open relay")
        assert await client.next_message() == "open relay"
        await client.send(CloseConnection(code=1000))


# ---------------------------------------------------------------- expiry and refresh


class Counted:
    """An item that counts how often it is hashed or compared: how often it is looked at."""

    looked_at = 0

    def __hash__(self) -> int:
        Counted.looked_at += 1
        return id(self)

    def __eq__(self, other: object) -> bool:
        Counted.looked_at += 1
        return self is other


def test_expiries_give_each_item_once_at_its_deadline() -> None:
    expiries: Expiries[str] = Expiries()
    for name, deadline in [("a", 5.0), ("b", 5.5), ("c", 7.25), ("never", math.inf)]:
        expiries.schedule(name, deadline)
    assert len(expiries) == 3
    assert expiries.pop_due(4.99) == []
    assert expiries.pop_due(5.25) == ["a"]  # "b" shares its second but is not due yet
    assert expiries.pop_due(5.5) == ["b"]
    expiries.schedule("c", 9.0)  # refreshed: moved
    expiries.schedule("late", 3.0)  # already past: the next call gives it
    assert expiries.pop_due(8.0) == ["late"]
    expiries.discard("c")  # closed
    expiries.discard("c")
    assert expiries.pop_due(100.0) == []
    assert len(expiries) == 0


def test_expiries_look_only_at_the_items_due() -> None:
    expiries: Expiries[Counted] = Expiries()
    items = [Counted() for _ in range(10_000)]
    for index, item in enumerate(items):
        expiries.schedule(item, 1000.0 + index % 100)
    soon = Counted()
    expiries.schedule(soon, 10.5)
    expiries.pop_due(0.0)
    Counted.looked_at = 0
    for second in range(1, 1000):  # the server's tick, once a second
        due = expiries.pop_due(float(second))
        assert due == ([soon] if second == 11 else [])
    assert Counted.looked_at < 10  # the 10,000 others were never touched
    assert len(expiries.pop_due(1000.0)) == 100


def test_an_exp_that_is_not_a_number_is_refused() -> None:
    token = jwt.encode({"exp": "9999999999", "subscribe": ["**"]}, SECRET, algorithm="HS256")
    with pytest.raises(TokenError, match='"exp" must be a number'):
        verify_token(SECRET, token)


def _opened(token: str, *, envelope: bool = True, now: float = 0.0) -> RelayProtocol:
    protocol = RelayProtocol(RelayConfig(auth_secret=SECRET))
    extra = "Sec-WebSocket-Protocol: trio-relay.v1\r\n" if envelope else ""
    upgrade = protocol.receive_request(upgrade_request(f"/news?token={token}", extra=extra))
    assert isinstance(upgrade, Upgrade), upgrade
    protocol.accept()
    assert protocol.opening(None, None, Cursor("", 0), now=now)[1] is None
    return protocol


def _frames(received: Received) -> list[dict[str, object]]:
    """The JSON frames among the bytes a read called for."""
    return [
        json.loads(step) for step in received.steps if isinstance(step, bytes) and step[:1] == b"{"
    ]


def _frame(kind: str, **fields: object) -> bytes:
    return masked_frame(0x1, json.dumps({"type": kind, **fields}).encode())


@pytest.mark.parametrize("envelope", [False, True], ids=["raw", "envelope"])
def test_a_publish_after_expiry_is_refused_before_the_timer_closes(
    wall_clock: float, envelope: bool
) -> None:
    protocol = _opened(
        mint_token(SECRET, publish=["news"], ttl=20, now=wall_clock), envelope=envelope
    )
    assert protocol.expires == 20.0
    data = _frame("publish", text="in time") if envelope else masked_frame(0x1, b"in time")
    assert [type(step) for step in protocol.receive_data(data, 19.99).steps] == [Publish]
    late = protocol.receive_data(data, 20.0)
    assert late.steps == []
    assert late.close == (CloseCode.TOKEN_EXPIRED, "token expired") == (4401, "token expired")


def test_a_token_that_expired_during_the_handshake_closes_at_once(
    wall_clock: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    protocol = RelayProtocol(RelayConfig(auth_secret=SECRET))
    token = mint_token(SECRET, subscribe=["news"], ttl=20, now=wall_clock)
    assert isinstance(protocol.receive_request(upgrade_request(f"/news?token={token}")), Upgrade)
    protocol.accept()
    monkeypatch.setattr(time, "time", lambda: wall_clock + 25)  # a slow admission, say
    assert protocol.opening(None, None, Cursor("", 0), now=25.0) == (b"", (4401, "token expired"))


def test_a_refresh_moves_the_expiry_and_replaces_the_grant(wall_clock: float) -> None:
    protocol = _opened(
        mint_token(SECRET, publish=["news"], subscribe=["news"], ttl=20, now=wall_clock)
    )
    # No trio run, so the wall clock stands still: the new token has 100 s left at 10.
    fresh = mint_token(SECRET, subscribe=["news/**"], ttl=100, now=wall_clock)
    received = protocol.receive_data(
        _frame("publish", text="a", id=1)
        + _frame("refresh", token=fresh, id="r")
        + _frame("publish", text="b", id=2),
        10.0,
    )
    publish = received.steps[0]
    assert isinstance(publish, Publish) and publish.payloads == [b"a"]
    assert _frames(received) == [
        {"type": "refreshed", "id": "r", "exp": int(wall_clock) + 100},
        {
            "type": "error",
            "code": "forbidden",
            "detail": "the token does not allow publishing to topic 'news'",
            "id": 2,
        },
    ]
    assert protocol.expires == 110.0 and (protocol.may_read, protocol.may_write) == (True, False)
    assert protocol.receive_data(_frame("refresh", token=fresh), 50.0).close is None


@pytest.mark.parametrize(
    ("token", "code", "detail"),
    [
        ("not.a.token", "bad-token", "invalid token: "),
        (mint_token("x" * 40, subscribe=["news"]), "bad-token", "Signature verification failed"),
        (mint_token(SECRET, subscribe=["news"], ttl=5, now=1_000_000), "bad-token", "expired"),
        (
            mint_token(SECRET, subscribe=["sport"], publish=["news/*"]),
            "forbidden",
            "does not allow topic 'news'",
        ),
        ("", "bad-frame", '"token" must be a non-empty string'),
    ],
    ids=["malformed", "wrong-secret", "expired", "other-topic", "empty"],
)
def test_a_refused_refresh_is_an_error_and_changes_nothing(
    wall_clock: float, token: str, code: str, detail: str
) -> None:
    protocol = _opened(mint_token(SECRET, publish=["news"], ttl=20, now=wall_clock))
    received = protocol.receive_data(_frame("refresh", token=token, id=7), 10.0)
    [error] = _frames(received)
    assert (error["type"], error["code"], error["id"]) == ("error", code, 7)
    assert detail in str(error["detail"])
    assert token not in json.dumps(error) or not token
    assert protocol.expires == 20.0 and protocol.may_write
    assert protocol.receive_data(_frame("refresh", token=token), 20.0).close == (
        4401,
        "token expired",
    )


def test_without_a_secret_a_refresh_is_answered_and_nothing_expires() -> None:
    protocol = RelayProtocol(RelayConfig())
    assert isinstance(
        protocol.receive_request(
            upgrade_request("/news", extra="Sec-WebSocket-Protocol: trio-relay.v1\r\n")
        ),
        Upgrade,
    )
    protocol.accept()
    protocol.opening(None, None, Cursor("", 0), now=0.0)
    received = protocol.receive_data(_frame("refresh", token="anything", id=1), 1e9)
    assert _frames(received) == [{"type": "refreshed", "id": 1, "exp": None}]
    assert protocol.expires == math.inf
