"""`scripts/bench events`: the event pipeline end to end, outbox INSERT → relay → Redis stream →
consumer → acknowledgement, under an offered load, on real PostgreSQL and Redis.

Topology (each role an OS process started with multiprocessing "spawn", so both cores are used):
  producer   open loop at `--rate` events/s: transactions of `--events-per-transaction` `add_event`
             calls (one unit of work each, up to `--producer-concurrency` in flight); the events'
             `time` is the envelope's own, set by `add_event`
  relay      `OutboxRelay` + `RedisStreamPublisher` (as `parley worker relay` runs them)
  consumer   `Consumer` + `RedisStreamSource` + `RedisProcessedEvents` (as a consumer worker runs
             them), whose handler only records the event; end-to-end delay = the time the batch's
             XACK returned - `Event.time`
`--topology shared` runs the relay and the consumer in one process instead of two.

Events per transaction (default 25): the producer stands in for every service replica, which in
production runs elsewhere. A unit of work costs about 0.6 ms of CPU on its own (pool checkout and
pre-ping, BEGIN, the ORM flush, COMMIT) plus about 45 us per event, so at a few events per commit
the producer alone needs more than one of this machine's two cores at 5,000 events/s and measures
itself rather than the pipeline. `--events-per-transaction 4` shows that case.

The database is brand new (created on the server of PARLEY_TEST_POSTGRES_URL, migrated, dropped
after); stream, consumer group and idempotency keys are unique to the run and deleted after it.
Production runs `--duration` seconds (bounded by count too: rate x duration events); then the
consumer gets `--drain` seconds to catch up. Rates count what completed after the first 10% of the
window (5 s at most), once the pipeline has filled. Every event is checked: consumed exactly once,
none missing, none extra.

Baselines, measured in the same run because the machine is shared and noisy:
  redis XADD+XREADGROUP+XACK   redis-py alone moving entries of the same size through a stream,
                               in batches of the consumer's batch size (the ratio baseline)
  INSERT (asyncpg)             raw INSERTs of outbox-sized rows, same rows per transaction and
                               concurrency as the producer, without SQLAlchemy or the outbox code
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import resource
import secrets
import statistics
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Final, Literal

import asyncpg
import uvloop
from prometheus_client import CollectorRegistry
from redis import RedisError
from redis.asyncio import Redis
from sqlalchemy import func, select

from benchmarks.harness import Measurement, Report, print_report
from parley.events.v1 import events_pb2
from runtime.workers import CONSUMER_BLOCK_S, RELAY_IDLE_POLL_S
from services.common.consumers import (
    Consumer,
    ConsumerMetrics,
    RedisProcessedEvents,
    RedisStreamSource,
    dlq_key,
)
from services.common.db import Database
from services.common.migrate import upgrade_async
from services.common.outbox import OutboxEvent, OutboxRelay, PartialDispatch, add_event
from services.common.streams import RedisStreamPublisher, encode_entry, stream_key
from tests.support.databases import asyncpg_dsn, fresh_postgres_database

DEFAULT_POSTGRES_URL: Final = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/15"
GOAL_EVENTS_PER_S: Final = 5_000.0
GOAL_P99_S: Final = 1.0
RATE_TOLERANCE: Final = 0.01
BASELINE: Final = "redis XADD+XREADGROUP+XACK"

# Bounds on the coordination itself, so a wedged child cannot hang the run.
STARTUP_TIMEOUT_S: Final = 60.0
RESULT_TIMEOUT_S: Final = 30.0
# A child stops on its own this long after its last expected instruction, whatever happens.
HARD_STOP_MARGIN_S: Final = 30.0
PROCESSED_TTL_S: Final = 3600
# Rates leave out the start of the window, while the pipeline fills: this share of it, at most this long.
WARMUP_SHARE: Final = 0.1
MAX_WARMUP_S: Final = 5.0

Topology = Literal["separate", "shared"]
Message = tuple[Any, ...]


@dataclass(frozen=True)
class PipelineConfig:
    """One run of the pipeline; `database_url` names an empty database the run migrates."""

    database_url: str
    redis_url: str
    rate: float
    duration_s: float
    events_per_transaction: int = 25
    producer_concurrency: int = 8
    relay_batch_size: int = 500
    relay_idle_poll_s: float = RELAY_IDLE_POLL_S
    consumer_batch_size: int = 500
    consumer_block_s: float = CONSUMER_BLOCK_S
    topology: Topology = "separate"
    drain_s: float = 30.0
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.duration_s <= 0 or self.drain_s < 0:
            raise ValueError("rate and duration must be positive, drain not negative")
        if min(self.events_per_transaction, self.producer_concurrency) < 1:
            raise ValueError("events per transaction and producer concurrency must be at least 1")

    @property
    def source(self) -> str:
        """The event source, hence the stream (`parley:events:bench-<run>`), unique to the run."""
        return f"bench-{self.run_id}"

    @property
    def group(self) -> str:
        return f"bench-{self.run_id}"

    @property
    def processed_prefix(self) -> str:
        return f"parley-bench:{self.run_id}:"

    @property
    def transactions(self) -> int:
        """The producer's bound on count: rate x duration events, in whole transactions."""
        return max(1, math.ceil(self.rate * self.duration_s / self.events_per_transaction))


