"""The HTTP API of the side port: ``POST /api/publish`` and ``GET /api/history``.

Determinism rules for this module:

* The decisions (routes, tokens, bodies, queries, answers) are tested as plain functions of
  ``trio_relay._httpapi``, without sockets.
* The publish timeout runs under ``autojump_clock`` against a :class:`Topics` whose
  subscriber never reads (virtual time: the 5 s are asserted exactly, and cost nothing).
* The rest talks to a real relay and side port on 127.0.0.1, port 0, with httpx (a plain
  HTTP client, under trio through anyio) and raw sockets where the bytes matter. Nothing
  sleeps: consumers are known to be subscribed by ``server.wait_until``, and a message that
  never arrives fails the test's ``trio.fail_after``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from helpers import without_epochs
from redis_support import RedisServer, redis_server

import trio_relay
from trio_relay import (
    SUBPROTOCOL,
    DeliveryReport,
    Gap,
    Message,
    RelayConfig,
    RelayServer,
    Topics,
    consume,
    serve_metrics,
    serve_relay,
)
from trio_relay._auth import OPEN, Grant
from trio_relay._httpapi import (
    ANSWER_TIME,
    PUBLISH_TIMEOUT,
    ApiError,
    PublishItem,
    batches,
    body_limit,
    check_content_type,
    grant_for,
    history_document,
    is_api_path,
    parse_history_query,
    parse_publish,
    publish,
    report_document,
    route,
)

__all__ = ["redis_server"]  # the fixture, used by name

SECRET = "s" * 32
DEADLINE = 10

# --------------------------------------------------------------------------------------------
# The decisions, without sockets
# --------------------------------------------------------------------------------------------


def test_api_paths_are_those_under_api() -> None:
    assert is_api_path(b"/api/publish")
    assert is_api_path(b"/api")
    assert is_api_path(b"/api/nope")
    assert not is_api_path(b"/apiary")
    assert not is_api_path(b"/healthz")


def test_routes_and_their_methods() -> None:
    assert route(b"POST", b"/api/publish") == "publish"
    assert route(b"GET", b"/api/history") == "history"
    assert route(b"HEAD", b"/api/history") == "history"
    with pytest.raises(ApiError) as unknown:
        route(b"GET", b"/api/nope")
    assert (unknown.value.status, unknown.value.code) == (404, "not-found")
    with pytest.raises(ApiError) as wrong:
        route(b"GET", b"/api/publish")
    assert (wrong.value.status, wrong.value.code) == (405, "method-not-allowed")
    assert wrong.value.headers == [(b"allow", b"POST")]
    with pytest.raises(ApiError) as wrong:
        route(b"DELETE", b"/api/history")
    assert wrong.value.headers == [(b"allow", b"GET, HEAD")]


def test_without_a_secret_every_request_may_do_everything() -> None:
    assert grant_for(None, []) is OPEN
    assert grant_for(None, [(b"authorization", b"Bearer nonsense")]) is OPEN


def test_with_a_secret_the_bearer_token_decides() -> None:
    token = trio_relay.mint_token(SECRET, publish=["news/*"], subscribe=["*"])
    grant = grant_for(SECRET, [(b"authorization", f"bearer {token}".encode())])
    assert grant == Grant(publish=("news/*",), subscribe=("*",), expires=grant.expires)
    assert grant.expires is not None
    for headers in (
        [],
        [(b"authorization", b"Bearer ")],
        [(b"authorization", f"Basic {token}".encode())],
        [(b"authorization", b"Bearer not-a-jwt")],
        [(b"authorization", f"Bearer {trio_relay.mint_token('t' * 32, publish=['*'])}".encode())],
        [(b"authorization", f"Bearer {trio_relay.mint_token(SECRET, ttl=-10)}".encode())],
    ):
        with pytest.raises(ApiError) as refused:
            grant_for(SECRET, headers)
        assert (refused.value.status, refused.value.code) == (401, "unauthorized")
        assert refused.value.headers == [(b"www-authenticate", b'Bearer realm="trio-relay"')]
        assert token not in refused.value.detail


def test_a_publish_body_must_be_declared_json() -> None:
    check_content_type([(b"content-type", b"application/json")])
    check_content_type([(b"content-type", b"Application/JSON; charset=utf-8")])
    for headers in ([], [(b"content-type", b"text/plain")], [(b"content-type", b"json")]):
        with pytest.raises(ApiError) as refused:
            check_content_type(headers)
        assert (refused.value.status, refused.value.code) == (415, "bad-content-type")


def test_the_body_limit_is_a_base64_message_plus_64_kib() -> None:
    assert body_limit(3) == 4 + 65536
    assert body_limit(1024 * 1024) == 1398101 + 65536


def test_a_publish_body_is_one_message_or_a_list() -> None:
    assert parse_publish(b'{"topic": "news", "text": "h\\u00e9"}', 100) == (
        [PublishItem("news", "hé".encode(), True)],
        False,
    )
    assert parse_publish(
        b'[{"topic": "", "binary": "AAE="}, {"topic": "a/b", "text": ""}]', 100
    ) == (
        [PublishItem("", b"\x00\x01", False), PublishItem("a/b", b"", True)],
        True,
    )
    assert parse_publish(b"[]", 100) == ([], True)
    assert parse_publish(b'{"topic": "n", "text": "' + b"x" * 100 + b'"}', 100)[0][0].payload == (
        b"x" * 100
    )


@pytest.mark.parametrize(
    ("body", "status", "code", "index"),
    [
        (b"{", 400, "not-json", None),
        (b"\xff\xfe\x00", 400, "not-json", None),
        (b"[" * 100_000, 400, "not-json", None),
        (b'"news"', 400, "bad-frame", None),
        (b"42", 400, "bad-frame", None),
        (b'{"text": "hi"}', 400, "bad-frame", None),
        (b'{"topic": 5, "text": "hi"}', 400, "bad-frame", None),
        (b'{"topic": "news", "text": "hi", "echo": false}', 400, "bad-frame", None),
        (b'{"topic": "/news", "text": "hi"}', 400, "bad-topic", None),
        (b'{"topic": "a//b", "text": "hi"}', 400, "bad-topic", None),
        (b'{"topic": "sp ace", "text": "hi"}', 400, "bad-topic", None),
        (b'{"topic": "news"}', 400, "bad-payload", None),
        (b'{"topic": "news", "text": "a", "binary": "AA=="}', 400, "bad-payload", None),
        (b'{"topic": "news", "text": 5}', 400, "bad-payload", None),
        (b'{"topic": "news", "text": "\\ud800"}', 400, "bad-payload", None),
        (b'{"topic": "news", "binary": "not base64!"}', 400, "bad-payload", None),
        (b'{"topic": "news", "binary": [1, 2]}', 400, "bad-payload", None),
        (b'{"topic": "news", "text": "' + b"x" * 101 + b'"}', 413, "too-large", None),
        (b'[{"topic": "a", "text": "ok"}, "no"]', 400, "bad-frame", 1),
        (b'[{"topic": "a", "text": "ok"}, {"topic": "a"}]', 400, "bad-payload", 1),
    ],
)
def test_a_bad_publish_body_is_refused_with_its_code(
    body: bytes, status: int, code: str, index: int | None
) -> None:
    with pytest.raises(ApiError) as refused:
        parse_publish(body, 100)
    assert (refused.value.status, refused.value.code, refused.value.index) == (status, code, index)
    error = refused.value.document()["error"]
    assert isinstance(error, dict)
    assert error["code"] == code
    assert ("index" in error) == (index is not None)


def test_client_text_in_an_error_is_quoted_and_cut() -> None:
    topic = "bad topic\n" + "x" * 500
    with pytest.raises(ApiError) as refused:
        parse_publish(json.dumps({"topic": topic, "text": "hi"}).encode(), 100)
    assert "\n" not in refused.value.detail
    assert "x" * 129 not in refused.value.detail
    token = trio_relay.mint_token(SECRET, publish=["**"])  # pasted as a topic by mistake
    with pytest.raises(ApiError) as refused:
        parse_publish(json.dumps({"topic": f"{token} ", "text": "hi"}).encode(), 100)
    assert refused.value.code == "bad-topic"
    assert token[:20] not in refused.value.detail


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"topic=news", ("news", None)),
        (b"topic=news&since=41", ("news", 41)),
        (b"topic=a%2Fb&since=0", ("a/b", 0)),
        (b"topic=&since=3", ("", 3)),
        (b"since=3&topic=news&token=ignored", ("news", 3)),
    ],
)
def test_a_history_query_names_a_topic_and_maybe_since(
    query: bytes, expected: tuple[str, int | None]
) -> None:
    assert parse_history_query(query) == expected


@pytest.mark.parametrize(
    ("query", "code"),
    [
        (b"", "bad-topic"),
        (b"since=3", "bad-topic"),
        (b"topic=a&topic=b", "bad-topic"),
        (b"topic=a//b", "bad-topic"),
        (b"topic=%2Fnews", "bad-topic"),
        (b"topic=news&since=-1", "bad-since"),
        (b"topic=news&since=x", "bad-since"),
        (b"topic=news&since=", "bad-since"),
        (b"topic=news&since=1&since=2", "bad-since"),
        (b"topic=news&since=%C2%B2", "bad-since"),  # "²" is a digit to str.isdigit()
        (b"topic=news&since=1234567890123456789", "bad-since"),
    ],
)
def test_a_bad_history_query_is_refused_with_its_code(query: bytes, code: str) -> None:
    with pytest.raises(ApiError) as refused:
        parse_history_query(query)
    assert (refused.value.status, refused.value.code) == (400, code)


def test_a_list_is_published_as_one_batch_per_topic_in_order_of_first_appearance() -> None:
    items = [PublishItem(topic, b"", True) for topic in ["b", "a", "b", "c", "a"]]
    assert batches(items) == [("b", [0, 2]), ("a", [1, 4]), ("c", [3])]


def test_a_report_gives_each_message_its_number_in_the_batch() -> None:
    report = DeliveryReport("news", 41, 3, queued=2, dropped=1, evicted=0)
    assert report_document(report, 2) == {
        "topic": "news",
        "seq": 43,
        "queued": 2,
        "dropped": 1,
        "evicted": 0,
    }
    remote = DeliveryReport("news", 41, 1, queued=2, dropped=0, evicted=0, remote=False)
    assert report_document(remote)["remote"] is False


def test_a_history_answer_carries_text_binary_and_the_gap() -> None:
    messages = [Message("news", 4, "d"), Message("news", 5, b"\x00\xff")]
    assert history_document("news", 5, Gap("news", 1, 4), messages) == {
        "topic": "news",
        "seq": 5,
        "gap": {"since": 1, "first": 4, "reset": False},
        "messages": [{"seq": 4, "text": "d"}, {"seq": 5, "binary": "AP8="}],
    }
    assert history_document("news", 0, None, []) == {"topic": "news", "seq": 0, "messages": []}


async def test_a_publish_that_cannot_finish_answers_503_after_the_publish_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(max_buffer=1, policy="block")
    async with topics.subscribe("stuck"):  # never read: its one slot fills, then publishers wait
        items = [PublishItem("free", b"a", True), *[PublishItem("stuck", b"x", True)] * 2]
        start = trio.current_time()
        # "free" goes first (its own batch); "stuck" takes the slot, then waits for room.
        await publish(topics, items[:2])
        with pytest.raises(ApiError) as refused:
            await publish(topics, items)
    assert trio.current_time() - start == PUBLISH_TIMEOUT
    assert (refused.value.status, refused.value.code) == (503, "timeout")
    assert "within 5 s" in refused.value.detail
    assert "1 of 3 messages published" in refused.value.detail


async def test_a_publish_stops_waiting_in_time_to_answer_before_the_request_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(max_buffer=1, policy="block")
    async with topics.subscribe("stuck"):
        await topics.publish("stuck", "fills the slot")
        start = trio.current_time()
        with trio.move_on_after(3.0) as request:  # the side port's request timeout, say
            with pytest.raises(ApiError) as refused:
                await publish(topics, [PublishItem("stuck", b"x", True)])
    assert not request.cancelled_caught
    assert trio.current_time() - start == 3.0 - ANSWER_TIME
    assert (refused.value.status, refused.value.code) == (503, "timeout")


async def test_a_publish_to_a_new_topic_past_max_topics_answers_503_too_many_topics(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(max_topics=1)
    async with topics.subscribe("busy"):  # the one topic there may be, in use
        items = [PublishItem("busy", b"a", True), PublishItem("new", b"b", True)]
        with pytest.raises(ApiError) as refused:
            await publish(topics, items)
    assert (refused.value.status, refused.value.code) == (503, "too-many-topics")
    assert "limit of 1 topics" in refused.value.detail
    assert "1 of 2 messages published" in refused.value.detail


# --------------------------------------------------------------------------------------------
# A real relay and its side port
# --------------------------------------------------------------------------------------------


@dataclass
class Relay:
    server: RelayServer
    http: httpx.AsyncClient
    port: int  # the side port

    def ws(self, topic: str = "") -> str:
        return f"ws://127.0.0.1:{self.server.port}/{topic}"


@asynccontextmanager
async def open_relay(**settings: Any) -> AsyncIterator[Relay]:
    """A relay on 127.0.0.1 with its side port, and an httpx client of the side port."""
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(serve_relay, "127.0.0.1", 0, config=RelayConfig(ping_interval=0, **settings))
        )
        [listener] = await nursery.start(serve_metrics, server, "127.0.0.1", 0)
        port = listener.socket.getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=DEADLINE) as http:
            yield Relay(server, http, port)
        nursery.cancel_scope.cancel()


def bearer(**claims: list[str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {trio_relay.mint_token(SECRET, **claims)}"}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """``response`` is the JSON error ``code`` with ``status``; returns the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    document = without_epochs(response.json())
    assert set(document) == {"error"}
    assert document["error"]["code"] == code
    assert isinstance(document["error"]["detail"], str)
    return document["error"]  # type: ignore[no-any-return]


