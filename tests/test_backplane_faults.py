"""The backplane's contract under Redis faults, against real ``redis-server`` processes.

For every topic, an (epoch, sequence number) pair names exactly one message on every relay;
a consumer gets each message once, in order, or is told what it missed (a ``Gap``), or that
the numbering changed (a ``Gap`` with ``reset``): never a silent duplicate, jump or
renumbering (README "Scaling out"). :func:`check` asserts that over every consumer of every
relay, hoppers included; each test adds what its event must look like exactly.

Faults: Redis restarted with its RDB snapshot, killed and restarted empty, one relay cut off
by a TCP proxy (:class:`redis_support.Proxy`), a relay started while Redis is unreachable,
the log trimmed while a relay is away, and a hypothesis schedule of publishes, hops and
faults. Redis keeps its own time, so these run on the real clock; every wait is bounded
(``fail_after``) and waits for a predicate on what consumers received, never for time.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import trio
from helpers import upgrade_request
from hypothesis import HealthCheck, given, settings, strategies as st
from redis_support import Proxy, RedisServer, redis_server
from test_backplane import LIMIT, read_log, relays, start_relay, subscribed, ws

import trio_relay
from trio_relay import Gap, Message, RedisBackplane, RelayConfig, RelayServer

__all__ = ["redis_server"]  # the fixture, used by name

FAST = {"timeout": 1.0, "block": 0.2}
"""Backplane settings that notice a fault within a second or so."""

Item = Message | Gap


class Consumer:
    """An envelope consumer that records what it receives; it can hop to another relay,
    resuming with ``since`` and ``epoch`` from its last item (as a client does)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.items: list[Item] = []
        self._changed = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()

    @property
    def messages(self) -> list[Message]:
        return [item for item in self.items if isinstance(item, Message)]

    def position(self) -> tuple[int, str | None]:
        """Where a client would resume: after its last message or gap (from 0 before any:
        every consumer here starts before the first publish, or from a given message)."""
        for item in reversed(self.items):
            if isinstance(item, Message):
                return item.seq, item.epoch
            return item.first - 1, item.epoch
        return 0, None

    async def start(self, nursery: trio.Nursery, url: str, *, resume: bool = True) -> None:
        """Consume ``url`` (from this consumer's position, if it has one) until :meth:`stop`;
        returns once subscribed."""
        since, epoch = self.position()
        self._scope, self._done = trio.CancelScope(), trio.Event()
        subscribed = trio.Event()
        nursery.start_soon(self._run, url, since, epoch, resume, subscribed)
        with trio.fail_after(LIMIT):
            await subscribed.wait()

    async def _run(
        self, url: str, since: int, epoch: str | None, resume: bool, subscribed: trio.Event
    ) -> None:
        assert self._scope is not None
        try:
            with self._scope:
                options: dict[str, Any] = {"since": since, "epoch": epoch, "envelope": True}
                if resume:
                    options.update(resume=True, backoff=(0.05, 0.2))
                    options["on_state"] = lambda state: (
                        subscribed.set() if state.state == "connected" else None
                    )
                async with trio_relay.consume(url, **options) as items:
                    subscribed.set()
                    async for item in items:
                        self.items.append(item)
                        self._changed.set()
                        self._changed = trio.Event()
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Stop consuming (whatever is in flight is lost, as when a client goes away)."""
        if self._scope is not None:
            self._scope.cancel()
            with trio.fail_after(LIMIT):
                await self._done.wait()

    async def hop(self, nursery: trio.Nursery, url: str) -> None:
        await self.stop()
        await self.start(nursery, url)

    async def wait_for(self, done: Callable[[list[Item]], bool]) -> None:
        with trio.fail_after(LIMIT):
            while not done(self.items):
                await self._changed.wait()

    async def wait_for_data(self, *data: str) -> None:
        """Wait until every one of ``data`` was received."""
        await self.wait_for(lambda items: set(data) <= {m.data for m in self.messages})


def check(*consumers: Consumer, starts_at_zero: bool = True) -> dict[tuple[str, str, int], Any]:
    """Assert the contract over ``consumers``; return every name seen, with its message.

    - one name, one message: (topic, epoch, seq) never names two payloads, on any relay;
    - in order, or told: a message follows the one before it (same epoch, next number),
      or a ``Gap`` right before it says where it goes on from (``first`` of ``epoch``;
      at 0, where nothing precedes, the first message of any epoch), from the previous
      number (``since``) unless it is a reset;
    - never a silent duplicate: a consumer gets a payload twice only across a reset.
    ``starts_at_zero``: consumers subscribed before any publish (their first message is 1,
    or a gap says otherwise)."""
    names: dict[tuple[str, str, int], Any] = {}
    for consumer in consumers:
        previous: Message | None = None
        gap: Gap | None = None
        seen: set[Any] = set()
        for item in consumer.items:
            where = f"{consumer.name}: {item!r} (epoch {item.epoch!r}) after {previous!r}"
            if isinstance(item, Gap):
                if gap is not None and not gap.reset and not item.reset:
                    # Two gaps in a row (the consumer resumed between them, and what came
                    # meanwhile is gone too): the second goes on from where the first left
                    # it, and together they explain one skip.
                    assert (item.since, item.epoch) == (gap.first - 1, gap.epoch), where
                    gap = Gap(item.topic, gap.since, item.first, item.epoch)
                    continue
                if gap is not None and gap.reset and not item.reset:
                    # A reset put the consumer before `first` of that numbering (at 0: it has
                    # nothing of it, so since=0 takes any numbering, as the relay does); a
                    # gap from there says where it goes on.
                    assert item.since == gap.first - 1, where
                    assert item.epoch == gap.epoch or item.since == 0, where
                    previous = None
                gap = item
                if item.reset:
                    seen.clear()
                continue
            assert item.epoch, where
            key = (item.topic, item.epoch, item.seq)
            assert names.setdefault(key, item.data) == item.data, f"two messages named {key}"
            if gap is not None:
                # At number 0 (first 1) nothing precedes: any numbering's 1 follows it.
                assert (gap.epoch, gap.first) == (item.epoch, item.seq) or (
                    gap.first == item.seq == 1
                ), where
                if not gap.reset:
                    assert previous is None or (
                        previous.epoch == item.epoch and gap.since == previous.seq
                    ), where
            elif previous is not None:
                assert (item.epoch, item.seq) == (previous.epoch, previous.seq + 1), where
            elif starts_at_zero:
                assert item.seq == 1, where
            assert item.data not in seen, f"{where}: a silent duplicate"
            seen.add(item.data)
            previous, gap = item, None
    return names


async def redis_back(*servers: RelayServer) -> None:
    """Wait until every relay's backplane is up again."""
    with trio.fail_after(LIMIT):
        for server in servers:
            assert server.backplane is not None
            await server.backplane.wait_until_up(True)