@dataclass(frozen=True)
class Cpu:
    """CPU seconds a process used over `wall_s` seconds of its run."""

    cpu_s: float
    wall_s: float

    @property
    def share(self) -> float:
        """Fraction of one core."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


@dataclass(frozen=True)
class Window:
    """The production window (wall-clock times, shared by every process of the run).

    Rates are counted over `[steady_from, ends_at]`: the first seconds, while the pipeline fills
    (the relay's first poll, the first batches), say nothing about the sustained rate.
    """

    started_at: float
    steady_from: float
    ends_at: float

    @classmethod
    def starting(cls, started_at: float, duration_s: float) -> Window:
        warmup_s = min(MAX_WARMUP_S, WARMUP_SHARE * duration_s)
        return cls(started_at, started_at + warmup_s, started_at + duration_s)

    @property
    def steady_s(self) -> float:
        return self.ends_at - self.steady_from

    def is_steady(self, moment: float) -> bool:
        return self.steady_from <= moment <= self.ends_at


@dataclass(frozen=True)
class ProducerResult:
    produced: int
    # Events whose transaction committed inside the steady part of the window.
    produced_steady: int
    transactions: int
    seconds: float
    # How far the open loop fell behind its schedule (all transactions in flight, or a slow commit).
    max_behind_schedule_s: float
    transaction_p50_ms: float
    transaction_p99_ms: float
    cpu: Cpu


@dataclass(frozen=True)
class RelayResult:
    relayed: int
    relayed_in_window: int
    relayed_steady: int
    batches: int
    mean_batch: float
    # A whole relay_once (SELECT, dispatch, UPDATE, COMMIT), and the dispatch to Redis alone.
    batch_p50_ms: float
    batch_p99_ms: float
    dispatch_p50_ms: float
    dispatch_p99_ms: float
    cpu: Cpu


@dataclass(frozen=True)
class ConsumerResult:
    consumed: int
    consumed_in_window: int
    consumed_steady: int
    # Handler calls for an event already handled (must be 0: the idempotency records skip them).
    duplicates: int
    delay_p50_s: float
    delay_p99_s: float
    delay_max_s: float
    delay_mean_s: float
    polls: int
    drained_after_window_s: float
    event_ids: frozenset[str]
    cpu: Cpu


@dataclass(frozen=True)
class PipelineResult:
    """What one run measured; rates are over the steady part of the production window."""

    config: PipelineConfig
    window: Window
    producer: ProducerResult
    relay: RelayResult
    consumer: ConsumerResult
    outbox_rows: int
    unrelayed_rows: int
    missing: int
    unexpected: int
    pending_in_group: int
    server_cpu: dict[str, Cpu]
    machine_busy_share: float

    @property
    def produced_per_s(self) -> float:
        return self.producer.produced_steady / self.window.steady_s

    @property
    def relayed_per_s(self) -> float:
        return self.relay.relayed_steady / self.window.steady_s

    @property
    def consumed_per_s(self) -> float:
        return self.consumer.consumed_steady / self.window.steady_s

    @property
    def backlog_at_window_end(self) -> int:
        return self.producer.produced - self.consumer.consumed_in_window

    @property
    def exact(self) -> bool:
        """Every produced event consumed once: none missing, none extra, no duplicate handling."""
        return (
            self.producer.produced == self.consumer.consumed == self.outbox_rows
            and self.missing == self.unexpected == self.consumer.duplicates == 0
        )


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Clock:
    """CPU and wall time of this process since `start`."""

    def __init__(self) -> None:
        self._cpu = _cpu_seconds()
        self._wall = time.perf_counter()

    def cpu(self) -> Cpu:
        return Cpu(round(_cpu_seconds() - self._cpu, 3), round(time.perf_counter() - self._wall, 3))


# ---------------------------------------------------------------------------------------------
# The children: one role each (or relay and consumer together), driven over a pipe.


class _Inbox:
    """The instructions a child receives from the coordinator, read without blocking its loop."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._messages: asyncio.Queue[Message] = asyncio.Queue()
        asyncio.get_running_loop().add_reader(connection.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            message = self._connection.recv()
        except EOFError:
            message = ("stop",)  # the coordinator is gone
            asyncio.get_running_loop().remove_reader(self._connection.fileno())
        self._messages.put_nowait(message)

    def send(self, *message: Any) -> None:
        self._connection.send(message)

    async def expect(self, kind: str, timeout_s: float) -> Message:
        async with asyncio.timeout(timeout_s):
            message = await self._messages.get()
        if message[0] != kind:
            raise RuntimeError(f"expected {kind!r} from the coordinator, got {message[0]!r}")
        return message

    def poll(self) -> Message | None:
        try:
            return self._messages.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._connection.fileno())
        # The loop made the pipe non-blocking; the result may be larger than the pipe's buffer.
        os.set_blocking(self._connection.fileno(), True)


def _registered(subject: str) -> events_pb2.UserRegistered:
    return events_pb2.UserRegistered(
        user_id=subject, email=f"{subject}@example.com", display_name="Bench User"
    )


async def _produce(config: PipelineConfig, inbox: _Inbox) -> ProducerResult:
    database = Database(config.database_url)
    try:
        # Open the connections up front so the window measures steady state, not connects.
        async with contextlib.AsyncExitStack() as warm:
            for _ in range(config.producer_concurrency):
                session = await warm.enter_async_context(database.unit_of_work(read_only=True))
                await session.execute(select(1))
        inbox.send("ready")
        window: Window = (await inbox.expect("go", STARTUP_TIMEOUT_S))[1]
        started_at, window_end = window.started_at, window.ends_at
        await asyncio.sleep(max(0.0, started_at - time.time()))
        clock = _Clock()
        interval_s = config.events_per_transaction / config.rate
        in_flight = asyncio.Semaphore(config.producer_concurrency)
        latencies: list[float] = []
        tasks: set[asyncio.Task[None]] = set()
        produced = produced_steady = 0
        behind_s = 0.0

        async def transaction(number: int) -> None:
            nonlocal produced, produced_steady
            began = time.perf_counter()
            try:
                async with database.unit_of_work() as session:
                    for index in range(config.events_per_transaction):
                        subject = f"user-{number}-{index}"
                        add_event(
                            session, source=config.source, subject=subject, payload=_registered(subject)
                        )
                produced += config.events_per_transaction
                if window.is_steady(time.time()):
                    produced_steady += config.events_per_transaction
                latencies.append(time.perf_counter() - began)
            finally:
                in_flight.release()

        for number in range(config.transactions):
            due = started_at + number * interval_s
            if due > window_end or time.time() > window_end:
                break  # bounded in time as well as in count: a slow producer does not run on
            wait_s = due - time.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            await in_flight.acquire()
            behind_s = max(behind_s, time.time() - due)
            task = asyncio.create_task(transaction(number))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        async with asyncio.timeout(RESULT_TIMEOUT_S):
            await asyncio.gather(*tasks)
        seconds = time.time() - started_at
        ordered = sorted(latencies)
        return ProducerResult(
            produced=produced,
            produced_steady=produced_steady,
            transactions=len(latencies),
            seconds=round(seconds, 3),
            max_behind_schedule_s=round(behind_s, 3),
            transaction_p50_ms=round(_percentile(ordered, 0.5) * 1000, 2),
            transaction_p99_ms=round(_percentile(ordered, 0.99) * 1000, 2),
            cpu=clock.cpu(),
        )
    finally:
        await database.dispose()


class _CountingPublisher:
    """The relay's dispatcher, counting what Redis confirmed (and when) on the way through."""

    def __init__(self, publisher: RedisStreamPublisher, window: Window) -> None:
        self._publisher = publisher
        self._window = window
        self.relayed = self.relayed_in_window = self.relayed_steady = 0
        self.batch_seconds: list[float] = []
        self.batch_sizes: list[int] = []

    def _count(self, delivered: int) -> None:
        now = time.time()
        self.relayed += delivered
        if now <= self._window.ends_at:
            self.relayed_in_window += delivered
        if self._window.is_steady(now):
            self.relayed_steady += delivered

    async def dispatch(self, events: Sequence[events_pb2.Event]) -> None:
        began = time.perf_counter()
        try:
            await self._publisher.dispatch(events)
        except PartialDispatch as partial:
            self._count(partial.delivered)
            raise
        self._count(len(events))
        self.batch_seconds.append(time.perf_counter() - began)
        self.batch_sizes.append(len(events))


class _TimedRelay(OutboxRelay):
    """The relay, timing each batch it relays: SELECT, dispatch, UPDATE and COMMIT together."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_seconds: list[float] = []

    async def relay_once(self) -> int:
        began = time.perf_counter()
        relayed = await super().relay_once()
        if relayed:
            self.batch_seconds.append(time.perf_counter() - began)
        return relayed


class _RelayRole:
    """`OutboxRelay` + `RedisStreamPublisher`, as `parley worker relay` runs them."""

    def __init__(self, config: PipelineConfig) -> None:
        self._config = config
        self._database = Database(config.database_url)
        self._publisher = RedisStreamPublisher.from_url(config.redis_url)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._counter: _CountingPublisher | None = None
        self._relay: _TimedRelay | None = None
        self._clock: _Clock | None = None

    async def warm(self) -> None:
        async with self._database.unit_of_work(read_only=True) as session:
            await session.execute(select(1))

    def start(self, window: Window) -> None:
        self._clock = _Clock()
        self._counter = _CountingPublisher(self._publisher, window)
        self._relay = _TimedRelay(
            self._database,
            self._counter,
            batch_size=self._config.relay_batch_size,
            idle_poll_s=self._config.relay_idle_poll_s,
        )
        self._task = asyncio.create_task(self._relay.run(self._stop))

    async def stop(self) -> RelayResult:
        self._stop.set()
        try:
            if self._task is not None:
                async with asyncio.timeout(RESULT_TIMEOUT_S):
                    await self._task
        finally:
            await self._publisher.aclose()
            await self._database.dispose()
        assert self._counter is not None and self._clock is not None and self._relay is not None
        ordered = sorted(self._counter.batch_seconds)
        cycles = sorted(self._relay.batch_seconds)
        return RelayResult(
            relayed=self._counter.relayed,
            relayed_in_window=self._counter.relayed_in_window,
            relayed_steady=self._counter.relayed_steady,
            batches=len(ordered),
            mean_batch=round(statistics.fmean(self._counter.batch_sizes), 1) if ordered else 0.0,
            batch_p50_ms=round(_percentile(cycles, 0.5) * 1000, 2),
            batch_p99_ms=round(_percentile(cycles, 0.99) * 1000, 2),
            dispatch_p50_ms=round(_percentile(ordered, 0.5) * 1000, 2),
            dispatch_p99_ms=round(_percentile(ordered, 0.99) * 1000, 2),
            cpu=self._clock.cpu(),
        )


class _ConsumerRole:
    """A `Consumer` on the run's stream whose handler records each event for the delay figures."""

    def __init__(self, config: PipelineConfig) -> None:
        self._config = config
        # The socket timeout must outlast XREADGROUP's block.
        self._client = Redis.from_url(config.redis_url, socket_timeout=config.consumer_block_s + 5.0)
        self._source = RedisStreamSource(self._client, stream=stream_key(config.source), group=config.group)
        self._handled: list[tuple[str, float]] = []
        self._consumer = Consumer(
            config.group,
            self._handle,
            self._source,
            RedisProcessedEvents(self._client, ttl_s=PROCESSED_TTL_S, key_prefix=config.processed_prefix),
            member=f"bench-{os.getpid()}",
            batch_size=config.consumer_batch_size,
            block_s=config.consumer_block_s,
            metrics=ConsumerMetrics(CollectorRegistry()),
        )

    async def _handle(self, event: events_pb2.Event) -> None:
        self._handled.append((event.id, event.time.seconds + event.time.nanos * 1e-9))

    async def warm(self) -> None:
        await self._source.ensure_group()

    async def run(self, inbox: _Inbox, window: Window) -> ConsumerResult:
        clock = _Clock()
        window_end = window.ends_at
        seen: set[str] = set()
        delays: list[float] = []
        duplicates = in_window = steady = polls = 0
        target: int | None = None
        drain_deadline = hard_deadline = window_end + self._config.drain_s + HARD_STOP_MARGIN_S
        try:
            while time.time() < hard_deadline:
                message = inbox.poll()
                if message is not None and message[0] == "drain":
                    target, drain_deadline = message[1], message[2]
                elif message is not None and message[0] == "stop":
                    break  # the coordinator is gone
                if target is not None and (len(seen) >= target or time.time() >= drain_deadline):
                    break
                await self._consumer.poll_once()
                polls += 1
                acked_at = time.time()
                for event_id, occurred_at in self._handled:
                    if event_id in seen:
                        duplicates += 1
                        continue
                    seen.add(event_id)
                    delays.append(acked_at - occurred_at)
                    if acked_at <= window_end:
                        in_window += 1
                    if window.is_steady(acked_at):
                        steady += 1
                self._handled.clear()
        finally:
            await self._client.aclose()
        delays.sort()
        return ConsumerResult(
            consumed=len(seen),
            consumed_in_window=in_window,
            consumed_steady=steady,
            duplicates=duplicates,
            delay_p50_s=round(_percentile(delays, 0.5), 4),
            delay_p99_s=round(_percentile(delays, 0.99), 4),
            delay_max_s=round(delays[-1] if delays else 0.0, 4),
            delay_mean_s=round(statistics.fmean(delays) if delays else 0.0, 4),
            polls=polls,
            drained_after_window_s=round(max(0.0, time.time() - window_end), 3),
            event_ids=frozenset(seen),
            cpu=clock.cpu(),
        )


async def _relay(config: PipelineConfig, inbox: _Inbox) -> RelayResult:
    role = _RelayRole(config)
    await role.warm()
    inbox.send("ready")
    window: Window = (await inbox.expect("go", STARTUP_TIMEOUT_S))[1]
    await asyncio.sleep(max(0.0, window.started_at - time.time()))
    role.start(window)
    limit_s = window.ends_at - time.time() + config.drain_s + HARD_STOP_MARGIN_S
    with contextlib.suppress(TimeoutError):
        await inbox.expect("stop", limit_s)
    return await role.stop()


async def _consume(config: PipelineConfig, inbox: _Inbox) -> ConsumerResult:
    role = _ConsumerRole(config)
    await role.warm()
    inbox.send("ready")
    window: Window = (await inbox.expect("go", STARTUP_TIMEOUT_S))[1]
    await asyncio.sleep(max(0.0, window.started_at - time.time()))
    return await role.run(inbox, window)


async def _relay_and_consume(config: PipelineConfig, inbox: _Inbox) -> tuple[RelayResult, ConsumerResult]:
    relay, consumer = _RelayRole(config), _ConsumerRole(config)
    await relay.warm()
    await consumer.warm()
    inbox.send("ready")
    window: Window = (await inbox.expect("go", STARTUP_TIMEOUT_S))[1]
    await asyncio.sleep(max(0.0, window.started_at - time.time()))
    relay.start(window)
    try:
        consumed = await consumer.run(inbox, window)
    finally:
        relayed = await relay.stop()
    return relayed, consumed


_ROLES: Final[dict[str, Callable[[PipelineConfig, _Inbox], Awaitable[object]]]] = {
    "producer": _produce,
    "relay": _relay,
    "consumer": _consume,
    "relay+consumer": _relay_and_consume,
}


def _child_main(role: str, config: PipelineConfig, connection: Connection) -> None:
    """A child process's entry point (spawned): run the role, send back its result or its failure."""
    logging.basicConfig(level=logging.WARNING)

    async def main() -> object:
        inbox = _Inbox(connection)
        try:
            return await _ROLES[role](config, inbox)
        finally:
            inbox.close()

    try:
        result = uvloop.run(main())
    except BaseException:  # noqa: BLE001 - whatever stops the role, the coordinator must hear of it.
        connection.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None
    connection.send(("result", result))


# ---------------------------------------------------------------------------------------------
# The coordinator.


class _Child:
    def __init__(self, role: str, process: BaseProcess, connection: Connection) -> None:
        self.role = role
        self.process = process
        self.connection = connection

    async def expect(self, kind: str, timeout_s: float) -> Any:
        ready = await asyncio.to_thread(self.connection.poll, timeout_s)
        if not ready:
            raise TimeoutError(f"the {self.role} process sent nothing within {timeout_s:g}s")
        try:
            message: Message = self.connection.recv()
        except EOFError:
            raise RuntimeError(f"the {self.role} process exited (code {self.process.exitcode})") from None
        if message[0] == "error":
            raise RuntimeError(f"the {self.role} process failed:\n{message[1]}")
        if message[0] != kind:
            raise RuntimeError(f"expected {kind!r} from the {self.role} process, got {message[0]!r}")
        return message[1] if len(message) > 1 else None

    def send(self, *message: Any) -> None:
        self.connection.send(message)

    def end(self) -> None:
        """Join the child; terminate it (this one process, by its handle) if it did not exit."""
        self.process.join(timeout=5.0)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5.0)
        self.connection.close()


