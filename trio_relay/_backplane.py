"""The Redis backplane: relay processes that share topics through one Redis.

Design (a choice the issue left open; see README "Scaling out"):

- One Redis **stream** is the log of every publish of every relay (``<prefix>:log``). A Lua
  script numbers a batch with ``INCRBY <prefix>:seq:<topic>`` and appends it to the log
  with ``XADD``, atomically, so the log's order is the topic's numbering order.
- Every relay reads the whole log with ``XREAD`` from the last entry it has seen and
  delivers each entry to its local :class:`~trio_relay.Topics`, its own publishes included.
  So every relay delivers a topic's messages in the same order with the same sequence
  numbers, and its local history (for ``since=`` resume) is that of every relay.
- Why a stream, not pub/sub: a reader that loses its connection goes on from the last
  entry it saw, so nothing is lost across a short outage; a starting relay fills its
  histories from the log (``XRANGE`` over the history age), so a consumer can resume on a
  relay other than the one it left; ``XREAD COUNT`` bounds what one read brings in, where a
  pub/sub client buffers without bound; and there are no pub/sub contexts to leave.
- When Redis is unreachable the relay goes on alone: publishes are delivered locally and
  numbered on locally, the delivery report says ``remote=False``, logs, ``/healthz`` and
  metrics say the backplane is down, and the reader reconnects with backoff. Back
  online, it raises Redis's counters to its own (so numbers never go back), reads what it
  missed, and shares again. Messages published alone during the outage stay local; if two
  relays numbered the same topic alone, the later one renumbers (counted as a conflict).

coredis runs under trio through anyio. One client serves the relay's lifetime, opened
outside every scope that gets cancelled; its retries are off (a retried publish could be
appended twice) and every command is bounded by ``timeout``.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from ._redact import shown
from ._topics import topic_from_path

if TYPE_CHECKING:
    from ._topics import DeliveryReport, Topics

__all__ = ["BackplaneStatistics", "RedisBackplane"]

logger = logging.getLogger("trio_relay")

# KEYS: the topic's counter, the log. ARGV: floor (the publishing relay's last number of
# the topic: numbering never goes back below what it has seen), the topic, the origin,
# the maximum log length, then one value per message, its first byte t(ext) or b(inary).
_PUBLISH = """
local count = #ARGV - 4
local last = redis.call('INCRBY', KEYS[1], count)
local floor = tonumber(ARGV[1])
if last - count < floor then
  last = floor + count
  redis.call('SET', KEYS[1], last)
