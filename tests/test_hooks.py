"""The embedding hooks of ``serve_relay``: ``authorize`` and ``on_publish``.

Determinism rules for this module:

* WebSocket cases run a real relay over in-memory streams (``open_memory_relay``) under
  ``autojump_clock``: a hook that never answers is timed out at an exact virtual time.
* The protocol's part (a hooked handshake waits for the grant) is tested sans-IO.
* The HTTP API's cases talk to a real relay and side port on 127.0.0.1, port 0, with httpx.
* Nothing sleeps: consumers are known to be subscribed by ``server.wait_until``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from helpers import HOST, RawClient, masked_frame, rejected, upgrade_request, wall_clock
from wsproto.events import AcceptConnection, Request, TextMessage

import trio_relay
from trio_relay import (
    SUBPROTOCOL,
    AuthRequest,
    Grant,
    Publication,
    Refusal,
    RelayConfig,
    RelayServer,
    serve_metrics,
    serve_relay,
)
from trio_relay._protocol import Reject, RelayProtocol, Upgrade
from trio_relay.testing import MemoryRelay, open_memory_relay

__all__ = ["wall_clock"]  # the fixture, used by name

SECRET = "s" * 40
EVERYTHING = Grant(publish=("**",), subscribe=("**",))


async def _open(
    relay: MemoryRelay,
    path: str = "/news",
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    envelope: bool = False,
) -> RawClient:
    client = RawClient(await relay.open_stream())
    subprotocols = [SUBPROTOCOL] if envelope else []
    await client.send(
        Request(host=HOST, target=path, extra_headers=headers or [], subprotocols=subprotocols)
    )
    event = await client.next_event()
    assert isinstance(event, AcceptConnection), event
    if envelope:
        assert json.loads(await client.next_message())["type"] == "welcome"
    return client


def _publish(text: str, request_id: int) -> TextMessage:
    return TextMessage(data=json.dumps({"type": "publish", "text": text, "id": request_id}))


# --------------------------------------------------------------------------- sans-IO


def test_a_hooked_handshake_checks_no_token_and_allows_nothing_until_authorized() -> None:
    protocol = RelayProtocol(RelayConfig(auth_secret=SECRET), hooked=True)
    upgrade = protocol.receive_request(
        upgrade_request("/news%2Fsport?since=3&x=1", extra="Cookie: session=abc\r\n")
    )
    # No token, yet no 401: the hook decides. Its request carries what it needs.
    assert isinstance(upgrade, Upgrade)
    assert (upgrade.topic, upgrade.since, upgrade.path, upgrade.query) == (
        "news/sport",
        3,
        "/news/sport",
        "since=3&x=1",
    )
    assert (b"cookie", b"session=abc") in upgrade.headers
    assert (protocol.may_read, protocol.may_write) == (False, False)
    assert protocol.authorize(Grant(publish=("news/*",), subscribe=())) is None
    assert (protocol.may_read, protocol.may_write) == (False, True)
    protocol.accept()


def test_a_hooks_grant_that_allows_neither_way_is_a_403() -> None:
    protocol = RelayProtocol(RelayConfig(), hooked=True)
    assert isinstance(protocol.receive_request(upgrade_request("/news")), Upgrade)
    refused = protocol.authorize(Grant(publish=("sport",), subscribe=("sport/**",)))
    assert isinstance(refused, Reject)
    assert refused.status == 403
    assert refused.reason == "topic 'news' is not allowed for this connection"


def test_a_refusal_takes_error_statuses_only_and_defaults_its_reason() -> None:
    assert Refusal().status == 403
    assert Refusal(401).text == "Unauthorized"
    assert Refusal(429, "slow down").text == "slow down"
    for status in (200, 302, 399, 600):
        with pytest.raises(ValueError, match="400 to 599"):
            Refusal(status)


def test_an_auth_request_reads_headers_cookies_and_the_token_and_hides_them() -> None:
    request = AuthRequest(
        "websocket",
        "/news",
        "token=q.q.q&x=1",
        (
            (b"cookie", b"theme=dark; session=abc123"),
            (b"authorization", b"Bearer h.h.h"),
            (b"x-user", b"ann"),
        ),
        "[::1]:5000",
        "news",
    )
    assert request.header("X-User") == "ann"
    assert request.header("missing") is None
    assert request.cookie("session") == "abc123"
    assert request.cookie("nope") is None
    assert request.token == "h.h.h"  # the header first
    assert request.host == "::1"
    assert "abc123" not in repr(request) and "h.h.h" not in repr(request)
    assert repr(request) == "<AuthRequest websocket '/news' from [::1]:5000>"
    by_query = AuthRequest("websocket", "/news", "token=q.q.q", (), "in-memory")
    assert by_query.token == "q.q.q"
    # The HTTP API never reads ?token= (it would land in proxies' logs).
    assert AuthRequest("http", "/api/publish", "token=q.q.q", (), "h:1").token is None
    assert AuthRequest("http", "/", "", ((b"cookie", b"\x00bad"),), "h:1").cookie("a") is None


# --------------------------------------------------------------------------- authorize


@dataclass(frozen=True)
class UserGrant(Grant):
    """An application's grant that says who the user is (on_publish sees it)."""

    user: str = ""


