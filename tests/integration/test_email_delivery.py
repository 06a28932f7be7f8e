"""The email worker's delivery against a real SMTP server (aiosmtpd, started per test): every
template arrives rendered, SMTP replies are classified temporary or permanent, the `.eml` sink
writes parseable files, and the per-recipient-domain limit refuses past its burst (in memory and
in Redis, shared by two workers)."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import stat
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.common.ratelimit import InMemoryRateLimiter, RateLimiter, RedisRateLimiter
from services.common.settings import load_settings
from services.email.delivery import EmailDelivery, domain_rate_rule
from services.email.errors import (
    DomainRateLimitedError,
    NotYetDueError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
    UnknownTemplateError,
)
from services.email.rendering import TEMPLATES
from services.email.sending import EmlFileSender, MailSender, SmtpSender, build_sender
from tests.support.gateway import free_port
from tests.support.mail import (
    SAMPLE_LINK_PATHS,
    SAMPLE_PARAMS,
    RecordingHandler,
    email_requested_event,
    password_authenticator,
    server_tls_context,
    smtp_server,
)
from tests.support.redis_keys import delete_namespace
from tests.support.tls import self_signed_certificate

BASE_URL = "https://app.parley.test"
MAIL_FROM = "Parley <no-reply@parley.test>"


def delivery_via(
    sender: MailSender, limiter: RateLimiter | None = None, *, burst: int = 100
) -> EmailDelivery:
    return EmailDelivery(
        sender=sender,
        limiter=limiter or InMemoryRateLimiter(),
        domain_rule=domain_rate_rule(per_minute=1, burst=burst),
        mail_from=MAIL_FROM,
        public_base_url=BASE_URL,
    )


def plain_smtp(port: int, *, timeout_s: float = 5.0) -> SmtpSender:
    return SmtpSender("127.0.0.1", port, security="none", timeout_s=timeout_s)


def parts_of(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    return str(text.get_content()), str(html.get_content())


@pytest.fixture
def recorder() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
def smtp_port(recorder: RecordingHandler) -> Iterator[int]:
    with smtp_server(recorder) as controller:
        yield controller.port


@pytest.mark.parametrize("template", sorted(TEMPLATES))
async def test_each_template_arrives_rendered_with_its_headers(
    template: str, recorder: RecordingHandler, smtp_port: int
) -> None:
    event = email_requested_event(template, "Ada.Lovelace@Example.COM")

    sent = await delivery_via(plain_smtp(smtp_port)).deliver(event, attempts=2)

    assert len(recorder.received) == 1
    mail = recorder.received[0]
    assert mail.mail_from == "no-reply@parley.test"
    assert mail.rcpt_tos == ("Ada.Lovelace@Example.COM",)
    message = mail.message
    assert message["From"] == MAIL_FROM
    assert message["To"] == "Ada.Lovelace@Example.COM"
    assert message["Subject"]
    assert message["Message-ID"] == sent.message_id == f"<{event.id}@parley.test>"
    assert message["Date"] is not None
    text, html = parts_of(message)
    link = BASE_URL + SAMPLE_LINK_PATHS[template]
    assert link in text
    assert f'href="{link.replace("&", "&amp;")}"' in html
    assert "Hello Ada," in text and "Hello Ada," in html
    assert (sent.request_event_id, sent.template, sent.user_id, sent.attempts) == (
        event.id,
        template,
        "user-1",
        2,
    )


async def test_html_part_escapes_parameters_and_text_part_keeps_them(
    recorder: RecordingHandler, smtp_port: int
) -> None:
    params = {**SAMPLE_PARAMS["welcome"], "display_name": '<script>alert("x")</script> & Co'}

    await delivery_via(plain_smtp(smtp_port)).deliver(email_requested_event("welcome", params=params))

    message = recorder.received[0].message
    text, html = parts_of(message)
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; Co" in html
    assert 'Hello <script>alert("x")</script> & Co,' in text
    assert message["Subject"] == 'Welcome to Parley, <script>alert("x")</script> & Co'


async def test_a_451_is_temporary_and_the_retry_is_the_same_mail() -> None:
    recorder = RecordingHandler(data_replies=["451 4.3.0 Try again later"])
    with smtp_server(recorder) as controller:
        delivery = delivery_via(plain_smtp(controller.port))
        event = email_requested_event("password_reset")

        with pytest.raises(TemporaryDeliveryError) as refused:
            await delivery.deliver(event)
        assert not isinstance(refused.value, PermanentDeliveryError)
        assert refused.value.smtp_code == 451
        assert recorder.received == []

        sent = await delivery.deliver(event, attempts=2)

    assert recorder.data_commands == 2
    assert [mail.message["Message-ID"] for mail in recorder.received] == [sent.message_id]
    assert sent.message_id == f"<{event.id}@parley.test>"


@pytest.mark.parametrize(
    ("rcpt_replies", "data_replies", "code"),
    [
        (["550 5.1.1 No such user"], [], 550),
        ([], ["554 5.7.1 Message rejected as spam"], 554),
    ],
    ids=["rcpt-550", "data-554"],
)
async def test_a_5xx_is_permanent(rcpt_replies: list[str], data_replies: list[str], code: int) -> None:
    recorder = RecordingHandler(rcpt_replies=rcpt_replies, data_replies=data_replies)
    with smtp_server(recorder) as controller, pytest.raises(PermanentDeliveryError) as refused:
        await delivery_via(plain_smtp(controller.port)).deliver(email_requested_event("verify_email"))

    assert refused.value.smtp_code == code
    assert str(code) in str(refused.value)
    assert recorder.received == []


async def test_a_4xx_recipient_refusal_is_temporary() -> None:
    recorder = RecordingHandler(rcpt_replies=["450 4.2.1 Mailbox busy"])
    with smtp_server(recorder) as controller, pytest.raises(TemporaryDeliveryError) as refused:
        await delivery_via(plain_smtp(controller.port)).deliver(email_requested_event("welcome"))
    assert refused.value.smtp_code == 450


async def test_connection_refused_is_temporary() -> None:
    nobody_listens = free_port()

    with pytest.raises(TemporaryDeliveryError) as refused:
        await delivery_via(plain_smtp(nobody_listens)).deliver(email_requested_event("welcome"))

    assert not isinstance(refused.value, PermanentDeliveryError)
    assert "connection" in str(refused.value).lower()


async def test_a_server_that_never_greets_times_out_as_temporary() -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TemporaryDeliveryError) as refused:
            await delivery_via(plain_smtp(port, timeout_s=0.3)).deliver(email_requested_event("welcome"))
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert "timed out" in str(refused.value)


@pytest.fixture
def tls_material(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path)


async def test_starttls_with_credentials(tls_material: tuple[Path, Path]) -> None:
    cert, key = tls_material
    recorder = RecordingHandler()
    client_tls = ssl.create_default_context(cafile=str(cert))
    with smtp_server(
        recorder,
        server_hostname="localhost",
        tls_context=server_tls_context(cert, key),
        require_starttls=True,
        auth_require_tls=True,
        authenticator=password_authenticator("mailer", "s3cret-pass"),
    ) as controller:
        settings = load_settings(
            smtp_host="localhost",
            smtp_port=controller.port,
            smtp_security="starttls",
            smtp_username="mailer",
            smtp_password="s3cret-pass",
            mail_from=MAIL_FROM,
            public_base_url=BASE_URL,
        )
        sender = SmtpSender.from_settings(settings, tls_context=client_tls)
        sent = await delivery_via(sender).deliver(email_requested_event("verify_email"))

        wrong_password = SmtpSender(
            "localhost",
            controller.port,
            username="mailer",
            password="wrong",
            tls_context=client_tls,
        )
        with pytest.raises(TemporaryDeliveryError) as refused:
            await delivery_via(wrong_password).deliver(email_requested_event("verify_email"))

    [mail] = recorder.received
    assert mail.tls and mail.login == "mailer"
    assert mail.message["Message-ID"] == sent.message_id
    assert refused.value.smtp_code == 535


async def test_eml_sink_writes_one_parseable_file_per_message(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, public_base_url=BASE_URL, mail_from=MAIL_FROM)
    sender = build_sender(settings)
    assert isinstance(sender, EmlFileSender)
    delivery = EmailDelivery.from_settings(settings, sender=sender, limiter=InMemoryRateLimiter())
    event = email_requested_event("verify_email")

    sent = await delivery.deliver(event)
    await delivery.deliver(event, attempts=2)  # a redelivery replaces the file, it adds none
    other = await delivery.deliver(email_requested_event("quota_100"))

    files = sorted((tmp_path / "mail").iterdir())
    assert [path.name for path in files] == sorted(
        [f"{event.id}@parley.test.eml", f"{other.message_id.strip('<>')}.eml"]
    )
    written = sender.path_for(sent.message_id)
    message = BytesParser(policy=default_policy).parsebytes(written.read_bytes())
    assert message["Message-ID"] == sent.message_id
    assert message["To"] == "ada@example.com"
    assert message["From"] == MAIL_FROM
    assert message["Subject"] == "Confirm your email address for Parley"
    text, html = parts_of(message)
    assert f"{BASE_URL}/verify-email?token=tok-verify-0123456789" in text
    assert f"{BASE_URL}/verify-email?token=tok-verify-0123456789" in html


async def test_eml_files_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    # A mail holds a live verification or reset link; the data dir's other users must not read it.
    settings = load_settings(data_dir=tmp_path / "data", public_base_url=BASE_URL, mail_from=MAIL_FROM)
    sender = EmlFileSender.from_settings(settings)
    delivery = EmailDelivery.from_settings(settings, sender=sender, limiter=InMemoryRateLimiter())
    previous = os.umask(0o022)
    try:
        sent = await delivery.deliver(email_requested_event("password_reset"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(sender.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(sender.path_for(sent.message_id).stat().st_mode) == 0o600


@pytest.fixture
async def redis_limiters(redis_url: str) -> AsyncIterator[tuple[RedisRateLimiter, RedisRateLimiter]]:
    """Two limiters (two workers' clients) sharing fresh counters in the test Redis."""
    prefix = f"test-email-{uuid.uuid4().hex}:"
    first = RedisRateLimiter.from_url(redis_url, key_prefix=prefix)
    second = RedisRateLimiter.from_url(redis_url, key_prefix=prefix)
    try:
        yield first, second
    finally:
        cleaner = Redis.from_url(redis_url)
        await delete_namespace(cleaner, prefix)
        await cleaner.aclose()
        await first.aclose()
        await second.aclose()


async def test_per_domain_limit_refuses_past_the_burst_in_memory(
    recorder: RecordingHandler, smtp_port: int
) -> None:
    delivery = delivery_via(plain_smtp(smtp_port), InMemoryRateLimiter(), burst=2)

    await delivery.deliver(email_requested_event("welcome", "a@example.com"))
    await delivery.deliver(email_requested_event("welcome", "b@EXAMPLE.com"))
    with pytest.raises(DomainRateLimitedError) as refused:
        await delivery.deliver(email_requested_event("welcome", "c@example.com"))
    await delivery.deliver(email_requested_event("welcome", "d@other.test"))

    assert isinstance(refused.value, TemporaryDeliveryError)
    assert refused.value.retry_after_s is not None and 0 < refused.value.retry_after_s <= 60
    assert [mail.rcpt_tos for mail in recorder.received] == [
        ("a@example.com",),
        ("b@EXAMPLE.com",),
        ("d@other.test",),
    ]


@pytest.mark.redis
async def test_per_domain_limit_in_redis_is_shared_by_workers(
    recorder: RecordingHandler,
    smtp_port: int,
    redis_limiters: tuple[RedisRateLimiter, RedisRateLimiter],
) -> None:
    first, second = (delivery_via(plain_smtp(smtp_port), limiter, burst=2) for limiter in redis_limiters)

    await first.deliver(email_requested_event("welcome", "a@example.com"))
    await second.deliver(email_requested_event("welcome", "b@example.com"))
    with pytest.raises(DomainRateLimitedError):
        await first.deliver(email_requested_event("welcome", "c@example.com"))
    with pytest.raises(DomainRateLimitedError):
        await second.deliver(email_requested_event("welcome", "c@example.com"))

    assert len(recorder.received) == 2


async def test_an_unreachable_limiter_is_temporary(recorder: RecordingHandler, smtp_port: int) -> None:
    limiter = RedisRateLimiter.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5)
    try:
        with pytest.raises(TemporaryDeliveryError, match="rate limit cannot be checked"):
            await delivery_via(plain_smtp(smtp_port), limiter).deliver(email_requested_event("welcome"))
    finally:
        await limiter.aclose()
    assert recorder.received == []