async def test_publish_text_binary_and_a_list_and_read_them_back() -> None:
    with trio.fail_after(DEADLINE):
        async with open_relay() as relay:
            http = relay.http
            response = await http.post("/api/publish", json={"topic": "news", "text": "héllo"})
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"
            # Nobody subscribes: queued for no one.
            assert without_epochs(response.json()) == {
                "topic": "news",
                "seq": 1,
                "queued": 0,
                "dropped": 0,
                "evicted": 0,
            }
            response = await http.post(
                "/api/publish",
                json={"topic": "news", "binary": base64.b64encode(b"\x00\xff").decode()},
            )
            assert without_epochs(response.json())["seq"] == 2
            response = await http.post(
                "/api/publish",
                json=[
                    {"topic": "news", "text": "a"},
                    {"topic": "other", "text": "b"},
                    {"topic": "news", "text": "c"},
                ],
            )
            assert response.status_code == 200
            assert [(r["topic"], r["seq"]) for r in without_epochs(response.json())["results"]] == [
                ("news", 3),
                ("other", 1),
                ("news", 4),
            ]
            response = await http.get("/api/history", params={"topic": "news"})
            assert response.status_code == 200
            assert without_epochs(response.json()) == {
                "topic": "news",
                "seq": 4,
                "messages": [
                    {"seq": 1, "text": "héllo"},
                    {"seq": 2, "binary": "AP8="},
                    {"seq": 3, "text": "a"},
                    {"seq": 4, "text": "c"},
                ],
            }
            response = await http.get("/api/history", params={"topic": "news", "since": 3})
            assert without_epochs(response.json()) == {
                "topic": "news",
                "seq": 4,
                "messages": [{"seq": 4, "text": "c"}],
            }
            # The root topic, and a topic nobody used.
            response = await http.get("/api/history?topic=")
            assert without_epochs(response.json()) == {"topic": "", "seq": 0, "messages": []}
            head = await http.head("/api/history", params={"topic": "news"})
            assert head.status_code == 200
            assert head.content == b""


