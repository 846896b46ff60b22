"""Mass disconnect: how long the relay takes to close N clients that drop at once, and what
a bystander connected meanwhile sees.

    python benchmarks/mass_disconnect.py                    # 19,000 clients, one run
    python benchmarks/mass_disconnect.py --clients 2000 --reps 3
    python benchmarks/mass_disconnect.py --abort            # RST (SO_LINGER 0), not FIN

The goal (from the issue): 19,000 clients dropping at once are all closed within 2 s, and
a bystander connected meanwhile keeps receiving with p99 under 50 ms.

Each run starts a fresh relay (``--server-cmd``; default ``python -m trio_relay serve`` with
its connection and subscriber limits raised to 20,000, run in the directory above this
script's, so that ``python -m trio_relay`` is this tree's), then:

1. opens ``--clients`` plain WebSocket clients on ``--path`` (raw sockets, a hand-written
   upgrade; they answer the relay's keepalive pings and nothing else), held by helper
   processes of at most ``--per-process`` sockets each (a process may have only ~20,000
   descriptors here), and waits until the relay's ``GET /healthz`` (on the metrics port)
   reports them all;
2. connects a bystander on its own topic (``--bystander-path``, so its messages do not go to
   the N clients) that publishes a small message every ``--interval`` seconds whether or
   not the previous echo came back (so a stall delays every message sent during it, not
   just one), and times each echo;
3. after ``--warmup`` seconds, tells the helpers to close all their sockets at once, and
   polls ``/healthz`` until the relay reports one connection (the bystander), giving up
   after ``--timeout`` seconds;
4. prints one line: clients, seconds from the drop until all were closed, the bystander's
   echo latency p50/p99/max over the messages sent from the drop until all were closed (at
   least 2 s, so that the percentiles rest on a few hundred messages; one without echo 5 s
   after that counts as infinitely late), and the relay's CPU seconds (utime + stime of its
   process tree, /proc) from the drop until all were closed.

A custom ``--server-cmd`` gets ``{port}``, ``{metrics_port}`` and ``{n}`` (the limits:
20,000, or ``--clients`` + 100 if more) filled in; it must answer
``GET /healthz`` on the metrics port with JSON holding ``"connections"``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import selectors
import shlex
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent  # the relay runs here: this tree's trio_relay
LIMITS = "--max-connections {n} --max-connections-per-ip {n} --max-subscribers-per-topic {n}"
SERVER_CMD = (
    f"{shlex.quote(sys.executable)} -m trio_relay serve --host 127.0.0.1 --port {{port}} "
    f"--metrics-port {{metrics_port}} {LIMITS}"
)
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # any 16 bytes in base64 will do
ECHO_WAIT = 5.0  # seconds after the window a message may still get its echo
MIN_WINDOW = 2.0  # seconds of bystander messages the latency figures cover at least


def upgrade_request(port: int, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def raise_descriptor_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------ helper: hold clients


def hold(count: int, port: int, path: str) -> None:
    """Helper process: open ``count`` clients, say "ready", answer pings until told "close"
    or "abort" on stdin, then close them all at once and say how long that took."""
    raise_descriptor_limit()
    request = upgrade_request(port, path)
    clients: list[socket.socket] = []
    while len(clients) < count:  # a batch at a time: requests first, then the answers
        batch = [socket.create_connection(("127.0.0.1", port), timeout=60)]
        batch += [
            socket.create_connection(("127.0.0.1", port), timeout=60)
            for _ in range(min(256, count - len(clients)) - 1)
        ]
        for client in batch:
            client.sendall(request)
        for client in batch:
            answer = b""
            while b"\r\n\r\n" not in answer:
                data = client.recv(4096)
                if not data:
                    sys.exit(f"connection {len(clients)} closed during the handshake")
                answer += data
            if not answer.startswith(b"HTTP/1.1 101"):
                status = answer.partition(b"\r\n")[0].decode()
                sys.exit(f"connection {len(clients)}: {status}")
            client.setblocking(False)
            clients.append(client)
    print("ready", flush=True)
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ)
    buffers = {}
    for client in clients:
        selector.register(client, selectors.EVENT_READ)
        buffers[client] = bytearray()
    closed_by_relay = 0
    command = ""
    while not command:
        for key, _ in selector.select():
            if key.fileobj == sys.stdin.fileno():
                command = os.read(sys.stdin.fileno(), 100).decode().strip() or "close"
                continue
            client = key.fileobj
            assert isinstance(client, socket.socket)
            try:
                data = client.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            buffer = buffers[client]
            buffer += data
            while len(buffer) >= 2 and len(buffer) >= 2 + (buffer[1] & 0x7F):  # small frames
                opcode, size = buffer[0] & 0x0F, buffer[1] & 0x7F
                if size >= 126:
                    break  # not a control frame; nothing else is sent on this topic
                if opcode == 9:  # ping: pong with the same payload (mask key 0)
                    pong = bytes((0x8A, 0x80 | size)) + b"\0\0\0\0" + buffer[2 : 2 + size]
                    with contextlib.suppress(OSError):
                        client.send(pong)
                if opcode == 8:
                    data = b""
                del buffer[: 2 + size]
            if not data:
                closed_by_relay += 1
                selector.unregister(client)
    start = time.perf_counter()
    for client in clients:
        if command == "abort":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
    print(f"closed {len(clients)} in {time.perf_counter() - start:.3f} s; "
          f"{closed_by_relay} closed by the relay before", flush=True)  # fmt: skip


# ------------------------------------------------------------------ the measuring process


def process_tree_cpu(root: int) -> float:
    """utime + stime seconds of ``root`` and its descendants (cheap: no scan of /proc)."""
    tree, total = [root], 0.0
    for pid in tree:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in os.listdir(f"/proc/{pid}/task"):
                tree += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
        except OSError:
            continue
    return total


def connections(metrics_port: int) -> int:
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as http:
        http.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while data := http.recv(65536):
            answer += data
    return int(json.loads(answer.partition(b"\r\n\r\n")[2])["connections"])


async def connections_async(metrics_port: int) -> int:
    http = await trio.open_tcp_stream("127.0.0.1", metrics_port)
    async with http:
        await http.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while data := await http.receive_some(65536):
            answer += data
    return int(json.loads(answer.partition(b"\r\n\r\n")[2])["connections"])


def wait_for(what: str, check, deadline: float) -> None:  # type: ignore[no-untyped-def]
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def started(command: list[str], **options: object) -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own session, stopped (its whole group) on the way out."""
    process = subprocess.Popen(command, start_new_session=True, **options)  # type: ignore[call-overload]
    try:
        yield process
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


