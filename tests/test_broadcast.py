"""Specification of :class:`trio_relay.Broadcast`, one behaviour per test.

Determinism rules for this module:

* Every test that involves time takes pytest-trio's ``autojump_clock`` fixture
  (``MockClock(autojump_threshold=0)``): virtual time starts at 0.0 and jumps straight to the
  next deadline, so no real time passes and times are asserted exactly with
  ``trio.current_time()``.
* Steps are ordered with ``trio.testing.wait_all_tasks_blocked()``, never by sleeping until a
  condition probably holds. ``trio.sleep()`` appears only to let virtual time reach a chosen
  instant (for example "make room at 3.0 s").
* The property test runs ``trio.run(..., clock=MockClock(autojump_threshold=0))`` inside a plain
  synchronous hypothesis test.
* Tests with many concurrent tasks run under a ``trio.fail_after`` in virtual time, so that a
  deadlock fails at once instead of hanging.
* Tests that leave tasks or subscriptions behind on failure check afterwards that nothing is left
  (``statistics().subscribers == 0``, background publishes finished or cancelled).
"""

from __future__ import annotations

import dataclasses
import math
import random
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from trio_relay import (
    Broadcast,
    BroadcastStatistics,
    OverflowPolicy,
    PublishReport,
    RelayError,
    SlowConsumerError,
    Subscription,
    SubscriptionStatistics,
)

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@dataclass
class BackgroundPublish:
    """A ``publish()`` running in its own task: what it returned, and when."""

    message: object
    report: PublishReport | None = None
    returned_at: float | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.returned_at is not None

    @property
    def cancelled(self) -> bool:
        """Whether it ended with trio.Cancelled (alone, or grouped when it waited on several
        full subscribers at once)."""
        if isinstance(self.error, BaseExceptionGroup):
            return self.error.split(trio.Cancelled)[1] is None
        return isinstance(self.error, trio.Cancelled)


async def start_publish(
    nursery: trio.Nursery, broadcast: Broadcast[Any], message: object
) -> BackgroundPublish:
    """Start ``broadcast.publish(message)`` in ``nursery`` and return once it has either
    finished or blocked (on the lock or on a full subscriber)."""
    publication = BackgroundPublish(message)

    async def run() -> None:
        try:
            publication.report = await broadcast.publish(message)
        except BaseException as error:
            publication.error = error
            raise
        publication.returned_at = trio.current_time()

    nursery.start_soon(run)
    await trio.testing.wait_all_tasks_blocked()
    return publication


def receive_all_queued(subscription: Subscription[Any]) -> list[Any]:
    """Everything queued for ``subscription`` right now, without waiting."""
    messages = []
    while True:
        try:
            messages.append(subscription.receive_nowait())
        except trio.WouldBlock:
            return messages


def is_subsequence(candidate: list[Any], sequence: list[Any]) -> bool:
    remaining = iter(sequence)
    return all(item in remaining for item in candidate)


# --------------------------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------------------------


def test_broadcast_rejects_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="policy must be one of"):
        Broadcast(policy="lossy")  # type: ignore[arg-type]


@pytest.mark.parametrize("max_buffer", [0, -1])
def test_broadcast_rejects_a_max_buffer_below_one(max_buffer: int) -> None:
    with pytest.raises(ValueError, match="max_buffer must be at least 1"):
        Broadcast(max_buffer=max_buffer)


def test_broadcast_rejects_a_negative_timeout() -> None:
    with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0"):
        Broadcast(timeout=-0.5)


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        pytest.param({"policy": "lossy"}, "policy must be one of", id="policy"),
        pytest.param({"max_buffer": 0}, "max_buffer must be at least 1", id="max_buffer"),
        pytest.param({"timeout": -1.0}, "timeout must be a number of seconds >= 0", id="timeout"),
    ],
)
async def test_subscribe_rejects_bad_arguments_and_registers_nothing(
    arguments: dict[str, Any], error: str
) -> None:
    broadcast = Broadcast[str]()
    with pytest.raises(ValueError, match=error):
        async with broadcast.subscribe(**arguments):
            pytest.fail("the block must not run")  # pragma: no cover
    assert broadcast.statistics().subscribers == 0


@pytest.mark.parametrize("where", ["broadcast", "subscribe"])
async def test_nan_timeout_is_rejected(where: str) -> None:
    with pytest.raises(ValueError, match="timeout"):
        if where == "broadcast":
            Broadcast(timeout=math.nan)
        else:
            async with Broadcast[str]().subscribe(timeout=math.nan):
                pass


# --------------------------------------------------------------------------------------------
# Plain delivery and defaults
# --------------------------------------------------------------------------------------------


async def test_every_subscriber_receives_every_message_in_publish_order() -> None:
    broadcast = Broadcast[str](max_buffer=10)
    async with broadcast.subscribe() as first, broadcast.subscribe() as second:
        for message in ["a", "b", "c"]:
            await broadcast.publish(message)
        assert receive_all_queued(first) == ["a", "b", "c"]
        assert receive_all_queued(second) == ["a", "b", "c"]


async def test_publish_report_counts_the_subscribers_that_got_the_message() -> None:
    broadcast = Broadcast[str]()
    assert await broadcast.publish("to nobody") == PublishReport(queued=0, dropped=0, evicted=0)
    async with broadcast.subscribe(), broadcast.subscribe(), broadcast.subscribe():
        assert await broadcast.publish("to three") == PublishReport(queued=3, dropped=0, evicted=0)


async def test_subscriber_receives_only_messages_published_while_subscribed() -> None:
    broadcast = Broadcast[str]()
    await broadcast.publish("before")
    async with broadcast.subscribe() as subscription:
        await broadcast.publish("during")
        assert receive_all_queued(subscription) == ["during"]
    assert await broadcast.publish("after") == PublishReport(queued=0, dropped=0, evicted=0)
    with pytest.raises(trio.ClosedResourceError):
        subscription.receive_nowait()


async def test_leaving_the_subscribe_block_discards_what_was_still_queued() -> None:
    broadcast = Broadcast[str]()
    async with broadcast.subscribe() as subscription:
        await broadcast.publish("never received")
        assert subscription.statistics().queued == 1
    assert subscription.statistics().queued == 0
    with pytest.raises(trio.ClosedResourceError):
        await subscription.receive()