async def test_history_reports_the_gap_of_messages_no_longer_retained() -> None:
    with trio.fail_after(DEADLINE):
        async with open_relay(history_size=2) as relay:
            for text in "abcde":
                await relay.server.publish(text, "news")
            response = await relay.http.get("/api/history?topic=news&since=1")
            assert without_epochs(response.json()) == {
                "topic": "news",
                "seq": 5,
                "gap": {"since": 1, "first": 4, "reset": False},
                "messages": [{"seq": 4, "text": "d"}, {"seq": 5, "text": "e"}],
            }
            # Beyond the last number (as after a relay restart): a gap whose first is not
            # above since, then everything retained.
            response = await relay.http.get("/api/history?topic=news&since=9")
            assert without_epochs(response.json())["gap"] == {"since": 9, "first": 4, "reset": True}
            assert len(without_epochs(response.json())["messages"]) == 2


async def test_a_publish_reaches_raw_v1_and_v2_consumers_and_reports_them() -> None:
    with trio.fail_after(DEADLINE):
        async with (
            open_relay() as relay,
            consume(relay.ws("news")) as raw,
            consume(relay.ws("news"), envelope=True) as envelope,
            trio_relay.connect(relay.ws("")) as session,
            consume(relay.ws("elsewhere")) as bystander,
        ):
            await session.subscribe("news")
            await session.subscribe("other")
            await relay.server.wait_until(lambda s: s.subscribers == 5)
            response = await relay.http.post(
                "/api/publish",
                json=[
                    {"topic": "news", "text": "hello"},
                    {"topic": "news", "binary": base64.b64encode(b"\x01\x02").decode()},
                ],
            )
            assert without_epochs(response.json()) == {
                "results": [
                    {"topic": "news", "seq": 1, "queued": 3, "dropped": 0, "evicted": 0},
                    {"topic": "news", "seq": 2, "queued": 3, "dropped": 0, "evicted": 0},
                ]
            }
            assert [await anext(raw), await anext(raw)] == ["hello", b"\x01\x02"]
            expected = [Message("news", 1, "hello"), Message("news", 2, b"\x01\x02")]
            assert [await anext(envelope), await anext(envelope)] == expected
            assert [await anext(session), await anext(session)] == expected
            # The consumer of another topic got nothing of it, and still gets its own.
            await relay.server.publish("own", "elsewhere")
            assert await anext(bystander) == "own"
    assert SUBPROTOCOL == "trio-relay.v1"


