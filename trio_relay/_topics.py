"""Topics: one broadcast per topic, per-topic sequence numbers, bounded history, resume.

A :class:`Topics` registry creates a topic when it is first used and forgets it once it has
neither subscribers nor history. Every message published on a topic gets the next sequence
number of that topic (from 1) and a place in the topic's :class:`History`, bounded by count,
bytes and age. ``subscribe(topic, since=seq)`` first replays what is retained after ``seq``,
then goes on live, with no duplicate and no gap at the seam; if some of those messages are
no longer retained, the subscriber gets a :class:`Gap` first.

Two global bounds hold over all topics together. ``history_total_bytes`` bounds what every
history retains (payloads plus :data:`ENTRY_OVERHEAD` a message and :data:`TOPIC_OVERHEAD`
a topic kept for its history): past it, the oldest retained messages of all topics go
first, found through a heap of topics keyed by their oldest message (O(log topics) per
message evicted, never a scan). ``max_topics`` bounds how many topics exist: a new topic
past it makes room by forgetting the topic kept only for its history that was used
longest ago, or, if every topic is in use, raises :class:`TooManyTopicsError`.
"""

from __future__ import annotations

import heapq
import itertools
import os
import re
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import trio

from ._broadcast import (
    Broadcast,
    BroadcastStatistics,
    MessageBus,
    OverflowPolicy,
    PublishReport,
    RunningTotals,
    Subscription,
)
from ._envelope import encode_message
from ._exceptions import TooManyTopicsError
from ._frames import frame_header
from ._idempotency import RecentKeys

__all__ = [
    "Backplane",
    "Batch",
    "Cursor",
    "DeliveryReport",
    "Gap",
    "History",
    "Message",
    "TopicStatistics",
    "TopicSubscription",
    "Topics",
    "check_epoch",
    "new_epoch",
    "topic_from_path",
]

MAX_TOPIC_LENGTH = 200
MAX_RETIRED_TOPICS = 100_000
"""Forgotten topics whose last sequence number is remembered (about 100 bytes each)."""
ENTRY_OVERHEAD = 168
"""Bytes a retained message costs beyond its payload (its entry tuple, time, number, the
payload's object header and its slot in the deque; measured with tracemalloc), counted
against ``history_total_bytes``: a flood of empty messages is bounded too."""
TOPIC_OVERHEAD = 2048
"""Bytes a topic costs besides its messages (its broadcast, lock and history; about 2 KB
measured with tracemalloc), counted against ``history_total_bytes`` while it retains
anything: a topic kept only for its history is paid for by the history budget."""
_TOPIC = re.compile(r"[A-Za-z0-9_.~-]+(?:/[A-Za-z0-9_.~-]+)*")
MAX_EPOCH_LENGTH = 32
_EPOCH = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_EPOCH_LENGTH}}}")


def new_epoch() -> str:
    """A fresh epoch: 8 random hex digits (32 bits), so that two numberings of one topic
    (before and after a restart, say) are never taken for one another."""
    return os.urandom(4).hex()


def check_epoch(value: str) -> str:
    """``value`` if it can be an epoch (1 to 32 letters, digits, ``_`` or ``-``; the relay
    makes 8 hex digits), else ``ValueError`` saying so."""
    if not _EPOCH.fullmatch(value):
        raise ValueError(
            f"an epoch is 1 to {MAX_EPOCH_LENGTH} letters, digits, '_' or '-', as the relay sent it"
        )
    return value


def topic_from_path(path: str) -> str:
    """The topic a WebSocket path names: ``/`` is the root topic ``""``, ``/a/b`` is ``a/b``.

    Raises ``ValueError`` with a reason a client can read: names are at most 200 characters
    of letters, digits and ``_ . ~ -``, in segments separated by single slashes, and no
    segment is ``.`` or ``..`` (names that mean another path to every URL library and
    proxy, and that token patterns such as ``news/*`` must not be led to cover).
    """
    if not path.startswith("/"):
        raise ValueError("the path must start with '/'")
    name = path[1:]
    if not name:
        return ""
    if len(name) > MAX_TOPIC_LENGTH:
        raise ValueError(f"topic names are at most {MAX_TOPIC_LENGTH} characters")
    if not _TOPIC.fullmatch(name):
        raise ValueError(
            "topic names are letters, digits and '_.~-', in segments separated by single '/'"
        )
    if "." in name and not {".", ".."}.isdisjoint(name.split("/")):
        raise ValueError("topic names may not have '.' or '..' segments")
    return name


@dataclass(frozen=True)
class Message:
    """One message of a topic, as subscribers of :meth:`Topics.subscribe` receive it.

    ``(epoch, seq)`` names it: within one ``epoch`` (one numbering of the topic) every
    ``seq`` is one message. Equality leaves ``epoch`` out, so that messages compare by topic,
    number and data as they did before epochs, and so does its repr; compare
    ``(m.epoch, m.seq)`` to tell two numberings apart."""

    topic: str
    seq: int
    data: str | bytes
    epoch: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class Gap:
    """Messages ``since + 1`` to ``first - 1`` of ``topic`` are missing: no longer retained,
    or skipped by the topic's numbering on this relay (its backplane's log was trimmed
    while it was away). What follows comes from ``first``, in ``epoch``.

    Or, when :attr:`reset`, the topic's numbering changed: ``since`` was a number of
    another epoch (the relay restarted, the backplane lost the topic, a relay numbered it
    alone during an outage), or beyond the topic's last number. ``since`` and ``first``
    then do not compare: whatever came after ``since`` may be missing, and what follows
    starts at ``first`` of ``epoch``. Equality leaves ``epoch`` out, as for
    :class:`Message`.
    """

    topic: str
    since: int
    first: int
    epoch: str = field(default="", compare=False)
    """The epoch of ``first`` and of the messages that follow."""
    reset: bool = False
    """Whether the topic's numbering changed (set when ``first`` is not above ``since``,
    whatever is passed)."""

    def __post_init__(self) -> None:
        if self.first <= self.since and not self.reset:
            object.__setattr__(self, "reset", True)  # frozen: set once, while being made


@dataclass(frozen=True)
class DeliveryReport:
    """What publishing did: the sequence numbers ``seq`` to ``seq + count - 1`` were
    assigned, and the messages were queued for, dropped for, or evicted ``queued``,
    ``dropped`` and ``evicted`` subscribers (of this relay).

    ``remote`` is None without a backplane (``backplane`` False); with one, True when the
    messages went through it to every relay, False when it was unreachable and only this
    relay's subscribers got them (numbered in a relay-local epoch), and None when it did
    not answer in time: they may or may not have reached the others (republish with the
    same idempotency key to be sure). ``epoch`` is the epoch of the numbers (see
    :class:`Message`)."""

    topic: str
    seq: int
    count: int
    queued: int
    dropped: int
    evicted: int
    remote: bool | None = None
    epoch: str = field(default="", compare=False)
    backplane: bool = field(default=False, compare=False)
    """Whether the relay has a backplane (then ``remote`` says what it did)."""
    duplicate: bool = field(default=False, compare=False)
    """The publish carried an idempotency key already used on the topic within the window:
    nothing was published again; ``seq`` and ``epoch`` name the first one (the counts are
    0)."""


