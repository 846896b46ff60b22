"""Test your relay-based code deterministically: a real relay over in-memory connections.

::

    from trio_relay.testing import open_memory_relay

    async def test_echo(autojump_clock):
        async with open_memory_relay() as relay:
            await relay.produce("hi")

With pytest-trio, the ``memory_relay`` fixture (registered by this package's pytest
plugin) gives the same :class:`MemoryRelay` with default settings.
"""

from ._relay import MemoryRelay as MemoryRelay, open_memory_relay as open_memory_relay
from ._streams import (
    MemoryListener as MemoryListener,
    MemoryStream as MemoryStream,
    socket_like_stream_pair as socket_like_stream_pair,
)

__all__ = [
    "MemoryListener",
    "MemoryRelay",
    "MemoryStream",
    "open_memory_relay",
    "socket_like_stream_pair",
]
