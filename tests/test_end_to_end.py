"""End to end over real sockets on 127.0.0.1: the relay in-process, and the example programs
and the ``trio-relay`` command as subprocesses.

Servers bind port 0 and the test reads the real port from the "relay listening on" log line,
so there is no window in which another process could take the port. Every wait on a
subprocess is bounded by ``DEADLINE`` and fails with the output of the program waited on.
"""

from __future__ import annotations

import codecs
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from helpers import http_request, without_epochs
from prometheus_client.parser import text_string_to_metric_families
from redis_support import RedisServer, redis_server
from wsproto import ConnectionType, WSConnection
from wsproto.events import CloseConnection, Request, TextMessage

import trio_relay

__all__ = ["redis_server"]  # a fixture, used by name

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PYTHON = sys.executable
TRIO_RELAY = Path(sys.executable).parent / "trio-relay"
DEADLINE = 15.0
"""Seconds any single wait on a subprocess may take before the test fails."""

# UTF-8 output whatever the locale; no PYTHONUNBUFFERED, so the programs must flush themselves.
ENV = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
ENV["PYTHONUTF8"] = "1"
LISTENING = r"relay listening on ws://127\.0\.0\.1:(\d+)/"
SHUTDOWN_CLOSE = "connection closed with code 1001 (relay shutting down)"


async def _kill(process: trio.Process) -> None:
    process.kill()


class Program:
    """A running subprocess whose stdout and stderr are collected as they arrive."""

    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        self.output = {"stdout": "", "stderr": ""}
        self._eof = {"stdout": trio.Event(), "stderr": trio.Event()}
        self._changed = trio.Event()

    async def collect(self, key: str, stream: trio.abc.ReceiveStream) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        async with stream:
            async for chunk in stream:
                self._append(key, decoder.decode(chunk))
        self._append(key, decoder.decode(b"", final=True))
        self._eof[key].set()
        self._changed.set()

    def _append(self, key: str, text: str) -> None:
        self.output[key] += text
        self._changed.set()
        self._changed = trio.Event()

    def describe(self) -> str:
        return (
            f"{self.name} (exit status {self.process.returncode})\n"
            f"--- stdout ---\n{self.output['stdout']}--- stderr ---\n{self.output['stderr']}"
        )

    async def expect(self, key: str, pattern: str, count: int = 1) -> re.Match[str]:
        """Wait until ``pattern`` occurs ``count`` times on ``key`` (stdout or stderr).

        Returns the last occurrence; fails at end of output or after ``DEADLINE`` seconds.
        """
        matches: list[re.Match[str]] = []
        with trio.move_on_after(DEADLINE):
            while len(matches := list(re.finditer(pattern, self.output[key]))) < count:
                if self._eof[key].is_set():
                    break
                await self._changed.wait()
        if len(matches) < count:
            pytest.fail(
                f"{pattern!r} occurs {len(matches)} times, not {count}, "
                f"on the {key} of {self.describe()}"
            )
        return matches[-1]

    async def finish(self) -> int:
        """Wait for the exit and the end of both outputs; return the exit status."""
        with trio.move_on_after(DEADLINE):
            await self.process.wait()
            await self._eof["stdout"].wait()
            await self._eof["stderr"].wait()
            assert self.process.returncode is not None
            return self.process.returncode
        pytest.fail(f"did not exit within {DEADLINE} s: {self.describe()}")

    def lines(self, key: str) -> list[str]:
        return self.output[key].splitlines()


Launch = Callable[..., Awaitable[Program]]


@pytest.fixture
async def launch(nursery: trio.Nursery) -> AsyncIterator[Launch]:
    """``await launch(*command)`` starts a program; every one is killed after the test."""
    programs: list[Program] = []

    async def launch(*command: str | Path) -> Program:
        process = await nursery.start(
            partial(
                trio.run_process,
                [str(part) for part in command],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
                cwd=ROOT,
                env=ENV,
                deliver_cancel=_kill,
            )
        )
        program = Program(" ".join(str(part) for part in command), process)
        programs.append(program)
        nursery.start_soon(program.collect, "stdout", process.stdout)
        nursery.start_soon(program.collect, "stderr", process.stderr)
        return program

    try:
        yield launch
    finally:
        for program in programs:
            if program.process.returncode is None:
                program.process.kill()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound but not listening: connecting is refused, and no one else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def at(port: int) -> tuple[str, ...]:
    """The command-line arguments that point a program at 127.0.0.1:``port``."""
    return ("--host", "127.0.0.1", "--port", str(port))


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another socket listens on, so a relay cannot bind it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def start_server(launch: Launch, *command: str | Path) -> tuple[Program, int]:
    """Launch a relay on 127.0.0.1, port 0; return it and its port once it listens."""
    server = await launch(*command, *at(0))
    match = await server.expect("stderr", LISTENING)
    return server, int(match[1])


