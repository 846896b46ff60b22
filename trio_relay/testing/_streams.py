"""In-memory streams that behave like a TCP connection, and a listener that hands them out.

``trio.testing.memory_stream_pair`` buffers without limit, so a peer that stops reading
never pushes back. These pipes hold at most ``capacity`` bytes per direction, like a
socket's kernel buffers: a writer whose reader stops blocks once the pipe is full, which
is exactly what a relay has to survive.
"""

from __future__ import annotations

import math
import operator
import weakref

import trio

__all__ = ["MemoryListener", "MemoryStream", "socket_like_stream_pair"]

DEFAULT_CAPACITY = 64 * 1024

MemoryStream = trio.StapledStream[trio.abc.SendStream, trio.abc.ReceiveStream]
"""The type of both ends of a :func:`socket_like_stream_pair`."""


class _Pipe:
    """One direction of a connection: a bounded byte buffer and who closed what."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.buffer = bytearray()
        self.writer_closed = False
        self.reader_closed = False
        self._changed = trio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_change(self) -> None:
        await self._changed.wait()


class _PipeSendStream(trio.abc.SendStream):
    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe
        self._busy = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``, waiting for room; a cancelled call may have written part of it."""
        if self._busy:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._busy = True
        try:
            await trio.sleep(0)
            view = memoryview(data)
            pipe = self._pipe
            while True:
                if pipe.writer_closed:
                    raise trio.ClosedResourceError("this stream was closed")
                if pipe.reader_closed:
                    raise trio.BrokenResourceError("the receiving end was closed")
                room = pipe.capacity - len(pipe.buffer)
                if room > 0 and view:
                    pipe.buffer += view[:room]
                    view = view[room:]
                    pipe.notify()
                if not view:
                    return
                await pipe.wait_for_change()
        finally:
            self._busy = False

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Append as much of ``data`` as fits now, without waiting; return how much.

        Like a non-blocking socket's ``send``. The relay uses it (when a stream offers it)
        to write to an idle client synchronously; see ``trio_relay._connection``.
        """
        if self._busy:
            raise trio.BusyResourceError("another task is already sending on this stream")
        pipe = self._pipe
        if pipe.writer_closed:
            raise trio.ClosedResourceError("this stream was closed")
        if pipe.reader_closed:
            raise trio.BrokenResourceError("the receiving end was closed")
        taken = min(len(data), pipe.capacity - len(pipe.buffer))
        if taken > 0:
            pipe.buffer += memoryview(data)[:taken]
            pipe.notify()
        return max(taken, 0)

    async def wait_send_all_might_not_block(self) -> None:
        if self._busy:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._busy = True
        try:
            await trio.sleep(0)
            pipe = self._pipe
            while True:
                if pipe.writer_closed:
                    raise trio.ClosedResourceError("this stream was closed")
                if pipe.reader_closed or len(pipe.buffer) < pipe.capacity:
                    return
                await pipe.wait_for_change()
        finally:
            self._busy = False

    async def aclose(self) -> None:
        self._pipe.writer_closed = True
        self._pipe.notify()
        await trio.sleep(0)


class _PipeReceiveStream(trio.abc.ReceiveStream):
    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe
        self._busy = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Wait for bytes; ``b""`` once the writer closed and everything was read."""
        if self._busy:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be at least 1")
        self._busy = True
        try:
            await trio.sleep(0)
            pipe = self._pipe
            while True:
                if pipe.reader_closed:
                    raise trio.ClosedResourceError("this stream was closed")
                if pipe.buffer:
                    count = len(pipe.buffer) if max_bytes is None else max_bytes
                    data = bytes(pipe.buffer[:count])
                    del pipe.buffer[:count]
                    pipe.notify()
                    return data
                if pipe.writer_closed:
                    return b""
                await pipe.wait_for_change()
        finally:
            self._busy = False

    async def aclose(self) -> None:
        self._pipe.reader_closed = True
        self._pipe.buffer.clear()
        self._pipe.notify()
        await trio.sleep(0)


def _open(end: MemoryStream) -> bool:
    """Whether the owner of ``end`` has not closed it (its sending side, at least)."""
    send = end.send_stream
    return isinstance(send, _PipeSendStream) and not send._pipe.writer_closed


def socket_like_stream_pair(
    capacity: int = DEFAULT_CAPACITY,
) -> tuple[MemoryStream, MemoryStream]:
    """Two connected in-memory streams, each direction buffering at most ``capacity`` bytes.

    Closing one end makes the other end read EOF, and makes writes to the closed end's
    direction raise :class:`trio.BrokenResourceError`, as with TCP.
    """
    a_to_b, b_to_a = _Pipe(capacity), _Pipe(capacity)
    a: MemoryStream = trio.StapledStream(_PipeSendStream(a_to_b), _PipeReceiveStream(b_to_a))
    b: MemoryStream = trio.StapledStream(_PipeSendStream(b_to_a), _PipeReceiveStream(a_to_b))
    return a, b


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A :class:`trio.abc.Listener` for in-memory connections made with :meth:`connect`.

    Hand it to ``serve_relay(listeners=[listener])``; each :meth:`connect` returns the
    client end of a :func:`socket_like_stream_pair` whose other end the server accepts.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._send, self._receive = trio.open_memory_channel[MemoryStream](math.inf)
        # The ends accepted, for drop_connections: weakly, to keep no memory alive.
        self._accepted: weakref.WeakSet[MemoryStream] = weakref.WeakSet()

    async def connect(self) -> trio.abc.Stream:
        """Open a connection; raises :class:`trio.ClosedResourceError` once the listener closed."""
        client, server = socket_like_stream_pair(self.capacity)
        try:
            self._send.send_nowait(server)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise trio.ClosedResourceError("the listener is closed") from None
        await trio.sleep(0)
        return client

    async def accept(self) -> trio.abc.Stream:
        try:
            stream = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("the listener is closed") from None
        self._accepted.add(stream)
        return stream

    async def drop_connections(self) -> int:
        """Close abruptly every accepted end the server has not closed yet, as a network
        failure would (no close frame); return how many. For testing reconnection."""
        ends = [end for end in self._accepted if _open(end)]
        self._accepted.clear()
        for end in ends:
            await trio.aclose_forcefully(end)
        return len(ends)

    async def aclose(self) -> None:
        self._receive.close()
        self._send.close()
        await trio.sleep(0)
