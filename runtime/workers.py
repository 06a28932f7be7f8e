"""The event pipeline's workers: `parley worker relay` and `parley worker email` (microservices mode),
and the email consumer that `parley up` runs in process.

- relay: moves committed outbox rows of its database to Redis Streams (`OutboxRelay` with
  `RedisStreamPublisher`); run one per database (several are safe on PostgreSQL).
- email: one consumer-group member per stream that carries `email.requested`; any number of
  replicas, each a member of the group `email`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from runtime.process import install_stop_signals, set_up_observability
from services.common.clock import utc_now
from services.common.consumers import (
    Consumer,
    ConsumerMetrics,
    EventSource,
    EventSubscription,
    InProcessSource,
    RedisStreamSource,
)
from services.common.db import Database
from services.common.dead_letters import SqlDeadLetters
from services.common.event_metrics import EventPipelineMetrics
from services.common.metrics import serve_metrics
from services.common.outbox import InProcessDispatcher, OutboxRelay, prune_relayed
from services.common.processed_events import SqlProcessedEvents, prune_processed
from services.common.ratelimit import RateLimiter, rate_limiter_for
from services.common.settings import (
    DEFAULT_WORKER_METRICS_PORTS,
    Settings,
    SettingsError,
    WorkerName,
    load_settings,
)
from services.common.streams import RedisStreamPublisher, stream_key
from services.email.delivery import EMAIL_REQUESTED_TYPE, EmailDelivery
from services.email.sending import build_sender
from services.email.worker import EMAIL_CONSUMER, EMAIL_REQUEST_SOURCES, EmailJobHandler

logger = logging.getLogger(__name__)

# How long a consumer's XREADGROUP waits for new entries; the socket timeout must outlast it.
CONSUMER_BLOCK_S = 1.0
# The relay's longest pause between attempts while Redis is unreachable: events flow again at most
# this long after Redis returns, for one failed pipeline attempt per pause while it is down.
RELAY_RETRY_CAP_S = 5.0
# How often an idle relay worker polls the outbox for rows other processes committed: this bounds the
# pipeline's delay (p99 0.2 s at 5,000 events/s, docs/events.md), for a few index-only queries a second.
RELAY_IDLE_POLL_S = 0.1
# How often the relay worker (and `parley up`) prunes relayed events and old idempotency records.
HOUSEKEEPING_INTERVAL_S = 3600.0
# How often the relay worker (and `parley up`) samples the pipeline's backlog gauges.
PIPELINE_SAMPLE_INTERVAL_S = 5.0
# The in-process stream of embedded mode: every source's events, in the outbox's order.
EMBEDDED_STREAM = "parley:events:embedded"


def member_name() -> str:
    """This process's name in its consumer groups: unique per replica, readable in XINFO."""
    return f"{socket.gethostname()}-{os.getpid()}"


def email_visibility_timeout_s(settings: Settings) -> float:
    """Longer than one slow SMTP conversation plus the longest retry delay, so a live worker's
    mails are not taken over by another replica (harmless, since effects are idempotent, but wasted)."""
    return 2.0 * (settings.smtp_timeout_s + settings.email_retry_cap_s)


