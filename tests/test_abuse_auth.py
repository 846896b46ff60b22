"""Issue 11, tried as an attacker would: tokens, topic names and the logs.

Each test is one row of the issue's table at a scale CI affords, with a bystander client
that keeps receiving throughout. In-memory relays under the autojump clock; no sleeps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import jwt
import pytest
import trio
import trio.testing
from helpers import (
    HOST,
    RawClient,
    http_request,
    masked_frame,
    rejected,
    upgrade_request,
    wall_clock,
)
from redis_support import RedisServer, free_port, redis_server
from wsproto.events import AcceptConnection, Request

from trio_relay import SUBPROTOCOL, RelayConfig, serve_metrics, serve_relay
from trio_relay._auth import mint_token
from trio_relay.testing import MemoryRelay, open_memory_relay

__all__ = ["redis_server", "wall_clock"]  # the fixtures, used by name

SECRET = "a-secret-of-at-least-thirty-two-characters"
CONFIG = RelayConfig(auth_secret=SECRET)
EVERYTHING = mint_token(SECRET, publish=["**"], subscribe=["**"])


async def connect(
    relay: MemoryRelay, path: str, token: str, *, envelope: bool = False
) -> RawClient:
    """A client of ``path`` presenting ``token`` in the Authorization header."""
    client = RawClient(await relay.open_stream())
    await client.send(
        Request(
            host=HOST,
            target=path,
            extra_headers=[(b"Authorization", f"Bearer {token}".encode())],
            subprotocols=[SUBPROTOCOL] if envelope else [],
        )
    )
    event = await client.next_event()
    assert isinstance(event, AcceptConnection), event
    return client


@asynccontextmanager
async def bystanding(config: RelayConfig = CONFIG) -> AsyncIterator[MemoryRelay]:
    """A relay with a bystander on topic ``watch``; on exit, it must still receive."""
    async with open_memory_relay(config) as relay:
        bystander = await connect(relay, "/watch", EVERYTHING)
        yield relay
        await relay.publish("still here", "watch")
        with trio.fail_after(60):
            assert await bystander.next_message() == "still here"


# ---------------------------------------------------------------- row: news/* patterns


async def test_a_one_level_pattern_grants_no_deeper_topic(
    autojump_clock: trio.testing.MockClock,
) -> None:
    news = mint_token(SECRET, publish=["news/*"], subscribe=["news/*"])
    async with bystanding() as relay:
        for path in ("/news/a/b/c", "/news/a/b", "/news"):
            status, body = await rejected(relay, upgrade_request(f"{path}?token={news}"))
            assert (status, path) == (403, path)
            assert b"does not allow topic" in body
        await connect(relay, "/news/a", news)  # its own level still works


async def test_the_any_depth_pattern_grants_every_level(
    autojump_clock: trio.testing.MockClock,
) -> None:
    news = mint_token(SECRET, subscribe=["news/**"])
    async with bystanding() as relay:
        for path in ("/news", "/news/a", "/news/a/b/c"):
            await connect(relay, path, news)
        status, _ = await rejected(relay, upgrade_request(f"/newsroom?token={news}"))
        assert status == 403


@pytest.mark.parametrize("path", ["/news/..", "/news/%2e%2e", "/..", "/news/./a", "/%2E"])
async def test_dot_segments_are_no_topic_names(
    autojump_clock: trio.testing.MockClock, path: str
) -> None:
    news = mint_token(SECRET, publish=["news/*"], subscribe=["news/*"])
    async with bystanding() as relay:
        status, body = await rejected(relay, upgrade_request(f"{path}?token={news}"))
        assert status == 400
        assert b"may not have '.' or '..' segments" in body


# ---------------------------------------------------------------- row: forged log lines

FORGED = "2024-01-01 00:00:00,000 INFO trio_relay: connection #1 from 10.0.0.1:1 open"


def log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every line the relay logged, as a handler would write it (tracebacks aside)."""
    return [line for record in caplog.records for line in record.getMessage().splitlines()]


