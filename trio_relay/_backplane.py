"""The Redis backplane: relay processes that share topics through one Redis.

Design (a choice the issue left open; see README "Scaling out"), in the manner of
Centrifugo's Redis engine:

- **Per-topic keys, hash-tagged.** Each topic has a hash ``<prefix>:{t:<topic>}:n`` (its
  epoch, last number and log size), a stream ``<prefix>:{t:<topic>}:log`` (its retained
  publishes) and a pub/sub channel ``<prefix>:{t:<topic>}``; idempotency keys are
  ``<prefix>:{t:<topic>}:k:<key>``. Every key of a topic has the same hash tag, and every
  script touches one topic's keys only, so the design runs on Redis Cluster.
- **Publishing.** A Lua script names a topic's batches (its epoch and next numbers),
  appends them to the topic's stream, trims the stream by entries, bytes and age, and
  ``PUBLISH``es each to the topic's channel, atomically: the channel's order is the
  topic's numbering order. Publishes that are ready together go in one round trip (one
  script call per topic, pipelined).
- **Routing.** A relay subscribes to the channels of the topics it holds (those its
  clients use, or retain history of) and to nothing else: it receives only those. Every
  relay delivers a topic's messages in the same order under the same names (epoch,
  sequence number), its own publishes included (they come back on the channel).
- **Recovery, filling is not delivering.** When a relay starts holding a topic, it
  subscribes first, then reads the topic's stream and *fills* its history from it
  (retains, delivers to nobody); what arrives on the channel meanwhile waits and follows.
  When it reconnects after losing Redis, or sees a topic's numbers skip on the channel,
  it reads the stream again and *delivers* what it had not had, in order; what the
  stream no longer holds is a gap.
- **Epochs; loss is told by data.** A topic's numbering has an epoch, kept in its hash.
  The publish script starts a fresh one (numbering from 1, the stream emptied) whenever
  the numbering cannot simply go on: Redis has no record of the topic (new, expired, or
  lost with Redis's data), or knows less of the current epoch than the relay that
  publishes (Redis came back from an older snapshot). A reconnecting relay makes the same
  check for every topic it holds while it reads the stream. So an (epoch, seq) pair names
  one message, whatever Redis lost, and nothing depends on Redis's ``run_id``.
- **Outages** (the contract, in README "Scaling out"): a relay that cannot reach Redis
  delivers its own publishes to its own subscribers under a relay-local epoch, fresh per
  outage (``remote=False``; ``None`` when a publish got no answer in time: it may or may
  not be shared), and never numbers in a shared epoch alone. Each publish carries a
  deadline in Redis's time, past which the script refuses it, so one that timed out
  cannot reach the others much later. Back online, the relay reads what it missed of
  each topic; its topics switch back to the shared numbering (subscribers get a reset).
- **Noticing a dead Redis.** Every ``block`` seconds the relay publishes a heartbeat on a
  channel of its own and expects it back on its subscription within ``timeout``: a
  frozen Redis, or a subscription connection that died silently, is noticed within
  ``block + timeout``.
- **Isolation.** The reader never waits for a subscriber: a topic whose subscriber has no
  room gets a queue (a lane) drained by a task of its own, at most :data:`LANE_LIMIT`
  entries (past it, entries are dropped there and its subscribers get a gap).

coredis runs under trio through anyio. One client serves the relay's lifetime, opened
outside every scope that gets cancelled; its retries are off (a retried publish could be
appended twice) and every command is bounded by ``timeout``. The subscription runs on a
connection of its own (coredis's ``PubSub``, retries off too: this module reconnects and
recovers, so that no loss goes unnoticed).

**Redis Cluster** (a ``redis+cluster://`` or ``rediss+cluster://`` URL naming any node):
the same design, through coredis's ``RedisCluster``, one client per connection's life (a
session: it discovers the nodes and their slots as it starts, so a reconnect follows the
cluster's changes). Each script call goes to its topic's node; the calls that are ready
together go in one pipeline (a round trip per node), never retried as a whole (a call
that a node answered ``NOSCRIPT``, a restarted node, is run again once the scripts are
loaded on every node: it ran nowhere). The subscription (``ClusterPubSub``: non-sharded
``SUBSCRIBE`` on one node) receives every node's ``PUBLISH`` over the cluster bus, in the
order each node published, so a topic's messages, all published by its node, keep their
order. The heartbeat is published through every primary node and each must come back:
a node that dies or stops answering, or a cluster bus that stops carrying, fails the
session within ``block + timeout``; the relay then serves locally, as when a single Redis
is lost, until every node answers again (the cluster, by default, refuses every command
while a slot has no node anyway). Redis's clock is read on one node: the nodes' clocks
must agree within ``timeout / 2`` (the margin of each publish's deadline), as NTP keeps
them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import urllib.parse
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from ._redact import shown
from ._topics import DeliveryReport, check_epoch, new_epoch, topic_from_path

if TYPE_CHECKING:
    from ._topics import Topics

__all__ = ["BackplaneStatistics", "RedisBackplane"]

logger = logging.getLogger("trio_relay")

# One topic's publishes that are ready together, in one call. Keys are all the topic's.
# KEYS: the topic's hash (fields e: epoch, s: last number, b: payload bytes in its log),
# its log (a stream); then, per batch with an idempotency key, that key's.
# ARGV: the log's bounds in entries, bytes and age (ms), the keys' time to live (s), the
# idempotency window (s), the topic's channel, the publishing relay's epoch of the topic
# and last number in it, a fresh epoch (taken if the numbering cannot go on); then, per
# batch: its number of values, 1 if it has an idempotency key (else 0), its origin, its
# deadline (Redis time, ms; 0: none), then its values, each with a first byte t(ext) or
# b(inary).
# Returns, per batch: {epoch, first number, entry id, the log's payload bytes after this
# call}; {epoch, first number, "duplicate"} for a key used within the window (nothing
# appended); or {"", 0, "late"} past its deadline (refused). Each appended batch is
# published on the channel as "<epoch> <first> <origin> <count>\n" then each value as
# "<length>:<bytes>". The log is
# trimmed here, oldest entries first, while it is over any bound (keeping the newest; a
# few entries a batch at most, so each costs O(1)).
_PUBLISH = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local epoch = nil
local last, bytes = 0, 0
local results = {}
local appended = 0
local k, a = 3, 10
while a <= #ARGV do
  local count, keyed = tonumber(ARGV[a]), ARGV[a + 1] == '1'
  local origin, deadline = ARGV[a + 2], tonumber(ARGV[a + 3])
  local first_value = a + 4
  local idem_key = nil
  if keyed then
    idem_key = KEYS[k]
    k = k + 1
  end
  local seen = nil
  if idem_key then seen = redis.call('GET', idem_key) end
  if deadline > 0 and now_ms > deadline then
    results[#results + 1] = {'', 0, 'late'}
  elseif seen then
    local seen_epoch, seen_first = string.match(seen, '^([^:]+):(%d+)$')
    results[#results + 1] = {seen_epoch, tonumber(seen_first), 'duplicate'}
  else
    if not epoch then
      epoch = redis.call('HGET', KEYS[1], 'e')
      last = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
      bytes = tonumber(redis.call('HGET', KEYS[1], 'b') or '0')
      if not epoch or (epoch == ARGV[7] and last < tonumber(ARGV[8])) then
        epoch, last, bytes = ARGV[9], 0, 0
        redis.call('DEL', KEYS[2])
      end
    end
    local first = last + 1
    last = last + count
    local size = 0
    local fields = {'e', epoch, 's', first, 'o', origin, 'n', 0}
    local message = {epoch, ' ', first, ' ', origin, ' ', count, '\\n'}
    for i = first_value, first_value + count - 1 do
      local value = ARGV[i]
      size = size + #value
      fields[#fields + 1] = tostring(i - first_value)
      fields[#fields + 1] = value
      message[#message + 1] = #value .. ':'
      message[#message + 1] = value
    end
    fields[8] = size
    local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
    redis.call('PUBLISH', ARGV[6], table.concat(message))
    if idem_key then
      redis.call('SET', idem_key, epoch .. ':' .. first, 'EX', ARGV[5])
    end
    bytes = bytes + size
    appended = appended + 1
    results[#results + 1] = {epoch, first, id, 0}
  end
  a = first_value + count
end
if appended > 0 then
  local length = redis.call('XLEN', KEYS[2])
  local max_length, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
  local oldest_ms = now_ms - tonumber(ARGV[3])
  for _ = 1, 8 * appended do
    if length <= 1 then break end
    local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
    local ms = tonumber(string.match(oldest[1], '^(%d+)'))
    if length <= max_length and bytes <= max_bytes and ms > oldest_ms then break end
    local entry = oldest[2]
    for j = 1, #entry, 2 do
      if entry[j] == 'n' then bytes = bytes - tonumber(entry[j + 1]) end
    end
    redis.call('XDEL', KEYS[2], oldest[1])
    length = length - 1
  end
  redis.call('HSET', KEYS[1], 'e', epoch, 's', last, 'b', bytes)
  for i = 1, #results do
    if results[i][4] then results[i][4] = bytes end
  end
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return results
"""