async def test_every_bad_request_gets_its_json_error_and_the_relay_goes_on() -> None:
    with trio.fail_after(DEADLINE):
        async with open_relay() as relay, consume(relay.ws("news")) as bystander:
            await relay.server.wait_until(lambda s: s.subscribers == 1)
            http = relay.http
            post = partial(http.post, "/api/publish", headers={"Content-Type": "application/json"})
            assert_error(await post(content=b"{nope"), 400, "not-json")
            assert_error(await post(content=b'["news"]'), 400, "bad-frame")
            assert_error(await post(content=b'{"topic": 1, "text": "x"}'), 400, "bad-frame")
            assert_error(await post(content=b'{"text": "x"}'), 400, "bad-frame")
            assert_error(await post(content=b'{"topic": "a b", "text": "x"}'), 400, "bad-topic")
            assert_error(await post(content=b'{"topic": "n", "text": 1}'), 400, "bad-payload")
            error = assert_error(
                await post(content=b'[{"topic": "n", "text": "x"}, {"topic": "n", "binary": "!"}]'),
                400,
                "bad-payload",
            )
            assert error["index"] == 1
            assert_error(
                await http.post("/api/publish", content=b'{"topic": "n", "text": "x"}'),
                415,
                "bad-content-type",
            )
            assert_error(await http.get("/api/history"), 400, "bad-topic")
            assert_error(await http.get("/api/history?topic=n&since=-1"), 400, "bad-since")
            response = await http.get("/api/publish")
            assert_error(response, 405, "method-not-allowed")
            assert response.headers["allow"] == "POST"
            response = await http.post("/api/history", json={})
            assert_error(response, 405, "method-not-allowed")
            assert response.headers["allow"] == "GET, HEAD"
            assert_error(await http.get("/api/nope"), 404, "not-found")
            assert_error(await http.get("/api"), 404, "not-found")
            # Nothing of the bad list was published; the bystander still gets messages.
            assert (await http.get("/api/history?topic=n")).json()["messages"] == []
            await post(json={"topic": "news", "text": "still here"})
            assert await anext(bystander) == "still here"


