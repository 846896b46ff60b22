"""The README's example test, run as written; a second test keeps the README in step."""

from __future__ import annotations

import inspect
from pathlib import Path

import trio
import trio.testing

from trio_relay import RelayConfig
from trio_relay.testing import open_memory_relay


async def test_a_stalled_consumer_is_evicted_while_the_others_get_everything(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig(queue_size=8, slow_consumer_timeout=5.0)
    async with (
        open_memory_relay(config) as relay,
        relay.connect(),  # a consumer that never reads: the relay's writes to it back up
        relay.consume() as healthy,
    ):
        start = trio.current_time()
        for n in range(200):
            await relay.publish(f"update {n} " + "." * 1000)
            assert await anext(healthy) == f"update {n} " + "." * 1000
        # One publish waited for the stalled consumer, exactly the timeout, then evicted it.
        assert trio.current_time() - start == 5.0
        assert relay.server.statistics().broadcast.evicted == 1


def test_the_readme_shows_the_example_test_verbatim() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    source = inspect.getsource(test_a_stalled_consumer_is_evicted_while_the_others_get_everything)
    assert source in readme
