"""What the embedding hooks cost on the hot path: a relay with or without them, for the
shared benchmark, and a run that compares them.

    python benchmarks/hooks.py                   # the comparison (about 2 minutes)
    python benchmarks/hooks.py --reps 3 --scenarios fan1-100B-w1,fan100-100B-w1,fan1-100B
    python benchmarks/hooks.py serve --port 4000 --hook on_publish   # one relay, for run.py
    python benchmarks/hooks.py micro             # the hook's own CPU per message, in-process

``serve`` runs :func:`trio_relay.serve_relay` as ``trio-relay serve`` runs it (its garbage
collector and allocator settings, default configuration) with ``--hook``:

* ``none``: no hook (the same as ``trio-relay serve``);
* ``on_publish``: ``async def on_publish(message): return message.data``, a hook that
  looks at every message and changes nothing: its fixed cost per message;
* ``both``: that, and an ``authorize`` that allows everything (asked once per connection).

``micro`` times, in one process with CPU time (less disturbed by other processes than
the shared benchmark), what the relay adds per message to call such a hook
(``filter_publications``: the :class:`~trio_relay.Publication`, the ``str`` of a text
message, the ``await``, the bookkeeping) beside the hook's own call.

The comparison drives ``../shared/bench/run.py`` (BENCH_DIR elsewhere) with those three
beside ``trio-relay serve`` and ``benchmarks/floor.py``, interleaved in one run, and prints
each one's server CPU per delivered message as a multiple of the floor's and of the relay
without hooks. ``--baseline DIR`` adds ``trio-relay serve`` from another checkout of the
package (``git worktree add /tmp/base <commit>``, say), to show the path without hooks is
as fast as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import trio

import trio_relay
from trio_relay._cli import tune_allocator, tune_garbage_collector
from trio_relay._hooks import filter_publications

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = "fan1-100B-w1,fan100-100B-w1,fan1-100B,fan100-100B"


async def _serve(host: str, port: int, hook: str) -> None:
    async def on_publish(message: trio_relay.Publication) -> str | bytes:
        return message.data

    async def authorize(request: trio_relay.AuthRequest) -> trio_relay.Grant:
        return trio_relay.Grant(publish=("**",), subscribe=("**",))

    hooks: dict[str, object] = {}
    if hook in ("on_publish", "both"):
        hooks["on_publish"] = on_publish
    if hook == "both":
        hooks["authorize"] = authorize
    await trio_relay.serve_relay(host, port, **hooks)  # type: ignore[arg-type]


def serve(args: argparse.Namespace) -> None:
    # As `trio-relay serve` does before it runs the relay.
    tune_garbage_collector()
    tune_allocator()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_serve, args.host, args.port, args.hook)


async def _micro(batch: int, count: int) -> tuple[float, float]:
    async def on_publish(message: trio_relay.Publication) -> str | bytes:
        return message.data

    payloads, texts = [b"x" * 100] * batch, [True] * batch
    grant = trio_relay.Grant(publish=("**",), subscribe=("**",))
    start = time.process_time()
    for _ in range(count // batch):
        await filter_publications(
            on_publish, "news", payloads, texts, grant, "127.0.0.1:5", "websocket", 1 << 20
        )
    whole = (time.process_time() - start) / count
    start = time.process_time()
    for _ in range(count):
        await on_publish(trio_relay.Publication("news", "x" * 100, grant, "p", "websocket"))
    call = (time.process_time() - start) / count
    return whole, call


def micro(args: argparse.Namespace) -> None:
    print("CPU µs per message (best of 5 runs of 300,000 messages), 100-byte text:")
    for batch in (1, 10):
        runs = [trio.run(_micro, batch, 300_000) for _ in range(5)]
        whole, call = min(r[0] for r in runs), min(r[1] for r in runs)
        print(
            f"  {batch:2} message(s) per read: {whole * 1e6:.2f} with the hook "
            f"(of which the hook's own call and its Publication: {call * 1e6:.2f})"
        )


def compare(args: argparse.Namespace) -> int:
    from compare import bench_ready, raise_descriptor_limit, run_bench

    if not bench_ready():
        return 1
    raise_descriptor_limit()
    python = shlex.quote(sys.executable)
    me = shlex.quote(str(Path(__file__).resolve()))
    relay = f"{python} -m trio_relay serve --host 127.0.0.1 --port {{port}}"
    servers = {
        "trio_relay": relay,
        "hook_none": f"{python} {me} serve --port {{port}} --hook none",
        "hook_on_publish": f"{python} {me} serve --port {{port}} --hook on_publish",
        "hook_both": f"{python} {me} serve --port {{port}} --hook both",
        "floor": f"{python} {shlex.quote(str(ROOT / 'benchmarks' / 'floor.py'))} --port {{port}}",
    }
    if args.baseline:
        base = shlex.quote(str(Path(args.baseline).resolve()))
        servers["baseline"] = f"env PYTHONPATH={base} {relay}"
    code, raw = run_bench(servers, ",".join(servers), args.scenarios, str(args.reps))
    if code or raw is None or not raw.is_file():
        print("the benchmark gave no figures", file=sys.stderr)
        return code or 1
    figures: dict[str, dict[str, list[float]]] = {}
    for line in raw.read_text().splitlines():
        result = json.loads(line)
        value = result.get("srv_us_per_msg")
        if result.get("mode") == "fanout" and isinstance(value, int | float):
            by_server = figures.setdefault(result["scenario"], {})
            by_server.setdefault(result["server"], []).append(value)
    print("\nserver CPU µs per delivery (median of the reps), as a multiple of the floor's")
    print("and of the same relay without hooks (hook_none):")
    for scenario, by_server in figures.items():
        median = {name: statistics.median(values) for name, values in by_server.items()}
        floor, plain = median.get("floor"), median.get("hook_none")
        for name in servers:
            if name not in median:
                continue
            ratios = []
            if floor:
                ratios.append(f"{median[name] / floor:.2f}x floor")
            if plain:
                ratios.append(f"{median[name] / plain:.2f}x hook_none")
            print(f"  {scenario:16} {name:16} {median[name]:7.2f}  " + ", ".join(ratios))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("serve", help="run one relay (for run.py)")
    one.add_argument("--host", default="127.0.0.1")
    one.add_argument("--port", type=int, default=4000)
    one.add_argument("--hook", choices=("none", "on_publish", "both"), default="none")
    sub.add_parser("micro", help="the hook's own CPU per message, in-process")
    parser.add_argument("--scenarios", default=SCENARIOS, help="default: %(default)s")
    parser.add_argument("--reps", type=int, default=3, help="default: %(default)s")
    parser.add_argument("--baseline", help="a checkout of trio_relay to compare against")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args)
        return 0
    if args.command == "micro":
        micro(args)
        return 0
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
