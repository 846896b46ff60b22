"""wss://: the relay over TLS, with certificates from trustme, over real sockets."""

from __future__ import annotations

import ssl
from functools import partial

import pytest
import trio
from tls_support import (  # the fixtures, used by name
    ca as ca,
    client_context as client_context,
    server_context as server_context,
)

import trio_relay
from trio_relay import RelayUnavailable, consume, produce, serve_relay


async def test_messages_flow_over_wss(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    server = await nursery.start(partial(serve_relay, "127.0.0.1", 0, ssl_context=server_context))
    url = f"wss://127.0.0.1:{server.port}/news"
    with trio.fail_after(10):
        async with consume(url, ssl_context=client_context, envelope=True) as messages:
            await server.wait_until(lambda s: s.broadcast.subscribers == 1)
            report = await produce(url, "secret", ssl_context=client_context, envelope=True)
            assert report is not None
            assert (report.seq, report.queued) == (1, 2)
            message = await anext(messages)
            assert (message.seq, message.data) == (1, "secret")
            await produce(url, b"\x00bytes", ssl_context=client_context)
            assert (await anext(messages)).data == b"\x00bytes"
    nursery.cancel_scope.cancel()


async def test_a_client_that_does_not_trust_the_certificate_is_refused_and_harms_nobody(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    server = await nursery.start(partial(serve_relay, "127.0.0.1", 0, ssl_context=server_context))
    url = f"wss://127.0.0.1:{server.port}/"
    with trio.fail_after(10):
        with pytest.raises(RelayUnavailable, match="TLS handshake failed"):
            await produce(url, "x")  # the system CAs do not know our test CA
        # Plain ws:// to the TLS port: the relay drops it, and the client says so at once
        # (trio-websocket's handshake alone would wait out the whole timeout).
        start = trio.current_time()
        with pytest.raises(RelayUnavailable) as raised:
            await produce(f"ws://127.0.0.1:{server.port}/", "plain text", timeout=5)
        assert trio.current_time() - start < 4
        assert str(raised.value) == (
            f"ws://127.0.0.1:{server.port}/: the server closed the connection during the "
            "WebSocket handshake (a TLS port? try wss://)"
        )
        await produce(url, "still serving", ssl_context=client_context)
    nursery.cancel_scope.cancel()


async def test_a_v2_session_over_wss(
    nursery: trio.Nursery, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    # Over TLS the relay cannot write through (no non-blocking send): every v2 delivery
    # goes through the subscriptions' queues and the writer that serves them in turn.
    server = await nursery.start(partial(serve_relay, "127.0.0.1", 0, ssl_context=server_context))
    with trio.fail_after(10):
        url = f"wss://127.0.0.1:{server.port}/a"
        async with trio_relay.connect(url, ssl_context=client_context) as session:
            await session.subscribe("b")
            for n in range(20):
                await server.publish(f"a{n}", "a")
                await server.publish(f"b{n}", "b")
            items = [await anext(session) for _ in range(40)]
            assert [i.data for i in items if i.topic == "a"] == [f"a{n}" for n in range(20)]
            assert [i.data for i in items if i.topic == "b"] == [f"b{n}" for n in range(20)]
            report = await session.publish("a", "back")
            assert report.seq == 21
    nursery.cancel_scope.cancel()
