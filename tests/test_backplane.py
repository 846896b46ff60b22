"""The Redis backplane, against a real ``redis-server`` that each test starts and stops.

Relays here are real: ``serve_relay`` on 127.0.0.1, port 0, reached with the client library
over sockets. Redis keeps its own time, so these tests run on the real clock, and every wait
is bounded (``fail_after``) and waits for an event, not for time to pass.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from coredis._utils import hash_slot  # Redis Cluster's key slot (CRC16 of the hash tag)
from helpers import http_request
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client import generate_latest
from redis_support import RedisServer, redis_server

import trio_relay
from trio_relay import Gap, Message, RedisBackplane, RelayConfig, RelayServer
from trio_relay._backplane import (
    Entry,
    decode_entry,
    decode_message,
    encode_message,
    encode_values,
)
from trio_relay._console import relay_stats
from trio_relay._metrics import metrics_registry

__all__ = ["redis_server"]  # the fixture, used by name

LIMIT = 20.0
"""Seconds any one step may take before the test fails instead of hanging."""

QUIET = RelayConfig(ping_interval=0)


@asynccontextmanager
async def relays(
    url: str, count: int, **backplane_options: Any
) -> AsyncIterator[list[RelayServer]]:
    """``count`` relays on 127.0.0.1 sharing the Redis at ``url``, all up."""
    async with trio.open_nursery() as nursery:
        servers = [await start_relay(nursery, url, **backplane_options) for _ in range(count)]
        yield servers
        nursery.cancel_scope.cancel()


async def start_relay(nursery: trio.Nursery, url: str, **backplane_options: Any) -> RelayServer:
    backplane = RedisBackplane(url, **backplane_options)
    server: RelayServer = await nursery.start(
        partial(trio_relay.serve_relay, "127.0.0.1", 0, config=QUIET, backplane=backplane)
    )
    return server


def ws(server: RelayServer, topic: str = "", query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/{topic}" + (f"?{query}" if query else "")


async def subscribed(server: RelayServer, topic: str, count: int = 1) -> None:
    with trio.fail_after(LIMIT):
        await server.wait_until(
            lambda s: topic in s.topics and s.topics[topic].broadcast.subscribers >= count
        )


async def collect(
    url: str, count: int, into: list[Any], ready: Callable[[], None], **options: Any
) -> None:
    """Consume ``count`` messages (envelope items: Message or Gap) from ``url`` into ``into``."""
    async with trio_relay.consume(url, envelope=True, **options) as messages:
        ready()
        async for item in messages:
            into.append(item)
            if len(into) == count:
                return


async def test_a_message_published_on_one_relay_reaches_the_subscribers_of_every_relay(
    redis_server: RedisServer,
) -> None:
    async with relays(redis_server.url, 2) as (a, b):
        received: dict[str, list[Any]] = {"a": [], "b": []}
        async with trio.open_nursery() as nursery:
            for name, server in (("a", a), ("b", b)):
                nursery.start_soon(collect, ws(server, "news"), 1, received[name], lambda: None)
            await subscribed(a, "news")
            await subscribed(b, "news")
            with trio.fail_after(LIMIT):
                report = await trio_relay.produce(ws(a, "news"), "hello", envelope=True)
        assert report is not None
        assert (report.seq, report.remote) == (1, True)
        assert report.queued == 2  # a's consumer and the producer itself, on relay a
        for name in ("a", "b"):
            assert received[name] == [Message("news", 1, "hello")], name


async def test_three_relays_deliver_concurrent_publishes_in_one_order_once_each(
    redis_server: RedisServer,
) -> None:
    per_producer = 30
    async with relays(redis_server.url, 3) as servers:
        received: list[list[Any]] = [[] for _ in servers]
        async with trio.open_nursery() as nursery:
            for server, into in zip(servers, received, strict=True):
                nursery.start_soon(collect, ws(server, "t"), 3 * per_producer, into, lambda: None)
            for server in servers:
                await subscribed(server, "t")

            async def publish(server: RelayServer, name: str) -> None:
                async with trio_relay.consume(ws(server, "t"), envelope=True) as stream:
                    for i in range(per_producer):
                        await stream.send(f"{name}{i}")  # type: ignore[attr-defined]

            with trio.fail_after(LIMIT):
                async with trio.open_nursery() as producers:
                    for server, name in zip(servers, "xyz", strict=True):
                        producers.start_soon(publish, server, name)
    first = received[0]
    assert [m.seq for m in first] == list(range(1, 3 * per_producer + 1))
    for name in "xyz":  # each producer's messages in the order it sent them
        assert [m.data for m in first if m.data[0] == name] == [
            f"{name}{i}" for i in range(per_producer)
        ]
    assert received[1] == first
    assert received[2] == first


async def test_a_consumer_resumes_on_another_relay_with_no_gap_and_no_duplicate(
    redis_server: RedisServer,
) -> None:
    async with relays(redis_server.url, 2) as (a, b):
        for i in range(5):
            await a.publish(f"m{i}", "feed")
        seen: list[Any] = []
        with trio.fail_after(LIMIT):
            await collect(ws(a, "feed", "since=0"), 3, seen, lambda: None)
        assert [m.seq for m in seen] == [1, 2, 3]
        # More while the consumer is away, published on a and on b:
        await a.publish("m5", "feed")
        await b.publish("m6", "feed")
        rest: list[Any] = []
        with trio.fail_after(LIMIT):
            await collect(ws(b, "feed", f"since={seen[-1].seq}"), 4, rest, lambda: None)
    assert [(m.seq, m.data) for m in rest] == [(4, "m3"), (5, "m4"), (6, "m5"), (7, "m6")]


async def test_a_relay_started_later_fills_its_history_from_the_log(
    redis_server: RedisServer,
) -> None:
    async with relays(redis_server.url, 1) as (a,):
        for i in range(4):
            await a.publish(f"m{i}", "feed")
        async with relays(redis_server.url, 1) as (late,):
            resumed: list[Any] = []
            with trio.fail_after(LIMIT):
                await collect(ws(late, "feed", "since=2"), 2, resumed, lambda: None)
            assert [(m.seq, m.data) for m in resumed] == [(3, "m2"), (4, "m3")]
            report = await late.publish("m4", "feed")
            assert (report.seq, report.remote) == (5, True)


async def test_an_interrupted_history_fill_goes_on_where_it_stopped(
    redis_server: RedisServer,
) -> None:
    class FailsOnceAfterOneEntry(RedisBackplane):
        failed = False

        def _deliver(self, entry: Entry, *, fill: bool = False) -> None:
            super()._deliver(entry, fill=fill)
            if not self.failed:
                self.failed = True
                raise OSError("connection lost during the fill")

    async with relays(redis_server.url, 1) as (a,):
        for i in range(3):
            await a.publish(f"m{i}", "feed")
        async with trio.open_nursery() as nursery:
            late: RelayServer = await nursery.start(
                partial(
                    trio_relay.serve_relay,
                    "127.0.0.1",
                    0,
                    config=QUIET,
                    backplane=FailsOnceAfterOneEntry(redis_server.url),
                )
            )
            assert late.backplane is not None
            with trio.fail_after(LIMIT):
                await late.backplane.wait_until_up()
            replayed: list[Any] = []
            with trio.fail_after(LIMIT):
                await collect(ws(late, "feed", "since=0"), 3, replayed, lambda: None)
            assert late.backplane.statistics().conflicts == 0
            nursery.cancel_scope.cancel()
    assert replayed == [Message("feed", i + 1, f"m{i}") for i in range(3)]


async def test_a_consumer_ahead_of_a_lagging_relay_waits_for_the_log_instead_of_a_gap(
    redis_server: RedisServer,
) -> None:
    # b holds t but has not delivered message 1 yet when a consumer arrives with since=1
    # (it saw 1 on relay a): that must not look like a restart (a gap, and a replay from 1).
    async with relays(redis_server.url, 2) as (a, b), trio.open_nursery() as nursery:
        assert b.backplane is not None
        nursery.start_soon(partial(collect, ws(b, "t"), 2, [], lambda: None))
        await subscribed(b, "t")
        take, held = b.backplane._take, []
        b.backplane._take = lambda *message: held.append(message)  # type: ignore[method-assign]
        report = await a.publish("first", "t")
        assert b.topics.last_number("t") == 0  # b has not delivered it
        async with trio_relay.consume(ws(b, "t", f"since={report.seq}"), envelope=True) as items:
            await subscribed(b, "t", 2)
            b.backplane._take = take  # type: ignore[method-assign]
            for message in held:
                take(*message)
            await a.publish("second", "t")
            with trio.fail_after(LIMIT):
                item = await items.__anext__()
        assert item == Message("t", 2, "second")


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    # One Redis for all examples, each example under a prefix of its own.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["publish", "hop"]), st.integers(min_value=0, max_value=2)),
        max_size=25,
    )
)
def test_a_consumer_hopping_between_relays_gets_every_message_once_in_order(
    redis_server: RedisServer, steps: list[tuple[str, int]]
) -> None:
    """Publish on any of three relays while one consumer hops between them, resuming each
    time with ``since=`` the last number it got (messages in flight at a hop are dropped
    with the old connection, and must come again from the new relay's history)."""
    prefix = f"p{uuid.uuid4().hex}"

    async def scenario() -> list[Any]:
        received: list[Any] = []
        changed = trio.Event()
        async with relays(redis_server.url, 3, prefix=prefix) as servers:

            async def consume_on(
                server: RelayServer, scope: trio.CancelScope, done: trio.Event
            ) -> None:
                nonlocal changed
                since = received[-1].seq if received else 0
                try:
                    with scope:
                        url = ws(server, "t", f"since={since}")
                        async with trio_relay.consume(url, envelope=True) as items:
                            async for item in items:
                                received.append(item)
                                changed.set()
                                changed = trio.Event()
                finally:
                    done.set()

            async with trio.open_nursery() as nursery:
                scope, done = trio.CancelScope(), trio.Event()
                nursery.start_soon(consume_on, servers[0], scope, done)
                published = 0
                with trio.fail_after(LIMIT):
                    for action, index in [*steps, ("publish", 0)]:
                        if action == "publish":
                            published += 1
                            await servers[index].publish(f"m{published}", "t")
                        else:  # stop the consumer (whatever was in flight), go on elsewhere
                            scope.cancel()
                            await done.wait()
                            scope, done = trio.CancelScope(), trio.Event()
                            nursery.start_soon(consume_on, servers[index], scope, done)
                    while len(received) < published:
                        await changed.wait()
                scope.cancel()
        return received

    received = trio.run(scenario)
    count = sum(action == "publish" for action, _ in steps) + 1
    assert received == [Message("t", i, f"m{i}") for i in range(1, count + 1)]


async def test_a_since_beyond_every_relays_numbering_gets_a_gap_as_after_a_restart(
    redis_server: RedisServer,
) -> None:
    async with relays(redis_server.url, 2) as (a, b):
        await a.publish("one", "t")
        async with trio_relay.consume(ws(b, "t", "since=50"), envelope=True) as items:
            with trio.fail_after(LIMIT):
                first = await items.__anext__()
                second = await items.__anext__()
    assert first == Gap("t", 50, 1)
    assert second == Message("t", 1, "one")


async def test_a_foreign_entry_in_the_log_is_skipped_and_logged(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    import coredis

    async with relays(redis_server.url, 2) as (a, b):
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, ws(b, "t"), 1, got, lambda: None)
            await subscribed(b, "t")
            client = coredis.Redis.from_url(redis_server.url)
            async with client:
                await client.publish("trio-relay:{t:t}", "something else")
                await client.publish("trio-relay:{t:t}", "e 9 x:1 1\n2:qx")
                await client.publish("trio-relay:{t:t}", b"e 9 x:1 1\n2:t\xff")
                await client.xadd("trio-relay:{t:t}:log", {"something": "else"})
            # a starts holding t to publish on it: it reads the log, and skips that entry
            # (then the first publish starts the topic's numbering, in a log of its own).
            with trio.fail_after(LIMIT):
                await a.publish("real", "t")
            async with relays(redis_server.url, 1) as (late,):
                with trio.fail_after(LIMIT):
                    _, _, messages = await late.topics.retained("t")
    assert got == [Message("t", 1, "real")]
    assert [m.data for m in messages] == ["real"]
    skipped = [r.getMessage() for r in caplog.records]
    skipped = [line for line in skipped if "skipped, not a relay's batch" in line]
    assert len(skipped) == 3 + 1, skipped  # b skips the three messages; a, the entry


async def test_echo_false_skips_only_the_publishers_own_connection(
    redis_server: RedisServer,
) -> None:
    async with relays(redis_server.url, 2) as (a, b):
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, ws(b, "q"), 1, got, lambda: None)
            await subscribed(b, "q")
            with trio.fail_after(LIMIT):
                report = await trio_relay.produce(ws(a, "q"), "x", envelope=True, echo=False)
        assert report is not None and report.remote is True
        assert report.queued == 1  # its own subscription, counted though skipped (documented)
        assert got == [Message("q", 1, "x")]