# Read one topic's log, for a relay that starts holding the topic or must catch up on it.
# KEYS: the topic's hash and log. ARGV: the epoch and last number the relay saw of the
# shared numbering ("" and 0: none), a fresh epoch, the most entries to return, the
# topic's channel and a marker ("sync <relay id>:<number>") published on it as the log is
# read: on the relay's subscription, what comes before the marker was published before
# the read (the log holds it), what comes after, after it.
# Where Redis knows less of that epoch's numbering than the relay did (it came back from
# an older snapshot, or a replica that lagged), the topic starts the fresh epoch (its next
# numbers must not name messages some relay already has) and its log is emptied.
# Returns {epoch ("" if Redis has no record of the topic), last number, 1 if it started
# the fresh epoch else 0, the log's entries}.
_RECOVER = """
redis.call('PUBLISH', ARGV[5], ARGV[6])
local epoch = redis.call('HGET', KEYS[1], 'e')
local last = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
if epoch and epoch == ARGV[1] and last < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'e', ARGV[3], 's', 0, 'b', 0)
  redis.call('DEL', KEYS[2])
  return {ARGV[3], 0, 1, {}}
end
return {epoch or '', last, 0, redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', ARGV[4])}
"""

# Drop one topic's log (a relay keeping what it published within its byte budget); the
# topic's numbering stays. KEYS: the topic's hash and log.
_DROP = """
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'b', 0) end
return 1
"""

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
"""URL schemes that name a Redis Cluster (any of its nodes) rather than one Redis."""


def cluster_url(url: str) -> str | None:
    """The ``redis://`` (``rediss://``) URL coredis's ``RedisCluster`` takes for a
    ``redis+cluster://`` (``rediss+cluster://``) ``url``; None for any other URL.
    ``ValueError`` if it names a database other than 0 (a cluster has no other) or no host.
    """
    if not url.startswith(CLUSTER_SCHEMES):
        return None
    plain = url.replace("+cluster://", "://", 1)
    parts = urllib.parse.urlsplit(plain)
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has database 0 only: no other in its URL")
    if not parts.hostname:
        raise ValueError("a Redis Cluster URL names a node: redis+cluster://host:port")
    return plain


MAX_PUBLISHES_PER_CALL = 100
"""Most publishes one round trip to Redis carries (those that arrived together)."""
LANE_LIMIT = 10_000
"""Entries of one topic that may wait for its slow subscribers on a relay; past it, the
relay skips that topic's entries (its subscribers get a gap when it moves on)."""
INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 5.0
_MAX_LOCAL_ONLY = 100_000
_CHUNK = 500
"""Topics per round trip when a relay subscribes to topics or reads their logs."""
_MAX_ACCOUNTED = 100_000
"""Topics whose log sizes a relay keeps track of (those it published to last)."""
_RECOVER_COUNT = 100_000
"""Most entries one read of a topic's log returns (its bounds keep it far smaller)."""


def _forget_waiters(pubsub: Any, channels: list[bytes]) -> list[bytes]:
    """Drop coredis's emptied lists of confirmation waiters of ``channels``; return the
    channels whose lists still wait (to try again with the next ones).

    coredis 6.9's ``PubSub`` keeps, in two private ``defaultdict(list)``s, a list per
    channel ever subscribed or unsubscribed, and never deletes one: about 200 bytes per
    distinct topic a relay ever held, for the life of the subscription's connection (2,000
    topics taken and left: 400 KiB more each time). A list still waiting (an UNSUBSCRIBE
    is waited for 0.1 s only: its confirmation may come later) stays until it is empty.
    The two are a dependency's private attributes, so they are looked up by name, and
    missing ones are skipped (nothing fails here if coredis changes them);
    tests/test_backplane_routing.py breaks if they change.
    """
    attributes = getattr(pubsub, "__dict__", {})
    lists = [attributes.get("_subscription_waiters"), attributes.get("_unsubscription_waiters")]
    waiting: list[bytes] = []
    for channel in dict.fromkeys(channels):
        still = False
        for waiters in lists:
            if not isinstance(waiters, dict):
                continue
            entry = waiters.get(channel)
            if entry:
                still = True
            elif entry is not None:
                del waiters[channel]
        if still:
            waiting.append(channel)
    return waiting


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_ms(identifier: bytes) -> int:
    """The milliseconds (Redis's clock) of a stream entry ID ``b"<ms>-<seq>"``."""
    return int(identifier.partition(b"-")[0])


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


# ------------------------------------------------------------- keys, entries, messages
# Sans-IO: the keys of a topic, what the publish script is given, and what a relay makes
# of a log entry or a channel message it reads.


def topic_keys(prefix: str, topic: str) -> tuple[str, str, str]:
    """The hash, log (stream) and channel of ``topic``: one hash tag (``{t:<topic>}``, never
    empty, even for the root topic ``""``), so one Redis Cluster slot."""
    tag = f"{prefix}:{{t:{topic}}}"
    return f"{tag}:n", f"{tag}:log", tag


def encode_values(payloads: list[bytes], texts: list[bool]) -> list[bytes]:
    """The script's message arguments: each payload after a byte saying t(ext) or b(inary)."""
    return [
        (b"t" if text else b"b") + payload for payload, text in zip(payloads, texts, strict=True)
    ]


@dataclass(frozen=True)
class Entry:
    """A batch of ``topic`` the publish script named from ``first_seq`` in ``epoch``,
    published by ``origin`` (``relay id:number``)."""

    topic: str
    epoch: str
    first_seq: int
    origin: str
    payloads: list[bytes]
    texts: list[bool]

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.payloads) - 1