# A retained message: (seq, time, payload, text). A plain tuple: one is made per message.
_Entry = tuple[int, float, bytes, bool]


class Batch:
    """Consecutive messages of one topic from one publish, framed once per representation.

    The relay's connections send :attr:`raw` (plain WebSocket frames) to raw clients and
    :meth:`envelope` (``trio-relay.v1`` frames, built on first use) to envelope clients.
    ``len(batch)`` is the size of its raw frames, which is what queues are bounded by.
    """

    __slots__ = (
        "_envelope",
        "echo",
        "epoch",
        "fill",
        "first_seq",
        "gap",
        "last_seq",
        "payloads",
        "raw",
        "source",
        "texts",
        "topic",
    )

    def __init__(
        self,
        topic: str,
        first_seq: int,
        payloads: list[bytes],
        texts: list[bool],
        source: object = None,
        echo: bool = True,
        raw: bytes | None = None,
        epoch: str = "",
        gap: bool = False,
    ) -> None:
        self.topic = topic
        self.first_seq = first_seq
        self.last_seq = first_seq + len(payloads) - 1
        self.payloads = payloads
        self.texts = texts
        self.source = source
        self.echo = echo
        self.epoch = epoch
        """The epoch of its numbers (see :class:`Message`)."""
        self.gap = gap
        """Whether the topic skipped numbers on this relay just before this batch (its
        backplane's log lost or trimmed them): subscribers get a :class:`Gap` first."""
        self.fill = False
        """Whether a backplane filled it in from its log (see
        :meth:`Topics.deliver_numbered`): only subscribers already in its numbering take it."""
        if raw is None:
            if len(payloads) == 1:
                raw = frame_header(len(payloads[0]), text=texts[0]) + payloads[0]
            else:
                parts: list[bytes] = []
                for payload, text in zip(payloads, texts, strict=True):
                    parts.append(frame_header(len(payload), text=text))
                    parts.append(payload)
                raw = b"".join(parts)
        self.raw = raw
        self._envelope: bytes | None = None

    def __len__(self) -> int:
        return len(self.raw)

    def envelope(self) -> bytes:
        """The ``message`` frames of the envelope protocol, one per message."""
        if self._envelope is None:
            parts: list[bytes] = []
            for offset, (payload, text) in enumerate(zip(self.payloads, self.texts, strict=True)):
                body = encode_message(
                    self.topic, self.first_seq + offset, payload, text=text, epoch=self.epoch
                )
                parts.append(frame_header(len(body), text=True))
                parts.append(body)
            self._envelope = b"".join(parts)
        return self._envelope

    def after(self, seq: int) -> Batch | None:
        """The messages of this batch with a sequence number above ``seq``, or None."""
        if seq < self.first_seq:
            return self
        skip = seq - self.first_seq + 1
        if skip >= len(self.payloads):
            return None
        return Batch(
            self.topic,
            seq + 1,
            self.payloads[skip:],
            self.texts[skip:],
            source=self.source,
            echo=self.echo,
            epoch=self.epoch,
        )

    def messages(self) -> Iterator[Message]:
        for offset, (payload, text) in enumerate(zip(self.payloads, self.texts, strict=True)):
            yield Message(
                self.topic,
                self.first_seq + offset,
                payload.decode() if text else payload,
                self.epoch,
            )


class History:
    """The retained messages of one topic: at most ``max_messages`` messages and
    ``max_bytes`` bytes of payload, none older than ``max_age`` seconds."""

    def __init__(self, max_messages: int, max_bytes: int, max_age: float) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._entries: deque[_Entry] = deque()
        self.bytes = 0
        self.cost = 0
        """What this history counts against a global budget: its payload bytes, plus
        :data:`ENTRY_OVERHEAD` a message and :data:`TOPIC_OVERHEAD` while not empty."""

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def first_seq(self) -> int | None:
        return self._entries[0][0] if self._entries else None

    @property
    def first_time(self) -> float:
        """When the oldest retained message was added (``inf`` when there is none)."""
        return self._entries[0][1] if self._entries else float("inf")

    def _recost(self) -> int:
        """Update :attr:`cost`; return how it changed."""
        before, count = self.cost, len(self._entries)
        self.cost = self.bytes + count * ENTRY_OVERHEAD + TOPIC_OVERHEAD if count else 0
        return self.cost - before

    def pop_oldest(self) -> int:
        """Forget the oldest retained message (the history must not be empty); return how
        :attr:`cost` changed."""
        self.bytes -= len(self._entries.popleft()[2])
        return self._recost()

    def clear(self) -> int:
        """Forget every retained message; return how :attr:`cost` changed."""
        self._entries.clear()
        self.bytes = 0
        return self._recost()

    def add(self, batch: Batch, now: float) -> int:
        """Retain the messages of ``batch`` (then trim to the bounds); return how
        :attr:`cost` changed."""
        if self.max_messages <= 0 or self.max_bytes <= 0:
            return 0
        entries = self._entries
        seq = batch.first_seq
        for payload, text in zip(batch.payloads, batch.texts, strict=True):
            entries.append((seq, now, payload, text))
            self.bytes += len(payload)
            seq += 1
        if (
            len(entries) > self.max_messages
            or self.bytes > self.max_bytes
            or entries[0][1] < now - self.max_age
        ):
            return self.trim(now)  # its change counts from before the messages came
        before = self.cost  # (what _recost does, inline: this is the publish path)
        count = len(entries)
        self.cost = self.bytes + count * ENTRY_OVERHEAD + TOPIC_OVERHEAD if count else 0
        return self.cost - before

    def trim(self, now: float) -> int:
        """Drop what is past the bounds at ``now``; return how :attr:`cost` changed."""
        entries = self._entries
        oldest = now - self.max_age
        while entries and (
            len(entries) > self.max_messages
            or self.bytes > self.max_bytes
            or entries[0][1] < oldest
        ):
            self.bytes -= len(entries.popleft()[2])
        return self._recost()

    def after(self, seq: int, topic: str, epoch: str = "") -> Batch | None:
        """A batch of the retained messages with sequence numbers above ``seq``."""
        entries = [entry for entry in self._entries if entry[0] > seq]
        if not entries:
            return None
        return Batch(
            topic,
            entries[0][0],
            [e[2] for e in entries],
            [e[3] for e in entries],
            epoch=epoch,
        )


