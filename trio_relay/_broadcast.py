"""The broadcast object: one publisher-facing end, one bounded memory channel per subscriber.

No network is involved; any trio program can use :class:`Broadcast` on its own.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

import trio

from ._exceptions import SlowConsumerError

__all__ = [
    "Broadcast",
    "BroadcastStatistics",
    "BroadcastTotals",
    "MessageBus",
    "OverflowPolicy",
    "PublishReport",
    "RunningTotals",
    "Subscription",
    "SubscriptionStatistics",
]

T = TypeVar("T")

OverflowPolicy = Literal["block", "drop", "evict"]
"""What :meth:`Broadcast.publish` does when a subscriber's buffer is full.

* ``"block"``: the publisher waits until the subscriber makes room (pure backpressure:
  one stalled subscriber stalls every publisher).
* ``"drop"``: this subscriber misses the message; counted in ``dropped``.
* ``"evict"``: the publisher waits at most the subscription's ``timeout`` seconds, then
  removes the subscriber, whose :meth:`Subscription.receive` raises
  :class:`SlowConsumerError`.
"""

_POLICIES: frozenset[str] = frozenset({"block", "drop", "evict"})
_ids = itertools.count(1)


@dataclass(frozen=True)
class PublishReport:
    """What one :meth:`Broadcast.publish` did: how many subscribers got the message queued,
    how many missed it under the ``drop`` policy, and how many were evicted by it."""

    queued: int
    dropped: int
    evicted: int


@dataclass(frozen=True)
class SubscriptionStatistics:
    """A snapshot of one subscription (``queued_bytes`` stays 0 without a ``size_of``)."""

    id: int
    name: str
    policy: OverflowPolicy
    max_buffer: int
    queued: int
    queued_bytes: int
    dropped: int


@dataclass(frozen=True)
class BroadcastStatistics:
    """A snapshot of a :class:`Broadcast`, taken by :meth:`Broadcast.statistics`.

    ``queued`` holds the number of messages waiting in each current subscription,
    in subscription order; ``subscriptions`` has the details behind it.
    """

    subscribers: int
    queued: tuple[int, ...]
    published: int
    dropped: int
    evicted: int
    subscriptions: tuple[SubscriptionStatistics, ...]


@dataclass(frozen=True)
class BroadcastTotals:
    """A snapshot of :class:`RunningTotals`: lifetime counts (``published``, ``dropped``,
    ``evicted``) and what is queued now, over every broadcast that shares them."""

    published: int
    dropped: int
    evicted: int
    queued: int
    queued_bytes: int


class RunningTotals:
    """Counts kept up to date as messages are published, queued, taken, dropped and
    evicted, for one broadcast or shared by many (every topic of a
    :class:`~trio_relay.Topics`), so that reading them costs the same at 20,000 topics and
    subscriptions as at 2: what ``/metrics`` reads, where summing a :meth:`statistics`
    of every broadcast would cost time in proportion to them all."""

    __slots__ = ("dropped", "evicted", "published", "queued", "queued_bytes")

    def __init__(self) -> None:
        self.published = 0
        """Messages published (a :class:`~trio_relay.Topics` publishes one batch each)."""
        self.dropped = 0
        """Messages a full subscriber missed under the ``drop`` policy (one per subscriber)."""
        self.evicted = 0
        """Subscribers evicted for being too slow."""
        self.queued = 0
        """Messages queued for subscribers now."""
        self.queued_bytes = 0
        """Their size, by the broadcasts' ``size_of`` (0 without one)."""

    def snapshot(self) -> BroadcastTotals:
        return BroadcastTotals(
            self.published, self.dropped, self.evicted, self.queued, self.queued_bytes
        )


def _validate(max_buffer: int, policy: str, timeout: float) -> None:
    if policy not in _POLICIES:
        raise ValueError(f"policy must be one of {sorted(_POLICIES)}, not {policy!r}")
    if max_buffer < 1:
        raise ValueError("max_buffer must be at least 1")
    if not timeout >= 0:  # also rejects NaN
        raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout!r}")


