"""Per-topic routing at scale: N clients, each on a topic of its own, on one relay with the
Redis backplane, beside the same relay without it, in one run.

    python benchmarks/backplane_topics.py                    # 19,800 clients
    python benchmarks/backplane_topics.py --clients 2000     # cost per event must not grow

Issue 12's routing: a relay subscribes to the Redis channel of every topic its clients
hold (and only those), reads each new topic's log before the client's ``welcome``, and
leaves the channel when it forgets the topic. This measures what that costs when every
client has a topic of its own (the worst case for routing: one channel per connection).
For each server (``single``: ``trio-relay serve``; ``backplane``: the same with
``--backplane`` on a private ``redis-server``, started afresh):

1. **subscribe**: helper processes (``--per-process`` clients each, raw sockets, the
   ``trio-relay.v1`` envelope subprotocol, ``--in-flight`` handshakes at a time per
   helper) connect N clients to ``/t0`` ... ``/t<N-1>``; a client counts once its
   ``welcome`` came. Printed: seconds until all had it, the relay's CPU per
   subscription (utime + stime, /proc), its RSS growth per connection, Redis's
   ``used_memory`` growth and how many channels have a subscriber (``PUBSUB CHANNELS``).
2. **deliver**: one message to each of 1,000 random topics of the N (``--publishes``),
   one every ``--interval`` s, by ``POST /api/publish``: with the backplane through a
   second relay process (so every message reaches the measured relay through Redis),
   without it on the measured relay itself. The payload is the send time
   (``time.monotonic``: one clock for all processes on Linux); printed: delivery latency
   p50/p99/max (HTTP request included: the publisher's relay holds a topic before it
   publishes to it, so with the backplane that is a new topic for it each time) and the
   measured relay's CPU per delivery.
3. **disconnect**: every helper closes all its sockets at once (FIN). Printed: seconds
   until ``/healthz`` reports no connection, and with the backplane until Redis reports
   only the channels the relay keeps (the 1,000 topics with a retained message, and its
   heartbeat channel: the publishing relay is stopped first), polled every 20 ms; and
   the relay's CPU per disconnect.

The descriptor limit here is 20,000 per process (not raisable without privileges), so the
relay can hold about 19,900 connections: the default is 19,800.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import trio
from idle_cost import cpu_seconds, rss_kib  # beside this script
from mass_disconnect import free_port, raise_descriptor_limit, started

ROOT = Path(__file__).resolve().parent.parent  # the relay runs here: this tree's trio_relay
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


# ------------------------------------------------------------------ helper: hold clients


def frames(buffer: bytearray) -> Iterator[tuple[int, bytes]]:
    """Take the whole (unmasked, unfragmented) frames at the start of ``buffer``."""
    while len(buffer) >= 2:
        size, offset = buffer[1] & 0x7F, 2
        if size == 126:
            if len(buffer) < 4:
                return
            size, offset = int.from_bytes(buffer[2:4], "big"), 4
        elif size == 127:
            if len(buffer) < 10:
                return
            size, offset = int.from_bytes(buffer[2:10], "big"), 10
        if len(buffer) < offset + size:
            return
        opcode = buffer[0] & 0x0F
        payload = bytes(buffer[offset : offset + size])
        del buffer[: offset + size]
        yield opcode, payload


def upgrade_request(port: int, topic: str) -> bytes:
    return (
        f"GET /{topic} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: trio-relay.v1\r\n\r\n"
    ).encode()


def hold(first: int, count: int, port: int, source: str, in_flight: int) -> None:
    """Helper process: on "go", connect ``count`` envelope clients to topics ``t<first>``
    on, ``in_flight`` handshakes at a time, and say "ready <seconds>" once each had its
    ``welcome``; then keep them, time the messages they get (their text: the send time),
    and answer "count" (messages so far), "latencies" (a JSON list, ms), "close" (close
    all at once)."""
    raise_descriptor_limit()
    stdin = sys.stdin.fileno()
    print("started", flush=True)
    if os.read(stdin, 100).strip() != b"go":
        return
    started = time.monotonic()
    selector = selectors.DefaultSelector()
    clients: list[socket.socket] = []
    handshaking: dict[socket.socket, bytearray] = {}  # upgraded, no welcome yet
    buffers: dict[socket.socket, bytearray] = {}
    latencies: list[float] = []
    opened = 0
    began: dict[socket.socket, float] = {}  # when each client connected
    setup: list[float] = []  # seconds from connecting to the welcome, per client

    def take(client: socket.socket, buffer: bytearray) -> None:
        for opcode, payload in frames(buffer):
            if opcode == 8:
                sys.exit(f"a client was closed by the relay: {payload[2:].decode()!r}")
            if opcode != 1:
                continue
            frame = json.loads(payload)
            if frame["type"] == "welcome":
                del handshaking[client]
                setup.append(time.monotonic() - began.pop(client))
                clients.append(client)
            elif frame["type"] == "message":
                latencies.append((time.monotonic() - float(frame["text"])) * 1000)

    while len(clients) < count:
        while len(handshaking) < in_flight and opened < count:
            client = socket.socket()
            client.bind((source, 0))
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            selector.register(client, selectors.EVENT_WRITE, f"t{first + opened}")
            handshaking[client] = bytearray()
            began[client] = time.monotonic()
            opened += 1
        for key, events in selector.select(60):
            client = key.fileobj
            assert isinstance(client, socket.socket)
            if events & selectors.EVENT_WRITE:
                client.send(upgrade_request(port, key.data))
                selector.modify(client, selectors.EVENT_READ)
                continue
            data = client.recv(65536)
            if not data:
                sys.exit("a client was closed before its welcome")
            if client not in buffers:  # the upgrade's answer, then frames
                answer = handshaking[client]
                answer += data
                head, found, rest = bytes(answer).partition(b"\r\n\r\n")
                if not found:
                    continue
                if not head.startswith(b"HTTP/1.1 101"):
                    sys.exit(f"refused: {head.splitlines()[0].decode()}")
                buffers[client] = bytearray(rest)
            else:
                buffers[client] += data
            take(client, buffers[client])
    setup.sort()
    print(f"ready {time.monotonic() - started:.3f} {json.dumps(setup[:: max(1, count // 1000)])}")
    sys.stdout.flush()
    selector.register(stdin, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj == stdin:
                command = os.read(stdin, 100).decode().strip()
                if command == "count":
                    print(len(latencies), flush=True)
                elif command == "latencies":
                    print(json.dumps(latencies), flush=True)
                else:  # "close", or the benchmark went away
                    for client in clients:
                        client.close()
                    print("closed", flush=True)
                    return
                continue
            client = key.fileobj
            assert isinstance(client, socket.socket)
            try:
                data = client.recv(65536)
            except OSError:
                data = b""
            if not data:
                sys.exit("a client was closed by the relay")
            buffers[client] += data
            take(client, buffers[client])


# ------------------------------------------------------------------ the measuring process


def wait_idle(pid: int) -> None:
    """Wait until the process has used no CPU for 0.3 s (its work is done)."""
    last, at = cpu_seconds(pid), time.monotonic()
    while time.monotonic() - at < 0.3:
        time.sleep(0.05)
        now = cpu_seconds(pid)
        if now != last:
            last, at = now, time.monotonic()


def wait_for(what: str, check: Callable[[], bool], timeout: float, poll: float = 0.05) -> float:
    """Poll ``check`` until true; the seconds it took (or RuntimeError past ``timeout``)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"gave up waiting for {what}")
        time.sleep(poll)  # a benchmark polling another process: nothing else to wait on
    return time.monotonic() - start


