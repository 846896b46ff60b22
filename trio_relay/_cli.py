"""The ``trio-relay`` command: ``serve``, ``consume`` and ``produce``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import ssl
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import get_args

import trio

from ._auth import mint_token
from ._broadcast import OverflowPolicy
from ._client import DEFAULT_TIMEOUT, consume, produce
from ._config import RelayConfig
from ._exceptions import ClientError
from ._redact import redact, shown
from ._server import DEFAULT_HOST, DEFAULT_PORT, open_listeners, serve_relay
from ._sideport import serve_metrics
from ._topics import Gap, Message
from ._workers import reserve_port, stop_with_supervisor, supervise

__all__ = ["main"]

logger = logging.getLogger("trio_relay")

_DEFAULTS = RelayConfig()


def _positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


_SERVE_HELP = {
    "queue_size": "batches of messages queued per consumer before its policy applies",
    "max_queue_bytes": "bytes queued per consumer beyond its socket buffers before its "
    "policy applies",
    "overflow_policy": "what happens to a consumer over its queue budget",
    "overflow_timeout": "seconds after a full consumer's last progress before the policy "
    "evicts it; publishers wait until then",
    "slow_consumer_timeout": "seconds a consumer's socket may accept nothing before it is "
    "disconnected",
    "max_message_size": "largest accepted message in bytes; larger closes with 1009",
    "max_unfinished_bytes": "bytes of unfinished incoming messages all connections may hold "
    "together; a message past it closes its connection with 1013",
    "handshake_timeout": "seconds to complete the HTTP upgrade",
    "close_timeout": "seconds allowed for closing handshakes and shutdown",
    "receive_buffer_size": "bytes asked of a client's socket per read",
    "ping_interval": "seconds between keepalive pings; 0 for none",
    "ping_timeout": "seconds a client has to answer a ping before close 1011",
    "max_connections": "open connections in all; more get HTTP 503",
    "max_connections_per_ip": "open connections per client address; more get HTTP 503",
    "max_subscribers_per_topic": "clients per topic; more get HTTP 503",
    "publish_rate": "messages per second one connection may publish, 0 for no limit; a "
    "faster client is read from more slowly",
    "publish_burst": "messages one connection may publish at once above the rate",
    "auth_secret": "secret of the HS256 tokens clients must present, at least 32 characters",
    "allowed_origins": "comma-separated Origin patterns browsers must match, e.g. https://*.example.com",
    "history_size": "messages each topic retains for clients resuming with since=",
    "history_bytes": "payload bytes each topic retains at most",
    "history_age": "seconds a message stays retained at most",
    "history_total_bytes": "bytes all topics retain together, payloads plus overheads; "
    "past it the oldest messages of all topics go first",
    "max_topics": "topics at once; a new one forgets the idle topic used longest ago, or "
    "gets HTTP 503 if all are in use",
    "backplane": "redis://host:port/db of a Redis that relays share topics through",
}
"""Help of each ``serve`` option; one per :class:`RelayConfig` field (a test checks)."""


def build_parser(serve_defaults: Mapping[str, object] | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``trio-relay`` (and ``python -m trio_relay``).

    ``serve_defaults`` replaces built-in defaults of ``serve`` options (from a settings file
    and the environment: see :func:`serve_settings`).
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--host", default=DEFAULT_HOST, help="relay host name or address (default: %(default)s)"
    )
    common.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="relay TCP port (default: %(default)s)"
    )
    common.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="logging threshold (default: %(default)s)",
    )

    parser = argparse.ArgumentParser(
        prog="trio-relay",
        description="A WebSocket relay: every message a client sends reaches every client.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="run the relay",
        description="Run the relay on ws://HOST:PORT/ until SIGINT or SIGTERM.",
    )
    serve.add_argument(
        "--http-port",
        "--metrics-port",  # its name before it served the HTTP API
        dest="http_port",
        type=int,
        help="serve the HTTP API (/api/publish, /api/history), /healthz, Prometheus /metrics "
        "and the browser console (/) on this port of --http-host; with --workers, worker i "
        "serves it on this port + i; default: off",
    )
    serve.add_argument(
        "--http-host",
        default="127.0.0.1",
        help="address the HTTP port listens on, whatever the relay's host is: loopback "
        "unless you say otherwise; expose it only behind a TLS proxy, with an auth secret "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--certfile",
        help="PEM certificate chain: serve wss:// instead of ws://; default: none",
    )
    serve.add_argument(
        "--keyfile",
        help="PEM private key of --certfile; default: read from the certfile",
    )
    for field in dataclasses.fields(RelayConfig):
        default = getattr(_DEFAULTS, field.name)
        option = "--" + field.name.replace("_", "-")
        if field.name == "overflow_policy":
            serve.add_argument(
                option,
                choices=get_args(OverflowPolicy),
                default=default,
                help=f"{_SERVE_HELP[field.name]} (default: %(default)s)",
            )
            continue
        if field.name in ("auth_secret", "backplane"):
            serve.add_argument(
                option,
                default=default,
                help=f"{_SERVE_HELP[field.name]}; default: none",
            )
            continue
        if field.name == "allowed_origins":
            serve.add_argument(
                option,
                type=_patterns,
                default=default,
                help=f"{_SERVE_HELP[field.name]}; default: any origin",
            )
            continue
        if isinstance(default, float):
            kind: Callable[[str], object] = _positive_float
        elif field.name in ("history_size", "history_bytes", "history_total_bytes"):
            kind = _non_negative_int
        else:
            kind = _positive_int
        serve.add_argument(
            option,
            type=kind,
            default=default,
            help=f"{_SERVE_HELP[field.name]} (default: %(default)s)",
        )

    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="relay processes on the port, with SO_REUSEPORT, sharing topics through "
        "the backplane, supervised; 1 runs the relay in this process (default: %(default)s)",
    )
    # Set by --workers on its workers: listen with SO_REUSEPORT, and stop when the
    # supervisor's pipe on stdin closes (the supervisor is gone, even killed).
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="TOML settings file (keys as the options, e.g. max_queue_bytes = 1048576, at top "
        "level or under [serve]); default: none",
    )
    if serve_defaults:
        serve.set_defaults(**serve_defaults)

    token = commands.add_parser(
        "token",
        help="mint an access token",
        description="Print a token (HS256 JWT) allowing the given topic patterns.",
    )
    token.add_argument(
        "--secret",
        default=os.environ.get("TRIO_RELAY_AUTH_SECRET"),
        help="the relay's --auth-secret (default: $TRIO_RELAY_AUTH_SECRET)",
    )
    token.add_argument(
        "--publish", action="append", default=[], help="topic pattern it may publish to"
    )
    token.add_argument(
        "--subscribe", action="append", default=[], help="topic pattern it may subscribe to"
    )
    token.add_argument(
        "--ttl", type=_duration, default=3600.0, help="lifetime: 3600, 90s, 30m, 1h, 7d"
    )

    consume_cmd = commands.add_parser(
        "consume",
        parents=[common],
        help="print every message the relay sends",
        description="Connect and print every message, one per line, until interrupted.",
    )
    consume_cmd.add_argument(
        "--topic", default="", help="the topic to consume (default: the root topic, path /)"
    )
    consume_cmd.add_argument(
        "--since",
        type=_non_negative_int,
        default=None,
        help="first replay the retained messages after this sequence number",
    )
    consume_cmd.add_argument(
        "--resume",
        action="store_true",
        help="reconnect after a dropped connection and resume where it left off "
        "(uses the trio-relay.v1 envelope protocol)",
    )
    consume_cmd.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        help="seconds allowed to connect (default: %(default)s)",
    )

    produce_cmd = commands.add_parser(
        "produce",
        parents=[common],
        help="send one message and wait for its echo",
        description="Send MESSAGE and exit once the relay echoes it back (the acknowledgement).",
    )
    produce_cmd.add_argument("message", help="the text message to send")
    produce_cmd.add_argument(
        "--topic", default="", help="the topic to publish to (default: the root topic, path /)"
    )
    produce_cmd.add_argument(
        "--report",
        action="store_true",
        help="use the trio-relay.v1 envelope protocol and print the delivery report",
    )
    produce_cmd.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        help="seconds allowed for connecting and the acknowledgement (default: %(default)s)",
    )
    return parser


def _url(host: str, port: int, topic: str = "") -> str:
    host = f"[{host}]" if ":" in host else host
    return f"ws://{host}:{port}/{topic}"


def _show(message: str | bytes) -> str:
    return message if isinstance(message, str) else f"<{len(message)} bytes> {message.hex()}"


def _server_settings(args: argparse.Namespace) -> tuple[RelayConfig, ssl.SSLContext | None]:
    """The relay's settings and TLS context from ``serve``'s options: ``ValueError`` for a
    setting out of range, ``OSError`` for a certificate that cannot be loaded."""
    config = RelayConfig(
        **{field.name: getattr(args, field.name) for field in dataclasses.fields(RelayConfig)}
    )
    context = None
    if args.certfile:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.certfile, args.keyfile)
    elif args.keyfile:
        raise OSError("--keyfile needs --certfile")
    return config, context


async def _serve(args: argparse.Namespace) -> None:
    config, context = _server_settings(args)
    # Bind before starting the nursery, so that a port in use is a plain OSError for main().
    listeners = await open_listeners(args.host, args.port, context, reuse_port=args.worker)
    stop_signals = [signal.SIGINT, signal.SIGTERM]
    if args.worker:
        # Ctrl-C reaches the whole process group; the supervisor then stops each worker with
        # one SIGTERM (a second signal arriving while it drains would kill it on the spot).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_signals.remove(signal.SIGINT)
    with trio.open_signal_receiver(*stop_signals) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(serve_relay, config=config, listeners=listeners))
            if args.worker:
                nursery.start_soon(stop_with_supervisor, nursery.cancel_scope)
            if args.http_port is not None:
                metrics = await nursery.start(serve_metrics, server, args.http_host, args.http_port)
                for listener in metrics:
                    host, port = listener.socket.getsockname()[:2]
                    logger.info(
                        "metrics on http://%s:%d/metrics and /healthz, console on http://%s:%d/, "
                        "HTTP API on http://%s:%d/api/",
                        *(host, port) * 3,
                    )
            async for signum in signals:
                logger.info("%s received: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    logger.info("relay stopped")


async def _consume(args: argparse.Namespace) -> None:
    url = _url(args.host, args.port, args.topic)
    async with consume(
        url, connect_timeout=args.timeout, since=args.since, resume=args.resume
    ) as messages:
        logger.info("connected to %s", shown(url))
        async for item in messages:
            if isinstance(item, Gap):
                logger.warning(
                    "gap: messages %d to %d are no longer retained", item.since + 1, item.first - 1
                )
            elif isinstance(item, Message):
                print(_show(item.data), flush=True)
            else:
                print(_show(item), flush=True)


async def _produce(args: argparse.Namespace) -> None:
    url = _url(args.host, args.port, args.topic)
    report = await produce(url, args.message, timeout=args.timeout, envelope=args.report)
    if report is None:
        print(f"acknowledged: {args.message}", flush=True)
    else:
        print(
            f"acknowledged: seq={report.seq} queued={report.queued} "
            f"dropped={report.dropped} evicted={report.evicted}",
            flush=True,
        )


def _patterns(text: str) -> tuple[str, ...]:
    return tuple(pattern.strip() for pattern in text.split(",") if pattern.strip())


_TEXT_SETTINGS = ("host", "http_host", "certfile", "keyfile", "auth_secret", "backplane")
_ALIASES = {"metrics_port": "http_port"}
"""Settings known by an older name too (file keys and ``TRIO_RELAY_*`` variables)."""
_SETTINGS = frozenset(
    {*_TEXT_SETTINGS, "port", "http_port", "metrics_port", "log_level", "workers"}
    | {field.name for field in dataclasses.fields(RelayConfig)}
)


def _convert(name: str, value: object) -> object:
    """A setting from a file or the environment, checked as its option checks it."""
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    try:
        if name in _TEXT_SETTINGS:
            return text
        if name in ("port", "http_port", "metrics_port"):
            return int(text)
        if name == "workers":
            return _positive_int(text)
        if name == "log_level":
            if text.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
                raise ValueError(f"unknown log level {text!r}")
            return text.upper()
        if name == "overflow_policy":
            if text not in get_args(OverflowPolicy):
                raise ValueError(f"unknown policy {text!r}")
            return text
        if name == "allowed_origins":
            return _patterns(text)
        default = getattr(_DEFAULTS, name)
        if isinstance(default, float):
            return _positive_float(text)
        if name in ("history_size", "history_bytes", "history_total_bytes"):
            return _non_negative_int(text)
        return _positive_int(text)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise ValueError(f"{name}: {exc}") from None


def serve_settings(environ: Mapping[str, str], config_file: str | None) -> dict[str, object]:
    """Settings of ``serve`` from a TOML file and ``TRIO_RELAY_*`` environment variables.

    Precedence, highest first: command-line options, then the environment
    (``TRIO_RELAY_MAX_QUEUE_BYTES=1048576``), then the ``--config`` file, then the built-in
    defaults. Values are checked as the options check them; unknown keys are errors.
    """
    settings: dict[str, object] = {}
    if config_file is not None:
        with open(config_file, "rb") as file:
            document = tomllib.load(file)
        table = document.get("serve", document)
        for key, value in sorted(
            table.items(), key=lambda item: item[0].replace("-", "_") not in _ALIASES
        ):
            name = key.replace("-", "_")
            if name not in _SETTINGS:
                raise ValueError(f"unknown setting {key!r} in {config_file}")
            settings[_ALIASES.get(name, name)] = _convert(name, value)
    # Old names first: where both are set, the current name wins.
    for name in sorted(_SETTINGS, key=lambda name: (name not in _ALIASES, name)):
        text = environ.get(f"TRIO_RELAY_{name.upper()}")
        if text is not None:
            settings[_ALIASES.get(name, name)] = _convert(name, text)
    return settings


def _supervise(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``--workers`` relay processes: see :mod:`trio_relay._workers`."""
    try:
        # Checked here once, not by workers that would fail and be restarted for ever.
        _server_settings(args)
    except ValueError as exc:
        print(f"trio-relay serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"trio-relay serve: {exc}", file=sys.stderr)
        return 1
    try:
        reserved = reserve_port(args.host, args.port)
    except OSError as exc:
        print(f"trio-relay serve: {exc}", file=sys.stderr)
        return 1
    with contextlib.ExitStack() as stack:
        for sock in reserved:
            stack.enter_context(sock)
        port = reserved[0].getsockname()[1]
        argv = argv[argv.index("serve") + 1 :] if "serve" in argv else argv
        grace = args.close_timeout + 5.0
        try:
            trio.run(supervise, args.workers, argv, port, args.http_port, grace)
        except KeyboardInterrupt:
            return 130
    return 0


GC_THRESHOLDS = (50_000, 20, 100)
"""The garbage collector's thresholds in a ``trio-relay serve`` process (Python's: 700,
10, 10)."""


def tune_garbage_collector() -> None:
    """Make full garbage collections rare in the relay process.

    With 19,000 connections the heap holds about a million tracked objects, and each full
    collection walks all of them: with Python's default thresholds, 19,000 clients dropping
    at once took 6.1 s to close, 4 s of it in the collector, against 2.1 s with these
    (``benchmarks/mass_disconnect.py``). Young objects are still collected every 50,000
    allocations, so the reference cycles trio's cancellations make are freed quickly.
    Only the command does this: a program embedding the relay keeps its own settings.
    """
    gc.set_threshold(*GC_THRESHOLDS)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trio-relay``; returns the process exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = serve_settings(os.environ, args.config)
        except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
            print(f"trio-relay serve: settings: {redact(str(exc))}", file=sys.stderr)
            return 2
        args = build_parser(settings).parse_args(argv)
    if args.command == "token":
        if not args.secret or len(args.secret) < 32:
            print("trio-relay token: --secret of at least 32 characters needed", file=sys.stderr)
            return 2
        if not args.publish and not args.subscribe:
            print("trio-relay token: give --publish and/or --subscribe", file=sys.stderr)
            return 2
        print(mint_token(args.secret, publish=args.publish, subscribe=args.subscribe, ttl=args.ttl))
        return 0
    worker = os.environ.get("TRIO_RELAY_WORKER")
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s"
        + (f" worker {worker}" if worker else "")
        + ": %(message)s",
    )
    command = {"serve": _serve, "consume": _consume, "produce": _produce}[args.command]
    if args.command == "serve" and args.workers > 1:
        if args.backplane is None:
            print(
                f"trio-relay serve: --workers {args.workers} needs --backplane redis://... "
                "(workers share topics through it)",
                file=sys.stderr,
            )
            return 2
        return _supervise(args, list(sys.argv[1:] if argv is None else argv))
    if args.command == "serve":
        tune_garbage_collector()
    try:
        trio.run(command, args)
    except ClientError as exc:
        print(f"trio-relay {args.command}: {redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:  # e.g. a setting out of range
        print(f"trio-relay {args.command}: {redact(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port is already in use
        print(f"trio-relay {args.command}: {redact(str(exc))}", file=sys.stderr)
        return 1
    return 0