async def test_join_subscribes_until_leave_without_a_context_manager() -> None:
    broadcast = Broadcast[str]()
    subscription = broadcast.join(max_buffer=3, name="joined")
    assert broadcast.subscriber_count == 1 and subscription.max_buffer == 3
    await broadcast.publish("got")
    assert subscription.receive_nowait() == "got"
    await broadcast.publish("never received")
    broadcast.leave(subscription)
    assert broadcast.subscriber_count == 0
    assert subscription.statistics().queued == 0
    assert (await broadcast.publish("after")).queued == 0
    with pytest.raises(trio.ClosedResourceError):
        await subscription.receive()
    broadcast.leave(subscription)  # once more, as after an eviction: nothing changes
    assert broadcast.subscriber_count == 0


async def test_subscription_settings_default_to_the_broadcast_arguments() -> None:
    broadcast = Broadcast[str](max_buffer=7, policy="drop", timeout=2.5)
    async with broadcast.subscribe() as subscription:
        assert subscription.max_buffer == 7
        assert subscription.policy == "drop"
        assert subscription.timeout == 2.5
        assert subscription.name == f"subscription-{subscription.id}"


async def test_subscribe_arguments_override_the_broadcast_defaults() -> None:
    broadcast = Broadcast[str](max_buffer=7, policy="drop", timeout=2.5)
    async with broadcast.subscribe(
        max_buffer=3, policy="block", timeout=9.0, name="dashboard"
    ) as subscription:
        assert (subscription.max_buffer, subscription.policy, subscription.timeout) == (
            3,
            "block",
            9.0,
        )
        assert subscription.name == "dashboard"


async def test_each_subscription_gets_a_distinct_id() -> None:
    broadcast = Broadcast[str]()
    async with broadcast.subscribe() as first, broadcast.subscribe() as second:
        assert first.id != second.id


# --------------------------------------------------------------------------------------------
# Policy "block"
# --------------------------------------------------------------------------------------------


async def test_block_publisher_waits_until_the_subscriber_makes_room(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="block")
    async with broadcast.subscribe() as subscription, trio.open_nursery() as nursery:
        await broadcast.publish("fills the buffer")
        publication = await start_publish(nursery, broadcast, "waits")
        assert not publication.done

        await trio.sleep(3.0)
        assert not publication.done
        assert subscription.receive_nowait() == "fills the buffer"
        await trio.testing.wait_all_tasks_blocked()

        assert publication.returned_at == 3.0
        assert publication.report == PublishReport(queued=1, dropped=0, evicted=0)
        assert subscription.receive_nowait() == "waits"


async def test_block_policy_ignores_the_timeout_and_never_evicts(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="block", timeout=1.0)
    async with broadcast.subscribe() as subscription, trio.open_nursery() as nursery:
        await broadcast.publish("fills the buffer")
        publication = await start_publish(nursery, broadcast, "waits")

        await trio.sleep(1000.0)
        assert not publication.done
        assert not subscription.evicted
        assert broadcast.statistics().evicted == 0

        subscription.receive_nowait()
        await trio.testing.wait_all_tasks_blocked()
        assert publication.returned_at == 1000.0


async def test_subscribers_with_room_get_the_message_while_the_publisher_waits_for_a_full_one(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](policy="block")
    async with (
        broadcast.subscribe(max_buffer=1) as full,
        broadcast.subscribe(max_buffer=5) as roomy,
        trio.open_nursery() as nursery,
    ):
        await broadcast.publish("first")
        publication = await start_publish(nursery, broadcast, "second")
        assert not publication.done
        assert receive_all_queued(roomy) == ["first", "second"]

        full.receive_nowait()
        await trio.testing.wait_all_tasks_blocked()
        assert publication.report == PublishReport(queued=2, dropped=0, evicted=0)


async def test_a_stalled_block_subscriber_stalls_every_publisher(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="block")
    async with (
        broadcast.subscribe() as subscription,
        broadcast.subscribe(max_buffer=10) as roomy,
        trio.open_nursery() as nursery,
    ):
        await broadcast.publish("m0")
        first = await start_publish(nursery, broadcast, "m1")
        second = await start_publish(nursery, broadcast, "m2")

        await trio.sleep(4.0)
        assert (first.done, second.done) == (False, False)
        # Publishes are serialized: m2 reaches nobody, not even a subscriber with room.
        assert receive_all_queued(roomy) == ["m0", "m1"]
        assert broadcast.statistics().published == 2

        assert subscription.receive_nowait() == "m0"
        await trio.testing.wait_all_tasks_blocked()
        assert (first.returned_at, second.done) == (4.0, False)

        await trio.sleep(1.0)
        assert subscription.receive_nowait() == "m1"
        await trio.testing.wait_all_tasks_blocked()
        assert second.returned_at == 5.0
        assert subscription.receive_nowait() == "m2"
        assert receive_all_queued(roomy) == ["m2"]


# --------------------------------------------------------------------------------------------
# Policy "drop"
# --------------------------------------------------------------------------------------------


async def test_drop_full_subscriber_misses_messages_while_others_get_everything(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=10, policy="block")
    async with (
        broadcast.subscribe(max_buffer=1, policy="drop") as lossy,
        broadcast.subscribe() as reliable,
    ):
        reports = [await broadcast.publish(message) for message in ["m0", "m1", "m2"]]

        assert trio.current_time() == 0.0  # drop never makes the publisher wait
        assert reports == [
            PublishReport(queued=2, dropped=0, evicted=0),
            PublishReport(queued=1, dropped=1, evicted=0),
            PublishReport(queued=1, dropped=1, evicted=0),
        ]
        assert receive_all_queued(lossy) == ["m0"]
        assert receive_all_queued(reliable) == ["m0", "m1", "m2"]


async def test_drops_are_counted_per_subscription_and_for_the_broadcast() -> None:
    broadcast = Broadcast[str](policy="drop", max_buffer=1)
    async with broadcast.subscribe(name="a") as a, broadcast.subscribe(name="b", max_buffer=2):
        for message in ["m0", "m1", "m2", "m3"]:
            await broadcast.publish(message)

        statistics = broadcast.statistics()
        assert [(s.name, s.dropped) for s in statistics.subscriptions] == [("a", 3), ("b", 2)]
        assert a.dropped == 3
        assert statistics.dropped == 5


async def test_drop_subscriber_gets_messages_again_once_it_makes_room() -> None:
    broadcast = Broadcast[str](policy="drop", max_buffer=1)
    async with broadcast.subscribe() as subscription:
        await broadcast.publish("kept")
        await broadcast.publish("dropped")
        assert subscription.receive_nowait() == "kept"
        assert await broadcast.publish("kept again") == PublishReport(1, 0, 0)
        assert receive_all_queued(subscription) == ["kept again"]


# --------------------------------------------------------------------------------------------
# Policy "evict"
# --------------------------------------------------------------------------------------------