async def test_a_job_not_yet_due_is_deferred(recorder: RecordingHandler, smtp_port: int) -> None:
    event = email_requested_event("welcome")
    event.email_requested.send_after_time.FromDatetime(datetime.now(UTC) + timedelta(minutes=10))

    with pytest.raises(NotYetDueError) as deferred:
        await delivery_via(plain_smtp(smtp_port)).deliver(event)

    assert deferred.value.retry_after_s is not None and 590 < deferred.value.retry_after_s <= 600
    assert recorder.received == []


async def test_bad_jobs_are_permanent_without_sending(recorder: RecordingHandler, smtp_port: int) -> None:
    delivery = delivery_via(plain_smtp(smtp_port))
    with pytest.raises(UnknownTemplateError):
        await delivery.deliver(email_requested_event("newsletter", params={}))
    with pytest.raises(PermanentDeliveryError, match="not a single email address"):
        await delivery.deliver(email_requested_event("welcome", "ada@example.com, eve@evil.test"))
    not_an_email_job = email_requested_event("welcome")
    not_an_email_job.type = "user.registered"
    with pytest.raises(PermanentDeliveryError):
        await delivery.deliver(not_an_email_job)
    assert recorder.received == []


async def test_parameters_never_reach_the_logs(
    recorder: RecordingHandler, smtp_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    delivery = delivery_via(plain_smtp(smtp_port))
    secret = SAMPLE_PARAMS["password_reset"]["token"]

    await delivery.deliver(email_requested_event("password_reset"))
    with pytest.raises(PermanentDeliveryError) as refused:
        await delivery.deliver(
            email_requested_event(
                "password_reset", params={**SAMPLE_PARAMS["password_reset"], "link_path": f"//x/{secret}"}
            )
        )

    # "mail.log" is the test SMTP server's own logger: it echoes the DATA it received.
    ours = [record for record in caplog.records if record.name != "mail.log"]
    assert any(record.name == "services.email.delivery" for record in ours), "the delivery logs its sends"
    for record in ours:
        assert secret not in record.getMessage()
        assert all(secret not in str(value) for value in vars(record).values())
    assert secret not in str(refused.value)


async def test_a_non_ascii_local_part_goes_out_with_smtputf8(tmp_path: Path) -> None:
    recorder = RecordingHandler()
    with smtp_server(recorder, enable_SMTPUTF8=True) as controller:
        await delivery_via(plain_smtp(controller.port)).deliver(
            email_requested_event("welcome", "jürgen@example.de")
        )
    [mail] = recorder.received
    assert mail.rcpt_tos == ("jürgen@example.de",)
    assert mail.message["To"] == "jürgen@example.de"

    sink = EmlFileSender(tmp_path)
    sent = await delivery_via(sink).deliver(email_requested_event("welcome", "jürgen@example.de"))
    written = BytesParser(policy=default_policy).parsebytes(sink.path_for(sent.message_id).read_bytes())
    assert written["To"] == "jürgen@example.de"