SESSIONS = {
    "ann": UserGrant(publish=("chat/*",), subscribe=("chat/*",), user="ann"),
    "bob": UserGrant(publish=(), subscribe=("chat/*",), user="bob"),  # reads only
    "cat": UserGrant(publish=("chat/*",), subscribe=(), user="cat"),  # writes only
}


async def by_session(request: AuthRequest) -> Grant | Refusal:
    """The README's example: the application's own session cookie decides."""
    session = request.cookie("session")
    if session is None:
        return Refusal(401, "log in first")
    grant = SESSIONS.get(session)
    return grant if grant is not None else Refusal(403, f"session {session} is not known")


def session(name: str) -> list[tuple[bytes, bytes]]:
    return [(b"Cookie", f"session={name}".encode())]


async def test_authorize_allows_with_its_grant_and_sees_path_headers_and_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[AuthRequest] = []

    async def authorize(request: AuthRequest) -> Grant | Refusal:
        seen.append(request)
        await trio.sleep(1)  # a session store's round trip
        return await by_session(request)

    async with open_memory_relay(authorize=authorize) as relay:
        reader = await _open(relay, "/chat/a?since=0", headers=session("ann"))
        writer = await _open(relay, "/chat/a", headers=session("ann"))
        await writer.send_text("hello")
        assert await reader.next_message() == "hello"
    [request, _] = seen
    assert (request.kind, request.path, request.query, request.topic) == (
        "websocket",
        "/chat/a",
        "since=0",
        "chat/a",
    )
    assert request.cookie("session") == "ann" and request.header("host") == HOST
    assert request.peer == "in-memory"


@pytest.mark.parametrize(
    ("cookie", "path", "status", "reason"),
    [
        ("", "/chat/a", 401, b"log in first"),
        ("Cookie: session=eve\r\n", "/chat/a", 403, b"session eve is not known"),
        (
            "Cookie: session=ann\r\n",
            "/elsewhere",
            403,
            b"topic 'elsewhere' is not allowed for this connection",
        ),
    ],
    ids=["no-session", "unknown-session", "topic-not-granted"],
)
async def test_authorize_refuses_with_its_status_and_reason(
    autojump_clock: trio.testing.MockClock, cookie: str, path: str, status: int, reason: bytes
) -> None:
    async with open_memory_relay(authorize=by_session) as relay:
        answer = await rejected(relay, upgrade_request(path, extra=cookie))
        assert answer == (status, reason + b"\n")
        assert relay.server.counters.rejections[f"http-{status}"] == 1


