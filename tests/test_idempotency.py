"""Idempotency keys: a publish that carries one is published once per topic and window, so
that a client that did not hear back (``remote: null``, a lost connection) can publish it
again safely (PROTOCOL.md ``publish``, README "Scaling out").

In-memory relays under ``MockClock(autojump_threshold=0)``; the backplane's keys, kept in
Redis, against a real ``redis-server`` at the end.
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio
import trio.testing
from helpers import HOST, RawClient
from redis_support import RedisServer, redis_server
from test_backplane import LIMIT, collect, relays, subscribed, ws
from wsproto.events import AcceptConnection, Request, TextMessage

import trio_relay
from trio_relay import SUBPROTOCOL, Message, Topics
from trio_relay._idempotency import RecentKeys, check_key
from trio_relay.testing import open_memory_relay

__all__ = ["redis_server"]  # the fixture, used by name


async def test_a_key_publishes_once_per_topic_within_the_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    topics = Topics(idempotency_window=60)
    async with topics.subscribe("t") as subscription:
        first = await topics.publish("t", "once", idempotency_key="k1")
        again = await topics.publish("t", "once", idempotency_key="k1")
        assert (again.seq, again.epoch, again.duplicate) == (first.seq, first.epoch, True)
        assert (again.queued, first.duplicate) == (0, False)
        other_topic = await topics.publish("u", "same key, another topic", idempotency_key="k1")
        assert (other_topic.seq, other_topic.duplicate) == (1, False)
        # Synchronous publishing knows the key too.
        assert topics.publish_nowait("t", [b"once"], [True], idempotency_key="k1").duplicate
        await trio.sleep(61)  # past the window: the key is forgotten
        later = await topics.publish("t", "once more", idempotency_key="k1")
        assert (later.seq, later.duplicate) == (2, False)
        received = [await subscription.receive() for _ in range(2)]
    assert received == [Message("t", 1, "once"), Message("t", 2, "once more")]
    with pytest.raises(ValueError, match="names one message"):
        await topics.publish_batch("t", [b"a", b"b"], [True, True], idempotency_key="k2")


def test_recent_keys_are_bounded_and_checked() -> None:
    keys = RecentKeys(window=10, max_keys=2)
    keys.add("t", "a", "e", 1, now=0)
    keys.add("t", "b", "e", 2, now=1)
    keys.add("t", "c", "e", 3, now=2)  # over the bound: the oldest goes
    assert (keys.get("t", "a", 2), keys.get("t", "c", 2)) == (None, ("e", 3))
    assert keys.get("t", "b", 11.5) is None and len(keys) == 1  # past the window
    for bad in ("", "x" * 129, 5, None):
        with pytest.raises(ValueError, match="1 to 128 characters"):
            check_key(bad)


async def test_an_envelope_publish_with_a_key_is_acknowledged_once_and_duplicates_say_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        client = RawClient(await relay.open_stream())
        await client.send(Request(host=HOST, target="/t", subprotocols=[SUBPROTOCOL]))
        assert isinstance(await client.next_event(), AcceptConnection)
        assert json.loads(await client.next_message())["type"] == "welcome"
        frames = [
            {"type": "publish", "id": 1, "text": "a"},
            {"type": "publish", "id": 2, "text": "b", "idempotency_key": "key-b"},
            {"type": "publish", "id": 3, "text": "b", "idempotency_key": "key-b"},
            {"type": "publish", "id": 4, "text": "c"},
            {"type": "publish", "id": 5, "text": "x", "idempotency_key": ["not", "a", "key"]},
        ]
        # In one read: keyed frames are batches of their own, in their place.
        await client.send_raw(b"".join(client.ws.send(TextMessage(json.dumps(f))) for f in frames))
        received = [json.loads(await client.next_message()) for _ in range(8)]
    acks = {f["id"]: f for f in received if f["type"] in ("ack", "error")}
    messages = [f["text"] for f in received if f["type"] == "message"]
    assert messages == ["a", "b", "c"]
    assert [acks[i]["seq"] for i in (1, 2, 3, 4)] == [1, 2, 2, 3]
    assert "duplicate" not in acks[2] and acks[3]["duplicate"] is True
    assert (acks[5]["type"], acks[5]["code"]) == ("error", "bad-frame")
    assert "idempotency_key" in acks[5]["detail"]


async def test_the_python_clients_carry_the_key(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_relay() as relay:
        url = relay.url + "t"
        first = await trio_relay.produce(
            url, "hi", envelope=True, idempotency_key="k", stream=await relay.open_stream()
        )
        again = await trio_relay.produce(
            url, "hi", envelope=True, idempotency_key="k", stream=await relay.open_stream()
        )
        assert first is not None and again is not None
        assert (again.seq, again.duplicate, first.duplicate) == (first.seq, True, False)
        with pytest.raises(ValueError, match="envelope"):
            await trio_relay.produce(
                url, "raw", idempotency_key="k", stream=await relay.open_stream()
            )

        async def connector() -> trio.abc.Stream:
            return await relay.open_stream()

        async with trio_relay.connect(relay.url, connector=connector) as session:
            v2 = await session.publish("t", "hi", idempotency_key="k")
            fresh = await session.publish("t", "hi", idempotency_key="k2")
        assert (v2.seq, v2.duplicate) == (first.seq, True)
        assert (fresh.seq, fresh.duplicate) == (first.seq + 1, False)


async def test_the_http_api_takes_a_key_per_message() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_relay.serve_relay, "127.0.0.1", 0)
        listeners = await nursery.start(trio_relay.serve_metrics, server, "127.0.0.1", 0)
        port = listeners[0].socket.getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            with trio.fail_after(LIMIT):
                body = [
                    {"topic": "t", "text": "a"},
                    {"topic": "t", "text": "k", "idempotency_key": "k"},
                    {"topic": "t", "text": "b"},
                ]
                first = (await http.post("/api/publish", json=body)).json()["results"]
                again = (await http.post("/api/publish", json=body[1])).json()
                bad = await http.post("/api/publish", json={**body[1], "idempotency_key": ""})
        nursery.cancel_scope.cancel()
    assert [(r["seq"], r.get("duplicate")) for r in first] == [(1, None), (2, None), (3, None)]
    assert (again["seq"], again["duplicate"]) == (2, True)
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "bad-frame")


async def test_with_a_backplane_the_key_is_kept_in_redis_for_every_relay(
    redis_server: RedisServer,
) -> None:
    async with relays(redis_server.url, 2) as (a, b):
        got: list[Message] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, ws(b, "t"), 2, got, lambda: None)
            await subscribed(b, "t")
            with trio.fail_after(LIMIT):
                first = await a.topics.publish("t", "once", idempotency_key="k")
                again = await b.topics.publish("t", "once", idempotency_key="k")
                other = await b.topics.publish("t", "next")
    assert (first.remote, again.remote, again.duplicate) == (True, True, True)
    assert (again.seq, again.epoch) == (first.seq, first.epoch)
    assert [m.data for m in got] == ["once", "next"]  # once, though published twice
    assert other.seq == first.seq + 1


async def test_republishing_after_no_answer_is_safe(redis_server: RedisServer) -> None:
    # Redis frozen: the publish gets no answer (remote None) and never reaches the log
    # (its deadline); thawed, the same publish with the same key goes through once.
    async with relays(redis_server.url, 2, timeout=0.5, block=5.0) as (a, b):
        got: list[Message] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, ws(b, "t"), 2, got, lambda: None)
            await subscribed(b, "t")
            with trio.fail_after(LIMIT):
                await a.publish("warm", "t")
                redis_server.pause()
                unknown = await a.topics.publish("t", "important", idempotency_key="k")
                redis_server.resume()
                retried = await a.topics.publish("t", "important", idempotency_key="k")
                again = await a.topics.publish("t", "important", idempotency_key="k")
    assert unknown.remote is None
    assert (retried.remote, retried.duplicate, again.duplicate) == (True, False, True)
    assert again.seq == retried.seq
    assert [m.data for m in got] == ["warm", "important"]