async def redis_gone(*servers: RelayServer) -> None:
    with trio.fail_after(LIMIT):
        for server in servers:
            assert server.backplane is not None
            await server.backplane.wait_until_up(False)


async def test_redis_restarted_with_its_rdb_loses_nothing_and_repeats_nothing(
    redis_server: RedisServer,
) -> None:
    # Issue 12, row 1: "50 published, 100 received" (read anew, renumbered).
    async with relays(redis_server.url, 2, **FAST) as (a, b), trio.open_nursery() as nursery:
        on_a, on_b = Consumer("on a"), Consumer("on b")
        await on_a.start(nursery, ws(a, "t"))
        await on_b.start(nursery, ws(b, "t"))
        await subscribed(a, "t")
        await subscribed(b, "t")
        reports = [await (a, b)[n % 2].publish(f"m{n}", "t") for n in range(25)]
        await on_a.wait_for_data("m24")
        await on_b.wait_for_data("m24")
        redis_server.save()
        redis_server.kill()
        await redis_gone(a, b)
        redis_server.start()  # with its snapshot: the counters, epochs and the log
        await redis_back(a, b)
        reports += [await (a, b)[n % 2].publish(f"m{n}", "t") for n in range(25, 50)]
        await on_a.wait_for_data("m49")
        await on_b.wait_for_data("m49")
        # A consumer that left at 30 and comes back on the other relay: the rest, once.
        hopper = Consumer("hopper")
        hopper.items.append(on_a.messages[29])
        await hopper.start(nursery, ws(b, "t"))
        await hopper.wait_for_data("m49")
        for consumer in (on_a, on_b, hopper):
            await consumer.stop()
    epoch = reports[0].epoch
    assert [(r.seq, r.epoch, r.remote) for r in reports] == [(n, epoch, True) for n in range(1, 51)]
    expected = [Message("t", n + 1, f"m{n}") for n in range(50)]
    assert on_a.items == on_b.items == expected  # 50 received, no gap, no duplicate
    assert hopper.items[1:] == expected[30:]
    check(on_a, on_b, hopper, starts_at_zero=False)
    assert a.backplane is not None and a.backplane.statistics().epochs == 0


