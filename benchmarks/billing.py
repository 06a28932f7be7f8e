"""`scripts/bench billing`: credit reserve+settle pairs per second over gRPC, as chat makes them.

The billing service is hosted in this process exactly as `parley serve billing` hosts it
(`runtime.process.host_services`: the production server, its interceptor chain, mTLS with the
`billing` certificate), on loopback, over a brand-new database: PostgreSQL (created for the run on
the server of PARLEY_TEST_POSTGRES_URL and dropped after it) and then a SQLite file, both in one run
by default (`--databases` picks). The client is chat: the `chat` workload's certificate, the only
caller BillingInternalService admits, on one channel. (The server logs that it cannot verify bearer
tokens: no auth runs here, and chat presents none.) Billing's event consumers and background loops
(the reservation sweeper) do not run: none of them is on the reserve/settle path.

Per database, for each `--concurrency` (1 and 32 callers by default), each workload stops at
`--requests` or `--seconds`, whichever comes first:
  Health.Check       the baseline: grpc.health.v1 Health/Check on the same channel, server and
                     interceptor chain, answered from memory (no database)
  pairs, N users     one pair = ReserveCredits (a new request_id; gpt-4o-mini, 100 input + 200 max
                     output tokens) then SettleReservation (100 + 150 used); caller i takes user
                     i mod N of `--users` users, each started on the free plan by one GetBalance
                     beforehand, so account creation is not timed
  pairs, one user    the contended case: every caller reserves against one user's row (a fresh
                     user per concurrency); 1 + 2 tokens reserved, 1 + 1 used, so the run cannot
                     spend the free 100,000 (the argument check makes sure): it never exhausts
Then, at the highest concurrency, one more fresh user is spent to the end: pairs of 300 reserved
and 250 used until the hard stop refuses them, bounded at twice the pairs the allowance pays for
(800 attempts) and `--spend-seconds`. Its INSUFFICIENT_CREDITS refusals are counted apart (they are
the hard stop working, not errors); this phase is in the notes, not timed against the goal.

Checks, after every workload of a database ran: every user's balance (GetBalance) has
remaining_tokens >= -bound, where the bound documented in `services.billing.ledger` (what
settlements of reservations in flight used beyond their estimates) is 0 here, since no pair uses
more than it reserved; used and reserved tokens equal what the client was granted and settled; and
each cached balance equals the sums its ledger derives (`CreditLedger.derived_sums`, SQL).

Beside each workload's figures: this process's CPU milliseconds per call (client and server,
every thread; PostgreSQL's own CPU is not in it), steadier than throughput on a shared machine.

Caveats: client and server share one process and event loop, so the client's protobuf and HTTP/2
work is in every figure (the ratios are the comparable numbers). Logging is at WARNING.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final, TypeVar

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from benchmarks.harness import (
    Measurement,
    Report,
    Workload,
    check_lines,
    closed_loop,
    goal_check,
    print_report,
    scratch_database,
)
from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from runtime.process import host_services, set_up_observability, settle_heap
from services.billing.ledger import CreditLedger, Estimate, Usage
from services.billing.plans import PlanCatalog
from services.billing.repository import billing_units_of_work
from services.billing.subscriptions import SubscriptionManager
from services.common.db import Database
from services.common.errors import details_of
from services.common.ids import new_id
from services.common.migrate import upgrade_async
from services.common.model_catalog import load_model_catalog
from services.common.pki import MICROSERVICES_CERTIFICATES, ensure_pki
from services.common.service_tls import secure_channel_for
from services.common.settings import Settings, load_settings

Item = TypeVar("Item")
Result = TypeVar("Result")

DATABASES: Final = ("postgresql", "sqlite")
BASELINE: Final = "Health.Check"
ONE_USER: Final = "pairs, one user"
CALLER: Final = "chat"
SERVICE: Final = "billing"
INTERNAL_SERVICE: Final = billing_pb2.DESCRIPTOR.services_by_name["BillingInternalService"].full_name
MODEL: Final = "gpt-4o-mini"
PROVIDER: Final = "openai"
# What a chat turn reserves and then uses.
PAIR_ESTIMATE: Final = Estimate(MODEL, input_tokens=100, max_output_tokens=200)
PAIR_USAGE: Final = Usage(MODEL, PROVIDER, input_tokens=100, output_tokens=150)
# The contended user's pairs are small so that one free allowance lasts the whole timed run.
CONTENDED_ESTIMATE: Final = Estimate(MODEL, input_tokens=1, max_output_tokens=2)
CONTENDED_USAGE: Final = Usage(MODEL, PROVIDER, input_tokens=1, output_tokens=1)
# The free plan's allowance (its seed migration); the run checks the warmed balances say the same.
FREE_ALLOWANCE: Final = 100_000
# The ledger's documented bound on going below zero is what settlements used beyond their
# reservations; every pair here uses less than it reserved.
OVERDRAFT_BOUND: Final = 0
INSUFFICIENT_CREDITS: Final = "INSUFFICIENT_CREDITS"
# Issue 12: pairs per second on PostgreSQL.
PAIRS_GOAL: Final = 1_000.0
PAIRS_MOONSHOT: Final = 3_000.0
MAX_CONCURRENCY: Final = 256
MAX_USERS: Final = 100_000
MAX_SECONDS: Final = 600.0
# No RPC of the benchmark may wait longer than this (a hung call would outlast every other bound).
RPC_TIMEOUT_S: Final = 30.0
# How many setup and check RPCs run at once (pre-warming users, reading balances).
SETUP_CONCURRENCY: Final = 32
# Users named in the report when a balance check fails.
MAX_EXAMPLES: Final = 5


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench billing", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--databases",
        nargs="+",
        choices=DATABASES,
        default=list(DATABASES),
        help="which databases, in order (default: postgresql sqlite)",
    )
    parser.add_argument(
        "--concurrency",
        nargs="+",
        type=int,
        default=[1, 32],
        help="concurrent callers, one run of every workload per value (default: 1 32)",
    )
    parser.add_argument(
        "--requests", type=int, default=20_000, help="at most this many calls or pairs per workload"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="at most this long per workload")
    parser.add_argument(
        "--users", type=int, default=1_000, help="users the spread pairs go round (default 1000)"
    )
    parser.add_argument(
        "--spend-seconds",
        type=float,
        default=30.0,
        help="at most this long to spend one user's allowance to the hard stop (default 30)",
    )
    arguments = parser.parse_args(argv)
    arguments.databases = list(dict.fromkeys(arguments.databases))
    arguments.concurrency = list(dict.fromkeys(arguments.concurrency))
    if not all(1 <= concurrency <= MAX_CONCURRENCY for concurrency in arguments.concurrency):
        parser.error(f"--concurrency values must be within 1..{MAX_CONCURRENCY}")
    if arguments.requests < 1 or not 0 < arguments.seconds <= MAX_SECONDS:
        parser.error(f"--requests must be at least 1 and --seconds within (0, {MAX_SECONDS:g}]")
    if not 0 < arguments.spend_seconds <= MAX_SECONDS:
        parser.error(f"--spend-seconds must be within (0, {MAX_SECONDS:g}]")
    if not 1 <= arguments.users <= MAX_USERS:
        parser.error(f"--users must be within 1..{MAX_USERS}")
    if spread_tokens_per_user(arguments.requests, arguments.users, arguments.concurrency) > FREE_ALLOWANCE:
        parser.error(
            f"--requests {arguments.requests} over --users {arguments.users} could spend a user's free "
            f"{FREE_ALLOWANCE} tokens; use fewer requests or more users"
        )
    if contended_tokens(arguments.requests, arguments.concurrency) > FREE_ALLOWANCE:
        parser.error(
            f"--requests {arguments.requests} could spend the contended user's free {FREE_ALLOWANCE} "
            "tokens; use fewer requests"
        )
    return arguments


def spread_tokens_per_user(requests: int, users: int, concurrencies: Sequence[int]) -> int:
    """The most one spread user could have reserved over the run, warm-ups included, were every
    reservation charged in full: the spread pairs must never meet the hard stop."""
    pairs = sum(math.ceil((requests + concurrency) / users) for concurrency in concurrencies)
    return pairs * PAIR_ESTIMATE.tokens


def contended_tokens(requests: int, concurrencies: Sequence[int]) -> int:
    """The most one contended run could reserve, warm-up included (a fresh user per run)."""
    return (requests + max(concurrencies)) * CONTENDED_ESTIMATE.tokens


def spending_attempts() -> int:
    """Twice the pairs the free allowance pays for: enough to reach the hard stop, and a bound."""
    return 2 * math.ceil(FREE_ALLOWANCE / PAIR_USAGE.tokens)


@dataclass
class Book:
    """What the client was granted, per user: the balances must agree with it exactly."""

    used: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)

    def open(self, user_id: str) -> None:
        self.used.setdefault(user_id, 0)
        self.held.setdefault(user_id, 0)

    def reserved(self, user_id: str, tokens: int) -> None:
        self.held[user_id] += tokens

    def settled(self, user_id: str, reserved_tokens: int, used_tokens: int) -> None:
        self.held[user_id] -= reserved_tokens
        self.used[user_id] += used_tokens

    def refused(self, user_id: str) -> None:
        self.refusals[user_id] = self.refusals.get(user_id, 0) + 1

    def total_refusals(self) -> int:
        return sum(self.refusals.values())

    def pairs_settled(self, user_id: str, usage: Usage) -> int:
        return self.used[user_id] // usage.tokens


class Chat:
    """Billing's internal API as chat calls it, keeping the book of what it was granted."""

    def __init__(self, channel: grpc.aio.Channel, book: Book) -> None:
        self._internal = billing_pb2_grpc.BillingInternalServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._book = book

    async def health(self) -> None:
        await self._health.Check(
            health_pb2.HealthCheckRequest(service=INTERNAL_SERVICE), timeout=RPC_TIMEOUT_S
        )

    async def balance(self, user_id: str) -> billing_pb2.Balance:
        response: billing_pb2.GetBalanceResponse = await self._internal.GetBalance(
            billing_pb2.GetBalanceRequest(user_id=user_id), timeout=RPC_TIMEOUT_S
        )
        return response.balance

    async def pair(self, user_id: str, estimate: Estimate, usage: Usage) -> bool:
        """Reserve then settle; False when the hard stop refused the reservation."""
        request_id = new_id()
        try:
            reserved: billing_pb2.ReserveCreditsResponse = await self._internal.ReserveCredits(
                billing_pb2.ReserveCreditsRequest(
                    request_id=request_id,
                    user_id=user_id,
                    estimate=billing_pb2.CreditEstimate(
                        model=estimate.model,
                        input_tokens=estimate.input_tokens,
                        max_output_tokens=estimate.max_output_tokens,
                    ),
                ),
                timeout=RPC_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            if reason_of(error) != INSUFFICIENT_CREDITS:
                raise
            self._book.refused(user_id)
            return False
        self._book.reserved(user_id, estimate.tokens)
        await self._internal.SettleReservation(
            billing_pb2.SettleReservationRequest(
                reservation_id=reserved.reservation.id,
                request_id=request_id,
                actual_usage=billing_pb2.ActualUsage(
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                    model=usage.model,
                    provider=usage.provider,
                ),
            ),
            timeout=RPC_TIMEOUT_S,
        )
        self._book.settled(user_id, estimate.tokens, usage.tokens)
        return True


def reason_of(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason a Parley error carries ("" for one without)."""
    status = rpc_status.from_call(error)
    info = None if status is None else details_of(status).get("ErrorInfo")
    return str(getattr(info, "reason", ""))


async def bounded_map(
    function: Callable[[Item], Awaitable[Result]], items: Sequence[Item], *, at_once: int
) -> list[Result]:
    """`function` of each item, in order, with at most `at_once` calls in flight."""
    results: list[Result] = []
    for start in range(0, len(items), at_once):
        results += await asyncio.gather(*(function(item) for item in items[start : start + at_once]))
    return results


@dataclass
class DatabaseRun:
    """One database's part of the report, and the users whose balances are checked after it."""

    dialect: str
    arguments: argparse.Namespace
    report: Report
    chat: Chat
    book: Book
    errors: dict[str, str] = field(default_factory=dict)
    # This process's CPU (client and server, every thread) per call, warm-up included.
    cpu_ms_per_call: dict[str, float] = field(default_factory=dict)

    async def measure(self, workload: Workload, *, concurrency: int, baseline: str) -> Measurement:
        cpu_before = time.process_time()
        measurement = await closed_loop(
            workload.name,
            workload,
            concurrency=concurrency,
            max_requests=self.arguments.requests,
            max_seconds=self.arguments.seconds,
            warmup=concurrency,
        )
        cpu_ms = (time.process_time() - cpu_before) * 1000
        self.cpu_ms_per_call[workload.name] = round(cpu_ms / (measurement.requests + concurrency), 3)
        self.report.measurements.append(measurement)
        self.report.baseline_of[workload.name] = baseline
        if workload.first_error is not None:
            self.errors[workload.name] = workload.first_error
        return measurement

    async def start_users(self, count: int) -> list[str]:
        """New users, each started on the free plan by one GetBalance (not timed)."""
        users = [new_id() for _ in range(count)]
        # One call first, alone: starting a user reads the plan catalog inside its write unit of
        # work, and while the catalog is not cached yet, that read needs a second pooled connection.
        # Dozens of concurrent first calls then hold the whole pool waiting for it (a 30 s stall).
        balances = [await self.chat.balance(users[0])]
        balances += await bounded_map(self.chat.balance, users[1:], at_once=SETUP_CONCURRENCY)
        for user, balance in zip(users, balances, strict=True):
            if (balance.included_tokens, balance.hard_stop) != (FREE_ALLOWANCE, True):
                raise RuntimeError(f"a new user's balance is not the free plan's: {balance}")
            self.book.open(user)
        return users


async def run(arguments: argparse.Namespace) -> tuple[Report, list[str]]:
    """Every database's measurements and checks in one report, and the correctness checks that failed."""
    load_at_start = [round(load, 2) for load in os.getloadavg()]
    first_baseline = _name(arguments.databases[0], arguments.concurrency[0], BASELINE)
    report = Report(benchmark="billing", baseline=first_baseline)
    outcomes: dict[str, DatabaseOutcome] = {}
    for dialect in arguments.databases:
        outcomes[dialect] = await _run_on(dialect, arguments, report)
    throughput, correctness = _checks(report, arguments, outcomes)
    report.notes.update(
        {
            "baseline": "grpc.health.v1.Health/Check on the same channel, server and interceptor chain "
            "(no database); each workload is compared with the one at its concurrency on its database",
            "pairs": {
                "spread": {
                    "reserved_tokens": PAIR_ESTIMATE.tokens,
                    "used_tokens": PAIR_USAGE.tokens,
                    "model": MODEL,
                    "users": arguments.users,
                },
                "one_user": {
                    "reserved_tokens": CONTENDED_ESTIMATE.tokens,
                    "used_tokens": CONTENDED_USAGE.tokens,
                    "model": MODEL,
                    "exhausts": False,
                },
            },
            "overdraft_bound_tokens": OVERDRAFT_BOUND,
            "bounds": {
                "requests": arguments.requests,
                "seconds": arguments.seconds,
                "spend_attempts": spending_attempts(),
                "spend_seconds": arguments.spend_seconds,
            },
            "setup": "billing hosted as `parley serve billing` hosts it, client (workload chat) in the same "
            "process and event loop, loopback gRPC with mTLS, one channel",
            "databases": {dialect: asdict(outcome) for dialect, outcome in outcomes.items()},
            "checks": {**throughput, **correctness},
            "load_average_at_start": load_at_start,
            "load_average_at_end": [round(load, 2) for load in os.getloadavg()],
        }
    )
    failed = [name for name, check in correctness.items() if not check["met"]]
    return report, failed


def _spread(arguments: argparse.Namespace) -> str:
    return f"pairs, {arguments.users} users"


def _name(dialect: str, concurrency: int, workload: str) -> str:
    return f"{dialect} c{concurrency} {workload}"


@dataclass
class Spending:
    """One user spent to the hard stop by concurrent callers."""

    callers: int
    attempts: int
    seconds: float
    pairs_settled: int
    refused_insufficient_credits: int
    errors: int
    # Sequentially, the allowance pays for this many pairs; concurrent callers can never get more.
    most_pairs_payable: int
    remaining_tokens: int
    # Whether what remains is less than one more reservation: the hard stop was reached.
    spent: bool


@dataclass
class DatabaseOutcome:
    """What one database's run found besides its measurements."""

    users_checked: int
    # remaining_tokens below -OVERDRAFT_BOUND.
    overdrafts: int
    # Balances whose used or reserved tokens differ from what the client was granted and settled.
    book_mismatches: int
    # Cached balances that differ from the sums their ledger derives.
    ledger_mismatches: int
    # INSUFFICIENT_CREDITS refusals in the timed workloads (sized so that there are none).
    refusals_in_timed_workloads: dict[str, int]
    spending: Spending
    cpu_ms_per_call: dict[str, float]
    first_errors: dict[str, str]
    examples: list[str]


async def _run_on(dialect: str, arguments: argparse.Namespace, report: Report) -> DatabaseOutcome:
    async with scratch_database(sqlite=dialect == "sqlite") as (url, _):
        await upgrade_async(url)
        settings = load_settings(
            database_url=url, grpc_port=0, metrics_port=0, log_level="WARNING", log_format="console"
        )
        database = Database(url)
        try:
            async with _chat_channel(settings, database) as channel:
                book = Book()
                bench = DatabaseRun(dialect, arguments, report, Chat(channel, book), book)
                refusals = await _measure(bench)
                spending = await _spend_one_user(bench)
                overdrafts, book_mismatches, examples = await _check_balances(bench)
            ledger_mismatches = await _ledger_mismatches(database, list(book.used))
        finally:
            await database.dispose()
    return DatabaseOutcome(
        users_checked=len(book.used),
        overdrafts=overdrafts,
        book_mismatches=book_mismatches,
        ledger_mismatches=ledger_mismatches,
        refusals_in_timed_workloads=refusals,
        spending=spending,
        cpu_ms_per_call=bench.cpu_ms_per_call,
        first_errors=bench.errors,
        examples=examples,
    )


@contextlib.asynccontextmanager
async def _chat_channel(settings: Settings, database: Database) -> AsyncIterator[grpc.aio.Channel]:
    """Billing served as `parley serve billing` serves it, and a channel to it with chat's certificate."""
    with tempfile.TemporaryDirectory(prefix="parley-bench-pki-") as pki_directory:
        pki = ensure_pki(Path(pki_directory), MICROSERVICES_CERTIFICATES)
        observability = set_up_observability(settings, process_name="bench-billing")
        services = host_services(
            settings, [SERVICE], database, pki.files(SERVICE), observability, embedded=False
        )
        await services.start()
        settle_heap()
        channel = secure_channel_for(f"127.0.0.1:{services.port}", pki.files(CALLER), server=SERVICE)
        try:
            yield channel
        finally:
            await channel.close()
            await services.stop()
            observability.tracer_provider.shutdown()


async def _measure(bench: DatabaseRun) -> dict[str, int]:
    """The timed workloads at each concurrency; their INSUFFICIENT_CREDITS refusals by name."""
    spread_users = await bench.start_users(bench.arguments.users)
    refusals: dict[str, int] = {}
    for concurrency in bench.arguments.concurrency:
        baseline = _name(bench.dialect, concurrency, BASELINE)
        await bench.measure(
            Workload(baseline, _health(bench.chat)), concurrency=concurrency, baseline=baseline
        )
        contended_user = await bench.start_users(1)
        for workload in (
            Workload(
                _name(bench.dialect, concurrency, _spread(bench.arguments)),
                _pairs(bench.chat, spread_users, PAIR_ESTIMATE, PAIR_USAGE),
            ),
            Workload(
                _name(bench.dialect, concurrency, ONE_USER),
                _pairs(bench.chat, contended_user, CONTENDED_ESTIMATE, CONTENDED_USAGE),
            ),
        ):
            refused_before = bench.book.total_refusals()
            await bench.measure(workload, concurrency=concurrency, baseline=baseline)
            refusals[workload.name] = bench.book.total_refusals() - refused_before
    return refusals


def _health(chat: Chat) -> Callable[[int], Awaitable[None]]:
    async def check(index: int) -> None:
        await chat.health()

    return check


def _pairs(
    chat: Chat, users: Sequence[str], estimate: Estimate, usage: Usage
) -> Callable[[int], Awaitable[bool]]:
    """Call `index` makes a pair for user `index` mod len(users): consecutive calls, other users."""

    async def pair(index: int) -> bool:
        return await chat.pair(users[index % len(users)], estimate, usage)

    return pair


async def _spend_one_user(bench: DatabaseRun) -> Spending:
    """A fresh user's allowance spent by the most concurrent callers, to the hard stop and beyond."""
    user = await bench.start_users(1)
    callers = max(bench.arguments.concurrency)
    workload = Workload(
        _name(bench.dialect, callers, "spend one user"), _pairs(bench.chat, user, PAIR_ESTIMATE, PAIR_USAGE)
    )
    measurement = await closed_loop(
        workload.name,
        workload,
        concurrency=callers,
        max_requests=spending_attempts(),
        max_seconds=bench.arguments.spend_seconds,
    )
    if workload.first_error is not None:
        bench.errors[workload.name] = workload.first_error
    balance = await bench.chat.balance(user[0])
    return Spending(
        callers=callers,
        attempts=measurement.requests,
        seconds=measurement.seconds,
        pairs_settled=bench.book.pairs_settled(user[0], PAIR_USAGE),
        refused_insufficient_credits=bench.book.refusals.get(user[0], 0),
        errors=measurement.errors,
        most_pairs_payable=(FREE_ALLOWANCE - PAIR_ESTIMATE.tokens) // PAIR_USAGE.tokens + 1,
        remaining_tokens=balance.remaining_tokens,
        spent=balance.remaining_tokens < PAIR_ESTIMATE.tokens,
    )


async def _check_balances(bench: DatabaseRun) -> tuple[int, int, list[str]]:
    """(overdrafts, balances unlike the book, a few examples) over every user of the run."""
    users = list(bench.book.used)
    balances = await bounded_map(bench.chat.balance, users, at_once=SETUP_CONCURRENCY)
    overdrafts = mismatches = 0
    examples: list[str] = []
    for user, balance in zip(users, balances, strict=True):
        expected = (bench.book.used[user], bench.book.held[user])
        if balance.remaining_tokens < -OVERDRAFT_BOUND:
            overdrafts += 1
            examples.append(f"{user}: remaining_tokens {balance.remaining_tokens}")
        if (balance.used_tokens, balance.reserved_tokens) != expected:
            mismatches += 1
            examples.append(
                f"{user}: used/reserved {balance.used_tokens}/{balance.reserved_tokens}, "
                f"the client settled/holds {expected[0]}/{expected[1]}"
            )
    return overdrafts, mismatches, examples[:MAX_EXAMPLES]


async def _ledger_mismatches(database: Database, users: Sequence[str]) -> int:
    """Users whose cached balance differs from the sums of their ledger entries (read in SQL)."""
    units = billing_units_of_work(database)
    ledger = CreditLedger(units, SubscriptionManager(units, PlanCatalog(units)), load_model_catalog())
    sums = await bounded_map(ledger.derived_sums, users, at_once=SETUP_CONCURRENCY)
    return sum(1 for cached, derived in sums if cached != derived)


def _checks(
    report: Report, arguments: argparse.Namespace, outcomes: dict[str, DatabaseOutcome]
) -> tuple[dict[str, dict[str, object]], dict[str, dict[str, object]]]:
    """(throughput checks on PostgreSQL against issue 12's goals, correctness checks over every database)."""
    by_name = {m.name: m for m in report.measurements}
    callers = max(arguments.concurrency)
    throughput: dict[str, dict[str, object]] = {}
    for workload in (_spread(arguments), ONE_USER):
        measurement = by_name.get(_name("postgresql", callers, workload))
        if measurement is not None:
            throughput[f"postgresql pairs/s, {callers} callers, {workload}"] = goal_check(
                measurement.per_second, PAIRS_GOAL, PAIRS_MOONSHOT, at_most=False
            )
    errors = sum(m.errors for m in report.measurements) + sum(o.spending.errors for o in outcomes.values())
    counts = {
        f"overdrafts beyond the bound ({OVERDRAFT_BOUND} tokens), every user": sum(
            o.overdrafts for o in outcomes.values()
        ),
        "balances unlike what the client was granted and settled": sum(
            o.book_mismatches for o in outcomes.values()
        ),
        "cached balances unlike their ledger's sums": sum(o.ledger_mismatches for o in outcomes.values()),
        "pairs beyond what the spent user's allowance pays for": sum(
            max(0, o.spending.pairs_settled - o.spending.most_pairs_payable) for o in outcomes.values()
        ),
        # Within its bounds the spending phase must reach the hard stop, or it proved nothing.
        "spent users that never reached the hard stop": sum(
            1 for o in outcomes.values() if not o.spending.spent
        ),
        "errors (INSUFFICIENT_CREDITS refusals apart)": errors,
    }
    correctness = {name: goal_check(count, 0, 0, at_most=True) for name, count in counts.items()}
    return throughput, correctness


def _print_details(report: Report, failed: Sequence[str]) -> None:
    databases = report.notes.get("databases")
    cpu: dict[str, float] = {}
    if isinstance(databases, dict):
        for outcome in databases.values():
            cpu.update(outcome["cpu_ms_per_call"])
    lines = [f"{'workload':34} {'mean ms':>8} {'cpu ms/call':>11}"]
    lines += [f"{m.name:34} {m.mean_ms:8.2f} {cpu.get(m.name, 0.0):11.3f}" for m in report.measurements]
    if isinstance(databases, dict):
        for dialect, outcome in databases.items():
            spending = outcome["spending"]
            lines.append(
                f"{dialect}: spent one user with {spending['callers']} callers: {spending['pairs_settled']} "
                f"pairs settled (at most {spending['most_pairs_payable']} payable), "
                f"{spending['refused_insufficient_credits']} refused INSUFFICIENT_CREDITS, "
                f"remaining {spending['remaining_tokens']} tokens, {spending['errors']} errors"
            )
            refused = {name: count for name, count in outcome["refusals_in_timed_workloads"].items() if count}
            if refused:
                lines.append(f"{dialect}: INSUFFICIENT_CREDITS in timed workloads: {refused}")
            lines += [
                f"{dialect}: first error in {name}: {error}"
                for name, error in outcome["first_errors"].items()
            ]
            lines += [f"{dialect}: {example}" for example in outcome["examples"]]
    checks = report.notes.get("checks")
    if isinstance(checks, dict):
        lines += check_lines(checks)
    lines += [f"FAILED: {name}" for name in failed]
    print("\n".join(lines))  # noqa: T201 - a benchmark's report is for the terminal.


def main(argv: list[str] | None = None) -> int:
    arguments = _arguments(argv)
    # Parley never forks Python that uses gRPC; silence grpc's fork-handler warnings as the CLI does.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    report, failed = uvloop.run(run(arguments))
    path = report.write()
    print_report(report, path)
    _print_details(report, failed)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
