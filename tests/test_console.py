"""The browser console on the HTTP side port: the page and ``/stats`` over real sockets, then
the page itself in Debian's Chromium, headless, driven by Playwright's sync API.

The browser tests never download a browser: they launch the system's ``chromium``. Where it
(or the playwright package) is missing they skip, saying how to install it, unless
``TRIO_RELAY_REQUIRE_INTEGRATION=1`` (CI sets it), which makes them fail instead.

The browser tests run ``python -m trio_relay serve`` as a subprocess on 127.0.0.1, port 0,
and read the real ports from its log. Every wait is bounded by ``DEADLINE``: subprocess
output through a condition variable, the page through Playwright's ``expect``.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any

import pytest
import trio
import trio_websocket
import trustme
from helpers import http_request, unavailable

import trio_relay
from trio_relay import RelayConfig, serve_metrics, serve_relay
from trio_relay._auth import mint_token
from trio_relay._console import CONTENT_SECURITY_POLICY
from trio_relay._counters import REJECTION_REASONS

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Playwright

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "console.png"
DEADLINE = 10.0
"""Seconds any single wait (on a subprocess or on the page) may take before the test fails."""
DEADLINE_MS = DEADLINE * 1000

CHROMIUM = ("chromium", "/usr/bin/chromium")
"""Where the tests look for Debian's Chromium: on the PATH, then its usual place."""
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_CHROMIUM = "Chromium not found: install Debian's, with `apt-get install chromium`"
INSTALL_PLAYWRIGHT = (
    "the playwright package is missing: `pip install -e '.[test]'` installs it "
    "(it drives the system's Chromium; no browser download is needed)"
)
SECRET = "a test secret that is long enough for HS256 tokens"

LISTENING = r"relay listening on ws://127\.0\.0\.1:(\d+)/"
METRICS = r"metrics on http://127\.0\.0\.1:(\d+)/"
OPENED = r"connection #\d+ from \S+ open"

# The relay's settings come from the command line only: none from the caller's environment.
ENV = {name: value for name, value in os.environ.items() if not name.startswith("TRIO_RELAY_")}
ENV["PYTHONUTF8"] = "1"


# ------------------------------------------------------------------------ skip or fail


def chromium_or_skip() -> str:
    """The path of the system's Chromium, or skip (or fail) saying how to install it."""
    for candidate in CHROMIUM:
        found = shutil.which(candidate)
        if found is not None:
            return found
    unavailable(INSTALL_CHROMIUM)


def playwright_or_skip() -> ModuleType:
    """``playwright.sync_api``, or skip (or fail) saying how to install it."""
    try:
        import playwright.sync_api
    except ImportError:
        unavailable(INSTALL_PLAYWRIGHT)
    return playwright.sync_api


# ------------------------------------------------------------------------ the side port


async def _start(nursery: trio.Nursery, **relay_options: Any) -> tuple[trio_relay.RelayServer, int]:
    server = await nursery.start(partial(serve_relay, "127.0.0.1", 0, **relay_options))
    [listener] = await nursery.start(serve_metrics, server, "127.0.0.1", 0)
    return server, listener.socket.getsockname()[1]


async def test_the_page_and_its_assets_are_served_with_a_content_security_policy(
    nursery: trio.Nursery,
) -> None:
    _, port = await _start(nursery)
    with trio.fail_after(DEADLINE):
        status, headers, page = await http_request(port, "/")
        assert status == 200
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert headers["x-content-type-options"] == "nosniff"
        assert int(headers["content-length"]) == len(page)
        text = page.decode()
        # Its own script and style sheet only: nothing inline, nothing from elsewhere.
        assert '<script type="module" src="console.js"></script>' in text
        assert '<link rel="stylesheet" href="console.css">' in text
        assert "<script>" not in text
        assert "<style" not in text
        assert " style=" not in text
        assert "//" not in text.replace("<!doctype html>", "")
        for path, kind in [("/console.js", "text/javascript"), ("/console.css", "text/css")]:
            status, headers, body = await http_request(port, path)
            assert (status, headers["content-type"]) == (200, f"{kind}; charset=utf-8")
            assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert body
        status, headers, body = await http_request(port, "/", method="HEAD")
        assert (status, int(headers["content-length"]), body) == (200, len(page), b"")
        status, _, body = await http_request(port, "/console.js?v=1")  # queries are ignored
        assert status == 200
        status, _, body = await http_request(port, "/nope")
        assert (status, body) == (404, b"try / (the console), /stats, /healthz or /metrics\n")
        status, _, _ = await http_request(port, "/", method="POST")
        assert status == 405
    nursery.cancel_scope.cancel()


