"""The consumers' retry schedule: exponential ceilings, capped, with full jitter below them."""

from __future__ import annotations

import random

import pytest

from services.common.consumers import backoff_ceiling_s, backoff_delay_s


def test_the_ceiling_doubles_per_attempt_up_to_the_cap() -> None:
    ceilings = [backoff_ceiling_s(attempt, 0.5, 10.0) for attempt in range(1, 9)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_a_huge_attempt_number_stays_at_the_cap() -> None:
    assert backoff_ceiling_s(10_000, 0.5, 60.0) == 60.0


def test_attempts_start_at_one() -> None:
    with pytest.raises(ValueError, match="starts at 1"):
        backoff_ceiling_s(0, 0.5, 60.0)


def test_full_jitter_spreads_delays_over_zero_to_the_ceiling() -> None:
    rng = random.Random(7)
    delays = [backoff_delay_s(3, 0.5, 60.0, rng) for _ in range(2000)]
    assert all(0.0 <= delay <= 2.0 for delay in delays)
    # Full jitter, not "half to full": the low quarter of the range is used as much as the high one.
    low = sum(1 for delay in delays if delay < 0.5)
    high = sum(1 for delay in delays if delay > 1.5)
    assert 400 < low < 600
    assert 400 < high < 600


def test_the_same_seed_gives_the_same_schedule() -> None:
    first = [backoff_delay_s(attempt, 0.1, 5.0, random.Random(42)) for attempt in range(1, 6)]
    again = [backoff_delay_s(attempt, 0.1, 5.0, random.Random(42)) for attempt in range(1, 6)]
    assert first == again
