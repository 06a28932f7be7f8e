"""The email pipeline of microservices mode, end to end, for tests: `parley worker relay` and
`parley worker email` as real processes, `email.requested` jobs written straight into an outbox,
the pipeline's Redis keys cleared around each test, and the checks that every mail arrived once.

The pipeline's streams have fixed names (`parley:events:auth`, the email group, `parley:dlq:email`)
in the shared Redis test database: a test using them clears them before and after
(`clear_pipeline_keys`), and no two such tests may run at the same time.
"""

from __future__ import annotations

import email.utils
from collections import Counter
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Final, Literal
from urllib.parse import parse_qs, urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from sqlalchemy import func, select

from services.common.consumers import dlq_key
from services.common.db import Database
from services.common.outbox import OutboxEvent, add_event
from services.common.processed_events import ProcessedEvent
from services.common.streams import stream_key
from services.email.worker import EMAIL_CONSUMER, EMAIL_EVENT_SOURCE, EMAIL_REQUEST_SOURCES
from tests.support.gateway import free_port
from tests.support.mail import ReceivedMail, RecordingHandler, email_requested_event
from tests.support.parley_process import ParleyProcess

PUBLIC_BASE_URL: Final = "https://app.parley.test"
MAIL_FROM: Final = "Parley <no-reply@parley.test>"
# What each worker prints once it runs (its announcement); waiting for it bounds the start-up.
WORKER_READY: Final = {
    "relay": "parley worker relay: moving outbox events to Redis Streams",
    "email": "parley worker email: member ",
}
WorkerKind = Literal["relay", "email"]


def pipeline_keys() -> list[str]:
    """Every Redis key the pipeline writes that a test could see again: the request streams (with the
    email group on them), the worker's own outcome stream, and the email group's dead letters."""
    sources = (*EMAIL_REQUEST_SOURCES, EMAIL_EVENT_SOURCE)
    return [*(stream_key(source) for source in sources), dlq_key(EMAIL_CONSUMER)]


async def clear_pipeline_keys(client: Redis) -> None:
    await client.delete(*pipeline_keys())


