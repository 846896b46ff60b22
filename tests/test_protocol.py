"""The connection's sans-IO core: bytes and time in, what to send, publish and close out.

No sockets, no tasks, no clock: each test feeds :class:`RelayProtocol` bytes and a time and
reads what it decided.
"""

from __future__ import annotations

import json

import pytest
from helpers import masked_frame, upgrade_request

from trio_relay import CloseCode, RelayConfig
from trio_relay._auth import mint_token
from trio_relay._budget import ByteBudget
from trio_relay._envelope import MESSAGE_FRAME_OVERHEAD, encode_message, max_message_frame
from trio_relay._parser import MAX_HEADER
from trio_relay._protocol import OVER_BUDGET, Publish, Reject, RelayProtocol, State, Upgrade
from trio_relay._topics import Batch, Cursor, DeliveryReport, Gap

SECRET = "s" * 32


def opened(config: RelayConfig | None = None, request: bytes | None = None) -> RelayProtocol:
    """A protocol past its handshake, subscribed at sequence number 0, at time 0."""
    protocol = RelayProtocol(config or RelayConfig())
    upgrade = protocol.receive_request(request or upgrade_request())
    assert isinstance(upgrade, Upgrade), upgrade
    protocol.accept()
    welcome, close = protocol.opening(None, None, Cursor("", 0), now=0.0)
    assert (welcome != b"") == protocol.envelope  # only envelope clients get a welcome
    assert close is None
    return protocol


def envelope_request(path: str = "/news") -> bytes:
    return upgrade_request(path, extra="Sec-WebSocket-Protocol: trio-relay.v1\r\n")


def publish_frame(text: str, **fields: object) -> bytes:
    return masked_frame(0x1, json.dumps({"type": "publish", "text": text, **fields}).encode())


# ---------------------------------------------------------------------------- handshake


def test_a_request_in_pieces_is_decided_once_its_head_is_complete() -> None:
    protocol = RelayProtocol(RelayConfig())
    request = upgrade_request("/news?since=7")
    assert protocol.receive_request(request[:20]) is None
    upgrade = protocol.receive_request(request[20:])
    assert upgrade == Upgrade(topic="news", since=7, envelope=False)
    response = protocol.accept()
    assert response.startswith(b"HTTP/1.1 101 ")
    # RFC 6455's example key and its accept value:
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in response
    assert protocol.state is State.OPEN


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        (upgrade_request("/a//b"), 400, "topic names"),
        (upgrade_request("/?since=-1"), 400, "'since' must be one sequence number"),
        (upgrade_request().replace(b"Version: 13", b"Version: 7"), 426, "Version"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad WebSocket upgrade request"),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 3000, 431, "request head too large"),
        (upgrade_request().replace(b"HTTP/1.1", b"HTTP/1.0"), 400, "needs HTTP/1.1"),
        (upgrade_request().replace(b"Q==", b"Q"), 400, "Sec-WebSocket-Key must be 16 bytes"),
        (upgrade_request().replace(b"Upgrade\r", b"\xffpgrade\r"), 400, "'Connection: Upgrade'"),
    ],
)
def test_a_bad_request_is_refused_with_a_status_and_a_reason(
    request_bytes: bytes, status: int, reason: str
) -> None:
    protocol = RelayProtocol(RelayConfig())
    refusal = protocol.receive_request(request_bytes)
    assert isinstance(refusal, Reject)
    assert refusal.status == status
    assert reason in refusal.reason
    assert refusal.data.startswith(f"HTTP/1.1 {status} ".encode())
    assert protocol.state is State.CLOSED


