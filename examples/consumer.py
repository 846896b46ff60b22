"""The seed tutorial's consumer: connect to the relay and print every message it receives.

Run it (with ``examples/server.py`` running) with::

    python examples/consumer.py [--host HOST] [--port PORT]

(defaults: localhost and 4000). Once connected it writes ``connected to ws://HOST:PORT/`` to
stderr, then prints each message on its own line of stdout (binary ones as ``b'...'``), until
the relay closes the connection or Ctrl-C. If the relay is unreachable or goes away, it
prints a one-line error to stderr and exits with status 1.
"""

import argparse
import sys

import trio

import trio_relay


async def main(url: str) -> None:
    async with trio_relay.consume(url) as messages:
        print(f"connected to {url}", file=sys.stderr, flush=True)
        async for message in messages:
            print(message, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost", help="default: %(default)s")
    parser.add_argument("--port", type=int, default=4000, help="default: %(default)s")
    args = parser.parse_args()
    try:
        trio.run(main, f"ws://{args.host}:{args.port}/")
    except trio_relay.ClientError as exc:
        sys.exit(f"consumer: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)
