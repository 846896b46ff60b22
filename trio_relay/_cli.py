"""The ``trio-relay`` command: ``serve``, ``consume``, ``produce`` and ``token``.

Every failure the user can fix is one line on stderr, ``trio-relay COMMAND: ...``, naming
what failed (the address, file, option, key or environment variable), and exit status 1
(2 for a bad setting or argument); Ctrl-C is exit status 130, without a traceback.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import dataclasses
import gc
import json
import logging
import math
import os
import signal
import ssl
import stat
import sys
import tomllib
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from functools import partial
from typing import Any, get_args
from urllib.parse import urlsplit

import trio

from . import __version__
from ._aggregate import open_unix_listener
from ._auth import mint_token
from ._broadcast import OverflowPolicy
from ._client import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_TIMEOUT,
    consume,
    handshake_headers,
    leaf,
    open_producer,
)
from ._config import BACKPLANE_SETTINGS, RelayConfig, check_backplane_prefix
from ._exceptions import ClientError
from ._redact import redact, shown
from ._server import DEFAULT_HOST, DEFAULT_PORT, open_listeners, serve_relay
from ._sideport import serve_metrics
from ._topics import DeliveryReport, Gap, Message, check_epoch
from ._workers import reserve_port, stop_with_supervisor, supervise

__all__ = ["main"]

logger = logging.getLogger("trio_relay")

_DEFAULTS = RelayConfig()


class CommandError(Exception):
    """A failure the command reports in one line, ``trio-relay COMMAND: message``, before
    exiting with ``status``."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _log_level_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="logging threshold (default: %(default)s)",
    )


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number, 0 to 65535: {text}")
    return value


def _topic(text: str) -> str:
    """A topic as given to ``--topic``: ``news`` or ``/news`` (the path) alike."""
    return text.removeprefix("/")


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


