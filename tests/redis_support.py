"""A real ``redis-server`` for the backplane's integration tests, and a TCP proxy to cut
one relay off from it.

Each test starts its own server on a free port of 127.0.0.1 with no automatic persistence
(so a restart loses its data, the hardest case for the relays, unless the test saves an
RDB snapshot first: :meth:`RedisServer.save`) and stops it afterwards. Where there is no
``redis-server`` the tests skip, saying how to install it; CI sets
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
import trio
from helpers import unavailable

READY = b"Ready to accept connections"
START_TIMEOUT = 10.0


def redis_server_or_skip() -> str:
    """The path of ``redis-server``, or skip (fail under CI) saying how to install it."""
    path = shutil.which("redis-server")
    if path is None:
        unavailable("redis-server not found: install it with `apt-get install redis-server`")
    return path


def free_port(below: int = 65536) -> int:
    """A port of 127.0.0.1 free now, below ``below``: a cluster node also listens 10,000
    ports higher, so its port must be at most 55535."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port < below:
            return port


class RedisServer:
    """One ``redis-server`` process that a test can kill and start again on the same port."""

    def __init__(self, executable: str, directory: Path, *options: str) -> None:
        self.executable = executable
        self.directory = directory
        self.options = options
        """More command-line options of the server (``--cluster-enabled yes``, say)."""
        self.port = free_port(55536 if "--cluster-enabled" in options else 65536)
        self.process: subprocess.Popen[bytes] | None = None
        self._log = b""  # what the server logged past the last line waited for

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
                *self.options,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.process = process
        self._log = b""
        self.wait_for_log(READY)

    def wait_for_log(self, line: bytes) -> None:
        """Return once the server's log (its standard output) says ``line``, read as it
        comes (bounded by START_TIMEOUT), after the line waited for last (what came after
        that is kept, so that no line is missed for having come in the same read)."""
        process = self.process
        assert process is not None and process.stdout is not None
        output = self._log
        deadline = time.monotonic() + START_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while line not in output:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    self.stop()
                    raise RuntimeError(f"redis-server did not log {line!r}: {output.decode()!r}")
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    self.stop()
                    raise RuntimeError(f"redis-server exited: {output.decode()!r}")
                output += chunk
        self._log = output[output.index(line) + len(line) :]

    def command(self, *args: str) -> bytes:
        """Run one command (RESP over a plain socket, bounded by START_TIMEOUT) and return
        its answer: a status or error line as sent (``+OK``, ``-ERR ...``), an integer as
        ``:N``, a bulk string's value (``b""`` for none)."""
        return self.commands(args)[0]

    def commands(self, *commands: tuple[str, ...]) -> list[bytes]:
        """Run ``commands`` one after the other on one connection (``WAIT`` counts the
        replicas that have the connection's writes); their answers, as :meth:`command`."""
        request = b"".join(
            f"*{len(args)}\r\n".encode()
            + b"".join(f"${len(arg.encode())}\r\n{arg}\r\n".encode() for arg in args)
            for args in commands
        )
        answers: list[bytes] = []
        with socket.create_connection(("127.0.0.1", self.port), timeout=START_TIMEOUT) as conn:
            conn.sendall(request)
            received = b""
            while len(answers) < len(commands):
                line, _, rest = received.partition(b"\r\n")
                if _ and not line.startswith(b"$"):
                    answers.append(line)
                    received = rest
                    continue
                if _ and (int(line[1:]) < 0 or len(rest) >= int(line[1:]) + 2):
                    answers.append(rest[: max(int(line[1:]), 0)])
                    received = rest[max(int(line[1:]), 0) + 2 if int(line[1:]) >= 0 else 0 :]
                    continue
                chunk = conn.recv(65536)
                if not chunk:
                    raise ConnectionError(f"redis-server closed the connection: {received!r}")
                received += chunk
        return answers

    def save(self) -> None:
        """Write an RDB snapshot (``SAVE``): the next :meth:`start` after a :meth:`kill`
        loads it, as a Redis restarted with its data does."""
        assert self.command("SAVE") == b"+OK"

    def forget_data(self) -> None:
        """Delete the snapshot, if any: the next start is empty."""
        (self.directory / "dump.rdb").unlink(missing_ok=True)

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


