"""Clients that carry credentials: ``token=``, ``headers=`` and ``ssl_context=`` of
``produce``, ``open_producer`` and ``consume``, and no token in any error or log line.

In-memory relays under the autojump clock, except where a socket is the point (TLS, a
refused port). Every failure path checks the whole of what a user could see: the error's
message, its repr, its formatted traceback with every cause, and every log line of the
client and the relay at DEBUG.
"""

from __future__ import annotations

import logging
import signal
import socket
import ssl
import traceback
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from test_end_to_end import (
    DEADLINE,
    ENV,
    PYTHON,
    Launch,
    launch as launch,  # the fixture: it starts and kills programs
)
from tls_support import (  # the fixtures, used by name
    ca as ca,
    client_context as client_context,
    server_context as server_context,
)

from trio_relay import (
    ClientError,
    ConsumerState,
    HandshakeRejected,
    Message,
    PublishRejected,
    RelayConfig,
    RelayUnavailable,
    connect,
    consume,
    mint_token,
    open_producer,
    produce,
    serve_relay,
)
from trio_relay._cli import main
from trio_relay._redact import redact
from trio_relay.testing import MemoryListener, open_memory_relay, socket_like_stream_pair

SECRET = "s3cret-of-the-relay-at-least-32-characters"
CONFIG = RelayConfig(auth_secret=SECRET, allowed_origins=("https://*.example.com",))
WRITER = mint_token(SECRET, publish=["news"], subscribe=["news"])
READER = mint_token(SECRET, subscribe=["news"])
SPORT = mint_token(SECRET, publish=["sport"], subscribe=["sport"])
FORGED = mint_token("not-the-relays-secret-but-32-characters-long", publish=["**"])
ORIGIN = {"Origin": "https://app.example.com"}


@pytest.fixture(autouse=True)
def _every_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # the client's and the relay's lines, all of them


