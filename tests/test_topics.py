"""Specification of :class:`trio_relay.Topics`: sequence numbers, history, resume, collection.

Determinism rules for this module:

* Every async test takes pytest-trio's ``autojump_clock`` fixture (``MockClock`` with
  ``autojump_threshold=0``): virtual time starts at 0.0 and jumps straight to the next
  deadline, so no real time passes and times are asserted exactly with
  ``trio.current_time()``.
* Steps are ordered with ``trio.testing.wait_all_tasks_blocked()``, never by sleeping until a
  condition probably holds. ``trio.sleep()`` appears only to move virtual time to a chosen
  instant (for example "5.0 s after the message was published").
* "Nothing more arrives" is checked by waiting a fixed virtual second for it
  (:func:`assert_nothing_more`), which costs no real time.
* The property tests run ``trio.run(..., clock=MockClock(autojump_threshold=0))`` inside a
  plain synchronous hypothesis test, under a ``trio.fail_after`` in virtual time, so that a
  lost message (a subscriber waiting forever) fails at once instead of hanging.
* In the property tests every message's text names its publisher, publish and place in the
  batch, and the expectations are built from the ``DeliveryReport`` each publish returned,
  so a message delivered under the wrong sequence number fails the comparison.
* Messages are compared whole (``Message(topic, seq, data)`` and ``Gap(topic, since,
  first)`` lists), never by count alone.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from trio_relay import (
    Broadcast,
    BroadcastStatistics,
    DeliveryReport,
    Gap,
    Message,
    OverflowPolicy,
    PublishReport,
    Subscription,
    TooManyTopicsError,
    Topics,
    TopicSubscription,
)
from trio_relay._topics import ENTRY_OVERHEAD, TOPIC_OVERHEAD, Batch, topic_from_path

Item = Message | Gap

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


async def take(subscription: TopicSubscription, count: int) -> list[Item]:
    """The next ``count`` items of ``subscription``."""
    return [await subscription.receive() for _ in range(count)]


async def drain(subscription: TopicSubscription, quiet: float = 1.0) -> list[Item]:
    """Every item that arrives until none has for ``quiet`` virtual seconds."""
    items: list[Item] = []
    while True:
        with trio.move_on_after(quiet) as scope:
            item = await subscription.receive()
        if scope.cancelled_caught:
            return items
        items.append(item)


async def assert_nothing_more(subscription: TopicSubscription, within: float = 1.0) -> None:
    """Nothing arrives on ``subscription`` for ``within`` virtual seconds."""
    start = trio.current_time()
    with trio.move_on_after(within):
        item = await subscription.receive()
        pytest.fail(f"nothing more was expected, got {item!r}")
    assert trio.current_time() == start + within


@dataclass
class BackgroundPublish:
    """A ``Topics.publish()`` running in its own task: what it returned, and when."""

    report: DeliveryReport | None = None
    returned_at: float | None = None


async def start_publish(
    nursery: trio.Nursery, topics: Topics, name: str, message: str | bytes
) -> BackgroundPublish:
    """Start ``topics.publish(name, message)`` and return once it has finished or blocked."""
    publication = BackgroundPublish()

    async def run() -> None:
        publication.report = await topics.publish(name, message)
        publication.returned_at = trio.current_time()

    nursery.start_soon(run)
    await trio.testing.wait_all_tasks_blocked()
    return publication


def messages(topic: str, first: int, texts: str | list[str]) -> list[Item]:
    """The Messages ``first``, ``first + 1``, ... of ``topic`` with these texts."""
    return [Message(topic, first + offset, text) for offset, text in enumerate(texts)]


# --------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bounds",
    [
        {"history_size": -1},
        {"history_bytes": -1},
        {"history_age": -1.0},
        {"history_age": float("nan")},
    ],
    ids=["size", "bytes", "age", "nan-age"],
)
def test_negative_history_bounds_are_rejected(bounds: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="history bounds must not be negative"):
        Topics(**bounds)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Sequence numbers and delivery reports
# --------------------------------------------------------------------------------------------


async def test_sequence_numbers_start_at_one_and_go_up_by_one_per_message(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    reports = [await topics.publish("news", text) for text in ["a", "b", "c"]]
    assert reports == [DeliveryReport("news", seq, 1, 0, 0, 0) for seq in (1, 2, 3)]


async def test_each_topic_numbers_its_messages_independently(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    seqs = [(await topics.publish(name, "x")).seq for name in ["a", "b", "a", "", "a", "b"]]
    assert seqs == [1, 1, 2, 1, 3, 2]
    assert {name: s.last_seq for name, s in topics.statistics().items()} == {
        "a": 3,
        "b": 2,
        "": 1,
    }


async def test_publish_batch_numbers_its_messages_consecutively_and_reports_seq_and_count(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    await topics.publish("news", "first")
    async with topics.subscribe("news") as subscription:
        report = await topics.publish_batch("news", [b"b", b"c", b"d"], [True, True, True])
        assert report == DeliveryReport("news", seq=2, count=3, queued=1, dropped=0, evicted=0)
        assert (await topics.publish("news", "e")).seq == 5
        assert await take(subscription, 4) == messages("news", 2, "bcde")


async def test_publish_nowait_numbers_its_messages_like_publish(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    await topics.publish("news", "a")
    report = topics.publish_nowait("news", [b"b", b"c"], [True, False])
    assert report == DeliveryReport("news", 2, 2, 0, 0, 0)
    assert (await topics.publish("news", "d")).seq == 4


async def test_deliver_nowait_publishes_as_publish_nowait_does_without_a_report(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    async with topics.subscribe("news") as subscription:
        await topics.publish("news", "a")
        source = object()
        assert topics.deliver_nowait("news", [b"b", b"c"], [True, False], source=source) is None
        assert (await topics.publish("news", "d")).seq == 4
        assert await take(subscription, 4) == messages("news", 1, ["a", "b", b"c", "d"])
    assert (await topics.retained("news", since=1))[2] == messages("news", 2, ["b", b"c", "d"])
    # As publish_nowait: WouldBlock, having published nothing, while a publish waits.
    async with topics.subscribe("news", policy="block", max_buffer=1), trio.open_nursery() as n:
        n.start_soon(topics.publish, "news", "fills")
        n.start_soon(topics.publish, "news", "waits")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.WouldBlock):
            topics.deliver_nowait("news", [b"e"], [True])
        n.cancel_scope.cancel()
    assert topics.statistics()["news"].last_seq == 6


async def test_a_delivery_report_counts_the_subscribers_the_message_was_queued_for(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    async with topics.subscribe("news"), topics.subscribe("news"), topics.subscribe("other"):
        assert await topics.publish("news", "a") == DeliveryReport("news", 1, 1, 2, 0, 0)


async def test_a_delivery_report_counts_dropped_and_evicted_subscribers(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    async with (
        topics.subscribe("news", policy="drop", max_buffer=1),
        topics.subscribe("news", policy="evict", max_buffer=1, timeout=0),
        topics.subscribe("news") as keeps_up,
    ):
        assert await topics.publish("news", "fills both") == DeliveryReport(
            "news", 1, 1, queued=3, dropped=0, evicted=0
        )
        assert await topics.publish("news", "overflows") == DeliveryReport(
            "news", 2, 1, queued=1, dropped=1, evicted=1
        )
        assert await topics.publish("news", "after") == DeliveryReport(
            "news", 3, 1, queued=1, dropped=1, evicted=0
        )
        assert await take(keeps_up, 3) == messages("news", 1, ["fills both", "overflows", "after"])
        assert trio.current_time() == 0.0


async def test_a_full_evict_subscriber_is_evicted_after_the_topics_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(timeout=2.5)
    async with (
        trio.open_nursery() as nursery,
        topics.subscribe("news", max_buffer=1) as stalled,
    ):
        await topics.publish("news", "fills it")
        publication = await start_publish(nursery, topics, "news", "waits")
        assert publication.returned_at is None
        await stalled.subscription.wait_evicted()
        assert trio.current_time() == 2.5
        await trio.testing.wait_all_tasks_blocked()
        assert publication.returned_at == 2.5
        assert publication.report == DeliveryReport("news", 2, 1, queued=0, dropped=0, evicted=1)


async def test_a_publish_waits_for_a_full_block_subscriber_as_long_as_it_takes(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(timeout=1.0)
    async with (
        trio.open_nursery() as nursery,
        topics.subscribe("news", policy="block", max_buffer=1) as slow,
    ):
        await topics.publish("news", "a")
        publication = await start_publish(nursery, topics, "news", "b")
        await trio.sleep(30.0)
        assert publication.returned_at is None
        assert await slow.receive() == Message("news", 1, "a")
        await trio.testing.wait_all_tasks_blocked()
        assert publication.returned_at == 30.0
        assert publication.report == DeliveryReport("news", 2, 1, 1, 0, 0)


# --------------------------------------------------------------------------------------------
# Topic names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "topic"),
    [
        ("/", ""),
        ("/news", "news"),
        ("/a/b", "a/b"),
        ("/A-z_0.9~", "A-z_0.9~"),
        ("/" + "x" * 200, "x" * 200),
        ("/" + "a/" * 99 + "bc", "a/" * 99 + "bc"),
        ("/a.b/...", "a.b/..."),
    ],
    ids=[
        "root",
        "one-segment",
        "two-segments",
        "every-kind-of-character",
        "200",
        "200-nested",
        "dots-beside-others",
    ],
)
def test_topic_from_path_names_the_topic_after_the_leading_slash(path: str, topic: str) -> None:
    assert topic_from_path(path) == topic


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("news", "the path must start with '/'"),
        ("", "the path must start with '/'"),
        ("//", "segments separated by single '/'"),
        ("/a//b", "segments separated by single '/'"),
        ("/a/", "segments separated by single '/'"),
        ("/sp ace", "letters, digits and '_.~-'"),
        ("/é", "letters, digits and '_.~-'"),
        ("/a\n", "letters, digits and '_.~-'"),
        ("/" + "x" * 201, "at most 200 characters"),
        ("/..", "may not have '.' or '..' segments"),
        ("/.", "may not have '.' or '..' segments"),
        ("/news/..", "may not have '.' or '..' segments"),
        ("/news/./a", "may not have '.' or '..' segments"),
    ],
    ids=[
        "no-leading-slash",
        "empty",
        "double-slash",
        "empty-segment",
        "trailing-slash",
        "space",
        "non-ascii",
        "newline",
        "201",
        "dot-dot",
        "dot",
        "trailing-dot-dot",
        "inner-dot",
    ],
)
def test_topic_from_path_rejects_a_bad_name_with_a_reason(path: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace(".", r"\.")):
        topic_from_path(path)


# --------------------------------------------------------------------------------------------
# History bounds
# --------------------------------------------------------------------------------------------


async def test_history_keeps_the_last_history_size_messages(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(history_size=3)
    for text in "abcde":
        await topics.publish("news", text)
    statistics = topics.statistics()["news"]
    assert (statistics.last_seq, statistics.history_messages, statistics.history_bytes) == (5, 3, 3)
    async with topics.subscribe("news", since=0) as subscription:
        assert await take(subscription, 4) == [Gap("news", 0, 3), *messages("news", 3, "cde")]


async def test_history_keeps_at_most_history_bytes_of_payload(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(history_bytes=10)
    for text in ["aaaa", "bbbb", "cccc"]:
        await topics.publish("news", text)
    statistics = topics.statistics()["news"]
    assert (statistics.history_messages, statistics.history_bytes) == (2, 8)
    async with topics.subscribe("news", since=0) as subscription:
        assert await take(subscription, 3) == [
            Gap("news", 0, 2),
            *messages("news", 2, ["bbbb", "cccc"]),
        ]


async def test_history_bytes_count_the_utf8_encoding_of_text(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    await topics.publish("news", "é✓")
    await topics.publish("news", b"\x00\x01")
    assert topics.statistics()["news"].history_bytes == 2 + 3 + 2


async def test_a_message_larger_than_history_bytes_is_not_retained(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(history_bytes=4)
    await topics.publish("news", "abc")
    await topics.publish("news", "too long")
    assert topics.statistics()["news"].history_messages == 0
    async with topics.subscribe("news", since=0) as subscription:
        assert await take(subscription, 1) == [Gap("news", 0, 3)]
        await assert_nothing_more(subscription)


async def test_history_keeps_a_message_exactly_history_age_seconds(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(history_age=5.0)
    await topics.publish("news", "at 0")
    await trio.sleep(2.0)
    await topics.publish("news", "at 2")
    await trio.sleep(3.0)
    assert trio.current_time() == 5.0
    async with topics.subscribe("news", since=0) as subscription:
        assert await take(subscription, 2) == messages("news", 1, ["at 0", "at 2"])
    await trio.sleep(0.001)
    async with topics.subscribe("news", since=0) as subscription:
        assert await take(subscription, 2) == [Gap("news", 0, 2), Message("news", 2, "at 2")]
    await trio.sleep(7.0 - trio.current_time())
    async with topics.subscribe("news", since=0) as subscription:
        assert await take(subscription, 1) == [Gap("news", 0, 2)]
    await trio.sleep(0.001)
    async with topics.subscribe("news", since=0) as subscription:
        assert await take(subscription, 1) == [Gap("news", 0, 3)]
        await topics.publish("news", "at 7")
        assert await take(subscription, 1) == [Message("news", 3, "at 7")]


async def test_history_size_zero_keeps_nothing(autojump_clock: trio.abc.Clock) -> None:
    topics = Topics(history_size=0)
    async with topics.subscribe("news") as live:
        await topics.publish("news", "a")
        await topics.publish("news", "b")
        assert topics.statistics()["news"].history_messages == 0
        async with topics.subscribe("news", since=0) as resumed:
            assert await take(resumed, 1) == [Gap("news", 0, 3)]
            await assert_nothing_more(resumed)
        assert await take(live, 2) == messages("news", 1, "ab")


async def test_history_bytes_zero_keeps_nothing(autojump_clock: trio.abc.Clock) -> None:
    topics = Topics(history_bytes=0)
    await topics.publish("news", "")
    await topics.publish("news", "a")
    assert topics.statistics()["news"].history_messages == 0
    async with topics.subscribe("news", since=0) as resumed:
        assert await take(resumed, 1) == [Gap("news", 0, 3)]
        await assert_nothing_more(resumed)


# --------------------------------------------------------------------------------------------
# Resume with since
# --------------------------------------------------------------------------------------------


async def test_since_replays_the_retained_messages_after_it_then_live_ones(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    for text in "abc":
        await topics.publish("news", text)
    async with topics.subscribe("news", since=1) as subscription:
        await topics.publish("news", "d")
        assert await take(subscription, 3) == messages("news", 2, "bcd")
        await assert_nothing_more(subscription)


async def test_since_equal_to_the_last_seq_gives_only_live_messages(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    for text in "abc":
        await topics.publish("news", text)
    async with topics.subscribe("news", since=3) as subscription:
        await topics.publish("news", "d")
        assert await take(subscription, 1) == [Message("news", 4, "d")]
        await assert_nothing_more(subscription)


async def test_since_zero_on_a_new_topic_gives_only_live_messages(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    async with topics.subscribe("news", since=0) as subscription:
        await topics.publish("news", "a")
        assert await take(subscription, 1) == [Message("news", 1, "a")]
        await assert_nothing_more(subscription)


async def test_since_older_than_the_history_gives_a_gap_first_then_the_retained_messages(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(history_size=2)
    for text in "abcd":
        await topics.publish("news", text)
    async with topics.subscribe("news", since=1) as subscription:
        await topics.publish("news", "e")
        assert await take(subscription, 4) == [Gap("news", 1, 3), *messages("news", 3, "cde")]
        await assert_nothing_more(subscription)


async def test_since_just_before_the_oldest_retained_message_gives_no_gap(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(history_size=2)
    for text in "abcd":
        await topics.publish("news", text)
    async with topics.subscribe("news", since=2) as subscription:
        assert await take(subscription, 2) == messages("news", 3, "cd")
        await assert_nothing_more(subscription)


async def test_since_none_gives_only_live_messages(autojump_clock: trio.abc.Clock) -> None:
    topics = Topics()
    for text in "abc":
        await topics.publish("news", text)
    async with topics.subscribe("news") as subscription:
        await topics.publish("news", "d")
        assert await take(subscription, 1) == [Message("news", 4, "d")]
        await assert_nothing_more(subscription)


async def test_retained_reads_what_a_subscription_with_since_would_replay(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(history_size=2)
    for text in "abcd":
        await topics.publish("news", text)
    await topics.publish("news", b"\x00")
    # Retained: 4 ("d") and 5 (binary); 1 to 3 are gone.
    assert await topics.retained("news", since=3) == (5, None, messages("news", 4, ["d", b"\x00"]))
    assert await topics.retained("news", since=1) == (
        5,
        Gap("news", 1, 4),
        messages("news", 4, ["d", b"\x00"]),
    )
    assert await topics.retained("news", since=5) == (5, None, [])
    # Without since: everything retained, and no gap (the reader claims nothing).
    assert await topics.retained("news") == (5, None, messages("news", 4, ["d", b"\x00"]))
    # Beyond the last number (a relay restart, say): the reset gap, then everything retained.
    assert await topics.retained("news", since=9) == (
        5,
        Gap("news", 9, 4),
        messages("news", 4, ["d", b"\x00"]),
    )
    with pytest.raises(ValueError, match="since"):
        await topics.retained("news", since=-1)


async def test_join_subscribes_until_leave_and_a_failed_join_leaves_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    await topics.publish("news", "before")
    subscription, gap, replay, _cursor = await topics.join("news", since=0, max_buffer=4)
    assert gap is None and replay is not None and topics.subscriber_total == 1
    await topics.publish("news", "live")
    assert isinstance(subscription.receive_nowait(), Batch)
    topics.leave("news", subscription)
    assert topics.subscriber_total == 0 and topics.subscribers("news") == 0
    with pytest.raises(trio.ClosedResourceError):
        subscription.receive_nowait()
    # A join that fails after subscribing (a bad since) takes it all back.
    with pytest.raises(ValueError, match="since"):
        await topics.join("other", since=-1)
    assert topics.subscriber_total == 0 and "other" not in topics.statistics()


async def test_retained_subscribes_nothing_and_leaves_no_topic_behind(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(history_size=0)
    assert await topics.retained("never-used", since=0) == (0, None, [])
    await topics.publish("kept-nothing", "a")
    assert await topics.retained("kept-nothing", since=0) == (1, Gap("kept-nothing", 0, 2), [])
    assert len(topics) == 0
    assert topics.subscriber_total == 0


async def test_a_subscription_left_behind_raises_closed_resource_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    async with topics.subscribe("news") as subscription:
        await topics.publish("news", "queued, then discarded")
    assert (await topics.publish("news", "b")).queued == 0
    with pytest.raises(trio.ClosedResourceError):
        await subscription.receive()


# --------------------------------------------------------------------------------------------
# The seam between replay and live messages
# --------------------------------------------------------------------------------------------


async def test_a_subscriber_joining_while_a_publish_waits_for_a_full_subscriber_gets_each_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    async with (
        trio.open_nursery() as nursery,
        topics.subscribe("news", policy="block", max_buffer=1) as slow,
    ):
        await topics.publish("news", "1")  # fills the slow subscriber
        waiting = await start_publish(nursery, topics, "news", "2")  # numbered, waits for room
        queued = await start_publish(nursery, topics, "news", "3")  # waits for the topic lock
        assert (waiting.returned_at, queued.returned_at) == (None, None)
        assert topics.statistics()["news"].last_seq == 2
        async with topics.subscribe("news", since=1) as joined:
            assert await slow.receive() == Message("news", 1, "1")
            await trio.testing.wait_all_tasks_blocked()
            assert await slow.receive() == Message("news", 2, "2")
            await trio.testing.wait_all_tasks_blocked()
            assert await slow.receive() == Message("news", 3, "3")
            await topics.publish("news", "4")
            assert await take(joined, 3) == messages("news", 2, "234")
            await assert_nothing_more(joined)
        assert waiting.report == DeliveryReport("news", 2, 1, 1, 0, 0)
        assert queued.report == DeliveryReport("news", 3, 1, 2, 0, 0)


class GatedBroadcast:
    """A :class:`Broadcast` whose ``publish()`` waits for :attr:`gate` first: the time
    between a batch being numbered (and retained) and being delivered, held open."""

    def __init__(self) -> None:
        self.inner = Broadcast[Batch | bytes](size_of=len)
        self.gate = trio.Event()

    def join(self, **options: Any) -> Subscription[Batch | bytes]:
        return self.inner.join(**options)

    def leave(self, subscription: Subscription[Batch | bytes]) -> None:
        self.inner.leave(subscription)

    async def publish(self, message: Batch | bytes) -> PublishReport:
        await self.gate.wait()
        return await self.inner.publish(message)

    def publish_nowait(self, message: Batch | bytes) -> PublishReport:
        return self.inner.publish_nowait(message)

    def statistics(self) -> BroadcastStatistics:
        return self.inner.statistics()


async def test_a_message_numbered_but_not_yet_delivered_reaches_a_joining_subscriber_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcast = GatedBroadcast()
    topics = Topics(broadcast_factory=lambda _name: broadcast)
    async with trio.open_nursery() as nursery, topics.subscribe("news") as early:
        publication = await start_publish(nursery, topics, "news", "held")
        assert topics.statistics()["news"].last_seq == 1
        assert broadcast.statistics().published == 0
        async with topics.subscribe("news", since=0) as joined:
            broadcast.gate.set()
            await trio.testing.wait_all_tasks_blocked()
            assert publication.report == DeliveryReport("news", 1, 1, 2, 0, 0)
            await topics.publish("news", "next")
            assert await take(joined, 2) == messages("news", 1, ["held", "next"])
            await assert_nothing_more(joined)
        assert await take(early, 2) == messages("news", 1, ["held", "next"])


async def test_a_publish_cancelled_after_it_was_numbered_leaves_no_silent_hole(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    second_scope = trio.CancelScope()

    async def first() -> None:
        await topics.publish("news", "2")
        second_scope.cancel()  # no checkpoint since the topic lock went to second()

    async def second() -> None:
        with second_scope:
            await topics.publish("news", "3")

    async with (
        topics.subscribe("news", policy="block", max_buffer=1) as slow,
        topics.subscribe("news") as live,
    ):
        await topics.publish("news", "1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert await slow.receive() == Message("news", 1, "1")
        assert await slow.receive() == Message("news", 2, "2")
        await topics.publish("news", "4")
        received_live = await drain(live)
        async with topics.subscribe("news", since=0) as replay:
            retained = await drain(replay)
    assert received_live == retained


@dataclass(frozen=True)
class Join:
    """When one subscriber joins, and from where."""

    after_slow_received: int
    """Joins once the slow subscriber has received this many messages (0: at once). The
    slow subscriber's receive is what lets a waiting publish finish and hands the topic lock
    to the next one, so joins land among publishes in progress."""
    delay: float
    """Virtual seconds it then waits."""
    yields: int
    """Checkpoints it then passes before subscribing: lands the join at each step of a
    publish in progress (numbered and retained but not yet delivered, say)."""
    since_back: int
    """It asks for the messages after ``last_seq - since_back`` (at least 0), ``last_seq``
    being the topic's last sequence number when it joins."""