def _start_children(config: PipelineConfig) -> list[_Child]:
    context = multiprocessing.get_context("spawn")
    roles = (
        ["producer", "relay", "consumer"] if config.topology == "separate" else ["producer", "relay+consumer"]
    )
    children = []
    for role in roles:
        parent_end, child_end = context.Pipe()
        process = context.Process(
            target=_child_main, args=(role, config, child_end), name=f"bench-events-{role}", daemon=True
        )
        process.start()
        child_end.close()
        children.append(_Child(role, process, parent_end))
    return children


def _server_ticks() -> dict[int, tuple[str, int]]:
    """pid → (name, CPU clock ticks) of the PostgreSQL and Redis server processes on this machine."""
    ticks: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name.startswith("postgres") or name.startswith("redis-server"):
            fields = stat[stat.rindex(")") + 2 :].split()
            ticks[int(entry.name)] = (
                "postgres" if name.startswith("postgres") else "redis",
                int(fields[11]) + int(fields[12]),
            )
    return ticks


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU clock ticks of the whole machine since boot."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class _ServerCpu:
    """CPU the database and Redis servers used over a stretch of wall time (every client's load)."""

    def __init__(self) -> None:
        self._ticks = _server_ticks()
        self._machine = _machine_ticks()
        self._began = time.perf_counter()

    def measure(self) -> tuple[dict[str, Cpu], float]:
        wall_s = time.perf_counter() - self._began
        per_tick = 1.0 / os.sysconf("SC_CLK_TCK")
        used: dict[str, float] = {"postgres": 0.0, "redis": 0.0}
        for pid, (name, ticks) in _server_ticks().items():
            used[name] += (ticks - self._ticks.get(pid, (name, 0))[1]) * per_tick
        busy, total = _machine_ticks()
        share = (busy - self._machine[0]) / max(1, total - self._machine[1])
        return {name: Cpu(round(cpu_s, 3), round(wall_s, 3)) for name, cpu_s in used.items()}, round(share, 3)