def test_header_values_beyond_ascii_are_a_value_not_a_crash() -> None:
    host = upgrade_request().replace(b"relay.test", b"r\xc3\xa9lay.test")
    hooked = RelayProtocol(RelayConfig(), hooked=True)
    upgrade = hooked.receive_request(host.replace(b"13\r\n", b"13\r\nX: caf\xe9\r\n"))
    assert isinstance(upgrade, Upgrade)
    assert (b"host", b"r\xc3\xa9lay.test") in upgrade.headers
    assert (b"x", b"caf\xe9") in upgrade.headers
    protocol = RelayProtocol(RelayConfig())
    request = upgrade_request(extra="Sec-WebSocket-Protocol: \xe9t\xe9, trio-relay.v1\r\n")
    assert isinstance(protocol.receive_request(request.decode().encode("latin-1")), Upgrade)
    assert protocol.envelope


def test_an_unsupported_version_is_told_which_one_is_supported() -> None:
    request = upgrade_request().replace(b"Version: 13", b"Version: 8")
    refusal = RelayProtocol(RelayConfig()).receive_request(request)
    assert isinstance(refusal, Reject) and refusal.status == 426
    head, _, _ = refusal.data.partition(b"\r\n\r\n")
    assert b"\r\nSec-WebSocket-Version: 13" in head  # RFC 6455 4.4


def test_origins_and_tokens_are_checked_before_admission() -> None:
    config = RelayConfig(allowed_origins=("https://ok.example",), auth_secret=SECRET)
    stranger = RelayProtocol(config).receive_request(
        upgrade_request(extra="Origin: https://evil.example\r\n")
    )
    assert isinstance(stranger, Reject) and stranger.status == 403
    anonymous = RelayProtocol(config).receive_request(upgrade_request())
    assert isinstance(anonymous, Reject) and anonymous.status == 401
    token = mint_token(SECRET, subscribe=["news"])
    reader = RelayProtocol(config)
    upgrade = reader.receive_request(upgrade_request(f"/news?token={token}"))
    assert isinstance(upgrade, Upgrade)
    assert (reader.may_read, reader.may_write) == (True, False)


def test_the_server_can_refuse_an_upgrade_after_reading_it() -> None:
    protocol = RelayProtocol(RelayConfig())
    assert isinstance(protocol.receive_request(upgrade_request()), Upgrade)
    refusal = protocol.reject(503, "the relay is at its limit of 1 connections")
    assert refusal.data.startswith(b"HTTP/1.1 503 Service Unavailable")


# ---------------------------------------------------------------------------- bytes in


def test_frames_that_came_with_the_request_are_read_first() -> None:
    protocol = RelayProtocol(RelayConfig())
    protocol.receive_request(upgrade_request() + masked_frame(0x1, b"early"))
    protocol.accept()
    protocol.opening(None, None, Cursor("", 0), now=0.0)
    (step,) = protocol.receive_data(b"", now=0.0).steps
    assert isinstance(step, Publish)
    assert (step.payloads, step.texts, step.requests) == ([b"early"], [True], None)


def test_everything_one_read_brings_is_one_batch_split_only_where_a_pong_goes_first() -> None:
    protocol = opened()
    data = masked_frame(0x1, b"a") + masked_frame(0x2, b"b")
    (publish,) = protocol.receive_data(data, now=1.0).steps
    assert isinstance(publish, Publish)
    assert (publish.payloads, publish.texts) == ([b"a", b"b"], [True, False])
    # Frames are answered in the order they arrive: the pong before the echo of "d".
    data = masked_frame(0x1, b"c") + masked_frame(0x9, b"are you there") + masked_frame(0x2, b"d")
    received = protocol.receive_data(data, now=1.0)
    first, pong, second = received.steps
    assert pong == b"\x8a\x0dare you there"
    assert isinstance(first, Publish) and isinstance(second, Publish)
    assert (first.payloads, second.payloads) == ([b"c"], [b"d"])
    assert received.close is None


def test_a_ping_between_the_fragments_of_a_message_is_answered_before_it() -> None:
    protocol = opened()
    data = (
        masked_frame(0x1, b"hel", fin=False)
        + masked_frame(0x9, b"ping")
        + masked_frame(0x0, b"lo", fin=True)
    )
    pong, publish = protocol.receive_data(data, now=1.0).steps
    assert pong == b"\x8a\x04ping"
    assert isinstance(publish, Publish) and publish.payloads == [b"hello"]


