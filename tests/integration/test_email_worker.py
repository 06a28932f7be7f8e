"""The email worker's consumer as `parley worker email` and `parley up` build it (`email_consumer`),
against a real SMTP server (aiosmtpd) and a real database: a mail is sent once per request however
often the request is delivered, its outcome event and idempotency record are written together, and
failures are dead-lettered with an `email.failed` event (at once when permanent, after the last
attempt when temporary) and can be replayed.

The in-process source stands in for the stream here; the same consumer on Redis Streams is covered
end to end in tests/e2e/test_email_pipeline.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from parley.events.v1 import events_pb2
from runtime.workers import email_consumer
from services.common.consumers import Consumer, InProcessSource
from services.common.db import Database
from services.common.migrate import upgrade_async
from services.common.outbox import OutboxEvent
from services.common.processed_events import SqlProcessedEvents
from services.common.ratelimit import InMemoryRateLimiter
from services.common.settings import Settings, load_settings
from services.email.worker import EMAIL_CONSUMER, EMAIL_EVENT_SOURCE
from tests.support.mail import SAMPLE_PARAMS, RecordingHandler, email_requested_event, smtp_server
from tests.support.polling import eventually

DEADLINE_S = 15.0
POLL_BLOCK_S = 0.02


@pytest.fixture
def data_replies() -> list[str]:
    """Replies the SMTP server gives to DATA, in order, before it accepts mail (250)."""
    return []


@pytest.fixture
def recorder(data_replies: list[str]) -> RecordingHandler:
    return RecordingHandler(data_replies=data_replies)


@pytest.fixture
def smtp_port(recorder: RecordingHandler) -> Iterator[int]:
    with smtp_server(recorder) as controller:
        yield int(controller.port)


def worker_settings(tmp_path: Path, smtp_port: int, *, max_attempts: int = 3) -> Settings:
    return load_settings(
        data_dir=tmp_path,
        smtp_host="127.0.0.1",
        smtp_port=smtp_port,
        smtp_security="none",
        smtp_timeout_s=5.0,
        mail_from="Parley <no-reply@parley.test>",
        public_base_url="https://app.parley.test",
        email_max_attempts=max_attempts,
        email_retry_base_s=0.01,
        email_retry_cap_s=0.05,
    )


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    await upgrade_async(database_url)
    db = Database(database_url)
    try:
        yield db
    finally:
        await db.dispose()


def worker_for(settings: Settings, database: Database) -> tuple[Consumer, InProcessSource]:
    source = InProcessSource(stream="parley:events:test", group=EMAIL_CONSUMER)
    consumer = email_consumer(
        settings, source, database=database, limiter=InMemoryRateLimiter(), member="worker-1"
    )
    return consumer, source


async def poll_until(consumer: Consumer, done: Callable[[], Awaitable[bool]], what: str) -> None:
    """Run the consumer one batch at a time until `done()` holds (bounded)."""

    async def polled_until_done() -> bool:
        if await done():
            return True
        await consumer.poll_once(block_s=POLL_BLOCK_S)
        return False

    # No pause between attempts: each one blocks on the source for up to POLL_BLOCK_S.
    await eventually(polled_until_done, what=what, timeout_s=DEADLINE_S, interval_s=0)


def received(recorder: RecordingHandler, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(recorder.received) == count

    return check


def dead_lettered(source: InProcessSource, count: int = 1) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(await source.dead_letters()) == count

    return check


def settled(source: InProcessSource) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await source.pending_count() == 0

    return check


async def outcome_events(database: Database) -> list[events_pb2.Event]:
    async with database.unit_of_work(read_only=True) as session:
        payloads = await session.scalars(
            select(OutboxEvent.payload)
            .where(OutboxEvent.source == EMAIL_EVENT_SOURCE)
            .order_by(OutboxEvent.sequence)
        )
        return [events_pb2.Event.FromString(payload) for payload in payloads]


async def test_a_mail_goes_out_once_however_often_its_request_is_delivered(
    tmp_path: Path, smtp_port: int, recorder: RecordingHandler, database: Database
) -> None:
    consumer, source = worker_for(worker_settings(tmp_path, smtp_port), database)
    request = email_requested_event("verify_email", "ada@example.com")

    source.publish(request)
    await poll_until(consumer, received(recorder, 1), "the mail arrives")
    # At-least-once delivery hands the same request over again (a relay retry, a replay).
    source.publish(request)
    source.publish(request)
    await consumer.poll_once(block_s=POLL_BLOCK_S)
    await poll_until(consumer, settled(source), "the copies settle")

    assert len(recorder.received) == 1
    mail = recorder.received[0].message
    assert mail["Message-ID"] == f"<{request.id}@parley.test>"
    assert "https://app.parley.test/verify-email?token=" in str(mail.get_body(preferencelist=("plain",)))
    outcomes = await outcome_events(database)
    assert [event.type for event in outcomes] == ["email.sent"]
    sent = outcomes[0].email_sent
    assert (sent.request_event_id, sent.template, sent.attempts) == (request.id, "verify_email", 1)
    assert outcomes[0].subject == request.subject
    assert await SqlProcessedEvents(database).is_processed(EMAIL_CONSUMER, request.id)


@pytest.mark.parametrize("data_replies", [["550 5.1.1 mailbox unavailable"]])
async def test_a_permanent_refusal_is_dead_lettered_at_once_and_replays_after_the_fix(
    tmp_path: Path, smtp_port: int, recorder: RecordingHandler, database: Database
) -> None:
    consumer, source = worker_for(worker_settings(tmp_path, smtp_port, max_attempts=5), database)
    request = email_requested_event("welcome", "bob@example.com")

    source.publish(request)
    await poll_until(consumer, dead_lettered(source), "the refused mail is dead-lettered")

    assert recorder.data_commands == 1, "a permanent refusal is not retried"
    [dead] = await source.dead_letters()
    assert dead.event_id == request.id and dead.attempts == 1
    assert "550" in dead.error
    [failed] = await outcome_events(database)
    assert failed.type == "email.failed"
    assert failed.email_failed.permanent and failed.email_failed.attempts == 1
    assert not await SqlProcessedEvents(database).is_processed(EMAIL_CONSUMER, request.id)

    # The server accepts mail again (the fix); the operator replays the dead letter.
    assert await source.replay(dead.dead_letter_id) == 1
    await poll_until(consumer, received(recorder, 1), "the replayed mail arrives")
    assert [event.type for event in await outcome_events(database)] == ["email.failed", "email.sent"]


@pytest.mark.parametrize("data_replies", [["451 4.3.0 try again later"] * 3])
async def test_temporary_failures_are_retried_then_dead_lettered_after_the_last_attempt(
    tmp_path: Path, smtp_port: int, recorder: RecordingHandler, database: Database
) -> None:
    consumer, source = worker_for(worker_settings(tmp_path, smtp_port, max_attempts=3), database)
    request = email_requested_event("welcome", "cy@example.com")

    source.publish(request)
    await poll_until(consumer, dead_lettered(source), "the mail is dead-lettered after 3 attempts")

    assert recorder.data_commands == 3
    [failed] = await outcome_events(database)
    assert not failed.email_failed.permanent and failed.email_failed.attempts == 3


@pytest.mark.parametrize("data_replies", [["421 4.7.0 too busy"]])
async def test_a_temporary_failure_then_success_sends_once(
    tmp_path: Path, smtp_port: int, recorder: RecordingHandler, database: Database
) -> None:
    consumer, source = worker_for(worker_settings(tmp_path, smtp_port, max_attempts=3), database)
    request = email_requested_event("welcome", "di@example.com")

    source.publish(request)
    await poll_until(consumer, received(recorder, 1), "the retried mail arrives")

    [sent] = await outcome_events(database)
    assert sent.email_sent.attempts == 2


@pytest.mark.parametrize("data_replies", [["451 4.3.0 try again later"]])
async def test_single_use_tokens_never_reach_the_logs(
    tmp_path: Path,
    smtp_port: int,
    recorder: RecordingHandler,
    database: Database,
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer, source = worker_for(worker_settings(tmp_path, smtp_port, max_attempts=1), database)
    token = SAMPLE_PARAMS["password_reset"]["token"]
    caplog.set_level(logging.DEBUG)

    source.publish(email_requested_event("password_reset", "eve@example.com"))
    source.publish(email_requested_event("password_reset", "fay@example.com"))
    await poll_until(consumer, received(recorder, 1), "one mail arrives")
    await poll_until(consumer, dead_lettered(source), "the other is dead-lettered")

    # Everything but the test SMTP server's own session log (aiosmtpd's "mail.log").
    ours = "\n".join(
        f"{record.getMessage()} {record.__dict__}" for record in caplog.records if record.name != "mail.log"
    )
    assert token not in ours
    assert all(token not in dead.error for dead in await source.dead_letters())