async def test_evict_publisher_waits_exactly_the_timeout_then_removes_the_subscriber(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="evict", timeout=5.0)
    async with broadcast.subscribe(name="slow") as slow, broadcast.subscribe(max_buffer=10):
        await broadcast.publish("m0")
        report = await broadcast.publish("m1")

        assert trio.current_time() == 5.0
        assert report == PublishReport(queued=1, dropped=0, evicted=1)
        assert slow.evicted
        statistics = broadcast.statistics()
        assert statistics.subscribers == 1
        assert statistics.evicted == 1
        assert "slow" not in [s.name for s in statistics.subscriptions]


async def test_evicted_subscriber_receive_raises_slow_consumer_error_despite_queued_messages(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=2, policy="evict", timeout=5.0)
    async with broadcast.subscribe(name="slow") as slow:
        for message in ["m0", "m1", "m2"]:
            await broadcast.publish(message)
        assert trio.current_time() == 5.0

        with pytest.raises(SlowConsumerError, match=r"slow was evicted.*2 messages.*5\.0 s"):
            await slow.receive()
        with pytest.raises(SlowConsumerError):
            slow.receive_nowait()
        assert trio.current_time() == 5.0  # at once: the two queued messages are discarded
        assert slow.statistics().queued == 0


def test_slow_consumer_error_is_a_relay_error() -> None:
    assert issubclass(SlowConsumerError, RelayError)


async def test_evicted_subscription_ends_async_iteration_with_slow_consumer_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="evict", timeout=5.0)
    async with broadcast.subscribe() as slow:
        await broadcast.publish("m0")
        await broadcast.publish("m1")
        with pytest.raises(SlowConsumerError):
            async for _ in slow:
                pytest.fail("an evicted subscription yields nothing")  # pragma: no cover


async def test_wait_evicted_returns_at_the_moment_of_eviction(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="evict", timeout=5.0)
    evicted_at: list[float] = []
    async with broadcast.subscribe() as slow, trio.open_nursery() as nursery:

        async def watch() -> None:
            await slow.wait_evicted()
            evicted_at.append(trio.current_time())

        nursery.start_soon(watch)
        await broadcast.publish("m0")  # it is behind from t=0 on: m0 waits, untaken
        await trio.sleep(1.0)
        await broadcast.publish("m1")
        await trio.testing.wait_all_tasks_blocked()
        # The timeout counts from its last progress (t=0), not from m1's publish (t=1).
        assert evicted_at == [5.0]


async def test_other_subscribers_get_every_message_when_one_is_evicted(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](policy="evict", timeout=5.0)
    async with (
        broadcast.subscribe(max_buffer=1) as slow,
        broadcast.subscribe(max_buffer=10) as healthy,
    ):
        for message in ["m0", "m1", "m2", "m3"]:
            await broadcast.publish(message)

        assert trio.current_time() == 5.0  # only the first overflow waited
        assert slow.evicted
        assert receive_all_queued(healthy) == ["m0", "m1", "m2", "m3"]
        assert broadcast.statistics().evicted == 1


async def test_full_evict_subscribers_are_waited_for_concurrently(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="evict", timeout=5.0)
    async with broadcast.subscribe() as first, broadcast.subscribe() as second:
        await broadcast.publish("m0")
        report = await broadcast.publish("m1")

        assert trio.current_time() == 5.0  # not 10.0
        assert report == PublishReport(queued=0, dropped=0, evicted=2)
        assert (first.evicted, second.evicted) == (True, True)
        assert broadcast.statistics().evicted == 2
        assert broadcast.statistics().subscribers == 0


async def test_each_full_evict_subscriber_is_evicted_at_its_own_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="evict")
    evicted_at: dict[str, float] = {}
    async with (
        broadcast.subscribe(timeout=2.0, name="short") as short,
        broadcast.subscribe(timeout=5.0, name="long") as long,
        trio.open_nursery() as nursery,
    ):

        async def watch(subscription: Subscription[str]) -> None:
            await subscription.wait_evicted()
            evicted_at[subscription.name] = trio.current_time()

        nursery.start_soon(watch, short)
        nursery.start_soon(watch, long)
        await broadcast.publish("m0")
        report = await broadcast.publish("m1")

        assert trio.current_time() == 5.0
        assert report == PublishReport(queued=0, dropped=0, evicted=2)
        await trio.testing.wait_all_tasks_blocked()
        assert evicted_at == {"short": 2.0, "long": 5.0}


async def test_evict_subscriber_that_makes_room_within_the_timeout_is_not_evicted(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="evict", timeout=5.0)
    async with broadcast.subscribe() as subscription, trio.open_nursery() as nursery:
        await broadcast.publish("m0")
        publication = await start_publish(nursery, broadcast, "m1")

        await trio.sleep(4.5)
        assert subscription.receive_nowait() == "m0"
        await trio.testing.wait_all_tasks_blocked()

        assert publication.returned_at == 4.5
        assert publication.report == PublishReport(queued=1, dropped=0, evicted=0)
        await trio.sleep(100.0)
        assert not subscription.evicted
        assert broadcast.statistics().evicted == 0
        assert broadcast.statistics().subscribers == 1
        assert subscription.receive_nowait() == "m1"


async def test_evict_with_zero_timeout_evicts_a_full_subscriber_without_waiting(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="evict", timeout=0.0)
    async with broadcast.subscribe() as subscription:
        await broadcast.publish("m0")
        report = await broadcast.publish("m1")
        assert trio.current_time() == 0.0
        assert report == PublishReport(queued=0, dropped=0, evicted=1)
        assert subscription.evicted


async def test_the_evict_timeout_restarts_for_each_publish_that_finds_the_subscriber_full(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="evict", timeout=5.0)
    async with broadcast.subscribe() as subscription, trio.open_nursery() as nursery:
        await broadcast.publish("m0")
        first = await start_publish(nursery, broadcast, "m1")
        await trio.sleep(4.0)
        subscription.receive_nowait()
        await trio.testing.wait_all_tasks_blocked()
        assert first.returned_at == 4.0

        await broadcast.publish("m2")
        assert trio.current_time() == 9.0
        assert subscription.evicted


# --------------------------------------------------------------------------------------------
# Ordering
# --------------------------------------------------------------------------------------------