async def run_pipeline(
    config: PipelineConfig, *, announce: Callable[[str], None] | None = None
) -> PipelineResult:
    """Migrate the database, run producer, relay and consumer processes for the configured window,
    let the consumer drain, and check every event was consumed exactly once."""
    await upgrade_async(config.database_url)
    children = _start_children(config)
    by_role = {child.role: child for child in children}
    redis = Redis.from_url(config.redis_url)
    try:
        for child in children:
            await child.expect("ready", STARTUP_TIMEOUT_S)
            if announce is not None:
                announce(f"{child.role}: pid {child.process.pid}")
        window = Window.starting(time.time() + 0.2, config.duration_s)
        for child in children:
            child.send("go", window)
        await asyncio.sleep(max(0.0, window.started_at - time.time()))
        servers = _ServerCpu()
        # Measured at the window's end, while every process still holds its connections: a database
        # backend's CPU time is gone from /proc once its connection closes.
        await asyncio.sleep(max(0.0, window.ends_at - time.time()))
        server_cpu, machine_busy = servers.measure()
        producer: ProducerResult = await by_role["producer"].expect("result", 2 * RESULT_TIMEOUT_S)
        consumer_child = by_role.get("consumer") or by_role["relay+consumer"]
        consumer_child.send("drain", producer.produced, time.time() + config.drain_s)
        if config.topology == "separate":
            consumer: ConsumerResult = await consumer_child.expect(
                "result", config.drain_s + RESULT_TIMEOUT_S
            )
            by_role["relay"].send("stop")
            relay: RelayResult = await by_role["relay"].expect("result", RESULT_TIMEOUT_S)
        else:
            relay, consumer = await consumer_child.expect("result", config.drain_s + 2 * RESULT_TIMEOUT_S)
        pending = await _pending_in_group(redis, config)
    finally:
        for child in children:
            await asyncio.to_thread(child.end)
        await _delete_run_keys(redis, config)
        await redis.aclose()
    outbox_ids, unrelayed = await _outbox_state(config.database_url)
    return PipelineResult(
        config=config,
        window=window,
        producer=producer,
        relay=relay,
        consumer=consumer,
        outbox_rows=len(outbox_ids),
        unrelayed_rows=unrelayed,
        missing=len(outbox_ids - consumer.event_ids),
        unexpected=len(consumer.event_ids - outbox_ids),
        pending_in_group=pending,
        server_cpu=server_cpu,
        machine_busy_share=machine_busy,
    )