def _seconds(text: str) -> float:
    """A number of seconds above 0 (and finite)."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0: {text}")
    return value


def _backplane_prefix(text: str) -> str:
    try:
        return check_backplane_prefix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _epoch(text: str) -> str:
    try:
        return check_epoch(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}: {text!r}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


_BACKPLANE_TYPES: dict[str, Callable[[str], object]] = {
    "backplane_prefix": _backplane_prefix,
    "backplane_timeout": _seconds,
    "backplane_log_size": _positive_int,
    "backplane_log_bytes": _positive_int,
    "backplane_log_age": _seconds,
    "backplane_log_total_bytes": _positive_int,
    "backplane_topic_ttl": _seconds,
}

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
    "http_max_connections": "open connections of the HTTP side port; more get HTTP 503",
    "http_request_timeout": "seconds an HTTP side-port client has for its request and the response",
    "max_subscriptions_per_connection": "topics one trio-relay.v2 connection may subscribe "
    "to at once; more get the error too-many-subscriptions",
    "publish_rate": "messages per second one connection may publish, 0 for no limit; a "
    "faster client is read from more slowly",
    "publish_burst": "messages one connection may publish at once above the rate",
    "control_rate": "pings, pongs and refused envelope frames per second one connection may "
    "send, 0 for no limit; a faster client is read from more slowly",
    "control_burst": "such frames one connection may send at once above the control rate",
    "auth_secret": "secret of the HS256 tokens clients must present, at least 32 characters",
    "allowed_origins": "comma-separated Origin patterns browsers must match, e.g. https://*.example.com",
    "history_size": "messages each topic retains for clients resuming with since=",
    "history_bytes": "payload bytes each topic retains at most",
    "history_age": "seconds a message stays retained at most",
    "history_total_bytes": "bytes all topics retain together, payloads plus overheads; "
    "past it the oldest messages of all topics go first",
    "idempotency_window": "seconds an idempotency key keeps a second publish of it to a "
    "topic from being published, kept in Redis with a backplane; 0 for none",
    "max_topics": "topics at once; a new one forgets the idle topic used longest ago, or "
    "gets HTTP 503 if all are in use",
    "backplane": "redis://host:port/db of a Redis that relays share topics through "
    "(rediss:// for TLS; redis+cluster://host:port names a node of a Redis Cluster)",
    "backplane_prefix": "namespace of the backplane's keys in Redis: relays with another "
    "prefix share nothing; no { or }: keys are hash-tagged by topic for Redis Cluster",
    "backplane_timeout": "seconds each Redis command may take",
    "backplane_log_size": "entries each topic's log in Redis holds at most",
    "backplane_log_bytes": "payload bytes each topic's log in Redis holds at most",
    "backplane_log_age": "seconds an entry stays in its topic's log in Redis at most",
    "backplane_log_total_bytes": "payload bytes the logs in Redis of the topics this relay "
    "published to hold together at most: past it, those published to longest ago are dropped",
    "backplane_topic_ttl": "seconds after its last publish a topic's keys in Redis expire",
}
"""Help of each ``serve`` option; one per :class:`RelayConfig` field (a test checks)."""

_BACKPLANE_DEFAULTS = {
    "backplane_prefix": "trio-relay",
    "backplane_timeout": "2.0",
    "backplane_log_size": "the relay's --history-size",
    "backplane_log_bytes": "the relay's --history-bytes",
    "backplane_log_age": "the relay's --history-age",
    "backplane_log_total_bytes": "the relay's --history-total-bytes",
    "backplane_topic_ttl": "86400.0",
}
"""What each ``--backplane-*`` option left out means: RedisBackplane's own defaults (a test
checks the prefix, timeout and TTL against its signature)."""


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
        "--port", type=_port, default=DEFAULT_PORT, help="relay TCP port (default: %(default)s)"
    )
    _log_level_option(common)

    # consume and produce: where the relay is, as --host/--port/--topic or as one --url, and
    # the credentials. Their defaults are None so that --url can refuse them when given;
    # _client_target fills in the rest.
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--host", help=f"relay host name or address (default: {DEFAULT_HOST})")
    client.add_argument("--port", type=_port, help=f"relay TCP port (default: {DEFAULT_PORT})")
    client.add_argument(
        "--url",
        help="the relay and topic as one URL, ws://HOST:PORT/TOPIC, or wss://... for TLS "
        "(verified against the system's trusted CAs, and --cafile); instead of "
        "--host/--port/--topic",
    )
    client.add_argument(
        "--token",
        help="access token, sent as Authorization: Bearer (default: the TRIO_RELAY_TOKEN "
        "environment variable; prefer it: a command line is visible to other users of "
        "this machine)",
    )
    client.add_argument(
        "--cafile",
        metavar="PEM",
        help="CA certificates to trust for a wss:// --url besides the system's (a private CA)",
    )
    _log_level_option(client)

    parser = argparse.ArgumentParser(
        prog="trio-relay",
        description="A WebSocket relay: every message a client sends reaches every client.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
        type=_port,
        help="serve the HTTP API (/api/publish, /api/history), /healthz, Prometheus /metrics "
        "and the browser console (/) on this port of --http-host; with --workers, one port "
        "for all workers; default: off",
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
        if field.name in BACKPLANE_SETTINGS:
            # Default None: not given, so the backplane's own default holds, and one given
            # without --backplane is refused (main() does, naming it).
            serve.add_argument(
                option,
                type=_BACKPLANE_TYPES[field.name],
                default=None,
                help=f"{_SERVE_HELP[field.name]} "
                f"(default: {_BACKPLANE_DEFAULTS[field.name]}); needs --backplane",
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
    # Set by --workers with --http-port: the worker's HTTP port is this Unix socket, which
    # the supervisor's HTTP port answers from (one endpoint for the whole relay).
    serve.add_argument("--http-socket", help=argparse.SUPPRESS)
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
        description="Print a token (HS256 JWT) allowing the given topic patterns, e.g. "
        "trio-relay token --publish 'news/*' --subscribe '**' --ttl 7d",
    )
    token.add_argument(
        "--secret",
        default=os.environ.get("TRIO_RELAY_AUTH_SECRET"),
        help="the relay's --auth-secret, at least 32 characters (default: the "
        "TRIO_RELAY_AUTH_SECRET environment variable, which keeps it out of the process list)",
    )
    token.add_argument(
        "--publish",
        action="append",
        default=[],
        metavar="PATTERN",
        help="topic pattern it may publish to; repeat for more",
    )
    token.add_argument(
        "--subscribe",
        action="append",
        default=[],
        metavar="PATTERN",
        help="topic pattern it may subscribe to; repeat for more",
    )
    token.add_argument(
        "--ttl",
        type=_duration,
        default=3600.0,
        help="lifetime: 3600, 90s, 30m, 1h, 7d (default: 1h)",
    )

    consume_cmd = commands.add_parser(
        "consume",
        parents=[client],
        help="print every message the relay sends",
        description="Connect and print every message, one per line, until interrupted.",
    )
    consume_cmd.add_argument(
        "--topic",
        type=_topic,
        help="the topic to consume, news or /news (default: the root topic, path /)",
    )
    consume_cmd.add_argument(
        "--since",
        type=_non_negative_int,
        default=None,
        help="first replay the retained messages after this sequence number",
    )
    consume_cmd.add_argument(
        "--epoch",
        type=_epoch,
        default=None,
        help="the epoch of --since's number, as --show-seq or --json printed it with "
        "that number: a relay whose numbering of the topic is another (it restarted, say) "
        "answers with a reset gap instead of messages of another numbering; needs --since",
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
    output = consume_cmd.add_mutually_exclusive_group()
    output.add_argument(
        "--show-seq",
        action="store_true",
        help="print each message as '/TOPIC #SEQ epoch=EPOCH: MESSAGE', the numbers "
        "--since and --epoch take (uses trio-relay.v1)",
    )
    output.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per line: each message and gap as its trio-relay.v1 frame "
        '({"type": "message", "topic": ..., "seq": ..., "text" or "binary": ...}; a gap also '
        'has "reset"); uses trio-relay.v1',
    )
    consume_cmd.add_argument(
        "--max-message-size",
        type=_positive_int,
        default=DEFAULT_MAX_MESSAGE_SIZE,
        help="largest message taken from the relay, in characters for text and bytes for "
        "binary (default: %(default)s)",
    )

    produce_cmd = commands.add_parser(
        "produce",
        parents=[client],
        help="send messages, each acknowledged",
        description="Send MESSAGE, or each line of standard input, and exit once the relay "
        "has acknowledged every one (raw: echoed it back).",
    )
    produce_cmd.add_argument(
        "message",
        nargs="?",
        default="-",
        help="the text message to send; - or none: read standard input, one message per line",
    )
    produce_cmd.add_argument(
        "--whole",
        action="store_true",
        help="send all of standard input as one message, not one per line",
    )
    produce_cmd.add_argument(
        "--binary",
        action="store_true",
        help="send standard input as binary messages (text, UTF-8, by default)",
    )
    produce_cmd.add_argument(
        "--topic",
        type=_topic,
        help="the topic to publish to, news or /news (default: the root topic, path /)",
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


def _client_target(args: argparse.Namespace) -> tuple[str, ssl.SSLContext | None, str | None]:
    """The URL, TLS context and token of ``consume`` or ``produce``: from ``--url``, or
    ``--host``/``--port``/``--topic`` (not both); ``--cafile``; ``--token``, else the
    ``TRIO_RELAY_TOKEN`` environment variable. A :class:`CommandError` (status 2) names the
    option at fault, and never quotes a token."""
    if args.url is None:
        host = DEFAULT_HOST if args.host is None else args.host
        port = DEFAULT_PORT if args.port is None else args.port
        url = _url(host, port, args.topic or "")
    else:
        options = {"--host": args.host, "--port": args.port, "--topic": args.topic}
        given = [option for option, value in options.items() if value is not None]
        if given:
            raise CommandError(
                f"give --url or {'/'.join(given)}, not both (the URL names the host, port "
                "and topic)",
                2,
            )
        url = args.url
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not one
        except ValueError as exc:
            raise CommandError(f"--url {shown(url)}: {exc}", 2) from None
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise CommandError(f"--url {shown(url)}: not a ws:// or wss:// URL", 2)
    context = None
    if args.cafile is not None:
        if not url.startswith("wss://"):
            raise CommandError("--cafile is for TLS: give --url wss://...", 2)
        context = ssl.create_default_context()  # the system's trusted CAs, and the file's
        try:
            context.load_verify_locations(args.cafile)
        except ssl.SSLError as exc:
            raise CommandError(f"--cafile {args.cafile}: no PEM certificates: {exc}") from None
        except OSError as exc:
            raise CommandError(f"--cafile {args.cafile}: {_os_error(exc)}") from None
    source, token = "--token", args.token
    if token is None:
        source, token = "TRIO_RELAY_TOKEN", os.environ.get("TRIO_RELAY_TOKEN")
    token = token.strip() if token else None  # a token never has spaces; a file's newline
    try:
        handshake_headers(token)
    except ValueError:
        raise CommandError(f"{source}: a token is printable ASCII without spaces", 2) from None
    return url, context, token or None


def _show(message: str | bytes) -> str:
    return message if isinstance(message, str) else f"<{len(message)} bytes> {message.hex()}"


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _os_error(exc: OSError) -> str:
    """An OSError's text without the file name some carry (the caller names it)."""
    if exc.errno is not None and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return str(exc) or type(exc).__name__


