"""``trio-relay.v2`` end to end: many topics on one connection, against a real relay.

Deterministic: in-memory connections (:mod:`trio_relay.testing`) under
``MockClock(autojump_threshold=0)`` (the ``autojump_clock`` fixture), steps ordered with
``wait_all_tasks_blocked`` and the relay's ``wait_until``, never with sleeps; a few tests
use real sockets.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
from helpers import HOST, RawClient, wall_clock, without_epoch
from wsproto.events import AcceptConnection, Ping, Request

from trio_relay import RelayConfig, mint_token, serve_relay
from trio_relay.testing import MemoryRelay, open_memory_relay, socket_like_stream_pair

SECRET = "k" * 32
V2 = "trio-relay.v2"
__all__ = ["wall_clock"]  # a fixture, used by name


class Client:
    """A ``trio-relay.v2`` connection driven frame by frame."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, **fields: Any) -> None:
        await self.ws.send_message(json.dumps(fields))

    async def receive(self) -> dict[str, Any]:
        frame = await self.ws.get_message()
        assert isinstance(frame, str), frame
        value = json.loads(frame)
        assert isinstance(value, dict)
        return without_epoch(value)  # epochs: tests/test_epochs.py

    async def request(self, **fields: Any) -> dict[str, Any]:
        """Send a frame with an id and return the relay's answer to it (frames before it,
        messages say, are skipped)."""
        await self.send(**fields)
        while True:
            frame = await self.receive()
            if frame.get("id") == fields["id"]:
                return frame

    async def subscribe(self, topic: str, since: int | None = None) -> dict[str, Any]:
        fields: dict[str, Any] = {"type": "subscribe", "topic": topic, "id": f"sub-{topic}"}
        if since is not None:
            fields["since"] = since
        answer = await self.request(**fields)
        assert answer["type"] == "subscribed", answer
        return answer


@asynccontextmanager
async def v2_client(
    relay: MemoryRelay, path: str = "/", *, queue: int = 256, token: str | None = None
) -> AsyncIterator[Client]:
    stream = await relay.open_stream()
    headers = [("Authorization", f"Bearer {token}")] if token is not None else None
    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(
            nursery,
            stream,  # type: ignore[arg-type]
            HOST,
            path,
            subprotocols=[V2],
            extra_headers=headers,
            message_queue_size=queue,
        )
        assert ws.subprotocol == V2
        try:
            yield Client(ws)
        finally:
            with trio.move_on_after(relay.server.config.close_timeout):
                await ws.aclose()
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- requests


async def test_subscribe_publish_unsubscribe_are_each_answered(autojump_clock: Any) -> None:
    async with open_memory_relay() as relay, v2_client(relay) as client:
        await relay.publish("before", "news")
        assert await client.subscribe("news") == {
            "type": "subscribed",
            "topic": "news",
            "seq": 1,
            "id": "sub-news",
        }
        await client.subscribe("sport")
        await relay.publish("n2", "news")
        await relay.publish("s1", "sport")
        assert await client.receive() == {
            "type": "message",
            "topic": "news",
            "seq": 2,
            "text": "n2",
        }
        assert await client.receive() == {
            "type": "message",
            "topic": "sport",
            "seq": 1,
            "text": "s1",
        }
        # A publish names its topic, and need not be subscribed to.
        await client.send(type="publish", topic="other", text="hi", id=3)
        assert await client.receive() == {
            "type": "ack",
            "topic": "other",
            "seq": 1,
            "id": 3,
            "queued": 0,
            "dropped": 0,
            "evicted": 0,
        }
        await client.send(type="publish", topic="news", binary="AAEC", id=4)
        frames = [await client.receive(), await client.receive()]  # the echo and the ack
        assert {"type": "message", "topic": "news", "seq": 3, "binary": "AAEC"} in frames
        assert any(f["type"] == "ack" and f["id"] == 4 and f["queued"] == 1 for f in frames)
        assert await client.request(type="unsubscribe", topic="news", id=5) == {
            "type": "unsubscribed",
            "topic": "news",
            "id": 5,
        }
        # Nothing of an unsubscribed topic follows its answer; the others go on.
        await relay.publish("n4", "news")
        await relay.publish("s2", "sport")
        assert await client.receive() == {
            "type": "message",
            "topic": "sport",
            "seq": 2,
            "text": "s2",
        }
        assert relay.server.statistics().subscribers == 1