def redis_address(redis_url: str) -> tuple[str, int]:
    parts = urlsplit(redis_url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def redis_url_via(redis_url: str, port: int) -> str:
    """The same Redis URL (credentials, database) through 127.0.0.1:`port`, e.g. a `TcpProxy`."""
    parts = urlsplit(redis_url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    return parts._replace(netloc=netloc).geturl()


@dataclass(frozen=True)
class WorkerConfig:
    """The settings both workers run with; the defaults retry fast so faults heal within a test."""

    database_url: str
    redis_url: str
    smtp_port: int
    smtp_timeout_s: float = 5.0
    max_attempts: int = 100
    retry_base_s: float = 0.1
    retry_cap_s: float = 0.5

    def env(self, metrics_port: int) -> dict[str, str]:
        return {
            "PARLEY_DATABASE_URL": self.database_url,
            "PARLEY_REDIS_URL": self.redis_url,
            "PARLEY_SMTP_HOST": "127.0.0.1",
            "PARLEY_SMTP_PORT": str(self.smtp_port),
            "PARLEY_SMTP_SECURITY": "none",
            "PARLEY_SMTP_TIMEOUT_S": str(self.smtp_timeout_s),
            "PARLEY_MAIL_FROM": MAIL_FROM,
            "PARLEY_PUBLIC_BASE_URL": PUBLIC_BASE_URL,
            "PARLEY_EMAIL_MAX_ATTEMPTS": str(self.max_attempts),
            "PARLEY_EMAIL_RETRY_BASE_S": str(self.retry_base_s),
            "PARLEY_EMAIL_RETRY_CAP_S": str(self.retry_cap_s),
            # Every job of a test goes to one domain: its limit must never be what a test measures.
            "PARLEY_SMTP_PER_DOMAIN_PER_MINUTE": "1000000",
            "PARLEY_SMTP_PER_DOMAIN_BURST": "1000000",
            "PARLEY_METRICS_PORT": str(metrics_port),
            "PARLEY_SHUTDOWN_GRACE_S": "3",
        }


@dataclass
class Worker:
    kind: WorkerKind
    process: ParleyProcess
    metrics_port: int

    async def metric(self, name: str, **labels: str) -> float:
        """A sample of the worker's /metrics (0 when absent, as for a counter never incremented)."""
        async with httpx.AsyncClient(timeout=5.0) as client:
            response = await client.get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        response.raise_for_status()
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0


@dataclass
class PipelineWorkers:
    """The worker processes a test started, in start order; all killed when the test ends."""

    directory: Path
    started: list[Worker] = field(default_factory=list)
    # Workers the test killed on purpose: their exit is not a failure.
    killed: list[Worker] = field(default_factory=list)

    async def start(self, kind: WorkerKind, config: WorkerConfig, *, name: str | None = None) -> Worker:
        """Start `parley worker <kind>` and wait until it says it runs; `name` names its log file."""
        metrics_port = free_port()
        process = ParleyProcess(
            ["worker", kind],
            env=config.env(metrics_port),
            log_path=self.directory / f"{name or kind}-{len(self.started)}.log",
        )
        worker = Worker(kind, process, metrics_port)
        self.started.append(worker)
        process.start()
        await process.wait_for_output(WORKER_READY[kind], timeout_s=30.0)
        return worker

    def kill(self, worker: Worker) -> None:
        """SIGKILL one worker, as a crash or an OOM kill would."""
        self.killed.append(worker)
        worker.process.kill()

    def check_alive(self) -> None:
        """Fail at once, instead of at a wait's deadline, when a worker exited on its own."""
        for worker in self.started:
            if worker not in self.killed and worker.process.exited():
                raise AssertionError(f"{worker.process.log_path.name} exited unexpectedly")

    def output_tails(self) -> str:
        return "\n".join(
            f"=== {process.log_path.name}: parley {' '.join(process.args)}\n{process.output()[-3000:]}"
            for process in (worker.process for worker in self.started)
        )

    def kill_all(self) -> None:
        for worker in self.started:
            worker.process.kill()


@asynccontextmanager
async def pipeline_workers(directory: Path) -> AsyncIterator[PipelineWorkers]:
    """Workers started through the yielded object; killed at the end. An assertion failing inside
    gets the workers' output tails appended."""
    workers = PipelineWorkers(directory)
    try:
        yield workers
    except AssertionError as failure:
        raise AssertionError(f"{failure}\n{workers.output_tails()}") from None
    finally:
        workers.kill_all()


# ---- producing jobs -----------------------------------------------------------------------------


def recipients(label: str, count: int, *, domain: str) -> list[str]:
    return [f"{label}-{index:04d}@{domain}" for index in range(count)]


async def produce_email_jobs(
    database: Database, addresses: Sequence[str], *, per_transaction: int = 50, template: str = "welcome"
) -> list[str]:
    """One `email.requested` per address (as auth would emit it), committed `per_transaction` at a
    time; returns the event ids."""
    event_ids: list[str] = []
    for start in range(0, len(addresses), per_transaction):
        async with database.unit_of_work() as session:
            for address in addresses[start : start + per_transaction]:
                job = email_requested_event(template, address).email_requested
                job.user_id = f"user-{address}"
                event = add_event(session, source="auth", subject=job.user_id, payload=job)
                event_ids.append(event.id)
    return event_ids


# ---- checking -----------------------------------------------------------------------------------


async def unrelayed_events(database: Database) -> int:
    async with database.unit_of_work(read_only=True) as session:
        count = await session.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.relayed_at.is_(None))
        )
    return int(count or 0)


async def processed_count(database: Database) -> int:
    async with database.unit_of_work(read_only=True) as session:
        count = await session.scalar(
            select(func.count()).select_from(ProcessedEvent).where(ProcessedEvent.consumer == EMAIL_CONSUMER)
        )
    return int(count or 0)