def _tls_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """The server's TLS context; a :class:`CommandError` naming the file that failed."""
    if not certfile:
        if keyfile:
            raise CommandError("--keyfile needs --certfile")
        return None
    for option, path in (("--certfile", certfile), ("--keyfile", keyfile)):
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise CommandError(f"{option} {path}: {_os_error(exc)}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        files = f"--certfile {certfile}" + (f" and --keyfile {keyfile}" if keyfile else "")
        raise CommandError(f"cannot load the certificate and key from {files}: {exc}") from None
    return context


def _server_settings(args: argparse.Namespace) -> tuple[RelayConfig, ssl.SSLContext | None]:
    """The relay's settings and TLS context from ``serve``'s options: ``ValueError`` for a
    setting out of range, :class:`CommandError` for a certificate that cannot be loaded."""
    config = RelayConfig(
        **{field.name: getattr(args, field.name) for field in dataclasses.fields(RelayConfig)}
    )
    return config, _tls_context(args.certfile, args.keyfile)


async def _serve(args: argparse.Namespace) -> None:
    config, context = _server_settings(args)
    # Bind before starting the nursery, so that a port in use is one line from main().
    try:
        listeners = await open_listeners(args.host, args.port, context, reuse_port=args.worker)
    except OSError as exc:
        raise CommandError(
            f"cannot listen on {_address(args.host, args.port)}: {_os_error(exc)}"
        ) from None
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
            if args.http_socket is not None:
                unix = await open_unix_listener(args.http_socket)
                await nursery.start(partial(serve_metrics, server, None, 0, listeners=[unix]))
            elif args.http_port is not None:
                try:
                    metrics = await nursery.start(
                        serve_metrics, server, args.http_host, args.http_port
                    )
                except OSError as exc:
                    where = _address(args.http_host, args.http_port)
                    raise CommandError(
                        f"--http-port: cannot listen on {where}: {_os_error(exc)}"
                    ) from None
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


def describe_gap(gap: Gap) -> str:
    """What a :class:`Gap` means, in words: a reset, or the messages lost."""
    if gap.reset:
        return f"topic /{gap.topic} was reset; numbering restarted at {gap.first}"
    if gap.first - 1 == gap.since + 1:
        return f"message {gap.since + 1} is no longer retained"
    return f"messages {gap.since + 1} to {gap.first - 1} are no longer retained"


def _json_line(item: Message | Gap) -> str:
    """``item`` as its ``trio-relay.v1`` frame, on one line (a gap also says ``reset``)."""
    if isinstance(item, Gap):
        frame: dict[str, object] = {"type": "gap", **dataclasses.asdict(item)}
        if not item.epoch:
            del frame["epoch"]
    else:
        frame = {"type": "message", "topic": item.topic, "seq": item.seq}
        if item.epoch:
            frame["epoch"] = item.epoch
        if isinstance(item.data, str):
            frame["text"] = item.data
        else:
            frame["binary"] = base64.b64encode(item.data).decode("ascii")
    return json.dumps(frame, ensure_ascii=False)


async def _consume(args: argparse.Namespace) -> None:
    if args.epoch is not None and args.since is None:
        raise CommandError(
            "--epoch needs --since (the epoch names the numbering of --since's number)", 2
        )
    url, context, token = _client_target(args)
    envelope = args.show_seq or args.json
    async with consume(
        url,
        token=token,
        ssl_context=context,
        connect_timeout=args.timeout,
        since=args.since,
        epoch=args.epoch,
        resume=args.resume,
        envelope=envelope,
        max_message_size=args.max_message_size,
    ) as messages:
        async for item in messages:
            if isinstance(item, Gap):
                logger.warning("gap: %s", describe_gap(item))
                if args.json:
                    print(_json_line(item), flush=True)
            elif isinstance(item, Message):
                if args.json:
                    print(_json_line(item), flush=True)
                elif args.show_seq:
                    epoch = f" epoch={item.epoch}" if item.epoch else ""
                    print(f"/{item.topic} #{item.seq}{epoch}: {_show(item.data)}", flush=True)
                else:
                    print(_show(item.data), flush=True)
            else:
                print(_show(item), flush=True)


async def _input_chunks() -> AsyncGenerator[bytes, None]:
    """Standard input, as it comes."""
    fd = sys.stdin.fileno()
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)):
        # A file (or /dev/null): always readable, and epoll refuses to watch it.
        while chunk := os.read(fd, 1 << 16):
            yield chunk
            await trio.sleep(0)
        return
    # A pipe or a terminal: read without blocking the connection (its pings and closes)
    # and without a thread. trio.lowlevel.FdStream is trio's one way to do that; it puts
    # the descriptor in non-blocking mode and back when closed (tests/test_cli.py reads
    # from a pipe through it).
    async with trio.lowlevel.FdStream(os.dup(fd)) as stream:
        while chunk := await stream.receive_some():
            yield chunk