async def test_subscribe_with_since_replays_then_goes_live(autojump_clock: Any) -> None:
    config = RelayConfig(history_size=3)
    async with open_memory_relay(config) as relay, v2_client(relay) as client:
        for n in range(1, 6):
            await relay.publish(f"m{n}", "news")
        answer = await client.request(type="subscribe", topic="news", since=1, id=1)
        assert answer == {"type": "subscribed", "topic": "news", "seq": 5, "id": 1}
        assert await client.receive() == {
            "type": "gap",
            "topic": "news",
            "since": 1,
            "first": 3,
            "reset": False,
        }
        assert [(await client.receive())["seq"] for _ in range(3)] == [3, 4, 5]
        await relay.publish("m6", "news")
        assert (await client.receive())["seq"] == 6


async def test_subscribed_comes_before_any_message_published_meanwhile(
    autojump_clock: Any,
) -> None:
    async with open_memory_relay() as relay, v2_client(relay) as client:

        async def publish_busily() -> None:
            for n in range(300):
                await relay.publish(f"m{n}", "a")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_busily)
            await trio.sleep(0)
            await client.send(type="subscribe", topic="a", id=1)
            first = await client.receive()
            assert first["type"] == "subscribed", first
            seqs = [(await client.receive())["seq"] for _ in range(300 - first["seq"])]
        assert first["seq"] > 0  # the subscribe did land among the publishes
        assert seqs == list(range(first["seq"] + 1, 301))


async def test_the_path_names_the_first_topic(autojump_clock: Any) -> None:
    async with open_memory_relay() as relay:
        await relay.publish("old", "news")
        async with v2_client(relay, "/news?since=0") as client:
            assert await client.receive() == {"type": "subscribed", "topic": "news", "seq": 1}
            assert (await client.receive())["text"] == "old"
        async with v2_client(relay, "/") as client:
            # "/" subscribes nothing: a publish to the root topic does not reach it.
            await relay.publish("root")
            await client.send(type="publish", topic="x", text="ping", id="p")
            assert (await client.receive())["type"] == "ack"


async def test_bad_requests_get_errors_with_their_id_and_the_connection_goes_on(
    autojump_clock: Any,
) -> None:
    async with open_memory_relay() as relay, v2_client(relay) as client:
        await client.subscribe("a")
        cases = [
            ({"type": "subscribe", "topic": "a"}, "already-subscribed"),
            ({"type": "unsubscribe", "topic": "b"}, "not-subscribed"),
            ({"type": "subscribe", "topic": "b//c"}, "bad-topic"),
            ({"type": "subscribe", "topic": "b", "since": -4}, "bad-since"),
            ({"type": "publish", "topic": "a"}, "bad-payload"),
            ({"type": "publish", "text": "no topic"}, "bad-frame"),
            ({"type": "hello"}, "unknown-type"),
        ]
        for number, (fields, code) in enumerate(cases):
            answer = await client.request(**fields, id=number)
            assert (answer["type"], answer["code"], answer["id"]) == ("error", code, number)
        await client.ws.send_message(b"\x00binary")
        assert (await client.receive())["code"] == "binary-frame"
        await relay.publish("still here", "a")
        assert (await client.receive())["text"] == "still here"


