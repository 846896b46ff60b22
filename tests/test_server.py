"""The relay server, run for real over in-memory connections.

Determinism rules for this module: every test runs under pytest-trio's ``autojump_clock``
(``MockClock(autojump_threshold=0)``), so time only passes when every task is blocked and
timings are asserted exactly. Steps are ordered with ``wait_all_tasks_blocked()``, never
with sleeps. Connections are :func:`trio_relay.testing.socket_like_stream_pair` pipes, whose
bounded buffers push back like sockets when a client stops reading.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from helpers import RawClient, masked_frame, rejected, upgrade_request
from trio_websocket import ConnectionClosed
from wsproto.events import CloseConnection, Ping, Pong, TextMessage

from trio_relay import (
    Broadcast,
    BroadcastStatistics,
    CloseCode,
    PublishReport,
    RelayConfig,
    Subscription,
    Topics,
    serve_relay,
)
from trio_relay._topics import Batch
from trio_relay.testing import MemoryListener, MemoryRelay, open_memory_relay

# Every test takes pytest-trio's autojump_clock fixture as an argument: pytest-trio only
# switches clocks for fixtures the test function itself receives.


async def test_every_client_gets_every_message_including_the_sender(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        open_memory_relay() as relay,
        relay.connect() as alice,
        relay.connect() as bob,
        relay.connect() as carol,
    ):
        await alice.send_message("hello from alice")
        for client in (alice, bob, carol):
            assert await client.get_message() == "hello from alice"


async def test_text_stays_text_and_binary_stays_binary(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, relay.connect() as a, relay.connect() as b:
        await a.send_message("text é")
        await a.send_message(b"\x00\xffbinary")
        for client in (a, b):
            assert await client.get_message() == "text é"
            assert await client.get_message() == b"\x00\xffbinary"


async def test_everyone_sees_one_order_across_concurrent_producers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    count = 50
    async with (
        open_memory_relay() as relay,
        relay.consume() as first,
        relay.consume() as second,
    ):
        async with trio.open_nursery() as nursery:
            for name in ("p", "q", "r"):
                nursery.start_soon(_send_numbered, relay, name, count)
        seen_first = [await anext(first) for _ in range(3 * count)]
        seen_second = [await anext(second) for _ in range(3 * count)]
    assert seen_first == seen_second
    for name in ("p", "q", "r"):
        own = [m for m in seen_first if isinstance(m, str) and m.startswith(name)]
        assert own == [f"{name}{i}" for i in range(count)]


async def _send_numbered(relay: MemoryRelay, name: str, count: int) -> None:
    async with relay.connect(message_queue_size=10_000) as ws:
        for i in range(count):
            await ws.send_message(f"{name}{i}")


async def test_a_message_in_the_same_segment_as_the_handshake_is_delivered_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, relay.consume() as messages:
        stream = await relay.open_stream()
        # One send_all: the upgrade request and a first frame right behind it.
        await stream.send_all(upgrade_request() + masked_frame(0x1, b"right away"))
        with trio.fail_after(1):
            assert await anext(messages) == "right away"


async def test_a_fragmented_message_with_a_ping_in_between_arrives_whole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, relay.consume() as messages:
        raw = await RawClient.connect(relay)
        await raw.send(TextMessage(data="frag", message_finished=False))
        await raw.send(Ping(payload=b"in between"))
        await raw.send(TextMessage(data="mented", message_finished=True))
        # The pong and the echo may come in either order; each whole.
        first, second = await raw.next_event(), await raw.next_event()
        assert {repr(first), repr(second)} == {
            repr(Pong(payload=b"in between")),
            repr(TextMessage(data="fragmented")),
        }
        assert await anext(messages) == "fragmented"


async def test_the_relay_answers_a_client_close_and_forgets_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        raw = await RawClient.connect(relay)
        assert relay.server.statistics().connections == 1
        await raw.send(CloseConnection(code=1000, reason="bye"))
        reply = await raw.next_event()
        assert isinstance(reply, CloseConnection)
        assert reply.code == 1000
        assert await raw.read_to_eof() == b""
        await trio.testing.wait_all_tasks_blocked()
        assert relay.server.statistics().connections == 0
        assert relay.server.statistics().broadcast.subscribers == 0


async def test_a_consumer_past_its_byte_budget_is_evicted_and_nobody_waits(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    config = RelayConfig(max_queue_bytes=8 * 1024, overflow_timeout=0, slow_consumer_timeout=2.0)
    total = 200
    message = "m" * 1000
    async with (
        open_memory_relay(config, capacity=4096) as relay,
        relay.connect() as stalled,
        relay.consume() as healthy,
    ):
        received: list[str | bytes] = []
        start = trio.current_time()
        for i in range(total):
            await relay.publish(f"{i:04d}{message}")
            received.append(await anext(healthy))
        # Publishing never waited for the consumer that stopped reading.
        assert trio.current_time() == start
        assert received == [f"{i:04d}{message}" for i in range(total)]
        assert relay.server.statistics().broadcast.evicted == 1
        assert "evicted: slow consumer" in caplog.text  # logged when it happens
        # Its writer was stuck mid-write when it was evicted: no close frame can follow half
        # a frame, so the connection is aborted when that write times out.
        await _at(start + 2.0, lambda: relay.server.statistics().connections == 1)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await stalled.get_message()
        assert closed.value.reason is not None
        assert closed.value.reason.code == 1006


async def test_a_dead_reader_on_a_quiet_relay_is_cut_off_after_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(slow_consumer_timeout=3.0)
    async with (
        open_memory_relay(config, capacity=4096) as relay,
        relay.connect(),  # never reads
        relay.consume() as healthy,
    ):
        start = trio.current_time()
        for _ in range(3):  # far below the byte budget, but more than its socket takes
            await relay.publish("q" * 10_000)
            assert await anext(healthy) == "q" * 10_000
        assert relay.server.statistics().broadcast.evicted == 0
        await _at(start + 3.0, lambda: relay.server.statistics().connections == 1)
        await relay.publish("still flowing")
        assert await anext(healthy) == "still flowing"


async def _at(deadline: float, condition: Callable[[], bool]) -> None:
    """Assert that ``condition`` becomes true exactly at virtual time ``deadline``."""
    await trio.sleep_until(deadline - 1e-6)
    await trio.testing.wait_all_tasks_blocked()
    assert not condition(), f"already true before {deadline}"
    await trio.sleep_until(deadline)
    await trio.testing.wait_all_tasks_blocked()
    assert condition(), f"not true at {deadline}"


async def test_an_evicted_consumer_that_is_still_reading_gets_close_1008(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(max_queue_bytes=4096, slow_consumer_timeout=5.0)
    async with open_memory_relay(config, capacity=1024) as relay, relay.connect() as slow:
        await _publish_many(relay, 100)
        assert relay.server.statistics().broadcast.evicted == 1
        # It reads again before its stuck write times out: that write completes, then the
        # relay says why it is closing.
        await trio.sleep(2.5)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await slow.get_message()
        assert closed.value.reason is not None
        assert (closed.value.reason.code, closed.value.reason.reason) == (1008, "slow consumer")


async def test_a_consumer_merely_behind_within_its_budget_keeps_every_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(max_queue_bytes=1024 * 1024, slow_consumer_timeout=5.0)
    async with open_memory_relay(config, capacity=4096) as relay, relay.consume() as lagging:
        for i in range(300):
            await relay.publish(f"{i:03d}" + "z" * 1000)  # 300 KB while it reads nothing
        await trio.sleep(4.0)  # behind, but its socket keeps accepting once it reads
        got = [await anext(lagging) for _ in range(300)]
        assert got == [f"{i:03d}" + "z" * 1000 for i in range(300)]
        assert relay.server.statistics().broadcast.evicted == 0


async def _publish_many(relay: MemoryRelay, count: int) -> None:
    for i in range(count):
        await relay.publish(f"{i:04d}" + "y" * 200)


async def test_a_client_vanishing_mid_message_harms_nobody(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, relay.consume() as messages:
        raw = await RawClient.connect(relay)
        frame = masked_frame(0x1, b"this message never ends")
        await raw.send_raw(frame[:9])
        await raw.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert relay.server.statistics().connections == 1
        await relay.produce("still here")
        assert await anext(messages) == "still here"


class _FailingBus:
    """A broadcast that breaks on one particular message, to see failures contained."""

    def __init__(self) -> None:
        self.inner = Broadcast[Batch | bytes](size_of=len)

    def join(self, **kwargs: Any) -> Subscription[Batch | bytes]:
        return self.inner.join(**kwargs)

    def leave(self, subscription: Subscription[Batch | bytes]) -> None:
        self.inner.leave(subscription)

    async def publish(self, message: bytes) -> PublishReport:
        if b"boom" in (message.raw if isinstance(message, Batch) else message):
            raise RuntimeError("simulated failure")
        return await self.inner.publish(message)

    def publish_nowait(self, message: bytes) -> PublishReport:
        raise trio.WouldBlock  # always take the async path, where the test bends things

    def statistics(self) -> BroadcastStatistics:
        return self.inner.statistics()


async def test_an_error_in_one_connection_closes_it_with_1011_and_spares_the_rest(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = MemoryListener()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                serve_relay,
                listeners=[listener],
                topics=Topics(broadcast_factory=lambda _name: _FailingBus()),
            )
        )
        relay = MemoryRelay(server, listener, nursery.cancel_scope, trio.Event())
        async with relay.consume() as bystander:
            raw = await RawClient.connect(relay)
            await raw.send_text("boom")
            close = await raw.close_from_relay()
            assert close.code == CloseCode.INTERNAL_ERROR
            await relay.produce("unaffected")
            assert await anext(bystander) == "unaffected"
        nursery.cancel_scope.cancel()
    assert "simulated failure" in caplog.text


async def test_a_protocol_violation_closes_only_that_client_with_1002(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, relay.consume() as bystander:
        raw = await RawClient.connect(relay)
        await raw.send_raw(b"\x81\x05hello")  # unmasked client frame
        close = await raw.next_event()
        assert isinstance(close, CloseConnection)
        assert close.code == CloseCode.PROTOCOL_ERROR
        assert await raw.read_to_eof() == b""
        await relay.produce("fine")
        assert await anext(bystander) == "fine"


async def test_invalid_utf8_in_a_text_message_closes_with_1007(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        raw = await RawClient.connect(relay)
        await raw.send_raw(masked_frame(0x1, b"\xff\xfe not utf-8"))
        close = await raw.next_event()
        assert isinstance(close, CloseConnection)
        assert close.code == CloseCode.INVALID_DATA


async def test_a_message_over_the_size_limit_closes_with_1009(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(max_message_size=1000)
    async with open_memory_relay(config) as relay, relay.consume() as bystander:
        raw = await RawClient.connect(relay)
        await raw.send_text("x" * 1000)  # exactly the limit: fine
        assert await anext(bystander) == "x" * 1000
        await raw.send_text("é" * 501)  # 1002 bytes of UTF-8, 501 characters
        close = await raw.next_close()
        assert close.code == CloseCode.MESSAGE_TOO_BIG
        # The rest of the oversized frame is never parsed: the relay closes at once.
        assert await raw.read_to_eof() == b""
        await relay.produce("others unaffected")
        assert await anext(bystander) == "others unaffected"


async def test_shutdown_closes_every_client_with_1001_and_stops_accepting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, relay.connect() as ws:
        raw = await RawClient.connect(relay)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.shutdown)
            close = await raw.close_from_relay()
            assert close.code == CloseCode.GOING_AWAY
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason is not None
            assert closed.value.reason.code == 1001
        # Both clients answered their close frames at once: no time passed.
        assert trio.current_time() == start
        assert relay.server.statistics().connections == 0
        with pytest.raises(trio.ClosedResourceError):
            await relay.open_stream()


async def test_shutdown_waits_at_most_close_timeout_for_a_client_that_never_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(RelayConfig(close_timeout=3.0)) as relay:
        raw = await RawClient.connect(relay)  # and never reads again
        start = trio.current_time()
        await relay.shutdown()
        assert trio.current_time() - start == 3.0
        assert relay.server.statistics().connections == 0
        close = await raw.next_event()  # the close frame was sent, then the stream closed
        assert isinstance(close, CloseConnection)
        assert close.code == CloseCode.GOING_AWAY
        assert await raw.read_to_eof() == b""


async def _messages_until_the_end(client: RawClient) -> tuple[list[str], int | None]:
    """Every whole text message a client gets, and the close code that followed them
    (None if the stream ended without a close frame)."""
    messages: list[str] = []
    part = ""
    while True:
        try:
            event = await client.next_event()
        except EOFError:
            return messages, None
        if isinstance(event, CloseConnection):
            return messages, event.code
        assert isinstance(event, TextMessage), event
        part += event.data
        if event.message_finished:
            messages.append(part)
            part = ""


async def test_shutdown_writes_out_each_consumers_queue_before_its_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A consumer 100 KB behind (the pipe holds 4 KiB): the relay's writer is mid-frame and
    # more is queued when the relay shuts down. Every message still arrives, then 1001.
    messages = [f"{i:04d}" + "m" * 996 for i in range(100)]
    async with open_memory_relay(RelayConfig(close_timeout=5.0), capacity=4096) as relay:
        behind = await RawClient.connect(relay)
        for message in messages:
            await relay.publish(message)
        assert sum(relay.server.statistics().broadcast.queued) > 0  # it really is behind
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.shutdown)
            received, code = await _messages_until_the_end(behind)
        assert received == messages
        assert code == CloseCode.GOING_AWAY


async def test_on_shutdown_a_consumer_that_cannot_take_its_queue_in_time_loses_only_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    messages = [f"{i:04d}" + "m" * 996 for i in range(50)]
    async with open_memory_relay(RelayConfig(close_timeout=3.0), capacity=4096) as relay:
        stuck = await RawClient.connect(relay)  # reads nothing until the relay has stopped
        for message in messages:
            await relay.publish(message)
        start = trio.current_time()
        await relay.shutdown()
        assert trio.current_time() - start == 3.0  # bounded by close_timeout
        assert relay.server.statistics().connections == 0
        # What it got: whole messages, in order, from the first; then the stream ended
        # (a close frame cannot follow half a frame).
        received, code = await _messages_until_the_end(stuck)
        assert code is None
        assert 0 < len(received) < len(messages)
        assert received == messages[: len(received)]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/two//slashes", b"segments separated by single '/'"),
        ("/sp%20ace", b"letters, digits"),
        ("/" + "t" * 201, b"at most 200 characters"),
        ("/ok?since=-1", b"'since' must be one sequence number"),
        ("/ok?since=1&since=2", b"'since' must be one sequence number"),
    ],
)
async def test_a_bad_topic_or_since_is_refused_with_400_saying_why(
    autojump_clock: trio.testing.MockClock, path: str, reason: bytes
) -> None:
    async with open_memory_relay() as relay:
        status, body = await rejected(relay, upgrade_request(path))
        assert status == 400
        assert reason in body


async def test_a_plain_http_get_is_refused_with_400(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_relay() as relay:
        status, body = await rejected(relay, b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        assert status == 400
        assert b"Upgrade" in body


async def test_an_unsupported_websocket_version_is_refused_with_426(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        request = upgrade_request().replace(b"Version: 13", b"Version: 8")
        status, _ = await rejected(relay, request)
        assert status == 426


async def test_an_oversized_request_head_is_refused_with_431(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        request = upgrade_request(extra="X-Padding: " + "p" * 20_000 + "\r\n")
        status, _ = await rejected(relay, request)
        assert status == 431


async def test_a_client_that_never_finishes_the_handshake_is_dropped_after_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(RelayConfig(handshake_timeout=4.0)) as relay:
        stream = await relay.open_stream()
        await stream.send_all(b"GET / HTTP/1.1\r\n")  # and nothing more
        start = trio.current_time()
        assert await stream.receive_some() == b""
        assert trio.current_time() - start == 4.0