async def _pending_in_group(redis: Redis, config: PipelineConfig) -> int:
    summary = await redis.xpending(stream_key(config.source), config.group)
    return int(summary["pending"])


async def _delete_run_keys(redis: Redis, config: PipelineConfig) -> None:
    await redis.delete(stream_key(config.source), dlq_key(config.group))
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=f"{config.processed_prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            await redis.unlink(*batch)
            batch.clear()
    if batch:
        await redis.unlink(*batch)


async def _outbox_state(database_url: str) -> tuple[frozenset[str], int]:
    """The event ids in the outbox, and how many rows are still unrelayed."""
    database = Database(database_url)
    try:
        async with database.unit_of_work(read_only=True) as session:
            ids = frozenset((await session.scalars(select(OutboxEvent.event_id))).all())
            unrelayed = await session.scalar(
                select(func.count()).select_from(OutboxEvent).where(OutboxEvent.relayed_at.is_(None))
            )
    finally:
        await database.dispose()
    return ids, int(unrelayed or 0)


# ---------------------------------------------------------------------------------------------
# Baselines.


def _sample_entry() -> dict[str, bytes]:
    """A stream entry the size of the pipeline's (the same payload type and field lengths)."""
    subject = "user-123456-0"
    event = events_pb2.Event(
        id=str(uuid.uuid4()), type="user.registered", source="bench-0123abcd", subject=subject
    )
    event.time.GetCurrentTime()
    event.user_registered.CopyFrom(_registered(subject))
    return encode_entry(event)