async def test_redis_restarted_empty_starts_a_fresh_epoch_everyone_is_told(
    redis_server: RedisServer,
) -> None:
    async with relays(redis_server.url, 2, **FAST) as (a, b), trio.open_nursery() as nursery:
        on_a, on_b = Consumer("on a"), Consumer("on b")
        await on_a.start(nursery, ws(a, "t"))
        await on_b.start(nursery, ws(b, "t"))
        await subscribed(a, "t")
        await subscribed(b, "t")
        old = [await a.publish(f"old{n}", "t") for n in range(3)]
        await on_b.wait_for_data("old2")
        redis_server.kill()
        await redis_gone(a, b)
        redis_server.start()  # no snapshot: everything is gone
        await redis_back(a, b)
        new = [await b.publish(f"new{n}", "t") for n in range(3)]
        await on_a.wait_for_data("new2")
        await on_b.wait_for_data("new2")
        # A consumer still at old2 resumes on either relay: told, never given new numbers
        # for its old ones.
        hopper = Consumer("hopper")
        hopper.items.append(on_a.messages[2])
        await hopper.start(nursery, ws(a, "t"))
        await hopper.wait_for_data("new2")
        for consumer in (on_a, on_b, hopper):
            await consumer.stop()
    assert [r.seq for r in new] == [1, 2, 3] and new[0].epoch != old[0].epoch
    for consumer in (on_a, on_b):
        assert consumer.items == [
            *(Message("t", n, f"old{n - 1}") for n in (1, 2, 3)),
            Gap("t", 3, 1, new[0].epoch, reset=True),
            *(Message("t", n, f"new{n - 1}") for n in (1, 2, 3)),
        ]
    assert hopper.items[1] == Gap("t", 3, 1, new[0].epoch, reset=True)
    assert [m.data for m in hopper.messages[1:]] == ["new0", "new1", "new2"]
    check(on_a, on_b, hopper, starts_at_zero=False)


