"""``trio_relay.connect``: the Python client of ``trio-relay.v2``.

Against a real relay over in-memory connections (``connector=relay.open_stream``) under
``MockClock(autojump_threshold=0)``; a few tests over real sockets.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
from helpers import HOST
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request
from wsproto.utilities import LocalProtocolError

import trio_relay
from trio_relay import (
    DeliveryReport,
    Gap,
    HandshakeRejected,
    Message,
    PublishRejected,
    RelayConfig,
    RelayConnectionClosed,
    SubscriptionRejected,
    Unsubscribed,
    mint_token,
)
from trio_relay.testing import MemoryRelay, open_memory_relay, socket_like_stream_pair

SECRET = "q" * 32


@asynccontextmanager
async def session_of(relay: MemoryRelay, path: str = "/", **options: Any) -> AsyncIterator[Any]:
    async with trio_relay.connect(
        relay.url + path.lstrip("/"), connector=relay.open_stream, **options
    ) as session:
        yield session


async def test_subscribe_publish_receive_unsubscribe(autojump_clock: Any) -> None:
    async with open_memory_relay() as relay, session_of(relay) as session:
        await relay.publish("old", "news")
        assert await session.subscribe("news") == 1
        assert await session.subscribe("sport", since=0) == 0
        report = await session.publish("news", "hello")
        assert report == DeliveryReport("news", 2, 1, 1, 0, 0)
        await relay.publish(b"\x00\x01", "sport")
        items = [await session.__anext__(), await session.__anext__()]
        assert items == [Message("news", 2, "hello"), Message("sport", 1, b"\x00\x01")]
        assert session.topics == {"news": 2, "sport": 1}
        await session.unsubscribe("news")
        assert session.topics == {"sport": 1}
        await relay.publish("unheard", "news")
        await session.publish("sport", "s2", echo=True)
        assert await session.__anext__() == Message("sport", 2, "s2")
        # echo=False: published (and counted), not sent back to this session.
        report = await session.publish("sport", "quiet", echo=False)
        assert report.seq == 3
        await relay.publish("s4", "sport")
        assert await session.__anext__() == Message("sport", 4, "s4")


async def test_the_url_may_name_the_first_topic(autojump_clock: Any) -> None:
    config = RelayConfig(history_size=2)
    async with open_memory_relay(config) as relay:
        for n in range(1, 5):
            await relay.publish(f"m{n}", "news")
        async with session_of(relay, "/news?since=1") as session:
            assert await session.__anext__() == Gap("news", 1, 3)
            assert [(await session.__anext__()).seq for _ in range(2)] == [3, 4]
            assert session.topics == {"news": 4}


async def test_refusals_are_exceptions_and_the_session_goes_on(autojump_clock: Any) -> None:
    config = RelayConfig(auth_secret=SECRET, max_subscriptions_per_connection=2)
    token = mint_token(SECRET, subscribe=["news/*"], publish=["news/chat"])
    async with open_memory_relay(config) as relay, session_of(relay, token=token) as session:
        with pytest.raises(SubscriptionRejected) as refused:
            await session.subscribe("secret")
        assert (refused.value.code, refused.value.topic) == ("forbidden", "secret")
        assert "secret" not in session.topics
        await session.subscribe("news/a")
        with pytest.raises(SubscriptionRejected) as refused:
            await session.subscribe("news/a")
        assert refused.value.code == "already-subscribed"
        await session.subscribe("news/b")
        with pytest.raises(SubscriptionRejected) as refused:
            await session.subscribe("news/c")
        assert refused.value.code == "too-many-subscriptions"
        with pytest.raises(PublishRejected) as rejected:
            await session.publish("news/a", "no")
        assert rejected.value.code == "forbidden"
        with pytest.raises(SubscriptionRejected):
            await session.unsubscribe("nothing")
        with pytest.raises(ValueError, match="topic names"):
            await session.subscribe("bad//name")
        assert (await session.publish("news/chat", "yes")).seq == 1
        await relay.publish("still", "news/a")
        assert await session.__anext__() == Message("news/a", 1, "still")
        assert token not in repr(session)


async def test_a_refused_handshake_raises_from_connect(autojump_clock: Any) -> None:
    config = RelayConfig(auth_secret=SECRET)
    async with open_memory_relay(config) as relay:
        with pytest.raises(HandshakeRejected) as refused:
            async with session_of(relay):
                pytest.fail("connected without a token")
        assert refused.value.status_code == 401
        with pytest.raises(HandshakeRejected) as refused:
            async with session_of(relay, resume=True, token="not-a-jwt") as session:
                await session.subscribe("a")  # resuming: the refusal ends the session here
        assert refused.value.status_code == 401


async def test_without_resume_a_lost_connection_ends_the_session(autojump_clock: Any) -> None:
    async with open_memory_relay() as relay, session_of(relay) as session:
        await session.subscribe("a")
        await relay.drop_connections()
        with pytest.raises(RelayConnectionClosed) as closed:
            await session.__anext__()
        assert closed.value.code == 1006
        with pytest.raises(RelayConnectionClosed):
            await session.publish("a", "x")


async def test_resume_resubscribes_every_topic_from_its_last_number(autojump_clock: Any) -> None:
    states: list[str] = []
    async with (
        open_memory_relay() as relay,
        session_of(relay, resume=True, on_state=lambda s: states.append(s.state)) as session,
    ):
        await session.subscribe("a")
        await session.subscribe("b")
        await relay.publish("a1", "a")
        assert await session.__anext__() == Message("a", 1, "a1")
        for _ in range(3):
            assert await relay.drop_connections() == 1
            # Published while the session is away: it gets them once it is back.
            await relay.publish("a-during", "a")
            await relay.publish("b-during", "b")
            # The dropped connection ends first (after its turn: see _wait_turn), then the
            # session's new one subscribes (after its backoff).
            await relay.server.wait_until(lambda s: s.connections == 0)
            await relay.server.wait_until(lambda s: s.subscribers == 2)
        items = [await session.__anext__() for _ in range(6)]
        assert [(i.topic, i.seq) for i in items if i.topic == "a"] == [("a", 2), ("a", 3), ("a", 4)]
        assert [(i.topic, i.seq) for i in items if i.topic == "b"] == [("b", 1), ("b", 2), ("b", 3)]
        # A publish and a subscribe made while it reconnects wait for the connection.
        await relay.drop_connections()
        report = await session.publish("a", "after")
        assert report.seq == 5
        assert await session.subscribe("c") == 0
        assert await session.__anext__() == Message("a", 5, "after")
        assert session.topics == {"a": 5, "b": 3, "c": 0}
    assert states[:2] == ["connecting", "connected"]
    assert states.count("retrying") == 4


async def test_resume_across_a_relay_restart_reports_the_reset(autojump_clock: Any) -> None:
    relays: list[MemoryRelay] = []

    async def connector() -> trio.abc.Stream:
        return await relays[-1].open_stream()

    async with open_memory_relay() as first:
        relays.append(first)
        async with trio_relay.connect(first.url, connector=connector, resume=True) as session:
            await session.subscribe("news")
            for n in range(3):
                await first.publish(f"n{n}", "news")
            assert [(await session.__anext__()).seq for _ in range(3)] == [1, 2, 3]
            async with open_memory_relay() as second:  # a restarted relay: numbering anew
                relays.append(second)
                await first.shutdown()
                await second.server.wait_until(lambda s: s.subscribers == 1)
                await second.publish("fresh", "news")
                gap = await session.__anext__()
                assert isinstance(gap, Gap) and gap.reset and gap.since == 3
                assert await session.__anext__() == Message("news", 1, "fresh")


async def test_an_overflowing_subscription_is_reported(autojump_clock: Any) -> None:
    config = RelayConfig(queue_size=2, max_queue_bytes=1024, overflow_timeout=0.5)
    async with (
        open_memory_relay(config, capacity=1024) as relay,
        session_of(relay, max_buffer=1) as session,
    ):
        await session.subscribe("busy")
        await session.subscribe("quiet")
        for n in range(150):  # the session does not iterate: its buffers and the relay's fill
            await relay.publish("x" * 300 + str(n), "busy")
        await relay.publish("q", "quiet")
        items = []
        while not items or items[-1] != Message("quiet", 1, "q"):
            items.append(await session.__anext__())
        (notice,) = [item for item in items if isinstance(item, Unsubscribed)]
        busy = [item.seq for item in items if isinstance(item, Message) and item.topic == "busy"]
        assert notice == Unsubscribed("busy", "slow-consumer", notice.detail, busy[-1])
        assert "busy" not in session.topics
        # Subscribing again from its last number gets what was missed, or says what is lost.
        await session.subscribe("busy", since=notice.last)
        item = await session.__anext__()
        assert item == Message("busy", busy[-1] + 1, item.data) or isinstance(item, Gap)


async def test_real_sockets_with_a_token() -> None:
    config = RelayConfig(auth_secret=SECRET, ping_interval=0)
    token = mint_token(SECRET, subscribe=["**"], publish=["**"])
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: trio_relay.serve_relay(
                "127.0.0.1", 0, config=config, task_status=task_status
            )
        )
        with trio.fail_after(10):
            url = f"ws://127.0.0.1:{server.port}/a"
            async with trio_relay.connect(url, token=token) as session:
                await session.subscribe("b")
                await session.publish("a", "to a")
                await session.publish("b", "to b")
                got = {(await session.__anext__()).topic for _ in range(2)}
                assert got == {"a", "b"}
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- trio-websocket


async def ping_on_close_server(stream: trio.abc.Stream) -> None:
    """A server that answers a client's close frame with a ping first, then the close:
    legal (RFC 6455 lets frames cross a close), and what a relay's keepalive ping in
    flight looks like to a closing client."""
    ws = WSConnection(ConnectionType.SERVER)
    while True:
        data = await stream.receive_some()
        if not data:
            return
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, Request):
                await stream.send_all(ws.send(AcceptConnection(subprotocol=event.subprotocols[0])))
            elif isinstance(event, CloseConnection):
                # By hand: wsproto sends nothing but the answer once the client closed.
                await stream.send_all(b"\x89\x04late" + ws.send(event.response()))
                return


async def test_trio_websocket_still_fails_on_a_ping_during_its_close(autojump_clock: Any) -> None:
    # Pins the dependency's bug (trio-websocket issue 184, fix pending in PR 198) that
    # Session works around: when this starts to pass, drop the workaround in _session.py.
    client, server = socket_like_stream_pair()
    with pytest.raises(BaseExceptionGroup) as failed:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping_on_close_server, server)
            async with trio.open_nursery() as inner:
                ws = await trio_websocket.wrap_client_stream(
                    inner, client, HOST, "/", subprotocols=["x"]
                )  # type: ignore[arg-type]
                await ws.aclose()
    assert failed.group_contains(LocalProtocolError)


async def test_session_closes_cleanly_under_pings(autojump_clock: Any) -> None:
    client, server = socket_like_stream_pair()

    async def connector() -> trio.abc.Stream:
        return client

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ping_on_close_server, server)
        async with trio_relay.connect("ws://relay.test/", connector=connector) as session:
            assert session.topics == {}
    # Reaching here is the test: the session's close met the ping and raised nothing.
    with contextlib.suppress(trio.ClosedResourceError):
        await server.aclose()
