"""What one idle connection costs the relay: CPU to set it up, memory to keep it, and where
each goes (tracemalloc, cProfile).

    python benchmarks/idle_cost.py                      # 5,000 connections: CPU and RSS
    python benchmarks/idle_cost.py --mode mem           # + tracemalloc: bytes per connection
    python benchmarks/idle_cost.py --mode prof          # + cProfile of the set-ups
    python benchmarks/idle_cost.py --pythonpath ../old  # another checkout's trio_relay
    python benchmarks/idle_cost.py --drop --mode prof   # closing them all at once, profiled

It starts ``trio-relay serve`` (this tree's, or ``--pythonpath``'s) in a subprocess with its
connection and subscriber limits raised, opens 200 warm-up clients, then ``--clients``
plain WebSocket clients on ``--path`` (raw sockets, 64 handshakes in flight, from this
process), and prints the relay's CPU time (utime + stime, /proc) and RSS growth per
connection over the second batch. In ``mem`` mode the relay runs under tracemalloc and
snapshots before and after the batch (the set-up CPU figure then includes the tracing);
the difference per connection is printed by source line and by traceback. In ``prof`` mode
the batch runs under cProfile. The relay is told when to start and stop by SIGUSR1 and
SIGUSR2 (handlers this script installs in the relay's process, before the relay starts).

The shared benchmark's ``conn19k`` (``benchmarks/compare.py --scale``) gives the figures
beside the peers; this gives the same figures quicker, and their breakdown.
"""

from __future__ import annotations

import argparse
import linecache
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
IN_FLIGHT = 64
LIMITS = ["--max-connections", "25000", "--max-connections-per-ip", "25000"]
LIMITS += ["--max-subscribers-per-topic", "25000"]


def relay(mode: str, out: str, argv: list[str]) -> None:
    """In the relay's process: install the start/stop handlers, then run the relay."""
    import cProfile
    import gc
    import tracemalloc

    profile = cProfile.Profile()
    if mode == "mem":
        tracemalloc.start(12)

    def start(*_: object) -> None:
        if mode == "mem":
            gc.collect()
            tracemalloc.take_snapshot().dump(out + ".a")
        elif mode == "prof":
            profile.enable()

    def stop(*_: object) -> None:
        if mode == "mem":
            gc.collect()
            tracemalloc.take_snapshot().dump(out + ".b")
        elif mode == "prof":
            profile.disable()
            profile.dump_stats(out + ".prof")
        Path(out + ".done").touch()

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from trio_relay._cli import main

    sys.exit(main(["serve", *argv]))


