"""The sans-IO side of ``trio-relay.v2``: frames in, requests, answers and errors out.

No sockets, no tasks: each test feeds :class:`RelayProtocol` a v2 handshake and frames and
reads the steps it decided (publishes, subscribe and unsubscribe requests, error frames),
then answers those requests as the trio shell would.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import masked_frame, upgrade_request

from trio_relay import RelayConfig
from trio_relay._auth import mint_token
from trio_relay._protocol import Publish, Reject, RelayProtocol, Upgrade
from trio_relay._topics import Batch, Cursor, DeliveryReport, Gap
from trio_relay._v2 import Subscribe, Unsubscribe, parse_v2_frame

SECRET = "s" * 32


def v2_request(path: str = "/", *, extra: str = "") -> bytes:
    return upgrade_request(path, extra=f"Sec-WebSocket-Protocol: trio-relay.v2\r\n{extra}")


def opened(config: RelayConfig | None = None, path: str = "/") -> RelayProtocol:
    protocol = RelayProtocol(config or RelayConfig())
    upgrade = protocol.receive_request(v2_request(path))
    assert isinstance(upgrade, Upgrade) and upgrade.v2, upgrade
    protocol.accept()
    assert protocol.opening(None, None, Cursor("", 0), now=0.0) == (b"", None)  # no welcome in v2
    return protocol


def frame(**fields: Any) -> bytes:
    return masked_frame(0x1, json.dumps(fields).encode())


def frames_of(data: bytes) -> list[dict[str, Any]]:
    """The JSON of the unmasked text frames the relay wrote (payloads under 126 bytes or
    with a 16-bit length)."""
    found = []
    while data:
        assert data[0] == 0x81, data[:2]
        length, at = data[1], 2
        if length == 126:
            length, at = int.from_bytes(data[2:4], "big"), 4
        found.append(json.loads(data[at : at + length]))
        data = data[at + length :]
    return found


def steps(protocol: RelayProtocol, *sent: bytes) -> list[Any]:
    return protocol.receive_data(b"".join(sent), now=1.0).steps


def errors(step_list: list[Any]) -> list[dict[str, Any]]:
    """The frames of the bytes steps (the relay's replies: error frames here)."""
    return frames_of(b"".join(step for step in step_list if isinstance(step, bytes)))


def requests(step_list: list[Any]) -> list[Any]:
    """The steps that are not bytes (publishes, subscribe and unsubscribe requests)."""
    return [step for step in step_list if not isinstance(step, bytes)]


# ---------------------------------------------------------------------------- handshake


def test_v2_is_negotiated_and_preferred_over_v1() -> None:
    protocol = RelayProtocol(RelayConfig())
    request = upgrade_request("/", extra="Sec-WebSocket-Protocol: trio-relay.v1, trio-relay.v2\r\n")
    upgrade = protocol.receive_request(request)
    assert upgrade == Upgrade(topic="", since=None, envelope=True, v2=True)
    assert b"Sec-WebSocket-Protocol: trio-relay.v2" in protocol.accept()


def test_the_path_names_an_optional_first_topic() -> None:
    root = opened()
    assert root.subscribe_path() is None  # "/" subscribes nothing, not even the root topic
    news = opened(path="/news?since=41")
    request = news.subscribe_path()
    assert isinstance(request, Subscribe)
    assert (request.channel.topic, request.since, request.id) == ("news", 41, None)
    answer = news.subscribed(request, None, None, Cursor("", 45))
    assert frames_of(answer) == [{"type": "subscribed", "topic": "news", "seq": 45}]


def test_since_without_a_topic_in_the_path_is_refused() -> None:
    refusal = RelayProtocol(RelayConfig()).receive_request(v2_request("/?since=3"))
    assert isinstance(refusal, Reject) and refusal.status == 400
    assert "'since' needs a topic in the path" in refusal.reason


def test_a_valid_token_is_enough_at_the_handshake_of_path_slash() -> None:
    config = RelayConfig(auth_secret=SECRET)
    token = mint_token(SECRET, subscribe=["news/**"])
    upgrade = RelayProtocol(config).receive_request(v2_request(f"/?token={token}"))
    assert isinstance(upgrade, Upgrade)
    # A path topic the token does not allow at all is refused at once, as in v1.
    refusal = RelayProtocol(config).receive_request(v2_request(f"/other?token={token}"))
    assert isinstance(refusal, Reject) and refusal.status == 403
    # Without a token: 401, whatever the path.
    refusal = RelayProtocol(config).receive_request(v2_request("/"))
    assert isinstance(refusal, Reject) and refusal.status == 401


def test_a_path_topic_the_token_may_only_publish_to_gets_forbidden_not_a_subscription() -> None:
    config = RelayConfig(auth_secret=SECRET)
    token = mint_token(SECRET, publish=["news"])
    protocol = RelayProtocol(config)
    assert isinstance(protocol.receive_request(v2_request(f"/news?token={token}")), Upgrade)
    protocol.accept()
    protocol.opening(None, None, Cursor("", 0), now=0.0)
    refusal = protocol.subscribe_path()
    assert isinstance(refusal, bytes)
    (error,) = frames_of(refusal)
    assert (error["type"], error["code"], error["topic"]) == ("error", "forbidden", "news")
    assert "id" not in error
    assert protocol.channels == {}


# ---------------------------------------------------------------------------- frames in


def test_subscribe_unsubscribe_and_publish_become_requests_in_order() -> None:
    protocol = opened()
    received = steps(
        protocol,
        frame(type="subscribe", topic="news", since=3, id=1),
        frame(type="publish", topic="news", text="a", id=2),
        frame(type="publish", topic="news", text="b", id=3),
        frame(type="publish", topic="other", text="c", id=4),
        frame(type="unsubscribe", topic="news", id=5),
    )
    subscribe, news, other, unsubscribe = received
    assert isinstance(subscribe, Subscribe)
    assert (subscribe.channel.topic, subscribe.since, subscribe.id) == ("news", 3, 1)
    # Consecutive publishes to one topic are one batch; another topic starts another.
    assert isinstance(news, Publish) and isinstance(other, Publish)
    assert (news.topic, news.payloads, other.topic, other.payloads) == (
        "news",
        [b"a", b"b"],
        "other",
        [b"c"],
    )
    assert isinstance(unsubscribe, Unsubscribe)
    assert unsubscribe.channel is subscribe.channel and unsubscribe.id == 5


def test_the_root_topic_is_subscribed_by_name() -> None:
    protocol = opened()
    (request,) = steps(protocol, frame(type="subscribe", topic=""))
    assert isinstance(request, Subscribe) and request.channel.topic == ""


@pytest.mark.parametrize(
    ("fields", "code", "topic"),
    [
        ({"type": "subscribe", "topic": "a//b"}, "bad-topic", "a//b"),
        ({"type": "subscribe", "topic": "a/../b"}, "bad-topic", "a/../b"),
        ({"type": "subscribe", "topic": "x" * 300}, "bad-topic", "x" * 128),
        ({"type": "subscribe"}, "bad-frame", None),
        ({"type": "subscribe", "topic": 7}, "bad-frame", None),
        ({"type": "subscribe", "topic": "a", "since": -1}, "bad-since", "a"),
        ({"type": "subscribe", "topic": "a", "since": "3"}, "bad-since", "a"),
        ({"type": "subscribe", "topic": "a", "since": True}, "bad-since", "a"),
        ({"type": "subscribe", "topic": "a", "since": 2**63}, "bad-since", "a"),
        ({"type": "unsubscribe", "topic": "a"}, "not-subscribed", "a"),
        ({"type": "publish", "text": "x"}, "bad-frame", None),
        ({"type": "publish", "topic": "a"}, "bad-payload", "a"),
        ({"type": "publish", "topic": "a", "binary": "%%"}, "bad-payload", "a"),
        ({"type": "publish", "topic": "a", "text": "x", "echo": 1}, "bad-frame", "a"),
        ({"type": "welcome", "topic": "a"}, "unknown-type", None),
        ({"topic": "a"}, "unknown-type", None),
    ],
)
def test_a_bad_request_gets_an_error_with_its_id_and_topic(
    fields: dict[str, Any], code: str, topic: str | None
) -> None:
    protocol = opened()
    (error,) = errors(steps(protocol, frame(**fields, id="req-9")))
    assert error["type"] == "error" and error["code"] == code, error
    assert error["id"] == "req-9"
    assert error.get("topic") == topic
    assert protocol.channels == {}
    # The connection goes on: the next frame is read as usual.
    (request,) = steps(protocol, frame(type="subscribe", topic="a"))
    assert isinstance(request, Subscribe)


def test_frames_that_are_not_requests_get_v1_errors_without_an_id() -> None:
    protocol = opened()
    received = steps(
        protocol,
        masked_frame(0x1, b"{nope"),
        masked_frame(0x1, b"[1]"),
        masked_frame(0x2, b"\x00\x01"),
        frame(type="subscribe", topic="a", id=[1]),
    )
    assert [e["code"] for e in errors(received)] == [
        "not-json",
        "bad-frame",
        "binary-frame",
        "bad-frame",
    ]
    assert all("id" not in e for e in errors(received))


def test_subscribing_twice_and_unsubscribing_twice_are_errors() -> None:
    protocol = opened()
    received = steps(
        protocol,
        frame(type="subscribe", topic="a", id=1),
        frame(type="subscribe", topic="a", id=2),  # still being made counts
        frame(type="unsubscribe", topic="a", id=3),
        frame(type="unsubscribe", topic="a", id=4),
        frame(type="subscribe", topic="a", id=5),  # again, after the unsubscribe
    )
    first, unsubscribe, again = requests(received)
    assert isinstance(first, Subscribe) and isinstance(unsubscribe, Unsubscribe)
    assert isinstance(again, Subscribe) and again.channel is not first.channel
    assert [(e["code"], e["id"]) for e in errors(received)] == [
        ("already-subscribed", 2),
        ("not-subscribed", 4),
    ]


def test_the_cap_on_subscriptions_counts_those_being_made() -> None:
    protocol = opened(RelayConfig(max_subscriptions_per_connection=2))
    received = steps(
        protocol,
        frame(type="subscribe", topic="a"),
        frame(type="subscribe", topic="b"),
        frame(type="subscribe", topic="c", id="third"),
    )
    (error,) = errors(received)
    assert (error["code"], error["id"], error["topic"]) == ("too-many-subscriptions", "third", "c")
    assert "limit of 2 subscriptions" in error["detail"]
    # A refused subscription (a server limit) gives its place back.
    second = requests(received)[1]
    assert isinstance(second, Subscribe)
    (refusal,) = frames_of(protocol.refused(second, "too-many-subscribers", "full"))
    assert refusal == {
        "type": "error",
        "code": "too-many-subscribers",
        "detail": "full",
        "topic": "b",
    }
    (request,) = steps(protocol, frame(type="subscribe", topic="c"))
    assert isinstance(request, Subscribe)


def test_the_token_is_checked_per_topic_for_subscribe_and_publish() -> None:
    config = RelayConfig(auth_secret=SECRET)
    token = mint_token(SECRET, subscribe=["news/*"], publish=["chat"])
    protocol = RelayProtocol(config)
    assert isinstance(protocol.receive_request(v2_request(f"/?token={token}")), Upgrade)
    protocol.accept()
    protocol.opening(None, None, Cursor("", 0), now=0.0)
    received = steps(
        protocol,
        frame(type="subscribe", topic="news/a", id=1),
        frame(type="subscribe", topic="chat", id=2),
        frame(type="publish", topic="news/a", text="no", id=3),
        frame(type="publish", topic="chat", text="yes", id=4),
        frame(type="publish", topic="news/a", text="still no", id=5),
    )
    subscribe, publish = requests(received)
    assert isinstance(subscribe, Subscribe) and subscribe.channel.topic == "news/a"
    assert isinstance(publish, Publish) and publish.topic == "chat"
    assert [(e["code"], e["id"], e["topic"]) for e in errors(received)] == [
        ("forbidden", 2, "chat"),
        ("forbidden", 3, "news/a"),
        ("forbidden", 5, "news/a"),
    ]


def test_a_raw_client_publishing_without_a_topic_is_not_affected() -> None:
    # A v1 client's publish has no topic field and goes to the path's topic, as before.
    protocol = RelayProtocol(RelayConfig())
    protocol.receive_request(
        upgrade_request("/news", extra="Sec-WebSocket-Protocol: trio-relay.v1\r\n")
    )
    protocol.accept()
    protocol.opening(None, None, Cursor("", 0), now=0.0)
    (publish,) = steps(protocol, frame(type="publish", text="hi"))
    assert isinstance(publish, Publish) and publish.topic is None
    assert not protocol.v2


def test_v2_frames_count_against_the_publish_rate() -> None:
    protocol = opened(RelayConfig(publish_rate=10, publish_burst=2))
    sent = [frame(type="publish", topic=t, text="x") for t in "ab"]
    sent.append(frame(type="subscribe", topic="c"))
    sent.append(frame(type="publish", topic="d", text="x"))
    received = protocol.receive_data(b"".join(sent), now=0.0)
    assert [step.topic for step in received.steps if isinstance(step, Publish)] == ["a", "b"]
    assert received.held and received.pause == pytest.approx(0.1)
    # The rest is read once the rate allows it, in order.
    later = protocol.receive_data(b"", now=0.2)
    subscribe, publish = later.steps
    assert isinstance(subscribe, Subscribe) and subscribe.channel.topic == "c"
    assert isinstance(publish, Publish) and publish.topic == "d"


def test_answered_v2_frames_count_against_the_control_rate() -> None:
    protocol = opened(RelayConfig(control_rate=1, control_burst=2))
    sent = [frame(type="subscribe", topic=t) for t in "abc"]
    received = protocol.receive_data(b"".join(sent), now=0.0)
    assert [step.channel.topic for step in received.steps] == ["a", "b"]
    assert received.held and received.pause == pytest.approx(1.0)
    (third,) = protocol.receive_data(b"", now=1.0).steps
    assert isinstance(third, Subscribe) and third.channel.topic == "c"


# ---------------------------------------------------------------------------- answers out


def test_subscribed_then_the_gap_and_the_replay_all_at_or_below_its_seq() -> None:
    protocol = opened()
    (request,) = steps(protocol, frame(type="subscribe", topic="news", since=2, id="s"))
    replay = Batch("news", 5, [b"e", b"f"], [True, True])
    answer = protocol.subscribed(request, Gap("news", 2, 5), replay, Cursor("", 6))
    assert frames_of(answer) == [
        {"type": "subscribed", "topic": "news", "seq": 6, "id": "s"},
        {"type": "gap", "topic": "news", "since": 2, "first": 5, "reset": False},
        {"type": "message", "topic": "news", "seq": 5, "text": "e"},
        {"type": "message", "topic": "news", "seq": 6, "text": "f"},
    ]
    assert request.channel.open and request.channel.cursor.seq == 6


def test_each_subscription_has_its_own_cursor() -> None:
    protocol = opened()
    a, b = steps(protocol, frame(type="subscribe", topic="a"), frame(type="subscribe", topic="b"))
    assert isinstance(a, Subscribe) and isinstance(b, Subscribe)
    protocol.subscribed(a, None, None, Cursor("", 10))
    protocol.subscribed(b, None, None, Cursor("", 0))
    # A live batch the replay already covered is cut to what is new, per topic.
    rendered = protocol.render_channel(a.channel, Batch("a", 9, [b"x", b"y", b"z"], [True] * 3))
    assert rendered is not None
    assert [f["seq"] for f in frames_of(rendered)] == [11]
    assert a.channel.cursor.seq == 11 and b.channel.cursor.seq == 0
    rendered = protocol.render_channel(b.channel, Batch("b", 1, [b"q"], [True]))
    assert rendered is not None
    assert frames_of(rendered) == [{"type": "message", "topic": "b", "seq": 1, "text": "q"}]


def test_a_replayed_message_is_not_sent_again_live() -> None:
    protocol = opened()
    (request,) = steps(protocol, frame(type="subscribe", topic="a", since=0))
    protocol.subscribed(request, None, Batch("a", 1, [b"1", b"2"], [True, True]), Cursor("", 2))
    rendered = protocol.render_channel(request.channel, Batch("a", 2, [b"2", b"3"], [True, True]))
    assert rendered is not None
    assert [f["seq"] for f in frames_of(rendered)] == [3]
    assert protocol.render_channel(request.channel, Batch("a", 3, [b"3"], [True])) is None


def test_publishing_without_echo_skips_this_connection_only() -> None:
    protocol = opened()
    (request,) = steps(protocol, frame(type="subscribe", topic="a"))
    protocol.subscribed(request, None, None, Cursor("", 0))
    own = Batch("a", 1, [b"mine"], [True], source=protocol, echo=False)
    assert protocol.render_channel(request.channel, own) is None
    assert request.channel.cursor.seq == 1
    other = RelayProtocol(RelayConfig())
    theirs = Batch("a", 2, [b"theirs"], [True], source=other, echo=False)
    assert protocol.render_channel(request.channel, theirs) is not None


def test_acks_and_refusals_of_a_publish_carry_its_topic_and_id() -> None:
    protocol = opened()
    (publish,) = steps(
        protocol,
        frame(type="publish", topic="a", text="x", id=7),
        frame(type="publish", topic="a", text="y", id=8),
    )
    assert isinstance(publish, Publish)
    acks = frames_of(protocol.acknowledge(publish, DeliveryReport("a", 4, 2, 1, 0, 0)))
    assert acks == [
        {"type": "ack", "topic": "a", "seq": 4, "id": 7, "queued": 1, "dropped": 0, "evicted": 0},
        {"type": "ack", "topic": "a", "seq": 5, "id": 8, "queued": 1, "dropped": 0, "evicted": 0},
    ]
    refusals = frames_of(protocol.refuse_publish(publish, "too-many-topics", "full"))
    assert [(f["code"], f["id"], f["topic"]) for f in refusals] == [
        ("too-many-topics", 7, "a"),
        ("too-many-topics", 8, "a"),
    ]


def test_unsubscribed_answers_and_notices() -> None:
    protocol = opened()
    a, b = steps(protocol, frame(type="subscribe", topic="a"), frame(type="subscribe", topic="b"))
    assert isinstance(a, Subscribe) and isinstance(b, Subscribe)
    protocol.subscribed(a, None, None, Cursor("", 0))
    protocol.subscribed(b, None, None, Cursor("", 0))
    # The relay ends a subscription on its own: an unsolicited notice with a code.
    (notice,) = frames_of(protocol.dropped(a.channel, "slow-consumer", "too slow"))
    assert notice == {
        "type": "unsubscribed",
        "topic": "a",
        "code": "slow-consumer",
        "detail": "too slow",
    }
    assert "a" not in protocol.channels
    # If the client's own unsubscribe is under way, its answer is the only one.
    (unsubscribe,) = steps(protocol, frame(type="unsubscribe", topic="b", id=3))
    assert isinstance(unsubscribe, Unsubscribe)
    assert protocol.dropped(b.channel, "slow-consumer", "too slow") == b""
    (answer,) = frames_of(protocol.unsubscribed(unsubscribe))
    assert answer == {"type": "unsubscribed", "topic": "b", "id": 3}


def test_parse_v2_frame_reads_publish_fields_like_v1() -> None:
    request = parse_v2_frame(
        json.dumps({"type": "publish", "topic": "a", "binary": "AAEC", "echo": False}).encode(),
        text=True,
    )
    assert (request.payload, request.text, request.echo, request.topic) == (  # type: ignore[union-attr]
        b"\x00\x01\x02",
        False,
        False,
        "a",
    )


def test_refresh_needs_a_token_that_allows_every_subscription() -> None:
    config = RelayConfig(auth_secret=SECRET)
    protocol = RelayProtocol(config)
    token = mint_token(SECRET, subscribe=["a", "b"], ttl=100)
    assert isinstance(protocol.receive_request(v2_request(f"/?token={token}")), Upgrade)
    protocol.accept()
    protocol.opening(None, None, Cursor("", 0), now=0.0)
    (request,) = steps(protocol, frame(type="subscribe", topic="a"))
    assert isinstance(request, Subscribe)
    protocol.subscribed(request, None, None, Cursor("", 0))
    # Publishing to "a" is refused (and the refusal remembered) under the first token.
    assert errors(steps(protocol, frame(type="publish", topic="a", text="x")))[0]["code"] == (
        "forbidden"
    )
    narrower = mint_token(SECRET, subscribe=["b"], publish=["a"], ttl=100)
    (refusal,) = errors(steps(protocol, frame(type="refresh", token=narrower, id=1)))
    assert (refusal["code"], refusal["id"], refusal["topic"]) == ("forbidden", 1, "a")
    wider = mint_token(SECRET, subscribe=["a"], publish=["a"], ttl=100)
    (answer,) = errors(steps(protocol, frame(type="refresh", token=wider, id=2)))
    assert (answer["type"], answer["id"]) == ("refreshed", 2)
    (publish,) = steps(protocol, frame(type="publish", topic="a", text="now allowed"))
    assert isinstance(publish, Publish) and publish.topic == "a"
