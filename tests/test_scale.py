"""What a connection event costs does not depend on how many other connections there are.

Costs are counted, not timed: the number of Python and C function calls trio and the relay
make while one connection opens and subscribes, while it leaves, and while the relay
evicts one, at two sizes of the same relay in one run. A cost that grew with the number of
connections (a rebuilt tuple of subscriptions, a statistics snapshot, a scan of all
connections) would show up as thousands more calls at the larger size. (Calls, so a copy
made in C in one call would not show: ``benchmarks/mass_disconnect.py`` times the whole.)
"""

from __future__ import annotations

import collections
import gc
import itertools
import sys
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import FrameType

import pytest
import trio
import trio.testing
from helpers import masked_frame, upgrade_request

from trio_relay import RelayConfig, RelayStatistics, Topics, _server
from trio_relay._connection import Turnstile
from trio_relay._topics import ENTRY_OVERHEAD, TOPIC_OVERHEAD
from trio_relay.testing import MemoryRelay, open_memory_relay

SMALL, LARGE = 20, 2000

# Keepalive off: its sweep is once a second over all connections (not per event), and
# virtual time passes while the test waits.
CONFIG = RelayConfig(
    max_connections=LARGE + 10,
    max_connections_per_ip=LARGE + 10,
    max_subscribers_per_topic=LARGE + 10,
    ping_interval=0,
    overflow_timeout=0,  # evict a client that is over its budget at once
    max_queue_bytes=16 * 1024,
)


