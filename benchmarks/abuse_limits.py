"""Issue 11's connection-limit rows at the table's scale, against a real relay subprocess.

    python benchmarks/abuse_limits.py            # every row (about a minute and a half)
    python benchmarks/abuse_limits.py --only topics

Each row starts a fresh ``python -m trio_relay serve`` of this tree on 127.0.0.1 (free
ports) and prints what it measured:

* ``half-open``: 1,500 half-sent upgrade requests from 127.0.0.1 to a relay run with
  ``--max-connections 20 --max-connections-per-ip 5`` and 1,024 descriptors: how many
  the relay holds and how many got 503 (and how fast), its descriptors, its "Too many open
  files" lines, and a client from 127.0.0.2 that connects meanwhile (its echo p50).
* ``emfile``: the same flood at the default limits with only 256 descriptors, so that
  ``accept`` fails with EMFILE for 20 s: the log lines that cost, and how soon after the
  flood ends a client gets in.
* ``sideport``: 1,100 half-sent requests to the HTTP side port: how many it holds, how many
  got 503, when the held ones are closed, and a WebSocket client's echo p50 meanwhile.
* ``topics``: 20,000 idle topics (one retained message each), and 2 clients polling
  ``/metrics`` (then ``/healthz``) in a loop: the echo p50/p99 of a client before and
  during the polling, and the time of one poll.
* ``handshakes``: 200 handshakes at once on a topic with ``--max-subscribers-per-topic
  5`` (then 200 connections at once with ``--max-connections 5``): how many admitted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import trio
import trio_websocket

ROOT = Path(__file__).resolve().parent.parent  # the relay runs here: this tree's trio_relay
HALF_REQUEST = b"GET / HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Relay:
    """A relay subprocess with its ports and its log (stderr, in a file)."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, http: int, log: Path):
        self.process = process
        self.port = port
        self.http = http
        self.log = log

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def log_lines(self, text: str) -> int:
        return sum(text in line for line in self.log.read_text().splitlines())


def spawn(command: list[str], log: Path, nofile: int | None) -> subprocess.Popen[bytes]:
    """Start ``command`` with its stderr in ``log``, and at most ``nofile`` descriptors."""

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(log, "wb") as output:
        return subprocess.Popen(
            command, cwd=ROOT, stderr=output, stdout=subprocess.DEVNULL, preexec_fn=limit
        )


@contextlib.asynccontextmanager
async def relay(*options: str, nofile: int | None = None) -> AsyncIterator[Relay]:
    port, http = free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "trio_relay",
        "serve",
        *("--host", "127.0.0.1", "--port", str(port), "--http-port", str(http)),
        *("--ping-interval", "0", "--log-level", "INFO"),
        *options,
    ]

    with tempfile.TemporaryDirectory() as directory:
        log = Path(directory) / "relay.log"
        process = spawn(command, log, nofile)
        try:
            with trio.fail_after(15):
                while True:
                    try:
                        await (await trio.open_tcp_stream("127.0.0.1", http)).aclose()
                        break
                    except OSError:
                        await trio.sleep(0.05)
            yield Relay(process, port, http, log)
        finally:
            process.terminate()
            process.wait(15)


async def get(port: int, path: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        response = b""
        while chunk := await stream.receive_some(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def echo_times(port: int, seconds: float, local: str | None = None) -> list[float]:
    """Echo round trips (ms) of one client sending a small message at a time on /echo."""
    times: list[float] = []
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=local)
    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "127.0.0.1", "/echo")
        end = trio.current_time() + seconds
        while not times or trio.current_time() < end:
            start = time.perf_counter()
            await ws.send_message("ping")
            await ws.get_message()
            times.append((time.perf_counter() - start) * 1000)
        await ws.aclose()
    return times


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def status_of(stream: trio.SocketStream, wait: float) -> int:
    """The HTTP status the relay answered on ``stream`` within ``wait`` seconds (0: none,
    -1: closed or reset without one)."""
    head = b""
    with trio.move_on_after(wait):
        try:
            while b"\r\n" not in head:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return -1
                head += chunk
        except OSError:
            return -1
        return int(head.split(b" ", 2)[1])
    return 0


async def flood(port: int, count: int, data: bytes) -> list[trio.SocketStream]:
    streams = []
    for _ in range(count):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with contextlib.suppress(OSError, trio.BrokenResourceError):
            await stream.send_all(data)
        streams.append(stream)
    return streams


async def statuses(streams: Sequence[trio.SocketStream], wait: float) -> list[int]:
    found = [0] * len(streams)

    async def read(index: int) -> None:
        found[index] = await status_of(streams[index], wait)

    async with trio.open_nursery() as nursery:
        for index in range(len(streams)):
            nursery.start_soon(read, index)
    return found


async def close_all(streams: Sequence[trio.SocketStream]) -> None:
    for stream in streams:
        await trio.aclose_forcefully(stream)


async def health(relay: Relay) -> int:
    return int(json.loads((await get(relay.http, "/healthz"))[1])["connections"])


# ---------------------------------------------------------------- the rows