def test_pongs_to_a_burst_of_pings_coalesce_to_the_latest() -> None:
    protocol = opened()
    data = b"".join(masked_frame(0x9, b"%d" % n) for n in range(50)) + masked_frame(0x1, b"m")
    pong, publish = protocol.receive_data(data, now=1.0).steps
    assert pong == b"\x8a\x0249"  # RFC 6455 5.5.3: only the most recent ping is answered
    assert isinstance(publish, Publish)


def test_control_frames_are_parsed_only_as_fast_as_the_control_rate() -> None:
    protocol = opened(RelayConfig(control_rate=20, control_burst=100))
    data = b"".join(masked_frame(0x9, b"%d" % n) for n in range(1000))
    received = protocol.receive_data(data, now=0.0)
    assert received.steps == [b"\x8a\x0299"]  # the burst, answered once
    assert received.held and received.pause == pytest.approx(0.05)
    # One ping per token from then on; the rest of the read stays held, unparsed.
    for n in range(100, 110):
        received = protocol.receive_data(b"", now=(n - 99) * 0.05)
        assert received.steps == [b"\x8a" + bytes([len(b"%d" % n)]) + b"%d" % n]
        assert received.held and received.pause == pytest.approx(0.05)
    # After a quiet while, a full burst (100 pings, one pong) per call, to the latest ping.
    pongs = []
    for now in range(1000, 1100, 10):
        received = protocol.receive_data(b"", now=now)
        pongs += received.steps
        if not received.held:
            break
    assert pongs == [b"\x8a\x03" + b"%d" % n for n in (209, 309, 409, 509, 609, 709, 809, 909, 999)]
    assert received.pause == 0
    # A pong (unsolicited, or to our keepalive) is a control frame too.
    pongs = masked_frame(0xA, b"") * 150
    assert protocol.receive_data(pongs, now=now + 100).held


def test_no_control_rate_means_no_limit() -> None:
    protocol = opened(RelayConfig(control_rate=0))
    received = protocol.receive_data(masked_frame(0x9, b"") * 10_000, now=0.0)
    assert received.steps == [b"\x8a\x00"] and not received.held


def test_a_client_over_a_rate_is_not_timed_out_by_the_keepalive() -> None:
    config = RelayConfig(publish_rate=1, publish_burst=1, ping_interval=20, ping_timeout=20)
    protocol = opened(config)
    ping = protocol.keepalive(20.0)
    assert isinstance(ping, bytes)
    # Its pong is behind 100 messages the relay reads at 1 a second.
    data = masked_frame(0x1, b"x") * 100 + masked_frame(0xA, ping[2:])
    now = 21.0
    received = protocol.receive_data(data, now)
    while received.held:
        assert protocol.keepalive(now) is None  # not reading it on purpose: no timeout
        now += received.pause
        received = protocol.receive_data(b"", now)
    assert now == pytest.approx(120.0)
    assert protocol.keepalive(now) is None  # the pong was read: answered, next ping later
    assert isinstance(protocol.keepalive(now + 20), bytes)


def test_a_client_close_is_answered_with_its_own_code() -> None:
    protocol = opened()
    received = protocol.receive_data(masked_frame(0x8, b"\x03\xe8bye"), now=1.0)
    assert received.close == (1000, "bye")
    assert received.peer_closed
    assert protocol.state is State.CLOSED


def test_an_unmasked_frame_is_a_protocol_error_closed_without_waiting() -> None:
    received = opened().receive_data(b"\x81\x05hello", now=1.0)
    assert received.close is not None
    assert received.close[0] == CloseCode.PROTOCOL_ERROR
    assert received.protocol_error
    assert not received.peer_closed


