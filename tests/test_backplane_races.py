"""Races of per-topic routing in the Redis backplane, each found by hunting for a breach
of the contract (README "Scaling out"): a topic held anew, filled, recovered or forgotten
while Redis is away, frozen or slow, and what its consumers see then.

Against real ``redis-server`` processes, on the real clock, every wait bounded and waiting
for an event (see tests/test_backplane.py).
"""

from __future__ import annotations

import json
import os
import uuid
from functools import partial
from typing import Any

import trio
import trio.testing
import trio_websocket
from hypothesis import HealthCheck, given, settings, strategies as st
from redis_support import Proxy, RedisServer, redis_server
from test_backplane import LIMIT, QUIET, relays, start_relay, subscribed, ws
from test_backplane_faults import FAST, Consumer, check, redis_back, redis_gone
from test_backplane_routing import subscribers_of

import trio_relay
from trio_relay import Message, RedisBackplane, RelayConfig, RelayServer

__all__ = ["redis_server"]  # the fixture, used by name


async def test_a_topic_held_anew_while_redis_is_away_fills_in_what_a_resumed_consumer_lacks(
    redis_server: RedisServer,
) -> None:
    # A relay that forgot t (no client, no history kept) holds it again for a consumer
    # resuming from where it left, while Redis is unreachable: the consumer is at 2 there.
    # Back online, the relay fills t's history with 3 and 4 (published meanwhile): newer
    # than what the consumer had, they reach it, then 5; never a silent jump to 5.
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
        await subscribed(a, "t")  # at 2, while Redis is away
        proxy.heal()
        await redis_back(a)
        await b.publish("m5", "t")
        await resumed.wait_for_data("m5")
        nursery.cancel_scope.cancel()
    assert resumed.items[2:] == [Message("t", n, f"m{n}") for n in (3, 4, 5)]
    check(resumed, starts_at_zero=False)


TOPICS = ("t0", "t1")
FORGETFUL = RelayConfig(ping_interval=0, history_size=0)
"""A relay that keeps no history: a topic its last client leaves is forgotten (it leaves
the topic's channel), and held anew (routed, its log read) when a client comes back."""
SCHEDULE_EXAMPLES = int(os.environ.get("TRIO_RELAY_SCHEDULE_EXAMPLES", "8"))
"""Examples of the routing schedule test (a few seconds); more to hunt locally."""