async def measure_redis_baseline(
    redis_url: str, *, batch: int, seconds: float, max_events: int
) -> Measurement:
    """redis-py alone: XADD a batch (one pipeline), XREADGROUP it, XACK it; repeat (one process)."""
    client = Redis.from_url(redis_url)
    stream, group = f"parley-bench:baseline:{secrets.token_hex(4)}", "baseline"
    entry = _sample_entry()
    cycles: list[float] = []
    moved = 0
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
        began = time.perf_counter()
        deadline = began + seconds
        while time.perf_counter() < deadline and moved < max_events:
            cycle_began = time.perf_counter()
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(batch):
                    pipe.xadd(stream, entry, maxlen=100_000, approximate=True)  # type: ignore[arg-type]
                await pipe.execute()
            reply: Any = await client.xreadgroup(group, "m1", {stream: ">"}, count=batch)
            ids = [entry_id for _stream, entries in reply for entry_id, _fields in entries]
            await client.xack(stream, group, *ids)
            moved += len(ids)
            cycles.append(time.perf_counter() - cycle_began)
        elapsed = time.perf_counter() - began
    finally:
        await client.delete(stream)
        await client.aclose()
    return _measurement(BASELINE, batch, moved, elapsed, cycles)


async def measure_insert_baseline(
    database_url: str, *, rows_per_transaction: int, concurrency: int, seconds: float, max_rows: int
) -> Measurement:
    """Raw asyncpg INSERTs of outbox-sized rows into a scratch copy of the outbox table."""
    table = f"bench_insert_{secrets.token_hex(4)}"
    payload = _sample_entry()["event"]
    dsn = asyncpg_dsn(database_url)
    admin = await asyncpg.connect(dsn)
    await admin.execute(f"CREATE TABLE {table} (LIKE outbox_events INCLUDING ALL)")
    insert = (
        f"INSERT INTO {table} (event_id, source, event_type, subject, payload, occurred_at, attempts) "  # noqa: S608 - a name we made
        "VALUES ($1, 'bench', 'user.registered', $2, $3, now(), 0)"
    )
    latencies: list[float] = []
    inserted = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal inserted
        connection = await asyncpg.connect(dsn)
        try:
            while time.perf_counter() < deadline and inserted < max_rows:
                began = time.perf_counter()
                rows = [
                    (str(uuid.uuid4()), f"user-{inserted}-{index}", payload)
                    for index in range(rows_per_transaction)
                ]
                async with connection.transaction():
                    await connection.executemany(insert, rows)
                inserted += rows_per_transaction
                latencies.append(time.perf_counter() - began)
        finally:
            await connection.close()

    try:
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {table}")
        await admin.close()
    return _measurement(
        f"INSERT (asyncpg, {rows_per_transaction}/txn)", concurrency, inserted, elapsed, latencies
    )


def _measurement(
    name: str, concurrency: int, count: int, seconds: float, latencies: list[float]
) -> Measurement:
    ordered = sorted(latencies) or [0.0]
    return Measurement(
        name=name,
        concurrency=concurrency,
        requests=count,
        errors=0,
        seconds=round(seconds, 3),
        per_second=round(count / seconds, 1) if seconds > 0 else 0.0,
        p50_ms=round(_percentile(ordered, 0.5) * 1000, 2),
        p99_ms=round(_percentile(ordered, 0.99) * 1000, 2),
        mean_ms=round(statistics.fmean(ordered) * 1000, 2),
    )


