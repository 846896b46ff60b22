"""Per-topic routing through Redis: a relay receives only the topics it holds, every key a
script touches is in one Redis Cluster slot, and a relay that misses a message on a
topic's channel catches up from the topic's log.

Against real ``redis-server`` processes (one of them a one-node Redis Cluster), on the
real clock, every wait bounded and waiting for an event (see tests/test_backplane.py).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio
from redis_support import (
    RedisCluster,
    RedisServer,
    free_port,
    redis_cluster,
    redis_cluster_node,
    redis_cluster_with_replica,
    redis_server,
)
from test_backplane import LIMIT, relays, start_relay, subscribed, ws
from test_backplane_faults import FAST, Consumer, check, redis_back, redis_gone

import trio_relay
from trio_relay import Gap, Message, RelayConfig, RelayServer
from trio_relay._backplane import cluster_url, topic_keys

__all__ = [  # the fixtures, used by name
    "redis_cluster",
    "redis_cluster_node",
    "redis_cluster_with_replica",
    "redis_server",
]


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


def command_counts(redis: RedisServer) -> dict[str, int]:
    """How many times Redis ran each command so far (``INFO commandstats``); a pipeline of
    500 script calls counts 500 ``evalsha``, one ``SUBSCRIBE`` of 500 channels counts 1."""
    stats = redis.command("INFO", "commandstats").decode()
    return {
        line.partition(":")[0].removeprefix("cmdstat_"): int(line.split("calls=")[1].split(",")[0])
        for line in stats.splitlines()
        if line.startswith("cmdstat_")
    }


SCRIPTED = {"publish", "hget", "hset", "del", "xrange", "xadd", "xdel", "xlen", "expire"}
"""What the relay's scripts run inside Redis (counted too by ``INFO commandstats``)."""
CONNECTING = {"hello", "client", "select", "auth"}
"""What coredis sends when its pool opens a connection: per connection, not per event."""