@dataclass(frozen=True)
class SeamPlan:
    publishers: list[tuple[float, list[tuple[int, float]]]]
    """Per publisher: when it starts, then (batch size, pause after it) per publish."""
    slow_buffer: int
    drain_every: float
    joins: list[Join]

    @property
    def total(self) -> int:
        return sum(size for _, batches in self.publishers for size, _ in batches)


seam_plans = st.builds(
    SeamPlan,
    publishers=st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.5, 1.0, 2.0]),
            st.lists(
                st.tuples(st.integers(1, 3), st.sampled_from([0.0, 0.5, 1.0])),
                min_size=1,
                max_size=5,
            ),
        ),
        min_size=1,
        max_size=4,
    ),
    slow_buffer=st.integers(1, 3),
    drain_every=st.sampled_from([0.0, 0.25, 1.0, 3.0]),
    joins=st.lists(
        st.builds(
            Join,
            after_slow_received=st.integers(0, 20),
            delay=st.sampled_from([0.0, 0.0, 0.25, 1.0]),
            yields=st.integers(0, 5),
            since_back=st.integers(0, 12),
        ),
        min_size=1,
        max_size=4,
    ),
)


async def run_seam(plan: SeamPlan) -> None:
    name = "seam"
    topics = Topics(history_size=10_000)
    total = plan.total
    published: dict[int, str] = {}
    slow_received: list[Item] = []
    # Per join: the event that starts it, the since it used, and what it received.
    starts = [trio.Event() for _ in plan.joins]
    sinces: dict[int, int] = {}
    joined: dict[int, list[Item]] = {index: [] for index in range(len(plan.joins))}

    def start_due_joins() -> None:
        for join, start in zip(plan.joins, starts, strict=True):
            if min(join.after_slow_received, total - 1) == len(slow_received):
                start.set()

    async def publisher(index: int, start: float, batches: list[tuple[int, float]]) -> None:
        await trio.sleep(start)
        for number, (size, pause) in enumerate(batches):
            texts = [f"p{index}-b{number}-m{k}" for k in range(size)]
            if size == 1:
                report = await topics.publish(name, texts[0])
            else:
                report = await topics.publish_batch(
                    name, [t.encode() for t in texts], [True] * size
                )
            assert report.count == size
            for offset, text in enumerate(texts):
                assert report.seq + offset not in published
                published[report.seq + offset] = text
            await trio.sleep(pause)

    async def joiner(index: int) -> None:
        join = plan.joins[index]
        await starts[index].wait()
        await trio.sleep(join.delay)
        for _ in range(join.yields):
            await trio.sleep(0)
        since = sinces[index] = max(0, topics.statistics()[name].last_seq - join.since_back)
        if since == total:
            return
        async with topics.subscribe(name, since=since) as subscription:
            async for item in subscription:
                joined[index].append(item)
                if isinstance(item, Message) and item.seq == total:
                    break

    with trio.fail_after(10_000):
        async with (
            topics.subscribe(name, policy="block", max_buffer=plan.slow_buffer) as slow,
            trio.open_nursery() as nursery,
        ):
            for index, (start, batches) in enumerate(plan.publishers):
                nursery.start_soon(publisher, index, start, batches)
            for index in range(len(plan.joins)):
                nursery.start_soon(joiner, index)
            start_due_joins()
            while len(slow_received) < total:
                await trio.sleep(plan.drain_every)
                slow_received.append(await slow.receive())
                start_due_joins()

    assert sorted(published) == list(range(1, total + 1))
    assert slow_received == [Message(name, seq, published[seq]) for seq in range(1, total + 1)]
    for index, since in sinces.items():
        expected = [Message(name, seq, published[seq]) for seq in range(since + 1, total + 1)]
        assert joined[index] == expected, (plan.joins[index], since)
    assert len(sinces) == len(plan.joins)