async def count_calls(action: Callable[[], Awaitable[object]]) -> int:
    """The function calls (Python and C) made, by every task, while ``action`` runs."""
    calls = 0

    def profile(_frame: FrameType, event: str, _arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(profile)
    try:
        await action()
    finally:
        sys.setprofile(None)
    return calls


async def open_idle(relay: MemoryRelay, count: int) -> list[trio.abc.Stream]:
    """``count`` raw connections that completed the handshake and are subscribed."""
    streams = []
    expected = relay.server.statistics().subscribers + count
    for _ in range(count):
        stream = await relay.open_stream()
        await stream.send_all(upgrade_request())
        streams.append(stream)
    await relay.server.wait_until(lambda s: s.subscribers == expected)
    return streams


@asynccontextmanager
async def relay_with(count: int) -> AsyncIterator[MemoryRelay]:
    async with open_memory_relay(CONFIG) as relay:
        idle = await open_idle(relay, count)
        yield relay
        for stream in idle:
            await stream.aclose()


async def event_costs(count: int) -> dict[str, int]:
    """Calls made to open one more connection, to close it, and to evict one, with
    ``count`` other connections open (idle: nobody publishes meanwhile)."""
    costs: dict[str, int] = {}
    async with relay_with(count) as relay:
        server = relay.server
        stream: trio.abc.Stream | None = None

        def subscribers(n: int) -> Callable[[RelayStatistics], bool]:
            return lambda s: s.subscribers == n

        async def open_one() -> None:
            nonlocal stream
            stream = await relay.open_stream()
            await stream.send_all(upgrade_request())  # the same topic as the idle ones
            await server.wait_until(subscribers(count + 1))

        async def close_one() -> None:
            assert stream is not None
            await stream.aclose()
            await server.wait_until(lambda s: s.connections == count)

        costs["open and subscribe"] = await count_calls(open_one)
        costs["close"] = await count_calls(close_one)

        # A client on its own topic that never reads: publishing there fills its budget
        # and evicts it (the publish goes to that topic alone, so it costs the same).
        slow = await relay.open_stream()
        await slow.send_all(upgrade_request("/slow"))
        await server.wait_until(subscribers(count + 1))

        async def evict_one() -> None:
            while server.topics.subscribers("slow"):  # 0 once evicted
                await slow.send_all(masked_frame(0x2, b"x" * 8000))
                await trio.testing.wait_all_tasks_blocked()

        costs["evict"] = await count_calls(evict_one)
        await slow.aclose()
    return costs


async def test_opening_closing_and_evicting_cost_the_same_at_2000_connections_as_at_20(
    autojump_clock: trio.testing.MockClock,
) -> None:
    small = await event_costs(SMALL)
    large = await event_costs(LARGE)
    for event, cost in small.items():
        # Equal up to noise (a dict resizing, a buffer boundary): nowhere near the 100x
        # more connections, which would add thousands of calls per event.
        assert large[event] <= cost * 1.2 + 100, (event, small, large)


async def eviction_cost(count: int) -> int:
    """Calls made by 10 publishes that each push the oldest message of all, kept by one of
    ``count`` idle topics, out of the history budget (and forget its topic)."""
    message = b"x" * 100
    each = len(message) + ENTRY_OVERHEAD + TOPIC_OVERHEAD
    topics = Topics(history_total_bytes=count * each, max_topics=count + 10)
    for n in range(count):
        await topics.publish(f"idle/{n}", message)
        await trio.sleep(1.0)  # each one older than the next
    await topics.publish("busy", message)  # the busy topic's overhead makes room once
    message_cost = len(message) + ENTRY_OVERHEAD

    async def publish_ten() -> None:
        for _ in range(10):
            await topics.publish("busy", message)

    calls = await count_calls(publish_ten)
    assert topics.retained_bytes <= count * each
    # The busy topic's first message pushed out one idle topic; ten more, 10 x 268 bytes,
    # one more (each idle topic frees 2,316).
    assert 10 * message_cost // each == 1
    assert len(topics) == count - 2
    return calls


async def test_evicting_the_oldest_retained_message_costs_the_same_at_2000_topics_as_at_20(
    autojump_clock: trio.testing.MockClock,
) -> None:
    small = await eviction_cost(SMALL)
    large = await eviction_cost(LARGE)
    assert large <= small * 1.2 + 100, (small, large)


async def v2_costs(count: int) -> dict[str, int]:
    """Calls made by a trio-relay.v2 connection to subscribe to the topic ``count`` idle
    connections share, and to unsubscribe again (it has 50 other subscriptions)."""
    costs: dict[str, int] = {}
    async with relay_with(count) as relay:
        server = relay.server
        stream = await relay.open_stream()
        await stream.send_all(upgrade_request(extra="Sec-WebSocket-Protocol: trio-relay.v2\r\n"))
        for n in range(50):
            await stream.send_all(
                masked_frame(0x1, f'{{"type":"subscribe","topic":"other/{n}"}}'.encode())
            )
        await server.wait_until(lambda s: s.subscribers == count + 50)
        answers = b""
        while answers.count(b'"subscribed"') < 50:
            answers += await stream.receive_some()

        async def answered(frame: bytes, answer: bytes) -> None:
            await stream.send_all(masked_frame(0x1, frame))
            received = b""
            while answer not in received:
                received += await stream.receive_some()

        async def subscribe() -> None:
            await answered(b'{"type":"subscribe","topic":""}', b'"subscribed"')

        async def unsubscribe() -> None:
            await answered(b'{"type":"unsubscribe","topic":""}', b'"unsubscribed"')

        # The fewest calls of three rounds: count_calls counts every task's calls, and
        # whatever else happens to run meanwhile only adds (one CI run: 305 -> 474).
        rounds = [(await count_calls(subscribe), await count_calls(unsubscribe)) for _ in range(3)]
        costs["v2 subscribe"] = min(subscribed for subscribed, _ in rounds)
        costs["v2 unsubscribe"] = min(unsubscribed for _, unsubscribed in rounds)
        await stream.aclose()
    return costs


async def test_v2_subscribing_costs_the_same_at_2000_subscribers_as_at_20(
    autojump_clock: trio.testing.MockClock,
) -> None:
    small = await v2_costs(SMALL)
    large = await v2_costs(LARGE)
    for event, cost in small.items():
        assert large[event] <= cost * 1.2 + 100, (event, small, large)


def _kinds() -> collections.Counter[str]:
    """Live objects of the kinds an idle connection must not keep one of each."""
    watched = (
        trio.Nursery,
        trio.Semaphore,
        trio.lowlevel.ParkingLot,
        types.AsyncGeneratorType,  # as @asynccontextmanager keeps one
    )
    gc.collect()
    counts: collections.Counter[str] = collections.Counter()
    for thing in gc.get_objects():
        for kind in watched:
            if isinstance(thing, kind):
                counts[kind.__name__] += 1
    return counts


async def test_an_idle_connection_keeps_no_nursery_write_slot_or_generator(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # What made the memory of an idle connection (README "Performance"): a nursery of its
    # own (0.5 KB), the write slot's semaphore and parking lot (0.3 KB), and async context
    # managers with their suspended generators (0.6 KB each). Their counts do not grow
    # with the number of idle connections.
    async with relay_with(SMALL):
        small = _kinds()
    async with relay_with(SMALL * 10):
        large = _kinds()
    assert large == small, (small, large)


async def test_a_turnstile_lets_through_at_most_its_number_per_trip_in_order() -> None:
    turnstile = Turnstile(2)
    passed: list[int] = []
    seen: list[int] = []

    async def wait(n: int, nursery: trio.Nursery) -> None:
        await turnstile.wait(nursery)
        passed.append(n)

    async def watch() -> None:  # once per trip through the scheduler
        while len(passed) < 10:
            seen.append(len(passed))
            await trio.lowlevel.cancel_shielded_checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        for n in range(10):
            nursery.start_soon(wait, n, nursery)
            await trio.sleep(0)  # they come in this order
    # In the order they came, two by two (within a trip trio runs tasks in any order).
    assert sorted(passed) == list(range(10))
    assert all(abs(n - i) < 2 for i, n in enumerate(passed)), passed
    # Two a trip; the watcher runs before or after them within a trip, so between two of
    # its looks at most two trips' worth have passed (all ten at once without the gate).
    steps = [later - earlier for earlier, later in itertools.pairwise([*seen, 10])]
    assert max(steps) <= 4 and sum(steps) == 10, seen


async def test_clients_that_drop_at_once_end_a_few_per_trip_while_others_are_served(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mass disconnect (benchmarks/mass_disconnect.py, at 19,000): every reader wakes in
    # one trip through the scheduler; each ending takes its turn, ENDINGS_AT_ONCE a trip.
    monkeypatch.setattr(_server, "ENDINGS_AT_ONCE", 5)
    async with open_memory_relay(CONFIG) as relay, relay.consume("bystander") as bystander:
        server = relay.server
        idle = await open_idle(relay, 40)
        open_before = server.statistics().connections
        counts: list[int] = []

        async def watch() -> None:
            while (count := server.statistics().connections) > open_before - 40:
                counts.append(count)
                await trio.lowlevel.cancel_shielded_checkpoint()
            counts.append(count)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as closers:  # all in the same trip
                for stream in idle:
                    closers.start_soon(trio.aclose_forcefully, stream)
            await relay.produce("served meanwhile", "bystander")
            assert await anext(bystander) == "served meanwhile"
        ended = [earlier - later for earlier, later in itertools.pairwise(counts)]
        # The watcher looks once a trip, before or after them: two trips' worth at most.
        assert sum(ended) == 40 and max(ended) <= 5 * 2, counts
