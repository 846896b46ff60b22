"""Liveness and limits: keepalive pings, connection and subscriber limits, the publish rate.

In-memory relays under the autojump clock; times are asserted exactly.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from helpers import RawClient, rejected, upgrade_request
from wsproto.events import CloseConnection, Ping

from trio_relay import CloseCode, RelayConfig
from trio_relay.testing import open_memory_relay


async def test_a_client_that_answers_pings_stays_connected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(ping_interval=10.0, ping_timeout=5.0)
    async with open_memory_relay(config) as relay, relay.consume() as messages:
        await trio.sleep(100.0)  # trio-websocket answers the pings by itself
        assert relay.server.statistics().connections == 1
        await relay.publish("still here")
        assert await anext(messages) == "still here"


async def test_a_client_that_never_answers_a_ping_is_closed_after_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(ping_interval=10.0, ping_timeout=5.0)
    async with open_memory_relay(config) as relay:
        raw = await RawClient.connect(relay)
        start = trio.current_time()
        ping = await raw.next_event()
        assert isinstance(ping, Ping)
        assert trio.current_time() - start == 10.0
        close = await raw.next_event()  # not answered
        assert isinstance(close, CloseConnection)
        assert (close.code, close.reason) == (CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
        assert trio.current_time() - start == 15.0


async def test_a_client_that_stopped_reading_is_caught_by_the_ping_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Nothing to write for it, so no write stalls: only the unanswered ping reveals it.
    config = RelayConfig(ping_interval=10.0, ping_timeout=5.0, close_timeout=1.0)
    async with open_memory_relay(config) as relay, relay.connect(message_queue_size=1):
        # trio-websocket answers pings only while its reader runs; fill its queue so it stops.
        for _ in range(2):
            await relay.publish("fills the client's queue")
        await relay.server.wait_until(lambda s: s.connections == 1)
        start = trio.current_time()
        await relay.server.wait_until(lambda s: s.connections == 0)
        # Ping at 10 s, no pong by 15 s: close 1011, whose answer never comes either, so
        # the connection is dropped close_timeout (1 s) later.
        assert trio.current_time() - start == 16.0


async def test_pings_can_be_turned_off(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_relay(RelayConfig(ping_interval=0)) as relay:
        raw = await RawClient.connect(relay)
        await trio.sleep(1000.0)
        await relay.publish("no ping came first")
        assert await raw.next_message() == "no ping came first"


async def test_connections_over_the_limit_get_503(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_relay(RelayConfig(max_connections=2)) as relay:
        first = await RawClient.connect(relay)
        await RawClient.connect(relay)
        status, body = await rejected(relay, upgrade_request())
        assert status == 503
        assert b"limit of 2 connections" in body
        await first.send(CloseConnection(code=1000))
        await relay.server.wait_until(lambda s: s.connections == 1)
        await RawClient.connect(relay)  # room again


async def test_connections_over_the_per_address_limit_get_503(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Every in-memory client comes from the same address, "in-memory".
    async with open_memory_relay(RelayConfig(max_connections_per_ip=1)) as relay:
        await RawClient.connect(relay)
        status, body = await rejected(relay, upgrade_request("/elsewhere"))
        assert status == 503
        assert b"connections per client address" in body


async def test_subscribers_over_a_topics_limit_get_503_and_other_topics_are_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(RelayConfig(max_subscribers_per_topic=1)) as relay:
        await RawClient.connect(relay, "/news")
        status, body = await rejected(relay, upgrade_request("/news"))
        assert status == 503
        assert b"topic 'news' is at its limit of 1 subscribers" in body
        await RawClient.connect(relay, "/sport")


@pytest.mark.parametrize("rate", [10.0, 100.0])
async def test_a_producer_over_the_publish_rate_is_slowed_not_cut(
    autojump_clock: trio.testing.MockClock, rate: float
) -> None:
    config = RelayConfig(publish_rate=rate, publish_burst=5)
    async with open_memory_relay(config) as relay, relay.consume() as messages:
        async with relay.connect(message_queue_size=1000) as producer:
            start = trio.current_time()
            for i in range(25):
                await producer.send_message(f"m{i}")
            got = [await anext(messages) for _ in range(25)]
        assert got == [f"m{i}" for i in range(25)]
        # 5 at once (the burst), then 20 more at `rate` per second.
        assert trio.current_time() - start == pytest.approx(20 / rate)
