"""Memory abuse at the issue's scale, against a real relay process with default settings:
how much the relay's memory grows, what the attacker gets, and what a bystander sees.

    python benchmarks/abuse_memory.py                  # both rows of issue 11
    python benchmarks/abuse_memory.py --rows topics    # or: unfinished
    python benchmarks/abuse_memory.py --topics 300 --connections 60 --hold 5   # quicker

Rows (issue 11):

* ``topics``: one client opens ``--topics`` (1,500) topics, one ``--size`` (1 MB) message
  each (it reads the echo, so the message was published), and leaves; then a client
  resumes on the first topic with ``since=0`` (the relay must say those messages are gone:
  close 4410). Required: RSS growth within ``--history-total-bytes`` (64 MiB) + 20 MiB.
* ``unfinished``: ``--connections`` (300) connections each send all of a 1 MiB - 1 message
  but its last byte: every other one as one frame, the rest as 16 complete 64 KiB fragments
  (the final one missing) with a ping after each, answering the relay's pings meanwhile;
  they hold for ``--hold`` seconds. Required: the relay holds at most
  ``--max-unfinished-bytes`` (64 MiB) of them; the connection whose message would go
  past it is closed with 1013; nobody else is affected.

Each row starts a fresh relay (``python -m trio_relay serve`` on 127.0.0.1, run in the
directory above this script's, so it is this tree's, with its defaults), connects a
bystander on its own topic that publishes a small message every ``--interval`` seconds and
times each echo, then runs the attacker in a process of its own and prints one line: the
relay's RSS before, at its peak during the attack, after it, and ``--settle`` seconds
later (VmRSS from /proc), what the attacker got, and the bystander's echo latency
p50/p99/max over the attack (a message never echoed counts as infinitely late).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import trio
from mass_disconnect import free_port, started, upgrade_request  # beside this script

ROOT = Path(__file__).resolve().parent.parent  # the relay runs here: this tree's trio_relay
SERVER_CMD = f"{shlex.quote(sys.executable)} -m trio_relay serve --host 127.0.0.1 --port {{port}}"
MiB = 1024 * 1024
FRAGMENT = 64 * 1024


# ------------------------------------------------------------------ frames


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame masked with key 0 (the payload as it is: no CPU spent masking)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


class Client:
    """A raw WebSocket client: the handshake, then the relay's (unmasked) frames."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def connect(cls, port: int, path: str) -> Client:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await client.stream.send_all(upgrade_request(port, path))
        while b"\r\n\r\n" not in client.buffer:
            data = await client.stream.receive_some(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            client.buffer += data
        head, _, rest = bytes(client.buffer).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.partition(b"\r\n")[0].decode())
        client.buffer = bytearray(rest)
        return client

    async def frame(self) -> tuple[int, bytes]:
        """The next frame: (opcode, payload); (-1, b"") when the stream ends."""
        while True:
            buffer = self.buffer
            if len(buffer) >= 2:
                n, at = buffer[1] & 0x7F, 2
                if n == 126 and len(buffer) >= 4:
                    n, at = int.from_bytes(buffer[2:4], "big"), 4
                elif n == 127 and len(buffer) >= 10:
                    n, at = int.from_bytes(buffer[2:10], "big"), 10
                if (n < 126 or at > 2) and len(buffer) >= at + n:
                    opcode, payload = buffer[0] & 0x0F, bytes(buffer[at : at + n])
                    del buffer[: at + n]
                    return opcode, payload
            try:
                data = await self.stream.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return -1, b""
            buffer += data

    async def close_code(self) -> int:
        """Read until the relay's close frame (answering pings): its code; 1006 at EOF."""
        while True:
            opcode, payload = await self.frame()
            if opcode == -1:
                return 1006
            if opcode == 8:
                return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if opcode == 9:
                await self.stream.send_all(client_frame(0xA, payload))


# ------------------------------------------------------------------ the attackers


async def attack_topics(port: int, topics: int, size: int, concurrency: int) -> None:
    """Open ``topics`` topics, one message of ``size`` bytes each (read back: published),
    and leave; then resume on the first with since=0."""
    message = b"x" * size
    frame = client_frame(0x2, message)
    limit = trio.Semaphore(concurrency)
    start = time.perf_counter()

    published: list[int] = []  # in the order the echoes came back

    async def one(n: int) -> None:
        async with limit:
            client = await Client.connect(port, f"/abuse/{n}")
            await client.stream.send_all(frame)
            while True:
                opcode, payload = await client.frame()
                if opcode == 2 and payload == message:
                    break
                if opcode in (-1, 8):
                    raise ConnectionError(f"topic {n}: closed before its echo")
            published.append(n)
            await client.stream.aclose()

    async with trio.open_nursery() as nursery:
        for n in range(topics):
            nursery.start_soon(one, n)
    seconds = time.perf_counter() - start
    print(json.dumps({"ready": True}), flush=True)
    # The first topic published to: its message is the oldest, so it went first.
    resumed = await Client.connect(port, f"/abuse/{published[0]}?since=0")
    with trio.move_on_after(10):
        opcode, payload = await resumed.frame()
    if opcode == 8:
        outcome = f"close {int.from_bytes(payload[:2], 'big')}: {payload[2:].decode()}"
    else:
        outcome = f"frame {opcode} of {len(payload)} bytes: still retained"
    print(json.dumps({"topics": topics, "seconds": round(seconds, 1), "resume": outcome}))


