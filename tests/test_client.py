"""produce() and consume(): the seed's clients, and the errors they raise.

In-memory connections under the autojump clock, except where a real socket is the point
(an unreachable address).
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import socket
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from trio_relay import (
    Broadcast,
    BroadcastStatistics,
    ClientError,
    ConsumerState,
    HandshakeRejected,
    Message,
    MessageStream,
    PublishReport,
    RelayConfig,
    RelayConnectionClosed,
    RelayError,
    RelayTimeout,
    RelayUnavailable,
    Subscription,
    Topics,
    consume,
    encode_frame,
    open_producer,
    produce,
    serve_metrics,
    serve_relay,
)
from trio_relay._topics import Batch
from trio_relay.testing import (
    MemoryListener,
    MemoryRelay,
    open_memory_relay,
    socket_like_stream_pair,
)


class _Bus:
    """A broadcast wrapper whose publish() a test can bend."""

    def __init__(self, *, swallow: bool = False, noise: bytes | None = None) -> None:
        self.inner = Broadcast[Batch | bytes](size_of=len)
        self.swallow = swallow
        self.noise = noise

    def join(self, **kwargs: Any) -> Subscription[Batch | bytes]:
        return self.inner.join(**kwargs)

    def leave(self, subscription: Subscription[Batch | bytes]) -> None:
        self.inner.leave(subscription)

    async def publish(self, message: bytes) -> PublishReport:
        if self.swallow:
            return PublishReport(queued=0, dropped=0, evicted=0)
        if self.noise is not None:
            await self.inner.publish(self.noise)
        return await self.inner.publish(message)

    def publish_nowait(self, message: bytes) -> PublishReport:
        raise trio.WouldBlock  # always take the async path, where the test bends things

    def statistics(self) -> BroadcastStatistics:
        return self.inner.statistics()


async def _relay_with(nursery: trio.Nursery, bus: _Bus) -> MemoryRelay:
    listener = MemoryListener()
    topics = Topics(broadcast_factory=lambda _name: bus)
    server = await nursery.start(partial(serve_relay, listeners=[listener], topics=topics))
    return MemoryRelay(server, listener, nursery.cancel_scope, trio.Event())


async def test_produce_returns_once_its_own_echo_arrives(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, relay.consume() as messages:
        await relay.produce("ack me")
        assert await anext(messages) == "ack me"
        assert relay.server.statistics().broadcast.published == 1


async def test_produce_skips_other_messages_until_its_echo(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        bus = _Bus(noise=encode_frame("someone else's"))
        relay = await _relay_with(nursery, bus)
        async with relay.consume() as messages:
            await relay.produce("mine")
            assert [await anext(messages), await anext(messages)] == ["someone else's", "mine"]
        nursery.cancel_scope.cancel()


async def test_produce_times_out_when_no_echo_comes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        relay = await _relay_with(nursery, _Bus(swallow=True))
        start = trio.current_time()
        with pytest.raises(RelayTimeout) as raised:
            await relay.produce("lost", timeout=7.0)
        assert trio.current_time() - start == 7.0
        assert raised.value.url == relay.url
        assert "not acknowledged within 7.0 s" in str(raised.value)
        nursery.cancel_scope.cancel()


async def test_a_refused_handshake_raises_handshake_rejected_with_the_status(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        url = "ws://relay.test/not//a/topic"
        with pytest.raises(HandshakeRejected) as raised:
            await produce(url, "x", stream=await relay.open_stream())
        assert raised.value.status_code == 400
        assert raised.value.url == url
        assert "HTTP 400" in str(raised.value)
        assert "single '/'" in str(raised.value)


async def test_a_relay_that_never_answers_the_handshake_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listener = MemoryListener()  # accepts nothing: the request sits unanswered
    start = trio.current_time()
    with pytest.raises(RelayTimeout):
        async with consume(
            "ws://silent.test/", connect_timeout=3.0, stream=await listener.connect()
        ):
            pytest.fail("connected to a relay that never answered")  # pragma: no cover
    assert trio.current_time() - start == 3.0


async def test_an_unreachable_relay_raises_relay_unavailable() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago, now closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/"
    with pytest.raises(RelayUnavailable) as raised:
        await produce(url, "anyone?")
    assert raised.value.url == url
    assert isinstance(raised.value, ClientError)
    assert isinstance(raised.value, RelayError)


async def test_consume_raises_relay_connection_closed_1001_when_the_relay_shuts_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, relay.consume() as messages:
        await relay.publish("before")
        assert await anext(messages) == "before"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.shutdown)
            with pytest.raises(RelayConnectionClosed) as raised:
                await anext(messages)
        assert raised.value.code == 1001
        assert raised.value.reason == "relay shutting down"


async def test_consume_raises_1008_when_this_consumer_was_evicted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(queue_size=2, overflow_timeout=1.0, slow_consumer_timeout=5.0)
    async with (
        open_memory_relay(config, capacity=512) as relay,
        relay.consume() as messages,
    ):
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(relay.publish, f"{i}" * 100)
        assert relay.server.statistics().broadcast.evicted == 1
        with pytest.raises(RelayConnectionClosed) as raised:
            async for _ in messages:
                pass
        assert raised.value.code == 1008


async def test_messages_can_be_sent_on_a_consuming_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, relay.consume() as a, relay.consume() as b:
        await a.send(b"\x01binary")
        assert await anext(a) == b"\x01binary"
        assert await anext(b) == b"\x01binary"


# ------------------------------------------------------------------------ wrong endpoints


async def _answer_with(stream: trio.abc.Stream, response: bytes) -> None:
    """Play an HTTP server that is not a relay: read the request, answer, hang up."""
    request = b""
    while b"\r\n\r\n" not in request:
        request += await stream.receive_some()
    await stream.send_all(response)
    await stream.aclose()


CONSOLE_PAGE = "<!DOCTYPE html>\n<html>\n" + "<p>the console</p>\n" * 80 + "</html>\n"


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        ("200 OK", CONSOLE_PAGE, "not a WebSocket endpoint (HTTP 200)"),
        ("302 Found", "", "not a WebSocket endpoint (HTTP 302)"),
        ("404 Not Found", CONSOLE_PAGE, "handshake rejected with HTTP 404"),
        (
            "403 Forbidden",
            "topic not allowed\nmore\n",
            "handshake rejected with HTTP 403: topic not allowed ...",
        ),
    ],
)
async def test_a_server_that_is_not_a_relay_is_named_in_one_line(
    autojump_clock: trio.testing.MockClock, status: str, body: str, expected: str
) -> None:
    client, server = socket_like_stream_pair()
    payload = body.encode()
    response = (
        f"HTTP/1.1 {status}\r\nContent-Type: text/html\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_answer_with, server, response)
        with pytest.raises(HandshakeRejected) as raised:
            await produce("ws://side.test:9100/", "hi", stream=client)
    assert str(raised.value) == f"ws://side.test:9100/: {expected}"
    assert (raised.value.body or b"") == payload


async def test_the_relays_side_port_is_not_a_websocket_endpoint(nursery: trio.Nursery) -> None:
    # The case, over real sockets: `produce --port 9100` against the side port.
    server = await nursery.start(partial(serve_relay, "127.0.0.1", 0))
    [listener, *_] = await nursery.start(serve_metrics, server, "127.0.0.1", 0)
    url = f"ws://127.0.0.1:{listener.socket.getsockname()[1]}/"
    with trio.fail_after(10), pytest.raises(HandshakeRejected) as raised:
        await produce(url, "hi")
    assert str(raised.value) == f"{url}: not a WebSocket endpoint (HTTP 200)"
    nursery.cancel_scope.cancel()


async def test_produce_to_a_socket_that_never_answers_says_no_handshake_response(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listener = MemoryListener()  # accepts, and never answers
    start = trio.current_time()
    with pytest.raises(RelayTimeout) as raised:
        await produce("ws://silent.test/", "hi", timeout=4.0, stream=await listener.connect())
    assert trio.current_time() - start == 4.0
    assert str(raised.value) == "ws://silent.test/: no handshake response within 4.0 s"


async def test_an_end_of_stream_during_the_handshake_ends_the_wait_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for ending in ("close", "abort"):
        client, server = socket_like_stream_pair()

        async def hang_up(stream: trio.abc.Stream = server, how: str = ending) -> None:
            await stream.receive_some()
            if how == "close":
                await stream.aclose()
            else:
                await trio.aclose_forcefully(stream)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hang_up)
            with pytest.raises(RelayUnavailable) as raised:
                await produce("ws://tls.test/", "hi", timeout=10.0, stream=client)
        assert trio.current_time() == start
        assert str(raised.value) == (
            "ws://tls.test/: the server closed the connection during the WebSocket handshake "
            "(a TLS port? try wss://)"
        )


# ------------------------------------------------------------------------ message size


async def test_a_message_over_the_clients_limit_is_a_clear_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        async with consume(
            relay.url, stream=await relay.open_stream(), max_message_size=1000
        ) as messages:
            await relay.server.wait_until(lambda s: s.subscribers == 1)
            await relay.publish("x" * 1000)  # at the limit: taken
            assert await anext(messages) == "x" * 1000
            await relay.publish("\x01" * 1001)
            with pytest.raises(RelayConnectionClosed) as raised:
                await anext(messages)
        assert raised.value.code == 1009
        assert str(raised.value) == (
            f"{relay.url}: connection closed with code 1009 (the relay sent a message over "
            "this client's max_message_size of 1000 (characters for text, bytes for binary): "
            "raise max_message_size; a relay's messages are at most its --max-message-size)"
        )
        # The relay closing with 1009 (this client sent too much) stays the relay's reason.
        async with consume(relay.url, stream=await relay.open_stream()) as messages:
            assert isinstance(messages, MessageStream)
            with pytest.raises(RelayConnectionClosed) as raised:
                await messages.send("y" * (RelayConfig().max_message_size + 1))
                await anext(messages)
        assert raised.value.code == 1009
        assert "max_message_size of" not in str(raised.value)


async def test_resume_gives_up_at_once_on_a_message_over_its_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The issue: a message whose envelope is over the client's limit made a resuming
    # consumer reconnect, meet the same message, and reconnect, 80 times in 15 s.
    attempts = 0
    async with open_memory_relay() as relay:

        async def connector() -> trio.abc.Stream:
            nonlocal attempts
            attempts += 1
            return await relay.open_stream()

        await relay.publish("\x01" * 200, "news")  # its envelope: 6 bytes a character
        async with consume(
            relay.url + "news", resume=True, since=0, connector=connector, max_message_size=1000
        ) as items:
            with pytest.raises(RelayConnectionClosed) as raised:
                await anext(items)
    assert raised.value.code == 1009
    assert str(raised.value).endswith(
        "max_message_size of 1000 (characters for text, bytes for binary): raise "
        "max_message_size; a relay's message frames are at most 6 x its --max-message-size "
        "+ 310 bytes)"
    )
    assert attempts == 1


# ------------------------------------------------------------------------ resume


async def test_resume_backs_off_until_a_connection_delivers_something(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A relay that accepts every connection and drops it before any message: the delay
    # must grow (the issue saw 80 reconnections in 15 s), not start over at each handshake.
    attempts: list[float] = []
    new_attempt, attempt_made = trio.open_memory_channel[None](math.inf)
    async with open_memory_relay() as relay:

        async def connector() -> trio.abc.Stream:
            attempts.append(trio.current_time())
            new_attempt.send_nowait(None)
            return await relay.open_stream()

        async def subscribed_anew() -> None:
            # Once an attempt began, the connection before it is gone from the relay.
            await attempt_made.receive()
            await relay.server.wait_until(lambda s: s.subscribers == 1)

        async with consume(relay.url + "t", resume=True, connector=connector) as items:
            for _ in range(6):
                await subscribed_anew()
                assert await relay.drop_connections() == 1
            await subscribed_anew()
            await relay.publish("at last", "t")
            assert await anext(items) == Message("t", 1, "at last")
            # Delivered: a drop now is retried after the first delay again.
            assert await relay.drop_connections() == 1
            await subscribed_anew()
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(attempts)]
    assert gaps == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 0.1]


async def test_resume_reports_its_state_to_on_state_and_the_log(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_relay.client")
    states: list[ConsumerState] = []
    refusals = 2
    async with open_memory_relay() as relay:

        async def connector() -> trio.abc.Stream:
            nonlocal refusals
            if refusals:
                refusals -= 1
                raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
            return await relay.open_stream()

        async with consume(
            relay.url + "t", resume=True, connector=connector, on_state=states.append
        ) as items:
            await relay.server.wait_until(lambda s: s.subscribers == 1)
            assert await relay.drop_connections() == 1
            await relay.publish("back", "t")  # kept for it: it resumes with since=0
            assert await anext(items) == Message("t", 1, "back")
    url = relay.url + "t"
    refused = "cannot connect: [Errno 111] Connection refused"
    lost = "connection closed with code 1006 (connection lost)"  # dropped: no close frame
    assert states == [
        ConsumerState("connecting", url),
        ConsumerState("retrying", url, refused, 0.1),
        ConsumerState("connecting", url),
        ConsumerState("retrying", url, refused, 0.2),
        ConsumerState("connecting", url),
        ConsumerState("connected", url),
        ConsumerState("retrying", url, lost, 0.4),
        ConsumerState("connecting", url),
        ConsumerState("connected", url),
    ]
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "trio_relay.client"]
    assert lines == [
        ("INFO", f"connecting to {url}"),
        ("INFO", f"connection lost ({refused}); retrying in 0.1 s"),
        ("INFO", f"connecting to {url}"),
        ("INFO", f"connection lost ({refused}); retrying in 0.2 s"),
        ("INFO", f"connecting to {url}"),
        ("INFO", f"connected to {url}"),
        ("INFO", f"connection lost ({lost}); retrying in 0.4 s"),
        ("INFO", f"connecting to {url}"),
        ("INFO", f"connected to {url}"),
    ]


async def test_consume_without_resume_reports_connecting_and_connected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    states: list[ConsumerState] = []
    async with (
        open_memory_relay() as relay,
        consume(relay.url, stream=await relay.open_stream(), on_state=states.append),
    ):
        assert states == [
            ConsumerState("connecting", relay.url),
            ConsumerState("connected", relay.url),
        ]


class _Interrupted(Exception):
    pass


async def test_what_the_body_of_a_resuming_consume_raises_comes_out_bare(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Not wrapped in the ExceptionGroup of consume's own nursery: Ctrl-C in the CLI is a bare
    # KeyboardInterrupt (exit status 130), and callers' `except` clauses work.
    async with open_memory_relay() as relay:
        with pytest.raises(_Interrupted):
            async with relay.consume("t", resume=True):
                await relay.server.wait_until(lambda s: s.subscribers == 1)
                raise _Interrupted


async def test_what_the_background_task_raises_is_never_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Ctrl-C can land in consume's own task (while it logs, say). The exception must come
    # out bare, not be swallowed when the channel's close wakes the reader, which ends.
    def interrupt_when_retrying(state: ConsumerState) -> None:
        if state.state == "retrying":
            raise _Interrupted

    async def refuse() -> trio.abc.Stream:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    for _ in range(30):  # trio runs ready tasks in a random order: try both often
        with pytest.raises(_Interrupted):
            async with consume(
                "ws://relay.test/", resume=True, connector=refuse, on_state=interrupt_when_retrying
            ) as items:
                async for _ in items:
                    pytest.fail("nothing to deliver")  # pragma: no cover


# ------------------------------------------------------------------------ several messages


async def test_open_producer_publishes_each_message_on_one_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, relay.consume("t", envelope=True) as messages:
        async with open_producer(
            relay.url + "t", stream=await relay.open_stream(), envelope=True
        ) as producer:
            reports = [await producer.produce(text) for text in ("a", "b", "a")]
            assert relay.server.statistics().connections == 2  # the consumer and this one
        assert [r.seq for r in reports if r is not None] == [1, 2, 3]
        assert [(await anext(messages)).data for _ in range(3)] == ["a", "b", "a"]


async def test_the_state_log_shows_no_token(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_relay.client")
    secret = "eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl"

    async def refuse() -> trio.abc.Stream:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    async with consume(f"ws://relay.test/t?token={secret}", resume=True, connector=refuse):
        await trio.sleep(0.05)  # the first attempt failed; the next is 0.1 s after it
    assert caplog.records
    assert secret not in caplog.text
    assert "ws://relay.test/t?token=<redacted>" in caplog.text