DEBUG = ("--log-level", "DEBUG")
"""The relay logs a line per connection opened or closed at DEBUG (INFO would cost a fifth
of a connection's set-up CPU): tests that wait for those lines ask for them."""


async def start_consumer(
    launch: Launch, server: Program, port: int, *command: str | Path
) -> Program:
    """Launch a consumer and wait until the relay has subscribed it.

    The relay (run with ``*DEBUG``) logs "connection #N ... open" after the handshake and
    subscribes the connection without yielding in between, so once the line is out, every
    later message reaches it.
    """
    opened = r"connection #\d+ from \S+ open"
    count = len(re.findall(opened, server.output["stderr"])) + 1
    consumer = await launch(*command, *at(port))
    await consumer.expect("stderr", rf"connected to ws://127\.0\.0\.1:{port}/")
    await server.expect("stderr", opened, count)
    return consumer


# ------------------------------------------------------------------------ in-process relay


async def test_in_process_relay_delivers_text_and_binary_over_sockets() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(trio_relay.serve_relay, "127.0.0.1", 0))
        assert isinstance(server, trio_relay.RelayServer)
        assert server.port > 0
        url = f"ws://127.0.0.1:{server.port}/"
        received: list[str | bytes] = []
        with trio.fail_after(DEADLINE):
            async with trio_relay.consume(url) as messages:
                # The relay subscribes the connection right after the handshake; once every
                # task is blocked, that has happened.
                await trio.testing.wait_all_tasks_blocked()
                assert server.statistics().broadcast.subscribers == 1
                await trio_relay.produce(url, "héllo ✓")
                await trio_relay.produce(url, b"\x00\xffbinary")
                async for message in messages:
                    received.append(message)
                    if len(received) == 2:
                        break
        nursery.cancel_scope.cancel()
    assert received == ["héllo ✓", b"\x00\xffbinary"]
    assert [type(message) for message in received] == [str, bytes]


async def consume_through_relay_shutdown() -> tuple[
    str, list[str | bytes], list[tuple[str, int, str | None]]
]:
    """Connect a consumer to an in-process relay, then cancel the relay's nursery.

    Returns the relay's URL, the messages the consumer received, and the ``(url, code,
    reason)`` of each :class:`RelayConnectionClosed` it got.
    """
    received: list[str | bytes] = []
    closes: list[tuple[str, int, str | None]] = []

    async def consume_until_closed(url: str, *, task_status: trio.TaskStatus[None]) -> None:
        async with trio_relay.consume(url) as messages:
            task_status.started()
            try:
                async for message in messages:
                    received.append(message)
            except trio_relay.RelayConnectionClosed as exc:
                closes.append((exc.url, exc.code, exc.reason))

    with trio.fail_after(DEADLINE):
        # The relay's nursery is inside the consumer's: cancelling it stops only the relay.
        async with trio.open_nursery() as clients, trio.open_nursery() as relay:
            server = await relay.start(partial(trio_relay.serve_relay, "127.0.0.1", 0))
            url = f"ws://127.0.0.1:{server.port}/"
            await clients.start(consume_until_closed, url)
            await trio.testing.wait_all_tasks_blocked()
            assert server.statistics().connections == 1
            relay.cancel_scope.cancel()
    return url, received, closes


