"""The ``trio-relay`` argument parser: documented defaults, rejected values, ``--help``."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from redis_support import RedisServer, redis_server
from test_end_to_end import (
    DEADLINE,
    PYTHON,
    Launch,
    at,
    launch as launch,  # the fixture: it starts and kills programs
    refused_port as refused_port,  # a fixture: a port nothing listens on
    scrape,
)

import trio_relay
from trio_relay import DEFAULT_TIMEOUT, Gap, RedisBackplane, RelayConfig, verify_token
from trio_relay._cli import (
    _client_target,
    _run,
    _server_settings,
    build_parser,
    configure_logging,
    describe_gap,
    main,
    serve_settings,
)
from trio_relay.testing import open_memory_relay

__all__ = ["redis_server"]  # a fixture, used by name


def test_serve_defaults() -> None:
    args = build_parser().parse_args(["serve"])
    assert vars(args) == {
        "command": "serve",
        "host": "localhost",
        "port": 4000,
        "log_level": "INFO",
        "queue_size": 4096,
        "max_queue_bytes": 256 * 1024,
        "overflow_policy": "evict",
        "overflow_timeout": 1.0,
        "slow_consumer_timeout": 5.0,
        "max_message_size": 1024 * 1024,
        "max_unfinished_bytes": 64 * 1024 * 1024,
        "handshake_timeout": 10.0,
        "close_timeout": 5.0,
        "receive_buffer_size": 64 * 1024,
        "ping_interval": 20.0,
        "ping_timeout": 20.0,
        "max_connections": 10_000,
        "max_connections_per_ip": 10_000,
        "max_subscribers_per_topic": 10_000,
        "http_max_connections": 64,
        "http_request_timeout": 10.0,
        "max_subscriptions_per_connection": 100,
        "publish_rate": 0.0,
        "publish_burst": 1000,
        "control_rate": 20.0,
        "control_burst": 100,
        "auth_secret": None,
        "allowed_origins": (),
        "history_size": 1000,
        "history_bytes": 1024 * 1024,
        "history_age": 600.0,
        "history_total_bytes": 64 * 1024 * 1024,
        "idempotency_window": 120.0,
        "max_topics": 10_000,
        "backplane": None,
        "backplane_prefix": None,  # None: not given; the backplane's own default holds
        "backplane_timeout": None,
        "backplane_log_size": None,
        "backplane_log_bytes": None,
        "backplane_log_age": None,
        "backplane_log_total_bytes": None,
        "backplane_topic_ttl": None,
        "workers": 1,
        "worker": False,
        "http_socket": None,
        "certfile": None,
        "keyfile": None,
        "http_port": None,
        "http_host": "127.0.0.1",
        "config": None,
    }


def test_serve_defaults_are_the_relay_config_defaults() -> None:
    args = vars(build_parser().parse_args(["serve"]))
    names = [field.name for field in dataclasses.fields(RelayConfig) if field.name in args]
    assert len(names) == len(dataclasses.fields(RelayConfig))
    assert RelayConfig(**{name: args[name] for name in names}) == RelayConfig()


def test_client_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRIO_RELAY_TOKEN", raising=False)
    parser = build_parser()
    consume = parser.parse_args(["consume"])
    produce = parser.parse_args(["produce", "hi"])
    # None: not given, so that --url can refuse them; _client_target fills in the defaults.
    where = {"host": None, "port": None, "topic": None, "url": None}
    credentials = {"token": None, "cafile": None}
    assert vars(consume) == {
        "command": "consume",
        **where,
        **credentials,
        "log_level": "INFO",
        "timeout": 10.0,
        "since": None,
        "epoch": None,
        "resume": False,
        "show_seq": False,
        "json": False,
        "max_message_size": 16 * 1024 * 1024,
    }
    assert vars(produce) == {
        "command": "produce",
        **where,
        **credentials,
        "log_level": "INFO",
        "timeout": 10.0,
        "message": "hi",
        "report": False,
        "whole": False,
        "binary": False,
    }
    for args in (consume, produce):
        assert _client_target(args) == ("ws://localhost:4000/", None, None)
    assert DEFAULT_TIMEOUT == 10.0


def test_options_are_parsed() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--host=127.0.0.1",
            "--port=0",
            "--log-level=debug",
            "--queue-size=8",
            "--overflow-policy=drop",
            "--slow-consumer-timeout=0",
            "--close-timeout=0.5",
        ]
    )
    assert (args.host, args.port, args.log_level) == ("127.0.0.1", 0, "DEBUG")
    assert (args.queue_size, args.overflow_policy) == (8, "drop")
    assert (args.slow_consumer_timeout, args.close_timeout) == (0.0, 0.5)


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["produce", "hi", "--timeout", "-1"], "argument --timeout: must not be negative: -1"),
        (["consume", "--timeout", "-0.5"], "argument --timeout: must not be negative: -0.5"),
        (
            ["serve", "--close-timeout", "-2"],
            "argument --close-timeout: must not be negative: -2",
        ),
        (["serve", "--queue-size", "0"], "argument --queue-size: must be at least 1: 0"),
        (["serve", "--overflow-policy", "wait"], "argument --overflow-policy: invalid choice"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_exit_2(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert error in capsys.readouterr().err


def test_python_m_trio_relay_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_relay", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: trio-relay [-h] [--version] COMMAND ...")
    for command in ("serve", "consume", "produce"):
        assert f"\n    {command} " in result.stdout, result.stdout
    assert result.stderr == ""


def test_settings_come_from_flags_then_environment_then_file_then_defaults(
    tmp_path: Path,
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        "[serve]\nmax_queue_bytes = 1000\nport = 5000\nallowed_origins = ['https://a', 'https://b']\n"
    )
    environ = {"TRIO_RELAY_PORT": "6000", "TRIO_RELAY_OVERFLOW_POLICY": "drop", "OTHER": "x"}
    settings = serve_settings(environ, str(config))
    assert settings == {
        "max_queue_bytes": 1000,
        "port": 6000,  # the environment beats the file
        "allowed_origins": ("https://a", "https://b"),
        "overflow_policy": "drop",
    }
    args = build_parser(settings).parse_args(["serve", "--port", "7000"])
    assert (args.port, args.max_queue_bytes, args.overflow_policy) == (7000, 1000, "drop")
    assert args.close_timeout == RelayConfig().close_timeout  # untouched: the default


def test_the_side_port_is_http_port_with_metrics_port_its_old_name(tmp_path: Path) -> None:
    parser = build_parser()
    assert parser.parse_args(["serve", "--http-port", "9100"]).http_port == 9100
    assert parser.parse_args(["serve", "--metrics-port", "9100"]).http_port == 9100
    # The last one given wins, as --workers relies on when it sets each worker's port.
    args = parser.parse_args(["serve", "--metrics-port", "9100", "--http-port", "9101"])
    assert args.http_port == 9101
    args = parser.parse_args(["serve", "--host", "0.0.0.0", "--http-host", "::1"])
    assert (args.host, args.http_host) == ("0.0.0.0", "::1")
    config = tmp_path / "relay.toml"
    config.write_text("metrics-port = 9100\nhttp_host = '0.0.0.0'\n")
    assert serve_settings({}, str(config)) == {"http_port": 9100, "http_host": "0.0.0.0"}
    config.write_text("http_port = 9101\nmetrics_port = 9100\n")  # the current name wins
    assert serve_settings({}, str(config)) == {"http_port": 9101}
    assert serve_settings({"TRIO_RELAY_METRICS_PORT": "9102"}, str(config)) == {"http_port": 9102}
    environ = {"TRIO_RELAY_HTTP_PORT": "9103", "TRIO_RELAY_METRICS_PORT": "9102"}
    assert serve_settings(environ, None) == {"http_port": 9103}
    assert serve_settings({"TRIO_RELAY_HTTP_HOST": "10.0.0.1"}, None) == {"http_host": "10.0.0.1"}
    args = build_parser(serve_settings({"TRIO_RELAY_METRICS_PORT": "9102"}, None)).parse_args(
        ["serve"]
    )
    assert args.http_port == 9102


def test_every_limit_of_serve_is_in_the_readmes_table_of_limits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # README "Running in production": "Every limit, its default, and what a client gets".
    # A setting added in one place and not the other is what this catches.
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    options = set(re.findall(r"(?<![\w-])--([a-z][a-z-]+)", capsys.readouterr().out))
    fields = {field.name for field in dataclasses.fields(RelayConfig)}
    settings = {o for o in options if o.replace("-", "_") in fields}
    not_limits = {"receive-buffer-size", "backplane"}  # documented in their own sections
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    start = readme.index("Every limit, its default, and what a client gets:")
    table = readme[start : readme.index("\n\n", readme.index("| option |", start))]
    assert {o for o in settings - not_limits if f"`--{o}`" not in table} == set()
    assert len(settings) > 25  # the help was read


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"TRIO_RELAY_MAX_QUEUE_BYTES": "0"},
            "environment variable TRIO_RELAY_MAX_QUEUE_BYTES: must be at least 1",
        ),
        ({"TRIO_RELAY_OVERFLOW_POLICY": "hope"}, "unknown policy"),
    ],
)
def test_bad_settings_are_refused_with_their_name(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        serve_settings(environ, None)


def test_an_unknown_key_in_the_settings_file_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("max_queue_byte = 1\n")
    with pytest.raises(ValueError, match=f"{config}: unknown setting 'max_queue_byte'"):
        serve_settings({}, str(config))


def test_workers_need_a_backplane(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--workers", "2"]) == 2
    assert "--workers 2 needs --backplane redis://" in capsys.readouterr().err


def test_a_backplane_that_is_not_a_redis_url_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--backplane", "http://example.com", "--port", "0"]) == 2
    assert "backplane must be a redis://" in capsys.readouterr().err


def test_workers_refuse_bad_settings_before_starting_any(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--workers", "2", "--backplane", "redis://x", "--auth-secret", "s"]) == 2
    assert "auth_secret must be at least 32 characters" in capsys.readouterr().err
    assert main(["serve", "--workers", "2", "--backplane", "redis://x", "--certfile", "/no"]) == 1
    assert capsys.readouterr().err == (
        "trio-relay serve: --certfile /no: [Errno 2] No such file or directory\n"
    )


def test_serve_fixes_the_allocators_mmap_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    from trio_relay import _cli

    tuned: list[bool] = []
    monkeypatch.setattr(_cli, "tune_allocator", lambda: tuned.append(True) or True)
    monkeypatch.setattr(_cli.trio, "run", lambda command, args: None)
    assert _cli.main(["serve", "--port", "0"]) == 0
    assert tuned == [True]


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's mallopt",
)
def test_the_allocator_takes_the_threshold_on_glibc() -> None:
    # In a process of its own: the test session keeps glibc's defaults.
    code = "from trio_relay._cli import tune_allocator; print(tune_allocator())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert result.stdout == b"True\n"


def test_serve_makes_full_garbage_collections_rare(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gc

    from trio_relay import _cli

    before = gc.get_threshold()
    ran: list[object] = []
    monkeypatch.setattr(_cli.trio, "run", lambda command, args: ran.append(command))
    try:
        assert _cli.main(["serve", "--port", "0"]) == 0
        assert ran == [_cli._serve]
        assert gc.get_threshold() == _cli.GC_THRESHOLDS
    finally:
        gc.set_threshold(*before)


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """main() configures logging for its process; put the test process's back after."""
    root = logging.getLogger()
    coredis = logging.getLogger("coredis")
    saved = (root.level, list(root.handlers), coredis.level)
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    coredis.setLevel(saved[2])