class _ReadCutter:
    """Cuts relay ``backplane``'s proxy when the relay next reads logs: ``before`` the
    read's round trip (its answer never comes) or ``after`` it (the answer is in, the
    read's marker not yet: it is reading). Wraps the backplane's ``_call_many`` (private:
    where a read happens; the test fails if it is renamed or no longer does the reads)."""

    def __init__(self, backplane: RedisBackplane, proxy: Proxy) -> None:
        self.proxy = proxy
        self.armed: str | None = None
        self.fired = trio.Event()
        self._call_many = backplane._call_many
        self._recover = backplane
        backplane._call_many = self._calls  # type: ignore[method-assign]

    async def _calls(self, sha: Any, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        reading = sha == self._recover._shas.get("recover")
        if reading and self.armed == "before":
            self._cut()
        answers = await self._call_many(sha, calls)
        if reading and self.armed == "after":
            self._cut()
        return answers

    def _cut(self) -> None:
        self.armed = None
        self.proxy.cut()
        self.fired.set()

    def arm(self, when: str) -> None:
        self.armed, self.fired = when, trio.Event()


@settings(
    max_examples=SCHEDULE_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.sampled_from(["publish", "burst"]), st.integers(0, 2), st.integers(0, 1)),
            st.tuples(st.sampled_from(["join", "hop"]), st.integers(0, 2), st.integers(0, 1)),
            st.tuples(st.just("leave"), st.integers(0, 9), st.just(0)),
            st.tuples(
                st.sampled_from(["cut", "cut before a read", "cut after a read", "freeze"]),
                st.just(0),
                st.integers(0, 1),
            ),
        ),
        max_size=14,
    ).filter(lambda steps: sum(step[0].startswith(("cut", "freeze")) for step in steps) <= 2)
)
def test_a_schedule_of_joins_leaves_and_faults_on_two_topics_keeps_the_contract(
    redis_server: RedisServer, steps: list[tuple[str, int, int]]
) -> None:
    """What per-topic routing adds to the fault schedule: two topics; three relays, the
    first behind a proxy and the first and last forgetful (a topic with no client is
    forgotten, and held anew, its log read, for the next); consumers that join a topic on a
    relay that does not hold it while publishes are in flight (``burst``: three, not waited
    for), leave, or hop (one consumer of t0); the first relay cut off, also in the middle
    of reading logs (before or after the read's answer); Redis frozen briefly. At the end
    a marker on each topic reaches every consumer still there, and :func:`check` holds
    over all of them (those that left included)."""
    prefix = f"p{uuid.uuid4().hex}"

    async def scenario() -> list[Consumer]:
        async with trio.open_nursery() as nursery:
            proxy = Proxy(redis_server.port)
            await nursery.start(proxy.run)
            servers = [
                await start(nursery, proxy.url, FORGETFUL, prefix),
                await start(nursery, redis_server.url, QUIET, prefix),
                await start(nursery, redis_server.url, FORGETFUL, prefix),
            ]
            assert servers[0].backplane is not None
            cutter = _ReadCutter(servers[0].backplane, proxy)
            consumers: list[Consumer] = []
            live: dict[Consumer, tuple[int, str]] = {}  # where each consumer still is
            count = 0

            async def join(server: int, topic: str) -> None:
                consumer = Consumer(f"{topic} on {server} ({len(consumers)})")
                await consumer.start(nursery, ws(servers[server], topic))
                consumers.append(consumer)
                live[consumer] = (server, topic)

            async def publish(server: int, topic: str) -> None:
                nonlocal count
                count += 1
                await servers[server].publish(f"m{count}", topic)

            for server in range(3):
                await join(server, "t0")
            hopper = Consumer("hopper on t0")
            await hopper.start(nursery, ws(servers[1], "t0"))
            consumers.append(hopper)
            live[hopper] = (1, "t0")
            async with trio.open_nursery() as in_flight:
                for kind, server, index in steps:
                    topic = TOPICS[index]
                    if kind == "publish":
                        await publish(server, topic)
                    elif kind == "burst":
                        for _ in range(3):
                            in_flight.start_soon(publish, server, topic)
                    elif kind == "join":
                        await join(server, topic)
                    elif kind == "hop":
                        await hopper.hop(nursery, ws(servers[server], "t0"))
                        live[hopper] = (server, "t0")
                    elif kind == "leave":
                        leaving = [consumer for consumer in live if consumer is not hopper]
                        if leaving:
                            consumer = leaving[server % len(leaving)]
                            await consumer.stop()
                            del live[consumer]
                    elif kind == "cut":
                        proxy.cut()
                        await redis_gone(servers[0])
                        await publish(0, topic)  # numbered alone
                        await join(0, topic)  # held while Redis is away (or anew)
                        proxy.heal()
                        await redis_back(*servers)
                    elif kind == "freeze":
                        in_flight.start_soon(publish, 1, topic)
                        redis_server.pause()
                        await redis_gone(*servers)
                        redis_server.resume()
                        await redis_back(*servers)
                    else:  # cut while the first relay reads logs
                        cutter.arm("before" if kind == "cut before a read" else "after")
                        held = topic in servers[0].topics
                        if held:
                            # Held until the step ends (a sweep may forget a topic nobody
                            # uses): it reads the logs of every topic held when back.
                            servers[0].topics.hold(topic)
                            proxy.cut()
                            await redis_gone(servers[0])
                            proxy.heal()
                        else:
                            in_flight.start_soon(join, 0, topic)  # read as it is held
                        with trio.fail_after(LIMIT):
                            await cutter.fired.wait()
                        await redis_gone(servers[0])
                        proxy.heal()
                        await redis_back(*servers)
                        if held:
                            servers[0].topics.release(topic)
            await redis_back(*servers)
            for where in set(live.values()):
                server, topic = where
                on = sum(1 for place in live.values() if place == where)
                await subscribed(servers[server], topic, on)
            for topic in TOPICS:
                report = await servers[1].publish(f"marker {topic}", topic)
                assert report.remote is True
            for consumer, (_, topic) in live.items():
                await consumer.wait_for_data(f"marker {topic}")
            nursery.cancel_scope.cancel()
        redis_server.forget_data()
        return consumers

    consumers = trio.run(scenario)
    check(*consumers)


async def start(nursery: trio.Nursery, url: str, config: RelayConfig, prefix: str) -> RelayServer:
    backplane = RedisBackplane(url, prefix=prefix, **FAST)
    server: RelayServer = await nursery.start(
        partial(trio_relay.serve_relay, "127.0.0.1", 0, config=config, backplane=backplane)
    )
    return server


