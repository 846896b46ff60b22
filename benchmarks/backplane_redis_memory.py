"""What the Redis backplane keeps in Redis: memory before and after a flood of big messages.

    python benchmarks/backplane_redis_memory.py                  # 1,500 x 256 KiB, 50 topics
    python benchmarks/backplane_redis_memory.py --topics 1 --messages 1500

Issue 12, row "1,500 messages of 256 KiB: Redis memory 17 MB -> 508 MB". This starts a
private ``redis-server`` (no persistence), runs one relay's topics with a
:class:`~trio_relay.RedisBackplane` in this process (the relay's default history bounds,
which each topic's log in Redis follows: 1,000 entries, 1 MiB of payload, 600 s), publishes
``--messages`` messages of ``--size`` bytes spread over ``--topics`` topics, and prints
Redis's ``used_memory`` before and after, with each topic's log length and payload bytes.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import trio
from mass_disconnect import free_port  # beside this script

from trio_relay import RedisBackplane, Topics


def info_memory(port: int) -> int:
    """Redis's ``used_memory``, in bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nmemory\r\n")
        data = b""
        while b"used_memory:" not in data or not data.endswith(b"\r\n"):
            data += conn.recv(65536)
    for line in data.decode().splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    raise RuntimeError("no used_memory in INFO")


async def flood(
    port: int, topics_count: int, messages: int, size: int
) -> list[tuple[str, int, int]]:
    import coredis

    topics = Topics()
    backplane = RedisBackplane(f"redis://127.0.0.1:{port}/0")
    payload = b"x" * size
    async with trio.open_nursery() as nursery:
        await nursery.start(backplane.run, topics)
        for n in range(messages):
            report = await topics.publish(f"big{n % topics_count}", payload)
            assert report.remote is True, report
        nursery.cancel_scope.cancel()
    client = coredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", decode_responses=False)
    logs = []
    async with client:
        for t in range(topics_count):
            name = f"big{t}"
            length = await client.xlen(f"trio-relay:{{t:{name}}}:log")
            payload_bytes = int(await client.hget(f"trio-relay:{{t:{name}}}:n", "b") or 0)
            logs.append((name, length, payload_bytes))
    return logs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topics", type=int, default=50)
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--size", type=int, default=256 * 1024)
    args = parser.parse_args()
    redis = shutil.which("redis-server")
    if redis is None:
        sys.exit("redis-server not found")
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        server = subprocess.Popen(
            [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", directory],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    before = info_memory(port)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)  # a benchmark waiting for its own Redis to listen
            logs = trio.run(flood, port, args.topics, args.messages, args.size)
            after = info_memory(port)
        finally:
            server.terminate()
            server.wait()
    print(
        f"{args.messages} messages of {args.size} bytes on {args.topics} topics: Redis "
        f"used_memory {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB"
    )
    lengths = sorted({length for _, length, _ in logs})
    total = sum(b for _, _, b in logs)
    print(f"each topic's log holds {lengths} entries; payload in all logs {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
