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
from helpers import HOST, RawClient, masked_frame, upgrade_request
from wsproto.events import AcceptConnection, Ping, Pong, Request, TextMessage

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


# ---------------------------------------------------------------- the writer task


class _Listener(trio.abc.Listener[trio.abc.Stream]):
    """Hands the relay the streams a test makes, as if accepted from a socket."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](10)

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        await self._receive.aclose()


class _RelaySide(trio.abc.Stream):
    """The relay's end of a :func:`trio.testing.lockstep_stream_pair` (no ``send_nowait``:
    every write goes through the writer task), with a ``send_all`` that a test bends: it
    can fail once (``fail_at``: the number of the call), and cancelled, it takes
    ``linger`` seconds (shielded) to give up."""

    inner: trio.abc.Stream  # set by _open

    def __init__(self, *, fail_at: int = 0, linger: float = 0) -> None:
        self.fail_at, self.linger, self.sends = fail_at, linger, 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends += 1
        if self.sends == self.fail_at:
            raise RuntimeError("simulated writer failure")
        try:
            await self.inner.send_all(data)
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await trio.sleep(self.linger)
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _TaskEnds(trio.abc.Instrument):
    """When each task ended (virtual time), by name."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, float]] = []

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self.ended.append((task.name, trio.current_time()))


def _tasks_named(part: str) -> list[trio.lowlevel.Task]:
    found, todo = [], [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        assert task is not None
        found += [task] if part in task.name else []
        todo += [child for nursery in task.child_nurseries for child in nursery.child_tasks]
    return found


async def _open(listener: _Listener, stream: _RelaySide) -> RawClient:
    """Connect ``stream``'s other end as a raw client of ``/``, past the 101."""
    client, stream.inner = trio.testing.lockstep_stream_pair()
    await listener._send.send(stream)
    raw = RawClient(client)
    await raw.send(Request(host=HOST, target="/"))
    assert isinstance(await raw.next_event(), AcceptConnection)
    return raw


async def test_the_writer_runs_in_the_relays_nursery_and_ends_before_its_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A writer that takes 5 s to give up once cancelled, on a relay that allows 1 s for
    # a close: its connection waits for it all the same (as it would for a task of a
    # nursery of its own), and so ends after it.
    ends = _TaskEnds()
    trio.lowlevel.add_instrument(ends)
    listener = _Listener()
    config = RelayConfig(close_timeout=1, ping_interval=0)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_relay, config=config, listeners=[listener]))
        stream = _RelaySide(linger=5)
        client = await _open(listener, stream)
        await server.wait_until(lambda s: s.subscribers == 1)
        assert not _tasks_named("_run_writer")  # idle: the connection's task only
        await server.publish("queued: the client does not read")
        await trio.testing.wait_all_tasks_blocked()
        (writer,) = _tasks_named("_run_writer")
        (connection,) = _tasks_named("RelayServer._serve")
        assert not connection.child_nurseries  # no nursery of its own
        assert writer.parent_nursery is not None
        assert writer.parent_nursery.parent_task is not connection
        await client.send_raw(b"\x81\x01x")  # an unmasked frame: close 1002, cancels the writer
        started = trio.current_time()
        await server.wait_until(lambda s: s.connections == 0)
        trio.lowlevel.remove_instrument(ends)
        times = {name.rpartition(".")[2]: at - started for name, at in ends.ended}
        assert times["_run_writer"] == 5
        assert times["_serve"] >= times["_run_writer"]
        nursery.cancel_scope.cancel()


async def test_a_writer_that_fails_ends_its_connection_alone(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # A failure in a writer task (in the relay's shared nursery) is that connection's
    # failure alone: logged, and the connection closed (here without a close frame: the
    # failed write may have left half a frame on the stream); the relay serves on.
    listener = _Listener()
    config = RelayConfig(ping_interval=0)  # the test's clients answer no ping
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_relay, config=config, listeners=[listener]))
        bystander = await _open(listener, _RelaySide())
        failing = await _open(listener, _RelaySide(fail_at=2))
        await server.wait_until(lambda s: s.subscribers == 2)
        async with trio.open_nursery() as readers:
            readers.start_soon(server.publish, "one")
            assert await bystander.next_message() == "one"
            assert await failing.read_to_eof() == b""
        await server.wait_until(lambda s: s.connections == 1)
        assert "writer failed" in caplog.text and "simulated writer failure" in caplog.text
        await server.publish("two")
        assert await bystander.next_message() == "two"
        nursery.cancel_scope.cancel()