async def test_a_relay_cut_off_numbers_alone_in_its_own_epoch_and_rejoins_without_shifting(
    redis_server: RedisServer,
) -> None:
    # Issue 12, row 2: after a relay was cut off, its numbering stayed shifted for good (a
    # consumer moving A->B with since got duplicates; B->A a false reset).
    async with trio.open_nursery() as nursery:
        proxy = Proxy(redis_server.port)
        await nursery.start(proxy.run)
        a = await start_relay(nursery, proxy.url, **FAST)
        b = await start_relay(nursery, redis_server.url, **FAST)
        on_a, on_b = Consumer("on a"), Consumer("on b")
        await on_a.start(nursery, ws(a, "t"))
        await on_b.start(nursery, ws(b, "t"))
        await subscribed(a, "t")
        await subscribed(b, "t")
        await a.publish("before a", "t")
        await b.publish("before b", "t")
        await on_a.wait_for_data("before b")
        await on_b.wait_for_data("before b")

        proxy.cut()
        await redis_gone(a)
        alone = await a.publish("alone on a", "t")
        during = [await b.publish(f"during {n}", "t") for n in range(3)]
        await on_a.wait_for_data("alone on a")
        proxy.heal()
        await redis_back(a)
        await on_a.wait_for_data("during 2")  # a reads what it missed
        after = await a.publish("after", "t")
        await on_a.wait_for_data("after")
        await on_b.wait_for_data("after")
        # Consumers moving across, from where they were: b to a, a to b.
        hoppers = {}
        for source, data, target in [
            (on_b, "before a", a),
            (on_b, "during 0", a),
            (on_a, "before b", b),
            (on_a, "alone on a", b),  # a's local epoch: b never had that numbering
        ]:
            hopper = hoppers[data] = Consumer(f"from {data!r} to {target.port}")
            hopper.items.append(next(m for m in source.messages if m.data == data))
            await hopper.start(nursery, ws(target, "t"))
            await hopper.wait_for_data("after")
        nursery.cancel_scope.cancel()
    shared = during[0].epoch
    assert (alone.seq, alone.remote) == (3, False) and alone.epoch not in (shared, "")
    assert [(r.seq, r.epoch, r.remote) for r in during] == [(n, shared, True) for n in (3, 4, 5)]
    assert (after.seq, after.epoch, after.remote) == (6, shared, True)
    assert on_b.items == [
        Message("t", 1, "before a"),
        Message("t", 2, "before b"),
        *(Message("t", n + 3, f"during {n}") for n in range(3)),
        Message("t", 6, "after"),
    ]
    assert on_a.items == [
        Message("t", 1, "before a"),
        Message("t", 2, "before b"),
        Gap("t", 2, 3, alone.epoch, reset=True),
        Message("t", 3, "alone on a"),
        Gap("t", 3, 3, shared, reset=True),
        *(Message("t", n + 3, f"during {n}") for n in range(3)),
        Message("t", 6, "after"),
    ]

    def rest(hopper: Consumer) -> list[Item]:
        return hopper.items[1:]

    tail = [*(Message("t", n + 3, f"during {n}") for n in range(3)), Message("t", 6, "after")]
    # a kept no history of the shared numbering from before it numbered alone: said so.
    assert rest(hoppers["before a"]) == [Gap("t", 1, 3, shared), *tail]
    assert rest(hoppers["during 0"]) == tail[1:]
    assert rest(hoppers["before b"]) == tail  # no gap, no duplicate
    assert rest(hoppers["alone on a"]) == [
        Gap("t", 3, 1, shared, reset=True),
        Message("t", 1, "before a"),
        Message("t", 2, "before b"),
        *tail,
    ]
    check(on_a, on_b, *hoppers.values(), starts_at_zero=False)


async def test_a_relay_started_while_redis_is_unreachable_pushes_nothing_old(
    redis_server: RedisServer,
) -> None:
    # Issue 12, row 3: it pushed 300 old messages to a live consumer that connected after
    # they were published, renumbered.
    async with trio.open_nursery() as nursery:
        b = await start_relay(nursery, redis_server.url, **FAST)
        payloads = [f"old{n}".encode() for n in range(300)]
        for start in range(0, 300, 30):  # ten batches (one log entry each)
            await b.topics.publish_batch("t", payloads[start : start + 30], [True] * 30)
        proxy = Proxy(redis_server.port)
        await nursery.start(proxy.run)
        proxy.cut()
        a = await start_relay(nursery, proxy.url, **FAST)
        assert a.backplane is not None and not a.backplane.up
        live = Consumer("live on a")
        await live.start(nursery, ws(a, "t"))
        await subscribed(a, "t")
        proxy.heal()
        await redis_back(a)
        new = await b.publish("new", "t")
        await live.wait_for_data("new")
        # Filled, not delivered: a consumer resuming on a gets the history.
        resumed = Consumer("resumed on a")
        resumed.items.append(Message("t", 298, "old297", new.epoch))
        await resumed.start(nursery, ws(a, "t"))
        await resumed.wait_for_data("new")
        nursery.cancel_scope.cancel()
    assert new.seq == 301
    assert live.items == [Gap("t", 0, 301, new.epoch, reset=True), Message("t", 301, "new")]
    assert [m.data for m in resumed.messages] == ["old297", "old298", "old299", "new"]
    check(live, resumed, starts_at_zero=False)


