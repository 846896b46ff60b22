"""Integration tests need programs a machine may lack (Chromium, Playwright, redis-server,
Node.js 20 or later): without one they skip, saying how to install it, except in CI
(TRIO_RELAY_REQUIRE_INTEGRATION=1), where they fail instead: CI must run them all."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable

import pytest
from redis_support import redis_server_or_skip
from test_console import chromium_or_skip, playwright_or_skip
from test_js_client import node_or_skip


def _no_program(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)


def _old_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``node`` on the PATH that says it is 18.20.4 (Debian 12's)."""
    old = subprocess.CompletedProcess(["node", "--version"], 0, stdout="v18.20.4\n", stderr="")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/node")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: old)


def _no_playwright(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "playwright.sync_api", None)  # import raises ImportError


@pytest.mark.parametrize("required", [False, True], ids=["skips", "fails-in-CI"])
@pytest.mark.parametrize(
    ("find", "remove", "install"),
    [
        (chromium_or_skip, _no_program, r"apt-get install chromium"),
        (playwright_or_skip, _no_playwright, r"pip install -e '\.\[test\]'"),
        (redis_server_or_skip, _no_program, r"apt-get install redis-server"),
        (node_or_skip, _no_program, r"Node\.js 20 or later not found.*apt-get install nodejs"),
        (node_or_skip, _old_node, r"Node\.js 20 or later not found.*is v18\.20\.4"),
    ],
    ids=["chromium", "playwright", "redis-server", "node", "old-node"],
)
def test_a_missing_program_skips_its_tests_or_fails_them_in_ci(
    monkeypatch: pytest.MonkeyPatch,
    required: bool,
    find: Callable[[], object],
    remove: Callable[[pytest.MonkeyPatch], None],
    install: str,
) -> None:
    remove(monkeypatch)
    if required:
        monkeypatch.setenv("TRIO_RELAY_REQUIRE_INTEGRATION", "1")
    else:
        monkeypatch.delenv("TRIO_RELAY_REQUIRE_INTEGRATION", raising=False)
    expected = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(expected, match=install):
        find()
