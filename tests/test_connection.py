"""The relay connection's write path: write-through to idle sockets, and what it relies on.

Write-through writes to a client's socket synchronously, from the publishing task. That is
only safe because trio's sockets are non-blocking and because every write of a connection
holds its write slot; these tests pin both, and check that a partial write-through keeps
frames whole when a pong has to go out at the same moment.
"""

from __future__ import annotations

import os
import ssl
from functools import partial

import pytest
import trio
import trio.testing
from helpers import RawClient, masked_frame, upgrade_request
from wsproto.events import Ping, Pong, TextMessage

from trio_relay import RelayConfig, consume, serve_relay
from trio_relay._connection import nowait_sender
from trio_relay.testing import open_memory_relay, socket_like_stream_pair


async def test_trio_keeps_its_sockets_non_blocking() -> None:
    # If trio ever handed out blocking sockets, os.write() in write-through would freeze
    # the whole event loop on a client that stops reading. This test must then fail.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0] as listener:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
        async with client, server:
            for stream in (client, server):
                assert isinstance(stream, trio.SocketStream)
                assert os.get_blocking(stream.socket.fileno()) is False


async def test_write_through_writes_what_a_socket_takes_and_no_more() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0] as listener:
        client = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
        server = await listener.accept()
        async with client, server:
            write_now = nowait_sender(server)
            assert write_now is not None
            assert write_now(b"hello") == 5
            assert await client.receive_some() == b"hello"
            # Nobody reads: the kernel buffers fill, then it takes nothing and does not block.
            total = 0
            while (sent := write_now(b"x" * 65536)) > 0:
                total += sent
            assert total > 0
            assert write_now(b"more") == 0


def test_only_plain_sockets_and_the_testing_pipes_get_write_through() -> None:
    a, _ = socket_like_stream_pair()
    assert nowait_sender(a) is not None
    memory, _ = trio.testing.memory_stream_pair()
    assert nowait_sender(memory) is None
    tls = trio.SSLStream(a, ssl.create_default_context(), server_hostname="relay.test")
    assert nowait_sender(tls) is None


@pytest.mark.parametrize(
    "ping_first", [True, False], ids=["ping-then-publish", "publish-then-ping"]
)
async def test_a_pong_never_lands_inside_a_partly_written_frame(
    autojump_clock: trio.testing.MockClock, ping_first: bool
) -> None:
    # The client's socket takes 1000 of a 3000-byte frame at once; the rest of that frame
    # must go out before the pong the client asks for at about the same moment.
    async with open_memory_relay(capacity=1000) as relay:
        raw = await RawClient.connect(relay)
        await relay.server.wait_until(lambda s: s.broadcast.subscribers == 1)
        await trio.testing.wait_all_tasks_blocked()
        if ping_first:
            await raw.send(Ping(payload=b"are you there"))
        await relay.publish("p" * 3000)
        if not ping_first:
            await raw.send(Ping(payload=b"are you there"))
        await trio.testing.wait_all_tasks_blocked()
        events: list[object] = []
        text = ""
        while len(events) < 2:  # a whole text frame and a pong, in either order
            event = await raw.next_event()
            if isinstance(event, TextMessage):
                text += event.data
                if event.message_finished:
                    events.append(text)
            else:
                assert text in ("", "p" * 3000), "a control frame inside a data frame"
                events.append(event)
        assert sorted(map(repr, events)) == sorted(
            map(repr, ["p" * 3000, Pong(payload=b"are you there")])
        )


async def test_many_partial_writes_keep_the_stream_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(capacity=777) as relay, relay.consume() as messages:
        sent = [f"{i}:" + "w" * (i * 37 % 2000) for i in range(200)]
        async with trio.open_nursery() as nursery:

            async def publish_all() -> None:
                for message in sent:
                    await relay.publish(message)

            nursery.start_soon(publish_all)
            got = [await anext(messages) for _ in sent]
        assert got == sent


async def test_frames_of_one_read_are_published_as_one_batch_and_arrive_intact(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(receive_buffer_size=256 * 1024)
    async with (
        open_memory_relay(config, capacity=256 * 1024) as relay,
        relay.consume() as messages,
    ):
        raw = await RawClient.connect(relay)
        await relay.server.wait_until(lambda s: s.broadcast.subscribers == 2)
        big = bytes(range(256)) * 400  # 100 KiB, a 64-bit length header
        burst = (
            masked_frame(0x1, "ünïcode".encode())
            + masked_frame(0x2, b"\x00\x01")
            + masked_frame(0x1, b"frag", fin=False)
            + masked_frame(0x9, b"ping in the middle")
            + masked_frame(0x0, b"mented")
            + masked_frame(0x2, big)
        )
        before = relay.server.statistics().broadcast.published
        await raw.send_raw(burst)  # one write: the relay reads it in one go
        expected = ["ünïcode", b"\x00\x01", "fragmented", big]
        assert [await anext(messages) for _ in expected] == expected
        # Two batches: the read's frames, split only where the ping's pong has to go out
        # before the echo of the message it came in the middle of.
        assert relay.server.statistics().broadcast.published == before + 2


async def test_a_consumer_closing_mid_batch_harms_nobody(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(capacity=2048) as relay, relay.consume() as steady:
        leaving = await RawClient.connect(relay)
        await relay.server.wait_until(lambda s: s.broadcast.subscribers == 2)
        for i in range(50):
            await relay.publish(f"{i:02d}" + "b" * 3000)  # backs up behind leaving's socket
        await leaving.stream.receive_some(100)  # read a little of a frame, then vanish
        await leaving.stream.aclose()
        got = [await anext(steady) for _ in range(50)]
        assert got == [f"{i:02d}" + "b" * 3000 for i in range(50)]
        await relay.server.wait_until(lambda s: s.connections == 1)
        await relay.publish("after")
        assert await anext(steady) == "after"


async def test_the_socket_fast_paths_relay_bytes_split_anywhere(nursery: trio.Nursery) -> None:
    # Over a real socket the relay reads with wait_readable + os.read and writes through
    # with os.write. Feed it frames cut at awkward places, from a raw TCP client.
    server = await nursery.start(partial(serve_relay, "127.0.0.1", 0))
    url = f"ws://127.0.0.1:{server.port}/"
    async with consume(url) as messages:
        raw = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with raw:
            stream = upgrade_request() + b"".join(
                masked_frame(0x1 if i % 2 else 0x2, f"{i}:".encode() * (i * 50))
                for i in range(1, 40)
            )
            await raw.send_all(stream[:150])  # the head and the start of the first frame
            with trio.fail_after(5):
                for cut in range(150, len(stream), 997):
                    await raw.send_all(stream[cut : cut + 997])
                expected = [
                    f"{i}:" * (i * 50) if i % 2 else (f"{i}:" * (i * 50)).encode()
                    for i in range(1, 40)
                ]
                assert [await anext(messages) for _ in expected] == expected
    nursery.cancel_scope.cancel()
