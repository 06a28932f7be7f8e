"""Backlog gauges of the event pipeline, sampled from the outbox table and the Redis streams.

Every part of the pipeline can fall behind without an error anywhere: the relay (outbox lag), a
consumer group (pending entries, lag), a handler (dead letters). These gauges make each backlog
visible; `EventPipelineMetrics.sample_forever` refreshes them on an interval in one process (the
relay worker is the natural home: it has the database and Redis at hand).

    parley_outbox_lag_seconds                      age of the oldest unrelayed outbox event
    parley_stream_length{stream}                   XLEN of each parley:events:* stream
    parley_consumer_group_pending{stream,group}    the group's pending entries (XPENDING's count)
    parley_consumer_group_lag{stream,group}        entries not yet delivered to the group
                                                   (XINFO GROUPS `lag`, Redis >= 7)
    parley_dead_letters{consumer}                  XLEN of parley:dlq:<consumer>
    parley_event_metrics_sample_errors_total{part} failed samples; part = database | redis

A part whose sample fails is left out of the exposition until a sample succeeds again, rather than
exported with its last values as if they were current: alert on the error counter (or on the series
being absent), never read a missing series as zero.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import RedisError, ResponseError
from redis.asyncio import Redis
from sqlalchemy.exc import SQLAlchemyError

from services.common.consumers import DLQ_KEY_PREFIX, dlq_key
from services.common.db import Database, DatabaseUnavailable
from services.common.dead_letters import SqlDeadLetters
from services.common.outbox import outbox_lag_seconds
from services.common.redis_multiplex import reply_text
from services.common.streams import STREAM_KEY_PREFIX

logger = logging.getLogger(__name__)

PART_DATABASE: Final = "database"
PART_REDIS: Final = "redis"

# A sample that takes longer than this is abandoned and counted as failed: the next one is due soon.
DEFAULT_SAMPLE_TIMEOUT_S: Final = 10.0
# Discovering streams and dead-letter streams is a SCAN over the whole keyspace (idempotency records
# and cache keys included), much dearer than the sample itself; a new stream or first dead letter of
# a consumer shows up within this long.
DEFAULT_REDISCOVER_S: Final = 60.0
_SCAN_PAGE: Final = 1000

_EXPECTED_REDIS_ERRORS: Final = (RedisError, OSError, TimeoutError)
_EXPECTED_DATABASE_ERRORS: Final = (SQLAlchemyError, DatabaseUnavailable, OSError, TimeoutError)


@dataclass(frozen=True)
class GroupReading:
    """One consumer group on one stream, as XINFO GROUPS reports it."""

    stream: str
    group: str
    pending: int
    # None when Redis cannot tell (before 7.0, or after entries were deleted from the stream).
    lag: int | None


@dataclass(frozen=True)
class RedisReading:
    """What one sample read from Redis."""

    stream_lengths: Mapping[str, int]
    groups: Sequence[GroupReading]
    dead_letters: Mapping[str, int]


async def discover(client: Redis) -> tuple[list[str], list[str]]:
    """The `parley:events:*` streams and the consumers that have a dead-letter stream, in one SCAN."""
    streams: set[str] = set()
    consumers: set[str] = set()
    async for raw_key in client.scan_iter(count=_SCAN_PAGE, _type="stream"):
        key = reply_text(raw_key)
        if key.startswith(STREAM_KEY_PREFIX):
            streams.add(key)
        elif key.startswith(DLQ_KEY_PREFIX):
            consumers.add(key.removeprefix(DLQ_KEY_PREFIX))
    return sorted(streams), sorted(consumers)


async def read_redis(client: Redis, streams: Sequence[str], consumers: Sequence[str]) -> RedisReading:
    """Lengths, consumer groups and dead letters of the given streams and consumers, in one round trip.

    A stream deleted since it was discovered is left out; any other error reply raises.
    """
    async with client.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
        for consumer in consumers:
            pipe.xlen(dlq_key(consumer))
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    lengths: dict[str, int] = {}
    groups: list[GroupReading] = []
    for index, stream in enumerate(streams):
        length, group_infos = replies[2 * index], replies[2 * index + 1]
        if isinstance(group_infos, ResponseError) and "no such key" in str(group_infos).lower():
            continue
        for reply in (length, group_infos):
            if isinstance(reply, Exception):
                raise reply
        lengths[stream] = int(length)
        for info in group_infos:
            lag = info.get("lag")
            groups.append(
                GroupReading(
                    stream=stream,
                    group=reply_text(info["name"]),
                    pending=int(info["pending"]),
                    lag=None if lag is None else int(lag),
                )
            )
    dead_letters: dict[str, int] = {}
    for consumer, reply in zip(consumers, replies[2 * len(streams) :], strict=True):
        if isinstance(reply, Exception):
            raise reply
        dead_letters[consumer] = int(reply)
    return RedisReading(lengths, groups, dead_letters)


class EventPipelineMetrics(Collector):
    """The pipeline's backlog gauges, exported from the last successful sample of each part.

    A collector rather than `Gauge`s: each sample replaces a whole reading at once, so a scrape
    during a sample never mixes old and new values, and streams or groups that are gone disappear.
    Dead letters are counted where they live: the `parley:dlq:*` streams when Redis is sampled, the
    `dead_letters` table (embedded mode) when only the database is.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._outbox_lag_s: float | None = None
        # Dead letters per consumer in the database: sampled only when Redis is not (embedded mode).
        self._database_dead_letters: Mapping[str, int] | None = None
        self._redis: RedisReading | None = None
        self._streams: list[str] = []
        self._consumers: list[str] = []
        self._discovered = False
        self.sample_errors = Counter(
            "parley_event_metrics_sample_errors_total",
            "Samples of the event pipeline's backlog that failed, by part (database or redis); "
            "the part's gauges are absent until a sample succeeds.",
            ("part",),
            registry=registry,
        )
        for part in (PART_DATABASE, PART_REDIS):
            self.sample_errors.labels(part)
        registry.register(self)

    # ---- exposition ----------------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return self._families(None, None)

    def collect(self) -> Iterable[Metric]:
        # Two attribute reads: each reading is immutable and replaced whole by `sample`.
        return self._families(self._outbox_lag_s, self._redis, self._database_dead_letters)

    @staticmethod
    def _families(
        outbox_lag_s: float | None,
        redis: RedisReading | None,
        database_dead_letters: Mapping[str, int] | None = None,
    ) -> list[Metric]:
        outbox_lag = GaugeMetricFamily(
            "parley_outbox_lag_seconds",
            "Age of the oldest outbox event not relayed yet; 0 when the outbox is drained.",
            value=outbox_lag_s,
        )
        stream_length = GaugeMetricFamily(
            "parley_stream_length", "Entries in each event stream (XLEN).", labels=("stream",)
        )
        group_pending = GaugeMetricFamily(
            "parley_consumer_group_pending",
            "Entries delivered to the consumer group and not acknowledged yet (XPENDING).",
            labels=("stream", "group"),
        )
        group_lag = GaugeMetricFamily(
            "parley_consumer_group_lag",
            "Entries of the stream not yet delivered to the group (XINFO GROUPS lag; absent when "
            "Redis cannot tell).",
            labels=("stream", "group"),
        )
        dead_letters = GaugeMetricFamily(
            "parley_dead_letters",
            "Entries in each consumer's dead-letter stream, waiting for a replay.",
            labels=("consumer",),
        )
        if redis is not None:
            for stream, length in redis.stream_lengths.items():
                stream_length.add_metric((stream,), length)
            for group in redis.groups:
                group_pending.add_metric((group.stream, group.group), group.pending)
                if group.lag is not None:
                    group_lag.add_metric((group.stream, group.group), group.lag)
            for consumer, count in redis.dead_letters.items():
                dead_letters.add_metric((consumer,), count)
        for consumer, count in (database_dead_letters or {}).items():
            dead_letters.add_metric((consumer,), count)
        return [outbox_lag, stream_length, group_pending, group_lag, dead_letters]

    # ---- sampling ------------------------------------------------------------------------------

    async def sample(
        self,
        *,
        database: Database | None = None,
        redis: Redis | None = None,
        streams: Sequence[str] | None = None,
        consumers: Sequence[str] | None = None,
        rediscover: bool = True,
        timeout_s: float = DEFAULT_SAMPLE_TIMEOUT_S,
    ) -> list[str]:
        """Refresh the gauges; returns the parts that failed (they are counted, logged and left out
        of the exposition). Never raises for a database or Redis that is down.

        Without `database` there is no outbox lag, without `redis` no stream gauges. `streams` and
        `consumers` default to what a SCAN finds (`parley:events:*`, `parley:dlq:*`); with
        `rediscover=False` the last SCAN's findings are reused.
        """
        outcomes = await asyncio.gather(
            self._sample_database(database, timeout_s, with_dead_letters=redis is None),
            self._sample_redis(redis, streams, consumers, rediscover=rediscover, timeout_s=timeout_s),
        )
        return [part for part in outcomes if part is not None]

    async def _sample_database(
        self, database: Database | None, timeout_s: float, *, with_dead_letters: bool
    ) -> str | None:
        if database is None:
            self._outbox_lag_s = self._database_dead_letters = None
            return None
        try:
            async with asyncio.timeout(timeout_s):
                lag_s = await outbox_lag_seconds(database)
                dead = await SqlDeadLetters(database).counts() if with_dead_letters else None
            self._outbox_lag_s, self._database_dead_letters = lag_s, dead
        except Exception as error:  # noqa: BLE001 - counted and logged; the sampler must go on.
            self._outbox_lag_s = self._database_dead_letters = None
            return self._failed(PART_DATABASE, error, expected=isinstance(error, _EXPECTED_DATABASE_ERRORS))
        return None

    async def _sample_redis(
        self,
        client: Redis | None,
        streams: Sequence[str] | None,
        consumers: Sequence[str] | None,
        *,
        rediscover: bool,
        timeout_s: float,
    ) -> str | None:
        if client is None:
            self._redis = None
            return None
        try:
            async with asyncio.timeout(timeout_s):
                if (streams is None or consumers is None) and (rediscover or not self._discovered):
                    self._streams, self._consumers = await discover(client)
                    self._discovered = True
                self._redis = await read_redis(
                    client,
                    self._streams if streams is None else streams,
                    self._consumers if consumers is None else consumers,
                )
        except Exception as error:  # noqa: BLE001 - counted and logged; the sampler must go on.
            self._redis = None
            return self._failed(PART_REDIS, error, expected=isinstance(error, _EXPECTED_REDIS_ERRORS))
        return None

    def _failed(self, part: str, error: Exception, *, expected: bool) -> str:
        self.sample_errors.labels(part).inc()
        if expected:
            logger.warning(
                "event pipeline metrics: cannot sample the %s: %s: %s", part, type(error).__name__, error
            )
        else:
            logger.exception("event pipeline metrics: sampling the %s failed unexpectedly", part)
        return part

    async def sample_forever(
        self,
        stop: asyncio.Event,
        interval_s: float,
        *,
        database: Database | None = None,
        redis: Redis | None = None,
        streams: Sequence[str] | None = None,
        consumers: Sequence[str] | None = None,
        rediscover_s: float = DEFAULT_REDISCOVER_S,
        timeout_s: float = DEFAULT_SAMPLE_TIMEOUT_S,
    ) -> None:
        """Sample every `interval_s` until `stop` is set; never raises (failures are counted)."""
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        loop = asyncio.get_running_loop()
        discovered_at: float | None = None
        while not stop.is_set():
            rediscover = discovered_at is None or loop.time() - discovered_at >= rediscover_s
            failed = await self.sample(
                database=database,
                redis=redis,
                streams=streams,
                consumers=consumers,
                rediscover=rediscover,
                timeout_s=min(timeout_s, interval_s),
            )
            if rediscover and PART_REDIS not in failed:
                discovered_at = loop.time()
            try:
                async with asyncio.timeout(interval_s):
                    await stop.wait()
            except TimeoutError:
                pass