end
local fields = {'t', ARGV[2], 's', last - count + 1, 'o', ARGV[3]}
for i = 5, #ARGV do
  fields[#fields + 1] = tostring(i - 5)
  fields[#fields + 1] = ARGV[i]
end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
"""

# KEYS: topic counters; ARGV: the same number of floors. Raises each counter to its floor.
_RAISE = """
for i = 1, #KEYS do
  local floor = tonumber(ARGV[i])
  if tonumber(redis.call('GET', KEYS[i]) or '0') < floor then
    redis.call('SET', KEYS[i], floor)
  end
end
return #KEYS
"""

INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 5.0
_MAX_LOCAL_ONLY = 100_000


# ---------------------------------------------------------------------- the log's entries
# Sans-IO: what the publish script is given, and what a relay makes of an entry it reads.


def encode_values(payloads: list[bytes], texts: list[bool]) -> list[bytes]:
    """The script's message arguments: each payload after a byte saying t(ext) or b(inary)."""
    return [
        (b"t" if text else b"b") + payload for payload, text in zip(payloads, texts, strict=True)
    ]


def decode_entry(fields: dict[bytes, bytes]) -> tuple[str, int, str, list[bytes], list[bool]]:
    """``(topic, first sequence number, origin, payloads, texts)`` of a log entry the publish
    script wrote (fields ``t``, ``s``, ``o``, then ``0``, ``1``, ...).

    Raises ``ValueError`` saying what is wrong with any other entry: a missing field, a bad
    topic name or number, a value of no known kind, text that is not UTF-8.
    """
    try:
        name = fields[b"t"].decode()
        first_seq = int(fields[b"s"])
        origin = fields[b"o"].decode()
        values = [fields[str(i).encode()] for i in range(len(fields) - 3)]
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
    return name, first_seq, origin, payloads, texts


@dataclass(frozen=True)
class BackplaneStatistics:
    """A snapshot of a backplane: whether it is ``up``, and lifetime counts."""

    up: bool
    published: int
    """Batches this relay appended to the log."""
    received: int
    """Batches read from the log that other relays published."""
    local_only: int
    """Batches published while Redis was unreachable, delivered to local clients only."""
    reconnects: int
    """Times the reader reconnected after losing Redis."""
    conflicts: int
    """Batches renumbered because relays numbered a topic alone during an outage."""


class _Pending:
    """An own publish on its way through the log: delivered by the reader, or locally if the
    backplane goes down first."""

    __slots__ = ("delivered", "echo", "name", "payloads", "report", "source", "texts")

    def __init__(
        self, name: str, payloads: list[bytes], texts: list[bool], source: object, echo: bool
    ) -> None:
        self.name = name
        self.payloads = payloads
        self.texts = texts
        self.source = source
        self.echo = echo
        self.delivered = trio.Event()
        self.report: DeliveryReport | None = None


class RedisBackplane:
    """Shares the topics of relay processes through the Redis at ``url``.

    ``url`` is ``redis://host:port/db`` (``rediss://`` for TLS). ``prefix`` namespaces the
    keys, so relays that use another prefix share nothing; ``log_size`` bounds the log
    (entries; trimmed approximately); ``timeout`` bounds every Redis command (seconds);
    ``block`` is how long one ``XREAD`` waits for new entries (seconds).

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
        self.relay_id = os.urandom(6).hex()
        """Tells this relay's own entries in the log from those of other relays."""
        self.up = False
        self._log_key = f"{prefix}:log"
        self._topics: Topics | None = None
        self._client: Any = None
        self._publish_script: Any = None
        self._raise_script: Any = None
        self._numbers = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        # Own publishes delivered locally (the backplane failed meanwhile) that may still
        # reach the log: the reader skips them. Bounded, oldest forgotten first.
        self._local_only: OrderedDict[int, None] = OrderedDict()
        self._last_id = b"0-0"
        self._run_id: bytes | None = None
        self._changed = trio.Event()
        self._published = self._received = self._local = self._reconnects = 0
        self._conflicts = 0

    def statistics(self) -> BackplaneStatistics:
        return BackplaneStatistics(
            self.up,
            self._published,
            self._received,
            self._local,
            self._reconnects,
            self._conflicts,
        )

    async def wait_until_up(self, up: bool = True) -> None:
        """Wait until the backplane is up (or, with ``up=False``, down). Bound it yourself."""
        while self.up != up:
            await self._changed.wait()

    def _set_up(self, up: bool) -> None:
        if self.up != up:
            self.up = up
            self._changed.set()
            self._changed = trio.Event()

    def _seq_key(self, topic: str) -> str:
        return f"{self.prefix}:seq:{topic}"

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
        async with client:
            self._client = client
            self._publish_script = client.register_script(_PUBLISH)
            self._raise_script = client.register_script(_RAISE)
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
                    await self._deliver_pending_locally()
                    if not started:
                        task_status.started()
                        started = True
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)

    async def _connect(self) -> None:
        """Check Redis, raise its counters to ours, and find where to read the log from."""
        client = self._client
        with trio.fail_after(self.timeout):
            info = await client.info("server")
        run_id = info.get("run_id")
        run_id = run_id.encode() if isinstance(run_id, str) else run_id
        topics = self._topics
        assert topics is not None
        if self._run_id is None:
            # First connection: fill the histories from the log's last history_age seconds
            # (or go on from where an interrupted fill got: nothing is delivered twice).
            if self._last_id == b"0-0":
                with trio.fail_after(self.timeout):
                    now = await client.time()  # Redis's clock: the log's IDs are its ms
                start_ms = int(now.timestamp() * 1000) - int(topics.history_age * 1000)
                self._last_id = f"{max(start_ms, 0)}-0".encode()
            await self._backfill()
        elif run_id != self._run_id:
            # Redis restarted and lost its data: what it held for us is gone. Read its new
            # log from the start (what other relays published since it came back).
            logger.warning(
                "backplane %s restarted with no data: reading its log anew", self.shown_url
            )
            self._last_id = b"0-0"
            self._local_only.clear()
        self._run_id = run_id
        await self._raise_counters()

    async def _raise_counters(self) -> None:
        """Make Redis number on from where this relay got, for every topic it knows."""
        topics = self._topics
        assert topics is not None
        floors = list(topics.last_numbers().items())
        for start in range(0, len(floors), 500):
            chunk = floors[start : start + 500]
            with trio.fail_after(self.timeout):
                await self._raise_script(
                    keys=[self._seq_key(name) for name, _ in chunk],
                    args=[seq for _, seq in chunk],
                )

    async def _backfill(self) -> None:
        """Deliver the log's retained entries after ``_last_id`` (to fill histories)."""
        client = self._client
        while True:
            with trio.fail_after(self.timeout):
                entries = await client.xrange(self._log_key, b"(" + self._last_id, b"+", count=1000)
            if not entries:
                return
            for entry in entries:
                await self._deliver(entry.identifier, entry.field_values)

    async def _read_forever(self) -> NoReturn:
        client = self._client
        block_ms = int(self.block * 1000)
        while True:
            with trio.fail_after(self.block + self.timeout):
                reply = await client.xread(
                    {self._log_key: self._last_id}, count=1000, block=block_ms
                )
            if not reply:
                continue
            for entries in reply.values():
                for entry in entries:
                    await self._deliver(entry.identifier, entry.field_values)

    async def _deliver(self, identifier: bytes, fields: dict[bytes, bytes]) -> None:
        """Deliver one log entry to the local topics (or skip it, logged, if it is not one
        a relay wrote: someone else's XADD must not stop the relay)."""
        self._last_id = identifier
        topics = self._topics
        assert topics is not None
        try:
            name, first_seq, origin, payloads, texts = decode_entry(fields)
        except ValueError as exc:
            logger.error(
                "backplane log entry %s skipped, not a relay's batch: %s", identifier, shown(exc)
            )
            return
        relay_id, _, number_text = origin.partition(":")
        pending: _Pending | None = None
        if relay_id == self.relay_id:
            number = int(number_text)
            if number in self._local_only:
                del self._local_only[number]
                return  # delivered locally already, while the backplane was down
            pending = self._pending.pop(number, None)
        else:
            self._received += 1
        source, echo = (pending.source, pending.echo) if pending else (None, True)
        report, renumbered = await topics.deliver_numbered(
            name, first_seq, payloads, texts, source=source, echo=echo
        )
        if renumbered:
            self._conflicts += 1
            logger.warning(
                "topic %r: seq %d was numbered here alone during an outage; delivered as %d",
                name,
                first_seq,
                report.seq,
            )
        if pending is not None:
            pending.report = report
            pending.delivered.set()

    async def _deliver_pending_locally(self) -> None:
        """The backplane is down: own publishes still on their way are delivered here now
        (and skipped if the log brings them later), so no local message waits for Redis."""
        topics = self._topics
        assert topics is not None
        pending, self._pending = self._pending, {}
        for number, item in sorted(pending.items()):
            self._remember_local_only(number)
            await self._publish_locally(topics, item)

    def _remember_local_only(self, number: int) -> None:
        self._local_only[number] = None
        while len(self._local_only) > _MAX_LOCAL_ONLY:
            self._local_only.popitem(last=False)

    async def _publish_locally(self, topics: Topics, item: _Pending) -> None:
        self._local += 1
        report = await topics.publish_locally(
            item.name, item.payloads, item.texts, source=item.source, echo=item.echo
        )
        item.report = report
        item.delivered.set()

    async def last_number(self, topic: str) -> int:
        """The last sequence number Redis handed out for ``topic`` (0 if unknown or if
        Redis cannot be asked now)."""
        if not self.up:
            return 0
        try:
            with trio.fail_after(self.timeout):
                value = await self._client.get(self._seq_key(topic))
        except self._failures:
            return 0
        return int(value or 0)

    # ------------------------------------------------------------------ publishing

    async def publish(
        self,
        topics: Topics,
        name: str,
        payloads: list[bytes],
        texts: list[bool],
        *,
        source: object,
        echo: bool,
    ) -> DeliveryReport:
        """Append a batch to the log and return its report once this relay delivered it;
        while Redis is unreachable, deliver it locally (``remote=False``)."""
        item = _Pending(name, payloads, texts, source, echo)
        if not self.up:
            await self._publish_locally(topics, item)
            assert item.report is not None
            return item.report
        number = next(self._numbers)
        self._pending[number] = item
        values = encode_values(payloads, texts)
        try:
            with trio.fail_after(self.timeout):
                await self._publish_script(
                    keys=[self._seq_key(name), self._log_key],
                    args=[
                        topics.last_number(name),
                        name,
                        f"{self.relay_id}:{number}",
                        self.log_size,
                        *values,
                    ],
                )
            self._published += 1
        except self._failures as exc:
            logger.warning(
                "backplane publish on %r failed (%s): delivered locally",
                name,
                shown(exc) or type(exc).__name__,
            )
            if self._pending.pop(number, None) is not None:
                self._remember_local_only(number)
                await self._publish_locally(topics, item)
        await item.delivered.wait()
        assert item.report is not None
        return item.report