async def test_concurrent_publishers_produce_one_global_order_seen_by_every_subscriber(
    autojump_clock: trio.abc.Clock,
) -> None:
    publishers, per_publisher = 3, 20
    total = publishers * per_publisher
    broadcast = Broadcast[tuple[int, int]](max_buffer=2, policy="block")
    received: dict[str, list[tuple[int, int]]] = {}

    async def publish_all(publisher: int, pause: float) -> None:
        for index in range(per_publisher):
            await broadcast.publish((publisher, index))
            await trio.sleep(pause)

    async def consume(subscription: Subscription[tuple[int, int]], pause: float) -> None:
        messages = received[subscription.name] = []
        async for message in subscription:
            messages.append(message)
            if len(messages) == total:
                return
            await trio.sleep(pause)

    async with (
        broadcast.subscribe(name="fast") as fast,
        broadcast.subscribe(name="medium") as medium,
        broadcast.subscribe(name="slow") as slow,
    ):
        with trio.fail_after(3600.0):  # virtual time: a deadlock fails instead of hanging
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume, fast, 0.0)
                nursery.start_soon(consume, medium, 0.25)
                nursery.start_soon(consume, slow, 0.75)
                for publisher, pause in enumerate([0.0, 0.1, 0.3]):
                    nursery.start_soon(publish_all, publisher, pause)

    order = received["fast"]
    assert received["medium"] == order
    assert received["slow"] == order
    assert sorted(order) == [(p, i) for p in range(publishers) for i in range(per_publisher)]
    for publisher in range(publishers):
        own = [index for p, index in order if p == publisher]
        assert own == list(range(per_publisher))
    assert order != sorted(order)  # the publishers really did interleave
    assert broadcast.statistics().published == total


async def test_a_drop_subscriber_sees_a_subsequence_of_the_global_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[tuple[int, int]](max_buffer=2, policy="block")
    lossy_received: list[tuple[int, int]] = []

    async def publish_all(publisher: int) -> None:
        for index in range(15):
            await broadcast.publish((publisher, index))
            await trio.sleep(0.1 * (publisher + 1))

    async def consume_slowly(subscription: Subscription[tuple[int, int]]) -> None:
        async for message in subscription:
            lossy_received.append(message)
            await trio.sleep(1.0)

    async with (
        broadcast.subscribe(max_buffer=100) as reliable,
        broadcast.subscribe(policy="drop") as lossy,
    ):
        with trio.fail_after(3600.0):  # virtual time: a deadlock fails instead of hanging
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume_slowly, lossy)
                async with trio.open_nursery() as publishing:
                    for publisher in range(3):
                        publishing.start_soon(publish_all, publisher)
                nursery.cancel_scope.cancel()
        lossy_received.extend(receive_all_queued(lossy))
        order = receive_all_queued(reliable)

        assert len(order) == 45
        assert is_subsequence(lossy_received, order)
        assert len(lossy_received) + lossy.dropped == 45
        assert lossy.dropped > 0


# --------------------------------------------------------------------------------------------
# Subscribing and leaving while a publish is in progress
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["block", "evict"])
async def test_subscriber_leaving_during_the_wait_releases_the_publisher(
    autojump_clock: trio.abc.Clock, policy: OverflowPolicy
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy=policy, timeout=5.0)
    async with trio.open_nursery() as nursery:
        async with broadcast.subscribe() as leaving:
            await broadcast.publish("m0")
            publication = await start_publish(nursery, broadcast, "m1")
            await trio.sleep(2.0)
            assert not publication.done
        await trio.testing.wait_all_tasks_blocked()

        assert publication.returned_at == 2.0
        assert publication.report == PublishReport(queued=0, dropped=0, evicted=0)
        assert not leaving.evicted
        statistics = broadcast.statistics()
        assert (statistics.subscribers, statistics.evicted, statistics.published) == (0, 0, 2)


async def test_subscriber_joining_mid_publish_gets_only_later_messages(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](policy="block")
    async with broadcast.subscribe(max_buffer=1) as full, trio.open_nursery() as nursery:
        await broadcast.publish("m0")
        publication = await start_publish(nursery, broadcast, "m1")
        async with broadcast.subscribe(max_buffer=5) as late:
            assert full.receive_nowait() == "m0"
            await trio.testing.wait_all_tasks_blocked()
            assert publication.report == PublishReport(queued=1, dropped=0, evicted=0)

            assert full.receive_nowait() == "m1"
            await broadcast.publish("m2")
            assert receive_all_queued(late) == ["m2"]
            assert receive_all_queued(full) == ["m2"]


async def test_statistics_stay_consistent_while_a_publish_waits_and_subscribers_come_and_go(
    autojump_clock: trio.abc.Clock,
) -> None:
    def overview() -> tuple[int, tuple[int, ...], int, int, int]:
        statistics = broadcast.statistics()
        return (
            statistics.subscribers,
            statistics.queued,
            statistics.published,
            statistics.dropped,
            statistics.evicted,
        )

    broadcast = Broadcast[str](policy="block")
    async with (
        broadcast.subscribe(max_buffer=1, name="full") as full,
        trio.open_nursery() as nursery,
    ):
        await broadcast.publish("m0")
        publication = await start_publish(nursery, broadcast, "m1")
        # m1 counts as published from the moment its publish() holds the lock.
        assert overview() == (1, (1,), 2, 0, 0)

        async with broadcast.subscribe(max_buffer=3, name="late"):
            assert overview() == (2, (1, 0), 2, 0, 0)
            assert [s.name for s in broadcast.statistics().subscriptions] == ["full", "late"]
        assert overview() == (1, (1,), 2, 0, 0)

        full.receive_nowait()
        await trio.testing.wait_all_tasks_blocked()
        assert publication.done
        assert overview() == (1, (1,), 2, 0, 0)


# --------------------------------------------------------------------------------------------
# Cancellation
# --------------------------------------------------------------------------------------------


async def test_cancelled_publisher_leaves_queued_copies_and_the_broadcast_usable(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](policy="block")
    async with (
        broadcast.subscribe(max_buffer=1) as full,
        broadcast.subscribe(max_buffer=10) as roomy,
    ):
        await broadcast.publish("m0")
        with trio.move_on_after(3.0) as scope:
            await broadcast.publish("m1")
        assert scope.cancelled_caught
        assert trio.current_time() == 3.0

        assert receive_all_queued(roomy) == ["m0", "m1"]  # it keeps what it had
        assert receive_all_queued(full) == ["m0"]  # it misses the cancelled message

        # The lock was released: the next publish proceeds at once.
        assert await broadcast.publish("m2") == PublishReport(queued=2, dropped=0, evicted=0)
        assert trio.current_time() == 3.0
        assert receive_all_queued(full) == ["m2"]
        assert receive_all_queued(roomy) == ["m2"]
        assert broadcast.statistics().evicted == 0
    assert broadcast.statistics().subscribers == 0