async def test_a_refusals_reason_is_shown_as_client_text_is(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def authorize(request: AuthRequest) -> Refusal:
        return Refusal(429, "slow\r\ndown, token=" + "x" * 600)

    async with open_memory_relay(authorize=authorize) as relay:
        status, body = await rejected(relay, upgrade_request("/news"))
    assert status == 429
    assert b"\r\ndown" not in body and b"slow\\r\\ndown, token=<redacted>" in body
    assert len(body) <= 513


async def test_a_grant_per_topic_publish_only_and_subscribe_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(authorize=by_session) as relay:
        ann = await _open(relay, "/chat/a", headers=session("ann"))
        bob = await _open(relay, "/chat/a", headers=session("bob"), envelope=True)
        cat = await _open(relay, "/chat/a", headers=session("cat"), envelope=True)
        # Cat writes but never reads, not even its own message: it gets its ack only.
        await cat.send(_publish("from cat", 1))
        ack = json.loads(await cat.next_message())
        assert (ack["type"], ack["id"], ack["seq"]) == ("ack", 1, 1)
        assert json.loads(await bob.next_message())["text"] == "from cat"
        assert await ann.next_message() == "from cat"
        # Bob reads but may not write: an error for that request, and it stays open.
        await bob.send(_publish("from bob", 2))
        error = json.loads(await bob.next_message())
        assert (error["type"], error["code"], error["id"]) == ("error", "forbidden", 2)
        await ann.send_text("from ann")
        assert json.loads(await bob.next_message())["text"] == "from ann"
        await cat.send(_publish("again", 3))
        assert json.loads(await cat.next_message())["seq"] == 3  # ann's was 2, unseen
        # A raw reader that writes is closed with 1008, as with a token.
        raw_bob = await _open(relay, "/chat/a", headers=session("bob"))
        await raw_bob.send_text("no")
        close = await raw_bob.next_close()
        assert close.code == 1008


class Broken(Exception):
    pass


async def test_an_authorize_that_fails_gets_that_client_500_and_the_relay_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def authorize(request: AuthRequest) -> Grant | Refusal:
        if request.path == "/raise":
            raise Broken("the session store is down")
        if request.path == "/garbage":
            return "yes"  # type: ignore[return-value]
        return EVERYTHING

    async with open_memory_relay(authorize=authorize) as relay:
        bystander = await _open(relay, "/news")
        for path, logged, traceback in [
            ("/raise", "the authorize hook failed on <AuthRequest websocket '/raise'", Broken),
            ("/garbage", "the authorize hook returned str for <AuthRequest websocket", None),
        ]:
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="trio_relay"):
                status, body = await rejected(relay, upgrade_request(path + "?token=t.t.t"))
            assert (status, body) == (500, b"the relay could not authorize this request\n")
            [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert error.getMessage().startswith(logged)
            assert (error.exc_info[0] if error.exc_info else None) is traceback
            assert "t.t.t" not in caplog.text
        assert relay.server.counters.rejections["http-500"] == 2
        await relay.publish("still here", "news")
        assert await bystander.next_message() == "still here"
        again = await _open(relay, "/news")
        await again.send_text("and open to others")
        assert await bystander.next_message() == "and open to others"


async def test_an_authorize_that_does_not_answer_in_time_gets_503_at_the_handshake_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def authorize(request: AuthRequest) -> Grant:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    config = RelayConfig(handshake_timeout=7.0)
    async with open_memory_relay(config, authorize=authorize) as relay:
        start = trio.current_time()
        status, body = await rejected(relay, upgrade_request("/news"))
        assert (status, body) == (503, b"authorization timed out; try again later\n")
        assert trio.current_time() - start == 7.0
        assert relay.server.counters.rejections["http-503"] == 1
        assert relay.server.counters.rejections["handshake-timeout"] == 0


async def test_with_a_secret_too_authorize_decides_and_refresh_takes_the_secrets_tokens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    token = trio_relay.mint_token(SECRET, publish=["**"], subscribe=["**"])

    async def authorize(request: AuthRequest) -> Grant | Refusal:
        # An application that takes its sessions and the relay's tokens both.
        if request.token is not None:
            return trio_relay.verify_token(SECRET, request.token)
        return await by_session(request)

    async with open_memory_relay(RelayConfig(auth_secret=SECRET), authorize=authorize) as relay:
        # A session without any token gets in, though the relay has a secret.
        client = await _open(relay, "/chat/a", headers=session("ann"), envelope=True)
        await _open(relay, f"/other?token={token}")
        assert (await rejected(relay, upgrade_request("/chat/a")))[0] == 401
        refresh = {"type": "refresh", "token": token, "id": "r"}
        await client.send(TextMessage(data=json.dumps(refresh)))
        answer = json.loads(await client.next_message())
        assert (answer["type"], answer["id"]) == ("refreshed", "r")

    async with open_memory_relay(authorize=by_session) as relay:
        client = await _open(relay, "/chat/a", headers=session("ann"), envelope=True)
        await client.send(TextMessage(data=json.dumps(refresh)))
        error = json.loads(await client.next_message())
        assert (error["type"], error["code"], error["id"]) == ("error", "bad-token", "r")
        assert "reconnect" in error["detail"]


async def test_a_hooks_grant_that_expires_closes_the_connection_with_4401(
    autojump_clock: trio.testing.MockClock, wall_clock: float
) -> None:
    async def authorize(request: AuthRequest) -> Grant:
        return Grant(publish=("**",), subscribe=("**",), expires=wall_clock + 30)

    async with open_memory_relay(authorize=authorize) as relay:
        client = await _open(relay, "/news")
        close = await client.next_close()
        assert (close.code, close.reason) == (4401, "token expired")
        assert 30 <= trio.current_time() < 31


# --------------------------------------------------------------------------- on_publish


async def shout(message: Publication) -> str | bytes | None:
    """Transforms text, drops what says "spam", passes binary through as it is."""
    if isinstance(message.data, bytes):
        return message.data
    if "spam" in message.data:
        return None
    if message.data == "as binary":
        return b"\x00binary"
    return message.data.upper()


async def test_on_publish_transforms_and_drops_for_raw_clients(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(on_publish=shout) as relay:
        reader = await _open(relay, "/news")
        writer = await _open(relay, "/news")
        # Several messages in one read: each goes through the hook, in order.
        await writer.send_raw(
            masked_frame(0x1, b"hello")
            + masked_frame(0x1, b"buy spam")
            + masked_frame(0x2, b"\x01\x02")
            + masked_frame(0x1, "héllo".encode())
            + masked_frame(0x1, b"as binary")
        )
        assert [await reader.next_message() for _ in range(4)] == [
            "HELLO",
            b"\x01\x02",
            "HÉLLO",
            b"\x00binary",
        ]
        # Numbered after the hook: no hole where the spam was.
        assert relay.server.topics.last_number("news") == 4
        await writer.send_text("spam only")
        await writer.send_text("next")
        assert await reader.next_message() == "NEXT"


async def test_on_publish_drops_are_errors_for_envelope_clients_and_acks_stay_numbered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(on_publish=shout) as relay:
        reader = await _open(relay, "/news", envelope=True)
        writer = await _open(relay, "/news", envelope=True)
        frames = [_publish(text, i) for i, text in enumerate(["a", "spam", "b", "more spam"])]
        await writer.send_raw(b"".join(writer.ws.send(frame) for frame in frames))
        answers = [json.loads(await writer.next_message()) for _ in range(6)]
        answers = [a for a in answers if a["type"] != "message"]  # its own echoes
        assert [(a["type"], a["id"], a.get("seq"), a.get("code")) for a in answers] == [
            ("error", 1, None, "dropped"),
            ("error", 3, None, "dropped"),
            ("ack", 0, 1, None),
            ("ack", 2, 2, None),
        ]
        assert answers[0]["detail"] == "the relay's on_publish hook dropped the message"
        got = [json.loads(await reader.next_message()) for _ in range(2)]
        assert [(m["seq"], m["text"]) for m in got] == [(1, "A"), (2, "B")]


async def test_on_publish_sees_the_publishers_grant_and_peer_but_not_server_publishes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[Publication] = []

    async def stamp(message: Publication) -> str:
        seen.append(message)
        assert isinstance(message.grant, UserGrant)
        return json.dumps({"from": message.grant.user, "text": message.data})

    async with open_memory_relay(authorize=by_session, on_publish=stamp) as relay:
        ann = await _open(relay, "/chat/a", headers=session("ann"))
        await ann.send_text("hi")
        assert json.loads(await ann.next_message()) == {"from": "ann", "text": "hi"}
        await relay.publish("from the application", "chat/a")
        assert await ann.next_message() == "from the application"
    [message] = seen
    assert (message.topic, message.data, message.peer, message.kind) == (
        "chat/a",
        "hi",
        "in-memory",
        "websocket",
    )


async def test_an_on_publish_that_fails_closes_its_client_1011_and_drops_the_batch(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def picky(message: Publication) -> str | bytes | None:
        if message.data == "boom":
            raise Broken("the hook has a bug")
        if message.data == "wrong type":
            return 42  # type: ignore[return-value]
        if message.data == "too big":
            return "x" * 2000
        return message.data

    config = RelayConfig(max_message_size=1000)
    async with open_memory_relay(config, on_publish=picky) as relay:
        bystander = await _open(relay, "/news")
        other_writer = await _open(relay, "/news")
        for bad, traceback in [("boom", Broken), ("wrong type", None), ("too big", None)]:
            caplog.clear()
            writer = await _open(relay, "/news")
            # One read: the good message before the bad one goes down with it.
            await writer.send_raw(masked_frame(0x1, b"before") + masked_frame(0x1, bad.encode()))
            close = await writer.next_close()
            assert (close.code, close.reason) == (1011, "internal error")
            [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert error.getMessage().startswith("the on_publish hook ")
            assert (error.exc_info[0] if error.exc_info else None) is traceback
            await other_writer.send_text(f"after {bad}")
            # The bystander never got "before": the first thing it gets is the next one.
            assert await bystander.next_message() == f"after {bad}"
            assert await other_writer.next_message() == f"after {bad}"
        assert relay.server.topics.last_number("news") == 3  # the three "after"s only


async def test_without_hooks_a_client_publish_is_untouched(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The control for the tests above: the same frames, no hook, no change.
    async with open_memory_relay() as relay:
        reader = await _open(relay, "/news")
        writer = await _open(relay, "/news")
        await writer.send_raw(masked_frame(0x1, b"hello") + masked_frame(0x1, b"buy spam"))
        assert [await reader.next_message() for _ in range(2)] == ["hello", "buy spam"]


# --------------------------------------------------------------------------- the HTTP API


@dataclass
class Relay:
    server: RelayServer
    http: httpx.AsyncClient

    def ws(self, topic: str = "") -> str:
        return f"ws://127.0.0.1:{self.server.port}/{topic}"


@asynccontextmanager
async def open_relay(**hooks: Any) -> AsyncIterator[Relay]:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(serve_relay, "127.0.0.1", 0, config=RelayConfig(ping_interval=0), **hooks)
        )
        [listener] = await nursery.start(serve_metrics, server, "127.0.0.1", 0)
        port = listener.socket.getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            yield Relay(server, http)
        nursery.cancel_scope.cancel()


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    return error


async def test_the_http_api_asks_authorize_too() -> None:
    seen: list[AuthRequest] = []

    async def authorize(request: AuthRequest) -> Grant | Refusal:
        seen.append(request)
        if request.header("x-fail"):
            raise Broken("down")
        return await by_session(request)

    with trio.fail_after(10):
        async with open_relay(authorize=authorize) as relay:
            http = relay.http
            message = {"topic": "chat/a", "text": "hi"}
            error = _error(await http.post("/api/publish", json=message), 401, "unauthorized")
            assert error["detail"] == "log in first"
            cookies = {"Cookie": "session=ann"}
            response = await http.post("/api/publish", json=message, headers=cookies)
            assert response.json()["seq"] == 1
            # Bob's grant reads but does not write: per topic, as with tokens.
            bob = {"Cookie": "session=bob"}
            _error(await http.post("/api/publish", json=message, headers=bob), 403, "forbidden")
            history = await http.get("/api/history?topic=chat/a", headers=bob)
            assert history.json()["messages"] == [{"seq": 1, "text": "hi"}]
            _error(await http.get("/api/history?topic=x", headers=bob), 403, "forbidden")
            _error(
                await http.post("/api/publish", json=message, headers={"x-fail": "1", **bob}),
                500,
                "internal-error",
            )
            # The port goes on.
            assert (await http.get("/api/history?topic=chat/a", headers=cookies)).status_code == 200
    assert [(r.kind, r.path, r.topic) for r in seen[:2]] == [
        ("http", "/api/publish", None),
        ("http", "/api/publish", None),
    ]
    assert seen[0].host == "127.0.0.1"


async def test_the_http_api_publishes_through_on_publish() -> None:
    async def hook(message: Publication) -> str | bytes | None:
        assert message.kind == "http"
        if message.data == "boom":
            raise Broken("bug")
        return await shout(message)

    with trio.fail_after(10):
        async with (
            open_relay(on_publish=hook) as relay,
            trio_relay.consume(relay.ws("news")) as consumer,
        ):
            await relay.server.wait_until(lambda s: s.subscribers == 1)
            http = relay.http
            response = await http.post("/api/publish", json={"topic": "news", "text": "one"})
            assert response.json()["seq"] == 1
            assert await anext(consumer) == "ONE"
            error = _error(
                await http.post("/api/publish", json={"topic": "news", "text": "spam"}),
                422,
                "dropped",
            )
            assert error["detail"] == "the relay's on_publish hook dropped the message"
            response = await http.post(
                "/api/publish",
                json=[
                    {"topic": "news", "text": "two"},
                    {"topic": "news", "text": "spam"},
                    {"topic": "news", "text": "three"},
                ],
            )
            assert response.status_code == 200
            results = response.json()["results"]
            assert [r.get("seq") for r in results] == [2, None, 3]
            assert results[1]["error"]["code"] == "dropped" and results[1]["error"]["index"] == 1
            assert [await anext(consumer), await anext(consumer)] == ["TWO", "THREE"]
            # A hook that fails: 500, and nothing of the request is published.
            _error(
                await http.post(
                    "/api/publish",
                    json=[{"topic": "news", "text": "four"}, {"topic": "news", "text": "boom"}],
                ),
                500,
                "internal-error",
            )
            await relay.server.publish("five", "news")
            assert await anext(consumer) == "five"
            assert relay.server.topics.last_number("news") == 4


# --------------------------------------------------------------------------- trio-relay.v2


async def test_a_v2_connection_takes_the_hooks_grant_per_subscription_and_publish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def authorize(request: AuthRequest) -> Grant:
        assert (request.path, request.topic) == ("/", None)
        assert request.header("sec-websocket-protocol") == "trio-relay.v2"
        return Grant(publish=("chat/a",), subscribe=("chat/*",))

    topics: list[str] = []

    async def hook(message: Publication) -> str | bytes | None:
        topics.append(message.topic)
        return await shout(message)

    async with open_memory_relay(authorize=authorize, on_publish=hook) as relay:
        client = RawClient(await relay.open_stream())
        await client.send(Request(host=HOST, target="/", subprotocols=["trio-relay.v2"]))
        assert isinstance(await client.next_event(), AcceptConnection)

        async def ask(**fields: Any) -> dict[str, Any]:
            await client.send(TextMessage(data=json.dumps(fields)))
            answer: dict[str, Any] = json.loads(await client.next_message())
            return answer

        subscribed = await ask(type="subscribe", topic="chat/a", id=1)
        assert (subscribed["type"], subscribed["topic"]) == ("subscribed", "chat/a")
        refused = await ask(type="subscribe", topic="elsewhere", id=2)
        assert (refused["type"], refused["code"], refused["id"]) == ("error", "forbidden", 2)
        refused = await ask(type="publish", topic="chat/b", text="x", id=3)
        assert (refused["type"], refused["code"]) == ("error", "forbidden")
        echo = await ask(type="publish", topic="chat/a", text="hi", id=4)
        assert (echo["type"], echo["topic"], echo["text"]) == ("message", "chat/a", "HI")
        ack = json.loads(await client.next_message())
        assert (ack["type"], ack["topic"], ack["seq"], ack["id"]) == ("ack", "chat/a", 1, 4)
        dropped = await ask(type="publish", topic="chat/a", text="spam", id=5)
        assert (dropped["type"], dropped["code"], dropped["id"]) == ("error", "dropped", 5)
        assert dropped["topic"] == "chat/a"
    assert topics == ["chat/a", "chat/a"]


# --------------------------------------------------------------------------- the README

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


@dataclass
class User:
    name: str
    rooms: tuple[str, ...]
    session_expires: float | None = None


class Sessions:
    """The README example's session store."""

    async def get(self, session: str | None) -> User | None:
        return User("ann", ("1", "2")) if session == "s3cret" else None


async def test_the_readmes_hooks_example_runs_as_written() -> None:
    start = README.index("```python\n", README.index("#### Embedding hooks"))
    example = README[start + len("```python\n") : README.index("```\n", start + 1)]
    # Port 0, not the README's 4000, which may be taken here.
    assert '"127.0.0.1", 4000,' in example
    example = example.replace('"127.0.0.1", 4000,', '"127.0.0.1", 0,')
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            namespace = {
                "trio_relay": trio_relay,
                "json": json,
                "partial": partial,
                "nursery": nursery,
                "sessions": Sessions(),
                "is_spam": lambda text: "spam" in text,
            }
            body = "".join(f"    {line}\n" for line in example.splitlines())
            exec(f"async def example():\n{body}    return server", namespace)  # as written
            server = await namespace["example"]()  # type: ignore[operator]
            url = f"ws://127.0.0.1:{server.port}/rooms/1"
            cookie = {"Cookie": "session=s3cret"}
            async with trio_relay.consume(url, headers=cookie) as messages:
                with pytest.raises(trio_relay.PublishRejected) as dropped:
                    await trio_relay.produce(url, "buy spam", headers=cookie, envelope=True)
                assert dropped.value.code == "dropped"
                report = await trio_relay.produce(url, "hi", headers=cookie, envelope=True)
                assert report is not None and report.seq == 1
                assert json.loads(await anext(messages)) == {"from": "ann", "text": "hi"}
            with pytest.raises(trio_relay.HandshakeRejected) as refused:
                await trio_relay.produce(url, "hi")
            assert refused.value.status_code == 401
            with pytest.raises(trio_relay.HandshakeRejected) as refused:
                await trio_relay.produce(url.replace("/rooms/1", "/rooms/3"), "hi", headers=cookie)
            assert refused.value.status_code == 403
            nursery.cancel_scope.cancel()
