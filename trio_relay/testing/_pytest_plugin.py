"""pytest plugin (registered through the ``pytest11`` entry point): the ``memory_relay`` fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ._relay import MemoryRelay, open_memory_relay


@pytest.fixture
async def memory_relay() -> AsyncIterator[MemoryRelay]:
    """A relay with default settings over in-memory connections, stopped after the test.

    Needs pytest-trio; combine with its ``autojump_clock`` fixture for virtual time.
    """
    async with open_memory_relay() as relay:
        yield relay
