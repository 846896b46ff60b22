"""Per-topic routing through Redis: a relay receives only the topics it holds, every key a
script touches is in one Redis Cluster slot, and a relay that misses a message on a
topic's channel catches up from the topic's log.

Against real ``redis-server`` processes (one of them a one-node Redis Cluster), on the
real clock, every wait bounded and waiting for an event (see tests/test_backplane.py).
"""

from __future__ import annotations

from functools import partial

import trio
from redis_support import RedisServer, redis_cluster_node, redis_server
from test_backplane import LIMIT, relays, start_relay, subscribed, ws
from test_backplane_faults import FAST, Consumer, check

import trio_relay
from trio_relay import Message, RelayConfig, RelayServer
from trio_relay._backplane import topic_keys

__all__ = ["redis_cluster_node", "redis_server"]  # the fixtures, used by name


def subscribers_of(redis: RedisServer, topic: str) -> int:
    """How many Redis connections are subscribed to ``topic``'s channel."""
    channel = topic_keys("trio-relay", topic)[2]
    script = "return redis.call('PUBSUB', 'NUMSUB', ARGV[1])[2]"
    answer = redis.command("EVAL", script, "0", channel)  # ":<count>"
    return int(answer[1:])


async def test_a_relay_receives_only_the_topics_its_clients_hold(
    redis_server: RedisServer,
) -> None:
    # Issue 12: "every relay reads and keeps every topic, so message throughput cannot grow
    # with relays". Relay a has a client on x only; b publishes on x and on 50 others.
    async with trio.open_nursery() as nursery:
        config = RelayConfig(ping_interval=0, history_size=0)  # a topic left is forgotten
        a: RelayServer = await nursery.start(
            partial(
                trio_relay.serve_relay,
                "127.0.0.1",
                0,
                config=config,
                backplane=trio_relay.RedisBackplane(redis_server.url),
            )
        )
        b = await start_relay(nursery, redis_server.url)
        assert a.backplane is not None and b.backplane is not None
        on_a = Consumer("on a")
        await on_a.start(nursery, ws(a, "x"))
        await subscribed(a, "x")
        await b.publish("x1", "x")
        for n in range(50):
            await b.publish(f"y{n}", f"y{n}")
        await b.publish("x2", "x")
        await on_a.wait_for_data("x2")
        assert on_a.items == [Message("x", 1, "x1"), Message("x", 2, "x2")]
        statistics = a.backplane.statistics()
        assert (statistics.received, statistics.routes) == (2, 1)  # none of the others
        assert a.topics.names() == ["x"]
        assert subscribers_of(redis_server, "x") == 2  # a and b
        assert subscribers_of(redis_server, "y7") == 1  # b only: it published there
        # The client leaves; a keeps no history: it forgets x, and leaves its channel.
        await on_a.stop()
        with trio.fail_after(LIMIT):
            await a.wait_until(lambda server: "x" not in server.topics)
            while subscribers_of(redis_server, "x") != 1:
                await b.publish("x3", "x")  # a round trip to Redis between two looks
        assert a.backplane.statistics().routes == 0
        nursery.cancel_scope.cancel()


async def test_a_relay_that_misses_a_channel_message_catches_up_from_the_log(
    redis_server: RedisServer,
) -> None:
    async with relays(redis_server.url, 2, **FAST) as (a, b), trio.open_nursery() as nursery:
        assert a.backplane is not None
        on_a = Consumer("on a")
        await on_a.start(nursery, ws(a, "t"))
        await subscribed(a, "t")
        take, lost = a.backplane._take, trio.Event()
        # The channel loses one message on its way to a (as a dropped subscription would).
        a.backplane._take = lambda *message: lost.set()  # type: ignore[method-assign]
        await b.publish("m1", "t")
        with trio.fail_after(LIMIT):
            await lost.wait()
        a.backplane._take = take  # type: ignore[method-assign]
        await b.publish("m2", "t")  # a sees 2 after 0: it reads the log, delivers 1 then 2
        await on_a.wait_for_data("m2")
        await on_a.stop()
    assert on_a.items == [Message("t", 1, "m1"), Message("t", 2, "m2")]
    assert a.backplane.statistics().recoveries >= 2  # when it held t, and on the skip
    check(on_a)


async def test_the_backplane_runs_on_a_redis_cluster(redis_cluster_node: RedisServer) -> None:
    # Issue 12: "keys hash-tagged so the design runs on Redis Cluster". This node refuses
    # any command or script whose keys span slots, as a cluster does:
    refused = redis_cluster_node.command("EVAL", "return 1", "2", "a", "b")
    assert refused.startswith(b"-CROSSSLOT"), refused
    url = redis_cluster_node.url
    async with relays(url, 2, **FAST) as (a, b), trio.open_nursery() as nursery:
        consumers = {
            (server.port, topic): Consumer(f"{topic!r} on {server.port}")
            for server in (a, b)
            for topic in ("", "news/eu")
        }
        for (port, topic), consumer in consumers.items():
            server = a if port == a.port else b
            await consumer.start(nursery, ws(server, topic))
            await subscribed(server, topic)
        reports = []
        for n in range(6):  # publishes on both relays, on two topics (two slots)
            server, topic = (a, b)[n % 2], ("", "news/eu")[n // 3]
            reports.append(await server.publish(f"m{n}", topic))
        keyed = [
            await a.topics.publish("news/eu", "once", idempotency_key="k1"),
            await b.topics.publish("news/eu", "once", idempotency_key="k1"),
        ]
        for (_, topic), consumer in consumers.items():
            await consumer.wait_for_data("once" if topic else "m2")
        # A relay that starts holding a topic reads its log (the recovery script).
        async with relays(url, 1, **FAST) as (late,):
            with trio.fail_after(LIMIT):
                _, _, history = await late.topics.retained("news/eu")
        nursery.cancel_scope.cancel()
    assert all(report.remote is True for report in reports)
    assert [(r.remote, r.duplicate) for r in keyed] == [(True, False), (True, True)]
    assert [m.data for m in history] == ["m3", "m4", "m5", "once"]
    for (_, topic), consumer in consumers.items():
        expected = ["m0", "m1", "m2"] if topic == "" else ["m3", "m4", "m5", "once"]
        assert [m.data for m in consumer.messages] == expected
    check(*consumers.values())
    for server in (a, b):
        assert server.backplane is not None
        statistics = server.backplane.statistics()
        assert (statistics.local_only, statistics.reconnects, statistics.conflicts) == (0, 0, 0)
