"""`scripts/bench events` in miniature: a few seconds of the real pipeline (producer, relay and
consumer processes on real PostgreSQL and Redis), checked for exactly-once delivery."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.events import PipelineConfig, run_pipeline

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

# Process start-up, a 3 s window and the drain, with room for a loaded machine.
DEADLINE_S = 100.0


@pytest.mark.timeout(DEADLINE_S + 20)
async def test_the_events_benchmark_delivers_every_event_exactly_once(
    postgres_url: str, redis_url: str
) -> None:
    config = PipelineConfig(
        database_url=postgres_url,
        redis_url=redis_url,
        rate=200.0,
        duration_s=3.0,
        events_per_transaction=4,
        relay_idle_poll_s=0.1,
        drain_s=20.0,
    )
    async with asyncio.timeout(DEADLINE_S):
        result = await run_pipeline(config)

    assert result.producer.produced > 0
    assert result.producer.produced == result.outbox_rows == result.consumer.consumed
    assert result.consumer.duplicates == 0
    assert (result.missing, result.unexpected) == (0, 0)
    assert (result.unrelayed_rows, result.pending_in_group) == (0, 0)
    assert result.exact
    assert 0 < result.consumer.delay_p50_s <= result.consumer.delay_p99_s <= result.consumer.delay_max_s
