"""The consumers' retry schedule: exponential ceilings, capped, with full jitter below them, and the
retry delay a handler's error may ask for."""

from __future__ import annotations

import math
import random

import pytest

from services.common.consumers import backoff_ceiling_s, backoff_delay_s, retry_after_of


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


class HandlerError(Exception):
    def __init__(self, retry_after_s: object) -> None:
        super().__init__("failed")
        self.retry_after_s = retry_after_s


@pytest.mark.parametrize(("value", "expected"), [(12.5, 12.5), (3, 3.0)])
def test_an_error_may_name_its_retry_delay(value: object, expected: float) -> None:
    assert retry_after_of(HandlerError(value)) == expected


@pytest.mark.parametrize("value", [None, 0, -1.0, math.nan, math.inf, True, "30"])
def test_a_retry_delay_that_is_not_a_positive_number_is_ignored(value: object) -> None:
    assert retry_after_of(HandlerError(value)) is None


def test_an_error_without_a_retry_delay_names_none() -> None:
    assert retry_after_of(RuntimeError("failed")) is None