# ------------------------------------------------------------------------ issue 14, item 5


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--port", "70000"],
        ["serve", "--port", "-1"],
        ["serve", "--metrics-port", "65536"],
        ["consume", "--port", "70000"],
        ["produce", "--port", "-1", "hi"],
    ],
)
def test_a_port_out_of_range_is_refused_up_front(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    value = argv[argv.index(next(a for a in argv if a.endswith("port"))) + 1]
    assert f"must be a port number, 0 to 65535: {value}" in capsys.readouterr().err


def test_a_port_out_of_range_in_the_settings_names_its_variable() -> None:
    with pytest.raises(ValueError) as raised:
        serve_settings({"TRIO_RELAY_PORT": "70000"}, None)
    assert str(raised.value) == (
        "environment variable TRIO_RELAY_PORT: must be a port number, 0 to 65535: 70000"
    )


# ------------------------------------------------------------------------ issue 14, item 6


def test_an_http_port_in_use_is_one_line_naming_the_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["serve", "--host", "127.0.0.1", "--port", "0", "--http-port", str(port)]
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"trio-relay serve: --http-port: cannot listen on 127.0.0.1:{port}: "
        "[Errno 98] Address already in use"
    )
    assert "Traceback" not in err


def test_certificate_files_that_cannot_be_read_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--port", "0", "--certfile", "/nonexistent.pem"]) == 1
    assert capsys.readouterr().err == (
        "trio-relay serve: --certfile /nonexistent.pem: [Errno 2] No such file or directory\n"
    )
    garbage = tmp_path / "cert.pem"
    garbage.write_text("not a certificate\n")
    argv = ["serve", "--port", "0", "--certfile", str(garbage), "--keyfile", "/no/key.pem"]
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        "trio-relay serve: --keyfile /no/key.pem: [Errno 2] No such file or directory\n"
    )
    assert main(["serve", "--port", "0", "--certfile", str(garbage)]) == 1
    assert capsys.readouterr().err.startswith(
        f"trio-relay serve: cannot load the certificate and key from --certfile {garbage}: [SSL"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port = \n", "not valid TOML: Invalid value (at line 1, column 8)"),
        ("max_queue_bytes = 'lots'\n", "max_queue_bytes: not a number: 'lots'"),
        ("[serve]\nport = true\n", "port: not a valid value: true"),
        ("overflow_timeout = 'soon'\n", "overflow_timeout: not a number: 'soon'"),
    ],
)
def test_a_bad_settings_file_is_named_with_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(text)
    assert main(["serve", "--config", str(config)]) == 2
    assert capsys.readouterr().err == f"trio-relay serve: settings: {config}: {message}\n"


