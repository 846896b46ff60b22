"""trio_relay.testing: socket-like in-memory streams, the memory listener, the fixture."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import tomllib
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_relay import Message, RelayServer, Topics, consume, produce, serve_relay
from trio_relay.testing import (
    MemoryListener,
    MemoryRelay,
    open_memory_relay,
    socket_like_stream_pair,
)


async def test_the_pipes_honour_trios_stream_contract() -> None:
    # trio's own conformance suite for two-way streams. A "clogged" pair is one whose
    # sends block until the other side reads: room for one byte, already taken.
    async def pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        return socket_like_stream_pair()

    async def clogged() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        a, b = socket_like_stream_pair(capacity=1)
        await a.send_all(b"\0")
        await b.send_all(b"\0")
        return a, b

    await trio.testing.check_two_way_stream(pair, clogged)


async def test_a_writer_blocks_once_the_pipe_holds_capacity_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = socket_like_stream_pair(capacity=10)
    await a.send_all(b"0123456789")  # exactly full: returns
    with trio.move_on_after(1) as scope:
        await a.send_all(b"!")
    assert scope.cancelled_caught
    assert await b.receive_some() == b"0123456789"


async def test_a_cancelled_write_may_leave_part_of_its_data_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = socket_like_stream_pair(capacity=4)
    with trio.move_on_after(1):
        await a.send_all(b"abcdefgh")
    assert await b.receive_some() == b"abcd"  # like a socket: half a message went out


async def test_closing_one_end_is_eof_for_the_reader_and_broken_for_the_writer() -> None:
    a, b = socket_like_stream_pair()
    await a.send_all(b"last words")
    await a.aclose()
    assert await b.receive_some() == b"last words"
    assert await b.receive_some() == b""
    with pytest.raises(trio.BrokenResourceError):
        await b.send_all(b"anyone there?")
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all(b"x")


async def test_the_listener_hands_over_connections_in_order_and_refuses_after_close() -> None:
    listener = MemoryListener()
    first = await listener.connect()
    second = await listener.connect()
    accepted_first = await listener.accept()
    accepted_second = await listener.accept()
    await first.send_all(b"1")
    await second.send_all(b"2")
    assert await accepted_first.receive_some() == b"1"
    assert await accepted_second.receive_some() == b"2"
    await listener.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await listener.connect()
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()


async def test_the_listener_drops_the_accepted_ends_still_open_as_a_network_failure_would() -> None:
    listener = MemoryListener()
    first, second = await listener.connect(), await listener.connect()
    accepted_first, accepted_second = await listener.accept(), await listener.accept()
    await accepted_second.aclose()  # the server is done with this one
    assert await listener.drop_connections() == 1
    assert await first.receive_some() == b""  # no goodbye: end of stream
    with pytest.raises(trio.ClosedResourceError):
        await accepted_first.receive_some()  # the server's end is gone under it
    assert await second.receive_some() == b""
    assert await listener.drop_connections() == 0


async def test_the_memory_relay_fixture_is_a_running_relay(
    memory_relay: MemoryRelay, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_relay.consume() as messages:
        await memory_relay.produce("via the fixture")
        assert await anext(messages) == "via the fixture"
    assert memory_relay.url == "ws://relay.test/"


async def test_leaving_open_memory_relay_stops_the_relay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        pass
    with pytest.raises(trio.ClosedResourceError):
        await relay.open_stream()


# ------------------------------------------------------------------------ the README's kit

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
TESTING = README[README.index("### 3. In your tests") : README.index("## Behaviour")]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


async def test_a_resuming_consumer_gets_what_was_published_while_it_was_cut_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        open_memory_relay() as relay,
        consume(relay.url + "news", resume=True, connector=relay.open_stream) as items,
    ):
        await relay.server.wait_until(lambda stats: stats.subscribers == 1)
        await relay.server.publish("first", topic="news")
        assert await anext(items) == Message("news", 1, "first")
        assert await relay.drop_connections() == 1  # as a network failure: no close frame
        await relay.server.publish("while cut off", topic="news")
        # It reconnects after 0.1 s and resumes after message 1: nothing lost, nothing twice.
        assert await anext(items) == Message("news", 2, "while cut off")


def test_the_readme_shows_the_resume_example_verbatim() -> None:
    source = inspect.getsource(
        test_a_resuming_consumer_gets_what_was_published_while_it_was_cut_off
    )
    assert source in TESTING


def test_the_readme_writes_each_call_of_the_kit_as_it_must_be_written() -> None:
    # Copied as shown, `relay.drop_connections()` without `await` warned "coroutine was
    # never awaited" and a resume test passed without dropping anything.
    table = TESTING[TESTING.index("\n| ", TESTING.index("The kit")) :].split("\n\n")[0]
    checked = []
    for span in re.findall(r"`([^`]+)`", table):
        for match in re.finditer(
            r"(?P<prefix>await |async with )?(?:MemoryRelay|relay)(?P<server>\.server)?"
            r"\.(?P<name>\w+)\(",
            span,
        ):
            owner = RelayServer if match["server"] else MemoryRelay
            function = getattr(owner, match["name"])
            if inspect.iscoroutinefunction(function):
                assert match["prefix"] == "await ", span
            elif inspect.isasyncgenfunction(getattr(function, "__wrapped__", None)):
                assert match["prefix"] == "async with ", span  # an async context manager
            else:
                assert match["prefix"] is None, span
            checked.append(match["name"])
    assert {"drop_connections", "publish", "open_stream", "wait_until", "consume"} <= set(checked)
    assert "`relay.url`" in table


def test_the_testing_extra_brings_what_the_kit_needs_and_nothing_else() -> None:
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    extra = project["project"]["optional-dependencies"]["testing"]
    assert sorted(re.split(r"[<>=!~ ]", requirement)[0] for requirement in extra) == [
        "pytest",
        "pytest-trio",
    ]
    assert all(">=" in requirement for requirement in extra)  # lower bounds pinned
    assert "pip install 'trio-relay[testing]'" in TESTING


def test_the_readme_example_runs_in_a_fresh_project_set_up_as_the_readme_says(
    tmp_path: Path,
) -> None:
    # What a new user does: copy the example test, and the configuration the README gives.
    example = next(block for block in _blocks(TESTING, "python") if "def test_" in block)
    (tmp_path / "test_example.py").write_text(example)

    def pytest_in(directory: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    bare = pytest_in(tmp_path)  # what the issue saw
    assert "async def functions are not natively supported" in bare.stdout, bare.stdout
    assert "1 passed" not in bare.stdout
    [configuration] = _blocks(TESTING, "toml")
    (tmp_path / "pyproject.toml").write_text(configuration)
    configured = pytest_in(tmp_path)
    assert configured.returncode == 0, configured.stdout + configured.stderr
    assert "1 passed" in configured.stdout


async def test_the_host_program_reads_what_clients_publish_through_shared_topics(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The README's library section: serve_relay(topics=...) and topics.subscribe(...).
    assert 'topics.subscribe("orders")' in README and "topics=topics" in README
    topics = Topics()
    listener = MemoryListener()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_relay, listeners=[listener], topics=topics))
        async with topics.subscribe("orders") as orders:
            await produce("ws://relay.test/orders", "two pizzas", stream=await listener.connect())
            assert await anext(orders) == Message("orders", 1, "two pizzas")
            report = await server.publish("ack: two pizzas", topic="orders")
            assert report.seq == 2
            assert await anext(orders) == Message("orders", 2, "ack: two pizzas")
        nursery.cancel_scope.cancel()