async def attack_unfinished(port: int, connections: int, hold: float, concurrency: int) -> None:
    """``connections`` connections each holding all of a 1 MiB - 1 message but its last
    byte (every other one in fragments, with pings between them); hold, then leave."""
    payload_size = MiB - 1
    whole = client_frame(0x2, b"w" * payload_size)[:-1]
    rest = payload_size - 1  # in fragments: complete frames, the final one never sent
    sizes = [FRAGMENT] * (rest // FRAGMENT) + ([rest % FRAGMENT] if rest % FRAGMENT else [])
    outcomes: dict[str, int] = {}
    limit = trio.Semaphore(concurrency)
    clients: list[Client] = []
    tried = trio.Event()
    left = connections

    def count(key: str, by: int = 1) -> None:
        outcomes[key] = outcomes.get(key, 0) + by

    async def send(client: Client, fragments: bool) -> int | None:
        """Send the unfinished message; the relay's close code if it closed meanwhile."""
        if not fragments:
            await client.stream.send_all(whole)
            return None
        for k, size in enumerate(sizes):
            data = client_frame(0x2 if k == 0 else 0x0, b"f" * size, fin=False)
            await client.stream.send_all(data + client_frame(0x9, b"%d" % k))
            while True:  # until the pong to our ping (answering the relay's pings)
                opcode, answer = await client.frame()
                if opcode == 9:
                    await client.stream.send_all(client_frame(0xA, answer))
                elif opcode == 0xA and answer == b"%d" % k:
                    break
                elif opcode in (-1, 8):
                    return int.from_bytes(answer[:2], "big") if len(answer) >= 2 else 1006
        return None

    async def one(n: int) -> None:
        nonlocal left
        fragments = n % 2 == 1
        try:
            async with limit:
                try:
                    client = await Client.connect(port, f"/unfinished/{n}")
                except (OSError, ConnectionError) as exc:
                    count(f"not connected: {exc}")
                    return
                clients.append(client)
                code = None
                try:
                    code = await send(client, fragments)
                except (OSError, trio.BrokenResourceError):
                    # Closed while it was still sending: the relay's close frame says why.
                    with trio.move_on_after(5):
                        code = await client.close_code()
        finally:
            left -= 1
            if not left:
                tried.set()
        kind = "fragments" if fragments else "whole"
        if code is not None:
            count(f"{kind}: closed {code}")
            return
        # Holding until the relay closes it or the attacker leaves. One inside a frame
        # cannot answer the relay's pings (its pong would become part of the message).
        count(f"{kind}: holding")
        while True:
            opcode, answer = await client.frame()
            if opcode == 9 and fragments:
                await client.stream.send_all(client_frame(0xA, answer))
            elif opcode in (-1, 8):
                count(f"{kind}: holding", -1)
                code = int.from_bytes(answer[:2], "big") if len(answer) >= 2 else 1006
                count(f"{kind}: closed {code}")
                return

    async with trio.open_nursery() as nursery:
        for n in range(connections):
            nursery.start_soon(one, n)
        await tried.wait()
        await trio.sleep(1.0)  # the 1013 closes of the last ones arrive
        print(json.dumps({"ready": True, **outcomes}), flush=True)
        await trio.sleep(hold)
        print(json.dumps({"after_hold_s": hold, **outcomes}), flush=True)
        nursery.cancel_scope.cancel()
    for client in clients:
        with contextlib.suppress(OSError):
            client.stream.socket.close()


# ------------------------------------------------------------------ the measuring process


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def relay(command: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    with started(shlex.split(command.format(port=port)), cwd=ROOT) as process:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the relay did not start")
            time.sleep(0.05)
        yield process, port


class Bystander:
    """A client on its own topic: a small message every ``interval`` s, each echo timed."""

    def __init__(self, client: Client, interval: float) -> None:
        self.client, self.interval = client, interval
        self.sent: dict[int, float] = {}
        self.latency: dict[int, float] = {}
        self.sending = True
        self.lock = trio.Lock()  # its messages and its pongs: one write at a time

    async def send(self) -> None:
        seq, next_at = 0, trio.current_time()
        while self.sending:
            async with self.lock:
                self.sent[seq] = time.perf_counter()
                await self.client.stream.send_all(client_frame(0x1, str(seq).encode()))
            seq += 1
            next_at += self.interval
            await trio.sleep_until(max(next_at, trio.current_time()))

    async def receive(self) -> None:
        while True:
            opcode, payload = await self.client.frame()
            if opcode == 1:
                seq = int(payload)
                self.latency[seq] = time.perf_counter() - self.sent[seq]
            elif opcode == 9:
                async with self.lock:
                    await self.client.stream.send_all(client_frame(0xA, payload))
            elif opcode in (-1, 8):
                raise ConnectionError("the relay closed the bystander")

    def figures(self, first: int, last: int) -> str:
        window = [self.latency.get(seq, math.inf) for seq in range(first, last)]
        if not window:
            return "bystander: no messages"
        window.sort()
        p50 = statistics.median(window)
        p99 = window[min(len(window) - 1, math.ceil(len(window) * 0.99) - 1)]
        lost = sum(1 for value in window if value == math.inf)
        return (
            f"bystander echo p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
            f"max {window[-1] * 1000:.1f} ms over {len(window)} messages ({lost} lost)"
        )


async def measure(row: str, args: argparse.Namespace) -> None:
    with relay(args.server_cmd) as (process, port):
        bystander = Bystander(await Client.connect(port, "/bystander"), args.interval)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bystander.send)
            nursery.start_soon(bystander.receive)
            await trio.sleep(1.0)
            before = rss_mib(process.pid)
            first = len(bystander.sent)
            command = [sys.executable, __file__, f"_attack_{row}", "--port", str(port)]
            command += ["--topics", str(args.topics), "--size", str(args.size)]
            command += ["--connections", str(args.connections), "--hold", str(args.hold)]
            command += ["--concurrency", str(args.concurrency)]
            peak = before
            results: list[dict[str, object]] = []
            start = time.perf_counter()
            attacker = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
            try:
                assert attacker.stdout is not None
                lines = b""

                async def sample() -> None:
                    nonlocal peak
                    while True:
                        peak = max(peak, rss_mib(process.pid))
                        await trio.sleep(0.1)

                async with trio.open_nursery() as sampling:
                    sampling.start_soon(sample)
                    while data := await attacker.stdout.receive_some():
                        lines += data
                        while b"\n" in lines:
                            line, lines = lines.split(b"\n", 1)
                            results.append(json.loads(line))
                            if results[-1].get("ready"):
                                results[-1]["rss_mib"] = rss_mib(process.pid)
                                results[-1]["at_s"] = round(time.perf_counter() - start, 1)
                    sampling.cancel_scope.cancel()
                await attacker.wait()
            finally:
                if attacker.returncode is None:
                    attacker.kill()
                    await attacker.wait()
            last = len(bystander.sent)
            after = rss_mib(process.pid)
            await trio.sleep(args.settle)
            settled = rss_mib(process.pid)
            await trio.sleep(2.0)  # the last echoes arrive
            bystander.sending = False
            nursery.cancel_scope.cancel()
    if row == "topics":
        what = f"{args.topics} topics x {args.size} B, one client"
    else:
        what = f"{args.connections} connections x {MiB - 1} B unfinished, held {args.hold} s"
    print(f"{row}: {what}")
    print(
        f"  relay RSS: {before:.1f} MiB before, peak {peak:.1f} (+{peak - before:.1f}), "
        f"{after:.1f} (+{after - before:.1f}) after, {settled:.1f} (+{settled - before:.1f}) "
        f"{args.settle:g} s later"
    )
    for result in results:
        print(f"  attacker: {json.dumps(result)}")
    print(f"  {bystander.figures(first, last)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="topics,unfinished")
    parser.add_argument("--topics", type=int, default=1500)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument(
        "--hold",
        type=float,
        default=45.0,
        help="seconds the holders hold (past --ping-interval + --ping-timeout: 40 s)",
    )
    parser.add_argument("--interval", type=float, default=0.01, help="bystander's period")
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument(
        "--concurrency", type=int, default=16, help="topics the attacker opens at once"
    )
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--server-cmd", default=SERVER_CMD, help="default: %(default)s")
    parser.add_argument("mode", nargs="?", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "_attack_topics":
        trio.run(attack_topics, args.port, args.topics, args.size, args.concurrency)
        return
    if args.mode == "_attack_unfinished":
        trio.run(attack_unfinished, args.port, args.connections, args.hold, 32)
        return
    for row in args.rows.split(","):
        trio.run(measure, row, args)


if __name__ == "__main__":
    main()
