"""Abuse of the connection limits, the listener and the side port (issue 11), at a scale CI
affords: each test asserts the bound, and a bystander client keeps receiving where one can.

In-memory relays under the autojump clock, except where sockets and descriptors are the
point (the per-address limit needs two client addresses: 127.0.0.1 and 127.0.0.2).
``benchmarks/abuse_limits.py`` runs the same attacks at the issue's scale.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
from functools import partial

import pytest
import trio
import trio.testing
from helpers import HOST, RawClient, upgrade_request
from test_scale import count_calls
from wsproto.events import AcceptConnection, Request

from trio_relay import BroadcastTotals, RelayConfig, Topics, serve_metrics, serve_relay
from trio_relay.testing import MemoryListener, open_memory_relay

HALF_REQUEST = b"GET / HTTP/1.1\r\nHost: relay.test\r\nUpgrade: websocket\r\n"


async def status_of(stream: trio.abc.Stream) -> int:
    """The HTTP status the relay answered on ``stream`` (0 if it closed without one)."""
    head = b""
    while b"\r\n" not in head:
        try:
            chunk = await stream.receive_some()
        except trio.BrokenResourceError:
            chunk = b""
        if not chunk:
            return 0
        head += chunk
    return int(head.split(b" ", 2)[1])


async def send_ignoring_refusal(stream: trio.abc.Stream, data: bytes) -> None:
    # A connection refused when accepted may be closed before the client writes.
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(data)


async def test_half_sent_requests_count_toward_max_connections_from_accept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(max_connections=20, max_connections_per_ip=10_000)
    async with open_memory_relay(config) as relay, relay.consume("news") as bystander:
        start = trio.current_time()
        held, refused = [], []
        for _ in range(100):
            stream = await relay.open_stream()
            await send_ignoring_refusal(stream, HALF_REQUEST)
            held.append(stream)
        await trio.testing.wait_all_tasks_blocked()
        # The bystander and 19 half-open requests hold the 20 slots; the other 81 were
        # answered 503 and closed at once, without waiting for their requests.
        assert relay.server.statistics().connections == 20
        assert trio.current_time() == start  # no waiting for anything
        for stream in held:
            with trio.move_on_after(0.001):
                refused.append(await status_of(stream))
        assert refused.count(503) == 81
        assert relay.server.counters.rejections["http-503"] == 81
        await relay.publish("still here", "news")
        assert await anext(bystander) == "still here"
        # Half-open requests hold their slots for handshake_timeout (10 s), then go.
        await relay.server.wait_until(lambda s: s.connections == 1)
        assert trio.current_time() - start == pytest.approx(config.handshake_timeout)
        await RawClient.connect(relay)  # room again


async def test_half_sent_requests_from_one_address_hold_only_its_share(
    nursery: trio.Nursery,
) -> None:
    # Real sockets: the per-address limit needs a second address (Linux routes 127.0.0.0/8).
    config = RelayConfig(max_connections=20, max_connections_per_ip=5, handshake_timeout=30)
    server = await nursery.start(partial(serve_relay, "127.0.0.1", 0, config=config))
    attackers = []
    with trio.fail_after(10):
        for _ in range(60):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            await send_ignoring_refusal(stream, HALF_REQUEST)
            attackers.append(stream)
        statuses = [0] * len(attackers)
        answered = trio.Event()

        async def read_status(index: int, stream: trio.SocketStream) -> None:
            with contextlib.suppress(OSError):
                statuses[index] = await status_of(stream)
            if statuses.count(503) == 55:
                answered.set()

        async with trio.open_nursery() as readers:
            for index, stream in enumerate(attackers):
                readers.start_soon(read_status, index, stream)
            await answered.wait()  # the 5 held ones get no answer: they wait for the rest
            readers.cancel_scope.cancel()
        assert server.statistics().connections == 5
        assert server.counters.rejections["http-503"] == 55
        # Another address is not affected: it connects, subscribes and receives.
        stream = await trio.open_tcp_stream("127.0.0.1", server.port, local_address="127.0.0.2")
        bystander = RawClient(stream)
        await bystander.send(Request(host=HOST, target="/"))
        assert isinstance(await bystander.next_event(), AcceptConnection)
        await server.wait_until(lambda s: s.subscribers == 1)
        await server.publish("for the bystander")
        assert await bystander.next_message() == "for the bystander"
        for stream in attackers:
            await stream.aclose()
        await bystander.stream.aclose()
    nursery.cancel_scope.cancel()


class ExhaustedListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose ``accept`` fails with EMFILE (out of descriptors) until
    ``recover_at``, then hands out the connections of a :class:`MemoryListener`."""

    def __init__(self, recover_at: float) -> None:
        self.inner = MemoryListener()
        self.recover_at = recover_at
        self.failures = 0

    async def accept(self) -> trio.abc.Stream:
        await trio.sleep(0)
        if trio.current_time() < self.recover_at:
            self.failures += 1
            raise OSError(errno.EMFILE, "Too many open files")
        return await self.inner.accept()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_out_of_descriptors_the_listener_backs_off_logs_once_per_interval_and_recovers(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    listener = ExhaustedListener(recover_at=60.0)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_relay, listeners=[listener]))
        client = await listener.inner.connect()  # queued while accept fails
        await client.send_all(upgrade_request())
        await server.wait_until(lambda s: s.subscribers == 1)
        recovered = trio.current_time()
        nursery.cancel_scope.cancel()
    # Backing off: 50 ms doubling to 1 s, so about one accept a second, not ten.
    assert 55 <= listener.failures <= 70
    lines = [r.getMessage() for r in caplog.records if "accept" in r.getMessage()]
    # One line per 10 s of trouble (the first at once), and one when it is over.
    assert len(lines) == 7, lines
    assert lines[0].startswith("the relay cannot accept connections: EMFILE")
    assert "more like it" in lines[1]
    assert "accepts connections again" in lines[-1]
    assert not [r for r in caplog.records if r.name == "trio.serve_listeners"]
    assert 60.0 <= recovered <= 61.0


