"""Operations: /healthz and Prometheus /metrics on the side port, over real sockets."""

from __future__ import annotations

import ast
import json
from functools import partial
from pathlib import Path

import pytest
import trio
from helpers import http_request
from prometheus_client.parser import text_string_to_metric_families

import trio_relay
from trio_relay import HandshakeRejected, RelayConfig, consume, produce, serve_metrics, serve_relay
from trio_relay._counters import REJECTION_REASONS
from trio_relay._topics import ENTRY_OVERHEAD, TOPIC_OVERHEAD


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
    assert samples[("trio_relay_connections_rejected_total", (("reason", "http-503"),))] == 1
    assert samples[("trio_relay_subscribers_evicted_total", ())] == 0
    assert samples[("trio_relay_batches_published_total", ())] == 2
    assert ("trio_relay_queued_bytes", ()) in samples
    status, _ = await _get(port, "/nope")
    assert status == 404
    nursery.cancel_scope.cancel()


async def test_metrics_from_the_start_every_reason_build_info_and_process_metrics(
    nursery: trio.Nursery,
) -> None:
    server = await nursery.start(partial(serve_relay, "127.0.0.1", 0))
    [listener] = await nursery.start(serve_metrics, server, "127.0.0.1", 0)
    status, body = await _get(listener.socket.getsockname()[1], "/metrics")
    assert status == 200
    samples = _samples(body)
    reasons = {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "trio_relay_connections_rejected_total"
    }
    assert reasons == dict.fromkeys(REJECTION_REASONS, 0)
    assert set(REJECTION_REASONS) >= {"handshake-timeout", "http-400", "http-401", "http-503"}
    assert samples[("trio_relay_build_info", (("version", trio_relay.__version__),))] == 1
    for name in (
        "trio_relay_batches_dropped_total",
        "trio_relay_subscribers_evicted_total",
        "trio_relay_batches_published_total",
        "trio_relay_queued_batches",
        "trio_relay_queued_bytes",
        "trio_relay_history_bytes",
        "trio_relay_unfinished_message_bytes",
    ):
        assert samples[(name, ())] == 0, name
    # The renamed ones are gone (README "Health and metrics" lists the renames).
    assert not {name for name, _ in samples} & {
        "trio_relay_dropped_total",
        "trio_relay_evicted_total",
        "trio_relay_rejected_total",
        "trio_relay_published_batches_total",
    }
    # prometheus-client's standard process, platform and gc metrics.
    assert samples[("process_open_fds", ())] > 0
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert any(name == "python_info" for name, _ in samples)
    assert any(name == "python_gc_collections_total" for name, _ in samples)
    nursery.cancel_scope.cancel()


async def test_metrics_show_what_the_global_budgets_hold(nursery: trio.Nursery) -> None:
    server = await nursery.start(partial(serve_relay, "127.0.0.1", 0))
    [listener] = await nursery.start(serve_metrics, server, "127.0.0.1", 0)
    await server.publish("kept for resuming", "news")
    assert server.unfinished.claim().resize(1234)  # as a connection with half a message
    _, body = await _get(listener.socket.getsockname()[1], "/metrics")
    samples = _samples(body)
    retained = len("kept for resuming") + ENTRY_OVERHEAD + TOPIC_OVERHEAD
    assert samples[("trio_relay_history_bytes", ())] == retained == server.topics.retained_bytes
    assert samples[("trio_relay_unfinished_message_bytes", ())] == 1234
    nursery.cancel_scope.cancel()


def test_every_status_the_relay_refuses_with_is_a_known_rejection_reason() -> None:
    # A new `reject(NNN, ...)` must be added to REJECTION_REASONS, or /metrics would show
    # its reason only after the first such rejection.
    package = Path(trio_relay.__file__).parent
    statuses = {
        node.args[0].value
        for path in package.glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "reject"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }
    assert statuses >= {400, 401, 403, 431, 503}
    # 426 comes from wsproto (an unsupported Sec-WebSocket-Version), not a literal here.
    assert {f"http-{status}" for status in statuses | {426}} <= set(REJECTION_REASONS)
