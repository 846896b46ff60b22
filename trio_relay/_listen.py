"""Accepting and refusing connections: the accept loop of the relay's listeners (and the
side port's), a refusal that waits for nothing, non-blocking writes, and a log throttle.

The accept loop does what :func:`trio.serve_listeners` does, with one difference: when
``accept`` fails for want of resources (``EMFILE``, ``ENFILE``, ``ENOBUFS``, ``ENOMEM``:
out of descriptors or kernel memory), trio logs an ERROR with a traceback every 100 ms for
as long as it lasts, which is thousands of lines a minute while a flood holds the
descriptors. Here the loop backs off (:data:`ACCEPT_BACKOFF`: 50 ms doubling to 1 s), logs
at most one line per :data:`LOG_INTERVAL` (saying how many failures it stands for), and
says when it accepts again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import trio

__all__ = [
    "ACCEPT_BACKOFF",
    "CAPACITY_ERRNOS",
    "LOG_INTERVAL",
    "LogThrottle",
    "nowait_sender",
    "peer_name",
    "refuse_at_once",
    "serve_listeners",
]

logger = logging.getLogger("trio_relay")

CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""``accept`` errors that mean "not now": the loop waits and tries again."""
ACCEPT_BACKOFF = (0.05, 1.0)
"""First wait after such an error, in seconds, and the cap of its doubling."""
LOG_INTERVAL = 10.0
"""Seconds between two log lines of one throttle."""

StreamT = TypeVar("StreamT", bound=trio.abc.AsyncResource)


def nowait_sender(stream: trio.abc.Stream) -> Callable[[bytes], int] | None:
    """A function that writes what it can of some bytes *now*, without blocking, or None.

    For a plain :class:`trio.SocketStream` this is ``os.write`` on its file descriptor:
    trio keeps its sockets non-blocking (``tests/test_connection.py`` checks this, since
    a blocking socket here would freeze the event loop), and trio's own ``send_all`` is
    never running on it at the same time, because every write of a connection holds its
    write slot. Python ignores SIGPIPE, so a vanished peer is an ``OSError``. Streams of
    :mod:`trio_relay.testing` offer ``send_nowait``. Anything else (TLS streams, say)
    gets ``None``: every write then goes through the writer task.
    """
    if type(stream) is trio.SocketStream:
        fd = stream.socket.fileno()

        def write_now(data: bytes) -> int:
            try:
                return os.write(fd, data)
            except BlockingIOError:
                return 0

        return write_now
    send_nowait = getattr(getattr(stream, "send_stream", None), "send_nowait", None)
    return send_nowait if callable(send_nowait) else None


async def refuse_at_once(stream: trio.abc.Stream, response: bytes) -> None:
    """Write ``response`` (a short HTTP response) if the stream takes it without waiting,
    then close the stream: for a connection refused the moment it is accepted.

    Nothing here waits on the client, so a refusal frees its descriptor at once. A fresh
    socket's buffer always has room for a few hundred bytes; a TLS stream gets no response
    (it would need the TLS handshake first). What the client already sent is read and
    discarded first, where that is possible without waiting, so that the close does not
    turn into a reset that could destroy the response before the client reads it.
    """
    send_nowait = nowait_sender(stream)
    if send_nowait is not None:
        if type(stream) is trio.SocketStream:
            with contextlib.suppress(OSError):
                os.read(stream.socket.fileno(), 65536)
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            send_nowait(response)
    await trio.aclose_forcefully(stream)


def peer_name(stream: trio.abc.Stream) -> str:
    """``host:port`` of the remote end for socket streams, a short tag for anything else."""
    inner: object = stream
    while isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    if isinstance(inner, trio.SocketStream):
        try:
            address = inner.socket.getpeername()
        except OSError:
            return "unknown"
        if isinstance(address, tuple):
            host, port = address[0], address[1]
            return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        return str(address) or "unix"
    return "in-memory"


class LogThrottle:
    """Lets a kind of log line through at most once per ``interval`` seconds (trio time),
    counting the ones it held back so that the next line can say how many."""

    __slots__ = ("_next", "held_back", "interval")

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._next = -float("inf")
        self.held_back = 0
        """Lines held back since the last one let through."""

    def log(self, log: logging.Logger, level: int, message: str, *args: object) -> bool:
        """Log ``message % args`` at ``level`` if the interval has passed since the last
        line, with "(and N more like it)" when lines were held back; else count it."""
        now = trio.current_time()
        if now < self._next:
            self.held_back += 1
            return False
        if self.held_back:
            message += " (and %d more like it in the last %.0f s)"
            args = (*args, self.held_back, self.interval)
        log.log(level, message, *args)
        self.held_back = 0
        self._next = now + self.interval
        return True


async def _accept_loop(
    listener: trio.abc.Listener[StreamT],
    nursery: trio.Nursery,
    handler: Callable[[StreamT], Awaitable[object]],
    what: str,
) -> NoReturn:
    throttle = LogThrottle()
    delay = ACCEPT_BACKOFF[0]
    failures = 0
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                failures += 1
                throttle.log(
                    logger,
                    logging.ERROR,
                    "%s cannot accept connections: %s (%s); retrying in up to %.0f s",
                    what,
                    errno.errorcode.get(exc.errno, exc.errno),
                    os.strerror(exc.errno),
                    ACCEPT_BACKOFF[1],
                )
                await trio.sleep(delay)
                delay = min(delay * 2, ACCEPT_BACKOFF[1])
                continue
            if failures:
                throttle.log(
                    logger,
                    logging.WARNING,
                    "%s accepts connections again, after %d failed accepts",
                    what,
                    failures,
                )
                failures = 0
                delay = ACCEPT_BACKOFF[0]
            nursery.start_soon(handler, stream)


async def serve_listeners(
    handler: Callable[[StreamT], Awaitable[object]],
    listeners: Sequence[trio.abc.Listener[Any]],
    *,
    what: str = "the relay",
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept connections on every listener and run ``handler(stream)`` for each in a task
    of its own, until cancelled; the listeners are closed on the way out.

    ``handler`` must contain its own failures (an exception from it ends the server) and
    close the stream. Other ``accept`` errors than :data:`CAPACITY_ERRNOS` propagate.
    ``what`` names the server in log lines.
    """
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, nursery, handler, what)
        task_status.started()
    raise AssertionError("unreachable")  # pragma: no cover
