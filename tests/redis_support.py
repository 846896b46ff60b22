"""A real ``redis-server`` for the backplane's integration tests.

Each test starts its own server on a free port of 127.0.0.1 with no persistence (so a
restart loses its data, the hardest case for the relays) and stops it afterwards. Where
there is no ``redis-server`` the tests skip, saying how to install it; CI sets
TRIO_RELAY_REQUIRE_INTEGRATION=1, which turns that skip into a failure.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import unavailable

READY = b"Ready to accept connections"
START_TIMEOUT = 10.0


def redis_server_or_skip() -> str:
    """The path of ``redis-server``, or skip (fail under CI) saying how to install it."""
    path = shutil.which("redis-server")
    if path is None:
        unavailable("redis-server not found: install it with `apt-get install redis-server`")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process that a test can kill and start again on the same port."""

    def __init__(self, executable: str, directory: Path) -> None:
        self.executable = executable
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and return once it accepts connections (its own log says so)."""
        assert self.process is None
        process = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.process = process
        assert process.stdout is not None
        output = b""
        deadline = time.monotonic() + START_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while READY not in output:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    self.stop()
                    raise RuntimeError(f"redis-server did not start: {output.decode()!r}")
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    self.stop()
                    raise RuntimeError(f"redis-server exited: {output.decode()!r}")
                output += chunk

    def kill(self) -> None:
        """Kill the server at once (SIGKILL): its data is lost, its clients cut off."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
            assert self.process.stdout is not None
            self.process.stdout.close()
            self.process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a frozen server cannot die otherwise
        self.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(redis_server_or_skip(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