def http(port: int, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        answer = b""
        while data := conn.recv(65536):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def connections(http_port: int) -> int:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    return int(json.loads(http(http_port, request)[1])["connections"])


def redis_command(port: int, *args: str) -> bytes:
    """One command's answer: an integer's or status's line (``:N``), or a bulk string."""
    request = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(arg.encode())}\r\n{arg}\r\n".encode() for arg in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        answer = b""
        while True:
            answer += conn.recv(1 << 20)
            line, found, rest = answer.partition(b"\r\n")
            if found and not line.startswith(b"$"):
                return line
            if found and len(rest) >= int(line[1:]) + 2:
                return rest[: int(line[1:])]


def channels(redis_port: int) -> int:
    """How many channels have a subscriber (``PUBSUB CHANNELS``, counted in Redis)."""
    script = "return #redis.call('PUBSUB', 'CHANNELS')"
    return int(redis_command(redis_port, "EVAL", script, "0")[1:])


def redis_memory(redis_port: int) -> int:
    info = redis_command(redis_port, "INFO", "memory").decode()
    return int(info.split("used_memory:")[1].split()[0])


def relay_command(port: int, http_port: int, limit: int, backplane: str | None) -> list[str]:
    command = [sys.executable, "-m", "trio_relay", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--http-port", str(http_port), "--log-level", "WARNING"]
    command += [
        "--ping-interval",
        "0",
        "--max-topics",
        str(limit),
        "--http-max-connections",
        "1000",
    ]
    command += ["--max-connections", str(limit), "--max-connections-per-ip", str(limit)]
    if backplane:
        command += ["--backplane", backplane]
    return command


def start_relay(
    stack: contextlib.ExitStack, log: Path, backplane: str | None, limit: int
) -> tuple[subprocess.Popen[bytes], int, int]:
    port, http_port = free_port(), free_port()
    log_file = stack.enter_context(log.open("ab"))
    relay = stack.enter_context(
        started(
            relay_command(port, http_port, limit, backplane),
            cwd=ROOT,
            stdout=log_file,
            stderr=log_file,
        )
    )

    def answers() -> bool:
        if relay.poll() is not None:
            raise RuntimeError(f"a relay exited with {relay.returncode}; see {log}")
        with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
            connections(http_port)
            return True
        return False

    wait_for("a relay's HTTP port", answers, 30)
    return relay, port, http_port


async def publish_all(http_port: int, topics: list[str], interval: float) -> None:
    """One message to each topic, one every ``interval`` s (open loop), its text the send
    time; each must be answered 200."""

    async def publish(topic: str) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", http_port)
        async with stream:
            body = json.dumps({"topic": topic, "text": repr(time.monotonic())}).encode()
            await stream.send_all(
                b"POST /api/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            answer = b""
            while data := await stream.receive_some(65536):
                answer += data
        if not answer.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"publish to {topic}: {answer[:200]!r}")

    async with trio.open_nursery() as nursery:
        next_at = trio.current_time()
        for topic in topics:
            nursery.start_soon(publish, topic)
            next_at += interval
            await trio.sleep_until(next_at)


def ask(helpers: list[subprocess.Popen[bytes]], command: str) -> list[str]:
    for helper in helpers:
        assert helper.stdin is not None
        helper.stdin.write(command.encode() + b"\n")
        helper.stdin.flush()
    answers = []
    for helper in helpers:
        assert helper.stdout is not None
        answers.append(helper.stdout.readline().decode().strip())
    return answers


def run(kind: str, args: argparse.Namespace, log: Path, run_index: int) -> dict[str, object]:
    figures: dict[str, object] = {"kind": kind}
    limit = args.clients + 100
    directory = tempfile.mkdtemp(prefix="trio-relay-bench-")
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, directory, True)
        url = redis_port = redis_pid = None
        if kind == "backplane":
            redis_port = free_port()
            executable = shutil.which("redis-server") or sys.exit("redis-server not found")
            redis_pid = stack.enter_context(
                started(
                    [
                        *(executable, "--port", str(redis_port), "--bind", "127.0.0.1"),
                        *("--save", "", "--appendonly", "no", "--dir", directory),
                    ],
                    stdout=subprocess.DEVNULL,
                )
            ).pid
            url = f"redis://127.0.0.1:{redis_port}/0"
            wait_for("redis-server", lambda: _redis_answers(redis_port), 10)
        relay, port, http_port = start_relay(stack, log, url, limit)
        wait_idle(relay.pid)
        if redis_port is not None:
            memory0 = redis_memory(redis_port)
        cpu0, rss0 = cpu_seconds(relay.pid), rss_kib(relay.pid)
        me = [sys.executable, str(Path(__file__).resolve())]
        helpers = []
        for number, first in enumerate(range(0, args.clients, args.per_process)):
            count = min(args.per_process, args.clients - first)
            # Addresses of this run alone: no port of theirs is still in TIME_WAIT.
            source = f"127.{os.getpid() % 250 + 1}.{run_index + 1}.{number + 2}"
            helper_args = ["--hold", str(count), "--first", str(first), "--port", str(port)]
            helper_args += ["--source", source, "--in-flight", str(args.in_flight)]
            helpers.append(
                stack.enter_context(
                    started([*me, *helper_args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                )
            )
        for helper in helpers:
            assert helper.stdout is not None
            if helper.stdout.readline().strip() != b"started":
                raise RuntimeError("a client helper failed (its error is above)")
        start = time.monotonic()
        for helper in helpers:
            assert helper.stdin is not None
            helper.stdin.write(b"go\n")
            helper.stdin.flush()
        setups: list[float] = []  # a sample of the clients' connect-to-welcome times
        for helper in helpers:
            assert helper.stdout is not None
            ready, _, sample = helper.stdout.readline().partition(b" ")
            if ready != b"ready":
                raise RuntimeError("a client helper failed (its error is above)")
            setups += json.loads(sample.split(b" ", 1)[1])
        figures["subscribe_s"] = time.monotonic() - start
        setups.sort()
        figures["setup_ms"] = [1000 * setups[int(q * (len(setups) - 1))] for q in (0.5, 0.99, 1)]
        wait_idle(relay.pid)
        n = args.clients
        figures["cpu_us_per_subscription"] = (cpu_seconds(relay.pid) - cpu0) / n * 1e6
        figures["rss_kib_per_connection"] = (rss_kib(relay.pid) - rss0) / n
        if redis_port is not None:
            figures["redis_kib_per_topic"] = (redis_memory(redis_port) - memory0) / 1024 / n
            figures["channels"] = channels(redis_port)

        # Deliveries: through a second relay and Redis, or on the relay itself.
        topics = [f"t{i}" for i in random.Random(run_index).sample(range(n), args.publishes)]
        publisher_stack = contextlib.ExitStack()
        with publisher_stack:
            publisher_http = http_port
            if url is not None:
                publisher, _, publisher_http = start_relay(publisher_stack, log, url, limit)
                wait_idle(publisher.pid)
            cpu0 = cpu_seconds(relay.pid)
            others = {"publisher": publisher.pid} if url is not None else {}
            if redis_pid is not None:
                others["redis"] = redis_pid
            others0 = {name: cpu_seconds(pid) for name, pid in others.items()}
            trio.run(publish_all, publisher_http, topics, args.interval)
            wait_for(
                f"{len(topics)} deliveries",
                lambda: sum(map(int, ask(helpers, "count"))) >= len(topics),
                30,
                0.1,
            )
            wait_idle(relay.pid)
            for name, pid in others.items():
                spent = cpu_seconds(pid) - others0[name]
                figures[f"{name}_cpu_us_per_publish"] = spent / len(topics) * 1e6
            figures["cpu_us_per_delivery"] = (cpu_seconds(relay.pid) - cpu0) / len(topics) * 1e6
            latencies = sorted(v for a in ask(helpers, "latencies") for v in json.loads(a))
            figures["deliveries"] = len(latencies)
            figures["latency_ms"] = [
                statistics.median(latencies),
                latencies[int(0.99 * len(latencies))],
                latencies[-1],
            ]
        # The publishing relay stopped: its channels are gone (those of its topics are
        # the measured relay's too; its heartbeat's is not).
        expected = None
        if redis_port is not None:
            expected = len(set(topics)) + 1  # topics with a retained message, a heartbeat
            wait_for("the publisher's channels gone", lambda: channels(redis_port) == n + 1, 30)

        # Mass disconnect.
        wait_idle(relay.pid)
        cpu0 = cpu_seconds(relay.pid)
        start = time.monotonic()
        for helper in helpers:  # all at once
            assert helper.stdin is not None
            helper.stdin.write(b"close\n")
            helper.stdin.flush()
        closed_s = unsubscribed_s = None  # when each was first seen true
        while closed_s is None or (redis_port is not None and unsubscribed_s is None):
            if time.monotonic() - start > 120:
                raise RuntimeError("gave up waiting for the clients to be closed")
            if closed_s is None and connections(http_port) == 0:
                closed_s = time.monotonic() - start
            if (
                redis_port is not None
                and unsubscribed_s is None
                and channels(redis_port) == expected
            ):
                unsubscribed_s = time.monotonic() - start
            time.sleep(0.02)
        figures["closed_s"] = closed_s
        if redis_port is not None:
            figures["unsubscribed_s"] = unsubscribed_s
        wait_idle(relay.pid)
        figures["cpu_us_per_disconnect"] = (cpu_seconds(relay.pid) - cpu0) / n * 1e6
        if redis_port is not None:
            figures["channels_after"] = channels(redis_port)
    return figures


def _redis_answers(port: int) -> bool:
    with contextlib.suppress(OSError):
        return redis_command(port, "PING") == b"+PONG"
    return False


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=19_800, help="default: %(default)s")
    parser.add_argument("--publishes", type=int, default=1000, help="default: %(default)s")
    parser.add_argument(
        "--interval", type=float, default=0.005, help="between publishes: %(default)s s"
    )
    parser.add_argument(
        "--per-process", type=int, default=10_000, help="clients per helper: %(default)s"
    )
    parser.add_argument(
        "--in-flight", type=int, default=500, help="handshakes per helper: %(default)s"
    )
    parser.add_argument("--only", choices=("single", "backplane"), help="one server only")
    parser.add_argument("--hold", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold is not None:
        hold(args.first, args.hold, args.port, args.source, args.in_flight)
        return 0
    descriptors = raise_descriptor_limit()
    if args.clients + 50 > descriptors:
        sys.exit(f"the relay may have {descriptors:,} descriptors: --clients at most that - 50")
    args.publishes = min(args.publishes, args.clients)
    log = Path(tempfile.gettempdir()) / f"backplane-topics-{os.getpid()}.log"
    print(
        f"{args.clients:,} clients, each on a topic of its own; {args.publishes:,} publishes "
        f"one every {args.interval * 1000:g} ms; relay log: {log}",
        flush=True,
    )
    kinds = [args.only] if args.only else ["single", "backplane"]
    results = [run(kind, args, log, index) for index, kind in enumerate(kinds)]
    print(
        "| server | subscribe all s | CPU us/sub | RSS KiB/conn | Redis KiB/topic | channels "
        "| delivery p50/p99/max ms | CPU us/delivery | closed s | unsubscribed s "
        "| CPU us/disconnect |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        latency = "/".join(f"{v:.1f}" for v in r["latency_ms"])  # type: ignore[attr-defined]
        redis = (
            f"{r['redis_kib_per_topic']:.2f} | {r['channels']:,}" if "channels" in r else "- | -"
        )
        unsubscribed = f"{r['unsubscribed_s']:.2f}" if "unsubscribed_s" in r else "-"
        print(
            f"| {r['kind']} | {r['subscribe_s']:.2f} | {r['cpu_us_per_subscription']:.0f} "
            f"| {r['rss_kib_per_connection']:.1f} | {redis} | {latency} "
            f"| {r['cpu_us_per_delivery']:.0f} | {r['closed_s']:.2f} | {unsubscribed} "
            f"| {r['cpu_us_per_disconnect']:.0f} |"
        )
        costs = [f"{k[:-19]} {v:.0f}" for k, v in r.items() if k.endswith("_cpu_us_per_publish")]
        if costs:
            print(f"  {r['kind']}: CPU us per publish of the " + ", ".join(costs))
        setup = "/".join(f"{v:.0f}" for v in r["setup_ms"])  # type: ignore[attr-defined]
        print(f"  {r['kind']}: a client's connect to welcome p50/p99/max {setup} ms")
        if "channels_after" in r:
            print(f"  {r['kind']}: {r['channels_after']} channels left after the disconnect")
    return 0


if __name__ == "__main__":
    sys.exit(main())