async def test_a_topic_forgotten_while_its_subscribe_is_in_flight_leaves_its_channel(
    redis_server: RedisServer,
) -> None:
    # A join makes the relay subscribe to x's channel; Redis is slow to confirm (frozen
    # here), the join gives up meanwhile and the relay forgets x. Once Redis confirms, the
    # relay must leave x's channel: it would receive (and skip) all of x for good.
    config = RelayConfig(ping_interval=0, history_size=0)  # x is forgotten once left
    backplane = RedisBackplane(redis_server.url, timeout=5.0, block=60.0)
    async with trio.open_nursery() as nursery:
        a: RelayServer = await nursery.start(
            partial(trio_relay.serve_relay, "127.0.0.1", 0, config=config, backplane=backplane)
        )
        joining = trio.CancelScope()

        async def join() -> None:
            with joining:
                await a.topics.join("x")

        redis_server.pause()
        nursery.start_soon(join)
        await trio.testing.wait_all_tasks_blocked()  # x's SUBSCRIBE sent, unanswered
        joining.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert "x" not in a.topics
        redis_server.resume()
        with trio.fail_after(LIMIT):
            for name in ("y", "z"):  # routed one after the other: x's turn came before
                backplane.route(name)
                await backplane.routed(name)
        assert (subscribers_of(redis_server, "x"), subscribers_of(redis_server, "z")) == (0, 1)
        nursery.cancel_scope.cancel()


async def test_an_own_publish_read_back_from_the_log_late_still_skips_its_publisher(
    redis_server: RedisServer,
) -> None:
    # A publish with echo false; its message on the channel never reaches its relay (a
    # dropped subscription would do that), so its publisher's wait for it ends (timeout)
    # with the script's answer. The relay reads it from the log when the next message
    # skips a number: every subscriber gets it then, but not the connection that asked
    # for no echo.
    async with relays(redis_server.url, 2, **FAST) as (a, b), trio.open_nursery() as nursery:
        assert a.backplane is not None
        watcher = Consumer("watcher on a")
        await watcher.start(nursery, ws(a, "t"))
        take, lost = a.backplane._take, trio.Event()

        def lose_mine(channel: bytes, data: bytes) -> None:
            if b"mine" in data and not lost.is_set():
                lost.set()  # the channel loses it on its way to a
            else:
                take(channel, data)

        a.backplane._take = lose_mine  # type: ignore[method-assign]
        async with trio_websocket.open_websocket_url(
            ws(a, "t"), subprotocols=[trio_relay.SUBPROTOCOL]
        ) as publisher:
            welcome = json.loads(await publisher.get_message())
            assert welcome["type"] == "welcome"
            await subscribed(a, "t", 2)
            frame = {"type": "publish", "id": 1, "text": "mine", "echo": False}
            await publisher.send_message(json.dumps(frame))
            with trio.fail_after(LIMIT):
                ack = json.loads(await publisher.get_message())
            assert (ack["type"], ack["seq"], ack["remote"], lost.is_set()) == ("ack", 1, True, True)
            await b.publish("next", "t")  # a sees 2 after 0: it reads the log
            await watcher.wait_for_data("mine", "next")
            with trio.fail_after(LIMIT):
                then = json.loads(await publisher.get_message())
        await watcher.stop()
    assert (then["type"], then["seq"], then.get("text")) == ("message", 2, "next")
    check(watcher)


async def test_a_consumer_that_joins_while_its_topic_is_still_being_read_gets_what_follows(
    redis_server: RedisServer,
) -> None:
    # A relay starts holding t for a consumer (from 0: everything), and its read of t's log
    # is slow (held back here): the join stops waiting for it (timeout) and takes the
    # shared position from Redis (m1 is there). When the read comes, m1 fills the history;
    # it is newer than what the consumer had (nothing of that numbering), so it reaches it,
    # then m2: never a gap for messages the relay has.
    async with relays(redis_server.url, 2, **FAST) as (a, b), trio.open_nursery() as nursery:
        assert a.backplane is not None
        await b.publish("m1", "t")
        call_many, gate = a.backplane._call_many, trio.Event()
        recover = a.backplane._shas["recover"]

        async def slow_reads(sha: Any, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
            if sha == recover:
                await gate.wait()
            return await call_many(sha, calls)

        a.backplane._call_many = slow_reads  # type: ignore[method-assign]
        joined = Consumer("joined on a")
        await joined.start(nursery, ws(a, "t"))
        await subscribed(a, "t")  # routed() gave up: joined before the read
        gate.set()
        await b.publish("m2", "t")
        await joined.wait_for_data("m2")
        await joined.stop()
    assert joined.items == [Message("t", 1, "m1"), Message("t", 2, "m2")]
    check(joined)
