"""Connection-rule abuse at the scale of issue 11, against a real relay process.

    python benchmarks/abuse_protocol.py                  # all three attacks
    python benchmarks/abuse_protocol.py --only flood     # one of: burst, pings, errors
    python benchmarks/abuse_protocol.py --python /other/venv/bin/python   # another relay

Each attack runs against a fresh ``trio-relay serve`` on a free 127.0.0.1 port, started with
``--python`` (default: this interpreter), and prints what it measured:

- ``burst``: ``--publish-rate 10 --publish-burst 10``; a producer writes 5,000 small
  messages in one ``send_all``; a consumer counts what is delivered by 0.05, 1, 3 and 5 s.
  Required: the burst (10) at once, then the rate (10 a second); the rest waits unread.
- ``pings``: defaults; two clients flood pings (100 per write, as fast as the relay takes
  them) and read their pongs, while a bystander on another topic sends a message every
  10 ms and times its echo. Prints the bystander's p50/p99 without and with the flood, the
  pongs the flooders got, and the relay's CPU use. Required: p50 under 5 ms.
- ``errors``: defaults; an envelope client sends 64 KiB of empty frames (10,922), then a
  ``publish`` frame naming a topic of 100,000 characters. Prints the error frames (and
  bytes) it got back by 1 and 3 s, and the size of the ``wrong-topic`` error.

Clients here speak RFC 6455 by hand (masked frames built with ``os.urandom`` masks) so that
they can write thousands of frames at once; only the standard library and trio are used.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import trio

HOST = "127.0.0.1"
TICKS = os.sysconf("SC_CLK_TCK")


def masked(opcode: int, payload: bytes) -> bytes:
    """A client frame (FIN set), masked as RFC 6455 requires."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    key = (mask * (length // 4 + 1))[:length]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")
    return header + mask + body


class Client:
    """One raw WebSocket client: the handshake, then frames in and out."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def connect(cls, port: int, path: str = "/", envelope: bool = False) -> Client:
        stream = await trio.open_tcp_stream(HOST, port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "Sec-WebSocket-Protocol: trio-relay.v1\r\n" if envelope else ""
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n".encode()
        )
        client = cls(stream)
        while b"\r\n\r\n" not in client.buffer:
            client.buffer += await client._read()
        head, _, rest = bytes(client.buffer).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"handshake refused: {head[:80]!r}")
        client.buffer = bytearray(rest)
        return client

    async def _read(self) -> bytes:
        data = await self.stream.receive_some(1 << 20)
        if not data:
            raise EOFError("the relay closed the connection")
        return data

    def _frame(self) -> tuple[int, bytes] | None:
        buffer = self.buffer
        if len(buffer) < 2:
            return None
        length, at = buffer[1] & 0x7F, 2
        if length == 126:
            if len(buffer) < 4:
                return None
            length, at = int.from_bytes(buffer[2:4], "big"), 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            length, at = int.from_bytes(buffer[2:10], "big"), 10
        if len(buffer) < at + length:
            return None
        opcode, payload = buffer[0] & 0x0F, bytes(buffer[at : at + length])
        del buffer[: at + length]
        return opcode, payload

    async def frame(self) -> tuple[int, bytes]:
        """The next frame from the relay: (opcode, payload)."""
        while (frame := self._frame()) is None:
            self.buffer += await self._read()
        return frame

    async def aclose(self) -> None:
        await self.stream.aclose()


@contextlib.contextmanager
def relay(python: str, *options: str) -> Iterator[tuple[int, int]]:
    """A ``trio-relay serve`` process on a free port: (port, pid)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    command = [python, "-m", "trio_relay", "serve", "--host", HOST, "--port", str(port)]
    # cwd "/": with -m, Python puts the working directory first on sys.path, and the relay
    # must be the one installed for --python, not a checkout that happens to be here.
    process = subprocess.Popen([*command, *options], stderr=subprocess.DEVNULL, cwd="/")
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
                break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the relay did not start")
            time.sleep(0.05)
        yield port, process.pid
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


# --------------------------------------------------------------------------------- burst


async def burst(python: str) -> None:
    print("burst: --publish-rate 10 --publish-burst 10, 5,000 messages in one write")
    with relay(python, "--publish-rate", "10", "--publish-burst", "10") as (port, _):
        consumer = await Client.connect(port)
        producer = await Client.connect(port)
        data = b"".join(masked(0x1, b"m%04d" % n) for n in range(5000))
        received: list[float] = []

        async def count() -> None:
            while True:
                opcode, _ = await consumer.frame()
                if opcode == 0x1:
                    received.append(time.monotonic() - start)

        async def drain() -> None:  # the producer's own echoes
            while True:
                await producer.frame()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(count)
            nursery.start_soon(drain)
            start = time.monotonic()
            with trio.move_on_after(5):
                await producer.stream.send_all(data)
            wrote = time.monotonic() - start
            for at in (0.05, 1.0, 3.0, 5.0):
                await trio.sleep(max(0.0, start + at - time.monotonic()))
                print(f"  delivered by {at:4.2f} s: {len(received):5d}")
            nursery.cancel_scope.cancel()
        print(
            f"  the producer's write of {len(data):,} bytes returned after {wrote * 1000:.1f} ms"
            " (the kernel holds what the relay has not read)"
        )
        late = [t for t in received if t > 0.05]
        if len(late) > 1:
            rate = (len(late) - 1) / (late[-1] - late[0])
            print(f"  after the burst: {rate:.1f} messages a second")
        for client in (consumer, producer):
            await client.aclose()