async def _input_messages(*, whole: bool, binary: bool) -> AsyncGenerator[str | bytes, None]:
    """The messages on standard input: each line (without its end), or all of it."""

    def message(data: bytes, where: str) -> str | bytes:
        if binary:
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError(f"{where} is not UTF-8 text (--binary sends bytes)") from None

    buffer = bytearray()
    number = 0
    async with contextlib.aclosing(_input_chunks()) as chunks:
        async for chunk in chunks:
            buffer += chunk
            if whole:
                continue
            *lines, rest = bytes(buffer).split(b"\n")
            buffer = bytearray(rest)
            for line in lines:
                number += 1
                yield message(line.removesuffix(b"\r"), f"standard input line {number}")
    if whole:
        yield message(bytes(buffer), "standard input")
    elif buffer:
        yield message(bytes(buffer).removesuffix(b"\r"), f"standard input line {number + 1}")


def _acknowledged(message: str | bytes, report: DeliveryReport | None) -> str:
    if report is not None:
        return (
            f"acknowledged: seq={report.seq} queued={report.queued} "
            f"dropped={report.dropped} evicted={report.evicted}"
        )
    shown = _show(message)
    if len(shown) > 100:
        unit = "characters" if isinstance(message, str) else "bytes"
        shown = f"{shown[:80]}... ({len(message)} {unit})"
    return f"acknowledged: {shown}"


