"""Lock-step producers through the Redis backplane, beside one process without it.

    python benchmarks/backplane_producers.py                 # 10 producers, 3 repetitions
    python benchmarks/backplane_producers.py --producers 10 --messages 2000 --reps 3
    python benchmarks/backplane_producers.py --cluster      # and on a 3-node Redis Cluster

Issue 12's throughput target: with 10 producers publishing in lock step (each waits for its
``ack`` before the next message), a relay with ``--backplane`` reaches at least half the
message rate of one relay without it. This starts, in turn (interleaved per repetition):

- ``single``: ``trio-relay serve``, no backplane;
- ``redis``: ``trio-relay serve --backplane`` on a private ``redis-server``;
- with ``--cluster``, ``redis-cluster``: ``--backplane redis+cluster://`` on three private
  ``redis-server --cluster-enabled yes`` nodes, a third of the slots each (Redis's CPU is
  the three nodes' together);

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


def redis_command(port: int, *args: str) -> bytes:
    """One command to the Redis on ``port`` (RESP over a plain socket); its first line."""
    request = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(arg.encode())}\r\n{arg}\r\n".encode() for arg in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while b"\r\n" not in answer:
            chunk = conn.recv(65536)
            if not chunk:
                raise SystemExit(f"Redis on port {port} closed the connection")
            answer += chunk
        if answer.startswith(b"$"):  # a bulk string: read it whole
            length = int(answer.split(b"\r\n", 1)[0][1:])
            while len(answer.split(b"\r\n", 1)[1]) < length + 2:
                answer += conn.recv(65536)
            return answer.split(b"\r\n", 1)[1][:length]
        return answer.split(b"\r\n", 1)[0]


def start_cluster(executable: str, directory: str) -> list[subprocess.Popen[bytes]]:
    """Three cluster nodes holding a third of the slots each, joined; return once every
    node says ``cluster_state:ok``. Their ports are ``nodes[i].args[2]``."""
    nodes = []
    ranges = ((0, 5460), (5461, 10922), (10923, 16383))
    for index, (first, last) in enumerate(ranges):
        port = free_port()
        while port > 55535:  # the cluster bus listens 10,000 ports higher
            port = free_port()
        home = os.path.join(directory, f"node{index}")
        os.mkdir(home)
        nodes.append(
            subprocess.Popen(
                [
                    *(executable, "--port", str(port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no", "--dir", home),
                    *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        wait_for_port(port, time.monotonic() + 10)
        redis_command(port, "CLUSTER", "ADDSLOTSRANGE", str(first), str(last))
    ports = [int(node.args[2]) for node in nodes]
    for port in ports[1:]:
        redis_command(port, "CLUSTER", "MEET", "127.0.0.1", str(ports[0]))
    deadline = time.monotonic() + 30
    for port in ports:
        while b"cluster_state:ok" not in redis_command(port, "CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise SystemExit("the Redis Cluster did not come up")
            time.sleep(0.05)  # the nodes meeting: nothing to wait on but their answer
    return nodes


def run_once(kind: str, producers: int, messages: int) -> tuple[float, float, float]:
    port = free_port()
    command = [sys.executable, "-m", "trio_relay", "serve", "--port", str(port)]
    command += ["--host", "127.0.0.1", "--log-level", "WARNING", "--ping-interval", "0"]
    redis = None
    cluster: list[subprocess.Popen[bytes]] = []
    directory = tempfile.mkdtemp(prefix="trio-relay-bench-")
    if kind == "redis-cluster":
        executable = shutil.which("redis-server") or sys.exit("redis-server not found")
        cluster = start_cluster(executable, directory)
        command += ["--backplane", f"redis+cluster://127.0.0.1:{cluster[0].args[2]}"]
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
        servers = [redis] if redis else cluster
        redis_cpu = sum(cpu_seconds(server.pid) for server in servers)
        seconds = trio.run(drive, port, producers, messages)
        total = producers * messages
        relay_us = (cpu_seconds(relay.pid) - relay_cpu) / total * 1e6
        redis_us = (sum(cpu_seconds(server.pid) for server in servers) - redis_cpu) / total * 1e6
        return total / seconds, relay_us, redis_us
    finally:
        relay.terminate()
        relay.wait(10)
        for server in [redis] if redis else cluster:
            server.kill()
            server.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--producers", type=int, default=10)
    parser.add_argument("--messages", type=int, default=1000, help="per producer")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cluster", action="store_true", help="also on a Redis Cluster")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float, float]]] = {"single": [], "redis": []}
    if args.cluster:
        results["redis-cluster"] = []
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