@settings(max_examples=50, deadline=None)
@given(plan=seam_plans)
def test_property_a_subscriber_joining_mid_publishing_gets_every_message_after_since_once(
    plan: SeamPlan,
) -> None:
    trio.run(run_seam, plan, clock=trio.testing.MockClock(autojump_threshold=0))


# --------------------------------------------------------------------------------------------
# Exactly once across reconnects
# --------------------------------------------------------------------------------------------


async def run_reconnecting_consumer(
    pauses: list[float], visits: list[tuple[int, float]], slow_buffer: int | None
) -> None:
    name = "resume"
    topics = Topics(history_size=10_000)
    total = len(pauses)
    published: dict[int, str] = {}
    received: list[Item] = []

    async def producer() -> None:
        for index, pause in enumerate(pauses):
            await trio.sleep(pause)
            report = await topics.publish(name, f"m{index}")
            published[report.seq] = f"m{index}"

    with trio.fail_after(10_000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            last = 0
            for count, offline in itertools.cycle(visits):
                if last == total:
                    break
                policy: OverflowPolicy = "evict" if slow_buffer is None else "block"
                async with topics.subscribe(
                    name, since=last, policy=policy, max_buffer=slow_buffer or 4096
                ) as subscription:
                    for _ in range(count):
                        item = await subscription.receive()
                        received.append(item)
                        assert isinstance(item, Message), item
                        last = item.seq
                        if last == total:
                            break
                await trio.sleep(offline)

    assert received == [Message(name, seq, published[seq]) for seq in range(1, total + 1)]


@settings(max_examples=50, deadline=None)
@given(
    pauses=st.lists(st.sampled_from([0.0, 0.25, 1.0, 2.0]), min_size=1, max_size=30),
    visits=st.lists(
        st.tuples(st.integers(1, 5), st.sampled_from([0.0, 0.5, 1.0, 3.0])),
        min_size=1,
        max_size=8,
    ),
    slow_buffer=st.none() | st.integers(1, 3),
)
def test_property_a_consumer_that_resumes_after_its_last_seq_gets_every_message_once_in_order(
    pauses: list[float], visits: list[tuple[int, float]], slow_buffer: int | None
) -> None:
    trio.run(
        run_reconnecting_consumer,
        pauses,
        visits,
        slow_buffer,
        clock=trio.testing.MockClock(autojump_threshold=0),
    )


# --------------------------------------------------------------------------------------------
# Creating and forgetting topics
# --------------------------------------------------------------------------------------------


async def test_a_topic_is_created_by_its_first_publish(autojump_clock: trio.abc.Clock) -> None:
    topics = Topics()
    assert ("news" in topics, len(topics)) == (False, 0)
    await topics.publish("news", "a")
    assert ("news" in topics, "other" in topics, len(topics)) == (True, False, 1)


async def test_a_topic_is_created_by_its_first_subscriber(autojump_clock: trio.abc.Clock) -> None:
    topics = Topics()
    async with topics.subscribe("news"):
        assert ("news" in topics, len(topics)) == (True, 1)


async def test_a_topic_without_history_is_forgotten_when_its_last_subscriber_leaves(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(history_size=0)
    async with topics.subscribe("news"):
        async with topics.subscribe("news"):
            await topics.publish("news", "a")
        assert ("news" in topics, len(topics)) == (True, 1)
    assert ("news" in topics, len(topics)) == (False, 0)


async def test_a_topic_with_history_stays_after_its_subscribers_leave(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    async with topics.subscribe("news"):
        await topics.publish("news", "a")
    topics.sweep()
    assert ("news" in topics, len(topics)) == (True, 1)
    async with topics.subscribe("news", since=0) as subscription:
        assert await take(subscription, 1) == [Message("news", 1, "a")]


async def test_a_subscriber_that_never_saw_a_message_leaves_nothing_behind(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    async with topics.subscribe("news"):
        pass
    assert ("news" in topics, len(topics)) == (False, 0)


async def test_sweep_forgets_a_topic_once_its_history_has_expired(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(history_age=5.0)
    await topics.publish("news", "a")
    await topics.publish("sport", "b")
    await trio.sleep(5.0)
    topics.sweep()
    assert len(topics) == 2
    await topics.publish("sport", "c")
    await trio.sleep(0.001)
    topics.sweep()
    assert ("news" in topics, "sport" in topics, len(topics)) == (False, True, 1)
    await trio.sleep(5.0)
    topics.sweep()
    assert len(topics) == 0


async def test_sweep_forgets_an_unsubscribed_topic_that_keeps_no_history(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(history_size=0)
    await topics.publish("news", "a")
    topics.sweep()
    assert ("news" in topics, len(topics)) == (False, 0)


async def test_sweep_keeps_a_topic_with_a_subscriber(autojump_clock: trio.abc.Clock) -> None:
    topics = Topics(history_size=0)
    async with topics.subscribe("news"):
        topics.sweep()
        assert ("news" in topics, len(topics)) == (True, 1)


async def test_a_subscriber_leaving_keeps_a_topic_whose_publish_is_in_flight(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(history_size=0)
    async with trio.open_nursery() as nursery:
        async with topics.subscribe("news", policy="block", max_buffer=1):
            await topics.publish("news", "fills it")
            publication = await start_publish(nursery, topics, "news", "waits")
        assert "news" in topics
        await trio.testing.wait_all_tasks_blocked()
    assert publication.report == DeliveryReport("news", 2, 1, 0, 0, 0)


async def test_a_consumer_resuming_after_its_topic_was_forgotten_gets_the_new_messages(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(history_age=5.0)
    async with topics.subscribe("news") as subscription:
        for text in "abc":
            await topics.publish("news", text)
        last_seen = (await take(subscription, 3))[-1]
    assert isinstance(last_seen, Message)
    await trio.sleep(6.0)
    topics.sweep()
    assert "news" not in topics
    async with topics.subscribe("news", since=last_seen.seq) as resumed:
        report = await topics.publish("news", "after the topic was forgotten")
        items = await drain(resumed)
    assert items[-1:] == [Message("news", report.seq, "after the topic was forgotten")]


# --------------------------------------------------------------------------------------------
# TopicSubscription
# --------------------------------------------------------------------------------------------


async def test_iteration_yields_messages_with_str_for_text_and_bytes_for_binary(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    async with topics.subscribe("news") as subscription:
        await topics.publish("news", "héllo")
        await topics.publish("news", b"\x00\xff")
        await topics.publish_batch("news", ["✓".encode(), b"\x80"], [True, False])
        received: list[Item] = []
        async for item in subscription:
            received.append(item)
            if len(received) == 4:
                break
    assert received == [
        Message("news", 1, "héllo"),
        Message("news", 2, b"\x00\xff"),
        Message("news", 3, "✓"),
        Message("news", 4, b"\x80"),
    ]
    assert [type(item.data) for item in received if isinstance(item, Message)] == [
        str,
        bytes,
        str,
        bytes,
    ]


async def test_a_replayed_message_has_the_type_it_was_published_with(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    await topics.publish("news", "text")
    await topics.publish("news", b"bytes")
    async with topics.subscribe("news", since=0) as subscription:
        assert await take(subscription, 2) == [
            Message("news", 1, "text"),
            Message("news", 2, b"bytes"),
        ]


async def test_iteration_ends_when_the_broadcast_is_closed(
    autojump_clock: trio.abc.Clock,
) -> None:
    broadcasts: list[Broadcast[Batch | bytes]] = []

    def factory(_name: str) -> Broadcast[Batch | bytes]:
        broadcasts.append(Broadcast[Batch | bytes](size_of=len))
        return broadcasts[-1]

    topics = Topics(broadcast_factory=factory)
    async with topics.subscribe("news") as subscription:
        await topics.publish("news", "last")
        await broadcasts[0].aclose()
        assert [item async for item in subscription] == [Message("news", 1, "last")]


# --------------------------------------------------------------------------------------------
# broadcast_factory
# --------------------------------------------------------------------------------------------


async def test_broadcast_factory_makes_the_broadcast_of_each_new_topic(
    autojump_clock: trio.abc.Clock,
) -> None:
    made: dict[str, Broadcast[Batch | bytes]] = {}

    def factory(name: str) -> Broadcast[Batch | bytes]:
        assert name not in made
        made[name] = Broadcast[Batch | bytes](size_of=len)
        return made[name]

    topics = Topics(broadcast_factory=factory)
    await topics.publish("news", "a")
    async with topics.subscribe("sport"):
        assert made["sport"].statistics().subscribers == 1
        await topics.publish("news", "b")
        await topics.publish("sport", "c")
    assert list(made) == ["news", "sport"]
    assert made["news"].statistics().published == 2
    assert made["sport"].statistics().published == 1
    assert topics.statistics()["sport"].broadcast == made["sport"].statistics()


async def test_broadcast_factory_is_called_again_for_a_forgotten_topic(
    autojump_clock: trio.abc.Clock,
) -> None:
    names: list[str] = []

    def factory(name: str) -> Broadcast[Batch | bytes]:
        names.append(name)
        return Broadcast[Batch | bytes](size_of=len)

    topics = Topics(history_size=0, broadcast_factory=factory)
    async with topics.subscribe("news"):
        pass
    async with topics.subscribe("news"):
        pass
    assert names == ["news", "news"]


# --------------------------------------------------------------------------------------------
# The surface a backplane uses
# --------------------------------------------------------------------------------------------


async def test_a_backplane_delivers_numbered_batches_and_publishes_locally(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    async with topics.subscribe("a") as subscription:
        await topics.publish("a", "one")
        assert topics.position("a") == (topics.epoch, 1)
        assert (topics.last_number("a"), topics.last_number("b")) == (1, 0)
        report, new = await topics.deliver_numbered("a", topics.epoch, 2, [b"two"], [True])
        assert (report.seq, report.epoch, new) == (2, topics.epoch, True)
        # Named 2 already here: never delivered under that name again.
        report, new = await topics.deliver_numbered("a", topics.epoch, 2, [b"dup"], [True])
        assert new is False
        # A batch that straddles what this relay has: only what is new is delivered.
        report, new = await topics.deliver_numbered(
            "a", topics.epoch, 2, [b"dup", b"three"], [True, True]
        )
        assert (report.seq, report.count, new) == (3, 1, True)
        # Numbered alone, in a relay-local epoch: the topic switches to it (a reset).
        report = await topics.publish_locally("a", [b"four"], [True], epoch="local1")
        assert (report.seq, report.epoch) == (4, "local1")
        assert topics.positions() == {"a": ("local1", 4)}
        # Back to a shared numbering that skipped: another reset, from its number.
        report, new = await topics.deliver_numbered("a", "shared2", 9, [b"nine"], [True])
        assert (report.seq, new) == (9, True)
        # The same epoch skipping numbers (trimmed from the log while away): a gap.
        await topics.deliver_numbered("a", "shared2", 12, [b"twelve"], [True])
        items = await take(subscription, 9)
    assert items == [
        Message("a", 1, "one"),
        Message("a", 2, "two"),
        Message("a", 3, "three"),
        Gap("a", 3, 4, "local1", reset=True),
        Message("a", 4, "four"),
        Gap("a", 4, 9, "shared2", reset=True),
        Message("a", 9, "nine"),
        Gap("a", 9, 12, "shared2"),
        Message("a", 12, "twelve"),
    ]
    epochs = [item.epoch for item in items[3:]]
    assert epochs == ["local1", "local1", "shared2", "shared2", "shared2", "shared2"]


async def test_a_filled_batch_is_retained_but_reaches_no_live_subscriber(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    async with topics.subscribe("a") as live:
        await topics.deliver_numbered("a", "e1", 1, [b"old"], [True], fill=True)
        await topics.deliver_numbered("a", "e1", 2, [b"new"], [True])
        # It had nothing of e1 (it subscribed in this relay's own epoch): told so first.
        assert await take(live, 2) == [Gap("a", 0, 2, "e1", reset=True), Message("a", 2, "new")]
    async with topics.subscribe("a", since=0, epoch="e1") as resumed:
        assert await take(resumed, 2) == [Message("a", 1, "old"), Message("a", 2, "new")]


@pytest.mark.parametrize("nowait", [False, True])
async def test_numbers_filled_in_reach_a_subscriber_already_in_their_numbering_only(
    autojump_clock: trio.abc.Clock, nowait: bool
) -> None:
    # A subscriber at e1 #1 (it resumed there while the backplane was away), one that
    # joined in this relay's own numbering; the backplane then fills 2 and 3 in (published
    # while this relay did not hold the topic). They are newer than what the first had: it
    # gets them, never a silent jump to 4; the other does not (published before it came):
    # it is told of e1 with the next delivered batch. One that joins after the fill gets
    # what follows, and the history stays whole.
    topics = Topics()
    await topics.deliver_numbered("a", "e1", 1, [b"one"], [True])
    async with (
        topics.subscribe("a", since=1, epoch="e1") as behind,
        topics.subscribe("b") as other,
    ):
        for name in ("a", "b"):
            if nowait:
                topics.deliver_numbered_nowait(
                    name, "e1", 2, [b"two", b"three"], [True, True], fill=True
                )
            else:
                await topics.deliver_numbered(
                    name, "e1", 2, [b"two", b"three"], [True, True], fill=True
                )
        async with topics.subscribe("a") as after:
            for name in ("a", "b"):
                await topics.deliver_numbered(name, "e1", 4, [b"four"], [True])
            assert await drain(behind) == messages("a", 2, ["two", "three", "four"])
            assert await drain(other) == [Gap("b", 0, 4, "e1", reset=True), Message("b", 4, "four")]
            assert await drain(after) == [Message("a", 4, "four")]
    async with topics.subscribe("a", since=1, epoch="e1") as resumed:
        assert [m.data for m in await take(resumed, 3)] == ["two", "three", "four"]


async def test_a_local_epoch_never_names_two_messages_though_the_shared_numbering_restarts(
    autojump_clock: trio.abc.Clock,
) -> None:
    # A backplane numbers alone in one relay-local epoch while it cannot share (a publish
    # got no answer in time); meanwhile the shared numbering restarted (Redis forgot the
    # topic: e2 from 1). The next publishes alone, in the same local epoch, go on after
    # the last number that epoch named here, never from the shared numbering's 1 again.
    topics = Topics()
    for seq in range(1, 6):
        await topics.deliver_numbered("a", "e1", seq, [b"shared"], [True])
    alone = [await topics.publish_locally("a", [b"alone 0"], [True], epoch="local")]
    await topics.deliver_numbered("a", "e2", 1, [b"fresh"], [True])
    for n in range(1, 6):
        text = f"alone {n}".encode()
        alone.append(await topics.publish_locally("a", [text], [True], epoch="local"))
    assert [(r.epoch, r.seq) for r in alone] == [("local", seq) for seq in range(6, 12)]


async def test_a_since_of_another_epoch_is_a_reset_with_everything_retained(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics()
    for text in "abc":
        await topics.publish("t", text)
    async with topics.subscribe("t", since=2, epoch="other") as subscription:
        assert await take(subscription, 4) == [
            Gap("t", 2, 1, topics.epoch, reset=True),
            *messages("t", 1, "abc"),
        ]
    async with topics.subscribe("t", since=2, epoch=topics.epoch) as subscription:
        assert await take(subscription, 1) == [Message("t", 3, "c")]
    # since=0 asks for everything: no epoch can make that a reset.
    async with topics.subscribe("t", since=0, epoch="other") as subscription:
        assert await take(subscription, 3) == messages("t", 1, "abc")
    seq, gap, retained = await topics.retained("t", since=2, epoch="other")
    assert (seq, gap, retained) == (3, Gap("t", 2, 1, reset=True), messages("t", 1, "abc"))


async def test_two_relays_never_share_an_epoch_and_a_forgotten_topic_keeps_its_own(
    autojump_clock: trio.abc.Clock,
) -> None:
    one, two = Topics(max_topics=1), Topics()
    assert one.epoch != two.epoch
    await one.publish("a", "x")
    await one.publish("b", "y")  # the cap: "a" is forgotten, its number and epoch kept
    assert "a" not in one and one.position("a") == (one.epoch, 1)
    assert (await one.publish("a", "z")).seq == 2


class _LogBackplane:
    """A :class:`~trio_relay._topics.Backplane` whose log numbers every topic from 10, in
    epoch ``"log"``."""

    def __init__(self) -> None:
        self.published: list[tuple[str, list[bytes]]] = []
        self.routes: set[str] = set()

    async def publish(
        self,
        topics: Topics,
        name: str,
        payloads: list[bytes],
        texts: list[bool],
        *,
        source: object,
        echo: bool,
        idempotency_key: str | None = None,
    ) -> DeliveryReport:
        self.published.append((name, payloads))
        first = max(10, topics.last_number(name) + 1)
        report, _ = await topics.deliver_numbered(
            name, "log", first, payloads, texts, source=source, echo=echo
        )
        return report

    async def position(self, topic: str) -> tuple[str, int] | None:
        return "log", 10

    def route(self, topic: str) -> None:
        self.routes = self.routes | {topic}

    def unroute(self, topic: str) -> None:
        self.routes = self.routes - {topic}

    def synced_position(self, topic: str) -> tuple[str, int] | None:
        return None  # as before it receives the topic: position() is asked

    async def routed(self, topic: str) -> None:
        await trio.sleep(0)


async def test_with_a_backplane_publishes_go_through_it(autojump_clock: trio.abc.Clock) -> None:
    topics = Topics()
    backplane = topics.backplane = _LogBackplane()
    report = await topics.publish("a", "x")
    assert (report.seq, report.remote) == (10, True)
    assert backplane.published == [("a", [b"x"])]
    assert backplane.routes == {"a"}  # received here while the topic is here
    with pytest.raises(trio.WouldBlock):
        topics.publish_nowait("a", [b"y"], [True])
    async with topics.subscribe("a", since=10, epoch="log") as subscription:
        await topics.publish("a", "z")
        assert await take(subscription, 1) == [Message("a", 11, "z")]


# --------------------------------------------------------------------------------------------
# Global bounds: history_total_bytes and max_topics
# --------------------------------------------------------------------------------------------


def cost(*histories: tuple[int, int]) -> int:
    """What histories of (messages, payload bytes) count against ``history_total_bytes``."""
    return sum(b + n * ENTRY_OVERHEAD + TOPIC_OVERHEAD for n, b in histories if n)


async def test_past_history_total_bytes_the_oldest_messages_of_all_topics_go_first(
    autojump_clock: trio.abc.Clock,
) -> None:
    budget = cost((2, 200), (1, 100), (1, 100))  # three topics, four messages of 100 bytes
    topics = Topics(history_total_bytes=budget)
    for name in ["a", "b", "a", "c"]:
        await topics.publish(name, name * 100)
        await trio.sleep(1.0)  # one second apart: "oldest" is unambiguous
    assert topics.retained_bytes == budget
    await topics.publish("b", "b" * 100)  # a's first message (at 0 s) makes room
    await trio.sleep(1.0)
    await topics.publish("c", "c" * 100)  # then b's first (at 1 s)
    await trio.sleep(1.0)
    assert {name: s.history_messages for name, s in topics.statistics().items()} == {
        "a": 1,
        "b": 1,
        "c": 2,
    }
    await topics.publish("d", "d" * 100)  # a's last (at 2 s): a is forgotten, number kept
    assert ("a" in topics, topics.last_number("a")) == (False, 2)
    assert topics.retained_bytes == cost((1, 100), (2, 200), (1, 100)) <= budget
    async with topics.subscribe("a", since=0) as a, topics.subscribe("b", since=0) as b:
        assert await drain(a) == [Gap("a", 0, 3)]
        assert await drain(b) == [Gap("b", 0, 2), Message("b", 2, "b" * 100)]


async def test_the_history_budget_keeps_exactly_the_newest_messages_that_fit(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Against a model: all messages in publish order, the oldest dropped while the rest
    cost more than the budget (per-topic bounds out of the way)."""
    budget = 30_000
    topics = Topics(history_total_bytes=budget, history_size=10_000, history_bytes=1 << 30)
    rng = random.Random(7)
    model: deque[tuple[str, int, int]] = deque()  # (topic, seq, size), oldest first
    for step in range(400):
        name = f"t{rng.randrange(25)}"
        size = rng.randrange(600)
        report = await topics.publish(name, b"x" * size)
        model.append((name, report.seq, size))
        while True:
            histories: dict[str, tuple[int, int]] = {}
            for topic, _, length in model:
                count, payload = histories.get(topic, (0, 0))
                histories[topic] = (count + 1, payload + length)
            if cost(*histories.values()) <= budget:
                break
            model.popleft()
        assert topics.retained_bytes == cost(*histories.values()), step
        retained = {
            name: (s.history_messages, s.history_bytes)
            for name, s in topics.statistics().items()
            if s.history_messages
        }
        assert retained == histories, step
        await trio.sleep(0.5)
    first = {}
    for topic, seq, _ in reversed(model):
        first[topic] = seq
    for topic, seq in first.items():
        async with topics.subscribe(topic, since=seq - 1) as subscription:
            items = await drain(subscription)
        assert [item.seq for item in items if isinstance(item, Message)] == [
            s for t, s, _ in model if t == topic
        ]


async def test_retained_bytes_follow_trims_by_age_and_count_and_resets(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(history_size=2, history_age=5.0)
    await topics.publish("a", "1234")
    await topics.publish("a", "56")
    await topics.publish("a", "789")  # the count bound drops "1234"
    assert topics.retained_bytes == cost((2, 5))
    await trio.sleep(5.001)
    await topics.publish("b", "x")
    assert topics.retained_bytes == cost((2, 5), (1, 1))  # nothing trimmed a yet
    topics.sweep()  # a's messages expire, and a is forgotten
    assert ("a" in topics, topics.retained_bytes) == (False, cost((1, 1)))


async def test_a_new_topic_past_max_topics_forgets_the_idle_topic_used_longest_ago(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(max_topics=2)
    await topics.publish("a", "1")
    await topics.publish("b", "1")
    await topics.publish("a", "2")  # a was used after b
    await topics.publish("c", "1")
    assert sorted(topics.statistics()) == ["a", "c"]
    assert topics.last_number("b") == 1
    assert topics.retained_bytes == cost((2, 2), (1, 1))
    async with topics.subscribe("b", since=1) as subscription:  # forgets a, the idle one
        assert sorted(topics.statistics()) == ["b", "c"]
        await topics.publish("b", "2")
        assert await take(subscription, 1) == [Message("b", 2, "2")]


async def test_past_max_topics_with_every_topic_in_use_a_new_one_is_refused(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(max_topics=2, history_size=0)
    async with topics.subscribe("a") as a, topics.subscribe("b"):
        with pytest.raises(TooManyTopicsError, match="limit of 2 topics"):
            await topics.publish("c", "refused")
        with pytest.raises(TooManyTopicsError):
            topics.publish_nowait("c", [b"refused"], [True])
        with pytest.raises(TooManyTopicsError):
            async with topics.subscribe("c"):
                pass  # pragma: no cover
        with pytest.raises(TooManyTopicsError):
            topics.hold("c")
        assert sorted(topics.statistics()) == ["a", "b"]
        await topics.publish("a", "existing topics work as before")
        assert await take(a, 1) == [Message("a", 1, "existing topics work as before")]
    await topics.publish("c", "room again")  # a and b were forgotten with their clients
    assert sorted(topics.statistics()) == ["c"]


async def test_reading_a_history_makes_no_topic_and_forgets_none_at_max_topics(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(max_topics=1)
    await topics.publish("kept", "for resuming")  # an idle topic: one a new one may replace
    await topics.publish("gone", "once")  # replaces "kept" (its number is remembered)
    assert await topics.retained("kept", since=0) == (1, Gap("kept", 0, 2), [])
    assert await topics.retained("never", since=0) == (0, None, [])
    assert sorted(topics.statistics()) == ["gone"]
    assert await topics.retained("gone") == (1, None, [Message("gone", 1, "once")])


async def test_a_held_topic_stays_until_released_and_counts_toward_max_topics(
    autojump_clock: trio.abc.Clock,
) -> None:
    topics = Topics(max_topics=1)
    topics.hold("a")
    assert "a" in topics
    topics.sweep()
    assert "a" in topics
    with pytest.raises(TooManyTopicsError):
        await topics.publish("b", "refused")
    topics.release("a")
    assert "a" not in topics  # nothing retained, nobody holds it
    await topics.publish("b", "made")