# ---------------------------------------------------------------------------------------------
# The command.


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench events", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=5000.0, help="offered events per second (default 5000)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of production (default 60)")
    parser.add_argument(
        "--events-per-transaction", type=int, default=25, help="add_event calls per commit (default 25)"
    )
    parser.add_argument(
        "--producer-concurrency", type=int, default=8, help="transactions in flight (default 8)"
    )
    parser.add_argument("--relay-batch", type=int, default=500, help="OutboxRelay batch_size (default 500)")
    parser.add_argument(
        "--relay-idle-poll",
        type=float,
        default=RELAY_IDLE_POLL_S,
        help=f"OutboxRelay idle_poll_s (default {RELAY_IDLE_POLL_S}, as `parley worker relay` runs it)",
    )
    parser.add_argument("--consumer-batch", type=int, default=500, help="Consumer batch_size (default 500)")
    parser.add_argument("--topology", choices=["separate", "shared"], default="separate")
    parser.add_argument(
        "--drain", type=float, default=30.0, help="seconds the consumer gets to catch up after"
    )
    parser.add_argument(
        "--baseline-seconds", type=float, default=5.0, help="length of each baseline (default 5)"
    )
    arguments = parser.parse_args(argv)
    if arguments.rate <= 0 or arguments.duration <= 0 or arguments.baseline_seconds <= 0:
        parser.error("--rate, --duration and --baseline-seconds must be positive")
    if min(arguments.events_per_transaction, arguments.producer_concurrency, arguments.relay_batch) < 1:
        parser.error("--events-per-transaction, --producer-concurrency and --relay-batch must be at least 1")
    if arguments.consumer_batch < 1 or arguments.drain < 0:
        parser.error("--consumer-batch must be at least 1 and --drain not negative")
    return arguments


