"""Issue 11's shutdown row against a real relay process: SIGTERM while a consumer is behind.

    python benchmarks/abuse_shutdown.py                      # 3,000 messages of 1,000 bytes
    python benchmarks/abuse_shutdown.py --messages 10000 --python /other/venv/bin/python
    python benchmarks/abuse_shutdown.py --relay-source /path/to/an/old/checkout   # its relay

Starts ``trio-relay serve`` (defaults) on a free 127.0.0.1 port. A consumer with a small
receive buffer reads slowly (``--read-rate`` bytes a second) while an envelope producer
publishes ``--messages`` messages (sent all at once; the relay's backpressure paces them),
each acknowledged: every ``ack`` whose ``queued`` counts
the consumer (2: the producer's own subscription and the consumer's) is a message the relay
promised to that consumer. Then the relay gets SIGTERM and the consumer reads as fast as it
can. Prints how far behind the consumer was, what it received in all, what is missing, and
how the connection ended (required: nothing missing, then close 1001, within the relay's
``--close-timeout``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from trio_relay._envelope import SUBPROTOCOL

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def wait_for_port(port: int, deadline: float) -> None:
    while True:
        try:
            stream = await trio.open_tcp_stream(HOST, port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await trio.sleep(0.05)
            continue
        await stream.aclose()
        return


class SlowConsumer:
    """A raw client with a 16 KiB receive buffer that reads at a given rate."""

    def __init__(self) -> None:
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.received: list[str] = []
        self.close_code: int | None = None
        self.ended_at: float | None = None
        self._part = ""

    async def connect(self, port: int) -> None:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        await sock.connect((HOST, port))
        self.stream = trio.SocketStream(sock)
        await self.stream.send_all(self.ws.send(Request(host=HOST, target="/")))
        while not await self._read(65536, accept=True):
            pass

    async def _read(self, size: int, *, accept: bool = False) -> bool:
        data = await self.stream.receive_some(size)
        if not data:
            self.ended_at = time.monotonic()
            raise EOFError
        self.ws.receive_data(data)
        accepted = False
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                accepted = True
            elif isinstance(event, TextMessage):
                self._part += event.data
                if event.message_finished:
                    self.received.append(self._part)
                    self._part = ""
            elif isinstance(event, CloseConnection):
                self.close_code = event.code
                self.ended_at = time.monotonic()
        return accepted or not accept

    async def read_slowly(self, rate: int, stop: trio.Event) -> None:
        chunk = 4096
        while not stop.is_set():
            await self._read(chunk)
            await trio.sleep(chunk / rate)

    async def read_to_the_end(self) -> None:
        try:
            while self.close_code is None:
                await self._read(65536)
        except EOFError:
            pass


async def publish_all(port: int, count: int, size: int) -> list[tuple[str, int]]:
    """Publish ``count`` messages as an envelope client, all sent at once (the relay's
    backpressure paces them), and return each message with its ack's ``queued``."""
    ws = WSConnection(ConnectionType.CLIENT)
    stream = await trio.open_tcp_stream(HOST, port)
    await stream.send_all(ws.send(Request(host=HOST, target="/", subprotocols=[SUBPROTOCOL])))
    pending: list[object] = []
    while not any(isinstance(event, AcceptConnection) for event in pending):
        ws.receive_data(await stream.receive_some(65536))
        pending += ws.events()
    messages = [f"{i:06d}" + "m" * (size - 6) for i in range(count)]
    queued: dict[int, int] = {}

    async def send_all() -> None:
        for start in range(0, count, 100):
            frames = [
                ws.send(TextMessage(json.dumps({"type": "publish", "id": i, "text": messages[i]})))
                for i in range(start, min(start + 100, count))
            ]
            await stream.send_all(b"".join(frames))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_all)
        part = ""
        while len(queued) < count:
            data = await stream.receive_some(65536)
            if not data:
                raise EOFError("the relay closed the producer's connection")
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, TextMessage):
                    part += event.data
                    if event.message_finished:
                        frame = json.loads(part)
                        part = ""
                        if frame.get("type") == "ack":
                            queued[frame["id"]] = frame["queued"]
    await stream.aclose()
    return [(messages[i], queued[i]) for i in range(count)]


async def main(args: argparse.Namespace) -> None:
    port = free_port()
    # trio.lowlevel.open_process: trio's documented way to start a process it does not wait for.
    relay = await trio.lowlevel.open_process(
        [args.python, "-m", "trio_relay", "serve", "--host", HOST, "--port", str(port)],
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": args.relay_source} if args.relay_source else None,
    )
    try:
        await wait_for_port(port, time.monotonic() + 20)
        consumer = SlowConsumer()
        await consumer.connect(port)
        promised: list[str] = []
        stop_reading = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consumer.read_slowly, args.read_rate, stop_reading)
            for message, queued in await publish_all(port, args.messages, args.size):
                if queued >= 2:
                    promised.append(message)
            behind = len(promised) - len(consumer.received)
            relay.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            stop_reading.set()
        await consumer.read_to_the_end()
        with trio.fail_after(60):
            await relay.wait()
    finally:
        if relay.poll() is None:
            relay.kill()
    received = consumer.received
    missing = [m for m in promised if m not in set(received)]
    ended = (consumer.ended_at or time.monotonic()) - signalled
    print(f"messages acknowledged as queued for the consumer: {len(promised)}")
    print(f"consumer behind at SIGTERM: {behind} messages ({behind * args.size / 1024:.0f} KiB)")
    print(f"received in all: {len(received)}, in order: {received == promised[: len(received)]}")
    print(f"missing: {len(missing)}")
    code = consumer.close_code
    print(f"ended with: {'close ' + str(code) if code is not None else 'EOF (no close frame)'}")
    print(f"seconds from SIGTERM to the end of the connection: {ended:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--read-rate", type=int, default=1_000_000, help="bytes a second")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument(
        "--relay-source", help="a checkout whose trio_relay the relay process runs (PYTHONPATH)"
    )
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    trio.run(main, parser.parse_args())
