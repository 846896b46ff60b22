"""The Redis backplane: relay processes that share topics through one Redis.

Design (a choice the issue left open; see README "Scaling out"):

- One Redis **stream** is the log of every publish of every relay (``<prefix>:log``). A Lua
  script names a batch (its topic's epoch and next numbers, kept in the topic's hash
  ``<prefix>:t:<topic>``) and appends it to the log, atomically, so the log's order is
  every topic's numbering order.
- Every relay reads the whole log with ``XREAD`` from the last entry it has seen and
  delivers each entry to its local :class:`~trio_relay.Topics`, its own publishes included.
  So every relay delivers a topic's messages in the same order under the same names
  (epoch, sequence number), and its local history (for ``since=`` resume) is that of
  every relay.
- **Epochs.** A topic's numbering has an epoch, kept in Redis beside its counter. The
  script starts a fresh epoch (numbering from 1) whenever the numbering cannot simply go
  on: Redis has no record of the topic (new, expired, or lost with Redis's data), or it
  knows less of the numbering than the relay that publishes (Redis came back from an older
  snapshot). So an (epoch, seq) pair names one message, whatever Redis lost.
- **Loss is detected by data.** The log has an identity (``<prefix>:log-id``, set by the
  first publish to a log); a relay that reconnects to the same log goes on from its last
  entry (a restart with data or a failover repeats nothing and loses nothing), and one
  that finds another reads the new log from its start. On reconnecting, a relay also
  checks every topic it knows against Redis's counters and starts a fresh epoch where
  Redis went back.
- **Filling is not delivering.** A starting relay fills its histories from the log
  (``XRANGE`` over the history age) without delivering those messages to anyone: its
  subscribers get only what is read live after it.
- **Outages** (the contract, in README "Scaling out"): a relay that cannot reach Redis
  delivers its own publishes to its own subscribers under a relay-local epoch, fresh per
  outage (``remote=False``; ``None`` when a publish got no answer in time: it may or may
  not be in the log), and never numbers in a shared epoch alone. Each publish carries a
  deadline in Redis's time, past which the script refuses it, so one that timed out
  cannot reach the others much later. Back online, the relay reads what it missed; its
  topics switch back to the shared numbering with the next entry of each (subscribers get
  a reset).
- Why a stream, not pub/sub: a reader that loses its connection goes on from the last
  entry it saw, so nothing is lost across a short outage; a starting relay fills its
  histories from the log; ``XREAD COUNT`` bounds what one read brings in, where a pub/sub
  client buffers without bound; and there are no pub/sub contexts to leave.

coredis runs under trio through anyio. One client serves the relay's lifetime, opened
outside every scope that gets cancelled; its retries are off (a retried publish could be
appended twice) and every command is bounded by ``timeout``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
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

# Publishes a relay has ready together go to Redis in one call of this script.
# KEYS: the log, the log's identity, the log's size in bytes; then, per batch, its topic's
# hash (fields e: epoch, s: last number) and, if it has one, its idempotency key's.
# ARGV: the log's bounds in entries, bytes and age (ms), the topic hashes' time to live
# (s), a fresh log identity (taken if the log has none), the idempotency window (s); then,
# per batch: its number of values, 1 if it has an idempotency key (else 0), the
# publishing relay's epoch of the topic and last number in it, a fresh epoch (taken if the
# numbering cannot go on), the topic, the origin, the deadline (Redis time, ms; 0: none),
# then its values, each with a first byte t(ext) or b(inary).
# Returns, per batch: {epoch, first number, entry id}; {epoch, first number,
# "duplicate"} for a key used within the window (nothing appended); or {"", 0, "late"}
# past its deadline (refused). The log is trimmed here, oldest entries first, while it is
# over any bound (a few entries a batch at most, so each costs O(1)); the size key follows
# every entry's "n".
_PUBLISH = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('SET', KEYS[2], ARGV[5], 'NX')
local results = {}
local k, a = 4, 7
local bytes = nil
while a <= #ARGV do
  local count, keyed = tonumber(ARGV[a]), ARGV[a + 1] == '1'
  local deadline = tonumber(ARGV[a + 7])
  local first_value = a + 8
  local hash_key, idem_key = KEYS[k], nil
  if keyed then idem_key = KEYS[k + 1] end
  if keyed then k = k + 2 else k = k + 1 end
  local seen = nil
  if idem_key then seen = redis.call('GET', idem_key) end
  if deadline > 0 and now_ms > deadline then
    results[#results + 1] = {'', 0, 'late'}
  elseif seen then
    local seen_epoch, seen_first = string.match(seen, '^([^:]+):(%d+)$')
    results[#results + 1] = {seen_epoch, tonumber(seen_first), 'duplicate'}
  else
    local epoch = redis.call('HGET', hash_key, 'e')
    local last = tonumber(redis.call('HGET', hash_key, 's') or '0')
    if not epoch or (epoch == ARGV[a + 2] and last < tonumber(ARGV[a + 3])) then
      epoch = ARGV[a + 4]
      last = 0
    end
    local first = last + 1
    redis.call('HSET', hash_key, 'e', epoch, 's', last + count)
    redis.call('EXPIRE', hash_key, ARGV[4])
    local size = 0
    for i = first_value, first_value + count - 1 do
      size = size + #ARGV[i]
    end
    local fields = {'t', ARGV[a + 5], 'e', epoch, 's', first, 'o', ARGV[a + 6], 'n', size}
    for i = first_value, first_value + count - 1 do
      fields[#fields + 1] = tostring(i - first_value)
      fields[#fields + 1] = ARGV[i]
    end
    local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
    if idem_key then
      redis.call('SET', idem_key, epoch .. ':' .. first, 'EX', ARGV[6])
    end
    bytes = redis.call('INCRBY', KEYS[3], size)
    results[#results + 1] = {epoch, first, id}
  end
  a = first_value + count
end
if bytes then
  local length = redis.call('XLEN', KEYS[1])
  local max_length, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
  local oldest_ms = now_ms - tonumber(ARGV[3])
  for _ = 1, 8 * #results do
    if length <= 1 then break end
    local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
    local oldest_id = oldest[1]
    local ms = tonumber(string.match(oldest_id, '^(%d+)'))
    if length <= max_length and bytes <= max_bytes and ms >= oldest_ms then break end
    local entry_size = 0
    local entry = oldest[2]
    for j = 1, #entry, 2 do
      if entry[j] == 'n' then entry_size = tonumber(entry[j + 1]) end
    end
    redis.call('XDEL', KEYS[1], oldest_id)
    bytes = redis.call('DECRBY', KEYS[3], entry_size)
    length = length - 1
  end
end
return results
"""