def test_a_raw_client_with_a_subscribe_only_token_is_closed_1008_when_it_publishes() -> None:
    config = RelayConfig(auth_secret=SECRET)
    token = mint_token(SECRET, subscribe=["news"])
    protocol = opened(config, upgrade_request(f"/news?token={token}"))
    received = protocol.receive_data(masked_frame(0x1, b"hi"), now=1.0)
    assert received.steps == []
    assert received.close == (
        CloseCode.SLOW_CONSUMER,
        "the token does not allow publishing to topic 'news'",
    )


def test_publishing_over_the_rate_stops_at_the_burst_then_follows_the_rate() -> None:
    protocol = opened(RelayConfig(publish_rate=10, publish_burst=10))
    data = masked_frame(0x1, b"x") * 5000  # 35,000 bytes: one read
    published: list[tuple[float, int]] = []
    now = 0.0
    received = protocol.receive_data(data, now)
    while True:
        count = sum(len(s.payloads) for s in received.steps if isinstance(s, Publish))
        published.append((round(now, 6), count))
        if not received.held or now >= 2.0:
            break
        now += received.pause
        received = protocol.receive_data(b"", now)
    # The burst at once, then one message every 0.1 s; the rest stays held, unparsed.
    assert published[:3] == [(0.0, 10), (0.1, 1), (0.2, 1)]
    assert published[-1] == (2.0, 1)
    assert sum(count for _, count in published) == 30
    assert len(published) == 21
    # After a quiet while, the bucket holds its burst, no more.
    received = protocol.receive_data(b"", now=10_000.0)
    assert sum(len(s.payloads) for s in received.steps if isinstance(s, Publish)) == 10
    assert received.held


def test_after_a_pause_the_rest_of_a_read_is_published_in_batches_as_tokens_allow() -> None:
    protocol = opened(RelayConfig(publish_rate=100, publish_burst=50))
    received = protocol.receive_data(masked_frame(0x1, b"x") * 120, now=0.0)
    (batch,) = received.steps
    assert isinstance(batch, Publish) and len(batch.payloads) == 50
    assert received.held and received.pause == pytest.approx(0.01)
    received = protocol.receive_data(b"", now=0.5)  # 50 tokens more by now
    (batch,) = received.steps
    assert isinstance(batch, Publish) and len(batch.payloads) == 50
    received = protocol.receive_data(b"", now=1.0)
    (batch,) = received.steps
    assert isinstance(batch, Publish) and len(batch.payloads) == 20
    assert not received.held and received.pause == 0


# ---------------------------------------------------------------------------- envelopes


def test_envelope_frames_become_batches_acks_and_errors_in_order() -> None:
    protocol = opened(request=envelope_request())
    data = (
        publish_frame("one", id=1)
        + publish_frame("two", id=2)
        + masked_frame(0x1, b"not json")
        + publish_frame("quiet", id=3, echo=False)
    )
    first, *error_frame, quiet = protocol.receive_data(data, now=0.0).steps
    assert isinstance(first, Publish) and isinstance(quiet, Publish)
    error = b"".join(part for part in error_frame if isinstance(part, bytes))
    assert (first.payloads, first.echo) == ([b"one", b"two"], True)
    assert (quiet.payloads, quiet.echo) == ([b"quiet"], False)
    assert b'"code":"not-json"' in error.replace(b" ", b"")
    acks = protocol.acknowledge(first, DeliveryReport("news", 41, 2, 3, 0, 0))
    frames = [json.loads(part[part.index(b"{") :]) for part in acks.split(b"\x81")[1:]]
    assert [(f["type"], f["id"], f["seq"], f["queued"]) for f in frames] == [
        ("ack", 1, 41, 3),
        ("ack", 2, 42, 3),
    ]


def test_an_envelope_client_is_welcomed_and_told_of_a_gap_a_raw_one_is_closed_4410() -> None:
    replay = Batch("news", 8, [b"h"], [True])
    envelope = RelayProtocol(RelayConfig())
    envelope.receive_request(envelope_request())
    envelope.accept()
    first, close = envelope.opening(Gap("news", 2, 8), replay, Cursor("", 8), now=0.0)
    assert close is None
    assert b'"welcome"' in first and b'"gap"' in first and b'"seq":8' in first.replace(b" ", b"")
    raw = RelayProtocol(RelayConfig())
    raw.receive_request(upgrade_request("/news?since=2"))
    raw.accept()
    first, close = raw.opening(Gap("news", 2, 8), replay, Cursor("", 8), now=0.0)
    assert first == b""
    assert close == (CloseCode.GAP, "messages 3 to 7 are no longer retained")


