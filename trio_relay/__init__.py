"""trio_relay: a WebSocket message relay on trio's structured concurrency.

Every message a client sends reaches every connected client, through a broadcast object
that gives each consumer a bounded memory channel and a policy for when it is full.
"""

from ._auth import (
    Grant as Grant,
    TokenError as TokenError,
    mint_token as mint_token,
    verify_token as verify_token,
)
from ._backplane import (
    BackplaneStatistics as BackplaneStatistics,
    RedisBackplane as RedisBackplane,
)
from ._broadcast import (
    Broadcast as Broadcast,
    BroadcastStatistics as BroadcastStatistics,
    BroadcastTotals as BroadcastTotals,
    MessageBus as MessageBus,
    OverflowPolicy as OverflowPolicy,
    PublishReport as PublishReport,
    RunningTotals as RunningTotals,
    Subscription as Subscription,
    SubscriptionStatistics as SubscriptionStatistics,
)
from ._client import (
    DEFAULT_MAX_MESSAGE_SIZE as DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_TIMEOUT as DEFAULT_TIMEOUT,
    ConsumerState as ConsumerState,
    MessageStream as MessageStream,
    Producer as Producer,
    consume as consume,
    open_producer as open_producer,
    produce as produce,
)
from ._config import RelayConfig as RelayConfig
from ._envelope import SUBPROTOCOL as SUBPROTOCOL
from ._exceptions import (
    ClientError as ClientError,
    HandshakeRejected as HandshakeRejected,
    PublishRejected as PublishRejected,
    RelayConnectionClosed as RelayConnectionClosed,
    RelayError as RelayError,
    RelayTimeout as RelayTimeout,
    RelayUnavailable as RelayUnavailable,
    SlowConsumerError as SlowConsumerError,
    SubscriptionRejected as SubscriptionRejected,
    TooManyTopicsError as TooManyTopicsError,
)
from ._frames import CloseCode as CloseCode, encode_frame as encode_frame
from ._hooks import (
    AuthRequest as AuthRequest,
    Publication as Publication,
    Refusal as Refusal,
)
from ._server import (
    RelayServer as RelayServer,
    RelayStatistics as RelayStatistics,
    serve_relay as serve_relay,
)
from ._session import (
    Session as Session,
    Unsubscribed as Unsubscribed,
    connect as connect,
)
from ._sideport import serve_metrics as serve_metrics
from ._topics import (
    DeliveryReport as DeliveryReport,
    Gap as Gap,
    Message as Message,
    Topics as Topics,
    TopicStatistics as TopicStatistics,
    TopicSubscription as TopicSubscription,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_TIMEOUT",
    "SUBPROTOCOL",
    "AuthRequest",
    "BackplaneStatistics",
    "Broadcast",
    "BroadcastStatistics",
    "BroadcastTotals",
    "ClientError",
    "CloseCode",
    "ConsumerState",
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
