"""Topics, the ``trio-relay.v1`` envelope protocol, ``since`` and resume, over the real server.

Determinism rules for this module: every in-memory test runs under pytest-trio's
``autojump_clock`` (``MockClock(autojump_threshold=0)``), so time only passes when every
task is blocked, and timings are asserted exactly. Steps are ordered with
``wait_all_tasks_blocked()`` or ``relay.server.wait_until(...)``, never with sleeps; the
only sleeps wait for a virtual *instant* (a publisher's schedule, a drop at 0.21 s). The
property test runs ``trio.run`` under its own ``MockClock``. The last test runs the
``trio-relay`` command over real sockets, with every wait bounded.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import re
import signal
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from helpers import HOST, RawClient, masked_frame, without_epoch
from hypothesis import given, settings, strategies as st
from test_end_to_end import (
    DEBUG,
    PYTHON,
    Launch,
    at,
    launch as launch,  # the fixture: it starts and kills programs
    start_consumer,
    start_server,
)
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request

from trio_relay import (
    SUBPROTOCOL,
    CloseCode,
    DeliveryReport,
    Gap,
    Message,
    RelayConfig,
    RelayConnectionClosed,
    consume,
)
from trio_relay.testing import MemoryRelay, open_memory_relay, socket_like_stream_pair

# ------------------------------------------------------------------------ helpers


async def open_client(relay: MemoryRelay, path: str = "/", *, envelope: bool = False) -> RawClient:
    """A wsproto client on ``path``; with ``envelope`` it asks for ``trio-relay.v1``."""
    client = RawClient(await relay.open_stream())
    subprotocols = [SUBPROTOCOL] if envelope else []
    await client.send(Request(host=HOST, target=path, subprotocols=subprotocols))
    event = await client.next_event()
    assert isinstance(event, AcceptConnection), event
    assert event.subprotocol == (SUBPROTOCOL if envelope else None)
    return client


async def subscribed(relay: MemoryRelay, topic: str, count: int) -> None:
    """Wait until ``topic`` has exactly ``count`` subscriptions."""

    def ready(stats: Any) -> bool:
        return topic in stats.topics and stats.topics[topic].broadcast.subscribers == count

    await relay.server.wait_until(ready)


async def next_frame(client: RawClient) -> dict[str, Any]:
    """The next envelope frame the relay sent ``client``, decoded; the ``welcome`` frame
    that opens every envelope connection is skipped (its own test checks it)."""
    while True:
        data = await client.next_message()
        assert isinstance(data, str), f"envelope frames are text, got {data!r}"
        frame = json.loads(data)
        assert isinstance(frame, dict)
        if frame.get("type") != "welcome":
            return without_epoch(frame)


async def frames(client: RawClient, count: int) -> list[dict[str, Any]]:
    return [await next_frame(client) for _ in range(count)]


async def messages(client: RawClient, count: int) -> list[str | bytes]:
    return [await client.next_message() for _ in range(count)]


def publish(**fields: Any) -> str:
    return json.dumps({"type": "publish", **fields})


def message(topic: str, seq: int, data: str | bytes) -> dict[str, Any]:
    """The ``message`` frame an envelope client gets for ``data``."""
    if isinstance(data, str):
        return {"type": "message", "topic": topic, "seq": seq, "text": data}
    encoded = base64.b64encode(data).decode()
    return {"type": "message", "topic": topic, "seq": seq, "binary": encoded}


def ack(
    topic: str, seq: int, queued: int, *, dropped: int = 0, evicted: int = 0, **id: Any
) -> dict[str, Any]:
    """The ``ack`` frame of a publish (``id=...`` when the publish had one)."""
    report = {"queued": queued, "dropped": dropped, "evicted": evicted}
    return {"type": "ack", "topic": topic, "seq": seq, **id, **report}


def of_type(kind: str, received: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [frame for frame in received if frame["type"] == kind]


async def _at(deadline: float, condition: Callable[[], bool]) -> None:
    """Assert that ``condition`` becomes true exactly at virtual time ``deadline``."""
    await trio.sleep_until(deadline - 1e-6)
    await trio.testing.wait_all_tasks_blocked()
    assert not condition(), f"already true before {deadline}"
    await trio.sleep_until(deadline)
    await trio.testing.wait_all_tasks_blocked()
    assert condition(), f"not true at {deadline}"


# ------------------------------------------------------------------------ topics


async def test_each_topic_reaches_only_its_own_clients(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        news = [await open_client(relay, "/news") for _ in range(2)]
        sport = await open_client(relay, "/sport")
        local = await open_client(relay, "/news/local")
        root = await open_client(relay, "/")
        for topic, count in [("news", 2), ("sport", 1), ("news/local", 1), ("", 1)]:
            await subscribed(relay, topic, count)
        await news[1].send_text("election")
        await sport.send_text("goal")
        await local.send(BytesMessage(data=b"\x00pothole"))
        await root.send_text("hello root")
        await trio.testing.wait_all_tasks_blocked()
        for topic in ("news", "sport", "news/local", ""):
            await relay.publish("end", topic)
        for client in news:
            assert await messages(client, 2) == ["election", "end"]
        assert await messages(sport, 2) == ["goal", "end"]
        assert await messages(local, 2) == [b"\x00pothole", "end"]
        assert await messages(root, 2) == ["hello root", "end"]
        # Every topic numbers its own messages from 1.
        topics = relay.server.statistics().topics
        assert {name: stats.last_seq for name, stats in topics.items()} == {
            "news": 2,
            "sport": 2,
            "news/local": 2,
            "": 2,
        }


async def test_the_root_topic_keeps_the_seed_semantics_byte_for_byte(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        clients = [await open_client(relay, "/") for _ in range(3)]
        observer = await open_client(relay, "/")  # read as bytes, past wsproto
        watcher = await open_client(relay, "/", envelope=True)
        await subscribed(relay, "", 5)
        await clients[0].send_text("one")
        await trio.testing.wait_all_tasks_blocked()
        await clients[1].send(BytesMessage(data=b"\x00\xff"))
        await trio.testing.wait_all_tasks_blocked()
        await clients[2].send_text("thrée")
        # Every client, the sender included, gets every message, text as text, binary as
        # binary, in one order.
        for client in clients:
            assert await messages(client, 3) == ["one", b"\x00\xff", "thrée"]
        expected = b"\x81\x03one" + b"\x82\x02\x00\xff" + b"\x81\x06thr\xc3\xa9e"
        wire = b""
        while len(wire) < len(expected):
            wire += await observer.stream.receive_some()
        assert wire == expected  # plain unmasked frames: no envelope for raw clients
        # An envelope client of the root topic sees the topic named "".
        assert await frames(watcher, 3) == [
            message("", 1, "one"),
            message("", 2, b"\x00\xff"),
            message("", 3, "thrée"),
        ]


async def test_raw_and_envelope_clients_of_a_topic_get_every_message_in_their_protocol(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        raw = await open_client(relay, "/news")
        sender = await open_client(relay, "/news", envelope=True)
        reader = await open_client(relay, "/news", envelope=True)
        await subscribed(relay, "news", 3)
        await raw.send_text("héllo")
        await trio.testing.wait_all_tasks_blocked()
        await raw.send(BytesMessage(data=b"\x00\xff\xfe"))
        await trio.testing.wait_all_tasks_blocked()
        await sender.send_text(publish(text="from envelope"))
        await trio.testing.wait_all_tasks_blocked()
        await sender.send_text(publish(binary=base64.b64encode(b"\x01\x02").decode()))
        expected = [
            message("news", 1, "héllo"),
            message("news", 2, b"\x00\xff\xfe"),
            message("news", 3, "from envelope"),
            message("news", 4, b"\x01\x02"),
        ]
        assert expected[1]["binary"] == "AP/+"
        assert await frames(reader, 4) == expected
        # The sender gets the same messages, and an ack for each of its two publishes.
        received = await frames(sender, 6)
        assert of_type("message", received) == expected
        assert of_type("ack", received) == [ack("news", 3, 3), ack("news", 4, 3)]
        assert await messages(raw, 4) == ["héllo", b"\x00\xff\xfe", "from envelope", b"\x01\x02"]


# ------------------------------------------------------------------------ acks and echo


async def test_an_envelope_publish_is_acknowledged_with_its_delivery_report(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        sender = await open_client(relay, "/news", envelope=True)
        await open_client(relay, "/news")
        await open_client(relay, "/news", envelope=True)
        alone = await open_client(relay, "/sport", envelope=True)
        await subscribed(relay, "news", 3)
        await subscribed(relay, "sport", 1)
        await sender.send_text(publish(id="m-1", text="first"))
        await sender.send_text(publish(id=7, text="second"))
        await sender.send_text(publish(text="third"))
        received = await frames(sender, 6)
        assert of_type("ack", received) == [
            ack("news", 1, 3, id="m-1"),
            ack("news", 2, 3, id=7),
            ack("news", 3, 3),  # no id asked, none given
        ]
        assert "id" not in received[-1]
        await alone.send_text(publish(id="s", text="goal"))
        received = await frames(alone, 2)
        assert of_type("ack", received) == [ack("sport", 1, 1, id="s")]


async def test_produce_with_envelope_returns_the_delivery_report(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        open_memory_relay() as relay,
        relay.consume("news") as raw,
        relay.consume("news", envelope=True) as enveloped,
    ):
        await subscribed(relay, "news", 2)
        # queued counts the producer's own connection and the two consumers.
        assert await relay.produce("hi", "news", envelope=True) == DeliveryReport(
            "news", 1, 1, 3, 0, 0
        )
        assert await relay.produce(b"\x00\x01", "news", envelope=True) == DeliveryReport(
            "news", 2, 1, 3, 0, 0
        )
        assert await relay.produce("quiet", "news", envelope=True, echo=False) == DeliveryReport(
            "news", 3, 1, 3, 0, 0
        )
        assert [await anext(raw) for _ in range(3)] == ["hi", b"\x00\x01", "quiet"]
        assert [await anext(enveloped) for _ in range(3)] == [
            Message("news", 1, "hi"),
            Message("news", 2, b"\x00\x01"),
            Message("news", 3, "quiet"),
        ]
        # Another topic numbers from 1 and has only the producer subscribed.
        assert await relay.produce("x", envelope=True) == DeliveryReport("", 1, 1, 1, 0, 0)


async def test_echo_false_skips_only_the_publishers_own_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        sender = await open_client(relay, "/news", envelope=True)
        other = await open_client(relay, "/news", envelope=True)
        raw = await open_client(relay, "/news")
        await subscribed(relay, "news", 3)
        await sender.send_text(publish(id="a", text="silent", echo=False))
        assert await next_frame(sender) == ack("news", 1, 3, id="a")  # no message before it
        await sender.send_text(publish(id="b", text="loud"))
        received = await frames(sender, 2)
        assert of_type("message", received) == [message("news", 2, "loud")]
        assert of_type("ack", received) == [ack("news", 2, 3, id="b")]
        await relay.publish("end", "news")
        assert await next_frame(sender) == message("news", 3, "end")  # and nothing else
        assert await frames(other, 3) == [
            message("news", 1, "silent"),
            message("news", 2, "loud"),
            message("news", 3, "end"),
        ]
        assert await messages(raw, 3) == ["silent", "loud", "end"]


async def test_publish_frames_of_one_read_get_consecutive_seqs_and_one_ack_each_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        sender = await open_client(relay, "/news", envelope=True)
        raw = await open_client(relay, "/news")
        await subscribed(relay, "news", 2)
        bodies = [
            publish(id="a", text="a"),
            publish(id="b", text="b"),
            publish(id="c", text="c", echo=False),
            publish(id="d", binary="ZA==", echo=False),
            publish(id="x", text="x", topic="sport"),  # invalid, between the valid ones
            publish(id="e", text="e"),
        ]
        await sender.send_raw(b"".join(masked_frame(0x1, body.encode()) for body in bodies))
        received = await frames(sender, 9)
        assert [f for f in received if f["type"] != "message"] == [
            ack("news", 1, 2, id="a"),
            ack("news", 2, 2, id="b"),
            ack("news", 3, 2, id="c"),
            ack("news", 4, 2, id="d"),
            error("wrong-topic", "this connection publishes to topic 'news', not 'sport'", id="x"),
            ack("news", 5, 2, id="e"),
        ]
        assert of_type("message", received) == [
            message("news", 1, "a"),
            message("news", 2, "b"),
            message("news", 5, "e"),
        ]
        assert await messages(raw, 5) == ["a", "b", "c", b"d", "e"]
        # One read, split only where echo changes or an invalid frame sits: three batches.
        assert relay.server.statistics().topics["news"].broadcast.published == 3


@pytest.mark.parametrize(
    ("policy", "dropped", "evicted"), [("drop", 1, 0), ("evict", 0, 1)], ids=["drop", "evict"]
)
async def test_the_ack_counts_a_full_consumer_as_dropped_or_evicted(
    autojump_clock: trio.testing.MockClock, policy: Any, dropped: int, evicted: int
) -> None:
    config = RelayConfig(overflow_policy=policy, overflow_timeout=0, queue_size=1)
    async with open_memory_relay(config, capacity=100) as relay:
        sender = await open_client(relay, "/news", envelope=True)
        await open_client(relay, "/news")  # never reads again: 100 bytes fill its pipe
        await subscribed(relay, "news", 2)
        reports = []
        for i in range(4):
            await sender.send_text(publish(id=i, text=f"{i}" * 60, echo=False))
            reports.append(await next_frame(sender))
        # 1: written whole; 2: written in part, the rest waits in the writer;
        # 3: queued (the one batch allowed); 4: its queue is full.
        assert reports == [
            ack("news", 1, 2, id=0),
            ack("news", 2, 2, id=1),
            ack("news", 3, 2, id=2),
            ack("news", 4, 1, dropped=dropped, evicted=evicted, id=3),
        ]


# ------------------------------------------------------------------------ invalid frames

EXACTLY_ONE = 'a publish frame has exactly one of "text" and "binary"'
BAD_ID = '"id" must be a string of at most 128 characters or an integer'


def error(code: str, detail: str, **id: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "detail": detail, **id}


INVALID = [
    pytest.param("not json", error("not-json", "the frame is not valid JSON"), id="not-json"),
    pytest.param("[1, 2]", error("bad-frame", "the frame must be a JSON object"), id="array"),
    pytest.param(
        '{"type": "publish", "text": "t", "id": true}', error("bad-frame", BAD_ID), id="id"
    ),
    pytest.param(
        '{"type": "subscribe", "id": "s1"}',
        error("unknown-type", "unknown \"type\": 'subscribe'", id="s1"),
        id="unknown-type",
    ),
    pytest.param(
        '{"text": "no type"}', error("unknown-type", 'unknown "type": None'), id="no-type"
    ),
    pytest.param(
        publish(id=3, text="t", binary="AA=="),
        error("bad-payload", EXACTLY_ONE, id=3),
        id="text-and-binary",
    ),
    pytest.param(publish(id=4), error("bad-payload", EXACTLY_ONE, id=4), id="no-payload"),
    pytest.param(
        publish(id=5, text=5), error("bad-payload", '"text" must be a string', id=5), id="text-5"
    ),
    pytest.param(  # valid JSON, not valid Unicode
        '{"type": "publish", "id": 7, "text": "\\ud800"}',
        error("bad-payload", '"text" is not valid Unicode', id=7),
        id="lone-surrogate",
    ),
    pytest.param(
        publish(id=6, binary="*!"),
        error("bad-payload", '"binary" must be base64', id=6),
        id="not-base64",
    ),
    pytest.param(
        publish(id=8, text="t", topic="sport"),
        error("wrong-topic", "this connection publishes to topic 'news', not 'sport'", id=8),
        id="wrong-topic",
    ),
    pytest.param(
        publish(id=9, text="t", echo="yes"),
        error("bad-frame", '"echo" must be true or false', id=9),
        id="echo-yes",
    ),
    pytest.param(  # a binary WebSocket frame, whatever it holds
        publish(text="t").encode(),
        error("binary-frame", 'trio-relay.v1 uses JSON text frames: send {"binary": "<base64>"}'),
        id="binary-frame",
    ),
]


@pytest.mark.parametrize(("frame", "expected"), INVALID)
async def test_an_invalid_envelope_frame_gets_an_error_and_the_connection_stays_usable(
    autojump_clock: trio.testing.MockClock, frame: str | bytes, expected: dict[str, Any]
) -> None:
    async with open_memory_relay() as relay, relay.consume("news") as bystander:
        client = await open_client(relay, "/news", envelope=True)
        await subscribed(relay, "news", 2)
        if isinstance(frame, bytes):
            await client.send(BytesMessage(data=frame))
        else:
            await client.send_text(frame)
        assert await next_frame(client) == expected
        # Nothing was published: the next publish is number 1, and the bystander's first.
        await client.send_text(publish(id="ok", text="after"))
        received = await frames(client, 2)
        assert of_type("message", received) == [message("news", 1, "after")]
        assert of_type("ack", received) == [ack("news", 1, 2, id="ok")]
        assert await anext(bystander) == "after"
        assert relay.server.statistics().connections == 2


# ------------------------------------------------------------------------ since and gaps


async def test_since_replays_the_retained_messages_after_it_then_goes_live(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        for i in range(1, 6):
            await relay.publish(f"m{i}", "news")
        async with (
            relay.consume("news", since=2) as raw,
            relay.consume("news", envelope=True, since=2) as enveloped,
            relay.consume("news", envelope=True, since=0) as everything,
            relay.consume("news", envelope=True, since=5) as up_to_date,
        ):
            await subscribed(relay, "news", 4)
            await relay.publish("m6", "news")
            assert [await anext(raw) for _ in range(4)] == ["m3", "m4", "m5", "m6"]
            assert [await anext(enveloped) for _ in range(4)] == [
                Message("news", i, f"m{i}") for i in range(3, 7)
            ]
            assert [await anext(everything) for _ in range(6)] == [
                Message("news", i, f"m{i}") for i in range(1, 7)
            ]
            assert await anext(up_to_date) == Message("news", 6, "m6")


async def test_since_replays_a_message_until_it_is_history_age_seconds_old_not_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(RelayConfig(history_age=5.0)) as relay:
        start = trio.current_time()
        await relay.publish("old", "news")
        await trio.sleep_until(start + 5.0)  # exactly 5 s old: still retained
        async with relay.consume("news", envelope=True, since=0) as items:
            assert await anext(items) == Message("news", 1, "old")
        await trio.sleep_until(start + 7.0)  # older: gone, even before a sweep (at 10 s)
        async with relay.consume("news", envelope=True, since=0) as items:
            await subscribed(relay, "news", 1)
            await relay.publish("new", "news")
            assert [await anext(items) for _ in range(2)] == [
                Gap("news", 0, 2),
                Message("news", 2, "new"),
            ]


async def test_an_envelope_client_older_than_the_history_gets_a_gap_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(RelayConfig(history_size=3)) as relay:
        for i in range(1, 11):
            await relay.publish(f"m{i}", "news")
        client = await open_client(relay, "/news?since=2", envelope=True)
        await subscribed(relay, "news", 1)
        await relay.publish("m11", "news")
        assert await frames(client, 5) == [
            {"type": "gap", "topic": "news", "since": 2, "first": 8, "reset": False},
            message("news", 8, "m8"),
            message("news", 9, "m9"),
            message("news", 10, "m10"),
            message("news", 11, "m11"),
        ]
        async with relay.consume("news", envelope=True, since=0) as items:
            assert [await anext(items) for _ in range(2)] == [
                Gap("news", 0, 9),
                Message("news", 9, "m9"),
            ]


async def test_a_raw_client_older_than_the_history_is_closed_with_4410(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(RelayConfig(history_size=3)) as relay:
        for i in range(1, 11):
            await relay.publish(f"m{i}", "news")
        client = await open_client(relay, "/news?since=2")
        close = await client.next_event()  # no message before the close
        assert isinstance(close, CloseConnection), close
        assert close.code == CloseCode.GAP == 4410
        assert close.reason == "messages 3 to 7 are no longer retained"
        await client.send(close.response())
        assert await client.read_to_eof() == b""
        await relay.server.wait_until(lambda s: s.connections == 0)
        assert relay.server.statistics().topics["news"].broadcast.subscribers == 0
        # Through the client library: the close code and reason, as RelayConnectionClosed.
        async with relay.consume("news", since=1) as raw:
            with pytest.raises(RelayConnectionClosed) as closed:
                await anext(raw)
        assert (closed.value.code, closed.value.reason) == (
            4410,
            "messages 2 to 7 are no longer retained",
        )
        # Accepting the loss: a since within the history works.
        async with relay.consume("news", since=7) as raw:
            assert [await anext(raw) for _ in range(3)] == ["m8", "m9", "m10"]


async def test_without_history_a_raw_client_behind_is_told_everything_it_missed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(RelayConfig(history_size=0)) as relay:
        for i in range(1, 5):
            await relay.publish(f"m{i}", "news")
        watcher = await open_client(relay, "/news?since=1", envelope=True)
        await subscribed(relay, "news", 1)
        client = await open_client(relay, "/news?since=1")
        close = await client.close_from_relay()
        assert (close.code, close.reason) == (4410, "messages 2 to 4 are no longer retained")
        await relay.publish("m5", "news")
        assert await frames(watcher, 2) == [
            {"type": "gap", "topic": "news", "since": 1, "first": 5, "reset": False},
            message("news", 5, "m5"),
        ]


async def test_a_since_beyond_the_last_seq_gets_a_gap_and_everything_retained(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # As after a relay restart: the client is told, and gets what there is from 1.
    async with open_memory_relay() as relay:
        await relay.publish("m1", "news")
        client = await open_client(relay, "/news?since=100", envelope=True)
        await subscribed(relay, "news", 1)
        await relay.publish("m2", "news")
        assert await frames(client, 3) == [
            {"type": "gap", "topic": "news", "since": 100, "first": 1, "reset": True},
            message("news", 1, "m1"),
            message("news", 2, "m2"),
        ]


async def test_a_raw_client_beyond_the_last_seq_is_told_a_range_that_exists(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        client = await open_client(relay, "/news?since=100")
        close = await client.close_from_relay()
        assert close.code == 4410
        lost = re.fullmatch(r"messages (\d+) to (\d+) are no longer retained", close.reason)
        assert lost is None or int(lost[1]) <= int(lost[2]), close.reason


async def test_a_since_beyond_the_last_seq_replays_no_expired_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(RelayConfig(history_age=5.0)) as relay:
        start = trio.current_time()
        await relay.publish("old", "news")
        await trio.sleep_until(start + 7.0)  # 7 s old: expired (the next sweep is at 10 s)
        client = await open_client(relay, "/news?since=100", envelope=True)
        await subscribed(relay, "news", 1)
        await relay.publish("new", "news")
        assert await frames(client, 2) == [
            {"type": "gap", "topic": "news", "since": 100, "first": 2, "reset": True},
            message("news", 2, "new"),
        ]


async def test_a_client_leaving_during_its_replay_is_not_an_error(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_memory_relay(capacity=1024) as relay:
        for i in range(10):
            await relay.publish(f"{i}" * 500, "news")
        # A peer gone mid-replay is a normal end, as everywhere else: logged at INFO.
        client = await open_client(relay, "/news?since=0")  # 5000 bytes of replay to come
        await trio.testing.wait_all_tasks_blocked()  # the replay fills the 1024-byte pipe
        assert relay.server.statistics().connections == 1
        await client.stream.aclose()
        await relay.server.wait_until(lambda s: s.connections == 0)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_client_joining_with_since_mid_stream_gets_every_later_message_exactly_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    per_producer = 100
    total = 3 * per_producer
    joiners: list[tuple[int, bool, list[Any]]] = []  # since, envelope, what it received

    async def join(since: int, envelope: bool) -> None:
        received: list[Any] = []
        joiners.append((since, envelope, received))
        async with relay.consume("live", envelope=envelope, since=since) as items:
            while len(received) < total - since:
                received.append(await anext(items))

    async def server_producer(name: str, join_after: set[int], nursery: trio.Nursery) -> None:
        for i in range(per_producer):
            await relay.publish(f"{name}{i}", "live")
            if i in join_after:
                # Join while the producers go on: part replay, part live.
                last = relay.server.statistics().topics["live"].last_seq
                for since, envelope in [(last - 7, True), (last - 3, False), (last, True)]:
                    nursery.start_soon(join, since, envelope)

    async def client_producer(name: str) -> None:
        # Through a connection: several frames in one read become one batch.
        async with relay.connect("/live", message_queue_size=total) as ws:
            for i in range(per_producer):
                await ws.send_message(f"{name}{i}")

    observed: list[Message] = []

    async def observe() -> None:
        async with relay.consume("live", envelope=True) as items:
            await subscribed(relay, "live", 1)
            nursery.start_soon(server_producer, "p", {10, 45, 80}, nursery)
            nursery.start_soon(server_producer, "q", {25, 60, 95}, nursery)
            nursery.start_soon(client_producer, "r")
            nursery.start_soon(join, 0, True)
            while len(observed) < total:
                observed.append(await anext(items))

    with trio.fail_after(60):
        async with open_memory_relay() as relay, trio.open_nursery() as nursery:
            nursery.start_soon(observe)
    assert [m.seq for m in observed] == list(range(1, total + 1))
    for name in "pqr":
        own = [m.data for m in observed if str(m.data).startswith(name)]
        assert own == [f"{name}{i}" for i in range(per_producer)]
    assert len(joiners) == 1 + 3 * 6
    for since, envelope, received in joiners:
        if envelope:
            assert received == observed[since:], f"since={since}"
        else:
            assert received == [m.data for m in observed[since:]], f"since={since} (raw)"


# ------------------------------------------------------------------------ resume


async def test_resume_gets_every_message_once_in_order_across_drops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    count = 30
    interval = 0.04
    drop_times = [0.21, 0.53, 0.85]
    published: list[float] = []
    dropped: list[float] = []
    arrivals: list[tuple[Any, float]] = []
    async with open_memory_relay() as relay, relay.consume("news", resume=True) as items:
        await subscribed(relay, "news", 1)
        start = trio.current_time()

        async def publisher() -> None:
            for i in range(1, count + 1):
                await trio.sleep_until(start + i * interval)
                await relay.publish(f"m{i}", "news")
                published.append(trio.current_time())

        async def dropper() -> None:
            for when in drop_times:
                await trio.sleep_until(start + when)
                assert await relay.drop_connections() == 1
                dropped.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher)
            nursery.start_soon(dropper)
            while len(arrivals) < count:
                arrivals.append((await anext(items), trio.current_time()))
    expected = [Message("news", i, f"m{i}") for i in range(1, count + 1)]
    assert [item for item, _ in arrivals] == expected
    # Cut off at d, the consumer is back at exactly d + 0.1 s: what was published in
    # between arrives then, everything else as it is published.
    windows = [(d, d + 0.1) for d in dropped]

    def expected_arrival(t: float) -> float:
        return next((end for begin, end in windows if begin <= t < end), t)

    assert [t for _, t in arrivals] == [expected_arrival(t) for t in published]
    assert sum(expected_arrival(t) != t for t in published) == 6  # two per drop: not vacuous


async def refuse_with_503(stream: trio.abc.Stream) -> None:
    """Play a relay behind a proxy that answers every upgrade with 503."""
    request = b""
    while b"\r\n\r\n" not in request:
        request += await stream.receive_some()
    await stream.send_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    await stream.aclose()


async def test_resume_backs_off_from_0_1_s_doubling_up_to_5_s_and_starts_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refusals = 7
    attempts: list[float] = []
    async with open_memory_relay() as relay, trio.open_nursery() as nursery:

        async def connector() -> trio.abc.Stream:
            attempts.append(trio.current_time())
            if 2 <= len(attempts) <= 1 + refusals:
                client, server = socket_like_stream_pair()
                nursery.start_soon(refuse_with_503, server)
                return client
            return await relay.open_stream()

        async with consume(relay.url + "news", resume=True, connector=connector) as items:
            await subscribed(relay, "news", 1)
            await relay.publish("before", "news")
            assert await anext(items) == Message("news", 1, "before")
            dropped_at = trio.current_time()
            assert await relay.drop_connections() == 1
            await relay.publish("during", "news")
            assert await anext(items) == Message("news", 2, "during")
            expected = []
            when = dropped_at
            for delay in [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]:
                when += delay
                expected.append(when)
            assert attempts[1:] == expected
            assert trio.current_time() == expected[-1] == dropped_at + 16.3
            # A connection that succeeded resets the backoff.
            dropped_at = trio.current_time()
            assert await relay.drop_connections() == 1
            await relay.publish("again", "news")
            assert await anext(items) == Message("news", 3, "again")
            assert trio.current_time() == attempts[-1] == dropped_at + 0.1
        nursery.cancel_scope.cancel()


async def test_resume_retries_when_the_connector_cannot_connect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts: list[float] = []
    async with open_memory_relay() as relay:

        async def connector() -> trio.abc.Stream:
            attempts.append(trio.current_time())
            if len(attempts) == 2:
                raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
            return await relay.open_stream()

        async with consume(relay.url + "news", resume=True, connector=connector) as items:
            await subscribed(relay, "news", 1)
            dropped_at = trio.current_time()
            assert await relay.drop_connections() == 1
            await relay.publish("during", "news")
            assert await anext(items) == Message("news", 1, "during")
            assert trio.current_time() == dropped_at + 0.1 + 0.2


async def test_resume_before_the_first_message_loses_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, relay.consume("news", resume=True) as items:
        await subscribed(relay, "news", 1)  # it is subscribed: from here on, nothing is lost
        assert await relay.drop_connections() == 1
        await relay.publish("during", "news")
        await subscribed(relay, "news", 1)  # back, 0.1 s later
        await relay.publish("after", "news")
        assert await anext(items) == Message("news", 1, "during")
        assert await anext(items) == Message("news", 2, "after")


@settings(max_examples=30, deadline=None, database=None)
@given(
    count=st.integers(min_value=1, max_value=40),
    drops=st.lists(
        st.tuples(st.integers(min_value=1, max_value=40), st.sampled_from([0.0, 0.05, 0.1, 0.3])),
        max_size=6,
    ),
)
def test_resume_delivers_every_message_exactly_once_in_order_whatever_the_drops(
    count: int, drops: list[tuple[int, float]]
) -> None:
    """Drop every connection after message ``after``, then pause ``pause`` virtual seconds
    (shorter than the 0.1 s backoff: the next messages are published while it is cut off).

    Drops come after the first message: before it, messages are lost (the xfail test
    ``test_resume_before_the_first_message_loses_nothing``).
    """

    async def scenario() -> list[Any]:
        received: list[Any] = []
        async with open_memory_relay() as relay, relay.consume("t", resume=True) as items:
            await subscribed(relay, "t", 1)

            async def read() -> None:
                while len(received) < count + 1:
                    received.append(await anext(items))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                for i in range(count + 1):
                    if i:
                        await relay.publish(f"m{i}", "t")
                    for after, pause in drops:
                        if min(after, count) == i:
                            await relay.drop_connections()
                            await trio.sleep(pause)
                await relay.publish("end", "t")
        return received

    received = trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    expected = [Message("t", i, f"m{i}") for i in range(1, count + 1)]
    assert received == [*expected, Message("t", count + 1, "end")]


# ------------------------------------------------------------------------ topic lifetime


async def test_a_topic_without_history_is_forgotten_when_its_last_client_leaves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(RelayConfig(history_size=0)) as relay:
        first = await open_client(relay, "/news")
        second = await open_client(relay, "/news")
        await subscribed(relay, "news", 2)
        await first.send_text("hi")
        assert await second.next_message() == "hi"
        stats = relay.server.statistics().topics["news"]
        assert (stats.last_seq, stats.history_messages, stats.history_bytes) == (1, 0, 0)
        await first.send(CloseConnection(code=1000))
        assert (await first.next_close()).code == 1000
        await relay.server.wait_until(lambda s: s.connections == 1)
        assert list(relay.server.statistics().topics) == ["news"]  # one client still there
        await second.stream.aclose()  # the last one vanishes without a close
        await relay.server.wait_until(lambda s: s.connections == 0)
        assert relay.server.statistics().topics == {}


async def test_a_topic_with_history_is_kept_until_the_history_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay(RelayConfig(history_age=5.0)) as relay:
        start = trio.current_time()
        client = await open_client(relay, "/news")
        await client.send_text("kept")
        assert await client.next_message() == "kept"
        await client.stream.aclose()
        await relay.server.wait_until(lambda s: s.connections == 0)
        assert relay.server.statistics().topics["news"].history_messages == 1
        # Sweeps run every 5 s; at the first the message is exactly 5 s old, so still
        # retained; the second forgets it, and the topic with it.
        await _at(start + 10.0, lambda: "news" not in relay.server.statistics().topics)


async def test_resuming_after_the_topic_was_forgotten_loses_nothing_silently(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        open_memory_relay(RelayConfig(history_size=0)) as relay,
        relay.consume("news", resume=True) as items,
    ):
        await subscribed(relay, "news", 1)
        await relay.publish("a", "news")
        await relay.publish("b", "news")
        assert [await anext(items) for _ in range(2)] == [
            Message("news", 1, "a"),
            Message("news", 2, "b"),
        ]
        assert await relay.drop_connections() == 1
        await relay.server.wait_until(lambda s: "news" not in s.topics)
        await relay.publish("c", "news")  # while the consumer is away: lost (no history)
        await subscribed(relay, "news", 1)  # back, with since=2
        for data in ("d", "e", "z"):
            await relay.publish(data, "news")
        # The topic goes on numbering where it stopped: "c" is 3, and the consumer is told
        # it is lost (no history) instead of skipping 3 to 5 as already seen.
        assert [await anext(items) for _ in range(4)] == [
            Gap("news", 2, 4),
            Message("news", 4, "d"),
            Message("news", 5, "e"),
            Message("news", 6, "z"),
        ]


# ------------------------------------------------------------------------ over real sockets


async def test_cli_produce_report_and_consume_on_a_topic(launch: Launch) -> None:
    server, port = await start_server(launch, PYTHON, "-m", "trio_relay", "serve", *DEBUG)
    consumer = await start_consumer(
        launch, server, port, PYTHON, "-m", "trio_relay", "consume", "--topic", "news"
    )
    producer = await launch(
        PYTHON, "-m", "trio_relay", "produce", *at(port), "--topic", "news", "--report", "hello"
    )
    assert await producer.finish() == 0, producer.describe()
    # Queued for the producer's own connection and for the consumer.
    assert producer.output == {
        "stdout": "acknowledged: seq=1 queued=2 dropped=0 evicted=0\n",
        "stderr": "",
    }
    await consumer.expect("stdout", r"hello\n")
    server.process.send_signal(signal.SIGTERM)
    assert await server.finish() == 0, server.describe()
    assert await consumer.finish() == 1, consumer.describe()
    assert consumer.output["stdout"] == "hello\n"
    url = f"ws://127.0.0.1:{port}/news"
    assert consumer.lines("stderr")[0].endswith(f"INFO trio_relay.client: connecting to {url}")
    assert consumer.lines("stderr")[1].endswith(f"INFO trio_relay.client: connected to {url}")
    assert consumer.lines("stderr")[-1] == (
        f"trio-relay consume: {url}: connection closed with code 1001 (relay shutting down)"
    )


async def test_every_envelope_connection_opens_with_a_welcome_naming_the_last_seq(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        for i in range(3):
            await relay.publish(f"before {i}", "news")
        fresh = await open_client(relay, "/news", envelope=True)
        assert json.loads(await fresh.next_message()) == {
            "type": "welcome",
            "topic": "news",
            "seq": 3,
            "epoch": relay.server.topics.epoch,
        }
        resuming = await open_client(relay, "/news?since=1", envelope=True)
        # The welcome comes first, then the replay of what follows `since`.
        assert json.loads(await resuming.next_message())["seq"] == 3
        assert [await next_frame(resuming) for _ in range(2)] == [
            message("news", 2, "before 1"),
            message("news", 3, "before 2"),
        ]
        raw = await open_client(relay, "/news")
        await relay.publish("after", "news")
        assert await raw.next_message() == "after"  # raw clients get no welcome