async def test_cancelled_publisher_waiting_for_several_full_subscribers_evicts_none(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="evict", timeout=5.0)
    async with broadcast.subscribe() as first, broadcast.subscribe() as second:
        await broadcast.publish("m0")
        with trio.move_on_after(2.0):
            await broadcast.publish("m1")
        assert trio.current_time() == 2.0
        assert (first.evicted, second.evicted) == (False, False)
        assert broadcast.statistics().evicted == 0

        first.receive_nowait()
        second.receive_nowait()
        assert await broadcast.publish("m2") == PublishReport(queued=2, dropped=0, evicted=0)
        assert trio.current_time() == 2.0
        assert (first.receive_nowait(), second.receive_nowait()) == ("m2", "m2")
    assert broadcast.statistics().subscribers == 0


async def test_publisher_waiting_for_the_lock_can_be_cancelled(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="block")
    async with broadcast.subscribe() as subscription, trio.open_nursery() as nursery:
        await broadcast.publish("m0")
        holder = await start_publish(nursery, broadcast, "m1")
        with trio.move_on_after(1.0):
            await broadcast.publish("never")
        assert trio.current_time() == 1.0
        assert broadcast.statistics().published == 2  # the cancelled call never counted

        subscription.receive_nowait()
        await trio.testing.wait_all_tasks_blocked()
        assert holder.done
        assert receive_all_queued(subscription) == ["m1"]
    assert broadcast.statistics().subscribers == 0
    assert broadcast.statistics().published == 2


async def test_cancelled_receive_loses_no_message(autojump_clock: trio.abc.Clock) -> None:
    broadcast = Broadcast[str]()
    async with broadcast.subscribe() as subscription:
        with trio.move_on_after(1.0) as scope:
            await subscription.receive()
        assert scope.cancelled_caught

        await broadcast.publish("after the cancelled receive")
        assert await subscription.receive() == "after the cancelled receive"
    assert broadcast.statistics().subscribers == 0


async def test_receive_cancelled_in_the_same_tick_as_a_publish_loses_no_message(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str]()
    received: list[str] = []
    async with broadcast.subscribe() as subscription, trio.open_nursery() as nursery:
        cancel_scope = trio.CancelScope()

        async def receive_once() -> None:
            with cancel_scope:
                received.append(await subscription.receive())

        nursery.start_soon(receive_once)
        await trio.testing.wait_all_tasks_blocked()
        cancel_scope.cancel()
        await broadcast.publish("m0")
        await trio.testing.wait_all_tasks_blocked()

        assert received + receive_all_queued(subscription) == ["m0"]
    assert broadcast.statistics().subscribers == 0


async def test_cancel_inside_the_subscribe_block_leaves_no_subscriber_registered(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str]()
    with trio.move_on_after(1.0):
        async with broadcast.subscribe():
            assert broadcast.statistics().subscribers == 1
            await trio.sleep_forever()
    assert broadcast.statistics().subscribers == 0
    assert await broadcast.publish("m0") == PublishReport(queued=0, dropped=0, evicted=0)


async def test_cancelling_a_subscriber_task_releases_a_publisher_waiting_for_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="block")
    async with trio.open_nursery() as nursery:
        subscriber_scope = trio.CancelScope()

        async def stalled_subscriber(task_status: trio.TaskStatus[None]) -> None:
            with subscriber_scope:
                async with broadcast.subscribe():
                    task_status.started()
                    await trio.sleep_forever()

        await nursery.start(stalled_subscriber)
        await broadcast.publish("m0")
        publication = await start_publish(nursery, broadcast, "m1")
        await trio.sleep(3.0)
        subscriber_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()

        assert publication.returned_at == 3.0
        assert publication.report == PublishReport(queued=0, dropped=0, evicted=0)
    assert broadcast.statistics().subscribers == 0
    assert trio.current_time() == 3.0


async def test_cancelling_everything_mid_publish_leaves_nothing_behind(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="block")
    async with trio.open_nursery() as nursery:

        async def subscriber() -> None:
            async with broadcast.subscribe():
                await trio.sleep_forever()

        nursery.start_soon(subscriber)
        nursery.start_soon(subscriber)
        await trio.testing.wait_all_tasks_blocked()
        await broadcast.publish("m0")
        publications = [await start_publish(nursery, broadcast, f"m{i}") for i in (1, 2)]
        await trio.sleep(7.0)
        nursery.cancel_scope.cancel()

    assert trio.current_time() == 7.0
    assert [p.cancelled for p in publications] == [True, True]
    statistics = broadcast.statistics()
    assert (statistics.subscribers, statistics.queued, statistics.evicted) == (0, (), 0)
    assert statistics.published == 2  # m0, and m1 that was waiting; m2 never got the lock
    assert await broadcast.publish("afterwards") == PublishReport(0, 0, 0)


# --------------------------------------------------------------------------------------------
# statistics()
# --------------------------------------------------------------------------------------------


async def test_statistics_is_a_frozen_dataclass() -> None:
    broadcast = Broadcast[str]()
    async with broadcast.subscribe():
        statistics = broadcast.statistics()
        assert isinstance(statistics, BroadcastStatistics)
        assert dataclasses.is_dataclass(statistics)
        with pytest.raises(dataclasses.FrozenInstanceError):
            statistics.published = 99  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            statistics.subscriptions[0].queued = 99  # type: ignore[misc]


