"""trio_relay: a WebSocket message relay on trio's structured concurrency.

Every message a client sends reaches every connected client, through a broadcast object
that gives each consumer a bounded memory channel and a policy for when it is full.
"""

from ._broadcast import (
    Broadcast as Broadcast,
)
from ._broadcast import (
    BroadcastStatistics as BroadcastStatistics,
)
from ._broadcast import (
    MessageBus as MessageBus,
)
from ._broadcast import (
    OverflowPolicy as OverflowPolicy,
)
from ._broadcast import (
    PublishReport as PublishReport,
)
from ._broadcast import (
    Subscription as Subscription,
)
from ._broadcast import (
    SubscriptionStatistics as SubscriptionStatistics,
)
from ._client import (
    DEFAULT_TIMEOUT as DEFAULT_TIMEOUT,
)
from ._client import (
    MessageStream as MessageStream,
)
from ._client import (
    consume as consume,
)
from ._client import (
    produce as produce,
)
from ._config import RelayConfig as RelayConfig
from ._envelope import SUBPROTOCOL as SUBPROTOCOL
from ._exceptions import (
    ClientError as ClientError,
)
from ._exceptions import (
    HandshakeRejected as HandshakeRejected,
)
from ._exceptions import (
    PublishRejected as PublishRejected,
)
from ._exceptions import (
    RelayConnectionClosed as RelayConnectionClosed,
)
from ._exceptions import (
    RelayError as RelayError,
)
from ._exceptions import (
    RelayTimeout as RelayTimeout,
)
from ._exceptions import (
    RelayUnavailable as RelayUnavailable,
)
from ._exceptions import (
    SlowConsumerError as SlowConsumerError,
)
from ._frames import CloseCode as CloseCode
from ._frames import encode_frame as encode_frame
from ._server import (
    RelayServer as RelayServer,
)
from ._server import (
    RelayStatistics as RelayStatistics,
)
from ._server import (
    serve_relay as serve_relay,
)
from ._topics import (
    DeliveryReport as DeliveryReport,
)
from ._topics import (
    Gap as Gap,
)
from ._topics import (
    Message as Message,
)
from ._topics import (
    Topics as Topics,
)
from ._topics import (
    TopicStatistics as TopicStatistics,
)
from ._topics import (
    TopicSubscription as TopicSubscription,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TIMEOUT",
    "SUBPROTOCOL",
    "Broadcast",
    "BroadcastStatistics",
    "ClientError",
    "CloseCode",
    "DeliveryReport",
    "Gap",
    "HandshakeRejected",
    "Message",
    "MessageBus",
    "MessageStream",
    "OverflowPolicy",
    "PublishRejected",
    "PublishReport",
    "RelayConfig",
    "RelayConnectionClosed",
    "RelayError",
    "RelayServer",
    "RelayStatistics",
    "RelayTimeout",
    "RelayUnavailable",
    "SlowConsumerError",
    "Subscription",
    "SubscriptionStatistics",
    "TopicStatistics",
    "TopicSubscription",
    "Topics",
    "consume",
    "encode_frame",
    "produce",
    "serve_relay",
]