def _entry(topic: str, epoch: bytes, first: bytes, origin: bytes, values: list[bytes]) -> Entry:
    """An :class:`Entry` of decoded parts, or ``ValueError`` saying what is wrong."""
    try:
        epoch_text = check_epoch(epoch.decode())
        first_seq = int(first)
        origin_text = origin.decode()
    except UnicodeDecodeError as exc:
        raise ValueError(str(exc)) from None
    if first_seq < 1 or not values:
        raise ValueError("no messages, or a number below 1")
    topic_from_path("/" + topic)  # a ValueError saying what is wrong with the name
    payloads: list[bytes] = []
    texts: list[bool] = []
    for value in values:
        kind, payload = value[:1], value[1:]
        if kind == b"t":
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("text that is not UTF-8") from None
        elif kind != b"b":
            raise ValueError(f"a value of unknown kind {kind!r}")
        payloads.append(payload)
        texts.append(kind == b"t")
    return Entry(topic, epoch_text, first_seq, origin_text, payloads, texts)


def decode_entry(topic: str, fields: dict[bytes, bytes]) -> Entry:
    """The :class:`Entry` of an entry of ``topic``'s log (fields ``e``, ``s``, ``o``, ``n``
    the payloads' size, then ``0``, ``1``, ...).

    Raises ``ValueError`` saying what is wrong with any other entry: a missing field, a bad
    epoch or number, a value of no known kind, text that is not UTF-8.
    """
    try:
        count = sum(1 for key in fields if key.isdigit())
        values = [fields[str(i).encode()] for i in range(count)]
        return _entry(topic, fields[b"e"], fields[b"s"], fields[b"o"], values)
    except KeyError as exc:
        raise ValueError(f"no field {exc}") from None


def encode_message(entry: Entry) -> bytes:
    """A channel message as the publish script writes it (for tests and tools)."""
    values = encode_values(entry.payloads, entry.texts)
    head = f"{entry.epoch} {entry.first_seq} {entry.origin} {len(values)}\n".encode()
    return head + b"".join(b"%d:%s" % (len(value), value) for value in values)


def decode_message(topic: str, data: bytes) -> Entry:
    """The :class:`Entry` of a message on ``topic``'s channel (see :data:`_PUBLISH`), or
    ``ValueError`` saying what is wrong with it."""
    head, newline, rest = data.partition(b"\n")
    parts = head.split(b" ")
    if not newline or len(parts) != 4:
        raise ValueError("not '<epoch> <first> <origin> <count>' and a newline")
    epoch, first, origin, count_text = parts
    try:
        count = int(count_text)
    except ValueError:
        raise ValueError(f"a count of {count_text!r}") from None
    values: list[bytes] = []
    position = 0
    for _ in range(count):
        colon = rest.find(b":", position, position + 12)
        if colon < 0:
            raise ValueError("a value without its length")
        try:
            length = int(rest[position:colon])
        except ValueError:
            raise ValueError("a value's length is not a number") from None
        end = colon + 1 + length
        if length < 0 or end > len(rest):
            raise ValueError("a value longer than the message")
        values.append(rest[colon + 1 : end])
        position = end
    if position != len(rest):
        raise ValueError("bytes after the last value")
    return _entry(topic, epoch, first, origin, values)


@dataclass(frozen=True)
class BackplaneStatistics:
    """A snapshot of a backplane: whether it is ``up``, and lifetime counts."""

    up: bool
    published: int
    """Batches this relay appended to a topic's log."""
    received: int
    """Batches that other relays published, received here (of the topics held here)."""
    local_only: int
    """Batches published while Redis was unreachable (or did not answer in time),
    delivered to local clients only, under a relay-local epoch."""
    reconnects: int
    """Times the relay reconnected after losing Redis."""
    conflicts: int
    """Entries skipped because this relay had their names already (a Redis that went
    back to an older snapshot, before any relay noticed)."""
    epochs: int = 0
    """Topics this relay started a fresh epoch of on reconnecting, Redis having gone back."""
    dropped: int = 0
    """Entries not delivered here because :data:`LANE_LIMIT` entries of their topic were
    already waiting for its slow subscribers (they get a gap)."""
    routes: int = 0
    """Topics this relay holds, so receives (subscribed to their channels)."""
    recoveries: int = 0
    """Reads of a topic's log to catch up (a topic held anew, a reconnect, a skip seen)."""


class _Pending:
    """An own publish that the script appended, on its way back through the topic's
    channel to this relay's reader, which delivers it with its source and echo."""

    __slots__ = ("delivered", "echo", "key", "name", "payloads", "report", "source", "texts")

    def __init__(
        self,
        name: str,
        payloads: list[bytes],
        texts: list[bool],
        source: object,
        echo: bool,
        key: str | None = None,
    ) -> None:
        self.key = key
        self.name = name
        self.payloads = payloads
        self.texts = texts
        self.source = source
        self.echo = echo
        self.delivered = trio.Event()
        self.report: DeliveryReport | None = None


class _Outgoing:
    """A publish on its way to Redis: its topic, its idempotency key's Redis key (if any)
    and its arguments in the publish script's call, and, once :attr:`done`, the script's
    answer or the call's error."""

    __slots__ = ("answer", "args", "done", "error", "key", "topic")

    def __init__(self, topic: str, key: str | None, args: list[object]) -> None:
        self.topic = topic
        self.key = key
        self.args = args
        self.done = trio.Event()
        self.answer: Any = None
        self.error: BaseException | None = None


class _Delivery:
    """A log entry on its way to the local topics, with what the reader knows of it."""

    __slots__ = ("echo", "entry", "fill", "pending", "source")

    def __init__(self, entry: Entry, pending: _Pending | None, fill: bool) -> None:
        self.entry = entry
        self.pending = pending
        self.fill = fill
        self.source, self.echo = (pending.source, pending.echo) if pending else (None, True)

    @property
    def arguments(self) -> tuple[str, str, int, list[bytes], list[bool]]:
        entry = self.entry
        return entry.topic, entry.epoch, entry.first_seq, entry.payloads, entry.texts


class _Route:
    """A topic this relay holds: its channel, and how far it has had the shared numbering
    (``epoch``, ``seq``: the last entry delivered or filled from Redis)."""

    __slots__ = (
        "answer",
        "buffer",
        "channel",
        "epoch",
        "hash_key",
        "log_key",
        "marked",
        "marker",
        "name",
        "recovering",
        "seq",
        "subscribed",
        "synced",
        "wake",
    )

    def __init__(self, name: str, prefix: str, epoch: str | None, seq: int) -> None:
        self.name = name
        self.hash_key, self.log_key, channel = topic_keys(prefix, name)
        self.channel = channel.encode()
        self.epoch = epoch
        self.seq = seq
        self.synced = False  # its log was read once since it was routed: it is live here
        self.subscribed = False  # in the current subscription
        self.recovering = False  # its log is being read: channel messages wait in buffer
        self.buffer: list[Entry] = []
        self.marker = b""  # the marker of the read in progress ("sync <relay>:<n>")
        self.marked = False  # that marker came on the channel
        self.answer: Any = None  # what the read found, once it answered
        self.wake = trio.Event()  # set once synced (or no longer held)

    def reset(self) -> None:
        """Forget a read of the log in progress (a new subscription starts another)."""
        self.recovering = self.marked = False
        self.buffer, self.marker, self.answer = [], b"", None

    def has(self, entry: Entry) -> bool:
        """Whether this relay had every number of ``entry`` already (from Redis)."""
        return entry.epoch == self.epoch and entry.last_seq <= self.seq

    def follows(self, entry: Entry) -> bool:
        """Whether ``entry`` goes on from what this relay had: no number skipped."""
        if entry.epoch == self.epoch:
            return entry.first_seq <= self.seq + 1
        return entry.first_seq == 1

    def advance(self, entry: Entry) -> None:
        if entry.epoch != self.epoch or entry.last_seq > self.seq:
            self.epoch, self.seq = entry.epoch, entry.last_seq