async def stream_settled(client: Redis, source: str) -> bool:
    """The email group has been handed every entry of the source's stream and settled each one
    (acknowledged or dead-lettered)."""
    stream = stream_key(source)
    if not await client.exists(stream):
        return False
    groups = {group["name"]: group for group in await client.xinfo_groups(stream)}
    group = groups.get(EMAIL_CONSUMER.encode())
    if group is None:
        return False
    last_entry_id = (await client.xinfo_stream(stream))["last-generated-id"]
    return int(group["pending"]) == 0 and group["last-delivered-id"] == last_entry_id


async def pipeline_settled(client: Redis, database: Database) -> bool:
    """Nothing is left that could still send a mail: every outbox row relayed, every request stream
    read to its end by the email group and nothing of it pending. Counting mails after this is exact."""
    if await unrelayed_events(database):
        return False
    for source in EMAIL_REQUEST_SOURCES:
        if not await stream_settled(client, source):
            return False
    return True


def message_id(mail: ReceivedMail) -> str:
    return str(mail.message["Message-ID"])


def delivery_report(recorder: RecordingHandler, expected: Collection[str]) -> str:
    received = list(recorder.received)
    by_recipient = Counter(address.lower() for mail in received for address in mail.rcpt_tos)
    duplicates = sorted(address for address, count in by_recipient.items() if count > 1)
    missing = sorted(set(expected) - set(by_recipient))
    unexpected = sorted(set(by_recipient) - set(expected))
    return (
        f"expected {len(expected)}, received {len(received)} (DATA commands: {recorder.data_commands}); "
        f"duplicates {duplicates[:10]}, missing {missing[:10]} ({len(missing)}), unexpected {unexpected[:10]}"
    )


def assert_each_delivered_once(recorder: RecordingHandler, expected: Collection[str]) -> None:
    """Exactly one mail per expected recipient, nothing else, and no Message-ID twice."""
    received = list(recorder.received)
    by_recipient = Counter(address.lower() for mail in received for address in mail.rcpt_tos)
    assert by_recipient == Counter({address.lower(): 1 for address in expected}), delivery_report(
        recorder, expected
    )
    message_ids = Counter(message_id(mail) for mail in received)
    assert len(message_ids) == len(received), [mid for mid, count in message_ids.items() if count > 1][:10]
    # One recipient per message, and the header agrees with the envelope.
    for mail in received:
        [address] = mail.rcpt_tos
        assert email.utils.parseaddr(str(mail.message["To"]))[1].lower() == address.lower()


def mails_to(recorder: RecordingHandler, address: str) -> list[ReceivedMail]:
    return [mail for mail in list(recorder.received) if address.lower() in (a.lower() for a in mail.rcpt_tos)]


def text_of(message: EmailMessage) -> str:
    """The text/plain part of a mail."""
    part = message.get_body(preferencelist=("plain",))
    assert part is not None, f"no text/plain part in {message['Subject']!r}"
    return str(part.get_content())


def text_body(mail: ReceivedMail) -> str:
    return text_of(mail.message)


def read_eml(path: Path) -> EmailMessage:
    """A mail written by the `.eml` sink of embedded mode."""
    message = BytesParser(policy=default_policy).parsebytes(path.read_bytes())
    assert isinstance(message, EmailMessage)
    return message


def link_token(text: str, *, base_url: str, path: str) -> str:
    """The `token` of the one link to `path` in a mail's text; the link must start with `base_url`."""
    links = [word for word in text.split() if "?token=" in word]
    assert len(links) == 1, f"expected one token link in the mail, found {links}"
    [link] = links
    assert link.startswith(f"{base_url}{path}?"), f"{link} does not start with {base_url}{path}?"
    [token] = parse_qs(urlsplit(link).query)["token"]
    return token