async def _produce(args: argparse.Namespace) -> None:
    url, context, token = _client_target(args)
    async with open_producer(
        url, timeout=args.timeout, envelope=args.report, token=token, ssl_context=context
    ) as producer:
        if args.message != "-":
            message = args.message.encode() if args.binary else args.message
            report = await producer.produce(message)
            print(_acknowledged(message, report), flush=True)
            return
        if os.isatty(sys.stdin.fileno()):
            print(
                "reading messages from standard input, "
                + (
                    "all of it as one (Ctrl-D ends)" if args.whole else "one per line (Ctrl-D ends)"
                ),
                file=sys.stderr,
                flush=True,
            )
        async with contextlib.aclosing(
            _input_messages(whole=args.whole, binary=args.binary)
        ) as messages:
            async for message in messages:
                report = await producer.produce(message)
                print(_acknowledged(message, report), flush=True)


def _patterns(text: str) -> tuple[str, ...]:
    return tuple(pattern.strip() for pattern in text.split(",") if pattern.strip())


_TEXT_SETTINGS = ("host", "http_host", "certfile", "keyfile", "auth_secret", "backplane")
_ALIASES = {"metrics_port": "http_port"}
"""Settings known by an older name too (file keys and ``TRIO_RELAY_*`` variables)."""
_SETTINGS = frozenset(
    {*_TEXT_SETTINGS, "port", "http_port", "metrics_port", "log_level", "workers"}
    | {field.name for field in dataclasses.fields(RelayConfig)}
)


