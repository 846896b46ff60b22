"""Run the shared relay benchmark for trio_relay beside its peers, and print the comparison.

    python benchmarks/compare.py                 # the issue's scenarios, 3 repetitions
    python benchmarks/compare.py --quick         # one repetition, a smaller set
    python benchmarks/compare.py --scenarios fan100-100B,slow --reps 1

It drives ``../shared/bench/run.py`` (set BENCH_DIR to point elsewhere), which starts each
server on a free 127.0.0.1 port, loads it with a Node.js client, and samples the server's
CPU time and memory from /proc. The figure to compare is "srv µs/msg": server CPU time per
delivered message. Servers are interleaved in one run, so compare rows of one run only.
Results land in $BENCH_HOME/results (default /tmp/relay-bench/results).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(os.environ.get("BENCH_DIR", ROOT.parent / "shared" / "bench"))
SCENARIOS = (
    "fan1-100B,fan100-100B,fan1000-100B,fan1-100B-w1,fan100-100B-w1,fan1000-100B-w1,slow,conn5k"
)
PEERS = "picows,ws_broadcast"


def bench_ready() -> bool:
    """Whether the shared benchmark is at BENCH_DIR (saying so if not); sets up its venv and
    Node.js modules on first use."""
    if not (BENCH_DIR / "run.py").is_file():
        print(f"no benchmark driver at {BENCH_DIR}/run.py (set BENCH_DIR)", file=sys.stderr)
        return False
    home = Path(os.environ.get("BENCH_HOME", "/tmp/relay-bench"))
    if not (home / "venv" / "bin" / "python").exists() or not (home / "node_modules").exists():
        subprocess.run(["bash", str(BENCH_DIR / "setup.sh")], check=True)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=SCENARIOS, help="default: %(default)s")
    parser.add_argument("--servers", default=f"trio_relay,{PEERS}", help="default: %(default)s")
    parser.add_argument("--reps", type=int, default=3, help="default: %(default)s")
    parser.add_argument("--quick", action="store_true", help="1 repetition, fewer scenarios")
    args = parser.parse_args()
    if not bench_ready():
        return 2
    server = (
        f"{shlex.quote(sys.executable)} -m trio_relay serve --log-level WARNING "
        "--host 127.0.0.1 --port {port}"
    )
    command = [
        sys.executable,
        str(BENCH_DIR / "run.py"),
        "--server",
        f"trio_relay={server}",
        "--servers",
        args.servers,
        "--scenarios",
        "fan1-100B,fan100-100B,fan1000-100B,slow" if args.quick else args.scenarios,
        "--reps",
        "1" if args.quick else str(args.reps),
    ]
    print("$", shlex.join(command), flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