async def test_200_handshakes_at_once_admit_exactly_the_topics_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(max_subscribers_per_topic=5)
    async with open_memory_relay(config) as relay, relay.consume("other") as bystander:
        streams = [await relay.open_stream() for _ in range(200)]
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(stream.send_all, upgrade_request("/crowded"))
        statuses = []
        for stream in streams:
            statuses.append(await status_of(stream))
        assert statuses.count(101) == 5
        assert statuses.count(503) == 195
        assert relay.server.statistics().subscribers == 6  # the 5 and the bystander
        await relay.publish("elsewhere", "other")
        assert await anext(bystander) == "elsewhere"
        for stream in streams:
            await stream.aclose()
        await relay.server.wait_until(lambda s: s.connections == 1)
        await RawClient.connect(relay, "/crowded")  # the slots were given back


@pytest.mark.parametrize("limit", ["max_connections", "max_connections_per_ip"])
async def test_200_connections_at_once_admit_exactly_the_connection_limit(
    autojump_clock: trio.testing.MockClock, limit: str
) -> None:
    config = RelayConfig(**{limit: 5})  # type: ignore[arg-type]
    async with open_memory_relay(config) as relay:
        streams = [await relay.open_stream() for _ in range(200)]
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(send_ignoring_refusal, stream, upgrade_request())
        statuses = [await status_of(stream) for stream in streams]
        assert statuses.count(101) == 5
        assert statuses.count(503) == 195
        assert relay.server.statistics().connections == 5


# ---------------------------------------------------------------- the side port