async def test_forbidden_refuses_that_subscription_only(autojump_clock: Any) -> None:
    config = RelayConfig(auth_secret=SECRET)
    token = mint_token(SECRET, subscribe=["news/*"], publish=["news/chat"])
    async with open_memory_relay(config) as relay, v2_client(relay, token=token) as client:
        await client.subscribe("news/a")
        answer = await client.request(type="subscribe", topic="secret", id=2)
        assert (answer["code"], answer["id"], answer["topic"]) == ("forbidden", 2, "secret")
        answer = await client.request(type="publish", topic="news/a", text="x", id=3)
        assert (answer["code"], answer["id"], answer["topic"]) == ("forbidden", 3, "news/a")
        answer = await client.request(type="publish", topic="news/chat", text="y", id=4)
        assert answer["type"] == "ack"
        await relay.publish("for a", "news/a")
        assert (await client.receive())["text"] == "for a"
        assert relay.server.statistics().topics.keys() >= {"news/a"}
        assert "secret" not in relay.server.topics


async def test_the_cap_on_subscriptions_per_connection(autojump_clock: Any) -> None:
    config = RelayConfig(max_subscriptions_per_connection=2)
    async with open_memory_relay(config) as relay, v2_client(relay) as client:
        await client.subscribe("a")
        await client.subscribe("b")
        answer = await client.request(type="subscribe", topic="c", id="c")
        assert answer["code"] == "too-many-subscriptions" and answer["topic"] == "c"
        await client.request(type="unsubscribe", topic="a", id="ua")
        await client.subscribe("c")
        assert relay.server.statistics().subscribers == 2


async def test_server_limits_apply_per_subscribe(autojump_clock: Any) -> None:
    config = RelayConfig(max_subscribers_per_topic=1, max_topics=2)
    async with open_memory_relay(config) as relay, v2_client(relay) as first:
        await first.subscribe("a")
        async with v2_client(relay) as second:
            answer = await second.request(type="subscribe", topic="a", id=1)
            assert answer["code"] == "too-many-subscribers"
            await second.subscribe("b")
            # Two topics in use: a third cannot be made, by subscribe or by publish.
            answer = await second.request(type="subscribe", topic="c", id=2)
            assert answer["code"] == "too-many-topics" and answer["topic"] == "c"
            answer = await second.request(type="publish", topic="c", text="x", id=3)
            assert answer["code"] == "too-many-topics" and answer["id"] == 3
            # The slot on "a" comes back when the first client unsubscribes.
            await first.request(type="unsubscribe", topic="a", id="u")
            await second.subscribe("a")
        assert relay.server.limits.topic_subscribers("a") == 0


async def test_token_expiry_and_refresh_apply_to_v2(autojump_clock: Any, wall_clock: float) -> None:
    config = RelayConfig(auth_secret=SECRET, ping_interval=0)
    token = mint_token(SECRET, subscribe=["a", "b"], ttl=20, now=wall_clock)
    async with open_memory_relay(config) as relay, v2_client(relay, token=token) as client:
        await client.subscribe("a")
        await trio.sleep_until(15.0)
        narrower = mint_token(SECRET, subscribe=["b"], ttl=60, now=wall_clock + 15)
        answer = await client.request(type="refresh", token=narrower, id="r1")
        assert (answer["code"], answer["topic"]) == ("forbidden", "a")  # "a" is subscribed
        fresh = mint_token(SECRET, subscribe=["a", "b"], ttl=60, now=wall_clock + 15)
        answer = await client.request(type="refresh", token=fresh, id="r2")
        assert answer == {"type": "refreshed", "id": "r2", "exp": wall_clock + 75}
        await trio.sleep_until(30.0)  # past the first token's expiry
        await relay.publish("still here", "a")
        assert (await client.receive())["text"] == "still here"
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await client.receive()
        assert closed.value.reason.code == 4401
        assert 75.0 <= trio.current_time() < 76.0


# ---------------------------------------------------------------------------- fairness