async def test_the_log_trimmed_while_a_relay_is_away_is_a_gap_never_a_jump(
    redis_server: RedisServer,
) -> None:
    # Issue 12, row 6: a live consumer jumped from 100 to 601 with no gap.
    async with trio.open_nursery() as nursery:
        proxy = Proxy(redis_server.port)
        await nursery.start(proxy.run)
        a = await start_relay(nursery, proxy.url, **FAST)
        b = await start_relay(nursery, redis_server.url, log_size=20, **FAST)
        envelope = Consumer("envelope on a")
        await envelope.start(nursery, ws(a, "t"))
        async with trio_relay.consume(ws(a, "t")) as raw:
            await subscribed(a, "t", 2)
            await b.publish("first", "t")
            await envelope.wait_for_data("first")
            assert await anext(raw) == "first"
            proxy.cut()
            await redis_gone(a)
            for n in range(300):
                await b.publish(f"away{n}", "t")
            proxy.heal()
            await redis_back(a)
            await envelope.wait_for_data("away299")
            with trio.fail_after(LIMIT), pytest.raises(trio_relay.RelayConnectionClosed) as closed:
                await anext(raw)
        nursery.cancel_scope.cancel()
    log = await read_log(redis_server.url)
    assert [int(fields[b"s"]) for fields in log] == list(range(282, 302))  # the last 20
    assert envelope.items[1:] == [
        Gap("t", 1, 282, envelope.messages[0].epoch),
        *(Message("t", n + 2, f"away{n}") for n in range(280, 300)),
    ]
    assert (closed.value.code, "missing" in closed.value.reason) == (4410, True)
    check(envelope)


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("publish"), st.integers(0, 2)),
            st.tuples(st.just("hop"), st.integers(0, 2)),
            st.tuples(st.sampled_from(["restart with data", "restart empty", "cut"]), st.just(0)),
        ),
        max_size=12,
    ).filter(lambda steps: sum(kind not in ("publish", "hop") for kind, _ in steps) <= 2)
)
def test_a_schedule_of_publishes_hops_and_faults_keeps_the_contract(
    redis_server: RedisServer, steps: list[tuple[str, int]]
) -> None:
    """Three relays (the first behind a proxy it can be cut off by), a live consumer on
    each and one hopping between them; publishes on any relay, Redis restarted with or
    without its data, the first relay cut off for a while. At the end a marker published
    through a healthy Redis reaches every consumer, and :func:`check` holds over all."""
    prefix = f"p{uuid.uuid4().hex}"

    async def scenario() -> list[Consumer]:
        async with trio.open_nursery() as nursery:
            proxy = Proxy(redis_server.port)
            await nursery.start(proxy.run)
            options = dict(FAST, prefix=prefix)
            servers = [
                await start_relay(nursery, proxy.url, **options),
                await start_relay(nursery, redis_server.url, **options),
                await start_relay(nursery, redis_server.url, **options),
            ]
            live = [Consumer(f"live on {n}") for n in range(3)]
            for consumer, server in zip(live, servers, strict=True):
                await consumer.start(nursery, ws(server, "t"))
            hopper = Consumer("hopper")
            await hopper.start(nursery, ws(servers[0], "t"))
            await subscribed(servers[0], "t", 2)
            for server in servers[1:]:
                await subscribed(server, "t")
            published = 0
            for kind, index in steps:
                if kind == "publish":
                    published += 1
                    await servers[index].publish(f"m{published}", "t")
                elif kind == "hop":
                    await hopper.hop(nursery, ws(servers[index], "t"))
                elif kind == "cut":
                    proxy.cut()
                    await redis_gone(servers[0])
                    published += 1
                    await servers[0].publish(f"m{published}", "t")  # numbered alone
                    proxy.heal()
                    await redis_back(*servers)
                else:
                    if kind == "restart with data":
                        redis_server.save()
                    else:
                        redis_server.forget_data()
                    redis_server.kill()
                    await redis_gone(*servers)
                    redis_server.start()
                    await redis_back(*servers)
            report = await servers[1].publish("marker", "t")
            assert report.remote is True
            for consumer in (*live, hopper):
                await consumer.wait_for_data("marker")
            nursery.cancel_scope.cancel()
        redis_server.forget_data()
        return [*live, hopper]

    consumers = trio.run(scenario)
    check(*consumers)