def open_clients(port: int, path: str, count: int) -> list[socket.socket]:
    """``count`` upgraded clients, IN_FLIGHT handshakes at a time."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    selector = selectors.DefaultSelector()
    done: list[socket.socket] = []
    started = pending = 0
    while len(done) < count:
        while pending < IN_FLIGHT and started < count:
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            selector.register(client, selectors.EVENT_WRITE, bytearray())
            started += 1
            pending += 1
        for key, events in selector.select(10):
            client = key.fileobj
            assert isinstance(client, socket.socket)
            if events & selectors.EVENT_WRITE:
                client.send(request)
                selector.modify(client, selectors.EVENT_READ, key.data)
                continue
            key.data.extend(client.recv(4096))
            if b"\r\n\r\n" in key.data:
                if not key.data.startswith(b"HTTP/1.1 101"):
                    status = bytes(key.data).partition(b"\r\n")[0].decode()
                    sys.exit(f"refused: {status}")
                selector.unregister(client)
                done.append(client)
                pending -= 1
    return done


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_idle(pid: int) -> float:
    """Wait until the relay has used no CPU for 0.3 s; when it last did (monotonic)."""
    last, at = cpu_seconds(pid), time.monotonic()
    while True:
        time.sleep(0.05)
        now = cpu_seconds(pid)
        if now != last:
            last, at = now, time.monotonic()
        elif time.monotonic() - at > 0.3:
            return at


def report_memory(out: str, count: int, top: int) -> None:
    import tracemalloc

    before = tracemalloc.Snapshot.load(out + ".a")
    after = tracemalloc.Snapshot.load(out + ".b")
    by_line = after.compare_to(before, "lineno")
    total = sum(stat.size_diff for stat in by_line)
    print(f"\ntracemalloc: {total / count:.0f} B per connection; by source line:")
    for stat in by_line[:top]:
        frame = stat.traceback[0]
        text = linecache.getline(frame.filename, frame.lineno).strip()[:70]
        place = f"{Path(frame.filename).name}:{frame.lineno}"
        size, blocks = stat.size_diff / count, stat.count_diff / count
        print(f"{size:7.0f} B {blocks:5.2f} blocks  {place:28} {text}")
    print("\nby traceback (innermost last):")
    for stat in after.compare_to(before, "traceback")[:top]:
        print(f"{stat.size_diff / count:7.0f} B {stat.count_diff / count:5.2f} blocks")
        for line in stat.traceback.format()[-8:]:
            print("       ", line)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=5000, help="default: %(default)s")
    parser.add_argument("--mode", choices=("cpu", "mem", "prof"), default="cpu")
    parser.add_argument("--path", default="/", help="the clients' topic; default: /")
    parser.add_argument("--top", type=int, default=40, help="lines of breakdown")
    parser.add_argument("--pythonpath", help="run the trio_relay found here instead")
    parser.add_argument(
        "--drop",
        action="store_true",
        help="measure closing instead: the clients close their sockets at once (FIN)",
    )
    parser.add_argument("--relay", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay is not None:
        relay(args.mode, os.environ["IDLE_COST_OUT"], args.relay)
        return 0
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tempfile.mkdtemp(prefix="idle-cost-") + "/run"
    env = dict(os.environ, IDLE_COST_OUT=out)
    if args.pythonpath:
        env["PYTHONPATH"] = str(Path(args.pythonpath).resolve())
    command = [sys.executable, __file__, "--mode", args.mode, "--relay"]
    command += ["--host", "127.0.0.1", "--port", str(port), *LIMITS]
    server = subprocess.Popen(command, env=env, cwd=args.pythonpath or ROOT)
    try:
        for _ in range(600):  # the relay starts slowly under tracemalloc
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            sys.exit("the relay did not start listening within 60 s")
        warm = open_clients(port, args.path, 200)
        if args.drop:
            clients = open_clients(port, args.path, args.clients)
        time.sleep(0.5)
        server.send_signal(signal.SIGUSR1)
        time.sleep(2.0 if args.mode == "mem" else 0.3)
        cpu, rss, began = cpu_seconds(server.pid), rss_kib(server.pid), time.monotonic()
        if args.drop:
            for client in clients:
                client.close()
            clients = []
            wall = wait_idle(server.pid) - began
        else:
            clients = open_clients(port, args.path, args.clients)
            wall = time.monotonic() - began
            time.sleep(0.3)
        cpu, rss = cpu_seconds(server.pid) - cpu, rss_kib(server.pid) - rss
        server.send_signal(signal.SIGUSR2)
        while not Path(out + ".done").exists():
            time.sleep(0.1)
        event = "close (all at once)" if args.drop else "set-up"
        print(
            f"{args.clients} connections on {args.path}: server CPU {cpu / args.clients * 1e6:.0f} "
            f"µs per {event}, RSS {rss / args.clients:.2f} KiB per connection, {wall:.2f} s"
            + (" (under tracemalloc)" if args.mode == "mem" else "")
            + (" (under cProfile)" if args.mode == "prof" else "")
        )
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    for client in [*warm, *clients]:
        client.close()
    if args.mode == "mem":
        report_memory(out, args.clients, args.top)
    elif args.mode == "prof":
        import pstats

        stats = pstats.Stats(out + ".prof")
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
