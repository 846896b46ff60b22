"""Races of per-topic routing in the Redis backplane, each found by hunting for a breach
of the contract (README "Scaling out"): a topic held anew, filled, recovered or forgotten
while Redis is away, frozen or slow, and what its consumers see then.

Against real ``redis-server`` processes, on the real clock, every wait bounded and waiting
for an event (see tests/test_backplane.py).
"""

from __future__ import annotations

from functools import partial

import trio
from redis_support import Proxy, RedisServer, redis_server
from test_backplane import LIMIT, start_relay, subscribed, ws
from test_backplane_faults import FAST, Consumer, check, redis_back, redis_gone

import trio_relay
from trio_relay import Gap, Message, RelayConfig, RelayServer

__all__ = ["redis_server"]  # the fixture, used by name


async def test_a_topic_held_anew_while_redis_is_away_fills_nothing_past_a_resumed_consumer(
    redis_server: RedisServer,
) -> None:
    # A relay that forgot t (no client, no history kept) holds it again for a consumer
    # resuming from where it left, while Redis is unreachable: the consumer is at 2 there.
    # Back online, the relay fills t's history with 3 and 4 (published meanwhile): the
    # consumer had not had them, so the next message comes after a gap, never a jump.
    async with trio.open_nursery() as nursery:
        proxy = Proxy(redis_server.port)
        await nursery.start(proxy.run)
        config = RelayConfig(ping_interval=0, history_size=0)
        a: RelayServer = await nursery.start(
            partial(
                trio_relay.serve_relay,
                "127.0.0.1",
                0,
                config=config,
                backplane=trio_relay.RedisBackplane(proxy.url, **FAST),
            )
        )
        b = await start_relay(nursery, redis_server.url, **FAST)
        first = Consumer("first on a")
        await first.start(nursery, ws(a, "t"))
        await subscribed(a, "t")
        for n in (1, 2):
            await b.publish(f"m{n}", "t")
        await first.wait_for_data("m2")
        await first.stop()
        with trio.fail_after(LIMIT):
            await a.wait_until(lambda server: "t" not in server.topics)
        for n in (3, 4):
            await b.publish(f"m{n}", "t")
        proxy.cut()
        await redis_gone(a)
        resumed = Consumer("resumed on a")
        resumed.items = list(first.items)
        await resumed.start(nursery, ws(a, "t"))
        proxy.heal()
        await redis_back(a)
        await b.publish("m5", "t")
        await resumed.wait_for_data("m5")
        nursery.cancel_scope.cancel()
    epoch = first.messages[0].epoch
    assert resumed.items[2:] == [Gap("t", 2, 5, epoch), Message("t", 5, "m5")]
    check(resumed, starts_at_zero=False)
