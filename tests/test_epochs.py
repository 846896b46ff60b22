"""Epochs: every number a client sees is named with its epoch, and a change of numbering is
never silent (PROTOCOL.md "Epochs").

Deterministic: in-memory connections (:mod:`trio_relay.testing`) under
``MockClock(autojump_threshold=0)``; the topic's numbering is changed through
:meth:`Topics.deliver_numbered`, as a backplane changes it (trims and epoch changes in a
real Redis are in ``tests/test_backplane.py``).
"""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing
from helpers import EPOCH, HOST, RawClient, rejected, upgrade_request
from wsproto.events import AcceptConnection, Request

import trio_relay
from trio_relay import SUBPROTOCOL, Gap, Message, consume
from trio_relay.testing import MemoryRelay, open_memory_relay


async def open_client(relay: MemoryRelay, path: str, subprotocol: str | None = None) -> RawClient:
    client = RawClient(await relay.open_stream())
    subprotocols = [subprotocol] if subprotocol else []
    await client.send(Request(host=HOST, target=path, subprotocols=subprotocols))
    event = await client.next_event()
    assert isinstance(event, AcceptConnection), event
    return client


async def frame(client: RawClient) -> dict[str, Any]:
    data = await client.next_message()
    assert isinstance(data, str)
    value = json.loads(data)
    assert isinstance(value, dict)
    return value


async def test_every_numbered_frame_carries_the_relays_epoch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay, open_memory_relay() as other:
        epoch = relay.server.topics.epoch
        assert EPOCH.fullmatch(epoch) and epoch != other.server.topics.epoch  # per process
        client = await open_client(relay, "/news", SUBPROTOCOL)
        assert await frame(client) == {"type": "welcome", "topic": "news", "seq": 0, "epoch": epoch}
        await client.send_text(json.dumps({"type": "publish", "id": 1, "text": "hi"}))
        received = [await frame(client), await frame(client)]
        received.sort(key=lambda f: f["type"])
        assert received == [
            {
                "type": "ack",
                "topic": "news",
                "seq": 1,
                "epoch": epoch,
                "id": 1,
                "queued": 1,
                "dropped": 0,
                "evicted": 0,
            },
            {"type": "message", "topic": "news", "seq": 1, "epoch": epoch, "text": "hi"},
        ]