async def test_when_redis_dies_each_relay_serves_its_own_clients_under_a_local_epoch(
    redis_server: RedisServer,
) -> None:
    # The outage contract (README "Scaling out"): a relay cut off numbers its own publishes
    # in an epoch of its own (its subscribers are told: a reset), never in the shared one;
    # a Redis that comes back empty starts a fresh shared epoch (everyone is told).
    async with relays(redis_server.url, 2, timeout=1.0, block=0.2) as (a, b):
        assert a.backplane is not None and b.backplane is not None
        on_a: list[Any] = []
        on_b: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(collect, ws(a, "t"), 6, on_a, lambda: None, resume=True))
            nursery.start_soon(partial(collect, ws(b, "t"), 4, on_b, lambda: None, resume=True))
            await subscribed(a, "t")
            await subscribed(b, "t")
            before = await a.publish("before", "t")
            assert (before.seq, before.remote) == (1, True)

            redis_server.kill()
            with trio.fail_after(LIMIT):
                await a.backplane.wait_until_up(False)
                await b.backplane.wait_until_up(False)
            assert await health(a) == {"status": "degraded", "connections": 1, "backplane": "down"}
            assert relay_stats(a)["backplane"] == "down"  # the console's panel shows it
            # Published on a alone: a's clients get it, numbered in a's own epoch.
            alone = await a.publish("alone", "t")
            assert (alone.seq, alone.remote, alone.queued) == (2, False, 1)
            assert alone.epoch == a.backplane.local_epoch != before.epoch

            redis_server.start()  # same port, no data: the counters and the log are gone
            with trio.fail_after(LIMIT):
                await a.backplane.wait_until_up(True)
                await b.backplane.wait_until_up(True)
            assert (await health(a))["backplane"] == "up"
            assert relay_stats(a)["backplane"] == "up"
            after = await b.publish("after", "t")
            again = await a.publish("again", "t")
        assert a.backplane.statistics().reconnects == 1
        assert a.backplane.statistics().local_only == 1
    # Redis lost the topic: a fresh epoch, numbered from 1, on every relay.
    assert (after.seq, after.remote, again.seq, again.remote) == (1, True, 2, True)
    assert after.epoch == again.epoch not in (before.epoch, alone.epoch)
    assert on_a == [
        Message("t", 1, "before"),
        Gap("t", 1, 2, alone.epoch, reset=True),
        Message("t", 2, "alone"),
        Gap("t", 2, 1, after.epoch, reset=True),
        Message("t", 1, "after"),
        Message("t", 2, "again"),
    ]
    assert on_b == [
        Message("t", 1, "before"),
        Gap("t", 1, 1, after.epoch, reset=True),
        Message("t", 1, "after"),
        Message("t", 2, "again"),
    ]
    names = [(m.epoch, m.seq) for m in on_a + on_b if isinstance(m, Message)]
    assert names == [
        (before.epoch, 1),
        (alone.epoch, 2),
        (after.epoch, 1),
        (after.epoch, 2),
        (before.epoch, 1),
        (after.epoch, 1),
        (after.epoch, 2),
    ]


