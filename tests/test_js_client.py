"""The JavaScript client, ``trio_relay/console/trio-relay.js``: served by the side port, and
its own tests (``tests/js/*.test.mjs``) run by Node's test runner from here, so that the
suite (and ``.ci/run``) runs them: against a fake WebSocket, and against a real relay
(``trio-relay serve``, a subprocess) over Node's own WebSocket. Its browser tests are in
``tests/test_console.py``.

Without Node.js 20 or later the Node tests skip, saying how to install it, except where
``TRIO_RELAY_REQUIRE_INTEGRATION=1`` (CI), where they fail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import partial
from importlib import resources
from pathlib import Path

import trio
from helpers import http_request, unavailable
from test_console import ENV, SECRET, Program, Relay

import trio_relay
from trio_relay import serve_metrics, serve_relay

ROOT = Path(__file__).resolve().parent.parent
NODE_TESTS = ROOT / "tests" / "js"
NODE_TIMEOUT = 60.0
"""Seconds the Node test run may take before it is killed and the test fails."""
INSTALL_NODE = (
    "Node.js 20 or later not found (the JavaScript client's tests run on it): install it, "
    "e.g. `apt-get install nodejs` on Debian 13"
)
MIN_NODE = 20


def node_or_skip() -> str:
    """The path of ``node`` (version 20 or later), or skip (or fail) saying how to get it."""
    found = shutil.which("node")
    if found is None:
        unavailable(INSTALL_NODE)
    version = subprocess.run(
        [found, "--version"], capture_output=True, text=True, timeout=NODE_TIMEOUT, check=False
    ).stdout.strip()
    match = re.fullmatch(r"v(\d+)\.\d+\.\d+.*", version)
    if match is None or int(match[1]) < MIN_NODE:
        unavailable(f"{INSTALL_NODE}; {found} is {version or 'not a working node'}")
    return found


def _websocket_flag(node: str) -> list[str]:
    """Node 22 has a global WebSocket; 20 and 21 have it behind a flag."""
    probe = subprocess.run(
        [node, "-p", "typeof WebSocket"],
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
    )
    return [] if probe.stdout.strip() == "function" else ["--experimental-websocket"]


def run_node_tests(*files: Path, env: dict[str, str] | None = None) -> dict[str, int]:
    """Run ``node --test`` on ``files``; assert that it passed; return its TAP summary
    (``tests``, ``pass``, ``fail``, ``cancelled``, ``skipped``, ``todo``)."""
    node = node_or_skip()
    result = subprocess.run(
        [node, *_websocket_flag(node), "--test", "--test-reporter=tap", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
        cwd=ROOT,
        env=env,
    )
    output = f"--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}"
    assert result.returncode == 0, output
    summary = {
        name: int(count)
        for name, count in re.findall(
            r"^# (tests|pass|fail|cancelled|skipped|todo) (\d+)$", result.stdout, re.MULTILINE
        )
    }
    assert set(summary) == {"tests", "pass", "fail", "cancelled", "skipped", "todo"}, output
    return summary


def test_the_client_passes_its_node_tests() -> None:
    summary = run_node_tests(NODE_TESTS / "client.test.mjs")
    assert summary["pass"] == summary["tests"] >= 20
    assert summary["fail"] == summary["cancelled"] == summary["skipped"] == summary["todo"] == 0


def test_the_client_works_with_a_real_relay() -> None:
    node_or_skip()
    program = Program(
        "serve",
        *("--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--history-size", "3"),
        env={"TRIO_RELAY_AUTH_SECRET": SECRET},
    )
    try:
        relay = Relay(program)
        grant = {"publish": ["news/**"], "subscribe": ["news/**"], "ttl": 600}
        env = {
            **ENV,
            "TRIO_RELAY_TEST_URL": relay.url(),
            "TRIO_RELAY_TEST_TOKEN": trio_relay.mint_token(SECRET, **grant),  # type: ignore[arg-type]
            "TRIO_RELAY_TEST_OTHER": trio_relay.mint_token(SECRET, **grant),  # type: ignore[arg-type]
        }
        summary = run_node_tests(NODE_TESTS / "relay.test.mjs", env=env)
    finally:
        program.stop()
    assert summary["pass"] == summary["tests"] == 5
    assert summary["skipped"] == 0


def test_the_client_ships_in_the_package() -> None:
    client = resources.files("trio_relay") / "console" / "trio-relay.js"
    assert client.is_file()
    text = client.read_text(encoding="utf-8")
    # One ES module with no dependency: it imports nothing.
    assert re.search(r"^\s*import\b", text, re.MULTILINE) is None
    assert "export function connect(" in text


async def test_the_side_port_serves_the_client_to_any_origin(nursery: trio.Nursery) -> None:
    server = await nursery.start(partial(serve_relay, "127.0.0.1", 0))
    [listener] = await nursery.start(serve_metrics, server, "127.0.0.1", 0)
    port = listener.socket.getsockname()[1]
    client = (resources.files("trio_relay") / "console" / "trio-relay.js").read_bytes()
    with trio.fail_after(10):
        status, headers, body = await http_request(port, "/trio-relay.js")
        assert (status, body) == (200, client)
        assert headers["content-type"] == "text/javascript; charset=utf-8"
        # A page of another origin imports a module only with CORS.
        assert headers["access-control-allow-origin"] == "*"
        assert headers["x-content-type-options"] == "nosniff"
        status, headers, body = await http_request(port, "/trio-relay.js", method="HEAD")
        assert (status, int(headers["content-length"]), body) == (200, len(client), b"")
        # The console's own files stay same-origin only.
        _, headers, _ = await http_request(port, "/console.js")
        assert "access-control-allow-origin" not in headers
    nursery.cancel_scope.cancel()