async def test_a_busy_topic_does_not_starve_a_quiet_one(autojump_clock: Any) -> None:
    # The client stops reading; the busy topic's messages queue up, then one for the quiet
    # topic. Served in turn, the quiet one goes out among the first, not behind them all.
    async with open_memory_relay(capacity=4096) as relay, v2_client(relay, queue=1) as client:
        await client.subscribe("busy")
        await client.subscribe("quiet")
        for n in range(60):
            await relay.publish("b" * 200 + str(n), "busy")
        await relay.publish("hello", "quiet")
        topics = []
        while "quiet" not in topics:
            topics.append((await client.receive())["topic"])
        assert len(topics) < 30, topics  # some were in the pipe already; then it is its turn
        rest = [(await client.receive())["seq"] for _ in range(61 - len(topics))]
        assert rest[-1] == 60  # the busy topic loses nothing either


async def test_an_overflowing_subscription_is_unsubscribed_and_the_others_go_on(
    autojump_clock: Any,
) -> None:
    config = RelayConfig(queue_size=4, max_queue_bytes=2048, overflow_timeout=1.0)
    async with (
        open_memory_relay(config, capacity=2048) as relay,
        v2_client(relay, queue=1) as client,
    ):
        await client.subscribe("busy")
        await client.subscribe("quiet")
        await relay.publish("q1", "quiet")
        started = trio.current_time()
        for n in range(30):  # far more than its queue: it is evicted, after 1 s
            await relay.publish("b" * 500 + str(n), "busy")
        assert trio.current_time() - started == pytest.approx(1.0)
        await relay.publish("q2", "quiet")
        frames = []
        while not (frames and frames[-1].get("text") == "q2"):
            frames.append(await client.receive())
        notices = [f for f in frames if f["type"] == "unsubscribed"]
        assert notices == [
            {
                "type": "unsubscribed",
                "topic": "busy",
                "code": "slow-consumer",
                "detail": notices[0]["detail"],
            }
        ]
        assert [f["text"] for f in frames if f["topic"] == "quiet"] == ["q1", "q2"]
        # Nothing of "busy" after its notice; the connection and "quiet" go on.
        assert all(f["topic"] != "busy" for f in frames[frames.index(notices[0]) + 1 :])
        assert relay.server.statistics().subscribers == 1
        await relay.publish("q3", "quiet")
        assert (await client.receive())["text"] == "q3"
        await client.subscribe("busy", since=0)  # it may subscribe again