def test_a_missing_settings_file_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--config", "/no/relay.toml"]) == 2
    assert capsys.readouterr().err == (
        "trio-relay serve: settings: --config /no/relay.toml: [Errno 2] No such file or directory\n"
    )


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TRIO_RELAY_MAX_QUEUE_BYTES", "lots", "not a number: 'lots'"),
        ("TRIO_RELAY_OVERFLOW_TIMEOUT", "soon", "not a number: 'soon'"),
        ("TRIO_RELAY_PORT", "http", "not a port number: 'http'"),
    ],
)
def test_a_bad_environment_variable_is_named(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["serve"]) == 2
    assert capsys.readouterr().err == (
        f"trio-relay serve: settings: environment variable {variable}: {message}\n"
    )


# ------------------------------------------------------------------------ issue 14, item 14


def test_a_topic_may_be_given_with_its_leading_slash() -> None:
    parser = build_parser()
    assert parser.parse_args(["consume", "--topic", "/news"]).topic == "news"
    assert parser.parse_args(["produce", "--topic", "/news", "hi"]).topic == "news"
    assert parser.parse_args(["consume", "--topic", "news/a"]).topic == "news/a"
    assert parser.parse_args(["consume", "--topic", "/"]).topic == ""


# ------------------------------------------------------------------------ issue 14, item 15