def test_publish_report_is_a_frozen_dataclass() -> None:
    report = PublishReport(queued=1, dropped=2, evicted=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.queued = 0  # type: ignore[misc]


async def test_statistics_is_a_snapshot_that_later_publishes_do_not_change() -> None:
    broadcast = Broadcast[str]()
    async with broadcast.subscribe():
        before = broadcast.statistics()
        await broadcast.publish("m0")
        assert (before.published, before.queued) == (0, (0,))
        assert (broadcast.statistics().published, broadcast.statistics().queued) == (1, (1,))


async def test_statistics_report_every_field(autojump_clock: trio.abc.Clock) -> None:
    broadcast = Broadcast[str](timeout=1.0)
    async with (
        broadcast.subscribe(max_buffer=3, policy="block", name="a") as a,
        broadcast.subscribe(max_buffer=1, policy="drop", name="b") as b,
        broadcast.subscribe(max_buffer=3, policy="evict", name="c") as c,
        broadcast.subscribe(max_buffer=1, policy="evict", name="d"),
    ):
        for message in ["m0", "m1", "m2"]:
            await broadcast.publish(message)
        a.receive_nowait()
        c.receive_nowait()

        assert broadcast.statistics() == BroadcastStatistics(
            subscribers=3,
            queued=(2, 1, 2),
            published=3,
            dropped=2,
            evicted=1,
            subscriptions=(
                SubscriptionStatistics(
                    id=a.id,
                    name="a",
                    policy="block",
                    max_buffer=3,
                    queued=2,
                    queued_bytes=0,
                    dropped=0,
                ),
                SubscriptionStatistics(
                    id=b.id,
                    name="b",
                    policy="drop",
                    max_buffer=1,
                    queued=1,
                    queued_bytes=0,
                    dropped=2,
                ),
                SubscriptionStatistics(
                    id=c.id,
                    name="c",
                    policy="evict",
                    max_buffer=3,
                    queued=2,
                    queued_bytes=0,
                    dropped=0,
                ),
            ),
        )
        assert trio.current_time() == 1.0  # "d" was evicted by m1 after its 1.0 s timeout


async def test_subscription_statistics_match_the_broadcast_entry() -> None:
    broadcast = Broadcast[str](max_buffer=4)
    async with broadcast.subscribe(name="x") as subscription:
        await broadcast.publish("m0")
        assert subscription.statistics() == broadcast.statistics().subscriptions[0]
        assert subscription.statistics().queued == 1


# --------------------------------------------------------------------------------------------
# aclose()
# --------------------------------------------------------------------------------------------


async def test_after_aclose_subscribers_receive_what_is_queued_then_end_of_channel() -> None:
    broadcast = Broadcast[str]()
    async with broadcast.subscribe() as first, broadcast.subscribe() as second:
        await broadcast.publish("m0")
        await broadcast.publish("m1")
        await broadcast.aclose()

        assert [message async for message in first] == ["m0", "m1"]
        assert await second.receive() == "m0"
        assert await second.receive() == "m1"
        with pytest.raises(trio.EndOfChannel):
            await second.receive()
        with pytest.raises(trio.EndOfChannel):
            second.receive_nowait()


async def test_aclose_wakes_a_waiting_receiver_with_end_of_channel(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str]()
    outcome: list[str] = []
    async with broadcast.subscribe() as subscription, trio.open_nursery() as nursery:

        async def receive() -> None:
            try:
                await subscription.receive()
            except trio.EndOfChannel:
                outcome.append(f"EndOfChannel at {trio.current_time()}")

        nursery.start_soon(receive)
        await trio.sleep(2.0)
        await broadcast.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == ["EndOfChannel at 2.0"]


async def test_publish_after_aclose_raises_closed_resource_error() -> None:
    broadcast = Broadcast[str]()
    await broadcast.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await broadcast.publish("m0")
    assert broadcast.statistics().published == 0


async def test_subscribe_after_aclose_raises_closed_resource_error() -> None:
    broadcast = Broadcast[str]()
    await broadcast.aclose()
    with pytest.raises(trio.ClosedResourceError):
        async with broadcast.subscribe():
            pytest.fail("the block must not run")  # pragma: no cover
    assert broadcast.statistics().subscribers == 0


async def test_aclose_releases_a_publisher_waiting_for_a_full_subscriber(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="block")
    async with broadcast.subscribe() as subscription, trio.open_nursery() as nursery:
        await broadcast.publish("m0")
        publication = await start_publish(nursery, broadcast, "m1")
        await trio.sleep(2.0)
        await broadcast.aclose()
        await trio.testing.wait_all_tasks_blocked()

        assert publication.returned_at == 2.0
        assert publication.report == PublishReport(queued=0, dropped=0, evicted=0)
        assert broadcast.statistics().subscribers == 0
        assert [message async for message in subscription] == ["m0"]


async def test_publish_waiting_for_the_lock_raises_closed_resource_error_after_aclose(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="block")
    errors: list[BaseException] = []
    async with broadcast.subscribe(), trio.open_nursery() as nursery:
        await broadcast.publish("m0")
        await start_publish(nursery, broadcast, "m1")  # holds the lock, waits for room

        async def publish_behind_the_lock() -> None:
            try:
                await broadcast.publish("m2")
            except trio.ClosedResourceError as error:
                errors.append(error)

        nursery.start_soon(publish_behind_the_lock)
        await trio.testing.wait_all_tasks_blocked()
        await broadcast.aclose()
        await trio.testing.wait_all_tasks_blocked()

    assert broadcast.statistics().published == 2
    assert len(errors) == 1


# --------------------------------------------------------------------------------------------
# Subscription.aclose()
# --------------------------------------------------------------------------------------------


async def test_publishers_skip_a_subscription_closed_by_its_subscriber(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="block")
    async with broadcast.subscribe() as subscription:
        await broadcast.publish("m0")
        await subscription.aclose()
        assert await broadcast.publish("m1") == PublishReport(queued=0, dropped=0, evicted=0)
        assert trio.current_time() == 0.0
        with pytest.raises(trio.ClosedResourceError):
            subscription.receive_nowait()


async def test_subscription_aclose_releases_a_publisher_waiting_for_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="evict", timeout=5.0)
    async with broadcast.subscribe() as subscription, trio.open_nursery() as nursery:
        await broadcast.publish("m0")
        publication = await start_publish(nursery, broadcast, "m1")
        await trio.sleep(1.0)
        await subscription.aclose()
        await trio.testing.wait_all_tasks_blocked()

        assert publication.returned_at == 1.0
        assert publication.report == PublishReport(queued=0, dropped=0, evicted=0)
        assert not subscription.evicted


# --------------------------------------------------------------------------------------------
# Property: ordered, duplicate-free subsequences; exactly everything under "block"
# --------------------------------------------------------------------------------------------


@dataclass
class ModelSubscriber:
    subscription: Subscription[int]
    exit_stack: AsyncExitStack
    first: int  # statistics().published when it subscribed: it gets messages >= first
    last: int | None = None  # statistics().published when it left: it gets messages < last
    received: list[int] = field(default_factory=list)

    def receive_queued(self, limit: int | None = None) -> None:
        while limit is None or limit > 0:
            try:
                self.received.append(self.subscription.receive_nowait())
            except trio.WouldBlock:
                return
            if limit is not None:
                limit -= 1


subscribe = st.tuples(st.just("subscribe"), st.integers(1, 4), st.sampled_from(["block", "drop"]))
publish = st.tuples(st.just("publish"))
receive = st.tuples(st.just("receive"), st.integers(0, 7), st.integers(1, 5))
leave = st.tuples(st.just("leave"), st.integers(0, 7))
# one_of picks a branch uniformly: publish and receive are listed twice to be twice as likely.
operation = st.one_of(subscribe, publish, publish, receive, receive, leave)


