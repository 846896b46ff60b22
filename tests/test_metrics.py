"""Operations: /healthz and Prometheus /metrics on the side port, over real sockets."""

from __future__ import annotations

import json
from functools import partial

import pytest
import trio
from helpers import http_request
from prometheus_client.parser import text_string_to_metric_families

from trio_relay import HandshakeRejected, RelayConfig, consume, produce, serve_metrics, serve_relay


async def _get(port: int, path: str) -> tuple[int, bytes]:
    status, _, body = await http_request(port, path)
    return status, body


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


async def test_healthz_and_metrics_report_the_relay(nursery: trio.Nursery) -> None:
    server = await nursery.start(
        partial(serve_relay, "127.0.0.1", 0, config=RelayConfig(max_subscribers_per_topic=1))
    )
    [listener] = await nursery.start(serve_metrics, server, "127.0.0.1", 0)
    port = listener.socket.getsockname()[1]
    url = f"ws://127.0.0.1:{server.port}/news"
    with trio.fail_after(10):
        async with consume(url) as messages:
            await server.wait_until(lambda s: s.broadcast.subscribers == 1)
            status, body = await _get(port, "/healthz")
            assert status == 200
            assert json.loads(body) == {"status": "ok", "connections": 1}
            await produce(f"ws://127.0.0.1:{server.port}/", "hello")  # 5 bytes, root topic
            await server.publish("from the server", "news")
            assert await anext(messages) == "from the server"
            with pytest.raises(HandshakeRejected) as refused:  # the topic is full
                await produce(url, "x", timeout=2)
            assert refused.value.status_code == 503
            status, body = await _get(port, "/metrics")
    assert status == 200
    samples = _samples(body)
    assert samples[("trio_relay_connections", ())] == 1
    assert samples[("trio_relay_messages_received_total", ())] == 1
    assert samples[("trio_relay_received_bytes_total", ())] > 5
    # "hello" to its producer (on /), "from the server" to the consumer of /news.
    assert samples[("trio_relay_messages_sent_total", ())] == 2
    assert samples[("trio_relay_sent_bytes_total", ())] > 0
    assert samples[("trio_relay_rejected_total", (("reason", "http-503"),))] == 1
    assert samples[("trio_relay_evicted_total", ())] == 0
    assert ("trio_relay_queued_bytes", ()) in samples
    status, _ = await _get(port, "/nope")
    assert status == 404
    nursery.cancel_scope.cancel()