def spent(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The commands sent between two :func:`command_counts`: those of the relay's scripts
    and the ``INFO`` asking excluded (no heartbeat runs meanwhile: its ``PUBLISH`` would
    be excluded too)."""
    return {
        name: count - before.get(name, 0)
        for name, count in after.items()
        if count != before.get(name, 0)
        and name.partition("|")[0] not in SCRIPTED | CONNECTING | {"info"}  # "client|setinfo"
    }


async def test_routing_costs_round_trips_per_500_topics_and_a_join_costs_the_same_at_2000(
    redis_server: RedisServer,
) -> None:
    # Issue 12's routing must not cost per event what grows with the topics held: a relay
    # taking 2,000 topics at once subscribes 500 channels a command and reads 500 logs a
    # round trip; joining one more with 2,000 held costs what joining one with none does.
    held = 2000
    async with relays(redis_server.url, 1, timeout=5.0, block=60.0) as (a,):
        backplane = a.backplane
        assert backplane is not None
        trips: list[int] = []  # the script calls of each round trip of _call_many
        call_many = backplane._call_many

        async def counted(sha: Any, calls: list[tuple[list[str], list[Any]]]) -> Any:
            trips.append(len(calls))
            return await call_many(sha, calls)

        backplane._call_many = counted  # type: ignore[method-assign]

        joined: list[tuple[str, Any]] = []

        async def join_one(name: str) -> tuple[dict[str, int], int]:
            """Redis commands and round trips of _call_many that one join costs."""
            before, trips_before = command_counts(redis_server), len(trips)
            with trio.fail_after(LIMIT):
                subscription, *_ = await a.topics.join(name)
            joined.append((name, subscription))
            return spent(before, command_counts(redis_server)), len(trips) - trips_before

        await join_one("warm")
        alone = await join_one("first")
        # 2,000 topics held at once (as 2,000 clients' handshakes would).
        before, first_trip = command_counts(redis_server), len(trips)
        names = [f"held/{n}" for n in range(held)]
        for name in names:
            a.topics.hold(name)
        with trio.fail_after(LIMIT):
            for name in names:
                await backplane.routed(name)
        holding = spent(before, command_counts(redis_server))
        holding_trips = trips[first_trip:]
        assert backplane.statistics().routes == held + 2  # and "warm", "first"
        assert all(backplane._routes[name].synced for name in names)  # each log read
        assert subscribers_of(redis_server, "held/1999") == 1
        among_many = await join_one("one-more")
        # Leaving them all: 500 channels an UNSUBSCRIBE. Once a topic routed after the
        # releases is live (its SUBSCRIBE went after them on the subscription's connection,
        # and its read's marker came back on it), Redis ran every UNSUBSCRIBE.
        before = command_counts(redis_server)
        for name in names:
            a.topics.release(name)
        a.topics.hold("after")
        with trio.fail_after(LIMIT):
            await backplane.routed("after")
        leaving = spent(before, command_counts(redis_server))
        assert subscribers_of(redis_server, "held/1999") == 0
        assert backplane.statistics().routes == 4  # "warm", "first", "one-more", "after"
        for name, subscription in joined:
            a.topics.leave(name, subscription)
    rounds = -(-held // 500)  # 4
    assert holding.get("subscribe") == rounds, holding
    assert holding.get("evalsha") == held, holding  # one script call a topic ...
    # ... pipelined: at most 500 a round trip, O(topics / 500) round trips (a chunk's
    # reads go once its SUBSCRIBE is answered, maybe before the next chunk's are ready).
    assert sum(holding_trips) == held and max(holding_trips) <= 500, holding_trips
    assert len(holding_trips) <= 2 * rounds, holding_trips
    assert sum(holding.values()) == rounds + held, holding  # nothing else, per topic or not
    assert leaving.get("unsubscribe") == rounds, leaving
    assert alone == among_many, (alone, among_many)
    # SUBSCRIBE and the log's read (which also says where the shared numbering is, for a
    # topic not numbered here yet): one round trip each.
    assert alone == ({"subscribe": 1, "evalsha": 1}, 1), alone


async def test_numbers_given_again_by_a_redis_that_went_back_are_skipped_and_end_the_epoch(
    redis_server: RedisServer,
) -> None:
    # A failover to a replica that missed the last writes: Redis's counter and log go
    # back, and a relay that never saw those writes publishes first. A relay that saw them
    # must not deliver the new message under a taken name; it makes Redis start a fresh
    # epoch, so that the next publishes are named anew (its consumers are told: a reset).
    async with relays(redis_server.url, 2, **FAST) as (a, b), trio.open_nursery() as nursery:
        assert a.backplane is not None
        on_a = Consumer("on a")
        await on_a.start(nursery, ws(a, "t"))
        await subscribed(a, "t")
        first = [await a.publish(f"m{n}", "t") for n in range(1, 4)]
        await on_a.wait_for_data("m3")
        hash_key, log_key, _ = topic_keys("trio-relay", "t")
        # Redis "went back" to just after m1: its counter says 1, its log ends at m1.
        keep_first = (
            "local entries = redis.call('XRANGE', KEYS[1], '-', '+') "
            "for i = 2, #entries do redis.call('XDEL', KEYS[1], entries[i][1]) end "
            "return #entries"
        )
        assert redis_server.command("EVAL", keep_first, "1", log_key) == b":3"
        assert redis_server.command("HSET", hash_key, "s", "1") == b":0"
        recovered, read_again = a.backplane._recovered, trio.Event()

        def read(route: Any) -> None:
            recovered(route)
            read_again.set()

        a.backplane._recovered = read  # type: ignore[method-assign]
        async with relays(redis_server.url, 1, **FAST) as (c,):
            reused = await c.publish("reused", "t")  # c never saw m2 and m3: number 2 again
            with trio.fail_after(LIMIT):
                await read_again.wait()  # a skipped it, and read t's log: a fresh epoch
            after = await b.publish("after", "t")
        await on_a.wait_for_data("after")
        await on_a.stop()
    assert (reused.epoch, reused.seq) == (first[1].epoch, 2)
    assert (a.backplane.statistics().conflicts, a.backplane.statistics().epochs) == (1, 1)
    assert after.epoch != first[0].epoch and after.seq == 1
    assert [m.data for m in on_a.messages] == ["m1", "m2", "m3", "after"]
    check(on_a)


async def test_a_relay_keeps_nothing_of_the_topics_it_held_and_left(
    redis_server: RedisServer,
) -> None:
    # A relay whose clients come and go on ever new topics (one per user, say) must not
    # keep something of each: coredis's PubSub kept a list of confirmation waiters per
    # channel ever subscribed or left (about 200 bytes each, 2,000 topics: 400 KiB).
    async with relays(redis_server.url, 1, timeout=5.0, block=60.0) as (a,):
        backplane = a.backplane
        assert backplane is not None
        for round_ in range(2):
            names = [f"r{round_}/{n}" for n in range(1000)]
            for name in names:
                a.topics.hold(name)
            with trio.fail_after(LIMIT):
                for name in names:
                    await backplane.routed(name)
            for name in names:
                a.topics.release(name)
            # Once a topic held after the releases is live, every UNSUBSCRIBE was answered
            # (see the test above).
            a.topics.hold(f"after/{round_}")
            with trio.fail_after(LIMIT):
                await backplane.routed(f"after/{round_}")
            a.topics.release(f"after/{round_}")
        assert backplane.statistics().routes == 0
        assert subscribers_of(redis_server, "r1/999") == 0
        pubsub = backplane._pubsub
        # Private attributes of coredis 6.9's PubSub (trio_relay._backplane._forget_waiters
        # empties them): an AttributeError here says coredis changed, and the fix must too.
        left = len(pubsub._subscription_waiters) + len(pubsub._unsubscription_waiters)
    assert left <= 4, left  # the heartbeat's channel, and the last topic's, at most


def slot_of(cluster: RedisCluster, topic: str) -> int:
    """The slot of ``topic``'s keys, as a node of ``cluster`` computes it (CLUSTER KEYSLOT)."""
    hash_key = topic_keys("trio-relay", topic)[0]
    answer = cluster.nodes[0].command("CLUSTER", "KEYSLOT", hash_key)  # ":<slot>"
    return int(answer[1:])


async def test_the_backplane_runs_on_a_three_node_redis_cluster_and_survives_a_node(
    redis_cluster: RedisCluster,
) -> None:
    # Issue 12: "keys hash-tagged so the design runs on Redis Cluster", on a real one: three
    # nodes, a third of the slots each; a topic on each node.
    cluster = redis_cluster
    names = (f"room/{n}" for n in range(100))
    topics: dict[int, str] = {}  # node index -> a topic whose keys it holds
    for name in names:
        topics.setdefault(cluster.nodes.index(cluster.node_of(slot_of(cluster, name))), name)
    assert sorted(topics) == [0, 1, 2], topics
    t0, t1, t2 = topics[0], topics[1], topics[2]
    # The cluster is real: the first node sends a plain command on t2's keys away.
    moved = cluster.nodes[0].command("HGET", topic_keys("trio-relay", t2)[0], "e")
    assert moved.startswith(b"-MOVED") and moved.endswith(str(cluster.nodes[2].port).encode())
    async with relays(cluster.url, 2, **FAST) as (a, b), trio.open_nursery() as nursery:
        assert a.backplane is not None and b.backplane is not None
        assert a.backplane.cluster and b.backplane.cluster
        consumers = {
            (relay, topic): Consumer(f"{topic!r} on {relay}")
            for relay in "ab"
            for topic in (t0, t1, t2)
        }
        for (relay, topic), consumer in consumers.items():
            server = a if relay == "a" else b
            await consumer.start(nursery, ws(server, topic))
            await subscribed(server, topic)
        reports = []
        for n in range(12):  # publishes on both relays, on the three nodes' topics
            server, topic = (a, b)[n % 2], (t0, t1, t2)[n % 3]
            reports.append(await server.publish(f"m{n}", topic))
        keyed = [
            await a.topics.publish(t2, "once", idempotency_key="k1"),
            await b.topics.publish(t2, "once", idempotency_key="k1"),
        ]
        # A node that lost its scripts (SCRIPT FLUSH, as a restart does) answers NOSCRIPT:
        # the relay loads them again and the publish goes on, once.
        assert cluster.nodes[1].command("SCRIPT", "FLUSH") == b"+OK"
        reloaded = await a.publish("reloaded", t1)
        for (_, topic), consumer in consumers.items():
            await consumer.wait_for_data({t0: "m9", t1: "reloaded", t2: "once"}[topic])
        # A relay that starts holding a topic reads its log (the recovery script).
        async with relays(cluster.url, 1, **FAST) as (late,):
            with trio.fail_after(LIMIT):
                _, _, history = await late.topics.retained(t1)
        assert [m.data for m in history] == ["m1", "m4", "m7", "m10", "reloaded"]
        assert all(report.remote is True for report in [*reports, reloaded])
        assert [(r.remote, r.duplicate) for r in keyed] == [(True, False), (True, True)]

        # The node of t2 dies: each relay notices (its heartbeat goes through every node)
        # and serves its own clients; a publish, on any topic, is local and prompt.
        killed = trio.current_time()
        cluster.nodes[2].kill()
        with trio.fail_after(2 * (FAST["block"] + FAST["timeout"])):
            await redis_gone(a, b)
        print(f"a node's death noticed by both relays in {trio.current_time() - killed:.2f} s")
        with trio.fail_after(FAST["timeout"]):
            alone = await a.publish("alone", t2)
            local = await b.publish("local", t0)
        assert (alone.remote, local.remote) == (False, False)
        assert alone.epoch == a.backplane.local_epoch
        # Back (empty: its topics start a fresh epoch; the other nodes kept theirs).
        cluster.restart(cluster.nodes[2])
        await redis_back(a, b)
        after = [
            await b.publish("after", t2),
            await a.publish("again", t2),
            await a.publish("m12", t0),
        ]
        for (_, topic), consumer in consumers.items():
            await consumer.wait_for_data({t0: "m12", t1: "reloaded", t2: "again"}[topic])
        nursery.cancel_scope.cancel()
    assert [(r.remote, r.seq) for r in after] == [(True, 1), (True, 2), (True, 5)]
    assert after[0].epoch not in (alone.epoch, keyed[0].epoch)
    assert after[2].epoch == reports[0].epoch  # t0's node kept its numbering
    for (relay, topic), consumer in consumers.items():
        shown = [m.data for m in consumer.messages]
        if topic == t0:
            expected = ["m0", "m3", "m6", "m9"] + (["local"] if relay == "b" else []) + ["m12"]
        elif topic == t1:
            expected = ["m1", "m4", "m7", "m10", "reloaded"]
        else:
            expected = ["m2", "m5", "m8", "m11", "once"]
            expected += (["alone"] if relay == "a" else []) + ["after", "again"]
        if shown != expected:
            # Subscribed while its relay was cut off for a moment (a timeout on a loaded
            # machine, before the node's death): by the outage contract it gets nothing
            # old once back, is told so (a reset), and gets everything after that.
            server = a if relay == "a" else b
            assert server.backplane is not None
            assert server.backplane.statistics().reconnects >= 2, (consumer.name, consumer.items)
            assert isinstance(consumer.items[0], Gap) and consumer.items[0].reset
            assert shown == expected[-len(shown) :], (consumer.name, consumer.items)
    check(*consumers.values())
    for server in (a, b):
        assert server.backplane is not None
        statistics = server.backplane.statistics()
        assert statistics.reconnects >= 1 and statistics.conflicts == 0


def test_a_redis_cluster_is_named_by_its_url_scheme() -> None:
    assert RelayConfig(backplane="redis+cluster://r:7000").backplane == "redis+cluster://r:7000"
    assert trio_relay.RedisBackplane("rediss+cluster://:pw@r:7000/0").cluster
    assert not trio_relay.RedisBackplane("redis://r:6379/0").cluster
    assert cluster_url("rediss+cluster://:pw@r:7000") == "rediss://:pw@r:7000"
    assert cluster_url("redis://r:6379/1") is None
    with pytest.raises(ValueError, match="database 0 only"):
        RelayConfig(backplane="redis+cluster://r:7000/1")
    with pytest.raises(ValueError, match="names a node"):
        trio_relay.RedisBackplane("redis+cluster:///0")
    with pytest.raises(ValueError, match="redis\\+cluster://"):
        RelayConfig(backplane="cluster://r:7000")


async def test_a_failover_of_the_node_the_url_names_loses_nothing(
    redis_cluster_with_replica: RedisCluster,
) -> None:
    # The node the relays were given dies for good; its replica takes its slots over. The
    # relays find the cluster through the other nodes they saw, and go on: same epochs,
    # the next numbers, no gap (the replica had every write).
    cluster = redis_cluster_with_replica
    assert cluster.replica is not None
    t0 = next(
        f"room/{n}"
        for n in range(100)
        if cluster.node_of(slot_of(cluster, f"room/{n}")) is cluster.nodes[0]
    )
    t1 = next(
        f"room/{n}"
        for n in range(100)
        if cluster.node_of(slot_of(cluster, f"room/{n}")) is cluster.nodes[1]
    )
    async with relays(cluster.url, 2, **FAST) as (a, b), trio.open_nursery() as nursery:
        consumers = {
            (relay, topic): Consumer(f"{topic!r} on {relay}")
            for relay in "ab"
            for topic in (t0, t1)
        }
        for (relay, topic), consumer in consumers.items():
            server = a if relay == "a" else b
            await consumer.start(nursery, ws(server, topic))
            await subscribed(server, topic)
        before = [await (a, b)[n % 2].publish(f"m{n}", (t0, t1)[n // 2 % 2]) for n in range(4)]
        for (_, topic), consumer in consumers.items():
            await consumer.wait_for_data("m1" if topic == t0 else "m3")
        # The replica has every write so far: a write of the test's own, then WAIT for it.
        mark = f"test:{{t:{t0}}}"
        synced = cluster.nodes[0].commands(("SET", mark, "1"), ("WAIT", "1", "5000"))
        assert synced == [b"+OK", b":1"], synced
        cluster.nodes[0].kill()
        await redis_gone(a, b)
        cluster.replica.wait_for_log(b"Failover election won")
        await redis_back(a, b)
        after = [await b.publish("after", t0), await a.publish("again", t1)]
        for (_, topic), consumer in consumers.items():
            await consumer.wait_for_data("after" if topic == t0 else "again")
        nursery.cancel_scope.cancel()
    assert all(report.remote is True for report in [*before, *after])
    assert [(r.epoch, r.seq) for r in after] == [(before[0].epoch, 3), (before[2].epoch, 3)]
    for (_, topic), consumer in consumers.items():
        assert not [item for item in consumer.items if isinstance(item, Gap)], consumer.items
        expected = ["m0", "m1", "after"] if topic == t0 else ["m2", "m3", "again"]
        assert [m.data for m in consumer.messages] == expected
    check(*consumers.values())


async def test_the_heartbeat_goes_through_every_primary_node_in_turn(
    redis_cluster: RedisCluster,
) -> None:
    # So that any node that dies is noticed within `block + timeout`, not when a command
    # happens to go there: the heartbeat's PUBLISHes reach the nodes in turn.
    async with relays(redis_cluster.url, 1, timeout=1.0, block=0.05) as (relay,):
        backplane = relay.backplane
        assert backplane is not None

        def published() -> list[int]:
            return [command_counts(node).get("publish", 0) for node in redis_cluster.nodes]

        before, first = published(), backplane._heartbeat
        with trio.fail_after(LIMIT):
            while backplane._heartbeat < first + 12:
                await backplane._heard.wait()
        counts = [now - then for now, then in zip(published(), before, strict=True)]
        # A node that stops answering (frozen) is noticed within `block + timeout`, and
        # the relay still stops at once.
        redis_cluster.nodes[1].pause()
        with trio.fail_after(2 * (0.05 + 1.0)):
            await redis_gone(relay)
        with trio.fail_after(1.0):
            assert (await relay.publish("alone", "t")).remote is False
        stopping = trio.current_time()
    assert trio.current_time() - stopping < 1.0
    # Twelve heartbeats or more, one node after the other (a node chosen at random each
    # time would give three equal counts of 12 with a chance of 6.5 %).
    assert sum(counts) >= 12 and max(counts) - min(counts) <= 1, counts


async def test_a_relay_whose_redis_cluster_is_unreachable_at_start_serves_locally() -> None:
    # Entering coredis's RedisCluster discovers the nodes: failing, it must not end the
    # relay (its client is per session), which serves its clients and retries.
    async with relays(f"redis+cluster://127.0.0.1:{free_port()}", 1, **FAST) as (relay,):
        assert relay.backplane is not None and not relay.backplane.up
        report = await relay.publish("alone", "t")
    assert (report.remote, report.epoch) == (False, relay.backplane.local_epoch)
