"""The bad-input suite: every kind of misbehaving client gets its documented outcome, every
other client keeps receiving, and the relay returns to its baseline (tasks, connections,
subscribers) afterwards.

In-memory relays under the autojump clock. The task count comes from
``trio.lowlevel.current_statistics()`` (lowlevel, but public and documented: it is the only
way to see that no task leaked).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from helpers import (
    RawClient,
    masked_frame,
    rejected,
    traced_memory as traced_memory,  # the fixture
    upgrade_request,
)
from hypothesis import HealthCheck, given, settings, strategies as st

from trio_relay import RelayConfig
from trio_relay.testing import MemoryRelay, open_memory_relay

pytestmark = pytest.mark.usefixtures("traced_memory")

CONFIG = RelayConfig(
    max_message_size=64 * 1024,
    handshake_timeout=4.0,
    ping_interval=10.0,
    ping_timeout=5.0,
    slow_consumer_timeout=3.0,
    close_timeout=1.0,
)


@asynccontextmanager
async def bystanding(config: RelayConfig = CONFIG) -> AsyncIterator[tuple[MemoryRelay, Any]]:
    """A relay with one healthy consumer; on exit, checks it still receives and that the
    relay is back to where it was before the misbehaviour."""
    async with open_memory_relay(config) as relay, relay.consume() as bystander:
        await relay.server.wait_until(lambda s: s.connections == 1)
        await trio.testing.wait_all_tasks_blocked()
        baseline = trio.lowlevel.current_statistics().tasks_living
        gc.collect()
        memory = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None
        yield relay, bystander
        await relay.publish("still here")
        with trio.fail_after(60):  # skipping whatever valid messages the bad client sent
            while await anext(bystander) != "still here":
                pass
        await relay.server.wait_until(lambda s: s.connections == 1)
        await trio.testing.wait_all_tasks_blocked()
        stats = relay.server.statistics()
        assert stats.broadcast.subscribers == 1
        assert list(stats.topics) == [""]
        assert trio.lowlevel.current_statistics().tasks_living == baseline
        if memory is not None:
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - memory
            assert grown < 256 * 1024, f"{grown} bytes more than before"


async def _send_until_cut(client: RawClient, data: bytes) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await client.send_raw(data)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"\x00\xffgarbage\xfe\r\n\r\n", 400),
        (b"\x16\x03\x01" + bytes(range(256)) * 80, 431),  # a TLS hello, no blank line
        (b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n", 400),
        (upgrade_request().replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""), 400),
        (upgrade_request().replace(b"Version: 13", b"Version: 7"), 426),
        (upgrade_request("/bad//topic"), 400),
    ],
    ids=["garbage", "endless-garbage", "plain-get", "no-key", "bad-version", "bad-topic"],
)
async def test_a_bad_handshake_gets_its_http_status(
    autojump_clock: trio.testing.MockClock, request_bytes: bytes, status: int
) -> None:
    async with bystanding() as (relay, _):
        got, _ = await rejected(relay, request_bytes)
        assert got == status


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (bytes([0x82, 0xFF]) + (1 << 63).to_bytes(8, "big") + b"mask", 1002),
        (bytes([0x82, 0xFF]) + (1 << 40).to_bytes(8, "big") + b"mask", 1009),
        (masked_frame(0x1, b"\xc3\x28 not utf-8"), 1007),
        (b"\x81\x05hello", 1002),  # unmasked
        (masked_frame(0x9, b"p" * 126), 1002),  # control frame over 125 bytes
        (masked_frame(0x3, b"reserved opcode"), 1002),
        (bytes([0xC1, 0x80]) + b"mask", 1002),  # RSV1 without an extension
    ],
    ids=["length-2^63", "length-2^40", "bad-utf8", "unmasked", "big-control", "opcode-3", "rsv1"],
)
async def test_a_bad_frame_gets_its_close_code(
    autojump_clock: trio.testing.MockClock, frame: bytes, code: int
) -> None:
    async with bystanding() as (relay, _):
        client = await RawClient.connect(relay)
        await client.send_raw(frame)
        close = await client.next_close()
        assert close.code == code
        assert await client.read_to_eof() == b""


async def test_a_fragment_flood_is_cut_at_the_message_size_with_1009(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bystanding() as (relay, _):
        client = await RawClient.connect(relay)
        flood = masked_frame(0x2, b"f", fin=False) + masked_frame(0x0, b"f", fin=False) * 70_000
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_until_cut, client, flood)
            close = await client.next_close()
            nursery.cancel_scope.cancel()  # the relay stopped reading: the rest stays unsent
        assert close.code == 1009
        del flood  # ours, not the relay's: out of the memory comparison


async def test_a_ping_flood_from_a_client_that_reads_no_pongs_is_throttled_then_cut_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bystanding(dataclasses.replace(CONFIG, control_rate=1000)) as (relay, _):
        client = await RawClient.connect(relay)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_until_cut, client, masked_frame(0x9, b"ping!") * 100_000)
            # The relay parses pings at control_rate (pongs to those of one read coalesce):
            # its 7-byte pongs fill the 64 KiB it does not read, the relay stops reading it
            # (backpressure), and once a pong write makes no progress for
            # slow_consumer_timeout, cuts it off.
            await relay.server.wait_until(lambda s: s.connections == 1)
            nursery.cancel_scope.cancel()
        assert trio.current_time() - start == pytest.approx(65536 // 7 / 1000 + 3.0)


async def test_half_a_frame_then_silence_ends_with_the_keepalive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bystanding() as (relay, _):
        client = await RawClient.connect(relay)
        start = trio.current_time()
        await client.send_raw(masked_frame(0x1, b"never finished")[:7])
        close = await client.next_close()  # skipping the ping it never answers
        assert (close.code, close.reason) == (1011, "keepalive ping timeout")
        assert trio.current_time() - start == 15.0


async def test_a_client_vanishing_mid_message_leaves_nothing_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bystanding() as (relay, _):
        client = await RawClient.connect(relay)
        await client.send_raw(masked_frame(0x1, b"x" * 1000)[:500])
        await client.stream.aclose()


async def test_a_thousand_unfinished_handshakes_are_dropped_at_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bystanding() as (relay, _):
        streams = [await relay.open_stream() for _ in range(1000)]
        for stream in streams:
            await stream.send_all(b"GET / HTTP/1.1\r\n")
        start = trio.current_time()
        await relay.server.wait_until(lambda s: s.connections == 1001)
        await relay.server.wait_until(lambda s: s.connections == 1)
        assert trio.current_time() - start == 4.0
        assert relay.server.counters.rejections["handshake-timeout"] == 1000
        for stream in streams:
            assert await stream.receive_some() == b""
            await stream.aclose()
        del streams, stream  # ours, not the relay's: out of the memory comparison


_frames = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.builds(
            masked_frame,
            st.sampled_from([0, 1, 2, 8, 9, 10, 3, 11]),
            st.binary(max_size=130),
            fin=st.booleans(),
        ),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=_frames, close_at_end=st.booleans())
def test_random_frames_never_crash_or_leak(frames: list[bytes], close_at_end: bool) -> None:
    errors: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record)

    handler = Collect()
    logger = logging.getLogger("trio_relay")
    logger.addHandler(handler)

    async def scenario() -> None:
        async with bystanding() as (relay, _):
            client = await RawClient.connect(relay)
            for chunk in frames:
                try:
                    await client.send_raw(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
            if close_at_end:
                await client.stream.aclose()
            else:
                await trio.sleep(20)  # long enough for the keepalive to end a silent one
                await client.stream.aclose()

    try:
        trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        logger.removeHandler(handler)
    assert errors == []