async def test_tokens_decide_who_publishes_and_reads_what() -> None:
    with trio.fail_after(DEADLINE):
        async with open_relay(auth_secret=SECRET) as relay:
            http = relay.http
            message = {"topic": "news/a", "text": "x"}
            response = await http.post("/api/publish", json=message)
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == 'Bearer realm="trio-relay"'
            token = trio_relay.mint_token(SECRET, publish=["news/*"])
            # Never from the query string on this port.
            response = await http.post(f"/api/publish?token={token}", json=message)
            assert_error(response, 401, "unauthorized")
            response = await http.post(
                "/api/publish", json=message, headers={"Authorization": "Bearer forged"}
            )
            error = assert_error(response, 401, "unauthorized")
            assert "forged" not in error["detail"]
            writer = bearer(publish=["news/*"])
            response = await http.post("/api/publish", json=message, headers=writer)
            assert response.status_code == 200
            # A list with one forbidden topic publishes nothing.
            response = await http.post(
                "/api/publish",
                json=[message, {"topic": "secret", "text": "y"}],
                headers=writer,
            )
            assert_error(response, 403, "forbidden")
            # The writer may not read; a reader may read what its patterns allow.
            assert_error(
                await http.get("/api/history?topic=news/a", headers=writer), 403, "forbidden"
            )
            assert_error(await http.get("/api/history?topic=news/a"), 401, "unauthorized")
            reader = bearer(subscribe=["news/*"])
            response = await http.get("/api/history?topic=news/a", headers=reader)
            assert without_epochs(response.json()) == {
                "topic": "news/a",
                "seq": 1,
                "messages": [{"seq": 1, "text": "x"}],
            }
            assert_error(
                await http.get("/api/history?topic=secret", headers=reader), 403, "forbidden"
            )
            assert_error(
                await http.post("/api/publish", json=message, headers=reader), 403, "forbidden"
            )


