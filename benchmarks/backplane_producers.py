"""Lock-step producers through the Redis backplane, beside one process without it.

    python benchmarks/backplane_producers.py                 # 10 producers, 3 repetitions
    python benchmarks/backplane_producers.py --producers 10 --messages 2000 --reps 3

Issue 12's throughput target: with 10 producers publishing in lock step (each waits for its
``ack`` before the next message), a relay with ``--backplane`` reaches at least half the
message rate of one relay without it. This starts, in turn (interleaved per repetition):

- ``single``: ``trio-relay serve``, no backplane;
- ``redis``: ``trio-relay serve --backplane`` on a private ``redis-server``;

and drives each from a separate process with ``--producers`` envelope connections
(``trio_relay.open_producer``), each publishing ``--messages`` 100-byte messages one at a
time, plus one consumer that must get every message. It prints messages per second, the
relay's CPU per message (and Redis's), medians over repetitions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import trio

import trio_relay


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)  # a child process starting: nothing to wait on but the port
    raise SystemExit(f"nothing listens on port {port}")


async def drive(port: int, producers: int, messages: int) -> float:
    """Publish in lock step from ``producers`` connections; return the seconds it took."""
    url = f"ws://127.0.0.1:{port}/bench"
    total = producers * messages
    async with trio_relay.consume(url, envelope=True) as received:

        async def produce(index: int) -> None:
            async with trio_relay.open_producer(url, envelope=True) as producer:
                for n in range(messages):
                    await producer.produce(f"{index}:{n}".ljust(100, "."))

        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for index in range(producers):
                nursery.start_soon(produce, index)
            count = 0
            async for _ in received:
                count += 1
                if count == total:
                    break
        return time.monotonic() - started


def run_once(kind: str, producers: int, messages: int) -> tuple[float, float, float]:
    port = free_port()
    command = [sys.executable, "-m", "trio_relay", "serve", "--port", str(port)]
    command += ["--host", "127.0.0.1", "--log-level", "WARNING", "--ping-interval", "0"]
    redis = None
    directory = tempfile.mkdtemp(prefix="trio-relay-bench-")
    if kind == "redis":
        redis_port = free_port()
        executable = shutil.which("redis-server") or sys.exit("redis-server not found")
        redis = subprocess.Popen(
            [
                *(executable, "--port", str(redis_port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", directory),
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(redis_port, time.monotonic() + 10)
        command += ["--backplane", f"redis://127.0.0.1:{redis_port}/0"]
    relay = subprocess.Popen(command)
    try:
        wait_for_port(port, time.monotonic() + 10)
        relay_cpu = cpu_seconds(relay.pid)
        redis_cpu = cpu_seconds(redis.pid) if redis else 0.0
        seconds = trio.run(drive, port, producers, messages)
        total = producers * messages
        relay_us = (cpu_seconds(relay.pid) - relay_cpu) / total * 1e6
        redis_us = (cpu_seconds(redis.pid) - redis_cpu) / total * 1e6 if redis else 0.0
        return total / seconds, relay_us, redis_us
    finally:
        relay.terminate()
        relay.wait(10)
        if redis is not None:
            redis.kill()
            redis.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--producers", type=int, default=10)
    parser.add_argument("--messages", type=int, default=1000, help="per producer")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float, float]]] = {"single": [], "redis": []}
    for _ in range(args.reps):
        for kind in results:
            results[kind].append(run_once(kind, args.producers, args.messages))
    print(
        f"{args.producers} lock-step producers x {args.messages} messages, medians of {args.reps}"
    )
    print("| server | msgs/s | relay CPU us/msg | Redis CPU us/msg |")
    print("|---|---:|---:|---:|")
    for kind, runs in results.items():
        rate = statistics.median(r[0] for r in runs)
        relay_us = statistics.median(r[1] for r in runs)
        redis_us = statistics.median(r[2] for r in runs)
        print(f"| {kind} | {rate:,.0f} | {relay_us:.1f} | {redis_us:.1f} |")
    single = statistics.median(r[0] for r in results["single"])
    redis = statistics.median(r[0] for r in results["redis"])
    print(f"redis / single message rate: {redis / single:.2f} (target: at least 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
