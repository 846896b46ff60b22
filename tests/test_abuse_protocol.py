"""Abuse of the connection rules, end to end: each attack gets its documented, bounded
outcome while a bystander client on another topic keeps receiving, on time.

In-memory relays under the autojump clock (``trio_relay.testing``), so every figure is an
exact virtual time. ``benchmarks/abuse_protocol.py`` runs the same attacks at the scale of
issue 11 against a real relay process and prints what they cost.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from helpers import HOST, RawClient, masked_frame, upgrade_request
from wsproto.events import AcceptConnection, BytesMessage, Pong, Request, TextMessage

from trio_relay import PublishRejected, RelayConfig
from trio_relay._auth import mint_token
from trio_relay.testing import MemoryRelay, open_memory_relay

SECRET = "s" * 32
TICK = 0.01


@asynccontextmanager
async def bystander(relay: MemoryRelay) -> AsyncIterator[None]:
    """A client on topic ``bystander`` that gets a message every 10 ms throughout the
    block; on exit, checks it got every one at the virtual time it was published."""
    lateness: list[float] = []
    sent = 0
    async with relay.consume("bystander") as messages, trio.open_nursery() as nursery:

        async def publish() -> None:
            nonlocal sent
            while True:
                await relay.publish(repr(trio.current_time()), "bystander")
                sent += 1
                await trio.sleep(TICK)

        async def receive() -> None:
            async for message in messages:
                lateness.append(trio.current_time() - float(message))

        nursery.start_soon(receive)
        nursery.start_soon(publish)
        start = trio.current_time()
        yield
        elapsed = trio.current_time() - start
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert sent >= int(elapsed / TICK)
    assert len(lateness) == sent  # every one of them
    assert max(lateness) == 0.0  # none waited behind the attack


async def _send_until_cut(client: RawClient, data: bytes) -> None:
    with contextlib.suppress(trio.BrokenResourceError):
        await client.send_raw(data)


# ------------------------------------------------------------- a burst over the publish rate


async def test_a_burst_over_the_publish_rate_is_published_at_the_rate_and_held_unread(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 11: ``--publish-rate 10 --publish-burst 10``, 5,000 small messages in one write
    were all delivered at once (and the client then frozen for 500 s)."""
    config = RelayConfig(publish_rate=10, publish_burst=10)
    async with open_memory_relay(config) as relay, bystander(relay):
        async with relay.consume() as messages:
            producer = await RawClient.connect(relay)
            start = trio.current_time()
            await producer.send_raw(masked_frame(0x1, b"m") * 5000)  # 35,000 bytes
            times = []
            for _ in range(40):
                await anext(messages)
                times.append(round(trio.current_time() - start, 6))
        # The burst at once, then one message every 0.1 s (the rate).
        assert times == [0.0] * 10 + [round(0.1 * n, 6) for n in range(1, 31)]


async def test_what_the_rate_holds_back_waits_in_the_clients_socket_and_is_not_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(publish_rate=1000, publish_burst=10, receive_buffer_size=16 * 1024)
    async with (
        open_memory_relay(config) as relay,
        bystander(relay),
        relay.consume() as messages,
        trio.open_nursery() as nursery,
    ):
        producer = await RawClient.connect(relay)
        frames = [masked_frame(0x1, b"%05d" % n) for n in range(20_000)]  # 220,000 bytes
        nursery.start_soon(producer.read_to_eof)  # its echoes
        nursery.start_soon(producer.send_raw, b"".join(frames))
        got = [await anext(messages) for _ in range(1000)]
        # One second in: what the relay took is what it published plus at most one
        # read held unparsed; the producer's socket (64 KiB) holds the rest.
        assert trio.current_time() == pytest.approx(0.99)
        taken = relay.server.counters.bytes_in
        assert taken - 1000 * 11 <= 16 * 1024 + 200  # 200: the upgrade request
        got += [await anext(messages) for _ in range(19_000)]
        assert got == [f"{n:05d}" for n in range(20_000)]  # in order, nothing lost
        assert trio.current_time() == pytest.approx(19.99)
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------- ping floods


