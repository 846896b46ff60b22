"""``trio-relay serve --workers N``: N relay processes on one port, supervised.

The supervisor binds the port first (``SO_REUSEPORT``, without listening: it reserves the
port, and with port 0 learns which one), then runs N copies of ``trio-relay serve`` that each
listen on it with ``SO_REUSEPORT``, so the kernel spreads new connections over them. They
share topics through the backplane. A worker that exits while the supervisor runs is
started again, after a backoff (1 s doubling to 30 s, reset once a worker ran 30 s). SIGINT
or SIGTERM to the supervisor sends SIGTERM to every worker, which drain their clients
(close 1001) as a lone relay does, and waits for them; one that is still running after
``close_timeout`` + 5 s is killed. Workers ignore SIGINT (Ctrl-C signals the whole process
group), and stop by themselves when the supervisor's pipe on their stdin closes, so a
killed supervisor leaves no orphans.

With ``--http-port``, the supervisor serves the relay's one HTTP port and the workers
serve theirs on private Unix sockets behind it (see :mod:`trio_relay._aggregate`): one
scrape target for the whole relay.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from functools import partial

import trio

from ._aggregate import serve_workers_http

__all__ = ["reserve_port", "supervise"]

logger = logging.getLogger("trio_relay")

RESTART_BACKOFF = (1.0, 30.0)
"""First delay before restarting a worker that exited, and the cap of its doubling."""
STABLE_AFTER = 30.0
"""Seconds a worker must run for its restart backoff to start over."""


def reserve_port(host: str | None, port: int) -> list[socket.socket]:
    """Bind ``host``:``port`` with ``SO_REUSEPORT`` on every address, without listening.

    The sockets keep the port (another program cannot take it) while the workers listen on
    it; bound but not listening, they get no connections. Port 0 picks one port for all.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in infos:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    continue  # no IPv6 here, say: as trio.open_tcp_listeners does
                raise
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def _stop(grace: float, process: trio.Process) -> None:
    """How a worker is cancelled: SIGTERM (it drains its clients), then SIGKILL."""
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(grace):
        await process.wait()
        return
    logger.warning("worker pid %d still running after %.0f s: killing it", process.pid, grace)
    process.kill()


async def stop_with_supervisor(cancel_scope: trio.CancelScope) -> None:
    """In a worker: cancel ``cancel_scope`` (the relay drains as on SIGTERM) once stdin,
    the supervisor's pipe, reaches its end: the supervisor is gone, even if killed."""
    # trio.lowlevel.FdStream: trio's one way to read an inherited pipe without a thread.
    # tests/test_end_to_end.py kills a supervisor and checks that its workers stop.
    async with trio.lowlevel.FdStream(os.dup(0)) as pipe:
        while await pipe.receive_some():
            pass
    logger.warning("the supervisor is gone: shutting down")
    cancel_scope.cancel()


async def _run_worker(index: int, command: Sequence[str], grace: float) -> None:
    """Run worker ``index`` until cancelled, starting it again whenever it exits."""
    delay = RESTART_BACKOFF[0]
    environment = {**os.environ, "TRIO_RELAY_WORKER": str(index)}
    while True:
        started = trio.current_time()
        # The worker's stdin: a pipe whose other end only this process holds (os.pipe's
        # ends are not inherited), so the worker sees its end when this process ends.
        worker_end, own_end = os.pipe()
        try:
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        command,
                        check=False,
                        env=environment,
                        stdin=worker_end,
                        deliver_cancel=partial(_stop, grace),
                    )
                )
                os.close(worker_end)
                worker_end = -1
                logger.info("worker %d started: pid %d", index, process.pid)
        finally:
            for fd in (worker_end, own_end):
                if fd >= 0:
                    os.close(fd)
        code = process.returncode
        if trio.current_time() - started >= STABLE_AFTER:
            delay = RESTART_BACKOFF[0]
        logger.error("worker %d exited (status %d): restarting it in %.0f s", index, code, delay)
        await trio.sleep(delay)
        delay = min(delay * 2, RESTART_BACKOFF[1])


async def supervise(
    count: int,
    argv: Sequence[str],
    port: int,
    http_port: int | None,
    grace: float,
    *,
    http_host: str | None = "127.0.0.1",
    http_max_connections: int = 64,
    http_request_timeout: float = 10.0,
) -> int:
    """Run ``count`` workers (``trio-relay serve`` with ``argv``, on ``port``) until SIGINT
    or SIGTERM, then stop them all (each gets ``grace`` seconds to drain); return the exit
    status (1 if the HTTP port cannot be bound, 0 otherwise).

    With ``http_port``, each worker serves its HTTP side port on a Unix socket of a private
    directory, and this process serves ``http_host``:``http_port`` for the whole relay
    (see :mod:`trio_relay._aggregate`), bounded by ``http_max_connections`` and
    ``http_request_timeout`` as a relay's side port is.
    """
    listeners: list[trio.SocketListener] = []
    if http_port is not None:
        try:
            listeners = await trio.open_tcp_listeners(http_port, host=http_host)
        except OSError as exc:
            where = (
                f"[{http_host}]:{http_port}"
                if ":" in str(http_host)
                else f"{http_host}:{http_port}"
            )
            logger.error("--http-port: cannot listen on %s: %s", where, exc.strerror or exc)
            return 1
    with contextlib.ExitStack() as stack:
        sockets: list[str] = []
        if http_port is not None:
            # mkdtemp makes it 0700: only this user reaches the workers' side ports.
            directory = tempfile.mkdtemp(prefix="trio-relay-")
            stack.callback(shutil.rmtree, directory, ignore_errors=True)
            sockets = [os.path.join(directory, f"worker-{index}.sock") for index in range(count)]
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                for index in range(count):
                    command = [
                        sys.executable,
                        "-m",
                        "trio_relay",
                        "serve",
                        *argv,
                        "--port",
                        str(port),
                        "--workers",
                        "1",
                        "--worker",
                    ]
                    if sockets:
                        command += ["--http-socket", sockets[index]]
                    nursery.start_soon(_run_worker, index, command, grace)
                if listeners:
                    await nursery.start(
                        partial(
                            serve_workers_http,
                            sockets,
                            listeners,
                            max_connections=http_max_connections,
                            request_timeout=http_request_timeout,
                        )
                    )
                    for listener in listeners:
                        host, bound = listener.socket.getsockname()[:2]
                        logger.info(
                            "HTTP port of all %d workers on http://%s:%d/ (/metrics, /healthz, "
                            "console, API)",
                            count,
                            host,
                            bound,
                        )
                logger.info("supervising %d workers on port %d", count, port)
                async for signum in signals:
                    logger.info(
                        "%s received: stopping %d workers", signal.Signals(signum).name, count
                    )
                    nursery.cancel_scope.cancel()
                    break
    logger.info("all workers stopped")
    return 0
