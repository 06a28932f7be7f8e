"""How SMTP failures are classified, and what counts as one recipient address."""

from __future__ import annotations

import ssl

import aiosmtplib
import pytest

from services.email.delivery import email_failed, recipient_domain
from services.email.errors import (
    EmailDeliveryError,
    MissingTemplateParamError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from services.email.sending import classify_smtp_error
from tests.support.mail import email_requested_event


@pytest.mark.parametrize(
    ("error", "permanent", "code"),
    [
        (aiosmtplib.SMTPDataError(451, "4.3.0 try later"), False, 451),
        (aiosmtplib.SMTPDataError(554, "5.7.1 rejected"), True, 554),
        (aiosmtplib.SMTPSenderRefused(553, "bad sender", "x@y"), True, 553),
        (aiosmtplib.SMTPResponseException(421, "closing"), False, 421),
        (
            aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(550, "no user", "a@b")]),
            True,
            550,
        ),
        (aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(452, "full", "a@b")]), False, 452),
        # Our credentials are wrong, not the mail: retried while an operator fixes them.
        (aiosmtplib.SMTPAuthenticationError(535, "bad credentials"), False, 535),
        (aiosmtplib.SMTPConnectError("Connection refused"), False, None),
        (aiosmtplib.SMTPServerDisconnected("gone"), False, None),
        (aiosmtplib.SMTPReadTimeoutError("slow"), False, None),
        (aiosmtplib.SMTPNotSupported("no STARTTLS"), False, None),
        (ConnectionRefusedError(111, "Connection refused"), False, None),
        (ssl.SSLCertVerificationError("self-signed"), False, None),
    ],
)
def test_smtp_failures_are_classified(error: BaseException, permanent: bool, code: int | None) -> None:
    classified = classify_smtp_error(error)
    assert isinstance(classified, EmailDeliveryError)
    assert isinstance(classified, PermanentDeliveryError) is permanent
    assert isinstance(classified, TemporaryDeliveryError) is not permanent
    assert classified.smtp_code == code


@pytest.mark.parametrize(
    ("recipient", "domain"),
    [
        ("ada@Example.COM", "example.com"),
        ("a.b+tag@sub.example.org", "sub.example.org"),
        ("jürgen@example.de", "example.de"),
    ],
)
def test_recipient_domain(recipient: str, domain: str) -> None:
    assert recipient_domain(recipient) == domain


@pytest.mark.parametrize(
    "recipient",
    [
        "",
        "ada",
        "@example.com",
        "ada@",
        "a@b@example.com",
        "a@x.test, b@y.test",
        "Ada <ada@example.com>",
        "a b@x.test",
        "ada@example.com\r\nBcc: eve@evil.test",
    ],
)
def test_anything_but_one_address_is_permanent(recipient: str) -> None:
    with pytest.raises(PermanentDeliveryError):
        recipient_domain(recipient)


def test_email_failed_records_whether_the_mail_was_refused() -> None:
    event = email_requested_event("password_reset", event_id="event-1")

    refused = email_failed(event, classify_smtp_error(aiosmtplib.SMTPDataError(554, "spam")), attempts=1)
    exhausted = email_failed(event, TemporaryDeliveryError("SMTP timed out"), attempts=8)
    bad_job = email_failed(event, MissingTemplateParamError("password_reset", ["link_path"]), attempts=1)

    assert (refused.request_event_id, refused.template, refused.user_id) == (
        "event-1",
        "password_reset",
        "user-1",
    )
    assert (refused.permanent, refused.attempts) == (True, 1)
    assert "554" in refused.error
    assert (exhausted.permanent, exhausted.attempts) == (False, 8)
    assert bad_job.permanent and "link_path" in bad_job.error
    token = event.email_requested.params["token"]
    assert all(token not in failed.error for failed in (refused, exhausted, bad_job))