def _convert(name: str, value: object, source: str) -> object:
    """A setting from a file or the environment, checked as its option checks it; a
    ``ValueError`` names ``source`` (the file and key, or the variable)."""
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    try:
        if isinstance(value, bool | dict) or (
            isinstance(value, list) and name != "allowed_origins"
        ):
            raise ValueError(f"not a valid value: {json.dumps(value, default=str)}")
        if name in BACKPLANE_SETTINGS:
            return _BACKPLANE_TYPES[name](text)
        if name in _TEXT_SETTINGS:
            return text
        if name in ("port", "http_port", "metrics_port"):
            return _port(text)
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
        detail = str(exc)
        if detail.startswith(("invalid literal for int()", "could not convert")):
            detail = f"not a number: {text!r}"
        raise ValueError(f"{source}: {detail}") from None


def serve_settings(environ: Mapping[str, str], config_file: str | None) -> dict[str, object]:
    """Settings of ``serve`` from a TOML file and ``TRIO_RELAY_*`` environment variables.

    Precedence, highest first: command-line options, then the environment
    (``TRIO_RELAY_MAX_QUEUE_BYTES=1048576``), then the ``--config`` file, then the built-in
    defaults. Values are checked as the options check them; unknown keys are errors.
    """
    settings: dict[str, object] = {}
    if config_file is not None:
        try:
            with open(config_file, "rb") as file:
                document = tomllib.load(file)
        except OSError as exc:
            raise ValueError(f"--config {config_file}: {_os_error(exc)}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{config_file}: not valid TOML: {exc}") from None
        table = document.get("serve", document)
        if not isinstance(table, dict):
            raise ValueError(f"{config_file}: [serve] must be a table")
        for key, value in sorted(
            table.items(), key=lambda item: item[0].replace("-", "_") not in _ALIASES
        ):
            name = key.replace("-", "_")
            if name not in _SETTINGS:
                raise ValueError(f"{config_file}: unknown setting {key!r}")
            settings[_ALIASES.get(name, name)] = _convert(name, value, f"{config_file}: {key}")
    # Old names first: where both are set, the current name wins.
    for name in sorted(_SETTINGS, key=lambda name: (name not in _ALIASES, name)):
        variable = f"TRIO_RELAY_{name.upper()}"
        text = environ.get(variable)
        if text is not None:
            settings[_ALIASES.get(name, name)] = _convert(
                name, text, f"environment variable {variable}"
            )
    return settings