async def test_a_jwt_header_cannot_forge_a_log_line(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_relay")
    # PyJWT checks "crit" before the signature: any client can send this, no secret needed.
    token = jwt.encode(
        {"exp": int(time.time()) + 60, "subscribe": ["**"]},
        "not-the-relay-secret-but-long-enough-for-hs256",
        algorithm="HS256",
        headers={"crit": [f"x\n{FORGED}\r{FORGED}\u2028{FORGED}\x1b[2K"]},
    )
    async with bystanding() as relay:
        for request in (
            upgrade_request(f"/news?token={token}"),
            upgrade_request("/news", extra=f"Authorization: Bearer {token}\r\n"),
        ):
            status, body = await rejected(relay, request)
            assert status == 401
            assert b"Unsupported critical extension" in body
            assert b"\n" + FORGED.encode() not in body
    rejections = [line for line in log_lines(caplog) if "rejected: HTTP 401" in line]
    assert len(rejections) == 2
    assert all("Unsupported critical extension: x\\n2024" in line for line in rejections)
    assert not any(line.startswith(FORGED) for line in log_lines(caplog))
    assert all(line.isprintable() for line in log_lines(caplog))


@pytest.mark.parametrize(
    "origin",
    ["https://evil.test\x85forged", "https://evil.test\x1b[2Kforged", "x" * 5000],
    ids=["next-line", "escape", "long"],
)
async def test_an_origin_header_cannot_forge_a_log_line(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, origin: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_relay")
    config = RelayConfig(auth_secret=SECRET, allowed_origins=("https://*.example.com",))
    async with bystanding(config) as relay:
        # A header value may hold any byte but CR, LF and NUL (h11 refuses those).
        request = upgrade_request(f"/watch?token={EVERYTHING}", extra=f"Origin: {origin}\r\n")
        status, body = await rejected(relay, request)
        assert status == 403
        assert len(body) < 300
    [line] = [line for line in log_lines(caplog) if "rejected" in line]
    assert line.isprintable() and len(line) < 400


# ---------------------------------------------------------------- row: secrets in logs


def rejection_requests(token: str) -> dict[str, tuple[bytes, int]]:
    """Every way a handshake presenting ``token`` is refused, by name: the request and the
    status it gets (with the relay of :func:`test_no_token_reaches_a_log_line_or_a_body`)."""
    other = mint_token(SECRET, subscribe=["sport"])
    bearer = f"Authorization: Bearer {token}\r\n"
    return {
        "bad-topic": (upgrade_request(f"/a//b?token={token}"), 400),
        "dot-topic": (upgrade_request(f"/news/..?token={token}"), 400),
        "bad-since": (upgrade_request(f"/news?since=x&token={token}"), 400),
        "bad-since-after": (upgrade_request(f"/news?token={token}&since=-1"), 400),
        "two-tokens-bad-since": (
            upgrade_request(f"/news?token={token}&since=1.5", extra=bearer),
            400,
        ),
        "bad-topic-bearer": (upgrade_request("/a//b", extra=bearer), 400),
        "not-allowed": (upgrade_request(f"/sport/x?token={token}"), 403),
        "bad-origin": (upgrade_request(f"/news?token={token}", extra="Origin: https://x\r\n"), 403),
        "not-allowed-bearer": (
            upgrade_request(f"/news?token={token}", extra=bearer.replace(token, other)),
            403,
        ),
        "bad-version": (
            upgrade_request(f"/news?token={token}").replace(b"Version: 13", b"Version: 8"),
            426,
        ),
        "no-upgrade": (f"GET /news?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400),
        "bad-request-line": (f"GET /news?token={token} HTTP/1.1 x\r\n\r\n".encode(), 400),
        "bad-header-line": (
            upgrade_request("/news", extra=f"Authorization : Bearer {token}\r\n"),
            400,
        ),
        "head-too-large": (
            upgrade_request(f"/news?token={token}", extra="X: " + "y" * 17000 + "\r\n"),
            431,
        ),
        "full-topic": (upgrade_request(f"/news?token={token}"), 503),
    }


async def test_no_token_reaches_a_log_line_or_a_body(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_relay")
    token = mint_token(SECRET, publish=["news"], subscribe=["news"])
    wrong = mint_token("another-secret-that-is-long-enough-too", subscribe=["news"])
    expired = mint_token(SECRET, subscribe=["news"], ttl=10, now=1_000_000)
    config = RelayConfig(
        auth_secret=SECRET,
        allowed_origins=("https://*.example.com",),
        max_subscribers_per_topic=1,
        handshake_timeout=5.0,
    )
    async with bystanding(config) as relay:
        await connect(relay, "/news", token)  # fills the topic: the next gets 503
        bodies: list[bytes] = []
        for name, (request, status) in rejection_requests(token).items():
            got, body = await rejected(relay, request)
            assert (name, got) == (name, status)
            bodies.append(body)
        for bad in (wrong, expired):
            for request in (
                upgrade_request(f"/news?since=0&token={bad}"),
                upgrade_request("/news", extra=f"Authorization: Bearer {bad}\r\n"),
            ):
                got, body = await rejected(relay, request)
                assert got == 401
                bodies.append(body)
        # A handshake that never ends, token and all.
        stream = await relay.open_stream()
        await stream.send_all(f"GET /news?token={token} HTTP/1.1\r\n".encode())
        assert await stream.receive_some() == b""  # after handshake_timeout
    assert "handshake timed out" in caplog.text
    assert caplog.text.count("rejected: HTTP") == len(bodies)
    for secret in (token, wrong, expired, SECRET):
        for part in secret.split(".")[1:]:  # the claims and the signature
            assert part not in caplog.text
            assert not [body for body in bodies if part.encode() in body]


PASSWORD = "hunter2-the-redis-password"


def require_password(port: int) -> None:
    """``CONFIG SET requirepass`` on the Redis at ``port`` (a test server: lost at restart)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        words = [b"CONFIG", b"SET", b"requirepass", PASSWORD.encode()]
        command = b"*4\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)
        sock.sendall(command)
        assert sock.recv(100) == b"+OK\r\n"


async def test_no_redis_password_reaches_a_log_line_stats_or_metrics(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_relay")
    require_password(redis_server.port)
    urls = {
        "reachable": f"redis://:{PASSWORD}@127.0.0.1:{redis_server.port}/0",
        "user-and-password": f"redis://default:{PASSWORD}@127.0.0.1:{redis_server.port}/0",
        "unreachable-tls": f"rediss://user:{PASSWORD}@127.0.0.1:{free_port()}/0",
        "unreachable-query": f"redis://127.0.0.1:{free_port()}/0?password={PASSWORD}",
    }
    pages: list[bytes] = []
    for name, url in urls.items():
        config = RelayConfig(backplane=url, auth_secret=SECRET)
        assert PASSWORD not in repr(config) and SECRET not in repr(config)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                server = await nursery.start(partial(serve_relay, "127.0.0.1", 0, config=config))
                [listener] = await nursery.start(serve_metrics, server, "127.0.0.1", 0)
                port = listener.socket.getsockname()[1]
                assert server.backplane.up is name.startswith(("reachable", "user"))
                for path in ("/stats", "/metrics", "/healthz"):
                    status, _, body = await http_request(port, path)
                    assert status == 200
                    pages.append(body)
                nursery.cancel_scope.cancel()
    assert "backplane redis://:<redacted>@127.0.0.1" in caplog.text  # "connected"
    assert "unreachable" in caplog.text
    assert PASSWORD not in caplog.text
    assert not [page for page in pages if PASSWORD.encode() in page]


def read_until(process: subprocess.Popen[bytes], marker: bytes, timeout: float = 30) -> bytes:
    """What ``process`` writes to stderr until ``marker``, within ``timeout`` seconds."""
    assert process.stderr is not None
    output = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stderr, selectors.EVENT_READ)
        while marker not in output:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and selector.select(remaining), output
            chunk = os.read(process.stderr.fileno(), 65536)
            assert chunk, output
            output += chunk
    return output


def test_the_command_logs_no_redis_password_nor_secret() -> None:
    dead = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    environment = {**os.environ, "TRIO_RELAY_AUTH_SECRET": SECRET}
    command = [sys.executable, "-m", "trio_relay", "serve", "--port", "0"]
    command += ["--host", "127.0.0.1", "--backplane", dead, "--log-level", "DEBUG"]
    with subprocess.Popen(command, stderr=subprocess.PIPE, env=environment) as process:
        try:
            output = read_until(process, b"relay listening")
        finally:
            process.send_signal(signal.SIGTERM)
            rest = process.communicate(timeout=30)[1]
    text = (output + rest).decode()
    assert "backplane redis://:<redacted>@127.0.0.1" in text
    assert "relay stopped" in text
    assert PASSWORD not in text and SECRET not in text


# ---------------------------------------------------------------- row: token expiry

EXPIRING = RelayConfig(auth_secret=SECRET, ping_interval=0)  # no pings: the timer still runs


async def until(moment: float) -> None:
    """Let virtual time run to ``moment`` (a point of the scenario, not a condition)."""
    await trio.sleep_until(moment)


async def test_an_expired_token_closes_its_connection_with_4401(
    autojump_clock: trio.testing.MockClock, wall_clock: float
) -> None:
    async with bystanding(EXPIRING) as relay:
        listener = await connect(relay, "/news", EVERYTHING)
        token = mint_token(SECRET, publish=["news"], subscribe=["news"], ttl=20, now=wall_clock)
        client = await connect(relay, "/news", token)
        await client.send_text("in time")
        assert await listener.next_message() == "in time"
        close = await client.next_close()
        assert (close.code, close.reason) == (4401, "token expired")
        assert 20.0 <= trio.current_time() < 21.0  # the server's one-second timer
        await until(40.0)
        # As a client that ignores the close would (wsproto would refuse to send it).
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await client.send_raw(masked_frame(0x1, b"late"))
        await relay.publish("marker", "news")
        assert await listener.next_message() == "marker"  # not "late"


async def test_a_publish_after_expiry_but_before_the_timer_is_not_delivered(
    autojump_clock: trio.testing.MockClock, wall_clock: float
) -> None:
    claims = {"publish": ["news"], "subscribe": ["news"], "exp": wall_clock + 20.5}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    async with bystanding(EXPIRING) as relay:
        listener = await connect(relay, "/news", EVERYTHING)
        client = await connect(relay, "/news", token)
        await until(20.75)  # expired at 20.5; the timer's next round is at 21
        await client.send_text("late")
        close = await client.next_close()
        assert (close.code, trio.current_time()) == (4401, 20.75)
        await relay.publish("marker", "news")
        assert await listener.next_message() == "marker"


async def test_an_envelope_client_refreshes_its_token_before_it_expires(
    autojump_clock: trio.testing.MockClock, wall_clock: float
) -> None:
    async with bystanding(EXPIRING) as relay:
        listener = await connect(relay, "/news", EVERYTHING)
        token = mint_token(SECRET, publish=["news"], subscribe=["news"], ttl=20, now=wall_clock)
        client = await connect(relay, "/news", token, envelope=True)
        assert json.loads(await client.next_message())["type"] == "welcome"
        await until(15.0)
        await client.send_text(json.dumps({"type": "refresh", "token": "bad", "id": "r1"}))
        error = json.loads(await client.next_message())
        assert (error["type"], error["code"], error["id"]) == ("error", "bad-token", "r1")
        fresh = mint_token(SECRET, publish=["news"], subscribe=["news"], ttl=60)  # exp 75
        await client.send_text(json.dumps({"type": "refresh", "token": fresh, "id": "r2"}))
        refreshed = json.loads(await client.next_message())
        assert refreshed == {"type": "refreshed", "id": "r2", "exp": wall_clock + 75}
        await until(30.0)  # past the first token's expiry
        await client.send_text(json.dumps({"type": "publish", "text": "still allowed"}))
        assert await listener.next_message() == "still allowed"
        close = await client.next_close()
        assert close.code == 4401
        assert 75.0 <= trio.current_time() < 76.0