async def run_operations(operations: list[tuple[Any, ...]]) -> None:
    broadcast = Broadcast[int]()
    subscribers: list[ModelSubscriber] = []
    publications: list[BackgroundPublish] = []

    def current() -> list[ModelSubscriber]:
        return [s for s in subscribers if s.last is None]

    with trio.fail_after(3600.0):  # virtual time: a deadlock fails instead of hanging
        async with trio.open_nursery() as nursery:
            for kind, *arguments in operations:
                if kind == "subscribe":
                    max_buffer, policy = arguments
                    stack = AsyncExitStack()
                    subscription = await stack.enter_async_context(
                        broadcast.subscribe(max_buffer=max_buffer, policy=policy)
                    )
                    subscribers.append(
                        ModelSubscriber(subscription, stack, broadcast.statistics().published)
                    )
                elif kind == "publish":
                    publications.append(await start_publish(nursery, broadcast, len(publications)))
                elif current():
                    index, *rest = arguments
                    subscriber = current()[index % len(current())]
                    if kind == "receive":
                        subscriber.receive_queued(limit=rest[0])
                    else:
                        subscriber.last = broadcast.statistics().published
                        await subscriber.exit_stack.aclose()
                    await trio.testing.wait_all_tasks_blocked()

            # Enough receiving: each round of draining lets at least one waiting publish return.
            for _ in range(len(publications)):
                for subscriber in current():
                    subscriber.receive_queued()
                await trio.testing.wait_all_tasks_blocked()
            assert all(p.done for p in publications)
            for subscriber in current():
                subscriber.receive_queued()
                await subscriber.exit_stack.aclose()

    total = len(publications)
    statistics = broadcast.statistics()
    assert statistics.published == total
    assert statistics.subscribers == 0
    assert statistics.evicted == 0
    assert statistics.dropped == sum(s.subscription.dropped for s in subscribers)
    for subscriber in subscribers:
        received = subscriber.received
        policy = subscriber.subscription.policy
        end = total if subscriber.last is None else subscriber.last
        # A subsequence of the published messages, in publish order, without duplicates.
        assert received == sorted(set(received))
        assert all(subscriber.first <= message < end for message in received)
        if policy == "block":
            # Nothing skipped: a prefix of what it was due, and all of it if it stayed.
            assert received == list(range(subscriber.first, subscriber.first + len(received)))
            if subscriber.last is None:
                assert received == list(range(subscriber.first, total))
        elif subscriber.last is None:
            # Every message it was due is either received or counted as dropped.
            assert len(received) + subscriber.subscription.dropped == total - subscriber.first