def email_consumer(
    settings: Settings,
    source: EventSource,
    *,
    database: Database,
    limiter: RateLimiter,
    member: str,
    metrics: ConsumerMetrics | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Consumer:
    """The email worker's consumer on one stream (or the in-process source when embedded)."""
    delivery = EmailDelivery.from_settings(settings, sender=build_sender(settings), limiter=limiter)
    handler = EmailJobHandler(delivery, database, max_attempts=settings.email_max_attempts)
    return Consumer(
        EMAIL_CONSUMER,
        handler,
        source,
        SqlProcessedEvents(database),
        member=member,
        max_attempts=settings.email_max_attempts,
        backoff_base_s=settings.email_retry_base_s,
        backoff_cap_s=settings.email_retry_cap_s,
        visibility_timeout_s=email_visibility_timeout_s(settings),
        block_s=CONSUMER_BLOCK_S,
        handler_records_processing=True,
        event_types={EMAIL_REQUESTED_TYPE},
        metrics=metrics,
        tracer_provider=tracer_provider,
    )


def subscription_consumer(
    subscription: EventSubscription,
    source: EventSource,
    *,
    database: Database,
    member: str,
    metrics: ConsumerMetrics | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Consumer:
    """A service's consumer (`ServiceBundle.subscriptions`) on one source; its handler records each
    event as processed in the transaction of its effect."""
    return Consumer(
        subscription.consumer,
        subscription.handler,
        source,
        SqlProcessedEvents(database),
        member=member,
        block_s=CONSUMER_BLOCK_S,
        handler_records_processing=True,
        event_types=subscription.event_types,
        metrics=metrics,
        tracer_provider=tracer_provider,
    )


async def run_service_consumers(
    subscriptions: Sequence[EventSubscription],
    database: Database,
    redis_url: str,
    stop: asyncio.Event,
    *,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
) -> None:
    """`parley serve`: each subscription's consumer group on the streams of its sources, until `stop`."""
    if not subscriptions:
        return
    client = _stream_client(redis_url)
    member = member_name()
    metrics = ConsumerMetrics(registry)
    consumers = [
        subscription_consumer(
            subscription,
            RedisStreamSource(client, stream=stream_key(source), group=subscription.consumer),
            database=database,
            member=member,
            metrics=metrics,
            tracer_provider=tracer_provider,
        )
        for subscription in subscriptions
        for source in subscription.sources
    ]
    try:
        await asyncio.gather(*(consumer.run(stop) for consumer in consumers))
    finally:
        await client.aclose()


class EmbeddedWorkers:
    """The outbox relay and the email consumer of `parley up`, as tasks of the one process.

    The relay hands each `email.requested` to the consumer's in-process source and waits until the
    consumer has acknowledged or dead-lettered it, so the outbox row stays unrelayed (the durable
    queue) until then. Dead letters go to the database's `dead_letters` table, where they outlive
    the process and `parley events dlq` finds them.
    """

    def __init__(
        self,
        settings: Settings,
        database: Database,
        *,
        registry: CollectorRegistry,
        tracer_provider: TracerProvider,
        subscriptions: Sequence[EventSubscription] = (),
    ) -> None:
        dispatcher = InProcessDispatcher()
        self.relay = OutboxRelay(database, dispatcher)
        source = InProcessSource(
            stream=EMBEDDED_STREAM, group=EMAIL_CONSUMER, dead_letters=SqlDeadLetters(database)
        )
        dispatcher.subscribe(EMAIL_CONSUMER, source.deliver, {EMAIL_REQUESTED_TYPE})
        self._mail_limiter = rate_limiter_for(settings.redis_url)
        consumer_metrics = ConsumerMetrics(registry)
        self.email = email_consumer(
            settings,
            source,
            database=database,
            limiter=self._mail_limiter,
            member=member_name(),
            metrics=consumer_metrics,
            tracer_provider=tracer_provider,
        )
        # The services' own consumers (e.g. billing's), each its own group on the one in-process stream.
        self.service_consumers: list[Consumer] = []
        for subscription in subscriptions:
            service_source = InProcessSource(
                stream=EMBEDDED_STREAM, group=subscription.consumer, dead_letters=SqlDeadLetters(database)
            )
            dispatcher.subscribe(subscription.consumer, service_source.deliver, subscription.event_types)
            self.service_consumers.append(
                subscription_consumer(
                    subscription,
                    service_source,
                    database=database,
                    member=member_name(),
                    metrics=consumer_metrics,
                    tracer_provider=tracer_provider,
                )
            )
        self._pipeline_metrics = EventPipelineMetrics(registry)
        self._database = database
        self._settings = settings
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, stop: asyncio.Event) -> None:
        self._tasks = [
            asyncio.create_task(self.relay.run(stop), name="outbox-relay"),
            asyncio.create_task(self.email.run(stop), name="email-consumer"),
            *(
                asyncio.create_task(consumer.run(stop), name=f"{consumer.name}-consumer")
                for consumer in self.service_consumers
            ),
            asyncio.create_task(
                keep_pipeline_history_pruned(stop, self._database, self._settings), name="event-housekeeping"
            ),
            asyncio.create_task(
                self._pipeline_metrics.sample_forever(
                    stop, PIPELINE_SAMPLE_INTERVAL_S, database=self._database
                ),
                name="event-metrics",
            ),
        ]

    async def stop(self, grace_s: float) -> None:
        """Wait for both to finish their batch (their `stop` event is set), then cancel what is left:
        a relay still waiting on a mail leaves that outbox row unrelayed, delivered on the next start."""
        if self._tasks:
            _done, unfinished = await asyncio.wait(self._tasks, timeout=grace_s)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._mail_limiter.aclose()


async def prune_pipeline_history(
    database: Database, settings: Settings, *, now: datetime | None = None
) -> tuple[int, int]:
    """Delete relayed outbox events and idempotency records past their retention; returns how many
    of each. Unrelayed events are kept however old."""
    now = now or utc_now()
    relayed = await prune_relayed(database, older_than=now - timedelta(days=settings.outbox_retention_days))
    processed = await prune_processed(
        database, older_than=now - timedelta(days=settings.processed_retention_days)
    )
    return relayed, processed


async def keep_pipeline_history_pruned(
    stop: asyncio.Event,
    database: Database,
    settings: Settings,
    *,
    interval_s: float = HOUSEKEEPING_INTERVAL_S,
) -> None:
    """Prune now and every `interval_s` until `stop` is set; failures are logged and retried next time."""
    while not stop.is_set():
        try:
            relayed, processed = await prune_pipeline_history(database, settings)
        except Exception:
            logger.exception("pruning the event pipeline's history failed; trying again in %.0fs", interval_s)
        else:
            if relayed or processed:
                logger.info(
                    "pruned the event pipeline's history",
                    extra={"relayed_events": relayed, "processed_records": processed},
                )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await stop.wait()


def _require_redis_url(settings: Settings, worker: WorkerName) -> str:
    if settings.redis_url is None:
        raise SettingsError(
            f"parley worker {worker} needs PARLEY_REDIS_URL: the event streams live in Redis "
            "(embedded mode, `parley up`, runs the workers in process instead)"
        )
    return settings.redis_url


def worker_settings(worker: WorkerName) -> Settings:
    """Settings for `parley worker <worker>`, with the worker's own metrics port by default."""
    settings = load_settings()
    if "metrics_port" in settings.model_fields_set:
        return settings
    return load_settings(metrics_port=DEFAULT_WORKER_METRICS_PORTS[worker])


async def run_worker(worker: WorkerName, settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run one worker until `stop` is set or SIGINT/SIGTERM arrives."""
    redis_url = _require_redis_url(settings, worker)
    observability = set_up_observability(settings, process_name=f"worker-{worker}")
    stop = stop or asyncio.Event()
    install_stop_signals(stop)
    database = Database(settings.resolved_database_url)
    metrics = (
        serve_metrics(observability.registry, settings.metrics_host, settings.metrics_port)
        if settings.metrics_port
        else None
    )
    try:
        if worker == "relay":
            await asyncio.gather(
                _run_relay(database, redis_url, stop, registry=observability.registry),
                keep_pipeline_history_pruned(stop, database, settings),
            )
        else:
            await _run_email(
                settings,
                database,
                redis_url,
                stop,
                registry=observability.registry,
                tracer_provider=observability.tracer_provider,
            )
    finally:
        if metrics is not None:
            metrics.close()
        await database.dispose()
        observability.tracer_provider.shutdown()


def _announce(message: str) -> None:
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


async def _run_relay(
    database: Database, redis_url: str, stop: asyncio.Event, *, registry: CollectorRegistry
) -> None:
    publisher = RedisStreamPublisher.from_url(redis_url)
    relay = OutboxRelay(database, publisher, idle_poll_s=RELAY_IDLE_POLL_S, retry_max_s=RELAY_RETRY_CAP_S)
    # The relay has both ends of the pipeline at hand, so it samples every backlog gauge.
    sampler_client = _stream_client(redis_url)
    sampler = EventPipelineMetrics(registry).sample_forever(
        stop, PIPELINE_SAMPLE_INTERVAL_S, database=database, redis=sampler_client
    )
    _announce("parley worker relay: moving outbox events to Redis Streams")
    try:
        await asyncio.gather(relay.run(stop), sampler)
    finally:
        await sampler_client.aclose()
        await publisher.aclose()


def _stream_client(redis_url: str) -> Redis:
    # Binary replies (the event field is protobuf); the socket outlasts XREADGROUP's BLOCK.
    return Redis.from_url(
        redis_url, decode_responses=False, socket_timeout=CONSUMER_BLOCK_S + 10.0, socket_connect_timeout=5.0
    )


async def _run_email(
    settings: Settings,
    database: Database,
    redis_url: str,
    stop: asyncio.Event,
    *,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    sources: Sequence[str] = EMAIL_REQUEST_SOURCES,
) -> None:
    client = _stream_client(redis_url)
    limiter = rate_limiter_for(redis_url)
    member = member_name()
    metrics = ConsumerMetrics(registry)
    consumers = [
        email_consumer(
            settings,
            RedisStreamSource(client, stream=stream_key(source), group=EMAIL_CONSUMER),
            database=database,
            limiter=limiter,
            member=member,
            metrics=metrics,
            tracer_provider=tracer_provider,
        )
        for source in sources
    ]
    _announce(f"parley worker email: member {member} of group {EMAIL_CONSUMER} on {', '.join(sources)}")
    try:
        await asyncio.gather(*(consumer.run(stop) for consumer in consumers))
    finally:
        await limiter.aclose()
        await client.aclose()
