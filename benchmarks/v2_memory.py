"""trio-relay.v2 against one topic per connection: the relay's memory and its CPU per delivery.

    python benchmarks/v2_memory.py                 # both parts, 3 repetitions each
    python benchmarks/v2_memory.py --reps 5 --groups 20 --messages 3000

Memory: a fresh relay process (``trio-relay serve``, default settings) gets ``--groups``
times 100 subscriptions, either as 100 ``trio-relay.v1`` connections with one topic each
or as one ``trio-relay.v2`` connection subscribed to 100 topics; the figure is the growth
of the relay's resident memory (VmRSS, /proc) per 100 subscriptions, once all are
subscribed. Kernel socket buffers are not in it (one connection has one pair instead of
100).

Fan-out: a fresh relay, 100 consumers of topic ``t`` (raw, v1, or v2 connections that are
also subscribed to 9 quiet topics each), and one raw producer that publishes ``--messages``
messages of 100 bytes one at a time, each once every consumer has the previous one (no
batching is possible). The figure is the relay's CPU time (utime + stime, /proc) per
delivery. v1 and v2 clients get the same bytes (the message frame is framed once for
both), so their difference is the cost of the v2 path.

The clients run in this process, with trio and a minimal hand-written WebSocket client;
medians of the repetitions are printed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
KEY = base64.b64encode(b"0123456789abcdef").decode()
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Relay:
    """A ``trio-relay serve`` process on a free port of 127.0.0.1."""

    def __init__(self, *options: str) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "trio_relay", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--log-level", "WARNING", *options]
        self.process = subprocess.Popen(command, cwd=ROOT)

    def rss(self) -> int:
        """Resident memory in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu(self) -> float:
        """User and system CPU seconds so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    async def ready(self) -> None:
        with trio.fail_after(20):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                return

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def mask(opcode: int, payload: bytes) -> bytes:
    """A client frame (masked with a zero key: valid, and free to compute)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    else:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    return head + b"\0\0\0\0" + payload


