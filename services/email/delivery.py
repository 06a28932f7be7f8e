"""Delivering one `email.requested` job: check it is due, render it, take a token from the
recipient domain's rate limit, send it, and describe the result as an `EmailSent` payload.

`EmailDelivery.deliver` is the whole of the email worker's per-event work; the consumer framework
around it retries `TemporaryDeliveryError`s with backoff, dead-letters `PermanentDeliveryError`s at
once (and after the retry limit, anything), and records the `EmailSent` / `EmailFailed` event.

The Message-ID is derived from the event id, so a redelivered job produces the same Message-ID (and,
when embedded, overwrites the same `.eml` file): receivers and readers can see it is one mail.
The job's parameters hold single-use tokens: they are never logged, nor put in any error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Final

from parley.events.v1 import events_pb2
from services.common.clock import utc_now
from services.common.events import EVENT_TYPES
from services.common.ratelimit import (
    LIMIT_ENTRY,
    LimitRequest,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitRule,
    binding_refusal,
    counter_key,
)
from services.common.settings import Settings
from services.email.errors import (
    DomainRateLimitedError,
    NotYetDueError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from services.email.rendering import RenderedEmail, render
from services.email.sending import MailSender

logger = logging.getLogger(__name__)

EMAIL_REQUESTED_TYPE: Final = EVENT_TYPES["email_requested"]
DOMAIN_LIMIT_NAME: Final = "email_recipient_domain"
_FAILURE_TEXT_MAX_CHARS: Final = 1000
_DOMAIN: Final = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9-]{2,63}")


def domain_rate_rule(per_minute: int, burst: int) -> RateLimitRule:
    """The per-recipient-domain limit: `per_minute` sustained, `burst` at once."""
    return RateLimitRule(
        name=DOMAIN_LIMIT_NAME,
        descriptor={LIMIT_ENTRY: DOMAIN_LIMIT_NAME},
        key=("domain",),
        requests=per_minute,
        per_s=60.0,
        burst=burst,
    )


def recipient_domain(recipient: str) -> str:
    """The lower-cased domain of one bare address; `PermanentDeliveryError` for anything else.

    Non-ASCII local parts pass (accounts stored before auth required ASCII ones, ADR 0015, may have
    them; sending them needs a server with SMTPUTF8); the domain must be an ASCII host name, which
    auth stores as IDNA A-labels.
    """
    _, address = parseaddr(recipient)
    local, _, domain = address.partition("@")
    if (
        not address
        or address != recipient.strip()
        or not local
        or _DOMAIN.fullmatch(domain) is None
        or any(char.isspace() or not char.isprintable() for char in address)
    ):
        raise PermanentDeliveryError("the recipient is not a single email address")
    return domain.lower()


def email_failed(event: events_pb2.Event, error: BaseException, *, attempts: int) -> events_pb2.EmailFailed:
    """The `EmailFailed` to record when the job of `event` is dead-lettered after `error`.

    `permanent` says the mail itself was refused (`PermanentDeliveryError`) rather than retries
    running out. The error text is the worker's own, which never includes template parameters.
    """
    job = event.email_requested
    return events_pb2.EmailFailed(
        request_event_id=event.id,
        template=job.template,
        user_id=job.user_id,
        error=f"{type(error).__name__}: {error}"[:_FAILURE_TEXT_MAX_CHARS],
        permanent=isinstance(error, PermanentDeliveryError),
        attempts=attempts,
    )


class EmailDelivery:
    """Renders and sends `email.requested` jobs; see the module docstring for the contract."""

    def __init__(
        self,
        *,
        sender: MailSender,
        limiter: RateLimiter,
        domain_rule: RateLimitRule,
        mail_from: str,
        public_base_url: str,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._sender = sender
        self._limiter = limiter
        self._domain_rule = domain_rule
        self._mail_from = mail_from
        self._public_base_url = public_base_url
        self._clock = clock
        _, from_address = parseaddr(mail_from)
        self._message_id_domain = from_address.rpartition("@")[2] or "parley.invalid"

    @classmethod
    def from_settings(cls, settings: Settings, *, sender: MailSender, limiter: RateLimiter) -> EmailDelivery:
        return cls(
            sender=sender,
            limiter=limiter,
            domain_rule=domain_rate_rule(settings.smtp_per_domain_per_minute, settings.smtp_per_domain_burst),
            mail_from=settings.mail_from,
            public_base_url=settings.public_base_url,
        )

    async def deliver(self, event: events_pb2.Event, *, attempts: int = 1) -> events_pb2.EmailSent:
        """Send the mail `event` asks for and return the `EmailSent` to record.

        `attempts` is this delivery's attempt number (1 for the first), copied into the result.
        Raises `TemporaryDeliveryError` (retry later; `retry_after_s` when known) or
        `PermanentDeliveryError` (dead-letter now).
        """
        if event.type != EMAIL_REQUESTED_TYPE or event.WhichOneof("payload") != "email_requested":
            raise PermanentDeliveryError(
                f"event {event.id} is a {event.type!r}, not an {EMAIL_REQUESTED_TYPE}"
            )
        job = event.email_requested
        self._check_due(job)
        domain = recipient_domain(job.recipient)
        rendered = render(job.template, job.params, self._public_base_url)
        await self._take_domain_token(domain)
        message = self.compose(event, rendered)
        message_id = await self._sender.send(message)
        logger.info(
            "email sent",
            extra={"event_id": event.id, "template": job.template, "recipient_domain": domain},
        )
        return events_pb2.EmailSent(
            request_event_id=event.id,
            template=job.template,
            user_id=job.user_id,
            message_id=message_id,
            attempts=attempts,
        )

    def message_id_for(self, event: events_pb2.Event) -> str:
        """The Message-ID of the mail for `event`: the same for every delivery of the event."""
        return f"<{event.id}@{self._message_id_domain}>"

    def compose(self, event: events_pb2.Event, rendered: RenderedEmail) -> EmailMessage:
        """The MIME message: multipart/alternative with the text part first, then the HTML."""
        message = EmailMessage()
        message["From"] = self._mail_from
        # A bare address (checked by `recipient_domain`): `Address` would refuse a non-ASCII local part.
        message["To"] = event.email_requested.recipient.strip()
        message["Subject"] = rendered.subject
        message["Date"] = format_datetime(self._clock())
        message["Message-ID"] = self.message_id_for(event)
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(rendered.text)
        message.add_alternative(rendered.html, subtype="html")
        return message

    def _check_due(self, job: events_pb2.EmailRequested) -> None:
        if not job.HasField("send_after_time"):
            return
        due = job.send_after_time.ToDatetime(tzinfo=UTC)
        wait_s = (due - self._clock()).total_seconds()
        if wait_s > 0:
            raise NotYetDueError("the email is not due yet", retry_after_s=wait_s)

    async def _take_domain_token(self, domain: str) -> None:
        rule = self._domain_rule
        request = LimitRequest(counter_key=counter_key(rule, {"domain": domain}), rule=rule)
        try:
            decisions = await self._limiter.acquire([request])
        except RateLimiterUnavailable as error:
            raise TemporaryDeliveryError(
                f"the per-domain rate limit cannot be checked: {error.detail}"
            ) from error
        refusal = binding_refusal(decisions)
        if refusal is not None:
            raise DomainRateLimitedError(
                f"recipient domain limit reached ({rule.describe()})", retry_after_s=refusal.retry_after_s
            )
