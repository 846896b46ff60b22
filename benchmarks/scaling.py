"""Fan-out with the Redis backplane: one relay process against ``--workers 2``, in one run.

    python benchmarks/scaling.py                          # fan100 and fan1000, 3 repetitions
    python benchmarks/scaling.py --scenarios fan1000-100B --reps 1

It drives the shared benchmark (``../shared/bench/run.py``; BENCH_DIR points elsewhere) with
three servers, interleaved:

- ``single``: ``trio-relay serve``, one process, no backplane (the reference);
- ``redis-w1``: one relay process with ``--backplane``;
- ``redis-w2``: ``--workers 2`` with ``--backplane`` (the kernel spreads the load's
  connections over the two workers; each reads every message from Redis).

Each backplane server is started by this script in ``--serve`` mode, which starts a private
``redis-server`` as its own child and then becomes the relay (``exec``), so the benchmark's
sampling of the server's process tree counts the relay's workers *and* Redis: "srv µs/msg"
is the CPU the whole system spent per delivered message.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from compare import BENCH_DIR, ROOT, bench_ready  # beside this script

SCENARIOS = "fan100-100B,fan1000-100B,fan100-100B-w1"


def serve(workers: int, port: int) -> None:
    """Start a private redis-server, then exec the relay with ``--workers`` on ``port``."""
    redis = shutil.which("redis-server")
    if redis is None:
        sys.exit("redis-server not found: apt-get install redis-server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        redis_port = probe.getsockname()[1]
    directory = tempfile.mkdtemp(prefix="trio-relay-bench-")
    process = subprocess.Popen(
        [
            *(redis, "--port", str(redis_port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", directory),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    for line in process.stdout:  # its log, until it is ready (the benchmark bounds the time)
        if b"Ready to accept connections" in line:
            break
    else:
        sys.exit("redis-server exited")
    # Redis stays a child of this process, which now becomes the relay (same PID): the
    # benchmark's process-tree sampling counts both. The benchmark stops the process group.
    os.execv(
        sys.executable,
        [
            *(sys.executable, "-m", "trio_relay", "serve", "--log-level", "WARNING"),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)),
            *("--backplane", f"redis://127.0.0.1:{redis_port}/0"),
        ],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=SCENARIOS, help="default: %(default)s")
    parser.add_argument("--reps", type=int, default=3, help="default: %(default)s")
    parser.add_argument("--serve", type=int, metavar="WORKERS", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.port)
        return 1  # not reached: serve() execs the relay
    if not bench_ready():
        return 2
    python = shlex.quote(sys.executable)
    me = shlex.quote(str(Path(__file__).resolve()))
    servers = {
        "single": f"{python} -m trio_relay serve --log-level WARNING --host 127.0.0.1 "
        "--port {port}",
        "redis-w1": f"{python} {me} --serve 1 --port {{port}}",
        "redis-w2": f"{python} {me} --serve 2 --port {{port}}",
    }
    command = [sys.executable, str(BENCH_DIR / "run.py")]
    for name, template in servers.items():
        command += ["--server", f"{name}={template}"]
    command += ["--servers", ",".join(servers), "--scenarios", args.scenarios]
    command += ["--reps", str(args.reps)]
    print("$", shlex.join(command), flush=True)
    return subprocess.run(command, cwd=ROOT, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