async def test_messages_of_several_topics_ready_together_go_out_in_one_write(
    autojump_clock: Any,
) -> None:
    writes: list[bytes] = []

    class Recording(trio.abc.SendStream):
        """The relay's end of the connection, recording each write it makes."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def send_nowait(self, data: bytes) -> int:
            sent: int = self.inner.send_nowait(data)
            if sent:
                writes.append(bytes(data[:sent]))
            return sent

        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            writes.append(bytes(data))
            await self.inner.send_all(data)

        async def wait_send_all_might_not_block(self) -> None:
            await self.inner.wait_send_all_might_not_block()

        async def aclose(self) -> None:
            await self.inner.aclose()

    async with open_memory_relay() as relay, trio.open_nursery() as nursery:
        client_end, relay_end = socket_like_stream_pair(capacity=1024)
        relay_end = trio.StapledStream(Recording(relay_end.send_stream), relay_end.receive_stream)
        nursery.start_soon(relay.server.serve_stream, relay_end)
        async with trio.open_nursery() as inner:
            ws = await trio_websocket.wrap_client_stream(
                inner,
                client_end,  # type: ignore[arg-type]
                HOST,
                "/",
                subprotocols=[V2],
                message_queue_size=1,
            )
            client = Client(ws)
            for topic in "abc":
                await client.subscribe(topic)
            # The client stops reading: the pipe fills, then each topic queues its own.
            for n in range(20):
                for topic in "abc":
                    await relay.publish(f"{topic}{n}" * 20, topic)
            writes.clear()
            for _ in range(60):
                await client.receive()
            joint = [w for w in writes if all(f'"topic":"{t}"'.encode() in w for t in "abc")]
            assert joint, [len(w) for w in writes]
            await ws.aclose()
            inner.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- together


async def test_raw_v1_and_v2_clients_share_a_topic(autojump_clock: Any) -> None:
    async with (
        open_memory_relay() as relay,
        v2_client(relay) as v2,
        relay.consume("news", envelope=True) as v1,
    ):
        raw = await RawClient.connect(relay, "/news")
        await v2.subscribe("news")
        await relay.server.wait_until(lambda s: s.subscribers == 3)
        await raw.send_text("from raw")
        await v2.send(type="publish", topic="news", text="from v2", id=1)
        await relay.produce("from v1", "news", envelope=True)
        assert [await raw.next_message() for _ in range(3)] == ["from raw", "from v2", "from v1"]
        v1_texts = [(await v1.__anext__()).data for _ in range(3)]
        assert v1_texts == ["from raw", "from v2", "from v1"]
        v2_frames = [await v2.receive() for _ in range(4)]
        assert [f["text"] for f in v2_frames if f["type"] == "message"] == [
            "from raw",
            "from v2",
            "from v1",
        ]
        assert [f["seq"] for f in v2_frames if f["type"] == "message"] == [1, 2, 3]


async def test_shutdown_writes_out_every_queue_before_1001(autojump_clock: Any) -> None:
    async with open_memory_relay(capacity=2048) as relay, v2_client(relay, queue=1) as client:
        await client.subscribe("a")
        await client.subscribe("b")
        for n in range(10):
            await relay.publish("x" * 300 + str(n), "a")
            await relay.publish("y" * 300 + str(n), "b")
        received = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.shutdown)
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    received.append(await client.receive())
        assert closed.value.reason.code == 1001
        assert [f["seq"] for f in received if f["topic"] == "a"] == list(range(1, 11))
        assert [f["seq"] for f in received if f["topic"] == "b"] == list(range(1, 11))


async def test_keepalive_pings_a_v2_client(autojump_clock: Any) -> None:
    config = RelayConfig(ping_interval=5, ping_timeout=5)
    async with open_memory_relay(config) as relay:
        async with v2_client(relay) as client:  # trio-websocket answers pings
            await client.subscribe("a")
            # Pinged at 5, 10, ... 30 s and answered; closed at 32 s, between two pings
            # (trio-websocket 0.12 fails when a ping meets its own close: see
            # test_session_closes_cleanly_under_pings in test_session.py).
            await trio.sleep(32)
            await relay.publish("alive", "a")
            assert (await client.receive())["text"] == "alive"
        # A client that does not answer pings (wsproto reports them; nobody replies).
        silent = RawClient(await relay.open_stream())
        await silent.send(Request(host=HOST, target="/", subprotocols=[V2]))
        assert isinstance(await silent.next_event(), AcceptConnection)
        started = trio.current_time()
        assert isinstance(await silent.next_event(), Ping)
        assert trio.current_time() - started == pytest.approx(5, abs=1.0)
        close = await silent.next_close()
        # Unanswered for ping_timeout: closed with 1011.
        assert close.code == 1011
        assert trio.current_time() - started == pytest.approx(10, abs=1.0)


# ---------------------------------------------------------------------------- real sockets


async def test_v2_over_real_sockets() -> None:
    config = RelayConfig(ping_interval=0)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_relay("127.0.0.1", 0, config=config, task_status=task_status)
        )
        with trio.fail_after(10):
            async with trio_websocket.open_websocket(
                "127.0.0.1", server.port, "/a", use_ssl=False, subprotocols=[V2]
            ) as ws:
                client = Client(ws)
                assert await client.receive() == {"type": "subscribed", "topic": "a", "seq": 0}
                await client.subscribe("b")
                big = "z" * 300_000  # more than a socket takes at once: resumed writes
                await server.publish(big, "a")
                await server.publish("small", "b")
                frames = [await client.receive(), await client.receive()]
                assert sorted((f["topic"], len(f["text"])) for f in frames) == [
                    ("a", 300_000),
                    ("b", 5),
                ]
                answer = await client.request(type="publish", topic="b", text="back", id=1)
                assert answer["type"] in ("ack", "message")
        nursery.cancel_scope.cancel()