@dataclass(frozen=True)
class TopicStatistics:
    """A snapshot of one topic."""

    name: str
    last_seq: int
    history_messages: int
    history_bytes: int
    broadcast: BroadcastStatistics
    epoch: str = ""


class Cursor:
    """Where one subscriber is in a topic: the ``epoch`` and number ``seq`` of the last
    message it got (or was told about). :meth:`take` decides what it gets of each live
    batch, so that it gets every message once, in order, or a :class:`Gap` saying what it
    missed: never a silent jump or renumbering."""

    __slots__ = ("epoch", "seq")

    def __init__(self, epoch: str, seq: int) -> None:
        self.epoch = epoch
        self.seq = seq

    def __repr__(self) -> str:
        return f"Cursor({self.epoch!r}, {self.seq})"

    def take(self, batch: Batch) -> tuple[Gap | None, Batch | None]:
        """What the subscriber gets of ``batch``, and the cursor moved past it: the part of
        the batch it has not had (None if it had it all: the replay gave it), after a
        :class:`Gap` if the topic skipped numbers since (``batch.gap``) or its numbering
        changed (another epoch: a reset, unless the subscriber had nothing yet and the
        new numbering starts at 1)."""
        seq = self.seq
        if batch.epoch == self.epoch:
            if batch.first_seq == seq + 1:
                self.seq = batch.last_seq
                return None, batch
            if batch.first_seq <= seq:
                fresh = batch.after(seq)  # what the replay gave already is left out
                if fresh is not None:
                    self.seq = fresh.last_seq
                return None, fresh
            self.seq = batch.last_seq
            if batch.gap:
                return Gap(batch.topic, seq, batch.first_seq, batch.epoch), batch
            return None, batch  # missed here by this subscriber alone (the drop policy)
        if batch.fill:
            # Filled in from a backplane's log, of a numbering this subscriber is not in
            # (it joined before this relay had it): published before it came, not its to
            # get. The next delivered batch tells it of the numbering (a reset).
            return None, None
        self.epoch, self.seq = batch.epoch, batch.last_seq
        if seq == 0 and batch.first_seq == 1:
            return None, batch
        return Gap(batch.topic, seq, batch.first_seq, batch.epoch, reset=True), batch


class _Topic:
    __slots__ = (
        "alone",
        "broadcast",
        "epoch",
        "filled",
        "history",
        "idle",
        "last_seq",
        "lock",
        "name",
        "queued",
        "users",
    )

    def __init__(
        self, name: str, broadcast: MessageBus[Batch | bytes], history: History, epoch: str
    ) -> None:
        self.name = name
        self.broadcast = broadcast
        self.history = history
        self.epoch = epoch  # of the topic's numbering here
        self.last_seq = 0
        self.lock = trio.Lock()
        self.users = 0  # subscriptions and holds: while any, the topic is not forgotten
        self.idle = False  # in Topics._idle: kept only for its history (or not used yet)
        self.queued = False  # has an entry in Topics._oldest
        # Numbers a backplane filled in (retained, delivered only to subscribers in their
        # numbering) since its last delivered batch: one from before them may lack them.
        self.filled = False
        # The epoch and last number of the last batch numbered here alone (a backplane's
        # relay-local epoch): that epoch never names a number twice, whatever the shared
        # numbering did meanwhile (it may start again from 1).
        self.alone: tuple[str, int] | None = None


class Backplane(Protocol):
    """What :class:`Topics` asks of a backplane (:class:`~trio_relay.RedisBackplane` is
    one): to publish a batch to every relay, and where a topic's shared numbering is.

    The backplane drives the topics back through their public surface for it:
    :meth:`Topics.deliver_numbered`, :meth:`Topics.publish_locally`,
    :meth:`Topics.position` and :meth:`Topics.positions`.
    """

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
    ) -> DeliveryReport: ...

    async def position(self, topic: str) -> tuple[str, int] | None:
        """The epoch and last number of ``topic`` in the shared numbering; None if it has
        none yet or the backplane cannot be asked now."""
        ...

    def route(self, topic: str) -> None:
        """Start receiving ``topic`` (made here): a relay receives only the topics it has."""
        ...

    def synced_position(self, topic: str) -> tuple[str, int] | None:
        """The epoch and last number of ``topic`` as this relay last had them from the
        backplane, once it receives the topic (``("", 0)``: the backplane had none); None
        if it does not receive it yet."""
        ...

    def unroute(self, topic: str) -> None:
        """Stop receiving ``topic`` (forgotten here)."""
        ...

    async def routed(self, topic: str) -> None:
        """Return once ``topic`` is received here, its history filled (bounded by the
        backplane's timeout; at once if it cannot be reached)."""
        ...