def error_frames(steps: list[bytes | Publish]) -> list[dict[str, object]]:
    """The error frames among ``steps`` (each a header step, then its JSON)."""
    bodies = [step for step in steps if isinstance(step, bytes) and step.startswith(b"{")]
    return [json.loads(body) for body in bodies]


def test_error_replies_are_bounded_by_the_control_rate_without_a_publish_rate() -> None:
    protocol = opened(RelayConfig(control_rate=20, control_burst=100), envelope_request())
    flood = masked_frame(0x1, b"") * (64 * 1024 // 6)  # 10,922 empty frames: not JSON
    received = protocol.receive_data(flood, now=0.0)
    errors = error_frames(received.steps)
    assert len(errors) == 100 and errors[0]["code"] == "not-json"
    assert received.held and received.pause == pytest.approx(0.05)
    received = protocol.receive_data(b"", now=0.05)
    assert len(error_frames(received.steps)) == 1


def test_error_replies_count_toward_the_publish_rate() -> None:
    config = RelayConfig(publish_rate=10, publish_burst=10, control_rate=0)
    protocol = opened(config, envelope_request())
    data = masked_frame(0x1, b"nope") * 4 + b"".join(publish_frame(f"{n}") for n in range(20))
    received = protocol.receive_data(data, now=0.0)
    assert len(error_frames(received.steps)) == 4
    (batch,) = [step for step in received.steps if isinstance(step, Publish)]
    assert batch.payloads == [b"0", b"1", b"2", b"3", b"4", b"5"]  # 10 tokens, 4 for errors
    assert received.held


def test_valid_envelope_frames_go_on_past_the_control_allowance_in_one_call() -> None:
    # Each envelope frame might be refused, so they are parsed control_burst at a time;
    # frames that are valid cost nothing of it, and parsing goes on.
    protocol = opened(RelayConfig(control_burst=10), envelope_request())
    data = b"".join(publish_frame(f"{n}", id=n) for n in range(95))
    received = protocol.receive_data(data, now=0.0)
    (batch,) = received.steps
    assert isinstance(batch, Publish) and len(batch.payloads) == 95
    assert not received.held


def test_an_error_frame_echoes_no_client_value_longer_than_128_characters() -> None:
    protocol = opened(request=envelope_request("/news"))
    data = publish_frame("x", id="m-1", topic="t" * 100_000) + masked_frame(
        0x1, json.dumps({"type": ["y" * 100_000], "id": 7}).encode()
    )
    wrong_topic, unknown_type = error_frames(protocol.receive_data(data, now=0.0).steps)
    assert (wrong_topic["code"], wrong_topic["id"]) == ("wrong-topic", "m-1")
    assert (unknown_type["code"], unknown_type["id"]) == ("unknown-type", 7)
    assert wrong_topic["detail"] == (
        "this connection publishes to topic 'news', not '" + "t" * 104 + "... (100002 characters)"
    )
    assert unknown_type["detail"] == ('unknown "type": [\'' + "y" * 103 + "... (100004 characters)")


def test_a_forbidden_publish_gets_an_error_with_its_id() -> None:
    config = RelayConfig(auth_secret=SECRET)
    token = mint_token(SECRET, subscribe=["news"])
    protocol = opened(config, envelope_request(f"/news?token={token}"))
    data = publish_frame("hi", id="m-17") + publish_frame("again") + masked_frame(0x1, b"{")
    forbidden, anonymous, not_json = error_frames(protocol.receive_data(data, now=0.0).steps)
    assert forbidden == {
        "type": "error",
        "code": "forbidden",
        "detail": "the token does not allow publishing to topic 'news'",
        "id": "m-17",
    }
    assert anonymous["code"] == "forbidden" and "id" not in anonymous
    assert not_json["code"] == "not-json"


def test_an_envelope_frame_over_the_size_limit_says_what_was_counted() -> None:
    protocol = opened(RelayConfig(max_message_size=1000), envelope_request())
    header = masked_frame(0x1, b"x" * 1334)[:8]  # the header announces 1,334 bytes
    received = protocol.receive_data(header, now=0.0)
    assert received.close == (
        CloseCode.MESSAGE_TOO_BIG,
        "envelope frame of 1334 bytes (JSON, base64 payload) over the 1000-byte limit",
    )
    raw = opened(RelayConfig(max_message_size=1000))
    fragments = masked_frame(0x2, b"x" * 600, fin=False) + masked_frame(0x0, b"x" * 600)
    assert raw.receive_data(fragments, now=0.0).close == (
        CloseCode.MESSAGE_TOO_BIG,
        "message of at least 1200 bytes over the 1000-byte limit",
    )


def test_the_largest_envelope_frame_is_six_times_the_largest_payload() -> None:
    # Text of control characters is the worst case of the JSON encoding: \u0001 for each.
    payload = b"\x01" * 1000
    body = encode_message("t" * 200, 2**63 - 1, payload, text=True, epoch="e" * 32)
    assert len(body) <= max_message_frame(1000) == 6 * 1000 + MESSAGE_FRAME_OVERHEAD
    assert max_message_frame(1000) - len(body) == 2  # tight: "binary" is 2 longer than "text"
    binary = encode_message("t" * 200, 2**63 - 1, bytes(range(256)) * 4, text=False)
    assert len(binary) < max_message_frame(1024)


# ---------------------------------------------------------------------------- bytes out


def test_render_skips_what_the_replay_sent_and_the_clients_own_message_without_echo() -> None:
    protocol = opened()
    protocol.opening(None, None, Cursor("", 5), now=0.0)  # the replay went up to 5
    assert protocol.render(Batch("", 4, [b"old", b"seen"], [True, True])) is None
    straddling = protocol.render(Batch("", 5, [b"seen", b"new"], [True, True]))
    assert straddling == b"\x81\x03new"
    own = Batch("", 7, [b"mine"], [True], source=protocol, echo=False)
    assert protocol.render(own) is None
    assert protocol.render(Batch("", 8, [b"next"], [True])) == b"\x81\x04next"
    assert protocol.render(b"\x89\x00") == b"\x89\x00"  # its own items pass through


def test_keepalive_pings_every_interval_and_closes_1011_without_a_pong() -> None:
    protocol = opened(RelayConfig(ping_interval=20, ping_timeout=20))
    assert protocol.keepalive(19.0) is None
    ping = protocol.keepalive(20.0)
    assert isinstance(ping, bytes) and ping[0] == 0x89
    payload = ping[2:]
    assert protocol.keepalive(39.0) is None  # waiting for the pong
    protocol.receive_data(masked_frame(0xA, payload), now=39.5)
    assert protocol.keepalive(40.0) is None  # answered: the next ping is due at 59.5
    assert isinstance(protocol.keepalive(59.5), bytes)
    assert protocol.keepalive(79.5) == (CloseCode.INTERNAL_ERROR, "keepalive ping timeout")


def test_the_closing_handshake_ends_at_the_clients_close_frame() -> None:
    protocol = opened()
    assert protocol.close_frame(1001, "relay shutting down")[:4] == b"\x88\x15\x03\xe9"
    assert protocol.state is State.CLOSING
    assert not protocol.receive_closing(masked_frame(0x1, b"late message"))
    assert protocol.receive_closing(masked_frame(0x8, b"\x03\xe9"))
    assert protocol.state is State.CLOSED


# ---------------------------------------------------------------------------- unfinished messages


def sharing(budget: ByteBudget, config: RelayConfig) -> RelayProtocol:
    """A protocol past its handshake, holding its unfinished messages against ``budget``."""
    protocol = RelayProtocol(config, unfinished=budget)
    assert isinstance(protocol.receive_request(upgrade_request()), Upgrade)
    protocol.accept()
    protocol.opening(None, None, Cursor("", 0), now=0.0)
    return protocol


def test_the_connection_whose_message_overruns_the_shared_budget_is_closed_1013() -> None:
    config = RelayConfig(max_message_size=1000, max_unfinished_bytes=1500)
    budget = ByteBudget(config.max_unfinished_bytes)
    first, second = sharing(budget, config), sharing(budget, config)
    big = masked_frame(0x2, b"x" * 1000)
    assert first.receive_data(big[:-1], now=0.0).close is None
    held = len(big) - 1 - MAX_HEADER  # what it holds, less up to 14 bytes of header
    assert budget.used == held
    # The second one's message would take the budget past 1500: it alone is failed.
    received = second.receive_data(masked_frame(0x1, b"done") + big[:600], now=0.0)
    (publish,) = received.steps  # what it finished before is published all the same
    assert isinstance(publish, Publish) and publish.payloads == [b"done"]
    assert received.close == (CloseCode.TRY_AGAIN_LATER, OVER_BUDGET)
    assert received.protocol_error  # do not wait for its close: it may never stop sending
    assert budget.used == held
    # The first one is unharmed: it finishes its message, and what it held goes back.
    (publish,) = first.receive_data(big[-1:], now=0.0).steps
    assert isinstance(publish, Publish) and publish.payloads == [b"x" * 1000]
    assert budget.used == 0


def test_fragments_with_pings_between_them_count_and_pings_are_still_answered() -> None:
    config = RelayConfig(max_message_size=1000, max_unfinished_bytes=1000)
    budget = ByteBudget(config.max_unfinished_bytes)
    protocol, other = sharing(budget, config), sharing(budget, config)
    partial = masked_frame(0x2, b"o" * 800)[:-1]
    assert other.receive_data(partial, now=0.0).close is None
    held = len(partial) - MAX_HEADER
    steps = []
    for _ in range(3):  # 3 x 60 bytes of fragments, each followed by a ping
        data = masked_frame(0x2 if not steps else 0x0, b"f" * 60, fin=False)
        received = protocol.receive_data(data + masked_frame(0x9, b"ping"), now=0.0)
        assert received.close is None
        steps += received.steps
    assert steps == [b"\x8a\x04ping"] * 3
    assert budget.used == held + 180 == 973
    received = protocol.receive_data(masked_frame(0x0, b"f" * 60, fin=False), now=0.0)
    assert received.close == (CloseCode.TRY_AGAIN_LATER, OVER_BUDGET)
    assert budget.used == held


def test_release_gives_back_what_a_connection_held_on_any_path() -> None:
    budget = ByteBudget(10_000)
    protocol = sharing(budget, RelayConfig(max_message_size=1000, max_unfinished_bytes=10_000))
    protocol.receive_data(masked_frame(0x2, b"x" * 1000)[:500], now=0.0)
    assert budget.used > 0
    protocol.release()
    protocol.release()
    assert budget.used == 0


def test_while_closing_a_client_that_keeps_sending_past_the_budget_is_let_go() -> None:
    config = RelayConfig(max_message_size=1000, max_unfinished_bytes=1000)
    budget = ByteBudget(config.max_unfinished_bytes)
    protocol, other = sharing(budget, config), sharing(budget, config)
    partial = masked_frame(0x2, b"o" * 900)[:-1]
    other.receive_data(partial, now=0.0)
    held = len(partial) - MAX_HEADER
    protocol.close_frame(1001, "relay shutting down")
    late = masked_frame(0x2, b"x" * 200)
    assert not protocol.receive_closing(late[:50])
    assert budget.used == held + 50 - MAX_HEADER
    assert protocol.receive_closing(late[50:150])  # no room for it: done waiting
    assert protocol.state is State.CLOSED
    assert budget.used == held
