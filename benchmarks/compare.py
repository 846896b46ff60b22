"""Run the shared relay benchmark for trio_relay beside its peers, and print the comparison.

    python benchmarks/compare.py                 # the issue's scenarios, 3 repetitions
    python benchmarks/compare.py --quick         # one repetition, a smaller set
    python benchmarks/compare.py --scenarios fan100-100B,slow --reps 1
    python benchmarks/compare.py --servers trio_relay,floor,picows \\
        --scenarios fan1-100B-w1,fan100-100B-w1 --reps 1   # just the floor ratios
    python benchmarks/compare.py --scale         # also conn19k and fan19k-w1 (minutes)

It drives ``../shared/bench/run.py`` (set BENCH_DIR to point elsewhere), which starts each
server on a free 127.0.0.1 port, loads it with a Node.js client, and samples the server's
CPU time and memory from /proc. The figure to compare is "srv µs/msg": server CPU time per
delivered message. Servers are interleaved in one run, so compare rows of one run only.
Results land in $BENCH_HOME/results (default /tmp/relay-bench/results).

Beside the peers runs ``floor`` (``benchmarks/floor.py``): the least a trio server must do
per message. After the run this prints, for each fan-out scenario, trio_relay's "srv µs/msg"
as a multiple of the floor's; at ``fan1-100B-w1`` and ``fan100-100B-w1`` that multiple is
what this project controls (the floor itself is trio's scheduler and the system calls).

``--scale`` adds a second run of ``conn19k`` and ``fan19k-w1`` (19,000 idle connections;
one message at a time to 19,001 clients), for which trio_relay's connection and subscriber
limits are raised to 20,000 (:data:`SCALE_LIMITS`); they sit near the machine's limit of
descriptors per process, which this prints.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(os.environ.get("BENCH_DIR", ROOT.parent / "shared" / "bench"))
SCENARIOS = (
    "fan1-100B,fan100-100B,fan1000-100B,fan1-100B-w1,fan100-100B-w1,fan1000-100B-w1,slow,conn5k"
)
PEERS = "picows,ws_broadcast"
SCALE_SCENARIOS = "conn19k,fan19k-w1"
SCALE_LIMITS = (
    "--max-connections 20000 --max-connections-per-ip 20000 --max-subscribers-per-topic 20000"
)
FLOOR_SCENARIOS = ("fan1-100B-w1", "fan100-100B-w1")  # where the ratio to the floor matters
DESCRIPTORS_NEEDED = 19_100  # conn19k: 19,001 sockets in the server and in load.js, and some


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


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (children inherit it, and
    run.py does the same for the servers and load.js); the (soft, hard) limits now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def run_bench(
    servers: dict[str, str], names: str, scenarios: str, reps: str
) -> tuple[int, Path | None]:
    """Run run.py (its tables on stdout, its progress on stderr); its exit code and the path
    of its raw JSON lines, which it names on stderr."""
    command = [sys.executable, str(BENCH_DIR / "run.py")]
    for name, template in servers.items():
        command += ["--server", f"{name}={template}"]
    command += ["--servers", names, "--scenarios", scenarios, "--reps", reps]
    print("$", shlex.join(command), flush=True)
    raw = None
    with subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True) as process:
        assert process.stderr is not None
        for line in process.stderr:  # passed on as it comes
            sys.stderr.write(line)
            if line.startswith("raw: "):
                raw = Path(line.removeprefix("raw: ").strip())
    return process.returncode, raw


def floor_ratios(raw: Path) -> list[str]:
    """For each fan-out scenario in ``raw`` with figures of trio_relay and floor: the median
    "srv µs/msg" of each, and trio_relay's as a multiple of the floor's."""
    figures: dict[str, dict[str, list[float]]] = {}
    if not raw.is_file():
        print(f"the benchmark's results file {raw} is missing", file=sys.stderr)
        return []
    for line in raw.read_text().splitlines():
        result = json.loads(line)
        value = result.get("srv_us_per_msg")
        if result.get("mode") == "fanout" and isinstance(value, (int, float)):
            by_server = figures.setdefault(result["scenario"], {})
            by_server.setdefault(result["server"], []).append(value)
    lines = []
    for scenario, by_server in figures.items():
        if "trio_relay" not in by_server or "floor" not in by_server:
            continue
        relay = statistics.median(by_server["trio_relay"])
        floor = statistics.median(by_server["floor"])
        mark = "  <- the project's part" if scenario in FLOOR_SCENARIOS else ""
        lines.append(
            f"  {scenario:16} trio_relay {relay:7.2f} µs/msg, floor {floor:7.2f} µs/msg: "
            f"{relay / floor:.2f}x the floor{mark}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default=SCENARIOS, help="default: %(default)s")
    parser.add_argument(
        "--servers", default=f"trio_relay,floor,{PEERS}", help="default: %(default)s"
    )
    parser.add_argument("--reps", type=int, default=3, help="default: %(default)s")
    parser.add_argument("--quick", action="store_true", help="1 repetition, fewer scenarios")
    parser.add_argument(
        "--scale",
        action="store_true",
        help=f"then run {SCALE_SCENARIOS} too, trio_relay with {SCALE_LIMITS}",
    )
    args = parser.parse_args()
    if not bench_ready():
        return 2
    python = shlex.quote(sys.executable)
    # The default log level (INFO), as an operator runs it: per-connection lines are DEBUG.
    relay = f"{python} -m trio_relay serve --host 127.0.0.1 --port {{port}}"
    servers = {
        "trio_relay": relay,
        "floor": f"{python} {shlex.quote(str(ROOT / 'benchmarks' / 'floor.py'))} --port {{port}}",
    }
    reps = "1" if args.quick else str(args.reps)
    scenarios = "fan1-100B,fan100-100B,fan1000-100B,slow" if args.quick else args.scenarios
    code, raw = run_bench(servers, args.servers, scenarios, reps)
    raws = [raw] if raw else []
    if args.scale:
        soft, hard = raise_descriptor_limit()
        print(
            f"\n{SCALE_SCENARIOS}: descriptors per process: {soft:,} (soft limit, raised to "
            f"the hard limit {hard:,}; run.py raises it further if it may); these scenarios "
            f"need about {DESCRIPTORS_NEEDED:,} in the server and in load.js"
            + ("" if soft >= DESCRIPTORS_NEEDED else ": TOO FEW, expect errors"),
            flush=True,
        )
        print(f"{SCALE_SCENARIOS}: trio_relay's limits raised: {SCALE_LIMITS}", flush=True)
        scale_servers = dict(servers, trio_relay=f"{relay} {SCALE_LIMITS}")
        scale_code, raw = run_bench(scale_servers, args.servers, SCALE_SCENARIOS, reps)
        code = code or scale_code
        raws += [raw] if raw else []
    if not raws:
        print("the benchmark named no results file (no 'raw: ' line)", file=sys.stderr)
        return code or 1
    ratios = [line for path in raws for line in floor_ratios(path)]
    if ratios:
        print("\nServer CPU per delivery, trio_relay against the floor (benchmarks/floor.py):")
        print("\n".join(ratios))
    elif {"trio_relay", "floor"} <= set(args.servers.split(",")):
        # Asked for, and missing: the run failed, whatever run.py's exit status says.
        print("\nno fan-out figures of both trio_relay and floor to compare", file=sys.stderr)
        return code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