async def _ping_flooder(relay: MemoryRelay, pongs: list[bytes], pings: int) -> None:
    """Send pings one at a time, each once the previous one's pong came."""
    client = await RawClient.connect(relay)
    for n in range(pings):
        await client.send_raw(masked_frame(0x9, b"%d" % n))
        while not isinstance(event := await client.next_event(), Pong):
            pass
        pongs.append(bytes(event.payload))


async def test_ping_floods_are_answered_at_the_control_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 11: two clients flooding pings (reading their pongs) took the relay's CPU."""
    config = RelayConfig(control_rate=20, control_burst=100)
    async with open_memory_relay(config) as relay, bystander(relay):
        pongs: tuple[list[bytes], list[bytes]] = ([], [])
        start = trio.current_time()
        with trio.move_on_after(5.025):  # halfway between two pongs: no tie to break
            async with trio.open_nursery() as nursery:
                for answered in pongs:
                    nursery.start_soon(_ping_flooder, relay, answered, 10_000)
        # Each: its burst at once, then 20 a second.
        assert trio.current_time() - start == 5.025
        for answered in pongs:
            assert len(answered) == 100 + 5 * 20
            assert answered == [b"%d" % n for n in range(len(answered))]  # each, in order


async def test_pongs_to_a_burst_of_pings_in_one_write_coalesce_to_the_latest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(control_rate=20, control_burst=100)
    async with open_memory_relay(config) as relay, bystander(relay):
        client = await RawClient.connect(relay)
        await client.send_raw(b"".join(masked_frame(0x9, b"%d" % n) for n in range(90)))
        await client.send_raw(masked_frame(0x1, b"after"))
        pong = await client.next_event()
        assert isinstance(pong, Pong) and pong.payload == b"89"  # one pong, to the latest
        assert await client.next_message() == "after"


# ---------------------------------------------------------------- envelope error floods


async def _envelope_client(relay: MemoryRelay, path: str = "/") -> RawClient:
    """A client that speaks ``trio-relay.v1``, past its ``welcome`` frame."""
    client = RawClient(await relay.open_stream())
    await client.send(Request(host=HOST, target=path, subprotocols=["trio-relay.v1"]))
    accepted = await client.next_event()
    assert isinstance(accepted, AcceptConnection) and accepted.subprotocol == "trio-relay.v1"
    (welcome,) = await _frames(client, 1)
    assert welcome["type"] == "welcome"
    return client


async def _frames(client: RawClient, count: int) -> list[dict[str, object]]:
    """The next ``count`` JSON frames the relay sends."""
    return [json.loads(await client.next_message()) for _ in range(count)]


