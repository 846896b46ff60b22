"""The seed tutorial's producer: send one message to the relay and wait for its echo.

Run it (with ``examples/server.py`` running) with::

    python examples/producer.py [--host HOST] [--port PORT] [MESSAGE]

(defaults: localhost, 4000 and ``hi``). The relay sends every message to every client, the
sender included, so getting the message back is the acknowledgement that it was delivered:
the producer then prints ``acknowledged: MESSAGE`` and exits with status 0. If the relay is
unreachable or does not acknowledge in time, it prints a one-line error to stderr and exits
with status 1.
"""

import argparse
import sys

import trio

import trio_relay


async def main(url: str, message: str) -> None:
    await trio_relay.produce(url, message)
    print(f"acknowledged: {message}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("message", nargs="?", default="hi", help="default: %(default)s")
    parser.add_argument("--host", default="localhost", help="default: %(default)s")
    parser.add_argument("--port", type=int, default=4000, help="default: %(default)s")
    args = parser.parse_args()
    try:
        trio.run(main, f"ws://{args.host}:{args.port}/", args.message)
    except trio_relay.ClientError as exc:
        sys.exit(f"producer: {exc}")