async def half_open() -> None:
    options = ("--max-connections", "20", "--max-connections-per-ip", "5")
    async with relay(*options, nofile=1024) as server:
        start = time.perf_counter()
        attackers = await flood(server.port, 1500, HALF_REQUEST)
        opened = time.perf_counter() - start
        answers = await statuses(attackers, 1.0)
        held = await health(server)
        fds = server.descriptors()
        times = await echo_times(server.port, 2.0, local="127.0.0.2")
        print(
            f"half-open: 1500 half-sent requests from one address (opened in {opened:.1f} s), "
            f"--max-connections 20 --max-connections-per-ip 5, 1024 descriptors: relay holds "
            f"{held} connections, {answers.count(503)} got 503 within 1 s "
            f"({answers.count(-1)} closed without one, {answers.count(0)} no answer), "
            f"{fds} descriptors open; a client from 127.0.0.2 meanwhile: echo p50 "
            f"{percentile(times, 0.5):.2f} ms over {len(times)}; 'Too many open files' lines: "
            f"{server.log_lines('Too many open files')}, refusal lines: "
            f"{server.log_lines('refused')}"
        )
        await close_all(attackers)


async def emfile() -> None:
    async with relay("--handshake-timeout", "30", nofile=256) as server:
        attackers = await flood(server.port, 1500, HALF_REQUEST)
        await trio.sleep(1)
        fds = server.descriptors()  # not /healthz: the HTTP port is out of descriptors too
        await trio.sleep(19)
        lines = server.log_lines("the relay cannot accept")
        await close_all(attackers)
        start = time.perf_counter()
        await echo_times(server.port, 0.001)  # connect, one echo
        back = time.perf_counter() - start
        times = await echo_times(server.port, 1.0)
        print(
            f"emfile: 1500 half-sent requests at the default limits, 256 descriptors: relay at "
            f"{fds} descriptors; its 'cannot accept' ERROR lines in 20 s: {lines} (trio's own "
            f"accept loop logs one every 0.1 s: 200); after the flood a client got in and had "
            f"its first echo within {back:.2f} s (echo p50 {percentile(times, 0.5):.2f} ms); "
            f"'accepts connections again' lines: {server.log_lines('relay accepts connections')}"
        )


async def sideport() -> None:
    async with relay() as server:
        start = trio.current_time()
        attackers = await flood(server.http, 1100, b"GET /metrics HTTP/1.1\r\n")
        answers = await statuses(attackers, 1.0)
        fds = server.descriptors()
        times = await echo_times(server.port, 2.0)
        held = [s for s, status in zip(attackers, answers, strict=True) if status == 0]
        closed = await statuses(held, 15.0)
        after = trio.current_time() - start
        status, _ = await get(server.http, "/healthz")
        print(
            f"sideport: 1100 half-sent requests to the HTTP port: {answers.count(503)} got 503 "
            f"within 1 s, {len(held)} held ({fds} relay descriptors); the held ones closed "
            f"{'all' if closed.count(-1) == len(held) else closed.count(-1)} by "
            f"{after:.1f} s (--http-request-timeout 10 s); /healthz after: {status}; a "
            f"WebSocket client meanwhile: echo p50 {percentile(times, 0.5):.2f} ms"
        )
        await close_all(attackers)


async def make_topics(server: Relay, count: int) -> None:
    items = [{"topic": f"idle/{index}", "text": "retained"} for index in range(count)]
    body = json.dumps(items).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", server.http)
    async with stream:
        await stream.send_all(
            b"POST /api/publish HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        response = b""
        while chunk := await stream.receive_some(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200"), response[:200]


async def topics() -> None:
    async with relay("--max-topics", "30000", "--http-request-timeout", "60") as server:
        await make_topics(server, 20_000)
        stats = json.loads((await get(server.http, "/stats"))[1])
        quiet = await echo_times(server.port, 3.0)
        for path in ("/metrics", "/healthz"):
            polls: list[float] = []
            stop = trio.Event()

            async def poll(
                path: str = path, polls: list[float] = polls, stop: trio.Event = stop
            ) -> None:
                while not stop.is_set():
                    start = time.perf_counter()
                    await get(server.http, path)
                    polls.append((time.perf_counter() - start) * 1000)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll)
                nursery.start_soon(poll)
                busy = await echo_times(server.port, 5.0)
                stop.set()
            print(
                f"topics: {stats['topics']} idle topics, 2 clients polling {path} "
                f"({len(polls)} polls, {statistics.mean(polls):.2f} ms each on average): echo "
                f"p50 {percentile(busy, 0.5):.2f} ms, p99 {percentile(busy, 0.99):.2f} ms "
                f"(without polling: p50 {percentile(quiet, 0.5):.2f} ms, p99 "
                f"{percentile(quiet, 0.99):.2f} ms)"
            )


async def handshakes() -> None:
    for option, path in (("--max-subscribers-per-topic", "/crowded"), ("--max-connections", "/")):
        async with relay(option, "5") as server:
            streams = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(200)]
            request = UPGRADE.format(path=path).encode()
            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(send_quietly, stream, request)
            answers = await statuses(streams, 5.0)
            print(
                f"handshakes: 200 at once, {option} 5: {answers.count(101)} admitted, "
                f"{answers.count(503)} got 503, {answers.count(-1)} closed without an answer"
            )
            await close_all(streams)


async def send_quietly(stream: trio.SocketStream, data: bytes) -> None:
    with contextlib.suppress(OSError, trio.BrokenResourceError):
        await stream.send_all(data)


ROWS = {
    "half-open": half_open,
    "emfile": emfile,
    "sideport": sideport,
    "topics": topics,
    "handshakes": handshakes,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(ROWS), action="append")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    for name in args.only or ROWS:
        trio.run(ROWS[name])


if __name__ == "__main__":
    main()
