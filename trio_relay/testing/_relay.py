"""A real relay server over in-memory connections, for deterministic tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_websocket

from .._client import DEFAULT_TIMEOUT, Headers, consume, produce
from .._config import RelayConfig
from .._hooks import Authorize, OnPublish
from .._server import RelayServer, serve_relay
from .._topics import DeliveryReport
from ._streams import DEFAULT_CAPACITY, MemoryListener

__all__ = ["MemoryRelay", "open_memory_relay"]


class MemoryRelay:
    """A running :func:`serve_relay` whose only listener is a :class:`MemoryListener`.

    Nothing touches a socket and nothing waits on real time, so tests using it run under
    ``trio.testing.MockClock(autojump_threshold=0)`` (pytest-trio's ``autojump_clock``
    fixture) and can assert exact virtual times. Get one from :func:`open_memory_relay`
    or the ``memory_relay`` pytest fixture.
    """

    url = "ws://relay.test/"
    """The URL clients are told they connect to (only its path matters)."""

    def __init__(
        self,
        server: RelayServer,
        listener: MemoryListener,
        cancel_scope: trio.CancelScope,
        stopped: trio.Event,
    ) -> None:
        self.server = server
        self.listener = listener
        self._cancel_scope = cancel_scope
        self._stopped = stopped

    async def shutdown(self) -> None:
        """Stop the relay as cancellation does, and wait until it has stopped.

        New connections are refused at once; every client gets close 1001 and has
        ``close_timeout`` seconds to answer before its connection is aborted.
        """
        self._cancel_scope.cancel()
        await self._stopped.wait()

    async def drop_connections(self) -> int:
        """Cut every client's connection abruptly, as a network failure would (no close
        frame); return how many were cut. For testing reconnection and resume."""
        return await self.listener.drop_connections()

    async def open_stream(self) -> trio.abc.Stream:
        """A raw in-memory connection to the relay, for speaking bytes at it directly."""
        return await self.listener.connect()

    @asynccontextmanager
    async def connect(
        self, path: str = "/", *, message_queue_size: int = 1
    ) -> AsyncIterator[trio_websocket.WebSocketConnection]:
        """A trio-websocket client connection, open for the ``async with`` block.

        A test that never calls ``get_message()`` has a consumer that stops reading: its
        connection holds ``message_queue_size`` messages, then the in-memory pipe fills and
        the relay's writes to it block, as with a real socket.
        """
        stream = await self.open_stream()
        async with trio.open_nursery() as nursery:
            connection = await trio_websocket.wrap_client_stream(
                nursery,
                stream,  # type: ignore[arg-type]  # typed for sockets, documented for any stream
                "relay.test",
                path,
                message_queue_size=message_queue_size,
            )
            try:
                yield connection
            finally:
                with trio.move_on_after(self.server.config.close_timeout):
                    await connection.aclose()
                nursery.cancel_scope.cancel()

    @asynccontextmanager
    async def consume(
        self,
        topic: str = "",
        *,
        envelope: bool = False,
        since: int | None = None,
        resume: bool = False,
        connect_timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        headers: Headers | None = None,
    ) -> AsyncIterator[AsyncIterator[Any]]:
        """:func:`trio_relay.consume` against this relay (in-memory connections), with the
        ``token`` and ``headers`` a relay with a secret or an ``authorize`` hook asks for."""
        url = self.url + topic
        if resume:
            cm = consume(
                url,
                connect_timeout=connect_timeout,
                since=since,
                resume=True,
                connector=self.open_stream,
                token=token,
                headers=headers,
            )
        else:
            cm = consume(
                url,
                connect_timeout=connect_timeout,
                stream=await self.open_stream(),
                envelope=envelope,
                since=since,
                token=token,
                headers=headers,
            )
        async with cm as messages:
            yield messages

    async def produce(
        self,
        message: str | bytes,
        topic: str = "",
        *,
        envelope: bool = False,
        echo: bool = True,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - passed on to produce()
        token: str | None = None,
        headers: Headers | None = None,
    ) -> DeliveryReport | None:
        """:func:`trio_relay.produce` against this relay (in-memory connections), with
        ``token`` and ``headers`` as :meth:`consume` has them."""
        return await produce(
            self.url + topic,
            message,
            timeout=timeout,
            stream=await self.open_stream(),
            envelope=envelope,
            echo=echo,
            token=token,
            headers=headers,
        )

    async def publish(self, message: str | bytes, topic: str = "") -> DeliveryReport:
        """Publish from the server side, as if a client had sent ``message`` to ``topic``."""
        return await self.server.publish(message, topic)


@asynccontextmanager
async def open_memory_relay(
    config: RelayConfig | None = None,
    *,
    capacity: int = DEFAULT_CAPACITY,
    authorize: Authorize | None = None,
    on_publish: OnPublish | None = None,
) -> AsyncIterator[MemoryRelay]:
    """Run a relay over in-memory connections for the ``async with`` block.

    ``capacity`` is the bytes each direction of each connection buffers (a socket's
    buffers, in effect). ``authorize`` and ``on_publish`` are the application's hooks, as
    :func:`~trio_relay.serve_relay` takes them (to test yours). On exit the relay shuts
    down as on cancellation: clients get 1001.
    """
    listener = MemoryListener(capacity)
    cancel_scope = trio.CancelScope()
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[RelayServer]) -> None:
        try:
            with cancel_scope:
                await serve_relay(
                    config=config,
                    listeners=[listener],
                    authorize=authorize,
                    on_publish=on_publish,
                    task_status=task_status,
                )
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:
        server: RelayServer = await nursery.start(run)
        try:
            yield MemoryRelay(server, listener, cancel_scope, stopped)
        finally:
            cancel_scope.cancel()
