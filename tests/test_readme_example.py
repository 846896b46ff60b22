"""The README's example test, run as written; a second test keeps the README in step."""

from __future__ import annotations

import inspect
from pathlib import Path

import trio
import trio.testing

from trio_relay import RelayConfig
from trio_relay.testing import open_memory_relay


async def test_a_consumer_that_stops_reading_is_cut_off_and_the_others_get_everything(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(max_queue_bytes=64 * 1024, overflow_timeout=1.0)
    async with (
        open_memory_relay(config) as relay,
        relay.connect(),  # a consumer that never reads: the relay's writes to it back up
        relay.consume() as healthy,
    ):
        start = trio.current_time()
        for n in range(500):
            await relay.publish(f"update {n} " + "." * 1000)
            assert await anext(healthy) == f"update {n} " + "." * 1000
        # Once 64 KiB had piled up for the stalled consumer, publishing waited for it exactly
        # overflow_timeout after its last progress, then evicted it: the healthy consumer
        # got everything, and no publish ever waited again.
        assert trio.current_time() == start + 1.0
        assert relay.server.statistics().broadcast.evicted == 1


def test_the_readme_shows_the_example_test_verbatim() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    source = inspect.getsource(
        test_a_consumer_that_stops_reading_is_cut_off_and_the_others_get_everything
    )
    assert source in readme