def _supervise(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``--workers`` relay processes: see :mod:`trio_relay._workers`."""
    try:
        # Checked here once, not by workers that would fail and be restarted for ever.
        _server_settings(args)
    except ValueError as exc:
        print(f"trio-relay serve: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"trio-relay serve: {exc}", file=sys.stderr)
        return exc.status
    try:
        reserved = reserve_port(args.host, args.port)
    except OSError as exc:
        where = _address(args.host, args.port)
        print(f"trio-relay serve: cannot listen on {where}: {_os_error(exc)}", file=sys.stderr)
        return 1
    with contextlib.ExitStack() as stack:
        for sock in reserved:
            stack.enter_context(sock)
        port = reserved[0].getsockname()[1]
        argv = argv[argv.index("serve") + 1 :] if "serve" in argv else argv
        grace = args.close_timeout + 5.0
        try:
            return trio.run(
                partial(
                    supervise,
                    args.workers,
                    argv,
                    port,
                    args.http_port,
                    grace,
                    http_host=args.http_host,
                    http_max_connections=args.http_max_connections,
                    http_request_timeout=args.http_request_timeout,
                )
            )
        except KeyboardInterrupt:
            return 130


GC_THRESHOLDS = (50_000, 1, 100)
"""The garbage collector's thresholds in a ``trio-relay serve`` process (Python's: 700,
10, 10)."""


def tune_garbage_collector() -> None:
    """Make full garbage collections rare in the relay process.

    With 19,000 connections the heap holds about a million tracked objects, and each full
    collection walks all of them: with Python's default thresholds, 19,000 clients dropping
    at once took 6.1 s to close, 4 s of it in the collector, against 2.1 s with these
    (``benchmarks/mass_disconnect.py``). Young objects are still collected every 50,000
    allocations, so the reference cycles trio's cancellations make are freed quickly.
    The middle generation is collected every other time (1, not 20): with 20 it gathered
    every survivor of a million allocations (19,000 connections' worth) and one pass
    over it stopped the relay for 0.6 s (a mass disconnect's bystander waited that long:
    gc.callbacks, timed); with 1 its passes take 40 to 80 ms at 19,000 connections and
    survivors reach the oldest generation soon.
    Only the command does this: a program embedding the relay keeps its own settings.
    """
    gc.set_threshold(*GC_THRESHOLDS)


def _token(args: argparse.Namespace) -> int:
    if not args.secret:
        print(
            "trio-relay token: no secret: give --secret or set TRIO_RELAY_AUTH_SECRET "
            "(the relay's --auth-secret)",
            file=sys.stderr,
        )
        return 2
    if len(args.secret) < 32:
        print(
            f"trio-relay token: the secret must be at least 32 characters "
            f"(it has {len(args.secret)})",
            file=sys.stderr,
        )
        return 2
    if not args.publish and not args.subscribe:
        print("trio-relay token: give --publish and/or --subscribe", file=sys.stderr)
        return 2
    print(mint_token(args.secret, publish=args.publish, subscribe=args.subscribe, ttl=args.ttl))
    return 0


def configure_logging(level: str, worker: str | None = None) -> None:
    """The command's log: lines of the ``trio_relay`` loggers at ``level`` and above, on stderr.

    coredis (the Redis backplane's client) logs its own view of a Redis outage ("Connection
    closed unexpectedly!" with a traceback, at INFO and ERROR) beside the relay's own lines
    about it; its logger is kept to CRITICAL unless ``level`` is DEBUG.
    """
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s"
        + (f" worker {worker}" if worker else "")
        + ": %(message)s",
    )
    logging.getLogger("coredis").setLevel(logging.NOTSET if level == "DEBUG" else logging.CRITICAL)


def _run(command: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> None:
    """``trio.run(command, args)``, raising the one exception inside an exception group
    (a nursery's) bare, so that main() can report it."""
    failure: BaseException | None = None
    try:
        trio.run(command, args)
    except BaseExceptionGroup as group:
        failure = leaf(group)
        if isinstance(failure, BaseExceptionGroup) and group.subgroup(KeyboardInterrupt):
            # Ctrl-C that trio delivered inside a task of a nursery (trio-websocket's reader,
            # say) while another task of it failed as the connection went: still Ctrl-C.
            failure = KeyboardInterrupt()
    if failure is not None:
        try:
            raise failure
        finally:
            failure = None


MMAP_THRESHOLD = 128 * 1024
"""Bytes from which a ``trio-relay serve`` process gets each buffer its own mapping."""
_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>


def tune_allocator() -> bool:
    """Give big buffers back to the system when they are freed (glibc; elsewhere a no-op).

    glibc maps each allocation of 128 KiB or more on its own, but after the first such
    block is freed it raises that threshold to the block's size, so later big buffers (1 MB
    messages, their unmasking, retained history) come from the heap, where the freed ones
    leave holes the process keeps. With 1,500 topics x 1 MB, one client's messages raised
    the relay's RSS by 88 MiB on a 64 MiB history budget; with the threshold fixed here,
    66 MiB (``benchmarks/abuse_memory.py``). Small messages never reach it. Returns whether
    it was set. Only the command does this: a program embedding the relay keeps its own.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trio-relay``; returns the process exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = serve_settings(os.environ, args.config)
        except ValueError as exc:
            print(f"trio-relay serve: settings: {redact(str(exc))}", file=sys.stderr)
            return 2
        given, args = args, build_parser(settings).parse_args(argv)
        if args.backplane is None:
            for name in BACKPLANE_SETTINGS:
                if getattr(args, name) is None:
                    continue
                if getattr(given, name) is not None:
                    source = "--" + name.replace("_", "-")
                elif f"TRIO_RELAY_{name.upper()}" in os.environ:
                    source = f"environment variable TRIO_RELAY_{name.upper()}"
                else:
                    source = f"{args.config}: {name}"
                print(f"trio-relay serve: {source} needs --backplane", file=sys.stderr)
                return 2
    if args.command == "token":
        return _token(args)
    configure_logging(args.log_level, os.environ.get("TRIO_RELAY_WORKER"))
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
        tune_allocator()
    try:
        _run(command, args)
    except (ClientError, CommandError) as exc:
        print(f"trio-relay {args.command}: {redact(str(exc))}", file=sys.stderr)
        return exc.status if isinstance(exc, CommandError) else 1
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:  # e.g. a setting out of range
        print(f"trio-relay {args.command}: {redact(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port is already in use
        print(f"trio-relay {args.command}: {redact(str(exc))}", file=sys.stderr)
        return 1
    return 0