# KEYS: topic hashes; ARGV: for each, an epoch and a last number a relay saw in it, then
# fresh epochs, one per key. Where Redis knows less of that epoch's numbering than the
# relay did (it came back from an older snapshot, or a replica that lagged), the topic
# starts a fresh epoch: its next numbers must not name messages some relay already has.
_CHECK = """
local n = #KEYS
local bumped = 0
for i = 1, n do
  local epoch = redis.call('HGET', KEYS[i], 'e')
  local last = tonumber(redis.call('HGET', KEYS[i], 's') or '0')
  if epoch == ARGV[2 * i - 1] and last < tonumber(ARGV[2 * i]) then
    redis.call('HSET', KEYS[i], 'e', ARGV[2 * n + i], 's', 0)
    bumped = bumped + 1
  end
end
return bumped
"""

MAX_PUBLISHES_PER_CALL = 100
"""Most publishes one script call carries (those that arrived together)."""
LANE_LIMIT = 10_000
"""Entries of one topic that may wait for its slow subscribers on a relay; past it, the
relay skips that topic's entries (its subscribers get a gap when it moves on)."""
INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 5.0
_MAX_LOCAL_ONLY = 100_000
_CHUNK = 500
"""Topics per script call when a reconnecting relay checks Redis's numbering."""


class _LogLost(OSError):
    """The log the reader reads is not Redis's log any more (Redis lost its data)."""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_key(identifier: bytes) -> tuple[int, int]:
    """A stream entry ID (``b"<ms>-<seq>"``) as a tuple that orders as the log does."""
    ms, _, seq = identifier.partition(b"-")
    return int(ms), int(seq or 0)


# ---------------------------------------------------------------------- the log's entries
# Sans-IO: what the publish script is given, and what a relay makes of an entry it reads.


def encode_values(payloads: list[bytes], texts: list[bool]) -> list[bytes]:
    """The script's message arguments: each payload after a byte saying t(ext) or b(inary)."""
    return [
        (b"t" if text else b"b") + payload for payload, text in zip(payloads, texts, strict=True)
    ]