class Subscription(trio.abc.ReceiveChannel[T]):
    """The receive side of one subscriber, yielded by :meth:`Broadcast.subscribe`.

    A normal trio :class:`~trio.abc.ReceiveChannel`: ``await receive()`` or ``async for``.
    It ends with :class:`trio.EndOfChannel` when the broadcast is closed (after the queued
    messages are received), and with :class:`SlowConsumerError` at once when the
    subscription is evicted.

    It is the subscriber's bounded in-memory channel, kept in a queue of its own rather
    than a :func:`trio.open_memory_channel` pair: an idle subscription then holds no
    queue and no parking lot (2.6 KB less per idle subscriber, measured with
    tracemalloc), which matters at tens of thousands of subscribers. The broadcast
    enforces the bounds before it queues (see :meth:`Broadcast.publish`).

    **Push mode** (``on_backlog`` given): nobody waits in :meth:`receive`. While
    nothing is queued the subscription is *idle* and ``write_through`` takes each
    message synchronously; when something has to be queued, ``on_backlog()`` is called
    once, and the subscriber drains the queue with :meth:`receive_nowait` and calls
    :meth:`park` when it is empty. (The relay's connections work this way: a writer task
    exists only while a client has a backlog.)
    """

    __slots__ = (
        "_broadcast",
        "_discarded",
        "_ended",
        "_evicted",
        "_evicted_event",
        "_gone",
        "_items",
        "_name",
        "_on_backlog",
        "_on_evict",
        "_parked",
        "_progress",
        "_queued",
        "_queued_bytes",
        "_room",
        "_room_waiters",
        "_size_of",
        "_totals",
        "_waiter",
        "_write_through",
        "dropped",
        "id",
        "max_buffer",
        "max_bytes",
        "policy",
        "timeout",
    )

    def __init__(
        self,
        max_buffer: int,
        policy: OverflowPolicy,
        timeout: float,
        name: str,
        *,
        max_bytes: int | None = None,
        size_of: Callable[[T], int] | None = None,
        write_through: Callable[[T], T | None] | None = None,
        on_evict: Callable[[], None] | None = None,
        on_backlog: Callable[[], None] | None = None,
        totals: RunningTotals | None = None,
    ) -> None:
        _validate(max_buffer, policy, timeout)
        if max_bytes is not None and (max_bytes < 1 or size_of is None):
            raise ValueError("max_bytes must be at least 1, and needs the broadcast's size_of")
        self.id = next(_ids)
        self._name = name  # the default name is made when asked for: a string less each
        self.policy: OverflowPolicy = policy
        self.max_buffer = max_buffer
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.dropped = 0
        # The queue, made when something is first queued (and dropped again by park()).
        # Its bounds (max_buffer, max_bytes) are enforced by publish(), which needs to know
        # "full" before it queues, in messages and bytes.
        self._items: collections.deque[T] | None = None
        self._queued = 0
        # When it last made progress: took a message, or got one with nothing queued.
        # The evict policy's timeout counts from here.
        self._progress = trio.current_time()
        self._queued_bytes = 0
        self._size_of = size_of
        self._totals = RunningTotals() if totals is None else totals
        self._write_through = write_through
        self._on_evict = on_evict
        self._on_backlog = on_backlog
        # True while the subscriber is idle: waiting in receive() with nothing queued, or
        # (push mode) with no backlog. Only then may publish() hand a message to
        # write_through instead of queueing it.
        self._parked = on_backlog is not None
        self._waiter: trio.Event | None = None  # set while a receive() waits
        self._ended = False  # the broadcast closed: what is queued, then EndOfChannel
        self._discarded = False  # unsubscribed or evicted: nothing more to receive
        self._gone = False
        self._room: trio.Event | None = None  # made when a publisher first waits for room
        self._room_waiters = 0
        self._evicted = False
        self._evicted_event: trio.Event | None = None  # made by the first wait_evicted()
        self._broadcast: Broadcast[T] | None = None  # set while registered

    @property
    def name(self) -> str:
        """The name given to :meth:`Broadcast.subscribe`, or ``subscription-<id>``."""
        return self._name or f"subscription-{self.id}"

    @property
    def evicted(self) -> bool:
        """True once the broadcast has removed this subscription for being too slow."""
        return self._evicted

    async def wait_evicted(self) -> None:
        """Wait until this subscription is evicted (forever, if it never is)."""
        if self._evicted:
            await trio.sleep(0)
            return
        if self._evicted_event is None:
            self._evicted_event = trio.Event()
        await self._evicted_event.wait()

    def _too_slow(self) -> SlowConsumerError:
        bound = f"{self.max_buffer} messages"
        if self.max_bytes is not None:
            bound += f" or {self.max_bytes} bytes"
        return SlowConsumerError(
            f"{self.name} was evicted: its buffer of {bound} stayed full for {self.timeout} s"
        )

    # -- the publisher's side (called by Broadcast.publish, never awaits)

    def _full(self, size: int) -> bool:
        if self._queued >= self.max_buffer:
            return True
        return (
            self.max_bytes is not None
            and self._queued > 0
            and self._queued_bytes + size > self.max_bytes
        )

    def _put(self, item: T, size: int) -> None:
        if self._ended or self._discarded:
            raise trio.ClosedResourceError("the subscription has ended")
        items = self._items
        if items is None:
            items = self._items = collections.deque()
        items.append(item)
        if not self._queued:
            self._progress = trio.current_time()  # it has been behind since now
        self._queued += 1
        self._queued_bytes += size
        totals = self._totals
        totals.queued += 1
        totals.queued_bytes += size
        self._wake()

    def _wake(self) -> None:
        """Tell the subscriber there is something for it: a queued item, or the end."""
        if self._parked:
            self._parked = False
            if self._on_backlog is not None:
                self._on_backlog()
        if self._waiter is not None:
            self._waiter.set()

    def _took(self, item: T) -> T:
        self._progress = trio.current_time()
        self._queued -= 1
        totals = self._totals
        totals.queued -= 1
        if self._size_of is not None:
            size = self._size_of(item)
            self._queued_bytes -= size
            totals.queued_bytes -= size
        if self._room_waiters:
            self._wake_room_waiters()
        return item

    def _discard(self) -> None:
        """Close the receive side: queued messages are dropped, a waiting receive() wakes.

        A push-mode subscriber is not asked to drain: one that unsubscribed knows, and an
        evicted one was full, so its drainer is at work and learns of it from
        :meth:`receive_nowait`."""
        self._discarded = True
        self._items = None
        self._totals.queued -= self._queued
        self._totals.queued_bytes -= self._queued_bytes
        self._queued = self._queued_bytes = 0
        self._parked = False
        if self._waiter is not None:
            self._waiter.set()

    def _end(self) -> None:
        """The broadcast closed: the subscriber gets what is queued, then EndOfChannel."""
        self._ended = True
        self._wake()

    def _wake_room_waiters(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None

    async def _wait_for_room(self) -> None:
        self._room_waiters += 1
        try:
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()
        finally:
            self._room_waiters -= 1

    # -- the subscriber's side

    def push(self, item: T, size: int = 0) -> None:
        """Queue an item of the subscriber's own behind what is queued (a keepalive ping,
        say), outside the bounds. Raises :class:`trio.ClosedResourceError` once ended."""
        self._put(item, size)

    def receive_nowait(self) -> T:
        """Return the next queued message, or raise :class:`trio.WouldBlock` if there is none."""
        items = self._items
        if items:
            return self._took(items.popleft())
        if self._discarded:
            if self._evicted:
                raise self._too_slow()
            raise trio.ClosedResourceError("the subscription was closed")
        if self._ended:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    def park(self) -> bool:
        """Push mode: say the subscriber took everything and is idle again, so publishers
        write through to it. Returns False (and stays busy) if something is queued."""
        if self._items:
            return False
        self._items = None
        self._parked = not (self._ended or self._discarded)
        return self._parked

    async def receive(self) -> T:
        """Wait for the next message.

        Raises :class:`SlowConsumerError` once evicted, :class:`trio.EndOfChannel` after the
        broadcast closed and the queue is empty. Cancellation is safe: no message is lost.
        """
        await trio.sleep(0)  # the checkpoint comes first: cancelled there, nothing was taken
        while True:
            try:
                return self.receive_nowait()
            except trio.WouldBlock:
                pass
            self._parked = self._on_backlog is None
            waiter = self._waiter = trio.Event()
            try:
                await waiter.wait()
            finally:
                self._waiter = None
                self._parked = False

    async def aclose(self) -> None:
        """Unsubscribe now rather than at the end of the ``subscribe()`` block.

        Queued messages are discarded; ``receive()`` then raises
        :class:`trio.ClosedResourceError`.
        """
        if self._broadcast is not None:
            self._broadcast._remove(self)
        self._discard()
        await trio.sleep(0)  # a checkpoint, as trio's aclose() methods have

    def statistics(self) -> SubscriptionStatistics:
        """A snapshot of this subscription."""
        return SubscriptionStatistics(
            id=self.id,
            name=self.name,
            policy=self.policy,
            max_buffer=self.max_buffer,
            queued=self._queued,
            queued_bytes=self._queued_bytes,
            dropped=self.dropped,
        )


class MessageBus(Protocol[T]):
    """The small interface the relay server needs from a broadcast.

    :class:`Broadcast` is the in-process implementation; a backplane that spans
    processes implements the same calls: :meth:`Broadcast.join` and
    :meth:`Broadcast.leave` (the relay's connections subscribe with them rather than
    with :meth:`Broadcast.subscribe`, which costs two objects more per subscriber), and
    the publishing ones.
    """

    def join(
        self,
        *,
        max_buffer: int | None = None,
        policy: OverflowPolicy | None = None,
        timeout: float | None = None,  # the evict policy's wait
        name: str = "",
        max_bytes: int | None = None,
        write_through: Callable[[T], T | None] | None = None,
        on_evict: Callable[[], None] | None = None,
        on_backlog: Callable[[], None] | None = None,
    ) -> Subscription[T]: ...  # pragma: no cover

    def leave(self, subscription: Subscription[T]) -> None: ...  # pragma: no cover

    async def publish(self, message: T) -> PublishReport: ...  # pragma: no cover

    def publish_nowait(self, message: T) -> PublishReport: ...  # pragma: no cover

    def statistics(self) -> BroadcastStatistics: ...  # pragma: no cover


class Broadcast(Generic[T]):
    """Hands every published message to every current subscriber, in one global order.

    Each subscriber has its own :func:`trio.open_memory_channel`, bounded by ``max_buffer``
    messages and, when the broadcast has a ``size_of`` (``len`` for bytes, say), by
    ``max_bytes``. What happens when it is full is the subscription's
    :data:`OverflowPolicy`. The constructor's arguments are the defaults for
    :meth:`subscribe`, except ``totals``: :class:`RunningTotals` to count in, shared with
    other broadcasts (every topic of a :class:`~trio_relay.Topics` counts in one).

    Ordering: publishes are serialized, so every subscriber sees the messages it gets in the
    order in which the calls to :meth:`publish` took their turn. A subscription receives
    exactly the messages whose ``publish()`` took its turn after the subscription started
    and before it ended (by leaving the ``subscribe()`` block or :meth:`Subscription.aclose`).
    """

    def __init__(
        self,
        *,
        max_buffer: int = 256,
        policy: OverflowPolicy = "evict",
        timeout: float = 5.0,
        max_bytes: int | None = None,
        size_of: Callable[[T], int] | None = None,
        totals: RunningTotals | None = None,
    ) -> None:
        _validate(max_buffer, policy, timeout)
        if max_bytes is not None and size_of is None:
            raise ValueError("max_bytes needs size_of, to know how many bytes a message is")
        self._max_buffer = max_buffer
        self._policy: OverflowPolicy = policy
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._size_of = size_of
        # In subscription order. A dict, so that joining and leaving cost the same at
        # 20,000 subscribers as at 10; publish() never lets it change while iterating.
        self._subscriptions: dict[Subscription[T], None] = {}
        self._lock = trio.Lock()
        self._published = 0
        self._dropped = 0
        self._evicted = 0
        self._closed = False
        self.totals = RunningTotals() if totals is None else totals
        """Running totals of this broadcast (``totals=``: shared with others)."""

    @asynccontextmanager
    async def subscribe(
        self,
        *,
        max_buffer: int | None = None,
        policy: OverflowPolicy | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the evict policy's wait, not a call timeout
        name: str = "",
        max_bytes: int | None = None,
        write_through: Callable[[T], T | None] | None = None,
        on_evict: Callable[[], None] | None = None,
        on_backlog: Callable[[], None] | None = None,
    ) -> AsyncIterator[Subscription[T]]:
        """Subscribe for the duration of the ``async with`` block.

        Yields a :class:`Subscription` with room for ``max_buffer`` messages (and
        ``max_bytes`` bytes, if the broadcast has a ``size_of``). Leaving the block
        unsubscribes at once and discards what was still queued; it never blocks, so it is
        safe under cancellation.

        ``write_through`` lets a subscriber take a message synchronously instead of through
        its channel, when it is idle: waiting in :meth:`Subscription.receive` with nothing
        queued. It returns ``None`` when it took the whole message, or the part it could not
        take, which is then queued as usual. (The relay server writes to the client's
        socket this way, without waking its writer task.)

        ``on_evict`` is called, synchronously, at the moment the subscription is evicted.
        ``on_backlog`` puts the subscription in push mode (see :class:`Subscription`).
        """
        subscription = self.join(
            max_buffer=max_buffer,
            policy=policy,
            timeout=timeout,
            name=name,
            max_bytes=max_bytes,
            write_through=write_through,
            on_evict=on_evict,
            on_backlog=on_backlog,
        )
        try:
            yield subscription
        finally:
            self.leave(subscription)

    def join(
        self,
        *,
        max_buffer: int | None = None,
        policy: OverflowPolicy | None = None,
        timeout: float | None = None,  # the evict policy's wait
        name: str = "",
        max_bytes: int | None = None,
        write_through: Callable[[T], T | None] | None = None,
        on_evict: Callable[[], None] | None = None,
        on_backlog: Callable[[], None] | None = None,
    ) -> Subscription[T]:
        """Subscribe until :meth:`leave` (what :meth:`subscribe` does around its block,
        same arguments), for a caller that must not keep a context manager per
        subscriber: at 20,000 connections, the two objects of an ``async with`` (and the
        suspended generator's frame) are about 0.6 KB each. The caller must call
        :meth:`leave` exactly once, whatever happens (a ``finally``)."""
        if self._closed:
            raise trio.ClosedResourceError("the broadcast is closed")
        subscription: Subscription[T] = Subscription(
            self._max_buffer if max_buffer is None else max_buffer,
            self._policy if policy is None else policy,
            self._timeout if timeout is None else timeout,
            name,
            max_bytes=self._max_bytes if max_bytes is None else max_bytes,
            size_of=self._size_of,
            write_through=write_through,
            on_evict=on_evict,
            on_backlog=on_backlog,
            totals=self.totals,
        )
        self._subscriptions[subscription] = None
        subscription._broadcast = self
        return subscription

    def leave(self, subscription: Subscription[T]) -> None:
        """End a subscription made by :meth:`join` (evicted or not): unsubscribe at once
        and discard what was still queued. Never blocks."""
        self._remove(subscription)
        subscription._discard()

    def _remove(self, subscription: Subscription[T]) -> None:
        subscription._broadcast = None
        subscription._gone = True
        self._subscriptions.pop(subscription, None)
        subscription._wake_room_waiters()  # a publisher waiting for room stops waiting

    def _evict(self, subscription: Subscription[T]) -> None:
        self._remove(subscription)
        subscription._evicted = True
        if subscription._evicted_event is not None:
            subscription._evicted_event.set()
        if subscription._on_evict is not None:
            subscription._on_evict()
        subscription._discard()
        self._evicted += 1
        self.totals.evicted += 1

    async def publish(self, message: T) -> PublishReport:
        """Queue ``message`` for every current subscriber and return what happened.

        Subscribers with room get it at once. For the full ones, their policy decides:
        ``drop`` skips them, ``evict`` with a timeout of 0 evicts them at once; otherwise the
        publisher waits, concurrently for all of them, up to their timeouts (``block``: as
        long as it takes). Returns when every subscriber has the message queued, dropped
        it, or was evicted.

        Cancellation: if cancelled while waiting for a full subscriber, the subscribers that
        already had the message queued keep it and the ones still waited for miss it; the
        broadcast stays consistent and the next publish proceeds normally.
        """
        # When it is our turn at once, deliver before any checkpoint: a publish cancelled
        # there could not be told from one that never started (Topics relies on this).
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
            waited = True
        else:
            waited = False
        try:
            full, queued, dropped, evicted = self._deliver(message)
            report = PublishReport(queued=queued, dropped=dropped, evicted=evicted)
            if not full:
                if not waited:
                    with trio.CancelScope(shield=True):
                        await trio.sleep(0)  # a schedule point that cannot be cancelled
                return report
            outcomes: list[bool] = []
            if len(full) == 1:
                await self._wait_for_room(*full[0], outcomes)
            else:
                async with trio.open_nursery() as nursery:
                    for waiting in full:
                        nursery.start_soon(self._wait_for_room, *waiting, outcomes)
            return PublishReport(
                queued=report.queued + sum(outcomes),
                dropped=report.dropped,
                evicted=report.evicted + outcomes.count(False),
            )
        finally:
            self._lock.release()

    def publish_nowait(self, message: T) -> PublishReport:
        """Publish without waiting and without yielding, or raise :class:`trio.WouldBlock`.

        Raises ``WouldBlock``, having delivered to nobody, if another publish is in progress
        or a full subscriber's policy would make the publisher wait (``block``, or ``evict``
        with a timeout). The relay's connections use it so that publishing what one read
        brought in costs no trip through trio's scheduler; a loop of ``publish_nowait``
        calls never yields, so it must checkpoint by other means.
        """
        if self._lock.locked():
            raise trio.WouldBlock
        size = 0 if self._size_of is None else self._size_of(message)
        for subscription in self._subscriptions:
            if (
                subscription.policy == "drop"
                or (subscription.policy == "evict" and subscription.timeout == 0)
                or (subscription._parked and subscription._write_through is not None)
            ):
                continue
            if subscription._full(size):
                raise trio.WouldBlock
        full, queued, dropped, evicted = self._deliver(message)
        assert not full
        return PublishReport(queued, dropped, evicted)

    def _deliver(self, message: T) -> tuple[list[tuple[Subscription[T], T, int]], int, int, int]:
        """Hand ``message`` to every subscriber that can take it now; return the full ones
        that must be waited for, and a report of what was done."""
        # Checked under the lock: aclose() may have run while a publisher waited for it.
        if self._closed:
            raise trio.ClosedResourceError("the broadcast is closed")
        self._published += 1
        self.totals.published += 1
        size_of = self._size_of
        size = 0 if size_of is None else size_of(message)
        queued = dropped = evicted = 0
        full: list[tuple[Subscription[T], T, int]] = []
        too_slow: list[Subscription[T]] = []
        for subscription in self._subscriptions:
            item, item_size = message, size
            if subscription._parked and subscription._write_through is not None:
                rest = subscription._write_through(item)
                if rest is None:
                    queued += 1
                    continue
                item = rest
                item_size = 0 if size_of is None else size_of(rest)
            if subscription._full(item_size):
                if subscription.policy == "drop":
                    subscription.dropped += 1
                    dropped += 1
                elif subscription.policy == "evict" and subscription.timeout == 0:
                    too_slow.append(subscription)  # after the loop: the dict must not change
                    evicted += 1
                else:
                    full.append((subscription, item, item_size))
                continue
            try:
                subscription._put(item, item_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                continue  # it left (or was evicted) while we were iterating
            queued += 1
        for subscription in too_slow:
            self._evict(subscription)
        self._dropped += dropped
        self.totals.dropped += dropped
        return full, queued, dropped, evicted

    async def _wait_for_room(
        self, subscription: Subscription[T], item: T, size: int, outcomes: list[bool]
    ) -> None:
        # The timeout counts from the subscriber's last progress, not from now: one that has
        # been stuck for a while is not waited for again in full, while one that is
        # draining (merely behind) keeps pushing the deadline back and gets every message.
        if subscription.policy == "block":
            deadline = math.inf
        else:
            deadline = subscription._progress + subscription.timeout
        with trio.CancelScope(deadline=deadline) as scope:
            while subscription._full(size):
                if subscription._gone:
                    return  # it left while we waited: neither queued nor evicted
                await subscription._wait_for_room()
                if subscription.policy != "block":
                    scope.deadline = subscription._progress + subscription.timeout
            try:
                subscription._put(item, size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            outcomes.append(True)
            return
        self._evict(subscription)
        outcomes.append(False)

    async def aclose(self) -> None:
        """Close the broadcast: publishing raises :class:`trio.ClosedResourceError`, and each
        subscriber receives what is queued for it, then :class:`trio.EndOfChannel`."""
        self._closed = True
        subscriptions, self._subscriptions = self._subscriptions, {}
        for subscription in subscriptions:
            subscription._gone = True
            subscription._broadcast = None
            subscription._wake_room_waiters()
            subscription._end()
        await trio.sleep(0)  # a checkpoint, as trio's aclose() methods have

    @property
    def subscriber_count(self) -> int:
        """How many subscriptions there are now (cheaper than :meth:`statistics`)."""
        return len(self._subscriptions)

    def statistics(self) -> BroadcastStatistics:
        """A frozen snapshot: subscribers, queue depths, and the lifetime counters."""
        subscriptions = tuple(s.statistics() for s in self._subscriptions)
        return BroadcastStatistics(
            subscribers=len(subscriptions),
            queued=tuple(s.queued for s in subscriptions),
            published=self._published,
            dropped=self._dropped,
            evicted=self._evicted,
            subscriptions=subscriptions,
        )