async def test_a_since_of_another_epoch_is_a_reset_never_numbers_taken_for_the_clients(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The relay restarted (another epoch) and numbered 3 new messages from 1: a client at
    # 2 of the old numbering must not get only "3" as if nothing else had changed.
    async with open_memory_relay() as relay:
        epoch = relay.server.topics.epoch
        for text in "abc":
            await relay.publish(text, "news")
        stale = await open_client(relay, "/news?since=2&epoch=0ld0ld0ld", SUBPROTOCOL)
        assert (await frame(stale))["seq"] == 3
        assert await frame(stale) == {
            "type": "gap",
            "topic": "news",
            "since": 2,
            "first": 1,
            "epoch": epoch,
            "reset": True,
        }
        assert [(await frame(stale))["text"] for _ in range(3)] == ["a", "b", "c"]
        # The same number in the relay's own epoch: just what follows it.
        current = await open_client(relay, f"/news?since=2&epoch={epoch}", SUBPROTOCOL)
        assert (await frame(current))["type"] == "welcome"
        assert (await frame(current))["text"] == "c"
        # A raw client cannot be told: closed 4410, saying why.
        raw = await open_client(relay, "/news?since=2&epoch=0ld0ld0ld")
        close = await raw.next_close()
        assert close.code == 4410
        assert "not of this topic's numbering" in close.reason
        # Through the client library: the Gap says reset, with the relay's epoch.
        url = relay.url + "news"
        async with consume(
            url, since=2, epoch="0ld0ld0ld", envelope=True, stream=await relay.open_stream()
        ) as m:
            assert await anext(m) == Gap("news", 2, 1, epoch, reset=True)
            message = await anext(m)
            assert (message, message.epoch) == (Message("news", 1, "a"), epoch)


async def test_a_bad_epoch_is_refused_with_400_and_a_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        for query, reason in [
            ("since=1&epoch=no%20spaces", "'epoch': an epoch is 1 to 32 letters"),
            ("since=1&epoch=" + "e" * 33, "'epoch': an epoch is 1 to 32 letters"),
            ("epoch=abc", "'epoch' is the epoch of 'since': give both"),
            ("since=1&epoch=a&epoch=b", "'epoch' must be given once"),
        ]:
            status, body = await rejected(relay, upgrade_request(f"/news?{query}"))
            assert (status, reason in body.decode()) == (400, True), (query, body)
        # ... and leaves the relay serving.
        client = await open_client(relay, "/news")
        await relay.publish("still here", "news")
        assert await client.next_message() == "still here"


async def test_a_live_epoch_change_is_a_gap_for_envelope_clients_and_4410_for_raw_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        topics = relay.server.topics
        envelope = await open_client(relay, "/t", SUBPROTOCOL)
        assert (await frame(envelope))["type"] == "welcome"
        raw = await open_client(relay, "/t")
        bystander = await open_client(relay, "/other")
        await relay.server.wait_until(lambda s: s.subscribers == 3)
        await relay.publish("one", "t")
        assert (await frame(envelope))["seq"] == 1
        assert await raw.next_message() == "one"
        # The topic's numbering changes (as a backplane that lost it would change it).
        await topics.deliver_numbered("t", "n3wn3w00", 1, [b"new"], [True])
        assert await frame(envelope) == {
            "type": "gap",
            "topic": "t",
            "since": 1,
            "first": 1,
            "epoch": "n3wn3w00",
            "reset": True,
        }
        assert await frame(envelope) == {
            "type": "message",
            "topic": "t",
            "seq": 1,
            "epoch": "n3wn3w00",
            "text": "new",
        }
        close = await raw.next_close()
        assert (close.code, close.reason) == (
            4410,
            "the topic's numbering changed (since=1); it goes on from 1",
        )
        # Numbers skipped in the same epoch (a log trimmed while the relay was away).
        await topics.deliver_numbered("t", "n3wn3w00", 5, [b"five"], [True])
        assert await frame(envelope) == {
            "type": "gap",
            "topic": "t",
            "since": 1,
            "first": 5,
            "epoch": "n3wn3w00",
            "reset": False,
        }
        assert (await frame(envelope))["seq"] == 5
        await relay.publish("other news", "other")
        assert await bystander.next_message() == "other news"  # unharmed


async def test_a_raw_client_is_closed_4410_when_its_topic_skips_numbers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        topics = relay.server.topics
        raw = await open_client(relay, "/t")
        await relay.server.wait_until(lambda s: s.subscribers == 1)
        await topics.deliver_numbered("t", topics.epoch, 1, [b"one"], [True])
        assert await raw.next_message() == "one"
        await topics.deliver_numbered("t", topics.epoch, 4, [b"four"], [True])
        close = await raw.next_close()
        assert (close.code, close.reason) == (4410, "messages 2 to 3 are missing")


async def test_v2_subscriptions_carry_epochs_and_resume_with_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_relay() as relay:
        epoch = relay.server.topics.epoch
        for text in "ab":
            await relay.publish(text, "news")
        client = await open_client(relay, "/", "trio-relay.v2")
        await client.send_text(
            json.dumps({"type": "subscribe", "topic": "news", "since": 1, "epoch": epoch, "id": 1})
        )
        assert await frame(client) == {
            "type": "subscribed",
            "topic": "news",
            "seq": 2,
            "epoch": epoch,
            "id": 1,
        }
        assert await frame(client) == {
            "type": "message",
            "topic": "news",
            "seq": 2,
            "epoch": epoch,
            "text": "b",
        }
        await client.send_text(
            json.dumps({"type": "subscribe", "topic": "x", "since": 1, "epoch": "?", "id": 2})
        )
        error = await frame(client)
        assert (error["type"], error["code"], error["id"], error["topic"]) == (
            "error",
            "bad-epoch",
            2,
            "x",
        )
        # Live: an epoch change on a v2 subscription is its own gap frame, with its topic.
        await relay.server.topics.deliver_numbered("news", "n3wn3w00", 1, [b"c"], [True])
        gap = await frame(client)
        assert gap == {
            "type": "gap",
            "topic": "news",
            "since": 2,
            "first": 1,
            "epoch": "n3wn3w00",
            "reset": True,
        }


async def test_a_resuming_consumer_resumes_with_its_epoch_and_is_told_of_a_restart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Relay one, then "the same relay restarted" (relay two, another epoch) with the same
    # numbers: the consumer resumes at 2 of one's epoch and gets a reset, not "3" silently.
    async with open_memory_relay() as one, open_memory_relay() as two:
        relays = [one, two]
        for relay in relays:
            for text in ("a", "b", "c") if relay is two else ("a", "b"):
                await relay.publish(f"{text}@{relays.index(relay)}", "t")

        async def connector() -> trio.abc.Stream:
            return await relays[0].open_stream()

        async with consume(one.url + "t", resume=True, since=0, connector=connector) as items:
            assert [(await anext(items)).data for _ in range(2)] == ["a@0", "b@0"]
            relays.pop(0)  # "restart": the next connection reaches two
            await one.drop_connections()
            gap = await anext(items)
            assert gap == Gap("t", 2, 1, two.server.topics.epoch, reset=True)
            assert [(await anext(items)).data for _ in range(3)] == ["a@1", "b@1", "c@1"]


async def test_a_v2_session_resumes_with_its_epoch_across_a_restart_that_numbered_further(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The restarted relay numbered 5 messages before the session came back: at 3 of the
    # old numbering, without an epoch it would get 4 and 5 and never know it lost 1 to 3.
    relays: list[MemoryRelay] = []

    async def connector() -> trio.abc.Stream:
        return await relays[-1].open_stream()

    async with open_memory_relay() as first, open_memory_relay() as second:
        relays.append(first)
        async with trio_relay.connect(first.url, connector=connector, resume=True) as session:
            await session.subscribe("news")
            for n in range(3):
                await first.publish(f"old {n}", "news")
            old = [await session.__anext__() for _ in range(3)]
            assert {item.epoch for item in old} == {first.server.topics.epoch}
            for n in range(5):
                await second.publish(f"new {n}", "news")
            relays.append(second)
            await first.shutdown()
            gap = await session.__anext__()
            assert gap == Gap("news", 3, 1, second.server.topics.epoch, reset=True)
            new = [await session.__anext__() for _ in range(5)]
            assert [(m.seq, m.data, m.epoch) for m in new] == [
                (n + 1, f"new {n}", second.server.topics.epoch) for n in range(5)
            ]
            assert session.topics == {"news": 5}