def test_the_console_files_ship_in_the_package() -> None:
    folder = resources.files("trio_relay") / "console"
    assert {entry.name for entry in folder.iterdir()} >= {"index.html", "console.js", "console.css"}


async def test_stats_reports_the_relays_figures_and_where_to_connect(
    nursery: trio.Nursery,
) -> None:
    server, port = await _start(nursery, config=RelayConfig(max_subscribers_per_topic=1))
    url = f"ws://127.0.0.1:{server.port}/news"
    with trio.fail_after(DEADLINE):
        async with trio_relay.consume(url) as messages:
            await server.wait_until(lambda s: s.broadcast.subscribers == 1)
            await trio_relay.produce(f"ws://127.0.0.1:{server.port}/", "hello")
            await server.publish("from the server", "news")
            assert await anext(messages) == "from the server"
            with pytest.raises(trio_relay.HandshakeRejected):  # the topic is full
                await trio_relay.produce(url, "x", timeout=2)
            status, headers, body = await http_request(port, "/stats")
    assert (status, headers["content-type"]) == (200, "application/json")
    assert headers["cache-control"] == "no-store"
    stats = json.loads(body)
    bytes_in, bytes_out = stats.pop("bytes_in"), stats.pop("bytes_out")
    assert bytes_in > 5
    assert bytes_out > len("hello") + len("from the server")
    assert stats == {
        "connections": 1,
        "topics": 2,  # "news", and the root topic, which keeps its history
        "subscribers": 1,
        "messages_in": 1,
        "messages_out": 2,  # "hello" to its producer, "from the server" to the consumer
        "published": 2,
        "dropped": 0,
        "evicted": 0,
        "rejected": {**dict.fromkeys(REJECTION_REASONS, 0), "http-503": 1},
        "ports": [server.port],
        "tls": False,
        "auth": False,
        "backplane": None,  # "up" or "down" with a Redis backplane
    }
    nursery.cancel_scope.cancel()


async def test_stats_says_when_the_relay_speaks_tls_and_needs_tokens(
    nursery: trio.Nursery,
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)
    server, port = await _start(
        nursery, ssl_context=context, config=RelayConfig(auth_secret=SECRET)
    )
    with trio.fail_after(DEADLINE):
        status, _, body = await http_request(port, "/stats")
    assert status == 200
    stats = json.loads(body)
    assert (stats["ports"], stats["tls"], stats["auth"]) == ([server.port], True, True)
    nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------ subprocesses