class Bystander:
    """One client on its own topic: a message every ``interval`` s, each echo timed."""

    def __init__(self, stream: trio.SocketStream, interval: float) -> None:
        self.stream, self.interval = stream, interval
        self.sent: dict[int, float] = {}  # sequence number: send time
        self.latency: dict[int, float] = {}  # sequence number: echo time - send time
        self.sending = True
        self.closed = False  # by the relay

    async def send(self) -> None:
        seq, next_at = 0, trio.current_time()
        while self.sending:
            payload = str(seq).encode()  # masked with key 0: the payload as it is
            self.sent[seq] = time.perf_counter()
            await self.stream.send_all(bytes((0x81, 0x80 | len(payload), 0, 0, 0, 0)) + payload)
            seq += 1
            next_at += self.interval
            await trio.sleep_until(next_at)

    async def receive(self) -> None:
        buffer = bytearray()
        while data := await self.stream.receive_some(65536):
            buffer += data
            while len(buffer) >= 2 and len(buffer) >= 2 + (buffer[1] & 0x7F):
                size = buffer[1] & 0x7F
                if buffer[0] & 0x0F == 1:
                    seq = int(buffer[2 : 2 + size])
                    self.latency[seq] = time.perf_counter() - self.sent[seq]
                elif buffer[0] & 0x0F == 9:  # keepalive ping
                    pong = bytes((0x8A, 0x80 | size, 0, 0, 0, 0)) + buffer[2 : 2 + size]
                    await self.stream.send_all(pong)
                del buffer[: 2 + size]
        self.closed = True