def test_version_and_token_help() -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "TRIO_RELAY_AUTH_SECRET"}
        return subprocess.run(
            [sys.executable, "-m", "trio_relay", *argv],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**env, "COLUMNS": "200"},
        )

    version = run("--version")
    assert (version.returncode, version.stdout) == (0, f"trio-relay {trio_relay.__version__}\n")
    help_text = " ".join(run("token", "--help").stdout.split())
    assert "--publish PATTERN topic pattern it may publish to; repeat for more" in help_text
    assert "--subscribe PATTERN topic pattern it may subscribe to; repeat for more" in help_text
    assert "lifetime: 3600, 90s, 30m, 1h, 7d (default: 1h)" in help_text
    assert "(default: the TRIO_RELAY_AUTH_SECRET environment variable" in help_text
    missing = run("token", "--publish", "news")
    assert missing.returncode == 2
    assert missing.stderr == (
        "trio-relay token: no secret: give --secret or set TRIO_RELAY_AUTH_SECRET "
        "(the relay's --auth-secret)\n"
    )
    short = run("token", "--secret", "short", "--publish", "news")
    assert (
        short.stderr == "trio-relay token: the secret must be at least 32 characters (it has 5)\n"
    )


def test_the_token_help_example_mints_a_token_for_what_it_shows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Patterns match segment-wise since issue 11: the example's "everything" must be "**"
    # ("*" is one segment, and took nothing deeper when the example still said it).
    with pytest.raises(SystemExit):
        main(["token", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    example = re.search(r"e\.g\. (trio-relay token .*?--ttl \S+)", help_text)
    assert example is not None, help_text
    argv = shlex.split(example[1])
    secret = "s" * 32
    assert main([*argv[1:], "--secret", secret]) == 0
    grant = verify_token(secret, capsys.readouterr().out.strip())
    assert grant.may_publish("news/a") and not grant.may_publish("news/a/b")
    assert all(grant.may_subscribe(topic) for topic in ("", "news", "news/a/b", "x/y/z"))


# ------------------------------------------------------------------------ issue 14, item 4


async def test_a_reset_topic_reads_as_a_reset(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_relay() as relay:
        for text in ("a", "b", "c"):
            await relay.publish(text, "news")
        # A consumer that had seen up to 100 before the relay restarted.
        async with relay.consume("news", envelope=True, since=100) as items:
            gap = await anext(items)
    assert gap == Gap("news", 100, 1)
    assert gap.reset
    assert describe_gap(gap) == "topic /news was reset; numbering restarted at 1"
    lost = Gap("news", 2, 10)
    assert not lost.reset
    assert describe_gap(lost) == "messages 3 to 9 are no longer retained"
    assert describe_gap(Gap("news", 2, 4)) == "message 3 is no longer retained"


# ------------------------------------------------------------------------ issue 14, item 16


def test_coredis_lines_stay_out_of_the_commands_log(capsys: pytest.CaptureFixture[str]) -> None:
    logging.getLogger().handlers[:] = []  # as in a fresh process
    configure_logging("INFO")
    logging.getLogger("coredis").info("Connection closed unexpectedly!", exc_info=True)
    logging.getLogger("coredis").error("Connection attempt failed unexpectedly!")
    logging.getLogger("trio_relay").info("the relay's own line")
    err = capsys.readouterr().err
    assert "coredis" not in err
    assert err.endswith("INFO trio_relay: the relay's own line\n")
    logging.getLogger().handlers[:] = []
    configure_logging("DEBUG")  # for a closer look, they are there
    logging.getLogger("coredis").info("Connection closed unexpectedly!")
    assert "INFO coredis: Connection closed unexpectedly!" in capsys.readouterr().err


# ------------------------------------------------------------------------ as subprocesses


async def test_consume_resume_against_nothing_says_so_and_exits_130_on_ctrl_c(
    launch: Launch, refused_port: int
) -> None:
    # Items 2 and 3: nothing listens; the log says what happens, and Ctrl-C is a clean 130.
    url = f"ws://127.0.0.1:{refused_port}/"
    consumer = await launch(PYTHON, "-m", "trio_relay", "consume", *at(refused_port), "--resume")
    await consumer.expect("stderr", r"retrying in 0\.2 s\n")
    consumer.process.send_signal(signal.SIGINT)
    assert await consumer.finish() == 130, consumer.describe()
    lines = [line.split(" ", 2)[2] for line in consumer.lines("stderr")]  # without the time
    refused = f"cannot connect: all attempts to connect to 127.0.0.1:{refused_port} failed"
    assert lines[:4] == [
        f"INFO trio_relay.client: connecting to {url}",
        f"INFO trio_relay.client: connection lost ({refused}); retrying in 0.1 s",
        f"INFO trio_relay.client: connecting to {url}",
        f"INFO trio_relay.client: connection lost ({refused}); retrying in 0.2 s",
    ]
    assert not any("connected to" in line or "Traceback" in line for line in lines), lines
    assert consumer.output["stdout"] == ""


async def test_consume_prints_sequence_numbers_or_json_lines(
    launch: Launch, nursery: trio.Nursery
) -> None:
    # Item 13, and item 14 on the way: --topic /news.
    server = await nursery.start(partial(trio_relay.serve_relay, "127.0.0.1", 0))
    await server.publish("héllo", "news")
    await server.publish(b"\x00\xff", "news")
    await server.publish("third", "news")
    common = ("consume", *at(server.port), "--topic", "/news", "--since", "1")
    # --resume too: a connected resuming consumer exits 130 on Ctrl-C as well (item 2).
    shown = await launch(PYTHON, "-m", "trio_relay", *common, "--show-seq", "--resume")
    lines = await launch(PYTHON, "-m", "trio_relay", *common, "--json")
    await shown.expect("stdout", "third\n")
    await lines.expect("stdout", "third")
    epoch = server.topics.epoch
    assert shown.lines("stdout") == [
        f"/news #2 epoch={epoch}: <2 bytes> 00ff",
        f"/news #3 epoch={epoch}: third",
    ]
    assert [json.loads(line) for line in lines.lines("stdout")] == [
        {"type": "message", "topic": "news", "seq": 2, "epoch": epoch, "binary": "AP8="},
        {"type": "message", "topic": "news", "seq": 3, "epoch": epoch, "text": "third"},
    ]
    gap = await launch(PYTHON, "-m", "trio_relay", *common[:-1], "100", "--json")
    await gap.expect("stdout", "third")
    assert json.loads(gap.lines("stdout")[0]) == {
        "type": "gap",
        "topic": "news",
        "since": 100,
        "first": 1,
        "epoch": epoch,
        "reset": True,
    }
    await gap.expect(
        "stderr", "WARNING trio_relay: gap: topic /news was reset; numbering restarted at 1"
    )
    for program in (shown, lines, gap):
        program.process.send_signal(signal.SIGINT)
        assert await program.finish() == 130, program.describe()
    nursery.cancel_scope.cancel()


async def test_consume_resumes_with_the_epoch_it_printed(
    launch: Launch, nursery: trio.Nursery
) -> None:
    # Issue 12: what --show-seq printed, copied into --since and --epoch, resumes with no
    # gap and no duplicate; another epoch (another numbering) gets a reset, not numbers.
    server = await nursery.start(partial(trio_relay.serve_relay, "127.0.0.1", 0))
    for text in ("one", "two", "three"):
        await server.publish(text, "news")
    common = ("consume", *at(server.port), "--topic", "news", "--show-seq")
    first = await launch(PYTHON, "-m", "trio_relay", *common, "--since", "0")
    await first.expect("stdout", "three\n")
    printed = re.fullmatch(r"/news #(\d+) epoch=(\S+): two", first.lines("stdout")[1])
    assert printed is not None, first.describe()
    seq, epoch = printed.groups()
    assert (seq, epoch) == ("2", server.topics.epoch)
    right = await launch(PYTHON, "-m", "trio_relay", *common, "--since", seq, "--epoch", epoch)
    wrong = await launch(
        PYTHON, "-m", "trio_relay", *common, "--since", seq, "--epoch", "not-this-one"
    )
    await right.expect("stdout", "three\n")
    await wrong.expect("stdout", "three\n")
    await server.publish("four", "news")
    await right.expect("stdout", "four\n")
    await wrong.expect("stdout", "four\n")
    for program in (first, right, wrong):
        program.process.send_signal(signal.SIGINT)
        assert await program.finish() == 130, program.describe()
    assert right.lines("stdout") == [
        f"/news #{n} epoch={epoch}: {t}" for n, t in ((3, "three"), (4, "four"))
    ]
    assert "gap" not in right.output["stderr"], right.describe()
    # The reset comes first, then everything retained, renumbered by nobody.
    assert (
        "WARNING trio_relay: gap: topic /news was reset; numbering restarted at 1"
        in (wrong.output["stderr"])
    ), wrong.describe()
    assert [line.split(": ", 1)[1] for line in wrong.lines("stdout")] == [
        "one",
        "two",
        "three",
        "four",
    ]
    nursery.cancel_scope.cancel()


def test_consume_epoch_needs_since_and_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["consume", "--epoch", "9f3c2a10", "--port", "1"]) == 2
    assert capsys.readouterr().err == (
        "trio-relay consume: --epoch needs --since (the epoch names the numbering of "
        "--since's number)\n"
    )
    with pytest.raises(SystemExit) as info:
        main(["consume", "--since", "3", "--epoch", "not an epoch"])
    assert info.value.code == 2
    assert "argument --epoch: an epoch is 1 to 32 letters, digits, '_' or '-'" in (
        capsys.readouterr().err
    )
    args = build_parser().parse_args(["consume", "--since", "3", "--epoch", "9f3c2a10"])
    assert (args.since, args.epoch) == (3, "9f3c2a10")


async def _produce_from(port: int, stdin: bytes | int, *options: str) -> tuple[int, str, str]:
    with trio.fail_after(DEADLINE):
        result = await trio.run_process(
            [PYTHON, "-m", "trio_relay", "produce", *at(port), "--topic", "/news", *options],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_produce_reads_standard_input(nursery: trio.Nursery, tmp_path: Path) -> None:
    # Item 12: a 1.1 MB message did not fit on the command line.
    config = RelayConfig(max_message_size=2 * 1024 * 1024)
    server = await nursery.start(partial(trio_relay.serve_relay, "127.0.0.1", 0, config=config))
    url = f"ws://127.0.0.1:{server.port}/news"
    async with trio_relay.consume(url) as messages:
        await server.wait_until(lambda s: s.subscribers == 1)
        # From a pipe, one message per line (an empty line is an empty message), through one
        # connection.
        code, out, err = await _produce_from(server.port, b"one\r\ntwo\n\nthree")
        assert (code, err) == (0, "")
        assert out.splitlines() == [f"acknowledged: {t}" for t in ("one", "two", "", "three")]
        assert [await anext(messages) for _ in range(4)] == ["one", "two", "", "three"]
        assert server.statistics().broadcast.published == 4

        big = "x" * 550_000 + "\n" + "x" * 549_999  # 1.1 MB with its line break
        path = tmp_path / "big.txt"
        path.write_text(big)  # from a file, all of it as one message
        with path.open("rb") as file:
            code, out, err = await _produce_from(server.port, file.fileno(), "--whole")
        assert (code, err) == (0, "")
        assert out == f"acknowledged: {'x' * 80}... (1100000 characters)\n"
        assert await anext(messages) == big

        code, out, err = await _produce_from(server.port, b"\x00\xff", "-", "--whole", "--binary")
        assert (code, out, err) == (0, "acknowledged: <2 bytes> 00ff\n", "")
        assert await anext(messages) == b"\x00\xff"

        code, out, err = await _produce_from(server.port, b"fine\n\xff\n")
        assert (code, out) == (1, "acknowledged: fine\n")
        assert err == (
            "trio-relay produce: standard input line 2 is not UTF-8 text (--binary sends bytes)\n"
        )
        assert await anext(messages) == "fine"
    nursery.cancel_scope.cancel()


async def test_the_relays_log_has_its_own_lines_only_through_a_redis_outage(
    launch: Launch, redis_server: RedisServer
) -> None:
    # Item 16: coredis's own lines ("Connection closed unexpectedly!", "NoneType: None")
    # stay out, and the relay's "is back" is INFO: it is good news.
    server = await launch(
        PYTHON, "-m", "trio_relay", "serve", *at(0), "--backplane", redis_server.url
    )
    await server.expect("stderr", "backplane .* connected")
    redis_server.kill()
    await server.expect("stderr", "ERROR trio_relay: backplane .* unreachable")
    redis_server.start()
    back = await server.expect("stderr", r"(\w+) trio_relay: backplane \S+ is back")
    assert back[1] == "INFO"
    server.process.send_signal(signal.SIGTERM)
    assert await server.finish() == 0, server.describe()
    for line in server.lines("stderr"):
        assert re.fullmatch(r"[\d-]+ [\d:,]+ (INFO|WARNING|ERROR) trio_relay: .*", line), line


# ------------------------------------------------------------------------ issue 12: backplane


BACKPLANE_FLAGS = [
    *("--backplane-prefix", "p1", "--backplane-timeout", "0.5"),
    *("--backplane-log-size", "7", "--backplane-log-bytes", "1000"),
    *("--backplane-log-age", "30", "--backplane-topic-ttl", "3600"),
]
BACKPLANE_VALUES = {
    "backplane_prefix": "p1",
    "backplane_timeout": 0.5,
    "backplane_log_size": 7,
    "backplane_log_bytes": 1000,
    "backplane_log_age": 30.0,
    "backplane_topic_ttl": 3600.0,
}
BACKPLANE_OPTIONS = {
    "prefix": "p1",
    "timeout": 0.5,
    "log_size": 7,
    "log_bytes": 1000,
    "log_age": 30.0,
    "topic_ttl": 3600.0,
}


def test_backplane_settings_from_flags_environment_and_file(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--backplane", "redis://r", *BACKPLANE_FLAGS])
    assert {name: getattr(args, name) for name in BACKPLANE_VALUES} == BACKPLANE_VALUES
    environ = {f"TRIO_RELAY_{name.upper()}": str(value) for name, value in BACKPLANE_VALUES.items()}
    assert serve_settings(environ, None) == BACKPLANE_VALUES
    config = tmp_path / "relay.toml"
    config.write_text(
        "[serve]\nbackplane = 'redis://r'\nbackplane_prefix = 'p1'\nbackplane-timeout = 0.5\n"
        "backplane_log_size = 7\nbackplane_log_bytes = 1000\nbackplane_log_age = 30\n"
        "backplane_topic_ttl = 3600\n"
    )
    settings = serve_settings({}, str(config))
    assert settings == {"backplane": "redis://r", **BACKPLANE_VALUES}
    args = build_parser(settings).parse_args(["serve", "--backplane-log-size", "9"])
    assert (args.backplane_log_size, args.backplane_prefix) == (9, "p1")  # the flag wins
    config, _ = _server_settings(args)
    assert config.backplane_options() == {**BACKPLANE_OPTIONS, "log_size": 9}
    # Left out: nothing passed, so RedisBackplane's defaults hold.
    assert RelayConfig(backplane="redis://r").backplane_options() == {}


@pytest.mark.parametrize(
    ("flag", "value", "error"),
    [
        ("--backplane-prefix", "p{1}", "must not contain '{' or '}' (keys are hash-tagged"),
        ("--backplane-prefix", "", "must not be empty"),
        ("--backplane-timeout", "0", "must be a number of seconds > 0: 0"),
        ("--backplane-log-age", "nan", "must be a number of seconds > 0: nan"),
        ("--backplane-topic-ttl", "inf", "must be a number of seconds > 0: inf"),
        ("--backplane-topic-ttl", "-5", "must be a number of seconds > 0: -5"),
        ("--backplane-log-size", "0", "must be at least 1: 0"),
        ("--backplane-log-bytes", "lots", "invalid _positive_int value: 'lots'"),
    ],
)
def test_bad_backplane_flags_exit_2_naming_the_flag(
    flag: str, value: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--backplane", "redis://r", f"{flag}={value}"])
    assert info.value.code == 2
    assert f"argument {flag}: {error}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("backplane_prefix", "a}b", "must not contain '{' or '}'"),
        ("backplane_timeout", "0", "must be a number of seconds > 0: 0"),
        ("backplane_log_bytes", "0", "must be at least 1: 0"),
        ("backplane_topic_ttl", "soon", "not a number: 'soon'"),
    ],
)
def test_bad_backplane_settings_name_their_variable_or_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    error: str,
) -> None:
    variable = f"TRIO_RELAY_{name.upper()}"
    monkeypatch.setenv(variable, value)
    assert main(["serve", "--backplane", "redis://r"]) == 2
    line = capsys.readouterr().err
    assert line.startswith(f"trio-relay serve: settings: environment variable {variable}: {error}")
    assert line.count("\n") == 1
    monkeypatch.delenv(variable)
    config = tmp_path / "relay.toml"
    config.write_text(f"{name} = {json.dumps(value)}\n")
    assert main(["serve", "--backplane", "redis://r", "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith(
        f"trio-relay serve: settings: {config}: {name}: {error}"
    )


def test_backplane_settings_without_a_backplane_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TRIO_RELAY_BACKPLANE", raising=False)
    for flag, value in zip(BACKPLANE_FLAGS[::2], BACKPLANE_FLAGS[1::2], strict=True):
        assert main(["serve", "--port", "0", flag, value]) == 2
        assert capsys.readouterr().err == f"trio-relay serve: {flag} needs --backplane\n"
    assert main(["serve", "--workers", "2", "--backplane-log-size", "5"]) == 2
    assert capsys.readouterr().err == "trio-relay serve: --backplane-log-size needs --backplane\n"
    monkeypatch.setenv("TRIO_RELAY_BACKPLANE_TOPIC_TTL", "60")
    assert main(["serve", "--port", "0"]) == 2
    assert capsys.readouterr().err == (
        "trio-relay serve: environment variable TRIO_RELAY_BACKPLANE_TOPIC_TTL needs --backplane\n"
    )
    monkeypatch.delenv("TRIO_RELAY_BACKPLANE_TOPIC_TTL")
    config = tmp_path / "relay.toml"
    config.write_text("backplane_prefix = 'p1'\n")
    assert main(["serve", "--port", "0", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"trio-relay serve: {config}: backplane_prefix needs --backplane\n"
    )
    # The library refuses them too: they would be ignored.
    with pytest.raises(ValueError, match=r"^backplane_log_age needs backplane"):
        RelayConfig(backplane_log_age=60.0)
    with pytest.raises(ValueError, match=r"^backplane_prefix must not contain"):
        RelayConfig(backplane="redis://r", backplane_prefix="{x}")
    with pytest.raises(ValueError, match=r"^backplane_timeout must be a number of seconds > 0"):
        RelayConfig(backplane="redis://r", backplane_timeout=0.0)
    with pytest.raises(ValueError, match=r"^backplane_log_size must be at least 1"):
        RelayConfig(backplane="redis://r", backplane_log_size=0)


def test_the_backplane_flags_defaults_are_the_backplanes(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What --help says a flag left out means is what RedisBackplane then does.
    monkeypatch.setenv("COLUMNS", "500")  # argparse wraps at hyphens: trio-relay
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split("options:")[1].split())
    parameters = inspect.signature(RedisBackplane).parameters
    for name in ("prefix", "timeout", "topic_ttl"):
        option = f"--backplane-{name.replace('_', '-')}"
        shown = re.search(rf"{option} \S+ [^(]*\(default: ([^)]*)\)", help_text)
        assert shown is not None, help_text
        assert shown[1] == str(parameters[name].default)
    for name in ("size", "bytes", "age"):
        assert f"(default: the relay's --history-{name})" in help_text
    assert "hash-tagged by topic for Redis Cluster" in help_text


async def test_serve_relay_builds_its_backplane_with_the_settings(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    config = RelayConfig(backplane=redis_server.url, **BACKPLANE_VALUES)  # type: ignore[arg-type]
    server = await nursery.start(partial(trio_relay.serve_relay, "127.0.0.1", 0, config=config))
    backplane = server.backplane
    assert {name: getattr(backplane, name) for name in BACKPLANE_OPTIONS} == BACKPLANE_OPTIONS
    plain = await nursery.start(
        partial(
            trio_relay.serve_relay, "127.0.0.1", 0, config=RelayConfig(backplane=redis_server.url)
        )
    )
    default = RedisBackplane(redis_server.url)
    for name in BACKPLANE_OPTIONS:
        assert getattr(plain.backplane, name) == getattr(default, name), name
    nursery.cancel_scope.cancel()


async def test_serve_workers_keep_their_redis_keys_under_backplane_prefix(
    launch: Launch, redis_server: RedisServer
) -> None:
    import coredis

    supervisor = await launch(
        PYTHON,
        *("-m", "trio_relay", "serve", *at(0), "--workers", "2", "--http-port", "0"),
        *("--backplane", redis_server.url, "--backplane-prefix", "p1"),
        *("--backplane-log-size", "2", "--backplane-topic-ttl", "50", "--ping-interval", "0"),
    )
    port = int((await supervisor.expect("stderr", r"supervising 2 workers on port (\d+)"))[1])
    http_line = r"HTTP port of all 2 workers on http://127\.0\.0\.1:(\d+)/"
    http = int((await supervisor.expect("stderr", http_line))[1])
    await supervisor.expect("stderr", r"worker \d: backplane \S+ connected", 2)
    # Publish on new connections until each worker has published through Redis (the
    # kernel picks the worker): both then wrote under the prefix they were given.
    url = f"ws://127.0.0.1:{port}/news"
    published = 0
    with trio.fail_after(DEADLINE):
        while True:
            report = await trio_relay.produce(url, f"m{published}", envelope=True)
            published += 1
            assert report is not None and report.remote is True
            samples = await scrape(http)
            name = "trio_relay_backplane_batches_published_total"
            if published >= 5 and all(samples.get((name, (("worker", w),)), 0) for w in "01"):
                break
    client = coredis.Redis.from_url(redis_server.url, decode_responses=True)
    async with client:
        keys = sorted(await client.keys("*"))
        ttls = [await client.ttl(key) for key in keys]
        logs = [key for key in keys if await client.type(key) == "stream"]
        lengths = [await client.xlen(key) for key in logs]
    assert keys and all(key.startswith("p1") for key in keys), keys
    assert any(0 < ttl <= 50 for ttl in ttls), dict(zip(keys, ttls, strict=True))
    assert lengths and max(lengths) <= 2 < published, (logs, lengths, published)
    supervisor.process.send_signal(signal.SIGTERM)
    assert await supervisor.finish() == 0, supervisor.describe()


def test_ctrl_c_inside_a_nursery_beside_another_failure_is_still_ctrl_c() -> None:
    # Seen in CI: SIGINT reached `consume` inside trio-websocket's reader task while the
    # connection's other task failed; the group of both made the command exit 1, not 130.
    async def interrupted(_args: argparse.Namespace) -> None:
        async def fails() -> None:
            raise ConnectionError("the connection went")

        async def interrupted_task() -> None:
            raise KeyboardInterrupt

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fails)
            nursery.start_soon(interrupted_task)

    with pytest.raises(KeyboardInterrupt):
        _run(interrupted, argparse.Namespace())