async def test_an_empty_frame_flood_gets_errors_at_the_control_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 11: 64 KiB of empty frames to an envelope connection got 10,922 error frames."""
    config = RelayConfig(control_rate=20, control_burst=100)
    async with open_memory_relay(config) as relay, bystander(relay):
        client = await _envelope_client(relay)
        start = trio.current_time()
        await client.send_raw(masked_frame(0x1, b"") * (64 * 1024 // 6))
        errors = await _frames(client, 100)
        assert trio.current_time() == start  # the burst at once
        assert {e["code"] for e in errors} == {"not-json"}
        errors = await _frames(client, 20)
        assert trio.current_time() - start == pytest.approx(1.0)  # then 20 a second


async def test_a_wrong_topic_error_echoes_at_most_128_characters_of_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, bystander(relay):
        client = await _envelope_client(relay, "/news")
        frame = {"type": "publish", "id": "m-1", "text": "x", "topic": "t" * 100_000}
        await client.send_raw(masked_frame(0x1, json.dumps(frame).encode()))
        (error,) = await _frames(client, 1)
        assert (error["code"], error["id"]) == ("wrong-topic", "m-1")
        assert error["detail"] == (
            "this connection publishes to topic 'news', not '"
            + "t" * 104
            + "... (100002 characters)"
        )


async def test_errors_count_toward_the_publish_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(publish_rate=10, publish_burst=10)
    async with open_memory_relay(config) as relay, bystander(relay):
        client = await _envelope_client(relay)
        start = trio.current_time()
        good = json.dumps({"type": "publish", "text": "ok", "echo": False}).encode()
        await client.send_raw(masked_frame(0x1, b"!") * 15 + masked_frame(0x1, good))
        await _frames(client, 15)  # the errors: 10 at once, then 10 a second
        assert trio.current_time() - start == pytest.approx(0.5)
        (ack,) = await _frames(client, 1)
        assert ack["type"] == "ack" and trio.current_time() - start == pytest.approx(0.6)


# ------------------------------------------------------------------------- conformance


async def test_a_ping_between_fragments_in_one_write_is_answered_before_the_echo(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, bystander(relay):
        client = await RawClient.connect(relay)
        await client.send_raw(
            masked_frame(0x1, b"hel", fin=False)
            + masked_frame(0x9, b"ping")
            + masked_frame(0x0, b"lo")
        )
        first = await client.next_event()
        assert isinstance(first, Pong) and first.payload == b"ping"
        echo = await client.next_event()
        assert isinstance(echo, TextMessage) and echo.data == "hello"
        # The same for a message before the ping and one after it, in one write.
        await client.send_raw(
            masked_frame(0x2, b"before") + masked_frame(0x9, b"p2") + masked_frame(0x2, b"after")
        )
        events = [await client.next_event() for _ in range(3)]
        assert [type(e) for e in events] == [BytesMessage, Pong, BytesMessage]
        assert [bytes(e.data) for e in (events[0], events[2])] == [b"before", b"after"]


async def test_an_unsupported_version_gets_426_naming_version_13(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, bystander(relay):
        stream = await relay.open_stream()
        await stream.send_all(upgrade_request().replace(b"Version: 13", b"Version: 8"))
        response = b""
        while chunk := await stream.receive_some():
            response += chunk
        head = response.partition(b"\r\n\r\n")[0].split(b"\r\n")
        assert head[0] == b"HTTP/1.1 426 Upgrade Required"
        assert b"Sec-WebSocket-Version: 13" in head[1:]


# ---------------------------------------------------------------------- issue 14 (1, 8)


async def test_a_forbidden_envelope_publish_fails_at_once_with_the_relays_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 14, 1: the ``forbidden`` error frame had no ``id``: produce() waited 10 s."""
    async with open_memory_relay(RelayConfig(auth_secret=SECRET)) as relay:
        token = mint_token(SECRET, subscribe=["news"])
        start = trio.current_time()
        with pytest.raises(PublishRejected) as caught:
            await relay.produce("hi", f"news?token={token}", envelope=True)
        assert trio.current_time() == start
        assert caught.value.code == "forbidden"
        assert caught.value.detail == "the token does not allow publishing to topic 'news'"


async def test_an_envelope_frame_over_the_limit_is_closed_1009_saying_what_was_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 14, 8: a 1,000,000-byte binary message is accepted raw, but as an envelope its
    frame (JSON, base64) is over 1 MiB; the close reason says so."""
    async with open_memory_relay() as relay, bystander(relay):
        raw = await RawClient.connect(relay)
        await raw.send_raw(masked_frame(0x2, bytes(1_000_000)))
        assert await raw.next_message() == bytes(1_000_000)
        client = await _envelope_client(relay)
        frame = {"type": "publish", "binary": base64.b64encode(bytes(1_000_000)).decode()}
        body = json.dumps(frame).encode()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_until_cut, client, masked_frame(0x1, body))
            close = await client.next_close()  # at the frame's header, not its end
        assert (close.code, close.reason) == (
            1009,
            f"envelope frame of {len(body)} bytes (JSON, base64 payload) over the "
            "1048576-byte limit",
        )