class Topics:
    """The relay's topics, each a :class:`~trio_relay.Broadcast` plus a sequence and a history.

    ``history_size`` (messages), ``history_bytes`` and ``history_age`` (seconds) bound each
    topic's history; ``history_total_bytes`` bounds all histories together (past it, the
    oldest messages of all topics go first) and ``max_topics`` the number of topics (past
    it, a topic kept only for its history makes room, or :class:`TooManyTopicsError` is
    raised: see the module's docstring). The other arguments are the defaults of each
    topic's subscriptions, as for :class:`~trio_relay.Broadcast` (queues are bounded by
    the size of raw frames). ``broadcast_factory(topic_name)`` replaces the in-process
    broadcast of a topic (tests, or a backplane).
    """

    def __init__(
        self,
        *,
        history_size: int = 1000,
        history_bytes: int = 1024 * 1024,
        history_age: float = 600.0,
        history_total_bytes: int = 64 * 1024 * 1024,
        max_topics: int = 10_000,
        max_buffer: int = 4096,
        max_bytes: int | None = 256 * 1024,
        policy: OverflowPolicy = "evict",
        timeout: float = 1.0,
        broadcast_factory: Callable[[str], MessageBus[Batch | bytes]] | None = None,
        idempotency_window: float = 120.0,
    ) -> None:
        if history_size < 0 or history_bytes < 0 or history_total_bytes < 0 or not history_age >= 0:
            raise ValueError("history bounds must not be negative")
        if max_topics < 1:
            raise ValueError("max_topics must be at least 1")
        self.history_size = history_size
        self.history_bytes = history_bytes
        self.history_age = history_age
        self.history_total_bytes = history_total_bytes
        self.max_topics = max_topics
        self.totals = RunningTotals()
        """Running totals of every topic's broadcast (those ``broadcast_factory`` makes
        count only if it passes them these): published batches, drops, evictions, and
        what is queued; read in constant time, as ``/metrics`` does."""
        self._factory = broadcast_factory or (
            lambda _name: Broadcast[Batch | bytes](
                max_buffer=max_buffer,
                max_bytes=max_bytes,
                size_of=len,
                policy=policy,
                timeout=timeout,
                totals=self.totals,
            )
        )
        self._topics: dict[str, _Topic] = {}
        self._subscribers = 0  # a running total, for statistics at any scale
        self.backplane: Backplane | None = None
        """Set by :meth:`RedisBackplane.run`: publishes then go through it."""
        self.idempotency_window = idempotency_window
        """Seconds an idempotency key keeps a second publish of it from being published
        (per topic; with a backplane, kept in Redis)."""
        self.keys = RecentKeys(idempotency_window)
        """The keys of what this relay published itself (without a backplane, or alone)."""
        self.epoch = new_epoch()
        """This relay's epoch, new per process: the numbering of every topic made here
        without a backplane (with one, of a topic whose shared numbering is not known here
        yet). A client resuming with another epoch gets a reset, never numbers of another
        process taken for its own."""
        # The last epoch and sequence number of topics forgotten for being idle, so that a
        # topic used again goes on numbering where it stopped. Bounded: the oldest go first;
        # once one went, a topic made anew gets an epoch of its own (its old numbers may
        # have been this relay's epoch's).
        self._retired: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._retired_lost = False
        # The global bounds. `_retained` is the sum of every history's cost (a running
        # total); `_oldest` a heap of (time of its oldest message, tie-breaker, topic) with
        # one entry per topic that has retained something since it entered, keyed by a
        # time at or before its oldest message (histories only ever lose their oldest, so
        # a key goes stale low, never high: eviction re-keys it lazily). `_idle` holds the
        # topics nobody uses, longest unused first: what the topic cap may forget.
        self._retained = 0
        self._oldest: list[tuple[float, int, _Topic]] = []
        self._order = itertools.count()
        self._idle: OrderedDict[str, _Topic] = OrderedDict()

    def __contains__(self, name: str) -> bool:
        return name in self._topics

    def names(self) -> list[str]:
        """The names of the topics this relay has now (in use, or kept for their history)."""
        return list(self._topics)

    def __len__(self) -> int:
        return len(self._topics)

    @property
    def retained_bytes(self) -> int:
        """What all histories count against ``history_total_bytes`` now (payloads plus
        overheads; a running total: constant time)."""
        return self._retained

    @property
    def subscriber_total(self) -> int:
        """How many subscriptions all topics have now (a running total: constant time)."""
        return self._subscribers

    def subscribers(self, name: str) -> int:
        """How many subscriptions topic ``name`` has now (0 for a topic not in use)."""
        topic = self._topics.get(name)
        if topic is None:
            return 0
        if isinstance(topic.broadcast, Broadcast):
            return topic.broadcast.subscriber_count
        return topic.broadcast.statistics().subscribers

    def _get(self, name: str) -> _Topic:
        """Topic ``name``, made if new (idle until used); raises TooManyTopicsError."""
        topic = self._topics.get(name)
        if topic is None:
            if len(self._topics) >= self.max_topics:
                self._make_room()
            history = History(self.history_size, self.history_bytes, self.history_age)
            record = self._retired.pop(name, None)
            if record is not None:
                epoch, last = record
            else:
                epoch, last = self.epoch, 0
                if self._retired_lost and self.backplane is None:
                    epoch = new_epoch()
            topic = self._topics[name] = _Topic(name, self._factory(name), history, epoch)
            topic.last_seq = last
            topic.idle = True
            self._idle[name] = topic
            if self.backplane is not None:
                self.backplane.route(name)
        return topic

    def _make_room(self) -> None:
        """At ``max_topics``: forget the idle topic used longest ago, history and all (its
        subscribers-to-be resume with a gap), or raise TooManyTopicsError."""
        idle = self._idle
        for _ in range(len(idle)):
            name, topic = idle.popitem(last=False)
            if topic.lock.locked():  # a publish to it is in progress: it stays
                idle[name] = topic
                continue
            topic.idle = False
            self._retained += topic.history.clear()
            self._forget(topic)
            return
        raise TooManyTopicsError(
            f"a new topic would exceed the limit of {self.max_topics} topics, all in use"
        )

    def _forget(self, topic: _Topic) -> None:
        """Drop ``topic`` (idle, its history empty), remembering its last number."""
        del self._topics[topic.name]
        if topic.idle:
            topic.idle = False
            del self._idle[topic.name]
        if topic.last_seq:
            self._retire(topic.name, topic.epoch, topic.last_seq)
        if self.backplane is not None:
            self.backplane.unroute(topic.name)

    def _retire(self, name: str, epoch: str, last: int) -> None:
        self._retired[name] = (epoch, last)
        while len(self._retired) > MAX_RETIRED_TOPICS:
            self._retired.popitem(last=False)
            self._retired_lost = True

    def _use(self, topic: _Topic) -> None:
        topic.users += 1
        if topic.idle:
            topic.idle = False
            del self._idle[topic.name]

    def _trim(self, topic: _Topic, now: float) -> None:
        self._retained += topic.history.trim(now)

    def _collect(self, topic: _Topic) -> None:
        """Forget ``topic`` if it has neither users nor history (it costs nothing); mark it
        idle if it has history only."""
        self._trim(topic, trio.current_time())
        if (
            topic.users
            or topic.lock.locked()
            or self._topics.get(topic.name) is not topic
            or self.subscribers(topic.name)
        ):
            return
        if not len(topic.history):
            self._forget(topic)
        elif not topic.idle:
            topic.idle = True
            self._idle[topic.name] = topic

    def sweep(self) -> None:
        """Trim every history by age and forget the topics left with nothing."""
        for topic in list(self._topics.values()):
            self._collect(topic)
        self._rekey()

    def hold(self, name: str) -> None:
        """Keep topic ``name`` (made now if new) until :meth:`release`, as a subscription
        would: the relay holds a client's topic from its handshake on, so that the topic
        cap is checked once and stays true. Raises :class:`TooManyTopicsError`."""
        self._use(self._get(name))

    def release(self, name: str) -> None:
        """Undo one :meth:`hold` of topic ``name``."""
        topic = self._topics[name]
        topic.users -= 1
        self._collect(topic)

    # ------------------------------------------------------------------ the history budget

    def _enqueue(self, topic: _Topic) -> None:
        if len(self._oldest) > 2 * len(self._topics) + 64:
            self._rekey()  # entries of forgotten topics: O(topics), once per as many pushes
        topic.queued = True
        heapq.heappush(self._oldest, (topic.history.first_time, next(self._order), topic))

    def _rekey(self) -> None:
        """Rebuild the heap from the topics that retain something (drops stale entries)."""
        for _, _, topic in self._oldest:
            topic.queued = False
        order = self._order
        heap = [
            (topic.history.first_time, next(order), topic)
            for topic in self._topics.values()
            if len(topic.history)
        ]
        heapq.heapify(heap)
        for _, _, topic in heap:
            topic.queued = True
        self._oldest = heap

    def _evict(self) -> None:
        """Drop the oldest retained messages of all topics until within the budget."""
        heap = self._oldest
        limit = self.history_total_bytes
        while self._retained > limit and heap:
            key, _, topic = heap[0]
            history = topic.history
            if not len(history) or self._topics.get(topic.name) is not topic:
                heapq.heappop(heap)  # emptied (or forgotten) since it was keyed
                topic.queued = False
                continue
            if history.first_time > key:  # its oldest went since: key it anew
                heapq.heapreplace(heap, (history.first_time, next(self._order), topic))
                continue
            self._retained += history.pop_oldest()
            if len(history):
                heapq.heapreplace(heap, (history.first_time, next(self._order), topic))
                continue
            heapq.heappop(heap)
            topic.queued = False
            if topic.idle and not topic.lock.locked():
                self._forget(topic)

    # ------------------------------------------------------------------ publishing

    def _batch(
        self, topic: _Topic, payloads: list[bytes], texts: list[bool], source: object, echo: bool
    ) -> Batch:
        first = topic.last_seq + 1
        return Batch(topic.name, first, payloads, texts, source, echo, epoch=topic.epoch)

    def _switch(self, topic: _Topic, epoch: str) -> None:
        """Start another numbering of ``topic``: what it retains was of the old one."""
        self._retained += topic.history.clear()
        topic.epoch = epoch

    def _commit(self, topic: _Topic, batch: Batch) -> None:
        """Number ``batch`` and retain it; then, past ``history_total_bytes``, the oldest
        messages of all topics go (the hot path: a few attribute reads when within it)."""
        topic.last_seq = batch.last_seq
        if topic.idle:
            self._idle.move_to_end(topic.name)  # used now: the last an idle topic to go
        history = topic.history
        self._retained += history.add(batch, trio.current_time())
        if not topic.queued and history.cost:
            self._enqueue(topic)
        if self._retained > self.history_total_bytes:
            self._evict()

    def deliver_nowait(
        self, name: str, payloads: list[bytes], texts: list[bool], *, source: object = None
    ) -> None:
        """:meth:`publish_nowait` for a caller that has no use for the report (a raw
        client's messages, once per read, the relay's hottest path: making a
        :class:`DeliveryReport` cost about a microsecond there, a fifth of the relay's own
        CPU per message at one message in flight). Raises ``WouldBlock`` having published
        nothing, as that one does."""
        topic = self._topics.get(name) or self._get(name)
        if topic.lock.locked() or self.backplane is not None:
            raise trio.WouldBlock
        batch = self._batch(topic, payloads, texts, source, True)
        topic.broadcast.publish_nowait(batch)  # WouldBlock from it: nothing was published
        self._commit(topic, batch)

    def publish_nowait(
        self,
        name: str,
        payloads: list[bytes],
        texts: list[bool],
        *,
        source: object = None,
        echo: bool = True,
        idempotency_key: str | None = None,
    ) -> DeliveryReport:
        """Publish encoded messages without waiting or yielding, or raise ``WouldBlock``
        having published nothing (see :meth:`Broadcast.publish_nowait`). With a backplane
        it always raises ``WouldBlock``: publishing there means a trip to Redis. Raises
        :class:`TooManyTopicsError` for a new topic past ``max_topics``. See
        :meth:`publish_batch` for ``idempotency_key``."""
        topic = self._topics.get(name) or self._get(name)
        if topic.lock.locked() or self.backplane is not None:
            raise trio.WouldBlock
        if idempotency_key is not None:
            duplicate = self._duplicate(name, payloads, idempotency_key)
            if duplicate is not None:
                return duplicate
        batch = self._batch(topic, payloads, texts, source, echo)
        # WouldBlock from it: nothing was published.
        report = topic.broadcast.publish_nowait(batch)
        self._commit(topic, batch)
        if idempotency_key is not None:
            self.keys.add(name, idempotency_key, batch.epoch, batch.first_seq, trio.current_time())
        return DeliveryReport(
            name,
            batch.first_seq,
            len(payloads),
            report.queued,
            report.dropped,
            report.evicted,
            epoch=batch.epoch,
        )

    async def publish_batch(
        self,
        name: str,
        payloads: list[bytes],
        texts: list[bool],
        *,
        source: object = None,
        echo: bool = True,
        idempotency_key: str | None = None,
    ) -> DeliveryReport:
        """Publish encoded messages (UTF-8 bytes where ``texts`` says text), as one batch.

        ``idempotency_key`` (one message only): if a publish to this topic carried the same
        key within ``idempotency_window`` seconds, nothing is published and the report
        names that one (``duplicate``). Raises :class:`TooManyTopicsError` for a new topic
        past ``max_topics``."""
        if idempotency_key is not None and len(payloads) != 1:
            raise ValueError("an idempotency key names one message: publish it alone")
        if self.backplane is not None:
            # Held while it goes through Redis (and comes back on the topic's channel): a
            # new topic is refused here, before it reaches other relays.
            topic = self._get(name)
            self._use(topic)
            try:
                return await self.backplane.publish(
                    self,
                    name,
                    payloads,
                    texts,
                    source=source,
                    echo=echo,
                    idempotency_key=idempotency_key,
                )
            finally:
                topic.users -= 1
                self._collect(topic)
        return await self.publish_locally(
            name, payloads, texts, source=source, echo=echo, idempotency_key=idempotency_key
        )

    def _duplicate(self, name: str, payloads: list[bytes], key: str) -> DeliveryReport | None:
        """The report of a publish whose ``key`` this relay used on topic ``name`` within
        the window (nothing is published), or None."""
        seen = self.keys.get(name, key, trio.current_time())
        if seen is None:
            return None
        epoch, seq = seen
        backplane = self.backplane is not None
        return DeliveryReport(
            name,
            seq,
            len(payloads),
            0,
            0,
            0,
            False if backplane else None,
            epoch=epoch,
            backplane=backplane,
            duplicate=True,
        )

    async def publish_locally(
        self,
        name: str,
        payloads: list[bytes],
        texts: list[bool],
        *,
        source: object = None,
        echo: bool = True,
        epoch: str | None = None,
        idempotency_key: str | None = None,
    ) -> DeliveryReport:
        """Number and deliver a batch on this relay only, bypassing the backplane (if any).

        What :meth:`publish_batch` does without a backplane, and what a backplane does with
        a publish it cannot share (the others are unreachable): then ``epoch`` is the
        relay-local epoch it numbers in, never the shared one's (the topic switches to it,
        and its subscribers get a reset), and the report says ``remote=False``. An
        ``idempotency_key`` this relay used on the topic within the window publishes
        nothing (see :meth:`publish_batch`)."""
        if idempotency_key is not None:
            duplicate = self._duplicate(name, payloads, idempotency_key)
            if duplicate is not None:
                await trio.sleep(0)  # a checkpoint, as every async method makes
                return duplicate
        topic = self._get(name)
        async with topic.lock:
            if epoch is not None and epoch != topic.epoch:
                self._switch(topic, epoch)
                if topic.alone is not None and topic.alone[0] == epoch:
                    topic.last_seq = max(topic.last_seq, topic.alone[1])
            batch = self._batch(topic, payloads, texts, source, echo)
            if epoch is not None:
                topic.alone = epoch, batch.last_seq
            # Numbered and retained before delivery: a subscriber that joins while this
            # publish waits for room finds the batch in the history (and drops the copy
            # it may also get live, by sequence number).
            self._commit(topic, batch)
            if idempotency_key is not None:
                now = trio.current_time()
                self.keys.add(name, idempotency_key, batch.epoch, batch.first_seq, now)
            report = await topic.broadcast.publish(batch)
        return DeliveryReport(
            name,
            batch.first_seq,
            len(payloads),
            report.queued,
            report.dropped,
            report.evicted,
            False if self.backplane is not None else None,
            epoch=batch.epoch,
            backplane=self.backplane is not None,
        )

    async def deliver_numbered(
        self,
        name: str,
        epoch: str,
        first_seq: int,
        payloads: list[bytes],
        texts: list[bool],
        *,
        source: object = None,
        echo: bool = True,
        fill: bool = False,
    ) -> tuple[DeliveryReport, bool]:
        """Deliver a batch a backplane numbered from ``first_seq`` in ``epoch`` (one read
        from its log, this relay's own publishes included), so that every relay names a
        topic's messages alike.

        Returns its report and whether it was new here. It is not when this relay has
        those numbers of that epoch already (then nothing is delivered: a name never
        means two messages); only its numbers this relay has not had are delivered. A
        batch of another epoch starts that numbering here (what the topic retained goes:
        it was of the old one); one that skips numbers (the log lost or trimmed them)
        empties the history (it would not be whole). Either is marked :attr:`Batch.gap`
        unless it starts at 1, so that live subscribers get a :class:`Gap` with it.

        ``fill``: a relay filling its histories from the log (what was published before
        it held the topic): retained, and delivered only to the subscribers already in
        its numbering (its epoch: those that resumed from a number of it, or joined at the
        shared position while the fill was pending), for whom it is newer than what they
        had; one that joined in another numbering does not get it (see :class:`Cursor`).
        A new topic past ``max_topics`` is not made: nobody here
        subscribes to it, so the batch reaches nobody (its number is remembered, as for a
        forgotten topic)."""
        topic = self._numbering(name, epoch, first_seq, len(payloads))
        if topic is None:
            return self._shared_report(name, epoch, first_seq, len(payloads)), True
        async with topic.lock:
            batch = self._numbered(topic, epoch, first_seq, payloads, texts, source, echo)
            if batch is None:
                return self._shared_report(name, epoch, first_seq, len(payloads)), False
            if fill:
                self._renumber(topic, batch)
                topic.filled = True
                batch.fill = True
            else:
                self._renumber(topic, batch, after_fill=True)
            published = await topic.broadcast.publish(batch)
        return self._shared_report(
            name, epoch, batch.first_seq, len(batch.payloads), published
        ), True

    def deliver_numbered_nowait(
        self,
        name: str,
        epoch: str,
        first_seq: int,
        payloads: list[bytes],
        texts: list[bool],
        *,
        source: object = None,
        echo: bool = True,
        fill: bool = False,
    ) -> tuple[DeliveryReport, bool]:
        """:meth:`deliver_numbered` without waiting or yielding, or raise ``WouldBlock``
        having done nothing: a subscriber of the topic has no room for it (under the
        ``block`` or ``evict`` policy), or a publish to the topic is waiting for one. What
        a backplane's reader calls first, so that it never waits for a subscriber of one
        topic while other topics' messages are due."""
        topic = self._numbering(name, epoch, first_seq, len(payloads))
        if topic is None:
            return self._shared_report(name, epoch, first_seq, len(payloads)), True
        if topic.lock.locked():
            raise trio.WouldBlock
        batch = self._numbered(topic, epoch, first_seq, payloads, texts, source, echo)
        if batch is None:
            return self._shared_report(name, epoch, first_seq, len(payloads)), False
        if fill:
            batch.fill = True
            published = topic.broadcast.publish_nowait(batch)  # WouldBlock: nothing was done
            self._renumber(topic, batch)
            topic.filled = True
            report = self._shared_report(
                name, epoch, batch.first_seq, len(batch.payloads), published
            )
            return report, True
        skipped = batch.gap
        batch.gap = skipped or topic.filled  # marked before it goes out: see _renumber
        published = topic.broadcast.publish_nowait(batch)  # WouldBlock: nothing was done
        self._renumber(topic, batch, skipped=skipped, after_fill=True)
        report = self._shared_report(name, epoch, batch.first_seq, len(batch.payloads), published)
        return report, True

    def _numbering(self, name: str, epoch: str, first_seq: int, count: int) -> _Topic | None:
        """Topic ``name`` for a backplane's batch, made if new; None past ``max_topics``
        (the batch reaches nobody here: its number is remembered, as a forgotten topic's)."""
        if name not in self._topics:
            try:
                self._get(name)
            except TooManyTopicsError:
                last = first_seq + count - 1
                record = self._retired.get(name)
                if record is None or record[0] != epoch or last > record[1]:
                    self._retire(name, epoch, last)
                return None
        return self._get(name)

    @staticmethod
    def _numbered(
        topic: _Topic,
        epoch: str,
        first_seq: int,
        payloads: list[bytes],
        texts: list[bool],
        source: object,
        echo: bool,
    ) -> Batch | None:
        """The batch a backplane's entry makes on ``topic`` (None: it has those numbers
        already), without changing the topic (see :meth:`_renumber`)."""
        gap = False
        last = first_seq + len(payloads) - 1
        if epoch != topic.epoch:
            gap = first_seq > 1  # another numbering: what came before it is not here
        elif last <= topic.last_seq:
            return None
        elif first_seq <= topic.last_seq:
            skip = topic.last_seq - first_seq + 1
            first_seq, payloads, texts = topic.last_seq + 1, payloads[skip:], texts[skip:]
        elif first_seq > topic.last_seq + 1:
            gap = True  # numbers this relay never got (trimmed from the log while away)
        return Batch(topic.name, first_seq, payloads, texts, source, echo, epoch=epoch, gap=gap)

    def _renumber(
        self,
        topic: _Topic,
        batch: Batch,
        *,
        skipped: bool | None = None,
        after_fill: bool = False,
    ) -> None:
        """Take ``batch`` (of :meth:`_numbered`) into the topic's numbering and history.

        ``skipped`` (default ``batch.gap``): the topic skipped numbers before it, so its
        history is no longer whole. ``after_fill``: ``batch`` is to be delivered; if
        numbers were filled in since the last delivered batch, it is marked a gap (it
        follows them in the history, which stays whole): a subscriber from before them
        (one that joined while Redis was away, at the number this relay had, say) never
        got them, and is told so (its :class:`Cursor` sees the skip), never silently
        jumps them."""
        if skipped is None:
            skipped = batch.gap
        if after_fill and topic.filled:
            batch.gap = True
            topic.filled = False
        if batch.epoch != topic.epoch:
            self._switch(topic, batch.epoch)  # what it retained was of the old numbering
        elif skipped:
            # Its history must not pretend to be whole across numbers it never got.
            self._retained += topic.history.clear()
        self._commit(topic, batch)

    @staticmethod
    def _shared_report(
        name: str, epoch: str, first_seq: int, count: int, published: PublishReport | None = None
    ) -> DeliveryReport:
        queued, dropped, evicted = (
            (published.queued, published.dropped, published.evicted) if published else (0, 0, 0)
        )
        return DeliveryReport(
            name, first_seq, count, queued, dropped, evicted, True, epoch=epoch, backplane=True
        )

    def last_number(self, name: str) -> int:
        """The last sequence number topic ``name`` has had here (0 if none), in its current
        epoch (:meth:`position`)."""
        return self.position(name)[1]

    def position(self, name: str) -> tuple[str, int]:
        """The epoch of topic ``name`` here and its last sequence number in it (0 if none)."""
        topic = self._topics.get(name)
        if topic is not None:
            return topic.epoch, topic.last_seq
        return self._retired.get(name) or (self.epoch, 0)

    def positions(self) -> dict[str, tuple[str, int]]:
        """The epoch and last number of every topic numbered here, in use or forgotten:
        what a backplane checks its own numbering against on reconnecting."""
        numbers = dict(self._retired)
        numbers.update((name, (t.epoch, t.last_seq)) for name, t in self._topics.items())
        return {name: position for name, position in numbers.items() if position[1]}

    async def publish(
        self, name: str, message: str | bytes, *, idempotency_key: str | None = None
    ) -> DeliveryReport:
        """Publish one message on topic ``name`` and report its sequence number and delivery
        (see :meth:`publish_batch` for ``idempotency_key``)."""
        key = idempotency_key
        if isinstance(message, str):
            return await self.publish_batch(
                name, [message.encode("utf-8")], [True], idempotency_key=key
            )
        return await self.publish_batch(name, [bytes(message)], [False], idempotency_key=key)

    # ------------------------------------------------------------------ subscribing

    async def join(
        self,
        name: str,
        *,
        since: int | None = None,
        epoch: str | None = None,
        max_buffer: int | None = None,
        max_bytes: int | None = None,
        policy: OverflowPolicy | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the evict policy's wait
        subscription_name: str = "",
        write_through: Callable[[Batch | bytes], Batch | bytes | None] | None = None,
        on_evict: Callable[[], None] | None = None,
        on_backlog: Callable[[], None] | None = None,
    ) -> tuple[Subscription[Batch | bytes], Gap | None, Batch | None, Cursor]:
        """Subscribe to the batches of topic ``name`` until :meth:`leave`, for the server's
        connections (:meth:`subscribe` is the ``async with`` form for applications).

        Returns the subscription, the gap (if ``since`` asks for messages no longer
        retained, or names a number of another ``epoch``: a reset), the replay batch
        (retained messages after ``since``), and the subscriber's :class:`Cursor` once it
        has the replay: its :meth:`Cursor.take` tells what it gets of each live batch.
        ``epoch`` None takes ``since`` to be of the topic's epoch here (clients from before
        epochs).

        Not a context manager, on purpose: at 20,000 connections the two of an
        ``async with`` (this one's and the broadcast's, with their suspended frames) were
        1.3 KB per connection. The caller must call :meth:`leave` exactly once, in a
        ``finally``; cancelled here, nothing was subscribed.
        """
        topic = self._get(name)
        self._use(topic)
        try:
            if self.backplane is not None:
                # Received here from now on, its history filled from the backplane first.
                await self.backplane.routed(name)
            shared = await self._shared_position(name, since, epoch)
            subscription = topic.broadcast.join(
                max_buffer=max_buffer,
                max_bytes=max_bytes,
                policy=policy,
                timeout=timeout,
                name=subscription_name,
                write_through=write_through,
                on_evict=on_evict,
                on_backlog=on_backlog,
            )
        except BaseException:
            topic.users -= 1
            self._collect(topic)
            raise
        self._subscribers += 1
        try:
            # No checkpoint since the subscription was registered: what the history holds
            # now and what arrives live from now on meet without a gap.
            gap, replay, cursor = self._replay(topic, since, epoch, shared)
        except BaseException:
            self.leave(name, subscription)
            raise
        return subscription, gap, replay, cursor

    def leave(self, name: str, subscription: Subscription[Batch | bytes]) -> None:
        """End a subscription to topic ``name`` made by :meth:`join` (its queue is
        dropped); the topic is forgotten if nothing keeps it. Never blocks."""
        topic = self._topics[name]
        self._subscribers -= 1
        topic.broadcast.leave(subscription)
        topic.users -= 1
        self._collect(topic)

    async def _shared_position(
        self, name: str, since: int | None, epoch: str | None
    ) -> tuple[str, int] | None:
        """With a backplane, ask it where topic ``name``'s shared numbering is when this
        relay cannot tell alone: the topic is not numbered here yet (a subscriber then
        starts from there: what was numbered before it is not its to get), or ``since`` is
        ahead of this relay (numbered elsewhere and on its way here, or never numbered:
        only the backplane knows)."""
        if self.backplane is None:
            return None
        here, last = self.position(name)
        if here == self.epoch and not last and not since:
            # Not numbered here, and nothing asked of the past: where the backplane's read
            # of the topic's log (as it started receiving the topic) found it will do; what
            # was numbered since is on its way here. A round trip less per subscription.
            known = self.backplane.synced_position(name)
            if known is not None:
                await trio.sleep(0)  # a checkpoint, as every async method makes
                return known if known[0] else None
        if (here == self.epoch and not last) or (
            since is not None and since > last and epoch in (None, here)
        ):
            return await self.backplane.position(name)
        return None

    def _replay(
        self,
        topic: _Topic,
        since: int | None,
        epoch: str | None = None,
        shared: tuple[str, int] | None = None,
    ) -> tuple[Gap | None, Batch | None, Cursor]:
        current, last = topic.epoch, topic.last_seq
        if since is not None and since < 0:
            raise ValueError("since must be a sequence number >= 0")
        if shared is not None and current == self.epoch and not last:
            # Not numbered here yet (only a backplane's entries number it): the subscriber
            # starts where the shared numbering is. What comes of it that it has not had
            # (on its way here) reaches it; what this relay never gets is a gap then.
            shared_epoch, shared_last = shared
            if since is None:
                return None, None, Cursor(shared_epoch, shared_last)
            if since == 0 or (epoch in (None, shared_epoch) and since <= shared_last):
                return None, None, Cursor(shared_epoch, since)
            # Of another numbering: a reset, and the shared one from its start (what of it
            # reaches this relay from now on reaches the subscriber; a gap says the rest).
            reset = Gap(topic.name, since, 1, shared_epoch, reset=True)
            return reset, None, Cursor(shared_epoch, 0)
        if since is None or (since == last and epoch in (None, current)):
            return None, None, Cursor(current, last)
        self._trim(topic, trio.current_time())
        history = topic.history
        first = history.first_seq if history.first_seq is not None else last + 1
        if since == 0 or (epoch in (None, current) and since < last):
            gap = Gap(topic.name, since, first, current) if since + 1 < first else None
            return gap, history.after(since, topic.name, current), Cursor(current, last)
        ahead = shared is not None and shared[0] == current and since <= shared[1]
        if epoch in (None, current) and ahead:
            # Numbered by another relay and not read from the log here yet: it is on its
            # way, so the subscriber goes on from `since` with nothing to replay.
            return None, None, Cursor(current, since)
        # Of another numbering (the relay restarted, the backplane lost the topic, a relay
        # numbered it alone), or beyond anything this topic numbered: say so (a reset),
        # and give everything retained.
        gap = Gap(topic.name, since, first, current, reset=True)
        return gap, history.after(0, topic.name, current), Cursor(current, last)

    @asynccontextmanager
    async def subscribe(
        self,
        name: str,
        *,
        since: int | None = None,
        epoch: str | None = None,
        max_buffer: int | None = None,
        max_bytes: int | None = None,
        policy: OverflowPolicy | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the evict policy's wait
    ) -> AsyncIterator[TopicSubscription]:
        """Receive the messages of topic ``name`` for the ``async with`` block.

        With ``since=seq``, the retained messages after ``seq`` come first, then live
        ones, each exactly once and in order; a :class:`Gap` comes first if some of them
        are no longer retained, and later wherever the topic skips numbers or changes
        epoch. ``epoch`` is that of ``seq`` (as the messages carry it); another than the
        topic's gets a reset. Iterate the yielded :class:`TopicSubscription`.
        """
        subscription, gap, replay, cursor = await self.join(
            name,
            since=since,
            epoch=epoch,
            max_buffer=max_buffer,
            max_bytes=max_bytes,
            policy=policy,
            timeout=timeout,
        )
        try:
            yield TopicSubscription(subscription, gap, replay, cursor)
        finally:
            self.leave(name, subscription)

    async def retained(
        self, name: str, since: int | None = None, epoch: str | None = None
    ) -> tuple[int, Gap | None, list[Message]]:
        """Read topic ``name``'s history without subscribing: its last sequence number, the
        :class:`Gap` (if any), and the retained messages after ``since`` in order (their
        epoch is the topic's: :meth:`position` says it too).

        What a subscription with ``since`` (and ``epoch``) would replay (same gap, same
        messages, the number its ``welcome`` would carry); with ``since=None``, every
        retained message and no gap. Raises ``ValueError`` for a negative ``since``.
        Subscribes nothing and leaves no topic behind; with a backplane, a topic not held
        here is held while it is read (:class:`TooManyTopicsError` past ``max_topics``),
        and kept for its history as others are.
        """
        if since is not None and since < 0:
            raise ValueError("since must be a sequence number >= 0")
        if self.backplane is not None and name not in self._topics:
            # Only topics held here are received: hold it (its history filled from the
            # backplane) while reading; kept afterwards as any topic with a history is.
            held = self._get(name)
            self._use(held)
            try:
                await self.backplane.routed(name)
                return await self.retained(name, since, epoch)
            finally:
                held.users -= 1
                self._collect(held)
        shared = None
        here, last = self.position(name)
        if since is not None and self.backplane is not None and since > last:
            # As for join: only Redis knows whether it is on its way here.
            shared = await self.backplane.position(name)
        else:
            await trio.sleep(0)  # a checkpoint, as every async method makes
        topic = self._topics.get(name)
        if topic is None:
            # Not in use: read it as it would be made, without making it (at max_topics,
            # making a topic forgets another to make room, or is refused).
            here, last = self.position(name)
            topic = _Topic(name, Broadcast[Batch | bytes](), History(0, 0, 0), here)
            topic.last_seq = last
        try:
            gap, replay, cursor = self._replay(topic, since or 0, epoch, shared)
        finally:
            self._collect(topic)
        messages = list(replay.messages()) if replay is not None else []
        return cursor.seq, gap if since is not None else None, messages

    def statistics(self) -> dict[str, TopicStatistics]:
        """A snapshot of every topic, by name."""
        return {
            name: TopicStatistics(
                name,
                topic.last_seq,
                len(topic.history),
                topic.history.bytes,
                topic.broadcast.statistics(),
                topic.epoch,
            )
            for name, topic in self._topics.items()
        }


class TopicSubscription:
    """The messages of one topic subscription: ``async for item in subscription``, where
    each item is a :class:`Message` or a :class:`Gap` (first, for messages no longer
    retained, and wherever the topic skips numbers or changes epoch later)."""

    def __init__(
        self,
        subscription: Subscription[Batch | bytes],
        gap: Gap | None,
        replay: Batch | None,
        cursor: Cursor,
    ) -> None:
        self.subscription = subscription
        self._pending: deque[Message | Gap] = deque()
        if gap is not None:
            self._pending.append(gap)
        if replay is not None:
            self._pending.extend(replay.messages())
        self._cursor = cursor

    def __aiter__(self) -> TopicSubscription:
        return self

    async def __anext__(self) -> Message | Gap:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def receive(self) -> Message | Gap:
        """The next message (or gap notice); see :meth:`Subscription.receive` for errors."""
        if self._pending:
            await trio.sleep(0)  # a checkpoint, like every receive()
        while not self._pending:
            item = await self.subscription.receive()
            if isinstance(item, Batch):
                gap, fresh = self._cursor.take(item)
                if gap is not None:
                    self._pending.append(gap)
                if fresh is not None:
                    self._pending.extend(fresh.messages())
        return self._pending.popleft()
