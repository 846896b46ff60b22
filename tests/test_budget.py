"""The shared byte budget (:mod:`trio_relay._budget`): plain counting, no I/O, no time."""

from __future__ import annotations

import pytest

from trio_relay._budget import ByteBudget


def test_claims_share_one_limit_and_a_claim_that_cannot_grow_keeps_what_it_held() -> None:
    budget = ByteBudget(100)
    first, second = budget.claim(), budget.claim()
    assert first.resize(60)
    assert second.resize(40)
    assert budget.used == 100
    assert not second.resize(41)  # one byte past the limit: refused, nothing changes
    assert (second.held, budget.used) == (40, 100)
    assert not first.resize(61)
    assert first.resize(10)  # shrinking always succeeds, and makes room for the other
    assert second.resize(90)
    assert (first.held, second.held, budget.used) == (10, 90, 100)


def test_release_gives_everything_back_once() -> None:
    budget = ByteBudget(100)
    claim = budget.claim()
    assert claim.resize(70)
    claim.release()
    claim.release()  # every path of a connection may call it: the second does nothing
    assert (claim.held, budget.used) == (0, 0)
    assert budget.claim().resize(100)


def test_a_budget_of_zero_holds_nothing_and_a_negative_one_is_refused() -> None:
    budget = ByteBudget(0)
    claim = budget.claim()
    assert claim.resize(0)
    assert not claim.resize(1)
    with pytest.raises(ValueError, match="must not be negative"):
        ByteBudget(-1)