async def test_a_body_over_the_limit_is_refused_with_413_and_nothing_is_published() -> None:
    # max_message_size 3000: the body limit is 4000 + 64 KiB.
    limit = body_limit(3000)
    with trio.fail_after(DEADLINE):
        async with open_relay(max_message_size=3000) as relay:
            http = relay.http
            over = json.dumps({"topic": "news", "text": "x" * limit}).encode()
            response = await http.post(
                "/api/publish", content=over, headers={"Content-Type": "application/json"}
            )
            assert_error(response, 413, "too-large")

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
                for start in range(0, len(over), 8192):
                    yield over[start : start + 8192]

            response = await http.post(
                "/api/publish", content=chunks(), headers={"Content-Type": "application/json"}
            )
            assert "content-length" not in response.request.headers
            assert_error(response, 413, "too-large")
            # Under the body limit but one message over max_message_size.
            response = await http.post("/api/publish", json={"topic": "news", "text": "x" * 3001})
            assert_error(response, 413, "too-large")
            # Just at both limits: fine.
            response = await http.post("/api/publish", json={"topic": "news", "text": "x" * 3000})
            assert response.status_code == 200
            assert without_epochs(response.json())["seq"] == 1


async def test_a_client_that_expects_100_continue_gets_it_then_the_answer() -> None:
    body = b'{"topic": "news", "text": "hi"}'
    with trio.fail_after(DEADLINE):
        async with open_relay() as relay:
            stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
            async with stream:
                await stream.send_all(
                    b"POST /api/publish HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
                )
                assert (await stream.receive_some()).startswith(b"HTTP/1.1 100 ")
                await stream.send_all(body)
                response = b""
                while chunk := await stream.receive_some():
                    response += chunk
    assert response.startswith(b"HTTP/1.1 200 ")
    assert json.loads(response.partition(b"\r\n\r\n")[2])["seq"] == 1


async def test_the_side_port_still_serves_its_other_pages() -> None:
    with trio.fail_after(DEADLINE):
        async with open_relay() as relay:
            assert (await relay.http.get("/healthz")).json()["status"] == "ok"
            assert (await relay.http.post("/healthz")).status_code == 405
            assert (await relay.http.get("/nope")).status_code == 404


async def test_a_client_refused_before_its_body_can_still_send_it_all_then_read_the_answer() -> (
    None
):
    # Like http.client (urllib): it writes the whole body before reading, and a write that
    # fails (the relay closed with unread data: a reset) would hide the 413 from it.
    body = b"x" * 4_000_000
    with trio.fail_after(DEADLINE):
        async with open_relay() as relay:
            stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
            async with stream:
                await stream.send_all(
                    b"POST /api/publish HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body)
                )
                for start in range(0, len(body), 65536):
                    await stream.send_all(body[start : start + 65536])
                response = b""
                while chunk := await stream.receive_some():
                    response += chunk
    # With its reason phrase ("Content Too Large" since Python 3.13).
    assert response.startswith(f"HTTP/1.1 413 {HTTPStatus(413).phrase}\r\n".encode())
    assert json.loads(response.partition(b"\r\n\r\n")[2])["error"]["code"] == "too-large"


async def test_with_a_backplane_a_publish_reaches_the_other_relays_and_says_remote(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(DEADLINE):
        async with (
            open_relay(backplane=redis_server.url) as a,
            open_relay(backplane=redis_server.url) as b,
            consume(b.ws("news"), envelope=True) as on_b,
        ):
            await b.server.wait_until(lambda s: s.subscribers == 1)
            response = await a.http.post("/api/publish", json={"topic": "news", "text": "hi"})
            # Queued for nobody on relay a, whose report it is; remote: it went through Redis.
            assert without_epochs(response.json()) == {
                "topic": "news",
                "seq": 1,
                "queued": 0,
                "dropped": 0,
                "evicted": 0,
                "remote": True,
            }
            assert await anext(on_b) == Message("news", 1, "hi")
            response = await b.http.get("/api/history?topic=news&since=0")
            assert without_epochs(response.json())["messages"] == [{"seq": 1, "text": "hi"}]