def collect_unclosed_sockets() -> list[str]:
    """Run the garbage collector now; return the ResourceWarnings of what it had to close.

    Leaked sockets are then reported by the test that leaked them, rather than by whichever
    later test (or the end of the session) happens to trigger a collection.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    return [str(warning.message) for warning in caught if warning.category is ResourceWarning]


async def test_cancelling_the_relay_closes_a_consumer_with_1001() -> None:
    url, received, closes = await consume_through_relay_shutdown()
    assert received == []
    assert closes == [(url, 1001, "relay shutting down")]


async def test_consume_closes_its_socket_when_the_relay_closes_the_connection() -> None:
    # trio-websocket 0.12.2 alone never closes a client's socket when the server closes
    # first; consume() opens and closes the TCP stream itself.
    await consume_through_relay_shutdown()
    assert collect_unclosed_sockets() == []


# ------------------------------------------------------------------------ example programs


async def test_examples_relay_messages_and_the_server_stops_on_sigint(launch: Launch) -> None:
    server, port = await start_server(launch, PYTHON, EXAMPLES / "server.py", *DEBUG)
    consumer = await start_consumer(launch, server, port, PYTHON, EXAMPLES / "consumer.py")
    url = f"ws://127.0.0.1:{port}/"

    producer = await launch(PYTHON, EXAMPLES / "producer.py", *at(port), "héllo wörld ✓")
    assert await producer.finish() == 0, producer.describe()
    assert producer.output == {"stdout": "acknowledged: héllo wörld ✓\n", "stderr": ""}

    producer = await launch(PYTHON, EXAMPLES / "producer.py", *at(port))
    assert await producer.finish() == 0, producer.describe()
    assert producer.output == {"stdout": "acknowledged: hi\n", "stderr": ""}

    await consumer.expect("stdout", r"\nhi\n")
    assert consumer.lines("stdout") == ["héllo wörld ✓", "hi"]

    server.process.send_signal(signal.SIGINT)
    assert await server.finish() == 0, server.describe()
    log = server.output["stderr"]
    assert "SIGINT received: stopping" in log
    assert re.search(r"connection #1 from 127\.0\.0\.1:\d+ closed \(code 1001\)", log), log
    assert server.lines("stderr")[-1].endswith("INFO relay stopped")

    assert await consumer.finish() == 1, consumer.describe()
    assert consumer.lines("stderr") == [f"connected to {url}", f"consumer: {url}: {SHUTDOWN_CLOSE}"]


async def test_example_consumer_exits_130_on_sigint(launch: Launch) -> None:
    server, port = await start_server(launch, PYTHON, EXAMPLES / "server.py", *DEBUG)
    consumer = await start_consumer(launch, server, port, PYTHON, EXAMPLES / "consumer.py")
    consumer.process.send_signal(signal.SIGINT)
    assert await consumer.finish() == 130, consumer.describe()
    assert consumer.output == {"stdout": "", "stderr": f"connected to ws://127.0.0.1:{port}/\n"}
    # It said goodbye: a normal closing handshake, not a dropped connection.
    await server.expect("stderr", r"connection #1 from 127\.0\.0\.1:\d+ closed \(code 1000\)")


async def test_example_clients_report_an_unreachable_relay(
    launch: Launch, refused_port: int
) -> None:
    url = f"ws://127.0.0.1:{refused_port}/"
    producer = await launch(PYTHON, EXAMPLES / "producer.py", *at(refused_port))
    consumer = await launch(PYTHON, EXAMPLES / "consumer.py", *at(refused_port))
    for program, name in [(producer, "producer"), (consumer, "consumer")]:
        assert await program.finish() == 1, program.describe()
        assert program.output["stdout"] == ""
        [line] = program.lines("stderr")
        assert line.startswith(f"{name}: {url}: cannot connect: "), line


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize(
    "program", ["examples/server.py", "-m trio_relay serve"], ids=["example", "cli"]
)
async def test_server_exits_0_on_signal(
    launch: Launch, program: str, signum: signal.Signals
) -> None:
    server, _ = await start_server(launch, PYTHON, *program.split())
    server.process.send_signal(signum)
    assert await server.finish() == 0, server.describe()
    assert server.output["stdout"] == ""
    log = server.lines("stderr")
    assert len(log) == 3, server.describe()
    assert re.search(rf"INFO .*{signum.name} received: (stopping|shutting down)$", log[1]), log
    assert re.search(r"INFO (trio_relay: )?relay stopped$", log[2]), log


async def test_example_server_reports_a_port_in_use(launch: Launch, busy_port: int) -> None:
    server = await launch(PYTHON, EXAMPLES / "server.py", *at(busy_port))
    assert await server.finish() == 1, server.describe()
    assert server.output["stdout"] == ""
    [line] = server.lines("stderr")
    assert line.startswith(f"server: cannot listen on 127.0.0.1:{busy_port}: [Errno "), line
    assert line.endswith("ddress already in use"), line


async def test_example_server_help_lists_its_options() -> None:
    with trio.fail_after(DEADLINE):
        result = await trio.run_process(
            [PYTHON, EXAMPLES / "server.py", "--help"],
            capture_stdout=True,
            capture_stderr=True,
            env=ENV,
        )
    help_text = " ".join(result.stdout.decode().split())
    assert "--host HOST default: localhost" in help_text
    assert "--port PORT default: 4000" in help_text
    assert result.stderr == b""


# ------------------------------------------------------------------------ the trio-relay command


async def test_cli_relays_messages_and_the_server_stops_on_sigterm(launch: Launch) -> None:
    assert TRIO_RELAY.is_file(), f"console script not installed at {TRIO_RELAY}"
    server, port = await start_server(launch, PYTHON, "-m", "trio_relay", "serve", *DEBUG)
    consumer = await start_consumer(launch, server, port, TRIO_RELAY, "consume")
    url = f"ws://127.0.0.1:{port}/"

    producer = await launch(PYTHON, "-m", "trio_relay", "produce", *at(port), "héllo wörld ✓")
    assert await producer.finish() == 0, producer.describe()
    assert producer.output["stdout"] == "acknowledged: héllo wörld ✓\n"
    await consumer.expect("stdout", r"héllo wörld ✓\n")
    assert consumer.lines("stdout") == ["héllo wörld ✓"]

    server.process.send_signal(signal.SIGTERM)
    assert await server.finish() == 0, server.describe()
    log = server.output["stderr"]
    assert "INFO trio_relay: SIGTERM received: shutting down" in log
    assert (
        len(re.findall(r"connection #\d+ from 127\.0\.0\.1:\d+ closed \(code 1001\)", log)) == 1
    ), log
    assert server.lines("stderr")[-1].endswith("INFO trio_relay: relay stopped")

    assert await consumer.finish() == 1, consumer.describe()
    assert consumer.output["stdout"] == "héllo wörld ✓\n"
    assert consumer.lines("stderr")[-1] == f"trio-relay consume: {url}: {SHUTDOWN_CLOSE}"


async def test_cli_produce_reports_an_unreachable_relay(launch: Launch, refused_port: int) -> None:
    producer = await launch(PYTHON, "-m", "trio_relay", "produce", *at(refused_port), "lost")
    assert await producer.finish() == 1, producer.describe()
    assert producer.output["stdout"] == ""
    [line] = producer.lines("stderr")
    assert line.startswith(
        f"trio-relay produce: ws://127.0.0.1:{refused_port}/: cannot connect: "
    ), line


async def test_cli_serve_reports_a_port_in_use(launch: Launch, busy_port: int) -> None:
    server = await launch(PYTHON, "-m", "trio_relay", "serve", *at(busy_port))
    assert await server.finish() == 1, server.describe()
    assert server.output["stdout"] == ""
    [line] = server.lines("stderr")
    assert line.startswith(f"trio-relay serve: cannot listen on 127.0.0.1:{busy_port}: [Errno "), (
        line
    )
    assert line.endswith("ddress already in use"), line


async def test_cli_serve_side_port_listens_on_loopback_whatever_the_relay_host(
    launch: Launch,
) -> None:
    server = await launch(
        PYTHON,
        *("-m", "trio_relay", "serve", "--host", "127.0.0.2", "--port", "0"),
        *("--http-port", "0", "--ping-interval", "0"),
    )
    await server.expect("stderr", r"relay listening on ws://127\.0\.0\.2:(\d+)/")
    side = r"metrics on http://(\S+):(\d+)/metrics .* HTTP API on http://\S+:\d+/api/"
    host, port = (await server.expect("stderr", side)).groups()
    assert host == "127.0.0.1"
    with trio.fail_after(DEADLINE):
        status, _, body = await http_request(int(port), "/api/history?topic=news")
    answer = without_epochs(json.loads(body))
    assert (status, answer) == (200, {"topic": "news", "seq": 0, "messages": []})
    server.process.send_signal(signal.SIGTERM)
    assert await server.finish() == 0, server.describe()


async def test_cli_serve_help_lists_every_option_with_its_default() -> None:
    with trio.fail_after(DEADLINE):
        result = await trio.run_process(
            [PYTHON, "-m", "trio_relay", "serve", "--help"],
            capture_stdout=True,
            capture_stderr=True,
            env={**ENV, "COLUMNS": "500"},  # argparse may wrap at a hyphen: trio-relay
        )
    help_text = " ".join(result.stdout.decode().split())
    expected = {
        "--host HOST": "localhost",
        "--port PORT": "4000",
        "--log-level {DEBUG,INFO,WARNING,ERROR}": "INFO",
        "--queue-size QUEUE_SIZE": "4096",
        "--max-queue-bytes MAX_QUEUE_BYTES": "262144",
        "--overflow-policy {block,drop,evict}": "evict",
        "--overflow-timeout OVERFLOW_TIMEOUT": "1.0",
        "--slow-consumer-timeout SLOW_CONSUMER_TIMEOUT": "5.0",
        "--max-message-size MAX_MESSAGE_SIZE": "1048576",
        "--max-unfinished-bytes MAX_UNFINISHED_BYTES": "67108864",
        "--handshake-timeout HANDSHAKE_TIMEOUT": "10.0",
        "--close-timeout CLOSE_TIMEOUT": "5.0",
        "--ping-interval PING_INTERVAL": "20.0",
        "--ping-timeout PING_TIMEOUT": "20.0",
        "--max-connections MAX_CONNECTIONS": "10000",
        "--max-connections-per-ip MAX_CONNECTIONS_PER_IP": "10000",
        "--max-subscribers-per-topic MAX_SUBSCRIBERS_PER_TOPIC": "10000",
        "--http-max-connections HTTP_MAX_CONNECTIONS": "64",
        "--http-request-timeout HTTP_REQUEST_TIMEOUT": "10.0",
        "--max-subscriptions-per-connection MAX_SUBSCRIPTIONS_PER_CONNECTION": "100",
        "--publish-rate PUBLISH_RATE": "0.0",
        "--publish-burst PUBLISH_BURST": "1000",
        "--control-rate CONTROL_RATE": "20.0",
        "--control-burst CONTROL_BURST": "100",
        "--history-size HISTORY_SIZE": "1000",
        "--history-bytes HISTORY_BYTES": "1048576",
        "--history-age HISTORY_AGE": "600.0",
        "--history-total-bytes HISTORY_TOTAL_BYTES": "67108864",
        "--idempotency-window IDEMPOTENCY_WINDOW": "120.0",
        "--max-topics MAX_TOPICS": "10000",
        "--receive-buffer-size RECEIVE_BUFFER_SIZE": "65536",
        "--workers WORKERS": "1",
        "--http-host HTTP_HOST": "127.0.0.1",
        "--backplane-prefix BACKPLANE_PREFIX": "trio-relay",
        "--backplane-timeout BACKPLANE_TIMEOUT": "2.0",
        "--backplane-log-size BACKPLANE_LOG_SIZE": "the relay's --history-size",
        "--backplane-log-bytes BACKPLANE_LOG_BYTES": "the relay's --history-bytes",
        "--backplane-log-age BACKPLANE_LOG_AGE": "the relay's --history-age",
        "--backplane-log-total-bytes BACKPLANE_LOG_TOTAL_BYTES": (
            "the relay's --history-total-bytes"
        ),
        "--backplane-topic-ttl BACKPLANE_TOPIC_TTL": "86400.0",
    }
    for option, default in expected.items():
        # The option, then its help up to the first parenthesis, without reaching another option.
        pattern = rf"{re.escape(option)} (?:(?!--)[^()])*\(default: {re.escape(default)}\)"
        assert re.search(pattern, help_text), f"{option} (default {default}) not in:\n{help_text}"
    options = set(re.findall(r"\s(--[a-z-]+)", help_text))
    # Plus the options that are off by default: TLS, the side port, tokens, origins, backplane.
    tls = {
        *("--certfile", "--keyfile", "--http-port", "--metrics-port"),
        *("--auth-secret", "--allowed-origins"),
        *("--config", "--backplane"),
    }
    assert options == {option.split()[0] for option in expected} | {"--help"} | tls
    assert result.stderr == b""


# ------------------------------------------------------------------------ --workers


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of ``/metrics`` on ``port``, by name and labels."""
    with trio.fail_after(DEADLINE):
        status, _, body = await http_request(port, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


async def post(port: int, path: str, document: object) -> tuple[int, dict[str, Any]]:
    """``POST`` a JSON ``document`` to 127.0.0.1:``port``: the status and the JSON answer."""
    body = json.dumps(document).encode()
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            response = b""
            while chunk := await stream.receive_some():
                response += chunk
    head, _, answer = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(answer)


async def healthz(port: int) -> dict[str, object]:
    """The ``/healthz`` JSON of the metrics port ``port``."""
    with trio.fail_after(DEADLINE):
        _, _, body = await http_request(port, "/healthz")
    return json.loads(body)  # type: ignore[no-any-return]


async def test_workers_share_one_port_and_a_crashed_worker_is_restarted(
    launch: Launch, redis_server: RedisServer
) -> None:
    supervisor = await launch(
        TRIO_RELAY,
        "serve",
        *("--workers", "2", "--backplane", redis_server.url),
        *("--metrics-port", "0", "--ping-interval", "0"),
        *at(0),
    )
    port = int((await supervisor.expect("stderr", r"supervising 2 workers on port (\d+)"))[1])
    await supervisor.expect("stderr", LISTENING, 2)
    # One HTTP port for the whole relay, served by the supervisor from the workers'.
    http_line = r"HTTP port of all 2 workers on http://127\.0\.0\.1:(\d+)/"
    http = int((await supervisor.expect("stderr", http_line))[1])
    log = supervisor.output["stderr"]
    workers = dict(re.findall(r"worker (\d) started: pid (\d+)", log))
    assert sorted(workers) == ["0", "1"]
    assert set(re.findall(r"worker \d: relay listening on ws://[^:]+:(\d+)/", log)) == {str(port)}
    assert "metrics on http" not in log  # no worker serves a TCP port of its own

    url = f"ws://127.0.0.1:{port}/room"
    received: list[list[object]] = []
    changed = trio.Event()

    async def wait_for(predicate: Callable[[], bool]) -> None:
        nonlocal changed
        with trio.fail_after(DEADLINE):
            while not predicate():
                await changed.wait()
                changed = trio.Event()

    async def consumer(*, task_status: trio.TaskStatus[None]) -> None:
        inbox: list[object] = []
        received.append(inbox)
        try:
            async with trio_relay.consume(url) as messages:
                task_status.started()
                async for message in messages:
                    inbox.append(message)
                    changed.set()
        except trio_relay.RelayError as exc:
            inbox.append(exc)
            changed.set()

    async with trio.open_nursery() as clients:
        # Open consumers until each worker has one (the kernel picks the worker); the one
        # scrape of the supervisor's /metrics says which worker has how many.
        with trio.fail_after(DEADLINE):
            while True:
                await clients.start(consumer)
                samples = await scrape(http)
                per_worker = [
                    samples.get(("trio_relay_connections", (("worker", w),)), 0) for w in "01"
                ]
                if all(per_worker) and samples[("trio_relay_workers_up", ())] == 2:
                    break
        assert sum(per_worker) == len(received)
        assert samples[("trio_relay_workers", ())] == 2
        assert {labels for name, labels in samples if name == "process_open_fds"} == {
            (("worker", "0"),),
            (("worker", "1"),),
        }
        assert await healthz(http) == {
            "status": "ok",
            "connections": len(received),
            "backplane": "up",
            "workers": 2,
            "workers_up": 2,
        }
        with trio.fail_after(DEADLINE):
            _, _, body = await http_request(http, "/stats")
        assert json.loads(body)["subscribers"] == len(received)
        # The HTTP API through the one port: passed on to a worker, which publishes to all.
        status, answer = await post(http, "/api/publish", {"topic": "room", "text": "to all"})
        assert (status, answer["seq"]) == (200, 1)
        await wait_for(lambda: all(inbox == ["to all"] for inbox in received))

        # A worker crashes: it is started again on the same port, the other one goes on.
        os.kill(int(workers["0"]), signal.SIGKILL)
        await supervisor.expect("stderr", r"worker 0 exited \(status -9\): restarting it in 1 s")
        await supervisor.expect("stderr", r"worker 0 started: pid \d+", 2)
        await supervisor.expect("stderr", LISTENING, 3)
        await trio_relay.produce(url, "after the crash")
        await wait_for(lambda: all(len(inbox) == 2 for inbox in received))
        lost = [inbox for inbox in received if isinstance(inbox[-1], trio_relay.RelayError)]
        kept = [inbox for inbox in received if inbox not in lost]
        assert lost and kept, received  # each worker had a consumer
        assert all(inbox == ["to all", "after the crash"] for inbox in kept)

        supervisor.process.send_signal(signal.SIGTERM)
        assert await supervisor.finish() == 0
        await wait_for(lambda: all(len(inbox) == 3 for inbox in kept))
    assert "all workers stopped" in supervisor.output["stderr"]
    assert len(re.findall(r"worker \d: relay stopped", supervisor.output["stderr"])) == 2
    # The consumers of the surviving workers were told the relay was going away.
    for inbox in kept:
        closed = inbox[-1]
        assert isinstance(closed, trio_relay.RelayConnectionClosed), inbox
        assert closed.code == 1001


async def test_workers_stop_when_their_supervisor_is_killed(
    launch: Launch, redis_server: RedisServer
) -> None:
    supervisor = await launch(
        TRIO_RELAY,
        "serve",
        *("--workers", "2", "--backplane", redis_server.url, "--ping-interval", "0"),
        *at(0),
    )
    await supervisor.expect("stderr", LISTENING, 2)
    supervisor.process.kill()  # SIGKILL: no chance to stop its workers itself
    # The workers hold the supervisor's stderr: it ends once both have stopped.
    assert await supervisor.finish() == -signal.SIGKILL
    log = supervisor.output["stderr"]
    assert len(re.findall(r"worker \d: the supervisor is gone: shutting down", log)) == 2
    assert len(re.findall(r"worker \d: relay stopped", log)) == 2


async def test_ctrl_c_to_the_process_group_stops_every_worker_cleanly(
    launch: Launch, redis_server: RedisServer
) -> None:
    # setsid: the supervisor and its workers get a process group of their own, which is
    # what a terminal's Ctrl-C signals (SIGINT to every process in it).
    supervisor = await launch(
        "setsid",
        TRIO_RELAY,
        "serve",
        *("--workers", "2", "--backplane", redis_server.url, "--ping-interval", "0"),
        *at(0),
    )
    await supervisor.expect("stderr", LISTENING, 2)
    os.killpg(supervisor.process.pid, signal.SIGINT)
    assert await supervisor.finish() == 0
    log = supervisor.output["stderr"]
    # Each worker ignores the group's SIGINT and drains once, on the supervisor's SIGTERM.
    assert len(re.findall(r"worker \d: SIGTERM received: shutting down", log)) == 2
    assert len(re.findall(r"worker \d: relay stopped", log)) == 2
    assert "SIGINT received: stopping 2 workers" in log


async def test_on_shutdown_a_consumer_behind_by_megabytes_gets_every_message_then_1001() -> None:
    # Over real sockets (the writer's resumable os.write path): a consumer that stopped
    # reading while 24 MB were published, more than the kernel's buffers hold.
    config = trio_relay.RelayConfig(
        queue_size=100_000,
        max_queue_bytes=32 * 1024 * 1024,
        slow_consumer_timeout=30.0,
        close_timeout=30.0,
    )
    messages = [f"{i:05d}" + "m" * 995 for i in range(24000)]
    received: list[str] = []
    codes: list[int] = []

    async def read_until_close(stream: trio.SocketStream, client: WSConnection) -> None:
        part = ""
        while not codes:
            data = await stream.receive_some()
            assert data, "the stream ended before the close frame"
            client.receive_data(data)
            for event in client.events():
                if isinstance(event, CloseConnection):
                    codes.append(event.code)
                elif isinstance(event, TextMessage):
                    part += event.data
                    if event.message_finished:
                        received.append(part)
                        part = ""
        await stream.aclose()

    with trio.fail_after(DEADLINE):
        # The relay's nursery is inside the reader's: cancelling it stops only the relay.
        async with trio.open_nursery() as readers, trio.open_nursery() as relay:
            server = await relay.start(
                partial(trio_relay.serve_relay, "127.0.0.1", 0, config=config)
            )
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            client = WSConnection(ConnectionType.CLIENT)
            await stream.send_all(client.send(Request(host="127.0.0.1", target="/")))
            await server.wait_until(lambda s: s.subscribers == 1)
            for message in messages:
                await server.publish(message)
            assert sum(server.statistics().broadcast.queued) > 0  # it is behind
            relay.cancel_scope.cancel()  # the relay shuts down, then the client reads
            readers.start_soon(read_until_close, stream, client)
    assert received == messages
    assert codes == [1001]