async def get(listener: MemoryListener, path: str) -> tuple[int, bytes]:
    """One request to an in-memory side port: the status and the body."""
    stream = await listener.connect()
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    response = b""
    while chunk := await stream.receive_some():
        response += chunk
    await stream.aclose()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_the_side_port_caps_its_connections_and_times_out_half_sent_requests(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(http_max_connections=10, http_request_timeout=2.0)
    side = MemoryListener()
    async with (
        open_memory_relay(config) as relay,
        relay.consume() as bystander,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(partial(serve_metrics, relay.server, None, 0, listeners=[side]))
        start = trio.current_time()
        held = []
        for _ in range(50):
            stream = await side.connect()
            await send_ignoring_refusal(stream, b"GET /metrics HTTP/1.1\r\n")
            held.append(stream)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == start
        refused = []
        for stream in held[10:]:
            refused.append(await status_of(stream))  # answered at once
        assert refused == [503] * 40
        await relay.publish("the relay is not affected")
        assert await anext(bystander) == "the relay is not affected"
        for stream in held[:10]:
            assert await status_of(stream) == 0  # closed without an answer...
        assert trio.current_time() - start == 2.0  # ...after the request timeout
        assert await get(side, "/healthz") == (200, b'{"status": "ok", "connections": 1}\n')
        nursery.cancel_scope.cancel()


# ------------------------------------------- /metrics, /stats and /healthz at any scale


def test_running_totals_agree_with_the_snapshot_of_every_topic() -> None:
    async def main() -> None:
        topics = Topics(max_buffer=2, policy="drop", timeout=0)
        async with contextlib.AsyncExitStack() as stack:
            for name in ("a", "b"):
                await stack.enter_async_context(topics.subscribe(name))
            evicted = await stack.enter_async_context(topics.subscribe("a", policy="evict"))
            for i in range(5):
                await topics.publish("a", f"m{i}")
            await topics.publish("b", "only one")
            assert evicted.subscription.evicted
            snapshot = topics.statistics().values()
            totals = topics.totals.snapshot()
            assert totals == BroadcastTotals(
                published=sum(t.broadcast.published for t in snapshot),
                dropped=sum(t.broadcast.dropped for t in snapshot),
                evicted=sum(t.broadcast.evicted for t in snapshot),
                queued=sum(sum(t.broadcast.queued) for t in snapshot),
                queued_bytes=sum(
                    s.queued_bytes for t in snapshot for s in t.broadcast.subscriptions
                ),
            )
            assert (totals.published, totals.dropped) == (6, 3)
            assert (totals.evicted, totals.queued) == (1, 3)
        # Everything queued was discarded with the subscriptions; the lifetime counts stay.
        assert topics.totals.snapshot() == BroadcastTotals(6, 3, 1, 0, 0)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def scrape_costs(count: int) -> dict[str, int]:
    """Calls made by one request for each side-port page, with ``count`` topics that each
    retain a message and have a subscriber with a message queued."""
    side = MemoryListener()
    costs = {}
    async with open_memory_relay() as relay, contextlib.AsyncExitStack() as stack:
        for index in range(count):
            await relay.publish("retained", f"t{index}")
            await stack.enter_async_context(relay.server.topics.subscribe(f"t{index}"))
            await relay.publish("queued", f"t{index}")
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_metrics, relay.server, None, 0, listeners=[side]))
            for path in ("/metrics", "/stats", "/healthz"):
                body = b""

                async def request(path: str = path) -> None:
                    nonlocal body
                    status, body = await get(side, path)
                    assert status == 200

                costs[path] = await count_calls(request)
                if path == "/metrics":
                    assert f"trio_relay_topics {count}.0".encode() in body
                    assert f"trio_relay_queued_batches {count}.0".encode() in body
                if path == "/stats":
                    assert json.loads(body)["subscribers"] == count
            nursery.cancel_scope.cancel()
    return costs


async def test_metrics_stats_and_healthz_cost_the_same_at_2000_topics_as_at_20(
    autojump_clock: trio.testing.MockClock,
) -> None:
    small = await scrape_costs(20)
    large = await scrape_costs(2000)
    for path, cost in small.items():
        # Equal up to noise: a cost per topic or subscription would add 2000+ calls.
        assert large[path] <= cost * 1.2 + 100, (path, small, large)