@dataclass(frozen=True)
class Entry:
    """A log entry the publish script wrote: a batch of ``topic`` named from ``first_seq``
    in ``epoch``, published by ``origin`` (``relay id:number``)."""

    topic: str
    epoch: str
    first_seq: int
    origin: str
    payloads: list[bytes]
    texts: list[bool]


def decode_entry(fields: dict[bytes, bytes]) -> Entry:
    """The :class:`Entry` of a log entry's fields (``t``, ``e``, ``s``, ``o``, ``n`` the
    payloads' size, then ``0``, ``1``, ...).

    Raises ``ValueError`` saying what is wrong with any other entry: a missing field, a bad
    topic name, epoch or number, a value of no known kind, text that is not UTF-8.
    """
    try:
        name = fields[b"t"].decode()
        epoch = check_epoch(fields[b"e"].decode())
        first_seq = int(fields[b"s"])
        origin = fields[b"o"].decode()
        count = sum(1 for key in fields if key.isdigit())
        values = [fields[str(i).encode()] for i in range(count)]
    except KeyError as exc:
        raise ValueError(f"no field {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(str(exc)) from None
    if first_seq < 1 or not values:
        raise ValueError("no messages, or a number below 1")
    topic_from_path("/" + name)  # a ValueError saying what is wrong with the name
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
    return Entry(name, epoch, first_seq, origin, payloads, texts)


@dataclass(frozen=True)
class BackplaneStatistics:
    """A snapshot of a backplane: whether it is ``up``, and lifetime counts."""

    up: bool
    published: int
    """Batches this relay appended to the log."""
    received: int
    """Batches read from the log that other relays published."""
    local_only: int
    """Batches published while Redis was unreachable (or did not answer in time),
    delivered to local clients only, under a relay-local epoch."""
    reconnects: int
    """Times the reader reconnected after losing Redis."""
    conflicts: int
    """Entries of the log skipped because this relay had their names already (a Redis
    that went back to an older snapshot, before any relay noticed)."""
    epochs: int = 0
    """Topics this relay started a fresh epoch of on reconnecting, Redis having gone back."""
    dropped: int = 0
    """Entries not delivered here because :data:`LANE_LIMIT` entries of their topic were
    already waiting for its slow subscribers (they get a gap)."""


class _Pending:
    """An own publish that the script appended, on its way through the log to this relay's
    reader, which delivers it with its source and echo."""

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
    """A publish on its way to Redis: its keys and arguments in the publish script's call,
    and, once :attr:`done`, the script's answer or the call's error."""

    __slots__ = ("answer", "args", "done", "error", "keys")

    def __init__(self, keys: list[str], args: list[object]) -> None:
        self.keys = keys
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


class RedisBackplane:
    """Shares the topics of relay processes through the Redis at ``url``.

    ``url`` is ``redis://host:port/db`` (``rediss://`` for TLS). ``prefix`` namespaces the
    keys, so relays that use another prefix share nothing; the log holds at most
    ``log_size`` entries, ``log_bytes`` bytes of payload and entries of ``log_age``
    seconds (by default the relay's ``history_total_bytes`` and ``history_age``: what a
    relay could retain of it), trimmed as publishes append; ``timeout`` bounds every
    Redis command (seconds); ``block`` is how long one ``XREAD`` waits for new entries
    (seconds); ``topic_ttl`` is how long a topic's numbering outlives its last publish in
    Redis (seconds; then a publish starts a fresh epoch; idempotency keys live
    ``idempotency_window`` seconds).

    Give it to :func:`~trio_relay.serve_relay` (``backplane=``) or set
    ``RelayConfig(backplane=url)``; the relay runs it (:meth:`run`) in its own nursery.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "trio-relay",
        log_size: int = 100_000,
        timeout: float = 2.0,
        block: float = 1.0,
        topic_ttl: float = 86_400.0,
        log_bytes: int | None = None,
        log_age: float | None = None,
    ) -> None:
        try:
            import coredis  # an optional dependency: fail early and clearly
        except ImportError as exc:  # pragma: no cover - the test extra installs it
            raise RuntimeError(
                "the Redis backplane needs coredis: pip install 'trio-relay[redis]'"
            ) from exc
        self._failures = (OSError, trio.TooSlowError, coredis.exceptions.RedisError)
        """What a Redis command may raise when Redis is unreachable, slow or in trouble."""
        self.url = url
        """The Redis URL, password included: log :attr:`shown_url` instead."""
        self.shown_url = shown(url)
        """The URL without its password (``redis://:<redacted>@host``), for logs and pages."""
        self.prefix = prefix
        self.log_size = log_size
        self.timeout = timeout
        self.block = block
        self.topic_ttl = topic_ttl
        self.log_bytes = log_bytes
        """Payload bytes the log holds at most (None: the relay's ``history_total_bytes``)."""
        self.log_age = log_age
        """Seconds an entry stays in the log at most (None: the relay's ``history_age``)."""
        self.relay_id = os.urandom(6).hex()
        """Tells this relay's own entries in the log from those of other relays."""
        self.up = False
        self.local_epoch = new_epoch()
        """The epoch this relay numbers its own publishes in while it cannot reach Redis:
        fresh for each outage, never a shared epoch."""
        self._log_key = f"{prefix}:log"
        self._log_id_key = f"{prefix}:log-id"
        self._log_bytes_key = f"{prefix}:log-bytes"
        self._topics: Topics | None = None
        self._client: Any = None
        self._publish_script: Any = None
        self._check_script: Any = None
        self._time_script: Any = None
        self._numbers = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        # Own publishes delivered locally (Redis gave no answer in time) that may still be
        # in the log: the reader only fills histories with them. Bounded, oldest first.
        self._local_only: OrderedDict[int, None] = OrderedDict()
        self._last_id = b"0-0"
        self._log_id: bytes | None = None
        self._clock_offset = 0.0  # Redis's clock (ms) minus trio's (ms), as last measured
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._outbox: list[_Outgoing] = []  # publishes ready to go, in order
        self._ready = trio.Event()
        # Topics whose deliveries wait for a subscriber with no room, in log order, each
        # drained by a task of its own (at most LANE_LIMIT entries; past it, dropped here).
        self._lanes: dict[str, deque[_Delivery]] = {}
        self._dropped = 0
        self._published = self._received = self._local = self._reconnects = 0
        self._conflicts = self._epochs = 0

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

    def _topic_key(self, topic: str) -> str:
        return f"{self.prefix}:t:{topic}"

    # ------------------------------------------------------------------ running

    async def run(
        self, topics: Topics, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Connect, fill the topics' histories from the log, and deliver the log to
        ``topics`` until cancelled, reconnecting with backoff (0.1 s doubling to 5 s).

        Reports started once the first connection succeeded or failed: a relay starts
        serving its local clients either way.
        """
        import coredis
        from coredis.retry import NoRetryPolicy

        self._topics = topics
        topics.backplane = self
        client = coredis.Redis.from_url(
            self.url, decode_responses=False, retry_policy=NoRetryPolicy()
        )
        # One client for the relay's lifetime (its pool runs tasks of its own); the scopes
        # cancelled below are all inside it.
        async with client, trio.open_nursery() as nursery:
            self._nursery = nursery
            self._client = client
            nursery.start_soon(self._send_outbox, topics)
            self._publish_script = client.register_script(_PUBLISH)
            self._check_script = client.register_script(_CHECK)
            self._time_script = client.register_script("return redis.call('TIME')")
            started = False
            backoff = INITIAL_BACKOFF
            failures = 0
            while True:
                try:
                    await self._connect()
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
                    await self._read_forever()
                except self._failures as exc:
                    failures += 1
                    if self.up or failures == 1:
                        logger.error(
                            "backplane %s unreachable (%s): serving local clients only, retrying",
                            self.shown_url,
                            shown(exc) or type(exc).__name__,
                        )
                    self._set_up(False)
                    if not started:
                        task_status.started()
                        started = True
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)

    async def _connect(self) -> None:
        """Check Redis, find where to read the log from, and check Redis's numbering of
        every topic this relay knows against its own."""
        from coredis.tokens import PureToken

        client = self._client
        topics = self._topics
        assert topics is not None
        with trio.fail_after(self.timeout):
            sent = trio.current_time()
            # Redis's clock (the log's IDs are its ms), read by a script: coredis 6.9's
            # time() drops the microseconds (tests/test_backplane.py pins the reading).
            seconds, microseconds = await self._time_script(keys=[], args=[])
        now_ms = int(seconds) * 1000 + int(microseconds) / 1000
        # Redis read its clock at `sent` or later: taking `sent` errs towards later
        # deadlines, so Redis never refuses a publish whose answer could still be waited for.
        self._clock_offset = now_ms - sent * 1000
        with trio.fail_after(self.timeout):
            await client.set(self._log_id_key, new_epoch().encode(), condition=PureToken.NX)
            log_id = await client.get(self._log_id_key)
        if self._log_id is None:
            # First connection: fill the histories from the log's last history_age seconds
            # (or go on from where an interrupted fill got: nothing is delivered twice).
            if self._last_id == b"0-0":
                start_ms = int(now_ms) - int(topics.history_age * 1000)
                self._last_id = f"{max(start_ms, 0)}-0".encode()
            await self._backfill()
        elif log_id != self._log_id:
            # Not the log this relay read: Redis lost its data (or another took its place).
            # Everything in the new one is new here: read it from its start.
            logger.warning(
                "backplane %s has a new log (its data was lost): reading it from the start",
                self.shown_url,
            )
            self._last_id = b"0-0"
            self._local_only.clear()
            self._pending.clear()  # their entries went with the old log
        else:
            # The same log (a reconnect, a restart with data, a failover): go on from the
            # last entry read, or from the log's end if it went back (an older snapshot).
            with trio.fail_after(self.timeout):
                newest = await client.xrevrange(self._log_key, count=1)
            if newest and _id_key(newest[0].identifier) < _id_key(self._last_id):
                self._last_id = newest[0].identifier
        self._log_id = log_id
        await self._check_numbering()

    async def _check_numbering(self) -> None:
        """Where Redis knows less of a topic's numbering than this relay saw (it came back
        from an older snapshot), start a fresh epoch of it, so that no number is given
        twice."""
        topics = self._topics
        assert topics is not None
        positions = list(topics.positions().items())
        for start in range(0, len(positions), _CHUNK):
            chunk = positions[start : start + _CHUNK]
            args: list[str | int] = []
            for _, (epoch, seq) in chunk:
                args += (epoch, seq)
            args += [new_epoch() for _ in chunk]
            with trio.fail_after(self.timeout):
                bumped = await self._check_script(
                    keys=[self._topic_key(name) for name, _ in chunk], args=args
                )
            if bumped:
                self._epochs += int(bumped)
                logger.warning(
                    "backplane %s went back (an older snapshot?): %d topics start a new epoch",
                    self.shown_url,
                    bumped,
                )

    async def _backfill(self) -> None:
        """Fill the histories with the log's retained entries after ``_last_id``, without
        delivering them to anyone."""
        client = self._client
        while True:
            with trio.fail_after(self.timeout):
                entries = await client.xrange(self._log_key, b"(" + self._last_id, b"+", count=1000)
            if not entries:
                return
            for entry in entries:
                await self._deliver(entry.identifier, entry.field_values, fill=True)

    async def _read_forever(self) -> NoReturn:
        client = self._client
        block_ms = int(self.block * 1000)
        while True:
            with trio.fail_after(self.block + self.timeout):
                reply = await client.xread(
                    {self._log_key: self._last_id}, count=1000, block=block_ms
                )
            if not reply:
                # Idle: check the log is still the one read (a Redis that lost its data
                # behind a reconnect the reader did not see).
                with trio.fail_after(self.timeout):
                    log_id = await client.get(self._log_id_key)
                if log_id is not None and log_id != self._log_id:
                    raise _LogLost("the log was replaced: Redis lost its data")
                continue
            for entries in reply.values():
                for entry in entries:
                    await self._deliver(entry.identifier, entry.field_values)

    async def _deliver(
        self, identifier: bytes, fields: dict[bytes, bytes], *, fill: bool = False
    ) -> None:
        """Deliver one log entry to the local topics (or skip it, logged, if it is not one
        a relay wrote: someone else's XADD must not stop the relay). ``fill``: retain it
        only (see :meth:`Topics.deliver_numbered`)."""
        self._last_id = identifier
        topics = self._topics
        assert topics is not None
        try:
            entry = decode_entry(fields)
        except ValueError as exc:
            logger.error(
                "backplane log entry %s skipped, not a relay's batch: %s", identifier, shown(exc)
            )
            return
        relay_id, _, number_text = entry.origin.partition(":")
        pending: _Pending | None = None
        if relay_id == self.relay_id:
            number = int(number_text)
            if number in self._local_only:
                del self._local_only[number]
                fill = True  # delivered here already, under the local epoch: retain only
            pending = self._pending.pop(number, None)
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
                "topic %r: epoch %s, seq %d read from the log again, or named twice (a Redis "
                "that went back): skipped",
                entry.topic,
                entry.epoch,
                entry.first_seq,
            )
        if pending is not None:
            pending.report = report
            pending.delivered.set()

    async def _send_outbox(self, topics: Topics) -> NoReturn:
        """Send the publishes that are ready, all of them in one script call (at most
        :data:`MAX_PUBLISHES_PER_CALL`), and again as soon as more are: publishes that
        arrive together go to Redis together (one round trip), and each waits for none
        but those sent with it."""
        while True:
            await self._ready.wait()
            self._ready = trio.Event()
            while self._outbox:
                sending = self._outbox[:MAX_PUBLISHES_PER_CALL]
                del self._outbox[:MAX_PUBLISHES_PER_CALL]
                keys = [self._log_key, self._log_id_key, self._log_bytes_key]
                args: list[object] = [
                    self.log_size,
                    self.log_bytes if self.log_bytes is not None else topics.history_total_bytes,
                    int(1000 * (self.log_age if self.log_age is not None else topics.history_age)),
                    max(1, int(self.topic_ttl)),
                    new_epoch(),
                    max(1, int(topics.idempotency_window)),
                ]
                for outgoing in sending:
                    keys += outgoing.keys
                    args += outgoing.args
                try:
                    with trio.fail_after(self.timeout):
                        answers = await self._publish_script(keys=keys, args=args)
                    for outgoing, answer in zip(sending, answers, strict=True):
                        outgoing.answer = answer
                except self._failures as exc:
                    for outgoing in sending:
                        outgoing.error = exc
                finally:
                    for outgoing in sending:
                        outgoing.done.set()

    async def position(self, topic: str) -> tuple[str, int] | None:
        """The epoch and last number of ``topic`` in Redis; None if Redis has none for it
        or cannot be asked now."""
        if not self.up:
            return None
        try:
            with trio.fail_after(self.timeout):
                epoch, seq = await self._client.hmget(self._topic_key(topic), ["e", "s"])
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
        """Append a batch to the log and return its report once this relay delivered it.

        While Redis is unreachable, deliver it here only, under this relay's local epoch
        (``remote=False``); if Redis gives no answer within ``timeout``, the same, with
        ``remote=None``: it may be in the log after all (then every other relay delivers
        it, and this one retains it only). An ``idempotency_key`` is kept in Redis for
        ``topics.idempotency_window`` seconds (locally while Redis is unreachable)."""
        item = _Pending(name, payloads, texts, source, echo, idempotency_key)
        if not self.up:
            return await self._publish_locally(topics, item, False)
        number = next(self._numbers)
        # Registered before the script runs: the reader may read the entry back before
        # this task hears the answer.
        self._pending[number] = item
        epoch, last = topics.position(name)
        keys = [self._topic_key(name)]
        if idempotency_key is not None:
            keys.append(f"{self.prefix}:k:{name}:{idempotency_key}")
        # Redis refuses the script past half the time this relay waits for it: one that
        # ran late enough for the answer to miss the wait never appends (the other half
        # is the margin for the clock's estimate), so "no answer" almost always means
        # "not published", and a republish cannot make a second copy.
        deadline = (trio.current_time() + self.timeout / 2) * 1000 + self._clock_offset
        values = encode_values(payloads, texts)
        head = [len(values), 1 if idempotency_key is not None else 0, epoch, last, new_epoch()]
        outgoing = _Outgoing(keys, [*head, name, f"{self.relay_id}:{number}", int(deadline)])
        outgoing.args += values
        self._outbox.append(outgoing)
        self._ready.set()
        failure: BaseException | None = None
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
                return item.report  # in the log after all: the reader delivered it
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
        # Delivered here by the reader, with this report; if the reader is down meanwhile
        # (it delivers the entry once back), the report says what the script named it.
        with trio.move_on_after(self.timeout):
            await item.delivered.wait()
        if item.report is not None:
            return item.report
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