async def test_a_redis_that_stops_answering_is_noticed_within_the_command_bound(
    redis_server: RedisServer,
) -> None:
    # SIGSTOP: the TCP connections stay up and silent, the worst case for a client. Every
    # command the backplane sends is bounded (timeout), and so is each XREAD (block).
    async with relays(redis_server.url, 2, timeout=0.5, block=0.2) as (a, b):
        assert a.backplane is not None and b.backplane is not None
        on_b: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(collect, ws(b, "t"), 2, on_b, lambda: None))
            await subscribed(b, "t")
            redis_server.pause()
            with trio.fail_after(LIMIT):
                await a.backplane.wait_until_up(False)
                await b.backplane.wait_until_up(False)
            report = await a.publish("while frozen", "t")
            assert (report.seq, report.remote) == (1, False)
            redis_server.resume()
            with trio.fail_after(LIMIT):
                await a.backplane.wait_until_up(True)
                await b.backplane.wait_until_up(True)
            report = await a.publish("thawed", "t")
            assert report.remote is True
            report = await a.publish("and again", "t")
            assert report.remote is True
    # b never saw the message a delivered alone; it sees the later ones, in order.
    assert [m.data for m in on_b] == ["thawed", "and again"]


async def test_a_publish_that_got_no_answer_is_unknown_and_never_reaches_the_log_later(
    redis_server: RedisServer,
) -> None:
    # Redis freezes with the publish script in its socket buffer: the publish times out,
    # its ack says remote=None (unknown) and it is delivered locally, in a's own epoch.
    # Thawed, Redis runs the script past the deadline it carries: it refuses it, so the
    # other relays never get it later under a number of their own.
    async with relays(redis_server.url, 2, timeout=0.5, block=5.0) as (a, b):
        assert a.backplane is not None
        on_a: list[Any] = []
        on_b: list[Any] = []
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(collect, ws(a, "t"), 5, on_a, lambda: None))
                nursery.start_soon(partial(collect, ws(b, "t"), 2, on_b, lambda: None))
                await subscribed(a, "t")
                await subscribed(b, "t")
                # A publish first, so that the next one finds a pooled connection and gets
                # its script written to Redis before Redis freezes.
                warm = await a.publish("warm", "t")
                assert warm.remote is True
                redis_server.pause()
                unknown = await a.publish("timed out", "t")
                assert (unknown.seq, unknown.remote) == (2, None)
                assert unknown.epoch == a.backplane.local_epoch
                redis_server.resume()
                after = await a.publish("next", "t")
                assert (after.seq, after.remote, after.epoch) == (2, True, warm.epoch)
            log = await read_log(redis_server.url)
    assert [fields[b"0"] for fields in log] == [b"twarm", b"tnext"]
    assert on_b == [Message("t", 1, "warm"), Message("t", 2, "next")]
    assert on_a == [
        Message("t", 1, "warm"),
        Gap("t", 1, 2, unknown.epoch, reset=True),
        Message("t", 2, "timed out"),
        Gap("t", 2, 2, warm.epoch, reset=True),
        Message("t", 2, "next"),
    ]


