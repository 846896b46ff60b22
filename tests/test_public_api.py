"""The public face of the package: what is exported, and that it is typed."""

from __future__ import annotations

from pathlib import Path

import trio_relay
import trio_relay.testing


def test_the_package_exports_exactly_its_public_api() -> None:
    assert sorted(trio_relay.__all__) == [
        "AuthRequest",
        "BackplaneStatistics",
        "Broadcast",
        "BroadcastStatistics",
        "BroadcastTotals",
        "ClientError",
        "CloseCode",
        "ConsumerState",
        "DEFAULT_MAX_MESSAGE_SIZE",
        "DEFAULT_TIMEOUT",
        "DeliveryReport",
        "Gap",
        "Grant",
        "HandshakeRejected",
        "Message",
        "MessageBus",
        "MessageStream",
        "OverflowPolicy",
        "Producer",
        "Publication",
        "PublishRejected",
        "PublishReport",
        "RedisBackplane",
        "Refusal",
        "RelayConfig",
        "RelayConnectionClosed",
        "RelayError",
        "RelayServer",
        "RelayStatistics",
        "RelayTimeout",
        "RelayUnavailable",
        "RunningTotals",
        "SUBPROTOCOL",
        "Session",
        "SlowConsumerError",
        "Subscription",
        "SubscriptionRejected",
        "SubscriptionStatistics",
        "TokenError",
        "TooManyTopicsError",
        "TopicStatistics",
        "TopicSubscription",
        "Topics",
        "Unsubscribed",
        "connect",
        "consume",
        "encode_frame",
        "mint_token",
        "open_producer",
        "produce",
        "serve_metrics",
        "serve_relay",
        "verify_token",
    ]
    for name in trio_relay.__all__:
        assert hasattr(trio_relay, name), name


def test_the_testing_kit_exports_exactly_its_public_api() -> None:
    assert sorted(trio_relay.testing.__all__) == [
        "MemoryListener",
        "MemoryRelay",
        "MemoryStream",
        "open_memory_relay",
        "socket_like_stream_pair",
    ]


def test_every_exception_derives_from_relay_error() -> None:
    for name in trio_relay.__all__:
        value = getattr(trio_relay, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, trio_relay.RelayError), name


def test_the_package_ships_its_type_information() -> None:
    assert (Path(trio_relay.__file__).parent / "py.typed").is_file()