@contextlib.asynccontextmanager
async def _fresh_database() -> AsyncIterator[str]:
    base = os.environ.get("PARLEY_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    async with fresh_postgres_database(base) as url:
        yield url


def _announce(line: str) -> None:
    print(f"bench events: {line}", file=sys.stderr, flush=True)  # noqa: T201 - progress for the terminal.


async def _require_redis(redis_url: str) -> None:
    client = Redis.from_url(redis_url, socket_connect_timeout=5.0, socket_timeout=5.0)
    try:
        await client.ping()
    except (RedisError, OSError) as error:
        raise SystemExit(
            f"bench events: Redis is not reachable at {redis_url} (PARLEY_TEST_REDIS_URL): {error}; "
            "scripts/ensure-services starts it"
        ) from None
    finally:
        await client.aclose()


async def run(arguments: argparse.Namespace) -> Report:
    load_at_start = [round(load, 2) for load in os.getloadavg()]
    redis_url = os.environ.get("PARLEY_TEST_REDIS_URL") or DEFAULT_REDIS_URL
    await _require_redis(redis_url)
    report = Report(benchmark="events", baseline=BASELINE)
    async with _fresh_database() as database_url:
        await upgrade_async(database_url)
        _announce(f"baselines, {arguments.baseline_seconds:g}s each")
        report.measurements.append(
            await measure_redis_baseline(
                redis_url,
                batch=arguments.consumer_batch,
                seconds=arguments.baseline_seconds,
                max_events=int(arguments.baseline_seconds * 1_000_000),
            )
        )
        insert = await measure_insert_baseline(
            database_url,
            rows_per_transaction=arguments.events_per_transaction,
            concurrency=arguments.producer_concurrency,
            seconds=arguments.baseline_seconds,
            max_rows=int(arguments.baseline_seconds * 1_000_000),
        )
        report.measurements.append(insert)
        config = PipelineConfig(
            database_url=database_url,
            redis_url=redis_url,
            rate=arguments.rate,
            duration_s=arguments.duration,
            events_per_transaction=arguments.events_per_transaction,
            producer_concurrency=arguments.producer_concurrency,
            relay_batch_size=arguments.relay_batch,
            relay_idle_poll_s=arguments.relay_idle_poll,
            consumer_batch_size=arguments.consumer_batch,
            topology=arguments.topology,
            drain_s=arguments.drain,
        )
        _announce(f"pipeline at {config.rate:g} events/s for {config.duration_s:g}s ({config.topology})")
        result = await run_pipeline(config, announce=_announce)
    report.measurements.extend(_pipeline_measurements(result))
    report.notes.update(_pipeline_notes(result, insert, load_at_start))
    return report


def goal_met(result: PipelineResult) -> bool:
    """The issue's goal: offered at least GOAL_EVENTS_PER_S, consumed as fast (within the
    `RATE_TOLERANCE` that whole batches straddling the window's edges account for), p99 delay
    under GOAL_P99_S, and every event consumed exactly once."""
    return (
        result.config.rate >= GOAL_EVENTS_PER_S
        and result.consumed_per_s >= (1 - RATE_TOLERANCE) * GOAL_EVENTS_PER_S
        and result.consumer.delay_p99_s < GOAL_P99_S
        and result.exact
    )


def _pipeline_measurements(result: PipelineResult) -> list[Measurement]:
    config, producer, relay, consumer = result.config, result.producer, result.relay, result.consumer
    window = round(result.window.steady_s, 3)
    return [
        Measurement(
            name=f"produced (add_event, {config.events_per_transaction}/txn)",
            concurrency=config.producer_concurrency,
            requests=producer.produced_steady,
            errors=0,
            seconds=window,
            per_second=round(result.produced_per_s, 1),
            p50_ms=producer.transaction_p50_ms,
            p99_ms=producer.transaction_p99_ms,
            mean_ms=0.0,
        ),
        Measurement(
            name="relayed (outbox -> XADD)",
            concurrency=1,
            requests=relay.relayed_steady,
            errors=0,
            seconds=window,
            per_second=round(result.relayed_per_s, 1),
            p50_ms=relay.batch_p50_ms,
            p99_ms=relay.batch_p99_ms,
            mean_ms=0.0,
        ),
        Measurement(
            name="consumed end to end (delay)",
            concurrency=1,
            requests=consumer.consumed_steady,
            errors=consumer.duplicates + result.missing + result.unexpected,
            seconds=window,
            per_second=round(result.consumed_per_s, 1),
            p50_ms=round(consumer.delay_p50_s * 1000, 2),
            p99_ms=round(consumer.delay_p99_s * 1000, 2),
            mean_ms=round(consumer.delay_mean_s * 1000, 2),
        ),
    ]


def _pipeline_notes(
    result: PipelineResult, insert: Measurement, load_at_start: list[float]
) -> dict[str, object]:
    config = result.config
    # In the shared topology both roles measured the same process.
    roles = (
        {"relay": result.relay.cpu, "consumer": result.consumer.cpu}
        if config.topology == "separate"
        else {"relay+consumer": result.consumer.cpu}
    )
    cpu = {
        "producer": result.producer.cpu,
        **roles,
        **{f"{name} (server, all clients)": value for name, value in result.server_cpu.items()},
    }
    return {
        "goal": {
            "events_per_s": GOAL_EVENTS_PER_S,
            "p99_s": GOAL_P99_S,
            "met": goal_met(result),
        },
        "offered_per_s": config.rate,
        "produced_per_s": round(result.produced_per_s, 1),
        "relayed_per_s": round(result.relayed_per_s, 1),
        "consumed_per_s": round(result.consumed_per_s, 1),
        "consumed_per_s_to_insert_baseline": round(result.consumed_per_s / insert.per_second, 4)
        if insert.per_second
        else 0.0,
        "delay_s": {
            "p50": result.consumer.delay_p50_s,
            "p99": result.consumer.delay_p99_s,
            "max": result.consumer.delay_max_s,
            "mean": result.consumer.delay_mean_s,
        },
        "backlog_at_window_end": result.backlog_at_window_end,
        "drained_after_window_s": result.consumer.drained_after_window_s,
        "exactly_once": {
            "exact": result.exact,
            "produced": result.producer.produced,
            "outbox_rows": result.outbox_rows,
            "consumed": result.consumer.consumed,
            "duplicates": result.consumer.duplicates,
            "missing": result.missing,
            "unexpected": result.unexpected,
            "unrelayed_rows": result.unrelayed_rows,
            "pending_in_group": result.pending_in_group,
        },
        "producer_max_behind_schedule_s": result.producer.max_behind_schedule_s,
        "relay_batches": result.relay.batches,
        "relay_mean_batch": result.relay.mean_batch,
        "relay_batch_ms": {"p50": result.relay.batch_p50_ms, "p99": result.relay.batch_p99_ms},
        "relay_dispatch_ms": {"p50": result.relay.dispatch_p50_ms, "p99": result.relay.dispatch_p99_ms},
        "consumer_polls": result.consumer.polls,
        "cpu_share_of_one_core": {name: round(value.share, 3) for name, value in cpu.items()},
        "cpu": {name: asdict(value) for name, value in cpu.items()},
        "machine_busy_share_during_window": result.machine_busy_share,
        "setup": {
            "topology": config.topology,
            "events_per_transaction": config.events_per_transaction,
            "producer_concurrency": config.producer_concurrency,
            "relay_batch_size": config.relay_batch_size,
            "relay_idle_poll_s": config.relay_idle_poll_s,
            "consumer_batch_size": config.consumer_batch_size,
            "consumer_block_s": config.consumer_block_s,
            "duration_s": config.duration_s,
            "rates_counted_from_s": round(result.window.steady_from - result.window.started_at, 3),
            "drain_s": config.drain_s,
        },
        "load_average_at_start": load_at_start,
    }


def main(argv: list[str] | None = None) -> int:
    arguments = _arguments(argv)
    report = uvloop.run(run(arguments))
    path = report.write()
    print_report(report, path)
    notes = report.notes
    goal = notes.get("goal")
    met = isinstance(goal, dict) and bool(goal.get("met"))
    print(  # noqa: T201 - a benchmark reports to the terminal.
        f"goal (>= {GOAL_EVENTS_PER_S:g}/s, p99 < {GOAL_P99_S:g}s, exactly once): "
        f"{'met' if met else 'NOT met'}; "
        f"backlog at window end {notes.get('backlog_at_window_end')}; "
        f"CPU share of a core {notes.get('cpu_share_of_one_core')}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