class Program:
    """A ``python -m trio_relay`` subprocess whose output threads collect as it arrives."""

    def __init__(self, *arguments: str, env: dict[str, str] | None = None) -> None:
        self.name = "trio-relay " + " ".join(arguments)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trio_relay", *arguments],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={**ENV, **(env or {})},
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self.output = {"stdout": "", "stderr": ""}
        self._eof = {"stdout": False, "stderr": False}
        self._changed = threading.Condition()
        assert self.process.stdout is not None and self.process.stderr is not None
        self._threads = [
            threading.Thread(target=self._collect, args=(key, stream), daemon=True)
            for key, stream in [("stdout", self.process.stdout), ("stderr", self.process.stderr)]
        ]
        for thread in self._threads:
            thread.start()

    def _collect(self, key: str, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.output[key] += line
                self._changed.notify_all()
        with self._changed:
            self._eof[key] = True
            self._changed.notify_all()

    def describe(self) -> str:
        return (
            f"{self.name} (exit status {self.process.returncode})\n"
            f"--- stdout ---\n{self.output['stdout']}--- stderr ---\n{self.output['stderr']}"
        )

    def expect(self, key: str, pattern: str, count: int = 1) -> re.Match[str]:
        """Wait until ``pattern`` occurs ``count`` times on ``key``; return the last one."""
        deadline = time.monotonic() + DEADLINE
        with self._changed:
            while len(matches := list(re.finditer(pattern, self.output[key]))) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof[key]:
                    pytest.fail(
                        f"{pattern!r} occurs {len(matches)} times, not {count}, "
                        f"on the {key} of {self.describe()}"
                    )
                self._changed.wait(remaining)
        return matches[-1]

    def stop(self) -> None:
        """SIGTERM (graceful: clients get close 1001), then wait for the exit; kill if late."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for thread in self._threads:
            thread.join(DEADLINE)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


class Relay:
    """A ``trio-relay serve`` subprocess with its relay and console ports."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.port = int(program.expect("stderr", LISTENING)[1])
        self.metrics_port = int(program.expect("stderr", METRICS)[1])
        self.console = f"http://127.0.0.1:{self.metrics_port}/"

    def url(self, topic: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}/{topic}"


Launch = Callable[..., Program]
StartRelay = Callable[..., Relay]


@pytest.fixture
def launch() -> Iterator[Launch]:
    """``launch(*arguments)`` starts ``python -m trio_relay ...``; all stop after the test."""
    programs: list[Program] = []

    def launch(*arguments: str, env: dict[str, str] | None = None) -> Program:
        program = Program(*arguments, env=env)
        programs.append(program)
        return program

    try:
        yield launch
    finally:
        for program in programs:
            program.stop()


@pytest.fixture
def start_relay(launch: Launch) -> StartRelay:
    """``start_relay()`` runs a relay with its console on 127.0.0.1 (port 0: free ports)."""

    def start(port: int = 0, metrics_port: int = 0, env: dict[str, str] | None = None) -> Relay:
        program = launch(
            "serve",
            *("--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port)),
            *("--log-level", "DEBUG"),  # the relay's line per connection opened (OPENED)
            env=env,
        )
        return Relay(program)

    return start


def produce(url: str, message: str | bytes) -> trio_relay.DeliveryReport:
    """Publish one message from Python, in a sync test, and return its delivery report."""
    report = trio.run(partial(trio_relay.produce, url, message, envelope=True, timeout=DEADLINE))
    assert report is not None
    return report


# ------------------------------------------------------------------------ the browser


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    sync_api = playwright_or_skip()
    sync_api.expect.set_options(timeout=DEADLINE_MS)
    with sync_api.sync_playwright() as playwright:
        yield playwright


def launch_chromium(playwright: Playwright, *arguments: str) -> Browser:
    """Debian's Chromium, headless, with ``CHROMIUM_ARGS`` and ``arguments``."""
    return playwright.chromium.launch(
        executable_path=chromium_or_skip(),
        headless=True,
        args=[*CHROMIUM_ARGS, *arguments],
        timeout=DEADLINE_MS,
    )


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = launch_chromium(playwright)
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page (its own context: no storage shared between tests). Fails the test on
    an uncaught JavaScript error or a Content-Security-Policy violation."""
    context = browser.new_context(viewport={"width": 1000, "height": 760}, color_scheme="light")
    context.set_default_timeout(DEADLINE_MS)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.on(
        "console",
        lambda message: (
            problems.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    try:
        yield page
    finally:
        context.close()
    assert problems == []


def _expect() -> Any:
    return playwright_or_skip().expect


def test_the_page_connects_and_its_panel_counts_connections(
    page: Page, start_relay: StartRelay, launch: Launch
) -> None:
    expect = _expect()
    relay = start_relay()
    page.goto(relay.console)
    state = page.locator("#state")
    expect(state).to_have_attribute("data-state", "open")
    expect(state).to_contain_text(f"open ws://127.0.0.1:{relay.port}/")
    expect(page.locator("#messages")).to_contain_text("subscribed to / (root), which is at #0")
    expect(page.locator("#stat-connections")).to_have_text("1")
    consumer = launch("consume", "--host", "127.0.0.1", "--port", str(relay.port))
    consumer.expect("stderr", "connected to")
    expect(page.locator("#stat-connections")).to_have_text("2")
    expect(page.locator("#stat-subscribers")).to_have_text("2")

    # A narrow window: one column (connection, messages, figures), nothing wider than it.
    page.set_viewport_size({"width": 360, "height": 740})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    boxes = [page.locator(f"#{name}").bounding_box() for name in ("connection", "log", "stats")]
    assert all(box is not None for box in boxes)
    tops = [box["y"] for box in boxes if box is not None]
    assert tops == sorted(tops)
    assert all(box["width"] > 300 for box in boxes if box is not None)


def test_a_message_published_from_the_page_reaches_a_python_consumer(
    page: Page, start_relay: StartRelay, launch: Launch
) -> None:
    expect = _expect()
    relay = start_relay()
    consumer = launch(
        "consume", "--host", "127.0.0.1", "--port", str(relay.port), "--topic", "news"
    )
    consumer.expect("stderr", "connected to")
    relay.program.expect("stderr", OPENED)
    sockets: list[str] = []
    page.on("websocket", lambda websocket: sockets.append(websocket.url))
    page.goto(relay.console)
    state = page.locator("#state")
    expect(state).to_have_attribute("data-state", "open")
    expect(state).to_contain_text(f"open ws://127.0.0.1:{relay.port}/, topic / (root)")
    # With the keyboard only: type the topic and press Enter, then the message and Enter.
    topic = page.get_by_label("Topic")
    topic.fill("news")
    topic.press("Enter")
    expect(state).to_contain_text(f"open ws://127.0.0.1:{relay.port}/, topic news")
    expect(page.locator("#messages")).to_contain_text("subscribed to news, which is at #0")
    message = page.get_by_label("Message", exact=True)
    message.fill("héllo from Chromium ✓")
    message.press("Enter")
    expect(page.locator("#publish-status")).to_have_text("published as #1, queued for 2")
    consumer.expect("stdout", "^héllo from Chromium ✓\n")
    expect(page.locator("#messages li.message")).to_have_text(
        [re.compile(r"#1 héllo from Chromium ✓$")]
    )
    expect(page.locator("#messages li.mine")).to_have_count(1)  # marked as this page's
    assert "?topic=news" in page.url  # a reload comes back to the topic
    # trio-relay.v2: another topic is another subscription on the same connection.
    assert sockets == [f"ws://127.0.0.1:{relay.port}/"]


async def _burst(url: str, count: int) -> None:
    """Send ``count`` raw messages over one connection, then wait for the last one's echo."""
    with trio.fail_after(DEADLINE):
        async with trio_websocket.open_websocket_url(url) as websocket:
            for n in range(count):
                await websocket.send_message(f"burst {n}")
            while await websocket.get_message() != f"burst {count - 1}":
                pass


def test_messages_from_a_python_producer_appear_on_the_page_up_to_the_cap(
    page: Page, start_relay: StartRelay
) -> None:
    expect = _expect()
    relay = start_relay()
    page.goto(relay.console + "?topic=news")
    expect(page.locator("#state")).to_have_attribute("data-state", "open")
    expect(page.locator("#messages")).to_contain_text("subscribed to news")
    report = produce(relay.url("news"), "from Python")
    items = page.locator("#messages li")
    expect(items.last).to_contain_text(f"#{report.seq} from Python")
    produce(relay.url("news"), b"\x00\x01\xfe\xff")
    expect(items.last).to_contain_text("#2 <4 bytes> 00 01 fe ff")
    # Beyond 500 entries, the oldest go: a note, 2 messages and 520 more make 523.
    trio.run(_burst, relay.url("news"), 520)
    expect(items.last).to_contain_text("#522 burst 519")
    expect(items).to_have_count(500)
    expect(items.first).to_contain_text("#23 burst 20")
    expect(page.locator("#count")).to_have_text("(the latest 500)")
    # Newest at the bottom, and the log follows it.
    gap = "(b => b.scrollHeight - b.scrollTop - b.clientHeight)(document.getElementById('log'))"
    assert page.evaluate(gap) < 2


def test_the_page_resumes_after_the_relay_restarts_and_shows_the_gap(
    page: Page, start_relay: StartRelay, tmp_path: Path
) -> None:
    expect = _expect()
    relay = start_relay()
    subscribes: list[dict[str, object]] = []

    def record(websocket: Any) -> None:
        def sent(payload: str | bytes) -> None:
            frame = json.loads(payload)
            if frame["type"] == "subscribe":
                subscribes.append({k: v for k, v in frame.items() if k != "id"})

        websocket.on("framesent", sent)

    page.on("websocket", record)
    page.goto(relay.console + "?topic=news")
    state = page.locator("#state")
    expect(state).to_have_attribute("data-state", "open")
    log = page.locator("#messages")
    expect(log).to_contain_text("subscribed to news")
    page.get_by_label("Message", exact=True).fill("hello from the console")
    page.get_by_role("button", name="Publish", exact=True).click()
    produce(relay.url("news"), "hello from Python")
    expect(log.locator("li.message")).to_have_count(2)

    # Stop the relay (its clients get close 1001), and start it again on the same ports: it
    # has lost its history and numbering, so the page, resuming with since=2, gets a gap.
    relay.program.stop()
    expect(state).to_have_attribute("data-state", "reconnecting")
    expect(log).to_contain_text("connection closed: code 1001 (relay shutting down)")
    relay = start_relay(port=relay.port, metrics_port=relay.metrics_port)
    produce(relay.url("news"), "published while the console was away")
    expect(log.locator("li.gap")).to_have_text(
        re.compile(r"gap: the topic was reset .*messages after #2 are lost")
    )
    expect(log.locator("li.message").last).to_contain_text(
        "#1 published while the console was away"
    )
    expect(log.locator("li.mine")).to_have_count(1)  # #1 is no longer this page's message
    expect(state).to_have_attribute("data-state", "open")
    expect(page.locator("#error")).to_be_hidden()
    # It resubscribed from the last message it had seen, #2 of the old relay's epoch.
    assert len(subscribes) == 2 and re.fullmatch("[0-9a-f]{8}", str(subscribes[1]["epoch"]))
    assert subscribes == [
        {"type": "subscribe", "topic": "news"},
        {"type": "subscribe", "topic": "news", "since": 2, "epoch": subscribes[1]["epoch"]},
    ]
    # At #0 or #1: the message published while it was away may come before or after.
    expect(log).to_contain_text(re.compile(r"resumed news after #2 \(the topic is at #[01]\)"))
    produce(relay.url("news"), "and life goes on")
    expect(log.locator("li.message").last).to_contain_text("#2 and life goes on")
    expect(page.locator("#stat-connections")).to_have_text("1")

    # The README's screenshot: always taken; copied into docs/ only when asked for.
    shot = tmp_path / "console.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("TRIO_RELAY_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


def test_a_wrong_token_shows_an_error_and_a_good_one_connects(
    page: Page, start_relay: StartRelay
) -> None:
    expect = _expect()
    relay = start_relay(env={"TRIO_RELAY_AUTH_SECRET": SECRET})
    page.goto(relay.console)
    state = page.locator("#state")
    error = page.get_by_role("alert")
    expect(state).to_have_attribute("data-state", "closed")
    expect(error).to_have_text("This relay requires a token: paste one in Token and press Connect.")
    expect(page.get_by_label("Token")).to_be_focused()

    page.get_by_label("Token").fill("not-a-token")
    page.get_by_label("Token").press("Enter")
    expect(error).to_contain_text(
        "The relay refused the connection: the token may be wrong or expired"
    )
    expect(state).to_have_attribute("data-state", "refused")  # it stops trying
    relay.program.expect("stderr", r"rejected: HTTP 401 invalid token", count=3)

    token = mint_token(SECRET, publish=["news"], subscribe=["news"], ttl=600)
    page.get_by_label("Topic").fill("news")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Connect", exact=True).click()
    expect(state).to_have_attribute("data-state", "open")
    expect(error).to_be_hidden()
    expect(state).not_to_contain_text(token)  # the token is not displayed
    page.get_by_label("Message", exact=True).fill("authorised")
    page.get_by_label("Message", exact=True).press("Enter")
    expect(page.locator("#messages li.message")).to_have_text([re.compile(r"#1 authorised$")])

    # A topic the token does not allow: that subscription is refused, the connection stays.
    page.get_by_label("Topic").fill("secret")
    page.get_by_label("Topic").press("Enter")
    expect(error).to_have_text(re.compile(r"^Not subscribed to secret: forbidden: .+"))
    expect(page.locator("#messages li.error")).to_have_text([re.compile(r"secret: forbidden: ")])
    expect(state).to_have_attribute("data-state", "open")
    page.get_by_label("Message", exact=True).fill("psst")
    page.get_by_label("Message", exact=True).press("Enter")
    expect(page.locator("#publish-status")).to_have_text(re.compile(r"^not published: forbidden: "))
    page.get_by_label("Topic").fill("news")
    page.get_by_label("Topic").press("Enter")
    expect(error).to_be_hidden()
    expect(page.locator("#messages")).to_contain_text("subscribed to news, which is at #1")
    page.get_by_label("Message", exact=True).fill("still authorised")
    page.get_by_label("Message", exact=True).press("Enter")
    expect(page.locator("#messages li.message")).to_have_text([re.compile(r"#2 still authorised$")])


# ------------------------------------------------------------------------ the README's example


def _readme_example() -> str:
    """The README's browser example for trio-relay.js, exactly as written there."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### In the browser (and Node): trio-relay.js\n", 1)[1]
    match = re.search(r"```html\n(.*?)```", section, re.DOTALL)
    assert match is not None
    return match[1]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_the_readme_example_works_pasted_into_a_page_next_to_the_relay(
    playwright: Playwright, launch: Launch, tmp_path: Path
) -> None:
    example = _readme_example()
    assert len(example.splitlines()) == 10  # "a ten-line browser example"
    relay_port = int(re.findall(r'"ws://localhost:(\d+)/"', example)[0])
    http_port = int(re.findall(r'"http://localhost:(\d+)/trio-relay\.js"', example)[0])
    # The example names localhost and fixed ports. Chromium maps localhost to an address of
    # this test's own (127.0.0.0/8 is all loopback), where those ports are free, whatever
    # listens on 127.0.0.1.
    address = f"127.77.{os.getpid() // 250 % 250 + 1}.{os.getpid() % 250 + 1}"

    def start() -> Program:
        program = launch(
            "serve",
            *("--host", address, "--port", str(relay_port)),
            *("--http-host", address, "--http-port", str(http_port)),
        )
        program.expect("stderr", rf"relay listening on ws://{re.escape(address)}:{relay_port}/")
        return program

    relay = start()
    # The page: the example and nothing else, served by a server of its own.
    (tmp_path / "index.html").write_text(example, encoding="utf-8")
    (tmp_path / "favicon.ico").write_bytes(b"")  # which the browser asks for
    server = http.server.ThreadingHTTPServer((address, 0), partial(_Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    browser = launch_chromium(playwright, f"--host-resolver-rules=MAP localhost {address}")
    try:
        page = browser.new_page()
        lines: list[str] = []
        page.on("console", lambda message: lines.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: lines.append(f"uncaught: {error}"))

        def wait_for(line: str) -> None:
            deadline = time.monotonic() + DEADLINE
            while line not in lines:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"{line!r} not in the page's console: {lines}"
                with contextlib.suppress(playwright_or_skip().TimeoutError):
                    page.wait_for_event("console", timeout=remaining * 1000)

        page.goto(f"http://localhost:{server.server_address[1]}/")
        wait_for("log: relay: connected")
        wait_for("log: news 1 hello from a browser")
        wait_for("log: published as #1, queued for 1")
        produce(f"ws://{address}:{relay_port}/news", "from Python")
        wait_for("log: news 2 from Python")
        assert [line for line in lines if line.startswith(("error", "uncaught"))] == []

        # The relay restarts: the page resumes news after #2, and is told that it was reset.
        relay.stop()
        wait_for("log: relay: retrying")
        relay = start()
        produce(f"ws://{address}:{relay_port}/news", "after the restart")
        wait_for("warning: news was reset")
        wait_for("log: news 1 after the restart")
        refused = re.compile(r"error: WebSocket connection to .* failed: .*ERR_CONNECTION_REFUSED")
        errors = [line for line in lines if line.startswith(("error", "uncaught"))]
        # Only the browser's own lines for attempts while the relay was down.
        assert [line for line in errors if not refused.fullmatch(line)] == []
    finally:
        browser.close()
        server.shutdown()
        server.server_close()
        thread.join(DEADLINE)