class Client:
    """One WebSocket connection: the handshake, frames out, and data frames counted in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def open(cls, port: int, path: str, protocol: str | None) -> Client:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        extra = f"Sec-WebSocket-Protocol: {protocol}\r\n" if protocol else ""
        await stream.send_all(
            (
                f"GET {path} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )
        client = cls(stream)
        while b"\r\n\r\n" not in client.buffer:
            client.buffer += await stream.receive_some(65536)
        head, _, rest = bytes(client.buffer).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(head.decode(errors="replace"))
        client.buffer = bytearray(rest)
        return client

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(mask(0x1, text.encode()))

    def frames(self) -> list[bytes]:
        """The complete data frames in the buffer (pings answered later: none are due)."""
        found = []
        buffer = self.buffer
        while len(buffer) >= 2:
            n, at = buffer[1] & 0x7F, 2
            if n == 126:
                if len(buffer) < 4:
                    break
                n, at = struct.unpack_from("!H", buffer, 2)[0], 4
            elif n == 127:
                if len(buffer) < 10:
                    break
                n, at = struct.unpack_from("!Q", buffer, 2)[0], 10
            if len(buffer) < at + n:
                break
            found.append(bytes(buffer[at : at + n]))
            del buffer[: at + n]
        return found

    async def next_frames(self) -> list[bytes]:
        while not (found := self.frames()):
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the relay closed the connection")
            self.buffer += data
        return found


async def subscribe_v2(client: Client, topics: list[str]) -> None:
    for topic in topics:
        await client.send_text(json.dumps({"type": "subscribe", "topic": topic}))
    answered = 0
    while answered < len(topics):
        answered += sum(b'"subscribed"' in frame for frame in await client.next_frames())


# ---------------------------------------------------------------------------- memory


async def memory_run(groups: int, v2: bool) -> float:
    """Bytes of relay memory per 100 subscriptions."""
    relay = Relay("--max-connections", "20000", "--max-connections-per-ip", "20000")
    clients: list[Client] = []
    try:
        await relay.ready()
        await trio.sleep(0.5)
        before = relay.rss()
        for group in range(groups):
            topics = [f"g{group}/t{n}" for n in range(100)]
            if v2:
                client = await Client.open(relay.port, "/", "trio-relay.v2")
                await subscribe_v2(client, topics)
                clients.append(client)
            else:
                for topic in topics:
                    client = await Client.open(relay.port, f"/{topic}", "trio-relay.v1")
                    await client.next_frames()  # its welcome: subscribed
                    clients.append(client)
        await trio.sleep(0.5)
        return (relay.rss() - before) / groups
    finally:
        for client in clients:
            await client.stream.aclose()
        relay.stop()


# ---------------------------------------------------------------------------- fan-out


async def fanout_run(kind: str, consumers: int, messages: int) -> float:
    """Relay CPU microseconds per delivery."""
    relay = Relay()
    clients: list[Client] = []
    try:
        await relay.ready()
        for n in range(consumers):
            if kind == "v2":
                client = await Client.open(relay.port, "/", "trio-relay.v2")
                await subscribe_v2(client, ["t"] + [f"quiet/{n}/{q}" for q in range(9)])
            else:
                protocol = "trio-relay.v1" if kind == "v1" else None
                client = await Client.open(relay.port, "/t", protocol)
                if protocol:
                    await client.next_frames()  # the welcome
            clients.append(client)
        producer = await Client.open(relay.port, "/t", None)
        payload = "x" * 100
        got = [0] * consumers
        behind = consumers  # consumers without the latest message
        caught_up = trio.Event()

        async def consume(index: int, client: Client) -> None:
            nonlocal behind
            while got[index] < messages:
                got[index] += len(await client.next_frames())
                if got[index] == sent:
                    behind -= 1
                    if not behind:
                        caught_up.set()

        sent = 0

        await trio.sleep(0.3)
        start_cpu, start = relay.cpu(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for index, client in enumerate(clients):
                nursery.start_soon(consume, index, client)
            for _ in range(messages):
                behind, caught_up, sent = consumers, trio.Event(), sent + 1
                await producer.send_text(payload)
                await producer.next_frames()  # its echo: the relay has fanned it out
                await caught_up.wait()
        elapsed = relay.cpu() - start_cpu
        del start
        # The producer's own echo is a delivery too.
        return elapsed / (messages * (consumers + 1)) * 1e6
    finally:
        for client in clients:
            await client.stream.aclose()
        relay.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--groups", type=int, default=10, help="groups of 100 subscriptions")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--consumers", type=int, default=100)
    parser.add_argument("--only", choices=["memory", "fanout"])
    args = parser.parse_args()
    if args.only != "fanout":
        v1 = [await memory_run(args.groups, v2=False) for _ in range(args.reps)]
        v2 = [await memory_run(args.groups, v2=True) for _ in range(args.reps)]
        one, many = statistics.median(v1), statistics.median(v2)
        print(
            f"memory, relay RSS per 100 subscriptions ({args.groups} groups, medians of "
            f"{args.reps}):"
        )
        kib = [sorted(int(x / 1024) for x in runs) for runs in (v1, v2)]
        print(f"  100 v1 connections, 1 topic each: {one / 1024:6.0f} KiB  {kib[0]}")
        print(f"  1 v2 connection, 100 topics:      {many / 1024:6.0f} KiB  {kib[1]}")
        saved = (one - many) / 1024
        print(f"  v2 saves {100 * (1 - many / one):.0f} % ({saved:.0f} KiB per 100)")
    if args.only != "memory":
        figures: dict[str, list[float]] = {"raw": [], "v1": [], "v2": []}
        for _ in range(args.reps):
            for kind in figures:  # interleaved: load changes hit all kinds alike
                figures[kind].append(await fanout_run(kind, args.consumers, args.messages))
        print(
            f"fan-out, relay CPU per delivery ({args.consumers} consumers of one topic, "
            f"{args.messages} messages one at a time, medians of {args.reps}):"
        )
        for kind, values in figures.items():
            print(
                f"  {kind:3}: {statistics.median(values):6.2f} µs  "
                f"{[round(v, 2) for v in sorted(values)]}"
            )
        v1, v2 = statistics.median(figures["v1"]), statistics.median(figures["v2"])
        print(f"  v2 / v1 (same frames): {v2 / v1:.3f}")


if __name__ == "__main__":
    trio.run(main)