def assert_hidden(token: str, error: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    """Neither ``token`` nor its signature (its secret part) shows anywhere."""
    shown = [
        str(error),
        repr(error),
        "".join(traceback.format_exception(error)),  # with every __cause__ and __context__
        str(getattr(error, "url", "")),
        caplog.text,
    ]
    for text in shown:
        assert token not in text
        assert token.rsplit(".", 1)[-1] not in text
    # Redacted once and for all: what the command line redacts again comes out the same
    # ("?token=<redacted>: ..." keeps its colon; "Bearer <token>" in a reason stays).
    assert redact(str(error)) == str(error)


# ------------------------------------------------------------------------ token=


async def test_produce_and_consume_with_a_token(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_relay(CONFIG) as relay:
        url = relay.url + "news"
        async with consume(
            url, stream=await relay.open_stream(), envelope=True, token=READER, headers=ORIGIN
        ) as messages:
            report = await produce(
                url, "hello", stream=await relay.open_stream(), envelope=True, token=WRITER
            )
            assert report is not None
            assert report.queued == 2  # the reader, and the writer's own echo
            assert await anext(messages) == Message("news", 1, "hello")
            async with open_producer(
                url, stream=await relay.open_stream(), token=WRITER
            ) as producer:
                await producer.produce("raw, with a token")
            assert (await anext(messages)).data == "raw, with a token"


async def test_without_a_token_the_relay_says_401_in_one_clear_line(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_memory_relay(CONFIG) as relay:
        with pytest.raises(HandshakeRejected) as raised:
            await produce(relay.url + "news", "x", stream=await relay.open_stream())
    assert raised.value.status_code == 401
    assert str(raised.value) == (
        "ws://relay.test/news: handshake rejected with HTTP 401: a token is required: "
        "Authorization: Bearer <token>, or ?token="
    )
    assert_hidden(WRITER, raised.value, caplog)


@pytest.mark.parametrize(
    ("token", "status", "reason"),
    [
        (FORGED, 401, "invalid token: Signature verification failed"),
        (SPORT, 403, "the token does not allow topic 'news'"),
    ],
    ids=["bad-token", "forbidden-topic"],
)
async def test_a_refused_token_is_named_never_shown(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    token: str,
    status: int,
    reason: str,
) -> None:
    async with open_memory_relay(CONFIG) as relay:
        for url in (relay.url + "news", f"{relay.url}news?token={token}"):
            as_header = "?" not in url
            with pytest.raises(HandshakeRejected) as raised:
                await produce(
                    url, "x", stream=await relay.open_stream(), token=token if as_header else None
                )
            assert raised.value.status_code == status
            shown_url = relay.url + ("news" if as_header else "news?token=<redacted>")
            assert (
                str(raised.value) == f"{shown_url}: handshake rejected with HTTP {status}: {reason}"
            )
            assert raised.value.url == shown_url
            assert_hidden(token, raised.value, caplog)
        # A consumer, resuming or not, stops at once on a refusal: retrying would not heal.
        for resume in (False, True):
            with pytest.raises(HandshakeRejected) as raised:
                async with consume(
                    relay.url + "news",
                    token=token,
                    resume=resume,
                    **(
                        {"connector": relay.open_stream}
                        if resume
                        else {"stream": await relay.open_stream()}
                    ),
                ) as messages:
                    await anext(messages)
            assert raised.value.status_code == status
            assert_hidden(token, raised.value, caplog)


async def test_a_publish_the_token_forbids_is_rejected_without_showing_it(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_memory_relay(CONFIG) as relay:
        with pytest.raises(PublishRejected) as raised:
            await produce(
                relay.url + "news",
                "x",
                stream=await relay.open_stream(),
                envelope=True,
                token=READER,
            )
        assert raised.value.code == "forbidden"
        assert "does not allow publishing to topic 'news'" in str(raised.value)
        assert_hidden(READER, raised.value, caplog)


async def test_the_token_goes_in_a_header_never_in_the_url(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = socket_like_stream_pair()
    request = b""

    async def read_the_request() -> None:
        nonlocal request
        while b"\r\n\r\n" not in request:
            request += await server.receive_some()
        await server.send_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_the_request)
        with pytest.raises(HandshakeRejected):
            await produce(
                "ws://relay.test/news?since=3",
                "x",
                stream=client,
                token=WRITER,
                headers=[("X-Request-Id", "42"), ("X-Tag", "a"), ("X-Tag", "b")],
            )
    request_line, *lines = request.decode("latin-1").split("\r\n")
    assert request_line == "GET /news?since=3 HTTP/1.1"
    assert f"Authorization: Bearer {WRITER}" in lines
    assert {"X-Request-Id: 42", "X-Tag: a", "X-Tag: b"} <= set(lines)


async def test_a_token_already_in_the_url_keeps_working(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(CONFIG) as relay:
        url = f"{relay.url}news?token={WRITER}"
        async with consume(url, stream=await relay.open_stream(), since=0) as messages:
            await produce(url, "by the query", stream=await relay.open_stream())
            assert await anext(messages) == "by the query"


async def test_an_opaque_token_a_server_quotes_back_is_cut_out(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # redact() knows the shapes of JWTs; a session id of the application's it cannot know,
    # so the client cuts out the token it was given.
    opaque = "sid-4f1c9a7be2d04c51"
    client, server = socket_like_stream_pair()

    async def echo_it_back() -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await server.receive_some()
        body = f"unknown session {opaque}".encode()
        await server.send_all(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo_it_back)
        with pytest.raises(HandshakeRejected) as raised:
            await produce("ws://app.test/", "x", stream=client, token=opaque)
    assert str(raised.value) == (
        "ws://app.test/: handshake rejected with HTTP 401: unknown session <redacted>"
    )
    assert_hidden(opaque, raised.value, caplog)


async def test_a_resuming_consumer_sends_its_token_on_every_reconnection(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    states: list[ConsumerState] = []
    async with (
        open_memory_relay(CONFIG) as relay,
        consume(
            f"{relay.url}news?token={WRITER}&x=1",  # the URL's token is never shown either
            token=READER,  # the relay takes the header's
            resume=True,
            connector=relay.open_stream,
            on_state=states.append,
        ) as messages,
    ):
        await relay.server.wait_until(lambda s: s.subscribers == 1)
        await relay.publish("one", "news")
        assert (await anext(messages)).data == "one"
        assert await relay.drop_connections() == 1
        await relay.server.wait_until(lambda s: s.subscribers == 1)
        await relay.publish("two", "news")
        assert (await anext(messages)).data == "two"
    assert [state.state for state in states] == [
        "connecting",
        "connected",
        "retrying",
        "connecting",
        "connected",
    ]
    assert {state.url for state in states} == {"ws://relay.test/news?token=<redacted>&x=1"}
    for token in (WRITER, READER):
        assert token not in caplog.text


# ------------------------------------------------------------------------ headers=


async def test_headers_arrive_at_the_relay(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The relay's origin allow-list reads the Origin header the client sends.
    async with open_memory_relay(CONFIG) as relay:
        url = relay.url + "news"
        report = await produce(
            url, "x", stream=await relay.open_stream(), envelope=True, token=WRITER, headers=ORIGIN
        )
        assert report is not None
        with pytest.raises(HandshakeRejected) as raised:
            await produce(
                url,
                "x",
                stream=await relay.open_stream(),
                token=WRITER,
                headers={"Origin": "https://evil.test"},
            )
        assert raised.value.status_code == 403
        assert "origin" in str(raised.value).lower()
        assert_hidden(WRITER, raised.value, caplog)


async def test_a_sessions_token_and_headers_arrive_at_the_relay(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # connect() (trio-relay.v2) carries them as produce and consume do.
    async with open_memory_relay(CONFIG) as relay:
        url = relay.url + "news"
        async with connect(url, token=WRITER, headers=ORIGIN, connector=relay.open_stream) as s:
            report = await s.publish("news", "x")
            assert report.seq == 1
        for token, headers, status in (
            (WRITER, {"Origin": "https://evil.test"}, 403),
            (None, ORIGIN, 401),
        ):
            with pytest.raises(HandshakeRejected) as raised:
                async with connect(url, token=token, headers=headers, connector=relay.open_stream):
                    pass  # pragma: no cover
            assert raised.value.status_code == status
            assert_hidden(WRITER, raised.value, caplog)


@pytest.mark.parametrize(
    ("token", "headers", "message"),
    [
        ("", None, r"token= must be printable ASCII without spaces \(got 0 characters\)"),
        ("two words", None, r"token= must be printable ASCII without spaces \(got 9 char"),
        ("line\r\nX-Evil: 1", None, r"token= must be printable ASCII without spaces \(got 15"),
        (WRITER, {"Authorization": "Bearer x"}, r"give token= or an Authorization header"),
        (None, {"Host": "elsewhere"}, r"headers=: Host is written by the WebSocket handshake"),
        (None, {"Sec-WebSocket-Protocol": "x"}, r"headers=: Sec-WebSocket-Protocol is written"),
        (None, {"X-Key": "a\r\nX-Evil: 1"}, r"headers=: the value of X-Key must be one line"),
        (None, {"X-Key": "caf\u00e9 \u2603"}, r"headers=: the value of X-Key has a character"),
        (None, {"bad name": "x"}, r"headers=: not a header name: bad name"),
    ],
)
async def test_a_bad_token_or_header_is_refused_before_connecting(
    token: str | None, headers: dict[str, str] | None, message: str
) -> None:
    listener = MemoryListener()  # nothing may reach it
    for call in (
        partial(produce, "ws://relay.test/", "x"),
        partial(consume, "ws://relay.test/"),
        partial(consume, "ws://relay.test/", resume=True),
    ):
        with pytest.raises(ValueError, match=message) as raised:
            result = call(stream=await listener.connect(), token=token, headers=headers)
            if hasattr(result, "__aenter__"):
                async with result:
                    pass  # pragma: no cover
            else:
                await result
        if token:
            assert token not in str(raised.value)
        if headers:
            assert all(value not in str(raised.value) for value in headers.values())

    async def connector() -> trio.abc.Stream:
        raise AssertionError("connect() connected with a bad token or header")

    with pytest.raises(ValueError, match=message) as raised:
        async with connect("ws://relay.test/", token=token, headers=headers, connector=connector):
            pass  # pragma: no cover
    if token:
        assert token not in str(raised.value)


# ------------------------------------------------------------------------ ssl_context=, sockets


async def test_a_token_over_wss(
    nursery: trio.Nursery,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await nursery.start(
        partial(serve_relay, "127.0.0.1", 0, ssl_context=server_context, config=CONFIG)
    )
    url = f"wss://127.0.0.1:{server.port}/news"
    with trio.fail_after(10):
        async with consume(
            url, resume=True, token=READER, ssl_context=client_context, headers=ORIGIN
        ) as messages:
            await server.wait_until(lambda s: s.subscribers == 1)
            report = await produce(
                url, "over TLS", envelope=True, token=WRITER, ssl_context=client_context
            )
            assert report is not None and report.queued == 2
            assert (await anext(messages)).data == "over TLS"
        # A client that does not trust the certificate: the TLS failure, with the URL's
        # token redacted.
        with pytest.raises(RelayUnavailable, match="TLS handshake failed") as raised:
            await produce(f"{url}?token={WRITER}", "x")
        assert str(raised.value).startswith(f"{url}?token=<redacted>: TLS handshake failed")
        assert_hidden(WRITER, raised.value, caplog)
        with pytest.raises(RelayUnavailable, match="TLS handshake failed") as raised:
            await produce(url, "x", token=WRITER)
        assert_hidden(WRITER, raised.value, caplog)
    nursery.cancel_scope.cancel()


@pytest.fixture
def refused_port() -> Iterator[int]:
    with socket.socket() as sock:  # bound, not listening: connecting is refused
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_a_wrong_port_is_named_without_the_token(
    refused_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"ws://127.0.0.1:{refused_port}/news"
    with trio.fail_after(10):
        for call in (
            partial(produce, f"{url}?token={WRITER}", "x"),
            partial(produce, url, "x", token=WRITER),
        ):
            with pytest.raises(RelayUnavailable) as raised:
                await call()
            assert "cannot connect" in str(raised.value)
            assert isinstance(raised.value, ClientError)
            assert_hidden(WRITER, raised.value, caplog)


# ------------------------------------------------------------------------ the command line


@pytest.fixture
def _logging_restored() -> Iterator[None]:
    """main() configures logging for its process; put the test process's back after."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("coredis").level)
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    logging.getLogger("coredis").setLevel(saved[2])


@pytest.mark.usefixtures("_logging_restored")
@pytest.mark.parametrize(
    ("argv", "environ", "status", "error"),
    [
        (
            ["produce", "--url", "ws://127.0.0.1:1/news", "--host", "h", "--topic", "t", "hi"],
            {},
            2,
            "give --url or --host/--topic, not both (the URL names the host, port and topic)",
        ),
        (
            ["consume", "--url", "ws://127.0.0.1:1/", "--port", "4000"],
            {},
            2,
            "give --url or --port, not both (the URL names the host, port and topic)",
        ),
        (
            ["consume", "--url", f"http://127.0.0.1:1/news?token={WRITER}"],
            {},
            2,
            "--url http://127.0.0.1:1/news?token=<redacted>: not a ws:// or wss:// URL",
        ),
        (
            ["consume", "--url", "ws://127.0.0.1:99999/"],
            {},
            2,
            "--url ws://127.0.0.1:99999/: Port out of range 0-65535",
        ),
        (
            ["consume", "--url", "ws://127.0.0.1:1/", "--cafile", "ca.pem"],
            {},
            2,
            "--cafile is for TLS: give --url wss://...",
        ),
        (
            ["consume", "--url", "wss://127.0.0.1:1/", "--cafile", "/no/ca.pem"],
            {},
            1,
            "--cafile /no/ca.pem: [Errno 2] No such file or directory",
        ),
        (
            ["produce", "--port", "1", "--token", f"{WRITER} x", "hi"],
            {},
            2,
            "--token: a token is printable ASCII without spaces",
        ),
        (
            ["produce", "--port", "1", "hi"],
            {"TRIO_RELAY_TOKEN": f"{WRITER}\u00e9"},
            2,
            "TRIO_RELAY_TOKEN: a token is printable ASCII without spaces",
        ),
    ],
)
def test_the_command_refuses_a_bad_url_cafile_or_token_in_one_line(
    argv: list[str],
    environ: dict[str, str],
    status: int,
    error: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRIO_RELAY_TOKEN", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == status
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"trio-relay {argv[0]}: {error}\n")


def test_the_help_prefers_the_environment_for_the_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    for command in ("consume", "produce"):
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        assert exited.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert (
            "--token TOKEN access token, sent as Authorization: Bearer (default: the "
            "TRIO_RELAY_TOKEN environment variable; prefer it: a command line is visible to "
            "other users of this machine)"
        ) in text
        assert "--url URL the relay and topic as one URL, ws://HOST:PORT/TOPIC" in text
        assert "instead of --host/--port/--topic" in text
        assert "--cafile PEM CA certificates to trust for a wss:// --url besides" in text


def test_cafile_that_is_not_pem_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], _logging_restored: None
) -> None:
    path = tmp_path / "ca.pem"
    path.write_text("not a certificate\n")
    assert main(["consume", "--url", "wss://127.0.0.1:1/", "--cafile", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"trio-relay consume: --cafile {path}: no PEM certificates: ")
    assert err.count("\n") == 1


def _cli_env(token: str | None) -> dict[str, str]:
    env = {name: value for name, value in ENV.items() if name != "TRIO_RELAY_TOKEN"}
    if token is not None:
        env["TRIO_RELAY_TOKEN"] = token
    return env


async def _cli(*argv: str, token: str | None = None) -> tuple[int, str, str]:
    """Run ``trio-relay ARGV`` (at DEBUG), with ``TRIO_RELAY_TOKEN`` set to ``token``."""
    with trio.fail_after(DEADLINE):
        result = await trio.run_process(
            [PYTHON, "-m", "trio_relay", *argv, "--log-level", "DEBUG"],
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=_cli_env(token),
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_produce_and_consume_take_a_token_and_a_url(
    nursery: trio.Nursery, refused_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    server = await nursery.start(partial(serve_relay, "127.0.0.1", 0, config=CONFIG))
    url = f"ws://127.0.0.1:{server.port}/news"
    at = ("--host", "127.0.0.1", "--port", str(server.port), "--topic", "news")
    runs = {
        "env": (("produce", "--url", url, "--report", "by env"), WRITER),
        "flag": (("produce", "--url", url, "--token", WRITER, "by flag"), None),
        "host-port": (("produce", *at, "by host and port"), WRITER),
        "flag-wins": (("produce", "--url", url, "--token", WRITER, "flag wins"), FORGED),
        "none": (("produce", "--url", url, "x"), None),
        "bad": (("produce", "--url", url, "x"), FORGED),
        "forbidden": (("produce", "--url", url, "x"), SPORT),
        "in-url": (("produce", "--url", f"{url}?token={FORGED}", "x"), None),
        "resume": (("consume", "--url", url, "--resume"), FORGED),
        "wrong-port": (("produce", "--port", str(refused_port), "x"), WRITER),
    }
    results: dict[str, tuple[int, str, str]] = {}

    async def run(name: str) -> None:
        argv, token = runs[name]
        results[name] = await _cli(*argv, token=token)

    await run("env")  # alone, for an exact delivery report
    async with trio.open_nursery() as each:  # the rest at once: each starts an interpreter
        for name in runs:
            if name != "env":
                each.start_soon(run, name)

    def ok(name: str) -> str:
        code, out, err = results[name]
        assert code == 0, (name, out, err)
        return out

    assert ok("env") == "acknowledged: seq=1 queued=1 dropped=0 evicted=0\n"
    assert {ok(name) for name in ("flag", "host-port", "flag-wins")} == {
        "acknowledged: by flag\n",
        "acknowledged: by host and port\n",
        "acknowledged: flag wins\n",
    }
    refused = f"trio-relay produce: {url}: handshake rejected with HTTP"
    expected_last_line = {
        "none": f"{refused} 401: a token is required: Authorization: Bearer <token>, or ?token=",
        "bad": f"{refused} 401: invalid token: Signature verification failed",
        "forbidden": f"{refused} 403: the token does not allow topic 'news'",
        "in-url": (
            f"trio-relay produce: {url}?token=<redacted>: handshake rejected with HTTP 401: "
            "invalid token: Signature verification failed"
        ),
        "resume": (
            f"trio-relay consume: {url}: handshake rejected with HTTP 401: invalid token: "
            "Signature verification failed"
        ),
        "wrong-port": (
            f"trio-relay produce: ws://localhost:{refused_port}/: cannot connect: "
            f"all attempts to connect to localhost:{refused_port} failed"
        ),
    }
    for name, line in expected_last_line.items():
        code, out, err = results[name]
        assert (code, out) == (1, ""), (name, err)
        assert err.splitlines()[-1] == line, name
        assert "Traceback" not in err
    for _code, out, err in results.values():
        for token in (WRITER, READER, SPORT, FORGED):
            assert token.rsplit(".", 1)[-1] not in out + err
    for token in (WRITER, READER, SPORT, FORGED):
        assert token.rsplit(".", 1)[-1] not in caplog.text  # the relay's own lines
    nursery.cancel_scope.cancel()


async def test_consume_over_wss_with_a_private_ca(
    nursery: trio.Nursery,
    launch: Launch,
    ca: trustme.CA,
    server_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    server = await nursery.start(
        partial(serve_relay, "127.0.0.1", 0, ssl_context=server_context, config=CONFIG)
    )
    url = f"wss://127.0.0.1:{server.port}/news"
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    consumer = await launch(
        PYTHON, "-m", "trio_relay", "consume", "--url", url, "--cafile", cafile, "--token", READER
    )
    untrusted = await _cli("produce", "--url", url, "x", token=WRITER)  # no --cafile
    with trio.fail_after(DEADLINE):
        await server.wait_until(lambda s: s.subscribers == 1)
    await server.publish("over TLS", "news")
    await consumer.expect("stdout", "over TLS\n")
    consumer.process.send_signal(signal.SIGINT)
    assert await consumer.finish() == 130, consumer.describe()
    code, out, err = untrusted
    assert (code, out) == (1, "")
    assert err.splitlines()[-1].startswith(
        f"trio-relay produce: {url}: TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED]"
    )
    assert WRITER.rsplit(".", 1)[-1] not in err
    assert READER.rsplit(".", 1)[-1] not in consumer.output["stderr"]
    nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------ the README

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


async def test_the_readmes_credentials_example_runs_as_written(
    nursery: trio.Nursery,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    capsys: pytest.CaptureFixture[str],
) -> None:
    start = README.index("```python\n", README.index("The Python clients carry credentials"))
    example = README[start + len("```python\n") : README.index("```\n", start + 1)]
    server = await nursery.start(
        partial(serve_relay, "127.0.0.1", 0, ssl_context=server_context, config=CONFIG)
    )
    namespace = {
        "trio_relay": __import__("trio_relay"),
        "url": f"wss://127.0.0.1:{server.port}/news",
        "secret": SECRET,
        "context": client_context,
    }
    body = "".join(f"    {line}\n" for line in example.splitlines())
    exec(f"async def example():\n{body}", namespace)  # the README's own code
    with trio.fail_after(10):
        await namespace["example"]()  # type: ignore[operator]
    printed = example.rsplit("# ", 1)[1]
    assert capsys.readouterr().out == printed
    nursery.cancel_scope.cancel()


async def test_the_testing_kit_carries_a_token_too(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_relay(CONFIG) as relay:
        async with relay.consume("news", envelope=True, token=READER, headers=ORIGIN) as items:
            report = await relay.produce("kit", "news", envelope=True, token=WRITER)
            assert report is not None
            assert report.seq == 1
            assert await anext(items) == Message("news", 1, "kit")
        async with relay.consume("news", resume=True, token=READER) as items:
            await relay.server.wait_until(lambda s: s.subscribers == 1)
            await relay.produce("resumed", "news", token=WRITER)
            assert (await anext(items)).data == "resumed"
        with pytest.raises(HandshakeRejected) as raised:
            await relay.produce("no token", "news")
        assert raised.value.status_code == 401