@settings(max_examples=50, deadline=None)
@given(operations=st.lists(operation, min_size=5, max_size=60))
def test_property_subscribers_receive_ordered_subsequences_and_block_loses_nothing(
    operations: list[tuple[Any, ...]],
) -> None:
    trio.run(run_operations, operations, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_subscription_aclose_unregisters_at_once() -> None:
    broadcast = Broadcast[str]()
    async with broadcast.subscribe(name="early leaver") as subscription:
        await broadcast.publish("queued, then discarded")
        await subscription.aclose()
        assert broadcast.statistics().subscribers == 0
        assert (await broadcast.publish("after")).queued == 0
        with pytest.raises(trio.ClosedResourceError):
            await subscription.receive()


# ------------------------------------------------------------------ bytes, write-through


async def test_max_bytes_bounds_a_subscription_in_bytes() -> None:
    broadcast = Broadcast[bytes](max_buffer=100, policy="drop", size_of=len)
    async with broadcast.subscribe(max_bytes=10) as subscription:
        for message in (b"aaaa", b"bbbb", b"cccc", b"dd"):
            await broadcast.publish(message)
        # 4 + 4 fit; 4 more would make 12 > 10: dropped; 2 more make exactly 10.
        assert subscription.statistics().queued_bytes == 10
        assert subscription.dropped == 1
        assert [subscription.receive_nowait() for _ in range(3)] == [b"aaaa", b"bbbb", b"dd"]
        assert subscription.statistics().queued_bytes == 0


async def test_a_message_larger_than_max_bytes_still_fits_an_empty_queue() -> None:
    broadcast = Broadcast[bytes](policy="drop", size_of=len, max_bytes=4)
    async with broadcast.subscribe() as subscription:
        assert (await broadcast.publish(b"0123456789")).queued == 1
        assert (await broadcast.publish(b"x")).dropped == 1
        assert await subscription.receive() == b"0123456789"


async def test_evict_with_a_zero_timeout_evicts_without_the_publisher_waiting(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[bytes](policy="evict", timeout=0, size_of=len, max_bytes=8)
    async with broadcast.subscribe() as slow, broadcast.subscribe(max_bytes=100) as roomy:
        await broadcast.publish(b"12345678")
        report = await broadcast.publish(b"9")
        assert report == PublishReport(queued=1, dropped=0, evicted=1)
        assert trio.current_time() == 0
        with pytest.raises(SlowConsumerError):
            await slow.receive()
        assert [await roomy.receive(), await roomy.receive()] == [b"12345678", b"9"]


async def test_block_waits_for_bytes_to_drain_not_only_messages(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[bytes](policy="block", size_of=len, max_bytes=5)
    async with broadcast.subscribe() as subscription, trio.open_nursery() as nursery:
        await broadcast.publish(b"xxxx")
        nursery.start_soon(broadcast.publish, b"yy")
        await trio.sleep(3)
        assert subscription.statistics().queued == 1  # the publisher is still waiting
        assert await subscription.receive() == b"xxxx"
        assert await subscription.receive() == b"yy"
        assert trio.current_time() == 3


async def test_write_through_takes_a_message_for_an_idle_subscriber() -> None:
    taken: list[bytes] = []

    def take(message: bytes) -> bytes | None:
        taken.append(message)
        return None

    broadcast = Broadcast[bytes]()
    async with (
        broadcast.subscribe(write_through=take) as subscription,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(subscription.receive)  # parks: idle, nothing queued
        await trio.testing.wait_all_tasks_blocked()
        report = await broadcast.publish(b"direct")
        assert report.queued == 1
        assert taken == [b"direct"]
        assert subscription.statistics().queued == 0
        nursery.cancel_scope.cancel()


async def test_write_through_is_skipped_while_the_subscriber_is_busy() -> None:
    calls: list[bytes] = []

    def take(message: bytes) -> bytes | None:
        calls.append(message)
        return None

    broadcast = Broadcast[bytes]()
    async with broadcast.subscribe(write_through=take) as subscription:
        # Not waiting in receive(): everything is queued, in order.
        await broadcast.publish(b"one")
        await broadcast.publish(b"two")
        assert calls == []
        assert [await subscription.receive(), await subscription.receive()] == [b"one", b"two"]


async def test_write_through_and_the_queue_never_reorder_the_byte_stream() -> None:
    # The subscriber is a socket writer: write_through "writes" a random prefix at once, the
    # receiver "writes" whatever it receives. Whatever the interleaving, the bytes on the
    # wire must be the messages in publish order.
    rng = random.Random(6455)
    wire = bytearray()

    def write_some(message: bytes) -> bytes | None:
        taken = rng.randint(0, len(message))
        wire.extend(message[:taken])
        return message[taken:] if taken < len(message) else None

    broadcast = Broadcast[bytes](size_of=len, max_buffer=10_000)
    messages = [f"<{i}:{'x' * rng.randint(0, 20)}>".encode() for i in range(500)]
    async with (
        broadcast.subscribe(write_through=write_some) as subscription,
        trio.open_nursery() as nursery,
    ):

        async def writer() -> None:
            async for item in subscription:
                wire.extend(item)
                if rng.random() < 0.5:
                    await trio.sleep(0)

        nursery.start_soon(writer)
        for message in messages:
            await broadcast.publish(message)
            if rng.random() < 0.3:
                await trio.testing.wait_all_tasks_blocked()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert bytes(wire) == b"".join(messages)


async def test_publish_nowait_delivers_without_yielding_when_nobody_must_be_waited_for() -> None:
    broadcast = Broadcast[str](max_buffer=1)
    async with (
        broadcast.subscribe(policy="drop") as dropping,
        broadcast.subscribe(policy="evict", timeout=0) as evicting,
    ):
        assert broadcast.publish_nowait("a") == PublishReport(queued=2, dropped=0, evicted=0)
        assert broadcast.publish_nowait("b") == PublishReport(queued=0, dropped=1, evicted=1)
        assert dropping.receive_nowait() == "a"
        with pytest.raises(SlowConsumerError):
            evicting.receive_nowait()


async def test_publish_nowait_refuses_and_delivers_to_nobody_if_it_would_wait() -> None:
    broadcast = Broadcast[str](max_buffer=1)
    async with (
        broadcast.subscribe(policy="drop") as other,
        broadcast.subscribe(policy="block") as blocking,
    ):
        broadcast.publish_nowait("first")
        with pytest.raises(trio.WouldBlock):
            broadcast.publish_nowait("second")  # blocking is full: publish() would wait
        assert broadcast.statistics().published == 1
        assert other.receive_nowait() == "first"
        with pytest.raises(trio.WouldBlock):
            other.receive_nowait()  # "second" reached nobody
        assert blocking.receive_nowait() == "first"


async def test_publish_nowait_refuses_while_a_publish_holds_the_turn(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="block")
    async with broadcast.subscribe() as subscription, trio.open_nursery() as nursery:
        await broadcast.publish("fills it")
        nursery.start_soon(broadcast.publish, "waits for room")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.WouldBlock):
            broadcast.publish_nowait("not now")
        assert await subscription.receive() == "fills it"
        assert await subscription.receive() == "waits for room"


async def test_the_evict_timeout_counts_from_the_subscribers_last_progress(
    autojump_clock: trio.abc.Clock,
) -> None:
    # A subscriber that drains slowly but steadily is never evicted, even though the
    # publisher waits longer than the timeout in total; one that stops is evicted exactly
    # the timeout after its last take.
    broadcast = Broadcast[int](max_buffer=1, policy="evict", timeout=2.0)
    async with broadcast.subscribe() as steady, trio.open_nursery() as nursery:

        async def drain_slowly() -> None:
            for _ in range(5):
                await trio.sleep(1.5)
                await steady.receive()

        nursery.start_soon(drain_slowly)
        for i in range(6):
            await broadcast.publish(i)
        assert trio.current_time() == 7.5  # waited 1.5 s for each of 5 takes
        assert not steady.evicted
        await broadcast.publish(6)  # it has stopped taking: its last take was at 7.5
        assert trio.current_time() == 9.5
        assert steady.evicted


# --------------------------------------------------------------------------------------------
# Push mode: no task waits in receive(); a drainer is asked for only when one is needed
# --------------------------------------------------------------------------------------------


async def test_a_push_mode_subscriber_is_asked_to_drain_only_when_something_is_queued(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broadcast = Broadcast[str](max_buffer=10)
    socket: list[str] = []  # what write-through placed
    room = 1  # how many messages the "socket" takes now
    asked = 0

    def write_through(message: str) -> str | None:
        nonlocal room
        if room:
            room -= 1
            socket.append(message)
            return None
        return message  # the socket is full: queue it

    def on_backlog() -> None:
        nonlocal asked
        asked += 1

    async with broadcast.subscribe(write_through=write_through, on_backlog=on_backlog) as sub:
        await broadcast.publish("written at once")
        assert (socket, asked) == (["written at once"], 0)
        await broadcast.publish("queued")
        await broadcast.publish("queued too")
        assert asked == 1  # once per backlog, not per message
        assert [sub.receive_nowait(), sub.receive_nowait()] == ["queued", "queued too"]
        assert sub.park()  # drained: idle again
        room = 1
        await broadcast.publish("written at once again")
        assert (socket[-1], asked) == ("written at once again", 1)
        sub.push("a ping of its own")
        assert asked == 2
        assert not sub.park()  # something is queued: it stays busy
        assert sub.receive_nowait() == "a ping of its own"
        assert sub.park()
    assert asked == 2  # unsubscribing asks for no drainer: the subscriber knows


async def test_an_evicted_push_mode_subscriber_learns_of_it_from_its_drainer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broadcast = Broadcast[str](max_buffer=1, policy="evict", timeout=0)
    asked = 0

    def on_backlog() -> None:
        nonlocal asked
        asked += 1

    async with broadcast.subscribe(write_through=lambda m: m, on_backlog=on_backlog) as sub:
        await broadcast.publish("fills the buffer")
        assert asked == 1
        assert sub.receive_nowait() == "fills the buffer"  # the drainer took it but...
        await broadcast.publish("queued")  # ...has not parked: this one waits in the queue
        await broadcast.publish("over the limit")
        assert broadcast.statistics().evicted == 1
        with pytest.raises(SlowConsumerError):
            sub.receive_nowait()
        assert not sub.park()
        assert asked == 1  # its drainer was at work all along
