"""Abuse that makes the relay hold memory, at a scale CI can afford: what it holds stays
within the global budgets, the attacker gets the documented outcome, and a bystander
client keeps receiving throughout.

* Retained history (issue 11, first row): one client opens many topics with one big
  message each and leaves. All histories together stay within ``history_total_bytes``
  (the oldest messages of all topics go first; a resuming client gets the usual gap), and
  a new topic past ``max_topics`` with every topic in use is refused with HTTP 503.
* Unfinished messages (second row): many connections each hold an unfinished message,
  whole or as fragments with pings between them. Together they stay within
  ``max_unfinished_bytes``; the connection whose message would go past it is closed with
  1013, and what a connection held goes back when its message completes or it ends.

``benchmarks/abuse_memory.py`` runs both at the issue's scale against a real relay process.
Determinism: in-memory relays under the autojump clock; each step is followed by
``wait_all_tasks_blocked()`` and a bystander round trip; memory is measured with
tracemalloc against the budget, after ``gc.collect()``.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from helpers import (
    RawClient,
    masked_frame,
    rejected,
    traced_memory as traced_memory,  # the fixture
    upgrade_request,
)
from wsproto.events import CloseConnection, Ping, Pong, TextMessage

from trio_relay import CloseCode, RelayConfig
from trio_relay.testing import MemoryRelay, open_memory_relay

pytestmark = pytest.mark.usefixtures("traced_memory")

KiB, MiB = 1024, 1024 * 1024


class Bystander:
    """A client on its own topic that publishes and gets its echo, on demand, and answers
    the relay's keepalive pings meanwhile (in a task of its own)."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.sent = 0
        self._echoes, self._received = trio.open_memory_channel[str | bytes](100)

    async def read(self) -> None:
        while True:
            event = await self.client.next_event()
            if isinstance(event, Ping):
                await self.client.send(event.response())
            elif isinstance(event, TextMessage):
                assert event.message_finished
                await self._echoes.send(event.data)
            else:
                raise AssertionError(f"the bystander got {event!r}")

    async def round_trip(self) -> None:
        """Send one message and wait for its echo: the relay still serves others."""
        self.sent += 1
        text = f"bystander {self.sent}"
        await self.client.send_text(text)
        with trio.fail_after(1):  # virtual time: fails only if it never comes
            assert await self._received.receive() == text


@asynccontextmanager
async def relay_with_bystander(config: RelayConfig) -> AsyncIterator[tuple[MemoryRelay, Bystander]]:
    async with open_memory_relay(config) as relay, trio.open_nursery() as nursery:
        bystander = Bystander(await RawClient.connect(relay, "/bystander"))
        nursery.start_soon(bystander.read)
        await bystander.round_trip()
        yield relay, bystander
        await bystander.round_trip()
        nursery.cancel_scope.cancel()


def traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


# ---------------------------------------------------------------------------- retained history

HISTORY = RelayConfig(history_total_bytes=1 * MiB, ping_interval=0)


async def test_many_topics_with_a_big_message_each_stay_within_the_history_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    message = b"x" * (100 * 1000)
    async with relay_with_bystander(HISTORY) as (relay, bystander):
        topics = relay.server.topics
        before = traced()
        for n in range(50):  # 5 MB in all, five times the budget
            client = await RawClient.connect(relay, f"/t{n}")
            await client.send_raw(masked_frame(0x2, message))
            assert await client.next_message() == message  # its echo: it was published
            await client.stream.aclose()
            await settle()
            assert topics.retained_bytes <= HISTORY.history_total_bytes
            await bystander.round_trip()
            await trio.sleep(1.0)  # one second apart: the oldest is unambiguous
        grown = traced() - before
        assert grown < HISTORY.history_total_bytes + 256 * KiB, grown
        # The newest topics kept their message, the oldest are forgotten (numbers kept).
        assert len(topics) == 1 + HISTORY.history_total_bytes // len(message)  # + bystander
        assert "t49" in topics and "t0" not in topics
        assert topics.last_number("t0") == 1
        # A client resuming on an evicted topic gets the usual gap (raw clients: 4410).
        resumed = await RawClient.connect(relay, "/t0?since=0")
        close = await resumed.next_close()
        assert (close.code, close.reason) == (4410, "messages 1 to 1 are no longer retained")
        resumed = await RawClient.connect(relay, "/t49?since=0")
        assert await resumed.next_message() == message


async def test_a_new_topic_past_max_topics_is_refused_503_only_when_all_are_in_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(max_topics=5, ping_interval=0)
    async with relay_with_bystander(config) as (relay, bystander):
        # Ten handshakes for new topics at once: exactly four fit beside the bystander's.
        streams = [await relay.open_stream() for _ in range(10)]
        for n, stream in enumerate(streams):
            await stream.send_all(upgrade_request(f"/new{n}"))
        statuses = []
        for stream in streams:
            head = await stream.receive_some()
            statuses.append(int(head.split()[1]))
        assert sorted(statuses) == [101] * 4 + [503] * 6
        status, body = await rejected(relay, upgrade_request("/one-more"))
        assert status == 503
        assert b"limit of 5 topics" in body
        await bystander.round_trip()
        # A topic kept only for its history makes room: a client publishes and leaves.
        admitted = [s for s, status in zip(streams, statuses, strict=True) if status == 101]
        await admitted[0].send_all(masked_frame(0x1, b"kept for resuming"))
        await settle()
        await admitted[0].aclose()
        await settle()
        client = await RawClient.connect(relay, "/one-more")  # the idle topic goes
        await bystander.round_trip()
        await client.stream.aclose()
        for stream in streams:
            await stream.aclose()