def test_the_checker_catches_a_silent_jump_a_renumbering_and_a_duplicate() -> None:
    """The checker itself: each breach of the contract fails it."""

    def consumer(*items: Item) -> Consumer:
        made = Consumer("made up")
        made.items = list(items)
        return made

    def m(seq: int, data: str, epoch: str = "e1") -> Message:
        return Message("t", seq, data, epoch)

    check(consumer(m(1, "a"), m(2, "b"), Gap("t", 2, 5, "e1"), m(5, "e")))
    check(consumer(m(1, "a"), Gap("t", 1, 1, "e2", reset=True), m(1, "x", "e2")))
    # A reset to e2's start, then (resuming elsewhere with since=0) e3 from its 2: what
    # tests/test_backplane_faults.py's schedule saw (a hopper at a relay-local epoch's 1,
    # reset to another relay's own epoch, back to the first, which numbered alone again).
    reset = Gap("t", 1, 1, "e2", reset=True)
    check(consumer(m(1, "a"), reset, Gap("t", 0, 2, "e3"), m(2, "b", "e3")))
    # Gaps in a row: 2 to 4 missed, then (resuming from 4, gone too) 5.
    check(consumer(m(1, "a"), Gap("t", 1, 5, "e1"), Gap("t", 4, 6, "e1"), m(6, "f")))
    breaches = [
        consumer(m(1, "a"), m(3, "c")),  # a silent jump
        consumer(m(1, "a"), m(2, "b", "e2")),  # a silent renumbering
        consumer(m(1, "a"), m(2, "b"), Gap("t", 2, 3, "e1"), m(3, "a")),  # a silent duplicate
        consumer(m(1, "a"), Gap("t", 1, 4, "e1"), m(3, "c")),  # a gap that lies
        consumer(m(1, "a"), reset, Gap("t", 1, 2, "e2"), m(2, "b", "e2")),  # not where it was
        consumer(m(1, "a"), Gap("t", 1, 5, "e1"), Gap("t", 3, 6, "e1"), m(6, "f")),  # 4 twice
        consumer(m(1, "a"), Gap("t", 1, 5, "e1"), Gap("t", 4, 6, "e2"), m(6, "f", "e2")),
        consumer(
            m(1, "a"), Gap("t", 1, 3, "e2", reset=True), Gap("t", 2, 4, "e3"), m(4, "d", "e3")
        ),
    ]
    for breach in breaches:
        with pytest.raises(AssertionError):
            check(breach)
    with pytest.raises(AssertionError, match="two messages named"):
        check(consumer(m(1, "a")), consumer(m(1, "not a")))


@pytest.mark.parametrize("fault", ["restart with data"])
async def test_publishes_during_a_restart_with_data_are_answered_truthfully(
    redis_server: RedisServer, fault: str
) -> None:
    """While Redis restarts, a publish is refused locally (remote False, a relay-local
    epoch) or goes through (remote True, the shared one); never a shared name twice."""
    async with relays(redis_server.url, 1, **FAST) as (a,), trio.open_nursery() as nursery:
        watcher = Consumer("watcher")
        await watcher.start(nursery, ws(a, "t"))
        await subscribed(a, "t")
        first = await a.publish("first", "t")
        redis_server.save()
        redis_server.kill()
        await redis_gone(a)
        during = await a.publish("during", "t")
        redis_server.start()
        await redis_back(a)
        after = await a.publish("after", "t")
        await watcher.wait_for_data("after")
        nursery.cancel_scope.cancel()
    assert (first.remote, during.remote, after.remote) == (True, False, True)
    assert during.epoch != first.epoch == after.epoch
    assert after.seq == 2  # the snapshot's counter goes on: "during" took no shared number
    check(watcher)


