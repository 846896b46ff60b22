"""The accept loop of the relay's listeners (and the side port's), and a log throttle.

What :func:`trio.serve_listeners` does, with one difference: when ``accept`` fails for
want of resources (``EMFILE``, ``ENFILE``, ``ENOBUFS``, ``ENOMEM``: out of descriptors or
kernel memory), trio logs an ERROR with a traceback every 100 ms for as long as it lasts,
which is thousands of lines a minute while a flood holds the descriptors. Here the loop
backs off (:data:`ACCEPT_BACKOFF`: 50 ms doubling to 1 s), logs at most one line per
:data:`LOG_INTERVAL` (saying how many failures it stands for), and says once that it
accepts again when it does.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import trio

__all__ = ["ACCEPT_BACKOFF", "CAPACITY_ERRNOS", "LOG_INTERVAL", "LogThrottle", "serve_listeners"]

logger = logging.getLogger("trio_relay")

CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""``accept`` errors that mean "not now": the loop waits and tries again."""
ACCEPT_BACKOFF = (0.05, 1.0)
"""First wait after such an error, in seconds, and the cap of its doubling."""
LOG_INTERVAL = 10.0
"""Seconds between two log lines of one throttle."""

StreamT = TypeVar("StreamT", bound=trio.abc.AsyncResource)


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
