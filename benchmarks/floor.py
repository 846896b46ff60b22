"""The per-message floor: the least a trio relay must do per message, and nothing more.

    python benchmarks/floor.py --port 4000          # ws://127.0.0.1:4000/, every message to all

It accepts TCP connections, answers the WebSocket upgrade with just the Sec-WebSocket-Accept
of the key (no other validation), then runs one task per client that waits until its socket
is readable (``trio.lowlevel.wait_readable``) and reads it with ``os.read``, the way
trio_relay reads; unmasks the client's frames (small, unfragmented text or binary frames; a
read may hold several or part of one); frames what one read brought once, unmasked; and
writes those bytes to every client, the sender included, with ``os.write`` on the
non-blocking descriptor. What a socket does not take at once is queued for that client and
written with ``send_all`` by the task that found it full (no bound: this is not a relay).

What it is for: ``benchmarks/compare.py`` runs it in the shared benchmark beside trio_relay.
The ratio of trio_relay's server CPU per delivery to this floor's, at ``fan1-100B-w1`` and
``fan100-100B-w1`` (one message in flight, so nothing can be batched), is what the project
controls; the floor itself is trio's scheduler and the system calls.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import struct
from functools import partial

import trio

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.fd = stream.socket.fileno()
        self.pending: bytearray | None = None  # bytes the socket did not take yet


clients: set[Client] = set()


def frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def parse(buffer: bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """The complete client frames at the start of ``buffer``, and how many bytes they took."""
    frames: list[tuple[int, bytes]] = []
    at, size = 0, len(buffer)
    while size - at >= 2:
        opcode, length = buffer[at] & 0x0F, buffer[at + 1] & 0x7F
        head = at + 2 + {126: 2, 127: 8}.get(length, 0)
        if head + 4 > size:
            break
        if length == 126:
            (length,) = struct.unpack_from("!H", buffer, at + 2)
        elif length == 127:
            (length,) = struct.unpack_from("!Q", buffer, at + 2)
        end = head + 4 + length
        if end > size:
            break
        mask = bytes(buffer[head : head + 4]) * (length // 4 + 1)
        payload = int.from_bytes(buffer[head + 4 : end], "little") ^ int.from_bytes(
            mask[:length], "little"
        )
        frames.append((opcode, payload.to_bytes(length, "little")))
        at = end
    return frames, at


async def send_to_all(data: bytes) -> None:
    late: list[Client] = []
    for client in clients:  # no checkpoint in this loop: the set cannot change under it
        if client.pending is not None:  # a send_all is under way: queue behind it
            client.pending += data
            continue
        try:
            sent = os.write(client.fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            continue  # gone: its own task sees that and removes it
        if sent < len(data):
            client.pending = bytearray(data[sent:])
            late.append(client)
    for client in late:  # this task writes the rest, and whatever is queued meanwhile
        while client.pending:
            rest = bytes(client.pending)
            client.pending.clear()
            try:
                await client.stream.send_all(rest)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
        client.pending = None


async def handle(stream: trio.SocketStream) -> None:
    request = b""
    while b"\r\n\r\n" not in request:
        data = await stream.receive_some(65536)
        if not data or len(request) > 16384:
            return
        request += data
    head, _, early = request.partition(b"\r\n\r\n")
    keys = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]
            if line.lower().startswith(b"sec-websocket-key:")]  # fmt: skip
    if not keys:
        return
    accept = base64.b64encode(hashlib.sha1(keys[0] + GUID).digest())
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    client = Client(stream)
    clients.add(client)
    buffer = bytearray(early)
    try:
        while True:
            frames, used = parse(buffer)
            del buffer[:used]
            out = b"".join(frame(op, payload) for op, payload in frames if op in (1, 2))
            if out:
                await send_to_all(out)
            if any(op == 8 for op, _ in frames):
                return
            await trio.lowlevel.wait_readable(client.fd)
            try:
                data = os.read(client.fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return
            buffer += data
    finally:
        clients.discard(client)  # before the descriptor is closed and maybe reused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4000)
    args = parser.parse_args()
    trio.run(partial(trio.serve_tcp, handle, args.port, host=args.host))


if __name__ == "__main__":
    main()
