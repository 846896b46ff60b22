"""produce() and consume(): the seed's clients, and the errors they raise.

In-memory connections under the autojump clock, except where a real socket is the point
(an unreachable address).
"""

from __future__ import annotations

import socket
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from trio_relay import (
    Broadcast,
    BroadcastStatistics,
    ClientError,
    HandshakeRejected,
    PublishReport,
    RelayConfig,
    RelayConnectionClosed,
    RelayError,
    RelayTimeout,
    RelayUnavailable,
    Subscription,
    Topics,
    consume,
    encode_frame,
    produce,
    serve_relay,
)
from trio_relay._topics import Batch
from trio_relay.testing import MemoryListener, MemoryRelay, open_memory_relay


class _Bus:
    """A broadcast wrapper whose publish() a test can bend."""

    def __init__(self, *, swallow: bool = False, noise: bytes | None = None) -> None:
        self.inner = Broadcast[Batch | bytes](size_of=len)
        self.swallow = swallow
        self.noise = noise

    def subscribe(self, **kwargs: Any) -> AbstractAsyncContextManager[Subscription[bytes]]:
        return self.inner.subscribe(**kwargs)

    async def publish(self, message: bytes) -> PublishReport:
        if self.swallow:
            return PublishReport(queued=0, dropped=0, evicted=0)
        if self.noise is not None:
            await self.inner.publish(self.noise)
        return await self.inner.publish(message)

    def publish_nowait(self, message: bytes) -> PublishReport:
        raise trio.WouldBlock  # always take the async path, where the test bends things

    def statistics(self) -> BroadcastStatistics:
        return self.inner.statistics()


async def _relay_with(nursery: trio.Nursery, bus: _Bus) -> MemoryRelay:
    listener = MemoryListener()
    topics = Topics(broadcast_factory=lambda _name: bus)
    server = await nursery.start(partial(serve_relay, listeners=[listener], topics=topics))
    return MemoryRelay(server, listener, nursery.cancel_scope, trio.Event())


async def test_produce_returns_once_its_own_echo_arrives(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, relay.consume() as messages:
        await relay.produce("ack me")
        assert await anext(messages) == "ack me"
        assert relay.server.statistics().broadcast.published == 1


async def test_produce_skips_other_messages_until_its_echo(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        bus = _Bus(noise=encode_frame("someone else's"))
        relay = await _relay_with(nursery, bus)
        async with relay.consume() as messages:
            await relay.produce("mine")
            assert [await anext(messages), await anext(messages)] == ["someone else's", "mine"]
        nursery.cancel_scope.cancel()


async def test_produce_times_out_when_no_echo_comes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        relay = await _relay_with(nursery, _Bus(swallow=True))
        start = trio.current_time()
        with pytest.raises(RelayTimeout) as raised:
            await relay.produce("lost", timeout=7.0)
        assert trio.current_time() - start == 7.0
        assert raised.value.url == relay.url
        assert "not acknowledged within 7.0 s" in str(raised.value)
        nursery.cancel_scope.cancel()


async def test_a_refused_handshake_raises_handshake_rejected_with_the_status(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        url = "ws://relay.test/not//a/topic"
        with pytest.raises(HandshakeRejected) as raised:
            await produce(url, "x", stream=await relay.open_stream())
        assert raised.value.status_code == 400
        assert raised.value.url == url
        assert "HTTP 400" in str(raised.value)
        assert "single '/'" in str(raised.value)


async def test_a_relay_that_never_answers_the_handshake_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listener = MemoryListener()  # accepts nothing: the request sits unanswered
    start = trio.current_time()
    with pytest.raises(RelayTimeout):
        async with consume(
            "ws://silent.test/", connect_timeout=3.0, stream=await listener.connect()
        ):
            pytest.fail("connected to a relay that never answered")  # pragma: no cover
    assert trio.current_time() - start == 3.0


async def test_an_unreachable_relay_raises_relay_unavailable() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago, now closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/"
    with pytest.raises(RelayUnavailable) as raised:
        await produce(url, "anyone?")
    assert raised.value.url == url
    assert isinstance(raised.value, ClientError)
    assert isinstance(raised.value, RelayError)


async def test_consume_raises_relay_connection_closed_1001_when_the_relay_shuts_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, relay.consume() as messages:
        await relay.publish("before")
        assert await anext(messages) == "before"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.shutdown)
            with pytest.raises(RelayConnectionClosed) as raised:
                await anext(messages)
        assert raised.value.code == 1001
        assert raised.value.reason == "relay shutting down"


async def test_consume_raises_1008_when_this_consumer_was_evicted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(queue_size=2, overflow_timeout=1.0, slow_consumer_timeout=5.0)
    async with (
        open_memory_relay(config, capacity=512) as relay,
        relay.consume() as messages,
    ):
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(relay.publish, f"{i}" * 100)
        assert relay.server.statistics().broadcast.evicted == 1
        with pytest.raises(RelayConnectionClosed) as raised:
            async for _ in messages:
                pass
        assert raised.value.code == 1008


async def test_messages_can_be_sent_on_a_consuming_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, relay.consume() as a, relay.consume() as b:
        await a.send(b"\x01binary")
        assert await anext(a) == b"\x01binary"
        assert await anext(b) == b"\x01binary"