# --------------------------------------------------------------------------------- pings


async def echo_latencies(port: int, seconds: float) -> list[float]:
    """A bystander on topic ``bystander``: a message every 10 ms, each echo timed (ms)."""
    client = await Client.connect(port, "/bystander")
    latencies: list[float] = []
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        payload = b"b%d" % n
        n += 1
        sent = time.monotonic()
        await client.stream.send_all(masked(0x1, payload))
        while (await client.frame()) != (0x1, payload):
            pass
        latencies.append((time.monotonic() - sent) * 1000)
        await trio.sleep(0.01)
    await client.aclose()
    return latencies


def summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered):.2f} ms, p99 {p99:.2f} ms ({len(ordered)} echoes)"


async def pings(python: str, seconds: float = 5.0) -> None:
    print("pings: defaults; two clients flood pings and read their pongs")
    with relay(python) as (port, pid):
        quiet = await echo_latencies(port, 2.0)
        print(f"  bystander alone:        {summary(quiet)}")
        pongs = [0, 0]
        pings_sent = [0, 0]

        async def flood(index: int) -> None:
            client = await Client.connect(port, f"/flood{index}")
            batch = b"".join(masked(0x9, b"%d" % n) for n in range(100))

            async def read() -> None:
                while True:
                    opcode, _ = await client.frame()
                    if opcode == 0xA:
                        pongs[index] += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                try:
                    while True:
                        await client.stream.send_all(batch)
                        pings_sent[index] += 100
                finally:
                    nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood, 0)
            nursery.start_soon(flood, 1)
            await trio.sleep(0.5)
            cpu = cpu_seconds(pid)
            started = time.monotonic()
            loud = await echo_latencies(port, seconds)
            elapsed = time.monotonic() - started
            used = cpu_seconds(pid) - cpu
            nursery.cancel_scope.cancel()
        print(f"  bystander during flood: {summary(loud)}")
        print(
            f"  flooders wrote {pings_sent[0]:,} and {pings_sent[1]:,} pings (what the kernel"
            f" took), got {pongs[0]:,} and {pongs[1]:,} pongs"
        )
        print(f"  relay CPU during the flood: {used / elapsed * 100:.0f} % of one core")


# -------------------------------------------------------------------------------- errors


async def errors(python: str) -> None:
    print("errors: defaults; an envelope client sends 64 KiB of empty frames")
    with relay(python) as (port, _):
        client = await Client.connect(port, "/news", envelope=True)
        _, welcome = await client.frame()
        assert json.loads(welcome)["type"] == "welcome"
        flood = masked(0x1, b"") * (64 * 1024 // 6)
        got = [0, 0]  # frames, bytes

        async def read() -> None:
            while True:
                _, payload = await client.frame()
                got[0] += 1
                got[1] += len(payload)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            start = time.monotonic()
            await client.stream.send_all(flood)
            for at in (1.0, 3.0):
                await trio.sleep(max(0.0, start + at - time.monotonic()))
                print(
                    f"  {64 * 1024 // 6:,} empty frames sent; by {at:.0f} s: {got[0]:,} error"
                    f" frames back, {got[1]:,} bytes"
                )
            nursery.cancel_scope.cancel()
        await client.aclose()
        client = await Client.connect(port, "/news", envelope=True)
        await client.frame()
        frame = {"type": "publish", "id": 1, "text": "x", "topic": "t" * 100_000}
        await client.stream.send_all(masked(0x1, json.dumps(frame).encode()))
        _, payload = await client.frame()
        error = json.loads(payload)
        print(
            f"  wrong-topic with a 100,000-character topic: error frame of {len(payload)}"
            f" bytes, detail {error['detail'][:60]!r}... ({len(error['detail'])} characters)"
        )
        await client.aclose()


async def main(python: str, only: str | None) -> None:
    for name, attack in (("burst", burst), ("pings", pings), ("errors", errors)):
        if only in (None, name):
            await attack(python)
            print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the relay's interpreter")
    parser.add_argument("--only", choices=["burst", "pings", "errors"])
    args = parser.parse_args()
    trio.run(main, args.python, args.only)
