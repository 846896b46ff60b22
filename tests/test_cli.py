"""The ``trio-relay`` argument parser: documented defaults, rejected values, ``--help``."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from trio_relay import DEFAULT_TIMEOUT, RelayConfig
from trio_relay._cli import build_parser, main, serve_settings


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
        "publish_rate": 0.0,
        "publish_burst": 1000,
        "auth_secret": None,
        "allowed_origins": (),
        "history_size": 1000,
        "history_bytes": 1024 * 1024,
        "history_age": 600.0,
        "history_total_bytes": 64 * 1024 * 1024,
        "max_topics": 10_000,
        "backplane": None,
        "workers": 1,
        "worker": False,
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


def test_client_defaults() -> None:
    parser = build_parser()
    consume = parser.parse_args(["consume"])
    produce = parser.parse_args(["produce", "hi"])
    assert vars(consume) == {
        "command": "consume",
        "host": "localhost",
        "port": 4000,
        "log_level": "INFO",
        "timeout": 10.0,
        "topic": "",
        "since": None,
        "resume": False,
    }
    assert vars(produce) == {
        "command": "produce",
        "host": "localhost",
        "port": 4000,
        "log_level": "INFO",
        "timeout": 10.0,
        "topic": "",
        "message": "hi",
        "report": False,
    }
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
        (["produce"], "the following arguments are required: message"),
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
    assert result.stdout.startswith("usage: trio-relay [-h] COMMAND ...")
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


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TRIO_RELAY_MAX_QUEUE_BYTES": "0"}, "max_queue_bytes: must be at least 1"),
        ({"TRIO_RELAY_OVERFLOW_POLICY": "hope"}, "unknown policy"),
    ],
)
def test_bad_settings_are_refused_with_their_name(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        serve_settings(environ, None)


def test_an_unknown_key_in_the_settings_file_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("max_queue_byte = 1\n")
    with pytest.raises(ValueError, match="unknown setting 'max_queue_byte'"):
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
    assert "No such file" in capsys.readouterr().err


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