# ---------------------------------------------------------------------------- unfinished messages

UNFINISHED = RelayConfig(
    max_message_size=256 * KiB, max_unfinished_bytes=1 * MiB, ping_interval=5.0, ping_timeout=5.0
)
PAYLOAD = 256 * KiB - 1  # the largest message, less one byte: all of it but its end
HELD = PAYLOAD - 1  # what each holder counts against the budget
_paths = (f"/attack/{n}" for n in itertools.count())  # each on its own topic


async def hold_unfinished(relay: MemoryRelay, fragments: bool) -> tuple[RawClient, int | None]:
    """A client that sends all of a PAYLOAD-byte message but its last byte: as one frame
    (it is then in the middle of a frame, and cannot answer a ping), or as complete
    fragments, the final one missing, with a ping after each (it reads the pong). Returns
    it and the code the relay closed it with, or None if it holds its message."""
    client = await RawClient.connect(relay, next(_paths))
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        if not fragments:
            await client.send_raw(masked_frame(0x2, b"u" * PAYLOAD)[:-1])
            return client, await close_code(client)
        sizes = [64 * KiB] * 3 + [HELD - 3 * 64 * KiB]
        for n, size in enumerate(sizes):
            frame = masked_frame(0x0 if n else 0x2, b"f" * size, fin=False)
            await client.send_raw(frame + masked_frame(0x9, b"ping %d" % n))
            await settle()
            event = await client.next_event()
            if isinstance(event, CloseConnection):
                return client, event.code
            assert event == Pong(payload=b"ping %d" % n)  # answered between fragments
    return client, await close_code(client)


async def close_code(client: RawClient) -> int | None:
    """The close code the relay sent this client, or None while it is still open."""
    await settle()
    with trio.move_on_after(0.001):
        try:
            event = await client.next_event()
        except EOFError:
            return 1006
        assert isinstance(event, CloseConnection), event
        return event.code
    return None


async def test_connections_holding_unfinished_messages_stay_within_the_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with relay_with_bystander(UNFINISHED) as (relay, bystander):
        budget = relay.server.unfinished
        before = traced()
        holding: list[RawClient] = []
        codes = []
        for n in range(30):  # 7.5 MiB of unfinished messages tried, 7.5 times the budget
            client, code = await hold_unfinished(relay, fragments=n % 2 == 1)
            codes.append(code)
            if code is None:
                holding.append(client)
            assert budget.used <= UNFINISHED.max_unfinished_bytes
            await bystander.round_trip()
        # Four fit in 1 MiB (two whole, two in fragments); all others were closed 1013.
        assert codes == [None] * 4 + [CloseCode.TRY_AGAIN_LATER] * 26
        assert budget.used == 4 * HELD
        grown = traced() - before
        assert grown < UNFINISHED.max_unfinished_bytes + 512 * KiB, grown

        # A minute on: the holders in fragments answer the relay's pings between them and
        # keep what they hold; the ones stuck in a frame cannot, and their keepalive closes
        # them (1011), which gives back what they held.
        whole, fragmented = holding[0::2], holding[1::2]
        closes: list[int] = []
        async with trio.open_nursery() as nursery:
            for client in fragmented:
                nursery.start_soon(answer_pings, client)
            for client in whole:
                nursery.start_soon(read_to_close, client, closes)
            await trio.sleep(60.0)
            await bystander.round_trip()
            nursery.cancel_scope.cancel()
        assert closes == [CloseCode.INTERNAL_ERROR] * 2
        assert budget.used == 2 * HELD

        # What a connection holds goes back when its message completes...
        await fragmented[0].send_raw(masked_frame(0x0, b"!"))
        await settle()
        assert budget.used == HELD
        # ... and when it ends.
        await fragmented[1].stream.aclose()
        await settle()
        assert budget.used == 0
        await bystander.round_trip()


async def answer_pings(client: RawClient) -> None:
    while True:
        event = await client.next_event()
        if isinstance(event, Ping):
            await client.send(event.response())


async def read_to_close(client: RawClient, closes: list[int]) -> None:
    closes.append((await client.next_close()).code)


async def test_what_connections_hold_goes_back_when_the_relay_shuts_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(UNFINISHED) as relay:
        budget = relay.server.unfinished
        clients = [(await hold_unfinished(relay, fragments=n == 1))[0] for n in range(2)]
        assert budget.used == 2 * HELD
        await relay.shutdown()  # cancellation: every connection's task ends
        assert budget.used == 0
        for client in clients:
            await client.stream.aclose()


async def test_a_client_that_is_refused_1013_may_try_again_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with relay_with_bystander(UNFINISHED) as (relay, bystander):
        holders = [(await hold_unfinished(relay, fragments=False))[0] for _ in range(4)]
        _, code = await hold_unfinished(relay, fragments=False)
        assert code == CloseCode.TRY_AGAIN_LATER
        await holders[0].stream.aclose()
        await settle()
        again = await RawClient.connect(relay, "/retry")
        await again.send_raw(masked_frame(0x2, b"a" * PAYLOAD))
        assert await again.next_message() == b"a" * PAYLOAD
        await bystander.round_trip()
        for client in [*holders[1:], again]:
            await client.stream.aclose()


def test_the_unfinished_budget_must_fit_one_message_of_the_largest_size() -> None:
    with pytest.raises(ValueError, match="at least max_message_size"):
        RelayConfig(max_message_size=2 * MiB, max_unfinished_bytes=1 * MiB)