class RedisBackplane:
    """Shares the topics of relay processes through the Redis at ``url``.

    ``url`` is ``redis://host:port/db`` (``rediss://`` for TLS), or, for a Redis Cluster,
    ``redis+cluster://host:port`` naming any of its nodes (``rediss+cluster://`` for TLS;
    the relay discovers the others; see the module's docstring). ``prefix`` namespaces the
    keys, so relays that use another prefix share nothing (it may not contain ``{`` or
    ``}``: the keys are hash-tagged by topic). Each topic's log in Redis holds at most
    ``log_size`` entries, ``log_bytes`` bytes of payload and entries of ``log_age``
    seconds (by default the relay's ``history_size``, ``history_bytes`` and
    ``history_age``: what a relay could retain of it), trimmed as publishes append; the
    logs of the topics this relay published to hold ``log_total_bytes`` together at most
    (by default the relay's ``history_total_bytes``: past it, the logs of those it
    published to longest ago are dropped, their numbering kept), so that the number of
    topics does not multiply what Redis holds; and a topic's keys expire ``topic_ttl``
    seconds after its last publish (then a publish starts a fresh epoch; idempotency keys
    live ``idempotency_window`` seconds).
    ``timeout`` bounds every Redis command (seconds); every ``block`` seconds the relay
    checks that Redis and its subscription answer (a heartbeat; a dead Redis is noticed
    within ``block + timeout``).

    Give it to :func:`~trio_relay.serve_relay` (``backplane=``) or set
    ``RelayConfig(backplane=url)``; the relay runs it (:meth:`run`) in its own nursery.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "trio-relay",
        log_size: int | None = None,
        timeout: float = 2.0,
        block: float = 1.0,
        topic_ttl: float = 86_400.0,
        log_bytes: int | None = None,
        log_age: float | None = None,
        log_total_bytes: int | None = None,
    ) -> None:
        try:
            import coredis  # an optional dependency: fail early and clearly
        except ImportError as exc:  # pragma: no cover - the test extra installs it
            raise RuntimeError(
                "the Redis backplane needs coredis: pip install 'trio-relay[redis]'"
            ) from exc
        if "{" in prefix or "}" in prefix:
            raise ValueError("the backplane prefix may not contain '{' or '}'")
        import anyio

        self._failures = (
            OSError,
            trio.TooSlowError,
            coredis.exceptions.RedisError,
            # coredis's PubSub, when its connection is gone (or closed by a cancellation
            # that ends it too: tests/test_backplane.py stops relays mid-subscription).
            anyio.ClosedResourceError,
            anyio.BrokenResourceError,
        )
        """What a Redis command may raise when Redis is unreachable, slow or in trouble."""
        self.url = url
        """The Redis URL, password included: log :attr:`shown_url` instead."""
        self._cluster_url = cluster_url(url)
        self.cluster = self._cluster_url is not None
        """Whether ``url`` names a Redis Cluster (``redis+cluster://``)."""
        self.shown_url = shown(url)
        """The URL without its password (``redis://:<redacted>@host``), for logs and pages."""
        self.prefix = prefix
        self.log_size = log_size
        """Entries each topic's log holds at most (None: the relay's ``history_size``)."""
        self.timeout = timeout
        self.block = block
        self.topic_ttl = topic_ttl
        self.log_bytes = log_bytes
        """Payload bytes each topic's log holds at most (None: ``history_bytes``)."""
        self.log_age = log_age
        """Seconds an entry stays in its topic's log at most (None: ``history_age``)."""
        self.log_total_bytes = log_total_bytes
        """Payload bytes the logs of the topics this relay published to hold together at
        most (None: ``history_total_bytes``): past it, the logs of those it published to
        longest ago are dropped (their numbering stays)."""
        self.relay_id = os.urandom(6).hex()
        """Tells this relay's own entries from those of other relays."""
        self.up = False
        self.local_epoch = new_epoch()
        """The epoch this relay numbers its own publishes in while it cannot reach Redis:
        fresh for each outage, never a shared epoch."""
        self._heartbeat_channel = f"{prefix}:relay:{self.relay_id}".encode()
        self._topics: Topics | None = None
        self._client: Any = None
        # What each heartbeat is published through: the client, or on a Redis Cluster, a
        # client of each primary node (each must carry it to the subscription).
        self._publishers: list[Any] = []
        self._cluster_nodes: list[Any] = []  # a Redis Cluster's nodes, as last discovered
        self._pubsub: Any = None
        self._shas: dict[str, Any] = {}
        self._scripts: dict[Any, str] = {}  # each loaded script's text, by its SHA
        self._numbers = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        # Own publishes delivered locally (Redis gave no answer in time) that may still be
        # shared: the reader only fills histories with them. Bounded, oldest first.
        self._local_only: OrderedDict[int, None] = OrderedDict()
        # Own publishes with echo off that the reader had not delivered when their
        # publishers stopped waiting (their reports said what the script named them): when
        # it does (read from the log once back), still not to their publishers. Their
        # sources only, bounded, oldest first.
        self._unechoed: OrderedDict[int, _Pending] = OrderedDict()
        self._clock_offset = 0.0  # Redis's clock (ms) minus trio's (ms), as last measured
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._outbox: list[_Outgoing] = []  # publishes ready to go, in order
        self._ready = trio.Event()
        # The topics held here, by name and by channel; those to subscribe to or leave,
        # and those whose logs must be read, by the current subscription's tasks.
        self._routes: dict[str, _Route] = {}
        self._by_channel: dict[bytes, _Route] = {}
        self._to_subscribe: dict[str, _Route] = {}
        self._to_unsubscribe: set[bytes] = set()
        self._to_recover: dict[str, _Route] = {}
        self._waiting: list[bytes] = []  # see _forget_waiters
        self._routing = trio.Event()
        self._recovering = trio.Event()
        self._heartbeat = 0  # the last heartbeat seen on the subscription
        self._heard = trio.Event()
        # Topics whose deliveries wait for a subscriber with no room, in order, each
        # drained by a task of its own (at most LANE_LIMIT entries; past it, dropped here).
        self._lanes: dict[str, deque[_Delivery]] = {}
        # The payload bytes of the logs of the topics this relay published to, as the
        # publish script last said, published to longest ago first; and their sum.
        self._log_sizes: OrderedDict[str, int] = OrderedDict()
        self._logged = 0
        self._dropped = 0
        self._published = self._received = self._local = self._reconnects = 0
        self._conflicts = self._epochs = self._recoveries = 0

    def statistics(self) -> BackplaneStatistics:
        return BackplaneStatistics(
            self.up,
            self._published,
            self._received,
            self._local,
            self._reconnects,
            self._conflicts,
            self._epochs,
            self._dropped,
            len(self._routes),
            self._recoveries,
        )

    async def wait_until_up(self, up: bool = True) -> None:
        """Wait until the backplane is up (or, with ``up=False``, down). Bound it yourself."""
        while self.up != up:
            await self._changed.wait()

    def _set_up(self, up: bool) -> None:
        if self.up != up:
            self.up = up
            if not up:
                self.local_epoch = new_epoch()  # a new outage: a numbering of its own
            self._changed.set()
            self._changed = trio.Event()

    # ------------------------------------------------------------------ routing

    def route(self, name: str) -> None:
        """Hold topic ``name`` here: subscribe to its channel and read its log (fill its
        history), soon; :meth:`routed` waits for that. Called by :class:`Topics` when it
        makes a topic; idempotent."""
        if name in self._routes:
            return
        epoch: str | None = None
        seq = 0
        if self._topics is not None:
            here, last = self._topics.position(name)
            if last:
                epoch, seq = here, last  # a topic forgotten here and made again
        route = _Route(name, self.prefix, epoch, seq)
        self._routes[name] = route
        self._by_channel[route.channel] = route
        self._to_unsubscribe.discard(route.channel)
        self._to_subscribe[name] = route
        self._routing.set()

    def unroute(self, name: str) -> None:
        """Stop holding topic ``name`` (:class:`Topics` forgot it): leave its channel."""
        route = self._routes.pop(name, None)
        if route is None:
            return
        del self._by_channel[route.channel]
        route.wake.set()
        self._to_recover.pop(name, None)
        if self._to_subscribe.pop(name, None) is None and route.subscribed:
            self._to_unsubscribe.add(route.channel)
            self._routing.set()

    def synced_position(self, name: str) -> tuple[str, int] | None:
        """The epoch and last number of topic ``name`` as this relay last had them from
        Redis (its log read, then its channel), once it receives the topic (see
        :meth:`routed`): ``("", 0)`` if Redis had no numbering of it; None before that."""
        route = self._routes.get(name)
        if route is None or not route.synced or not self.up:
            return None
        return route.epoch or "", route.seq

    async def routed(self, name: str) -> None:
        """Return once topic ``name`` (:meth:`route`) is live here: subscribed, its history
        filled from its log (across a reconnect, if the connection failed meanwhile);
        at once if Redis is unreachable now (then it is filled once Redis is back), and
        after ``timeout`` at most."""
        route = self._routes.get(name)
        if route is None or route.synced or not self.up:
            return
        with trio.move_on_after(self.timeout):
            await route.wake.wait()

    # ------------------------------------------------------------------ running

    async def run(
        self, topics: Topics, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Connect, subscribe to the topics held, and deliver what their channels and logs
        bring to ``topics`` until cancelled, reconnecting with backoff (0.1 s doubling to
        5 s).

        Reports started once the first connection succeeded or failed: a relay starts
        serving its local clients either way.
        """
        import coredis
        from coredis.retry import NoRetryPolicy

        self._topics = topics
        topics.backplane = self
        for name in topics.names():
            self.route(name)
        client: Any = None
        if not self.cluster:
            client = coredis.Redis.from_url(
                self.url,
                decode_responses=False,
                retry_policy=NoRetryPolicy(),
                # Bounds connecting, the subscription's connection included (entering
                # coredis's PubSub connects with no cancel scope of this module's around it).
                connect_timeout=self.timeout,
            )
            self._publishers = [client]
        # One client for the relay's lifetime (its pool runs tasks of its own); the scopes
        # cancelled below are all inside it. A Redis Cluster's client is per session.
        async with client or contextlib.nullcontext(), trio.open_nursery() as nursery:
            self._nursery = nursery
            self._client = client
            nursery.start_soon(self._send_outbox, topics)
            started = False
            backoff = INITIAL_BACKOFF
            failures = 0

            def connected() -> None:
                nonlocal started, failures, backoff
                if failures:
                    self._reconnects += 1
                    logger.info("backplane %s is back: sharing topics again", self.shown_url)
                else:
                    logger.info("backplane %s connected", self.shown_url)
                failures, backoff = 0, INITIAL_BACKOFF
                self._set_up(True)
                if not started:
                    task_status.started()
                    started = True

            while True:
                failure: BaseException
                try:
                    await self._session(connected)
                except self._failures as exc:
                    failure = exc
                except BaseExceptionGroup as group:
                    others = group.subgroup(
                        lambda exc: not isinstance(exc, (BaseExceptionGroup, *self._failures))
                    )
                    if others is not None:
                        # A cancellation (what failed as it tore things down goes with it),
                        # or a bug.
                        raise others from None
                    failure = _first_leaf(group)
                failures += 1
                if self.up or failures == 1:
                    logger.error(
                        "backplane %s unreachable (%s): serving local clients only, retrying",
                        self.shown_url,
                        shown(failure) or type(failure).__name__,
                    )
                self._set_up(False)
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _session(self, connected: Any) -> NoReturn:
        """One connection's life: measure Redis's clock, load the scripts, subscribe to
        every topic held and read their logs (delivering what was missed), then deliver
        their channels until something fails. On a Redis Cluster, first discover its nodes
        (a client of this session's own)."""
        if not self.cluster:
            await self._serve(connected)
        import coredis
        from coredis.connection import TCPLocation
        from coredis.retry import NoRetryPolicy

        assert self._cluster_url is not None
        parts = urllib.parse.urlsplit(self._cluster_url)
        # The URL's node first, then the others last seen: a reconnect finds the cluster
        # whichever node is gone (failed over, or replaced).
        seed = TCPLocation(parts.hostname or "", parts.port or 6379)
        startup = [seed, *(node for node in self._cluster_nodes if node != seed)]
        async with contextlib.AsyncExitStack() as stack:
            # Discovery (CLUSTER SLOTS from the URL's node) as the client is entered; each
            # connection and command bounded by `timeout` (a cancel scope cannot bound the
            # entering: the client's task group outlives it). The node given as a
            # TCPLocation: coredis 6.9's from_url gives a dict, deprecated (a warning).
            # Every node tried answers (CLUSTER SLOTS), or is skipped (refused, or silent
            # for `timeout`).
            client = coredis.RedisCluster.from_url(
                self._cluster_url,
                decode_responses=False,
                retry_policy=NoRetryPolicy(),
                connect_timeout=self.timeout,
                stream_timeout=self.timeout,
                startup_nodes=startup,
            )
            await stack.enter_async_context(client)
            self._cluster_nodes = [
                TCPLocation(node.host, node.port)
                for node in client.connection_pool.cluster_layout.nodes
            ]
            self._client = client
            stack.callback(setattr, self, "_client", None)
            self._publishers = [await stack.enter_async_context(node) for node in client.primaries]
            await self._serve(connected)

    async def _serve(self, connected: Any) -> NoReturn:
        """A session's work, once connected (see :meth:`_session`)."""
        from coredis.retry import NoRetryPolicy

        client = self._client
        with trio.fail_after(self.timeout):
            # Redis's clock (its stream IDs are its ms), read by a script: coredis 6.9's
            # time() drops the microseconds (tests/test_backplane.py pins the reading).
            # Three readings, the one with the shortest round trip kept: the first also
            # waits for the connection to be made (and for a busy machine), which the
            # estimate would take for Redis's clock being ahead.
            readings = []
            for _ in range(3):
                sent = trio.current_time()
                seconds, microseconds = await client.eval("return redis.call('TIME')", [], [])
                now_ms = int(seconds) * 1000 + int(microseconds) / 1000
                readings.append((trio.current_time() - sent, now_ms - sent * 1000))
        # Redis read its clock at `sent` or later: taking `sent` errs towards later
        # deadlines, so Redis never refuses a publish whose answer could still be waited for.
        self._clock_offset = min(readings)[1]
        with trio.fail_after(self.timeout):
            for name, script in (("publish", _PUBLISH), ("recover", _RECOVER), ("drop", _DROP)):
                # On a Redis Cluster, on every node.
                self._shas[name] = sha = await client.script_load(script)
                self._scripts[sha] = script
        pubsub = client.pubsub(
            retry_policy=NoRetryPolicy(),
            ignore_subscribe_messages=True,
            subscription_timeout=self.timeout,
        )
        # Entering coredis's PubSub connects and says HELLO, which nothing else bounds (a
        # Redis frozen there accepts the connection and never answers): a deadline over
        # the whole block, lifted once it is entered (the heartbeat bounds the rest).
        with trio.CancelScope(deadline=trio.current_time() + self.timeout) as entering:
            await self._subscribe(pubsub, connected, entering)
        raise trio.TooSlowError("no subscription within the backplane's timeout")

    async def _subscribe(self, pubsub: Any, connected: Any, entering: trio.CancelScope) -> NoReturn:
        """The subscription's life (see :meth:`_serve`)."""
        async with pubsub, trio.open_nursery() as session:
            entering.deadline = math.inf
            self._pubsub = pubsub
            self._waiting = []
            await pubsub.subscribe(self._heartbeat_channel)
            for route in self._routes.values():
                route.subscribed = False
                route.reset()
                self._to_subscribe[route.name] = route
            self._to_unsubscribe.clear()
            self._to_recover.clear()
            self._routing.set()
            session.start_soon(self._read, pubsub)
            session.start_soon(self._recover_routes)
            await self._update_subscriptions(pubsub)  # every topic held: subscribed
            connected()
            session.start_soon(self._send_heartbeats)
            while True:
                await self._routing.wait()
                await self._update_subscriptions(pubsub)

    async def _update_subscriptions(self, pubsub: Any) -> None:
        """Leave the channels of topics no longer held and subscribe to those of topics held
        anew, ``_CHUNK`` a command; the latter's logs are read once subscribed (so that
        nothing published between the two is missed)."""
        self._routing = trio.Event()
        if self._to_unsubscribe:
            channels = list(self._to_unsubscribe)
            self._to_unsubscribe.clear()
            for start in range(0, len(channels), _CHUNK):
                # A message of a topic no longer held is ignored: a confirmation that comes
                # late changes nothing (coredis waits 0.1 s for it, and only logs its absence).
                chunk = channels[start : start + _CHUNK]
                await pubsub.unsubscribe(*chunk)
                self._waiting = _forget_waiters(pubsub, [*chunk, *self._waiting])
        while self._to_subscribe:
            routes = list(itertools.islice(self._to_subscribe.values(), _CHUNK))
            for route in routes:
                del self._to_subscribe[route.name]
            chunk = [route.channel for route in routes]
            await pubsub.subscribe(*chunk)
            self._waiting = _forget_waiters(pubsub, [*chunk, *self._waiting])
            for route in routes:
                if self._routes.get(route.name) is route:
                    route.subscribed = True
                    self._start_recovery(route)
                elif route.name not in self._routes:
                    # Forgotten while its SUBSCRIBE was in flight (unroute found it neither
                    # to subscribe nor subscribed): leave the channel, or this relay would
                    # receive (and skip) all of a topic it does not hold. One held again
                    # meanwhile is subscribed again (in _to_subscribe): it stays.
                    self._to_unsubscribe.add(route.channel)
                    self._routing.set()

    def _start_recovery(self, route: _Route) -> None:
        """Read ``route``'s log (soon): its channel's messages wait meanwhile."""
        route.reset()
        route.recovering = True
        route.marker = b"sync %s:%d" % (self.relay_id.encode(), next(self._numbers))
        self._to_recover[route.name] = route
        self._recovering.set()

    async def _recover_routes(self) -> NoReturn:
        """Read the logs of the topics that need it, ``_CHUNK`` topics a round trip."""
        sha = self._shas["recover"]
        while True:
            await self._recovering.wait()
            self._recovering = trio.Event()
            while self._to_recover:
                routes = list(itertools.islice(self._to_recover.values(), _CHUNK))
                for route in routes:
                    del self._to_recover[route.name]
                calls = [
                    (
                        [route.hash_key, route.log_key],
                        [
                            route.epoch or "",
                            route.seq,
                            new_epoch(),
                            _RECOVER_COUNT,
                            route.channel,
                            route.marker,
                        ],
                    )
                    for route in routes
                ]
                answers = await self._call_many(sha, calls)
                for route, answer in zip(routes, answers, strict=True):
                    if self._routes.get(route.name) is route and route.recovering:
                        route.answer = answer
                        if route.marked:
                            self._recovered(route)

    def _marked(self, route: _Route, marker: bytes) -> None:
        """A read's marker came on ``route``'s channel: the messages published before the
        read are all here (in ``route.buffer``); the read's answer may be too."""
        if route.recovering and marker == route.marker:
            route.marked = True
            if route.answer is not None:
                self._recovered(route)

    async def _call_many(self, sha: Any, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run a loaded script once per ``(keys, args)``, all in one round trip, each call
        on one topic's keys (so each goes to that topic's Redis Cluster slot)."""
        client = self._client
        if client is None:  # a Redis Cluster's client, between sessions
            raise ConnectionError("not connected to the Redis Cluster")
        with trio.fail_after(self.timeout):
            if self.cluster:
                return await self._call_on_cluster(client, sha, calls)
            if len(calls) == 1:
                keys, args = calls[0]
                return [await client.evalsha(sha, keys=keys, args=args)]
            async with client.pipeline(transaction=False) as pipe:
                requests = [pipe.evalsha(sha, keys=keys, args=args) for keys, args in calls]
            return [await request for request in requests]

    async def _call_on_cluster(
        self, client: Any, sha: Any, calls: list[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """:meth:`_call_many` on a Redis Cluster: one pipeline (a round trip per node), its
        answers taken one by one, never retried as a whole (the calls that a node ran must
        not run twice). Calls that a node answered ``NOSCRIPT`` (restarted, its scripts
        gone) ran nowhere: they run again once the script is loaded on every node. Raises
        the first other error."""
        from coredis.exceptions import NoScriptError

        try:
            answers = await self._pipeline(client, sha, calls)
            missing = [i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
            if missing:
                logger.info("backplane: a Redis Cluster node lost the scripts: loading them")
                await client.script_load(self._scripts[sha])
                again = await self._pipeline(client, sha, [calls[i] for i in missing])
                for i, answer in zip(missing, again, strict=True):
                    answers[i] = answer
        except RuntimeError as exc:
            if client is self._client:
                raise
            # The session ended meanwhile (its client closed under this call): a failure.
            raise ConnectionError("the Redis Cluster session ended") from exc
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return answers

    async def _pipeline(
        self, client: Any, sha: Any, calls: list[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """Run ``calls`` in one cluster pipeline; each answer, or the error it got."""
        async with client.pipeline(transaction=False, raise_on_error=False) as pipe:
            requests = [pipe.evalsha(sha, keys=keys, args=args) for keys, args in calls]
        answers: list[Any] = []
        for request in requests:
            try:
                answers.append(await request)
            except self._failures as exc:
                answers.append(exc)
        return answers

    def _recovered(self, route: _Route) -> None:
        """Take what a read of ``route``'s log found: deliver what this relay had not had (or,
        the first time, fill the history with what was published before this relay
        subscribed), then what its channel brought meanwhile."""
        answer = route.answer
        self._recoveries += 1
        epoch, last, bumped, raw = _text(answer[0]), int(answer[1]), int(answer[2]), answer[3]
        if bumped:
            self._epochs += 1
            logger.warning(
                "backplane %s went back (an older snapshot?): topic %r starts a new epoch",
                self.shown_url,
                route.name,
            )
        fill = not route.synced
        # What came on the channel meanwhile was published after this relay subscribed:
        # it is delivered (below), never only filled, though the log holds it too.
        live = {(entry.epoch, entry.first_seq) for entry in route.buffer}
        assert self._topics is not None
        oldest_ms = (trio.current_time() - self._topics.history_age) * 1000 + self._clock_offset
        for identifier, fields in raw:
            try:
                entry = decode_entry(route.name, dict(zip(fields[::2], fields[1::2], strict=True)))
            except ValueError as exc:
                logger.error(
                    "topic %r: log entry %s skipped, not a relay's batch: %s",
                    route.name,
                    shown(_text(identifier)),
                    shown(exc),
                )
                continue
            if route.has(entry):
                continue
            if fill and (entry.epoch, entry.first_seq) in live:
                break
            route.advance(entry)
            if fill and _id_ms(identifier) < oldest_ms:
                continue  # older than any history keeps: had, not retained
            self._deliver(entry, fill=fill)
        buffered = route.buffer
        route.reset()
        if buffered and buffered[0].epoch == epoch:
            last = min(last, buffered[0].first_seq - 1)  # those come next, from the buffer
        if epoch and not bumped and (epoch != route.epoch or last > route.seq):
            # Numbers the log no longer holds (trimmed): they are a gap when the next comes.
            route.epoch, route.seq = epoch, last
        for entry in buffered:
            if not route.has(entry):
                route.advance(entry)
                self._deliver(entry)
        route.synced = True
        route.wake.set()

    async def _send_heartbeats(self) -> NoReturn:
        """Every ``block`` seconds, publish a heartbeat on this relay's own channel and wait
        for it on the subscription: a Redis that stopped answering (frozen, cut off), or a
        subscription that died silently, fails the session within ``timeout``. On a Redis
        Cluster, through each primary node in turn (all within ``timeout``): a node that
        died, or a cluster bus that stopped carrying its messages, fails it too."""
        number = 0
        while True:
            await trio.sleep(self.block)
            with trio.fail_after(self.timeout):
                for publisher in self._publishers:
                    number += 1
                    await publisher.publish(self._heartbeat_channel, str(number))
                    while self._heartbeat < number:
                        await self._heard.wait()

    async def _read(self, pubsub: Any) -> NoReturn:
        """Deliver the messages of the subscription, never waiting for a subscriber."""
        heartbeat = self._heartbeat_channel
        while True:
            message = await pubsub.get_message()
            if message is None:
                continue
            channel = message["channel"]
            if channel == heartbeat:
                self._heartbeat = int(message["data"])
                self._heard.set()
                self._heard = trio.Event()
                continue
            self._take(channel, message["data"])

    def _take(self, channel: bytes, data: bytes) -> None:
        """A message of a topic's channel: deliver it, or keep it for after the read of the
        topic's log that is in progress, or start one if numbers were skipped."""
        route = self._by_channel.get(channel)
        if route is None:
            return  # a topic no longer held here
        if data.startswith(b"sync "):
            self._marked(route, data)  # or another relay's
            return
        try:
            entry = decode_message(route.name, data)
        except ValueError as exc:
            logger.error(
                "topic %r: message skipped, not a relay's batch: %s", route.name, shown(exc)
            )
            return
        if route.recovering:
            route.buffer.append(entry)
            if len(route.buffer) > LANE_LIMIT:
                route.buffer.clear()  # the log holds them (or a gap will say so)
            return
        if route.has(entry):
            # Numbers this relay had from Redis already: a Redis that went back (a failover
            # to a replica that lagged) gave them again. Never delivered under a taken name.
            # Reading the log now makes Redis start a fresh epoch (it knows less of this one
            # than this relay saw), so that no further number is given twice.
            self._conflicts += 1
            logger.warning(
                "topic %r: epoch %s, seq %d named twice (a Redis that went back): skipped",
                route.name,
                entry.epoch,
                entry.first_seq,
            )
            self._start_recovery(route)
            return
        if not route.follows(entry):
            # Numbers this relay never got: read the log, deliver from there.
            self._start_recovery(route)
            route.buffer.append(entry)
            return
        route.advance(entry)
        self._deliver(entry)

    def _deliver(self, entry: Entry, *, fill: bool = False) -> None:
        """Deliver one entry to the local topics (``fill``: retain it only, see
        :meth:`Topics.deliver_numbered`), its publisher's report included if it is this
        relay's."""
        relay_id, _, number_text = entry.origin.partition(":")
        pending: _Pending | None = None
        if relay_id == self.relay_id:
            try:
                number = int(number_text)
            except ValueError:
                number = 0
            if number in self._local_only:
                del self._local_only[number]
                fill = True  # delivered here already, under the local epoch: retain only
            pending = self._pending.pop(number, None) or self._unechoed.pop(number, None)
        else:
            self._received += 1
        delivery = _Delivery(entry, pending, fill)
        lane = self._lanes.get(entry.topic)
        if lane is not None:
            # Deliveries of this topic wait for a subscriber with no room: in order, behind.
            if len(lane) < LANE_LIMIT:
                lane.append(delivery)
            else:
                self._dropped += 1  # the numbers skipped are a gap when the lane moves on
                self._finish(delivery, None, True)
            return
        topics = self._topics
        assert topics is not None
        try:
            report, new = topics.deliver_numbered_nowait(
                *delivery.arguments, source=delivery.source, echo=delivery.echo, fill=fill
            )
        except trio.WouldBlock:
            # A subscriber of this topic has no room: a task of the topic's own waits for
            # it, and the reader goes on with the others (it never waits for a subscriber).
            assert self._nursery is not None
            self._lanes[entry.topic] = deque([delivery])
            self._nursery.start_soon(self._drain_lane, entry.topic)
            return
        self._finish(delivery, report, new)

    async def _drain_lane(self, topic: str) -> None:
        """Deliver the queued entries of ``topic``, in order, waiting for its subscribers as
        a publish does (the ``evict`` policy bounds that wait); then end."""
        topics = self._topics
        assert topics is not None
        lane = self._lanes[topic]
        try:
            while lane:
                delivery = lane[0]
                report, new = await topics.deliver_numbered(
                    *delivery.arguments,
                    source=delivery.source,
                    echo=delivery.echo,
                    fill=delivery.fill,
                )
                lane.popleft()
                self._finish(delivery, report, new)
        finally:
            del self._lanes[topic]

    def _finish(self, delivery: _Delivery, report: DeliveryReport | None, new: bool) -> None:
        """An entry was delivered (``report``), or dropped (None): count it, and give the
        report to its publisher, if it was this relay's."""
        entry, pending = delivery.entry, delivery.pending
        if report is None:
            report = DeliveryReport(
                entry.topic,
                entry.first_seq,
                len(entry.payloads),
                0,
                0,
                0,
                True,
                epoch=entry.epoch,
                backplane=True,
            )
        if not new:
            self._conflicts += 1
            logger.warning(
                "topic %r: epoch %s, seq %d read again, or named twice (a Redis that went "
                "back): skipped",
                entry.topic,
                entry.epoch,
                entry.first_seq,
            )
        if pending is not None:
            pending.report = report
            pending.delivered.set()

    async def _send_outbox(self, topics: Topics) -> NoReturn:
        """Send the publishes that are ready, all of them in one round trip (at most
        :data:`MAX_PUBLISHES_PER_CALL`; one script call per topic), and again as soon as
        more are: publishes that arrive together go to Redis together, and each waits for
        none but those sent with it."""
        while True:
            await self._ready.wait()
            self._ready = trio.Event()
            while self._outbox:
                sending = self._outbox[:MAX_PUBLISHES_PER_CALL]
                del self._outbox[:MAX_PUBLISHES_PER_CALL]
                by_topic: dict[str, list[_Outgoing]] = {}
                for outgoing in sending:
                    by_topic.setdefault(outgoing.topic, []).append(outgoing)
                bounds: list[object] = [
                    self.log_size if self.log_size is not None else topics.history_size,
                    self.log_bytes if self.log_bytes is not None else topics.history_bytes,
                    int(1000 * (self.log_age if self.log_age is not None else topics.history_age)),
                    max(1, int(self.topic_ttl)),
                    max(1, int(topics.idempotency_window)),
                ]
                calls: list[tuple[list[str], list[Any]]] = []
                for name, group in by_topic.items():
                    route = self._routes.get(name)
                    hash_key, log_key, channel = topic_keys(self.prefix, name)
                    keys = [hash_key, log_key]
                    args: list[Any] = [*bounds, channel]
                    if route is not None and route.epoch is not None:
                        args += [route.epoch, route.seq, new_epoch()]
                    else:
                        args += ["", 0, new_epoch()]
                    for outgoing in group:
                        if outgoing.key is not None:
                            keys.append(outgoing.key)
                        args += outgoing.args
                    calls.append((keys, args))
                try:
                    answers = await self._call_many(self._shas["publish"], calls)
                    for group, answer in zip(by_topic.values(), answers, strict=True):
                        for outgoing, result in zip(group, answer, strict=True):
                            outgoing.answer = result
                except (*self._failures, KeyError) as exc:  # KeyError: never connected
                    for outgoing in sending:
                        outgoing.error = exc
                finally:
                    for outgoing in sending:
                        outgoing.done.set()

    async def _account(self, topics: Topics, name: str, size: int) -> None:
        """Topic ``name``'s log holds ``size`` payload bytes now: past the budget, drop the
        logs of the topics this relay published to longest ago (as its own histories lose
        their oldest messages first past ``history_total_bytes``), so that what one relay's
        clients publish holds a bounded part of Redis, whatever the number of topics. The
        publish that went past it waits for that (one more round trip); a drop that fails
        is left to expire (``topic_ttl``)."""
        sizes = self._log_sizes
        self._logged += size - sizes.pop(name, 0)
        sizes[name] = size
        budget = self.log_total_bytes
        if budget is None:
            budget = topics.history_total_bytes
        dropped: list[str] = []
        while (self._logged > budget or len(sizes) > _MAX_ACCOUNTED) and len(sizes) > 1:
            oldest, oldest_size = sizes.popitem(last=False)
            self._logged -= oldest_size
            dropped.append(oldest)
        for start in range(0, len(dropped), _CHUNK):
            calls: list[tuple[list[str], list[Any]]] = [
                (list(topic_keys(self.prefix, name)[:2]), [])
                for name in dropped[start : start + _CHUNK]
            ]
            try:
                await self._call_many(self._shas["drop"], calls)
            except (*self._failures, KeyError):
                logger.debug("backplane: %d topics' logs not dropped now", len(calls))

    async def position(self, topic: str) -> tuple[str, int] | None:
        """The epoch and last number of ``topic`` in Redis; None if Redis has none for it
        or cannot be asked now."""
        if not self.up or self._client is None:
            return None
        try:
            with trio.fail_after(self.timeout):
                hash_key = topic_keys(self.prefix, topic)[0]
                epoch, seq = await self._client.hmget(hash_key, ["e", "s"])
        except self._failures:
            return None
        if epoch is None:
            return None
        try:
            return check_epoch(epoch.decode()), int(seq or 0)
        except ValueError:
            return None

    # ------------------------------------------------------------------ publishing

    def _remember_local_only(self, number: int) -> None:
        self._local_only[number] = None
        while len(self._local_only) > _MAX_LOCAL_ONLY:
            self._local_only.popitem(last=False)

    async def _publish_locally(
        self, topics: Topics, item: _Pending, remote: bool | None
    ) -> DeliveryReport:
        self._local += 1
        report = await topics.publish_locally(
            item.name,
            item.payloads,
            item.texts,
            source=item.source,
            echo=item.echo,
            epoch=self.local_epoch,
            idempotency_key=item.key,
        )
        return dataclasses.replace(report, remote=remote)

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
        """Append a batch to the topic's log and return its report once this relay
        delivered it (it comes back on the topic's channel).

        While Redis is unreachable, deliver it here only, under this relay's local epoch
        (``remote=False``); if Redis gives no answer within ``timeout``, the same, with
        ``remote=None``: it may be shared after all (then every other relay delivers it,
        and this one retains it only). An ``idempotency_key`` is kept in Redis for
        ``topics.idempotency_window`` seconds (locally while Redis is unreachable)."""
        item = _Pending(name, payloads, texts, source, echo, idempotency_key)
        self.route(name)
        await self.routed(name)  # subscribed: this publish comes back to this relay
        if not self.up:
            return await self._publish_locally(topics, item, False)
        number = next(self._numbers)
        # Registered before the script runs: the reader may get the entry back before
        # this task hears the answer.
        self._pending[number] = item
        key = None
        if idempotency_key is not None:
            key = f"{topic_keys(self.prefix, name)[2]}:k:{idempotency_key}"
        # Redis refuses the script past half the time this relay waits for it: one that
        # ran late enough for the answer to miss the wait never appends (the other half
        # is the margin for the clock's estimate), so "no answer" almost always means
        # "not published", and a republish cannot make a second copy.
        deadline = (trio.current_time() + self.timeout / 2) * 1000 + self._clock_offset
        values = encode_values(payloads, texts)
        head = [len(values), 1 if key is not None else 0, f"{self.relay_id}:{number}"]
        outgoing = _Outgoing(name, key, [*head, int(deadline), *values])
        self._outbox.append(outgoing)
        self._ready.set()
        with trio.move_on_after(self.timeout):
            await outgoing.done.wait()
        if not outgoing.done.is_set() and outgoing in self._outbox:
            self._outbox.remove(outgoing)  # never sent: certainly not published
            del self._pending[number]
            return await self._publish_locally(topics, item, False)
        answer = outgoing.answer
        if answer is None:
            failure = outgoing.error or trio.TooSlowError()
            logger.warning(
                "backplane publish on %r got no answer (%s): delivered locally",
                name,
                shown(failure) or type(failure).__name__,
            )
            if self._pending.pop(number, None) is None:
                assert item.report is not None
                return item.report  # shared after all: the reader delivered it
            self._remember_local_only(number)
            return await self._publish_locally(topics, item, None)
        if _text(answer[2]) == "late":
            # Past its deadline when Redis ran it: refused there, so it is in no log.
            del self._pending[number]
            return await self._publish_locally(topics, item, False)
        if _text(answer[2]) == "duplicate":
            del self._pending[number]  # nothing appended: the first one's name
            return DeliveryReport(
                name,
                int(answer[1]),
                len(payloads),
                0,
                0,
                0,
                True,
                epoch=_text(answer[0]),
                backplane=True,
                duplicate=True,
            )
        self._published += 1
        await self._account(topics, name, int(answer[3]))
        # Delivered here by the reader, with this report; if the reader is down meanwhile
        # (it delivers the entry once back), the report says what the script named it.
        with trio.move_on_after(self.timeout):
            await item.delivered.wait()
        if item.report is not None:
            return item.report
        self._pending.pop(number, None)
        if not echo:
            self._unechoed[number] = _Pending(name, [], [], source, echo)
            while len(self._unechoed) > _MAX_LOCAL_ONLY:
                self._unechoed.popitem(last=False)
        return DeliveryReport(
            name,
            int(answer[1]),
            len(payloads),
            0,
            0,
            0,
            True,
            epoch=_text(answer[0]),
            backplane=True,
        )