class Proxy:
    """A TCP proxy in the test's own trio run, between one relay and Redis: :meth:`cut`
    drops every connection through it and refuses new ones (Redis looks unreachable to
    that relay alone), :meth:`heal` lets them through again. Start it with
    ``await nursery.start(proxy.run)``; :attr:`url` is the Redis URL to give the relay."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.open = True
        self._scopes: set[trio.CancelScope] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, client: trio.SocketStream) -> None:
        async with client:
            if not self.open:
                return
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target)
            except OSError:
                return
            async with upstream:
                with trio.CancelScope() as scope:
                    self._scopes.add(scope)
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._pump, client, upstream, nursery)
                            nursery.start_soon(self._pump, upstream, client, nursery)
                    finally:
                        self._scopes.discard(scope)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, nursery: trio.Nursery
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        nursery.cancel_scope.cancel()  # one side ended: end both

    def cut(self) -> None:
        """Drop every connection through the proxy, and refuse new ones until healed."""
        self.open = False
        for scope in list(self._scopes):
            scope.cancel()

    def heal(self) -> None:
        self.open = True


@pytest.fixture
def redis_cluster_node(tmp_path: Path) -> Iterator[RedisServer]:
    """A one-node Redis Cluster holding every slot: it refuses, as a cluster does, any
    command or script whose keys are not all in one slot (``CROSSSLOT``)."""
    server = RedisServer(
        redis_server_or_skip(),
        tmp_path,
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        str(tmp_path / "nodes.conf"),
    )
    server.start()
    try:
        assert server.command("CLUSTER", "ADDSLOTSRANGE", "0", "16383") == b"+OK"
        server.wait_for_log(b"Cluster state changed: ok")
        yield server
    finally:
        server.stop()


class RedisCluster:
    """Three ``redis-server --cluster-enabled yes`` nodes, each in a directory of its own
    (its ``nodes.conf``, its port), holding a third of the slots each (:attr:`ranges`),
    joined with ``CLUSTER MEET``: a real multi-node Redis Cluster, on which a client that
    ignores the cluster gets ``MOVED``; with ``replica=True``, a fourth node replicates the
    first (:attr:`replica`). A node killed (:meth:`RedisServer.kill`) and started again
    (:meth:`restart`) comes back with its slots (its ``nodes.conf``) and no data."""

    ranges = ((0, 5460), (5461, 10922), (10923, 16383))
    """The slots of each node, first to last, inclusive."""

    def __init__(self, executable: str, directory: Path, *, replica: bool = False) -> None:
        self.nodes: list[RedisServer] = []
        """The primaries, in the order of :attr:`ranges`."""
        self.replica: RedisServer | None = None
        for index in range(len(self.ranges) + replica):
            home = directory / f"node{index}"
            home.mkdir()
            self.nodes.append(
                RedisServer(
                    executable,
                    home,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(home / "nodes.conf"),
                    # A dead node is marked failing after 1 s, not 15; the others go on
                    # serving their slots meanwhile (by default they would refuse every
                    # command): what a relay does about a dead node is its own doing.
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-require-full-coverage",
                    "no",
                    "--repl-diskless-sync-delay",  # a replica syncs at once, not after 5 s
                    "0",
                )
            )
        if replica:
            self.replica = self.nodes.pop()

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL naming the first node (the client discovers the rest)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def node_of(self, slot: int) -> RedisServer:
        """The node that holds ``slot``."""
        for node, (first, last) in zip(self.nodes, self.ranges, strict=True):
            if first <= slot <= last:
                return node
        raise ValueError(f"no slot {slot}")

    def start(self) -> None:
        """Start every node, give each its slots, join them, and return once every node's
        log says the cluster is ok."""
        for node, (first, last) in zip(self.nodes, self.ranges, strict=True):
            node.start()
            answer = node.command("CLUSTER", "ADDSLOTSRANGE", str(first), str(last))
            assert answer == b"+OK", answer
        everyone = [*self.nodes, *([self.replica] if self.replica else [])]
        if self.replica is not None:
            self.replica.start()
        for node in everyone[1:]:
            answer = node.command("CLUSTER", "MEET", "127.0.0.1", str(self.nodes[0].port))
            assert answer == b"+OK", answer
        for node in everyone:
            node.wait_for_log(b"Cluster state changed: ok")
        if self.replica is not None:
            # It knows the first node now (it saw every slot's owner): it replicates it.
            first = self.nodes[0].command("CLUSTER", "MYID").decode()
            answer = self.replica.command("CLUSTER", "REPLICATE", first)
            assert answer == b"+OK", answer
            self.replica.wait_for_log(b"MASTER <-> REPLICA sync: Finished with success")

    def restart(self, node: RedisServer) -> None:
        """Start a killed node again (empty: no persistence) and return once its log says
        the cluster is ok (it rejoined with its slots, from its ``nodes.conf``)."""
        node.start()
        node.wait_for_log(b"Cluster state changed: ok")

    def stop(self) -> None:
        for node in [*self.nodes, *([self.replica] if self.replica else [])]:
            node.stop()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A three-node Redis Cluster (:class:`RedisCluster`), stopped after the test."""
    cluster = RedisCluster(redis_server_or_skip(), tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_with_replica(tmp_path: Path) -> Iterator[RedisCluster]:
    """A three-node Redis Cluster whose first node has a replica (:class:`RedisCluster`)."""
    cluster = RedisCluster(redis_server_or_skip(), tmp_path, replica=True)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(redis_server_or_skip(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
