"""Issue 11, tried as an attacker would: tokens, topic names and the logs.

Each test is one row of the issue's table at a scale CI affords, with a bystander client
that keeps receiving throughout. In-memory relays under the autojump clock; no sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from helpers import HOST, RawClient, rejected, upgrade_request
from wsproto.events import AcceptConnection, Request

from trio_relay import SUBPROTOCOL, RelayConfig
from trio_relay._auth import mint_token
from trio_relay.testing import MemoryRelay, open_memory_relay

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
