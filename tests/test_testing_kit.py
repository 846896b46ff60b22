"""trio_relay.testing: socket-like in-memory streams, the memory listener, the fixture."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_relay.testing import (
    MemoryListener,
    MemoryRelay,
    open_memory_relay,
    socket_like_stream_pair,
)


async def test_the_pipes_honour_trios_stream_contract() -> None:
    # trio's own conformance suite for two-way streams. A "clogged" pair is one whose
    # sends block until the other side reads: room for one byte, already taken.
    async def pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        return socket_like_stream_pair()

    async def clogged() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        a, b = socket_like_stream_pair(capacity=1)
        await a.send_all(b"\0")
        await b.send_all(b"\0")
        return a, b

    await trio.testing.check_two_way_stream(pair, clogged)


async def test_a_writer_blocks_once_the_pipe_holds_capacity_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = socket_like_stream_pair(capacity=10)
    await a.send_all(b"0123456789")  # exactly full: returns
    with trio.move_on_after(1) as scope:
        await a.send_all(b"!")
    assert scope.cancelled_caught
    assert await b.receive_some() == b"0123456789"


async def test_a_cancelled_write_may_leave_part_of_its_data_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = socket_like_stream_pair(capacity=4)
    with trio.move_on_after(1):
        await a.send_all(b"abcdefgh")
    assert await b.receive_some() == b"abcd"  # like a socket: half a message went out


async def test_closing_one_end_is_eof_for_the_reader_and_broken_for_the_writer() -> None:
    a, b = socket_like_stream_pair()
    await a.send_all(b"last words")
    await a.aclose()
    assert await b.receive_some() == b"last words"
    assert await b.receive_some() == b""
    with pytest.raises(trio.BrokenResourceError):
        await b.send_all(b"anyone there?")
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all(b"x")


async def test_the_listener_hands_over_connections_in_order_and_refuses_after_close() -> None:
    listener = MemoryListener()
    first = await listener.connect()
    second = await listener.connect()
    accepted_first = await listener.accept()
    accepted_second = await listener.accept()
    await first.send_all(b"1")
    await second.send_all(b"2")
    assert await accepted_first.receive_some() == b"1"
    assert await accepted_second.receive_some() == b"2"
    await listener.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await listener.connect()
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()


async def test_the_listener_drops_the_accepted_ends_still_open_as_a_network_failure_would() -> None:
    listener = MemoryListener()
    first, second = await listener.connect(), await listener.connect()
    accepted_first, accepted_second = await listener.accept(), await listener.accept()
    await accepted_second.aclose()  # the server is done with this one
    assert await listener.drop_connections() == 1
    assert await first.receive_some() == b""  # no goodbye: end of stream
    with pytest.raises(trio.ClosedResourceError):
        await accepted_first.receive_some()  # the server's end is gone under it
    assert await second.receive_some() == b""
    assert await listener.drop_connections() == 0


async def test_the_memory_relay_fixture_is_a_running_relay(
    memory_relay: MemoryRelay, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_relay.consume() as messages:
        await memory_relay.produce("via the fixture")
        assert await anext(messages) == "via the fixture"
    assert memory_relay.url == "ws://relay.test/"


async def test_leaving_open_memory_relay_stops_the_relay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        pass
    with pytest.raises(trio.ClosedResourceError):
        await relay.open_stream()