def run_once(args: argparse.Namespace, log: Path) -> str:
    port, metrics_port = free_port(), free_port()
    limit = max(20_000, args.clients + 100)
    command = args.server_cmd.format(port=port, metrics_port=metrics_port, n=limit)
    with (
        open(log, "ab") as log_file,
        started(shlex.split(command), stdout=log_file, stderr=log_file) as relay,
    ):
        deadline = time.monotonic() + 30
        wait_for("the relay's metrics port", lambda: _answers(metrics_port, relay), deadline)
        helpers = []
        with contextlib.ExitStack() as stack:
            me = [sys.executable, str(Path(__file__).resolve())]
            for start in range(0, args.clients, args.per_process):
                count = min(args.per_process, args.clients - start)
                hold_args = ["--hold", str(count), "--port", str(port), "--path", args.path]
                helpers.append(
                    stack.enter_context(
                        started([*me, *hold_args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                    )
                )
            t0 = time.monotonic()
            for helper in helpers:  # they connect side by side
                assert helper.stdout is not None
                if helper.stdout.readline().strip() != b"ready":
                    raise RuntimeError("a client helper failed (its error is above)")
            wait_for(
                f"{args.clients} connections",
                lambda: connections(metrics_port) >= args.clients,
                time.monotonic() + 60,
            )
            connect_s = time.monotonic() - t0
            return trio.run(measure, args, port, metrics_port, relay.pid, helpers, connect_s)


def _answers(metrics_port: int, relay: subprocess.Popen[bytes]) -> bool:
    if relay.poll() is not None:
        raise RuntimeError(f"the relay exited with {relay.returncode}")
    try:
        connections(metrics_port)
    except (OSError, ValueError, KeyError):
        return False
    return True


async def measure(
    args: argparse.Namespace,
    port: int,
    metrics_port: int,
    relay_pid: int,
    helpers: list[subprocess.Popen[bytes]],
    connect_s: float,
) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        await stream.send_all(upgrade_request(port, args.bystander_path))
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += await stream.receive_some(4096) or b"closed"
        if not answer.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"bystander: {answer.splitlines()[0].decode()}")
        bystander = Bystander(stream, args.interval)
        nursery.start_soon(bystander.receive)
        nursery.start_soon(bystander.send)
        with trio.fail_after(30):
            while await connections_async(metrics_port) != args.clients + 1:  # noqa: ASYNC110
                await trio.sleep(0.05)
        await trio.sleep(args.warmup)
        before = list(bystander.latency.values())
        cpu0 = process_tree_cpu(relay_pid)
        dropped = time.perf_counter()
        for helper in helpers:  # all at once
            assert helper.stdin is not None
            helper.stdin.write(b"abort\n" if args.abort else b"close\n")
            helper.stdin.flush()
        closed_s: float | None = None
        left: int | None = None  # as the relay last reported
        with trio.move_on_after(args.timeout):
            while (left := await connections_async(metrics_port)) > 1:  # noqa: ASYNC110
                await trio.sleep(args.poll)
            closed_s = time.perf_counter() - dropped
        cpu_s = process_tree_cpu(relay_pid) - cpu0
        window_end = dropped + max(closed_s or args.timeout, MIN_WINDOW)
        await trio.sleep_until(trio.current_time() + max(0.0, window_end - time.perf_counter()))
        bystander.sending = False
        with trio.move_on_after(ECHO_WAIT):  # the last echoes
            while len(bystander.latency) < len(bystander.sent):  # noqa: ASYNC110
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    window = [seq for seq, at in bystander.sent.items() if dropped <= at <= window_end]
    # A message without echo counts as infinitely late: it is in the percentiles.
    latencies = sorted(bystander.latency.get(seq, math.inf) * 1000 for seq in window)
    lost = latencies.count(math.inf)
    helper_notes = []
    for helper in helpers:
        assert helper.stdout is not None
        helper_notes.append(helper.stdout.readline().decode().strip())
    closed = f"{closed_s:.2f} s" if closed_s is not None else f"not within {args.timeout:g} s"
    if closed_s is None:
        closed += " (no answer from /healthz)" if left is None else f" ({left - 1:,} still open)"

    def pct(q: float) -> str:
        value = latencies[min(len(latencies) - 1, int(q * len(latencies)))]
        return f"{value:.1f}" if value < math.inf else "∞"

    figures = f"p50 {pct(0.5)} / p99 {pct(0.99)} / max {pct(1.0)} ms" if latencies else "no echo"
    baseline = sorted(v * 1000 for v in before)
    return (
        f"{args.clients:,} clients ({'RST' if args.abort else 'FIN'}): all closed in {closed}; "
        f"bystander {figures} over {len(window)} messages"
        + (f", {lost} without echo (counted as ∞)" if lost else "")
        + (" (the relay closed the bystander)" if bystander.closed else "")
        + f"; relay CPU {cpu_s:.2f} s"
        + (
            f"  [before the drop: p50 {statistics.median(baseline):.1f} / p99 "
            f"{baseline[int(0.99 * len(baseline))]:.1f} ms"
            if baseline
            else "  ["
        )
        + f"; connect {connect_s:.1f} s; helpers: {' | '.join(helper_notes)}]"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=19_000, help="default: %(default)s")
    parser.add_argument("--reps", type=int, default=1, help="default: %(default)s")
    parser.add_argument(
        "--abort", action="store_true", help="drop with RST (SO_LINGER 0); default: FIN"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="default: %(default)s s")
    parser.add_argument(
        "--interval", type=float, default=0.005, help="bystander: default %(default)s s"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="default: %(default)s s")
    parser.add_argument(
        "--poll", type=float, default=0.01, help="/healthz every %(default)s s after the drop"
    )
    parser.add_argument("--path", default="/", help="the clients' topic; default: %(default)s")
    parser.add_argument("--bystander-path", default="/bystander", help="default: %(default)s")
    parser.add_argument(
        "--per-process", type=int, default=10_000, help="clients per helper: %(default)s"
    )
    parser.add_argument(
        "--server-cmd",
        default=SERVER_CMD,
        help="the relay; {port}, {metrics_port} and {n} (the limits) are filled in; "
        f"default: {SERVER_CMD}",
    )
    parser.add_argument("--hold", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold is not None:
        hold(args.hold, args.port, args.path)
        return 0
    descriptors = raise_descriptor_limit()
    if args.per_process > descriptors - 100:
        args.per_process = descriptors - 100
    log = Path(tempfile.gettempdir()) / f"mass-disconnect-{os.getpid()}.log"
    print(
        f"descriptors per process: {descriptors:,}; helpers hold up to {args.per_process:,} "
        f"clients each; relay log: {log}",
        flush=True,
    )
    for rep in range(args.reps):
        try:
            print(run_once(args, log), flush=True)
        except Exception as error:  # say what failed, then the next run
            print(f"run {rep + 1}: failed: {error!r}", flush=True)
            print("relay log (tail):", log.read_text()[-2000:] if log.exists() else "", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