async def read_log(
    url: str, topic: str = "t", prefix: str = "trio-relay"
) -> list[dict[bytes, bytes]]:
    """The fields of every entry of ``topic``'s log in the Redis at ``url``."""
    import coredis

    client = coredis.Redis.from_url(url)
    async with client:
        entries = await client.xrange(f"{prefix}:{{t:{topic}}}:log")
    return [dict(entry.field_values) for entry in entries]


async def test_a_relay_stops_promptly_while_redis_is_frozen(redis_server: RedisServer) -> None:
    with trio.fail_after(LIMIT):
        async with relays(redis_server.url, 1, timeout=5.0, block=5.0) as (a,):
            await a.publish("x")
            async with trio_relay.consume(ws(a)):
                redis_server.pause()
                # A publish stuck waiting for Redis, and a reader inside XREAD, when the
                # relay is cancelled: both must give way at once.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(a.publish, "stuck")
                    await trio.testing.wait_all_tasks_blocked()
                    started = trio.current_time()
                    nursery.cancel_scope.cancel()
                assert trio.current_time() - started < 1.0
                # The client connection ends as the relay shuts down below.
        assert trio.current_time() - started < 2.0


async def test_a_relay_whose_redis_is_unreachable_at_start_serves_locally(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url
    redis_server.kill()
    async with relays(url, 1, timeout=1.0) as (a,):
        assert a.backplane is not None and not a.backplane.up
        assert await health(a) == {"status": "degraded", "connections": 0, "backplane": "down"}
        with trio.fail_after(LIMIT):
            solo = await trio_relay.produce(ws(a), "solo", envelope=True)
        assert solo is not None and (solo.seq, solo.remote) == (1, False)
        assert solo.epoch == a.backplane.local_epoch
        redis_server.start()
        with trio.fail_after(LIMIT):
            await a.backplane.wait_until_up(True)
        report = await a.publish("shared")
        # Redis never had the topic: its numbering starts, in an epoch of its own.
        assert (report.seq, report.remote) == (1, True)
        assert report.epoch != solo.epoch


async def test_metrics_tell_whether_the_backplane_is_up(redis_server: RedisServer) -> None:
    async with relays(redis_server.url, 1) as (a,):
        await a.publish("x")
        text = generate_latest(metrics_registry(a)).decode()
    assert "trio_relay_backplane_up 1.0" in text
    assert "trio_relay_backplane_batches_published_total 1.0" in text


@given(
    messages=st.lists(
        st.one_of(
            st.text().map(lambda text: (text.encode(), True)),  # no lone surrogates
            st.binary().map(lambda data: (data, False)),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_a_log_entry_decodes_to_what_was_published(messages: list[tuple[bytes, bool]]) -> None:
    payloads, texts = [p for p, _ in messages], [t for _, t in messages]
    fields = {b"e": b"0a1b2c3d", b"s": b"7", b"o": b"relay:3"}
    fields |= {str(i).encode(): v for i, v in enumerate(encode_values(payloads, texts))}
    entry = Entry("a/b", "0a1b2c3d", 7, "relay:3", payloads, texts)
    assert decode_entry("a/b", fields) == entry
    assert decode_message("a/b", encode_message(entry)) == entry


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"x": b"1"}, "no field b'e'"),
        ({b"t": b"a", b"s": b"1", b"o": b"r:1", b"0": b"tx"}, "no field b'e'"),
        ({b"t": b"a", b"e": b"e!", b"s": b"1", b"o": b"r:1", b"0": b"tx"}, "an epoch is"),
        ({b"t": b"a", b"e": b"e", b"s": b"0", b"o": b"r:1", b"0": b"tx"}, "a number below 1"),
        ({b"t": b"a", b"e": b"e", b"s": b"one", b"o": b"r:1", b"0": b"tx"}, "invalid literal"),
        ({b"t": b"a", b"e": b"e", b"s": b"1", b"o": b"r:1", b"0": b"qx"}, "unknown kind b'q'"),
        ({b"t": b"a", b"e": b"e", b"s": b"1", b"o": b"r:1", b"0": b"t\xff"}, "not UTF-8"),
        ({b"t": b"a", b"e": b"e", b"s": b"1", b"o": b"r:1"}, "no messages"),
    ],
)
def test_a_log_entry_no_relay_wrote_is_refused_with_a_reason(
    fields: dict[bytes, bytes], reason: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        decode_entry("a", fields)


def test_a_backplane_url_must_name_redis() -> None:
    with pytest.raises(ValueError, match="redis://"):
        RelayConfig(backplane="http://example.com")


async def health(server: RelayServer) -> dict[str, object]:
    """``/healthz`` of ``server``, served on a port of its own."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio_relay.serve_metrics, server, "127.0.0.1", 0)
        with trio.fail_after(LIMIT):
            _, _, body = await http_request(listeners[0].socket.getsockname()[1], "/healthz")
        nursery.cancel_scope.cancel()
    return json.loads(body)  # type: ignore[no-any-return]


async def test_the_relay_reads_redis_clock_to_the_millisecond(redis_server: RedisServer) -> None:
    # Publishes carry a deadline in Redis's time; coredis 6.9's time() drops the
    # microseconds (up to a second off), so the backplane reads TIME itself.
    import coredis

    async with relays(redis_server.url, 1) as (a,):
        assert a.backplane is not None
        client = coredis.Redis.from_url(redis_server.url, decode_responses=False)
        async with client:
            read_by_script = client.register_script("return redis.call('TIME')")
            before = trio.current_time()
            seconds, microseconds = await read_by_script(keys=[], args=[])
            after = trio.current_time()
        redis_ms = int(seconds) * 1000 + int(microseconds) / 1000
        estimate = (before + after) * 500 + a.backplane._clock_offset
        assert abs(estimate - redis_ms) < 50 + (after - before) * 1000


async def test_publishes_that_arrive_together_go_to_redis_together(
    redis_server: RedisServer,
) -> None:
    async with relays(redis_server.url, 1) as (a,):
        assert a.backplane is not None
        calls = 0
        call_many = a.backplane._call_many
        slots: list[set[int]] = []

        async def counted(sha: Any, calls_now: list[tuple[list[str], list[Any]]]) -> Any:
            nonlocal calls
            calls += 1
            slots.extend({hash_slot(key.encode()) for key in keys} for keys, _ in calls_now)
            return await call_many(sha, calls_now)

        a.backplane._call_many = counted  # type: ignore[method-assign]
        reports: list[Any] = []

        async def publish(n: int) -> None:
            reports.append(await a.topics.publish(f"t{n % 3}", f"m{n}"))

        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                for n in range(30):
                    nursery.start_soon(publish, n)
    assert len(reports) == 30 and all(r.remote is True for r in reports)
    for topic in ("t0", "t1", "t2"):
        assert sorted(r.seq for r in reports if r.topic == topic) == list(range(1, 11))
    assert calls < 10, calls  # one round trip for many publishes (not 30)
    assert all(len(slot) == 1 for slot in slots)  # each script call: one Cluster slot


async def test_a_redis_that_freezes_as_the_subscription_connects_is_noticed_in_time(
    redis_server: RedisServer,
) -> None:
    # Entering coredis's PubSub connects and says HELLO; a Redis frozen there (SIGSTOP)
    # accepts the connection and never answers. The relay must give up after its timeout,
    # serve locally, and come back once Redis does (a relay that hung there never started).
    class FreezesFirst(RedisBackplane):
        frozen = False

        async def _subscribe(self, *args: Any) -> Any:
            if not self.frozen:
                self.frozen = True
                # A connection of its own for the subscription (as when the pool's is busy),
                # so that entering it says HELLO to the frozen Redis.
                self._client.connection_pool.disconnect()
                redis_server.pause()
            return await super()._subscribe(*args)

    try:
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                backplane = FreezesFirst(redis_server.url, timeout=0.5, block=0.2)
                started = trio.current_time()
                a: RelayServer = await nursery.start(
                    partial(
                        trio_relay.serve_relay, "127.0.0.1", 0, config=QUIET, backplane=backplane
                    )
                )
                waited = trio.current_time() - started
                assert backplane.frozen and not backplane.up
                report = await a.publish("alone")
                assert report.remote is False
                redis_server.resume()
                await backplane.wait_until_up(True)
                assert (await a.publish("shared")).remote is True
                nursery.cancel_scope.cancel()
    finally:
        redis_server.resume()
    assert waited < 0.5 + 1.0, waited  # the timeout, and the time to start and stop
