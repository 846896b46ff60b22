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
from trio_relay._parser import MAX_HEADER
from trio_relay._protocol import OVER_BUDGET, Publish, Reject, RelayProtocol, State, Upgrade
from trio_relay._topics import Batch, DeliveryReport, Gap

SECRET = "s" * 32


def opened(config: RelayConfig | None = None, request: bytes | None = None) -> RelayProtocol:
    """A protocol past its handshake, subscribed at sequence number 0, at time 0."""
    protocol = RelayProtocol(config or RelayConfig())
    upgrade = protocol.receive_request(request or upgrade_request())
    assert isinstance(upgrade, Upgrade), upgrade
    protocol.accept()
    welcome, close = protocol.opening(None, None, 0, now=0.0)
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
        (upgrade_request().replace(b"Version: 13", b"Version: 7"), 426, "upgrade"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad WebSocket upgrade request"),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 3000, 431, "request head too large"),
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
    protocol.opening(None, None, 0, now=0.0)
    (step,) = protocol.receive_data(b"", now=0.0).steps
    assert isinstance(step, Publish)
    assert (step.payloads, step.texts, step.requests) == ([b"early"], [True], None)


def test_everything_one_read_brings_is_one_batch_and_pings_get_pongs() -> None:
    protocol = opened()
    data = masked_frame(0x1, b"a") + masked_frame(0x9, b"are you there") + masked_frame(0x2, b"b")
    received = protocol.receive_data(data, now=1.0)
    pong, publish = received.steps
    assert pong == b"\x8a\x0dare you there"
    assert isinstance(publish, Publish)
    assert (publish.payloads, publish.texts) == ([b"a", b"b"], [True, False])
    assert received.close is None


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


def test_publishing_over_the_rate_pauses_reading_for_exactly_the_debt() -> None:
    protocol = opened(RelayConfig(publish_rate=10, publish_burst=10))
    within = protocol.receive_data(masked_frame(0x1, b"x") * 10, now=0.0)
    assert within.pause == 0
    over = protocol.receive_data(masked_frame(0x1, b"x") * 5, now=0.0)
    assert over.pause == pytest.approx(0.5)  # 5 messages at 10/s
    later = protocol.receive_data(masked_frame(0x1, b"x"), now=10.0)
    assert later.pause == 0  # the bucket refilled (to its burst, no more)


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
    first, close = envelope.opening(Gap("news", 2, 8), replay, 8, now=0.0)
    assert close is None
    assert b'"welcome"' in first and b'"gap"' in first and b'"seq":8' in first.replace(b" ", b"")
    raw = RelayProtocol(RelayConfig())
    raw.receive_request(upgrade_request("/news?since=2"))
    raw.accept()
    first, close = raw.opening(Gap("news", 2, 8), replay, 8, now=0.0)
    assert first == b""
    assert close == (CloseCode.GAP, "messages 3 to 7 are no longer retained")


# ---------------------------------------------------------------------------- bytes out


def test_render_skips_what_the_replay_sent_and_the_clients_own_message_without_echo() -> None:
    protocol = opened()
    protocol.opening(None, None, 5, now=0.0)  # the replay went up to 5
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
    protocol.opening(None, None, 0, now=0.0)
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