async def test_a_dead_reader_on_one_topic_does_not_delay_another(
    redis_server: RedisServer,
) -> None:
    # Issue 12, row 7: a dead reader on topic x delayed topic y on the same relay by up to
    # its overflow timeout (the backplane's reader waited for x's subscriber). Here that
    # timeout is 60 s: y's message must come long before, the dead reader still there.
    config = RelayConfig(
        ping_interval=0,
        overflow_timeout=60,
        slow_consumer_timeout=60,
        queue_size=4,
        max_queue_bytes=1024,
    )
    async with trio.open_nursery() as nursery:
        a: RelayServer = await nursery.start(
            partial(
                trio_relay.serve_relay,
                "127.0.0.1",
                0,
                config=config,
                backplane=RedisBackplane(redis_server.url, **FAST),
            )
        )
        b = await start_relay(nursery, redis_server.url, **FAST)
        dead = trio.socket.socket()
        dead.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # it fills at once
        await dead.connect(("127.0.0.1", a.port))
        await dead.send(upgrade_request("/x"))
        head = b""
        with trio.fail_after(LIMIT):
            while b"\r\n\r\n" not in head:
                head += await dead.recv(1)  # the 101 response, and not a byte more
        live = Consumer("live on y")
        await live.start(nursery, ws(a, "y"))
        await subscribed(a, "x")
        await subscribed(a, "y")
        payload = b"x" * 65536
        for _ in range(150):  # 9.6 MB for a reader that takes none: more than socket buffers
            await b.topics.publish("x", payload)
        started = trio.current_time()
        await b.publish("y1", "y")  # after all of x in the log
        with trio.fail_after(10):
            await live.wait_for_data("y1")
        delay = trio.current_time() - started
        # y overtook x, which is stuck behind its dead reader, still there, not evicted.
        stuck = a.topics.statistics()["x"].broadcast
        assert stuck.subscribers == 1 and sum(stuck.queued) > 0
        assert a.topics.last_number("x") < 150
        dead.close()
        nursery.cancel_scope.cancel()
    print(f"y delivered {delay * 1000:.1f} ms after its publish, beside a dead reader on x")
    assert delay < 5, delay


async def test_redis_holds_a_bounded_log_and_forgets_idle_topics(
    redis_server: RedisServer,
) -> None:
    # Issue 12, row 8: 1,500 messages of 256 KiB took Redis from 17 to 508 MB (the log was
    # capped by entry count only; topic counters never expired). Scaled down here: each
    # topic's log holds at most 1 MiB of payload (and its newest entry), then 3 entries,
    # then entries of at most 0 s but the newest.
    async with relays(redis_server.url, 1, log_bytes=1024 * 1024, topic_ttl=30) as (a,):
        payload = b"x" * 65536
        for _ in range(40):  # 2.5 MiB
            await a.topics.publish("big", payload, idempotency_key=None)
        await a.topics.publish("keyed", "k", idempotency_key="once")
        log = await read_log(redis_server.url, "big")
        size = int(redis_server.command("HGET", "trio-relay:{t:big}:n", "b"))
        ttls = [
            redis_server.command("TTL", key)
            for key in ("trio-relay:{t:big}:n", "trio-relay:{t:big}:log")
        ]
        key_ttl = redis_server.command("TTL", "trio-relay:{t:keyed}:k:once")
    sizes = [int(fields[b"n"]) for fields in log]
    # The newest 15 (each value is 64 KiB and its kind byte): one more would be over.
    assert sum(sizes) <= 1024 * 1024 < sum(sizes) + 65537
    assert size == sum(sizes)  # the size the hash keeps is exact
    assert [int(fields[b"s"]) for fields in log] == list(range(26, 41))
    for ttl in ttls:
        assert ttl.startswith(b":") and 0 < int(ttl[1:]) <= 30
    assert key_ttl.startswith(b":") and 0 < int(key_ttl[1:]) <= 120  # idempotency_window
    async with relays(redis_server.url, 1, log_size=3) as (b,):
        for n in range(5):
            await b.publish(f"m{n}", "counted")
        log = await read_log(redis_server.url, "counted")
    assert [fields[b"0"] for fields in log] == [b"tm2", b"tm3", b"tm4"]
    # Many topics: the logs of those this relay published to hold 300,000 bytes together
    # at most (its history_total_bytes, by default); the oldest logs go, numbering kept.
    async with relays(redis_server.url, 1, log_total_bytes=300_000) as (d,):
        for n in range(10):
            await d.topics.publish(f"many{n}", payload)
        held = [
            int(redis_server.command("HGET", f"trio-relay:{{t:many{n}}}:n", "b") or b"0")
            for n in range(10)
        ]
        numbers = [
            redis_server.command("HGET", f"trio-relay:{{t:many{n}}}:n", "s") for n in range(10)
        ]
    assert held == [0] * 6 + [65537] * 4 and sum(held) <= 300_000
    assert numbers == [b"1"] * 10
    assert await read_log(redis_server.url, "many0") == []
    async with relays(redis_server.url, 1, log_age=0) as (c,):
        for n in range(3):
            await c.publish(f"m{n}", "aged")
        log = await read_log(redis_server.url, "aged")
    assert [fields[b"0"] for fields in log] == [b"tm2"]  # older than 0 s: all but the newest
