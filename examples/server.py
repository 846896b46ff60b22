"""The seed tutorial's server: a relay that sends every message it receives to every client.

Run it with::

    python examples/server.py [--host HOST] [--port PORT] [--log-level LEVEL]

(defaults: localhost, 4000 and INFO; DEBUG adds a line per connection opened and closed;
``--port 0`` picks a free port, which the log shows). It logs
``relay listening on ws://HOST:PORT/`` once ready, and stops cleanly on Ctrl-C (SIGINT) or
SIGTERM, closing every client with code 1001 and exiting with status 0.
"""

import argparse
import logging
import signal
import sys
from functools import partial

import trio

import trio_relay


async def main(host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio_relay.serve_relay, host, port))
            signum = await anext(signals)
            logging.info("%s received: stopping", signal.Signals(signum).name)
            nursery.cancel_scope.cancel()
    logging.info("relay stopped")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost", help="default: %(default)s")
    parser.add_argument("--port", type=int, default=4000, help="default: %(default)s")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        trio.run(main, args.host, args.port)
    except* OSError as group:  # e.g. the port is in use; raised in the nursery, so grouped
        sys.exit(f"server: cannot listen on {args.host}:{args.port}: {group.exceptions[0]}")
