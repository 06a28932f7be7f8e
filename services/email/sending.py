"""Handing a composed email to its transport: an SMTP server (`SmtpSender`), or `.eml` files in the
data dir for embedded mode without SMTP (`EmlFileSender`).

Every failure is classified for the worker: `TemporaryDeliveryError` (SMTP 4xx, connection refused
or cut, timeouts, TLS or AUTH trouble an operator can fix) is retried; `PermanentDeliveryError`
(SMTP 5xx about this message) is dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Final, Protocol
from uuid import uuid4

import aiosmtplib

from services.common.data_dir import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE
from services.common.settings import Settings, SmtpSecurity
from services.email.errors import EmailDeliveryError, PermanentDeliveryError, TemporaryDeliveryError

logger = logging.getLogger(__name__)

MAIL_DIR_NAME: Final = "mail"
_UNSAFE_FILE_CHARS: Final = re.compile(r"[^A-Za-z0-9@._+-]")
_SMTP_REPLY_MAX_CHARS: Final = 500


class MailSender(Protocol):
    """Sends one composed message; returns its Message-ID (setting one if the message has none)."""

    async def send(self, message: EmailMessage) -> str: ...


def ensure_message_id(message: EmailMessage, domain: str | None = None) -> str:
    """The message's Message-ID header, after adding a fresh one if it had none."""
    if message["Message-ID"] is None:
        message["Message-ID"] = make_msgid(domain=domain)
    return str(message["Message-ID"])


# Failures of the path or of our configuration, not of the message: worth retrying. Checked in order.
_TEMPORARY_FAILURES: Final[tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...]] = (
    ((aiosmtplib.SMTPTimeoutError, TimeoutError), "SMTP timed out"),
    (aiosmtplib.SMTPNotSupported, "SMTP server lacks a required feature"),
    (ssl.SSLError, "TLS with the SMTP server failed"),
    # Connection refused, reset or closed mid-conversation, DNS failure.
    ((aiosmtplib.SMTPException, OSError), "SMTP connection failed"),
)


def classify_smtp_error(error: BaseException) -> EmailDeliveryError:
    """The worker's view of an aiosmtplib (or socket) failure: temporary or permanent."""
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused):
        # One recipient per message, so one refusal; permanent only when every refusal was a 5xx.
        replies = "; ".join(f"{refusal.code} {refusal.message}" for refusal in error.recipients)
        codes = [refusal.code for refusal in error.recipients]
        return _by_code(codes[0] if codes else 451, f"recipient refused: {_short(replies)}")
    if isinstance(error, aiosmtplib.SMTPAuthenticationError):
        # Our credentials, not the message, are at fault: retry while an operator fixes them.
        return TemporaryDeliveryError(
            f"SMTP authentication failed: {error.code} {_short(error.message)}", smtp_code=error.code
        )
    if isinstance(error, aiosmtplib.SMTPResponseException):
        return _by_code(error.code, f"SMTP server replied {error.code} {_short(error.message)}")
    for kinds, what in _TEMPORARY_FAILURES:
        if isinstance(error, kinds):
            return TemporaryDeliveryError(f"{what}: {type(error).__name__}: {_short(str(error))}")
    return TemporaryDeliveryError(f"unexpected SMTP failure: {type(error).__name__}")


def _by_code(code: int, detail: str) -> EmailDeliveryError:
    if 500 <= code < 600:
        return PermanentDeliveryError(detail, smtp_code=code)
    return TemporaryDeliveryError(detail, smtp_code=code)


def _short(text: str) -> str:
    return " ".join(text.split())[:_SMTP_REPLY_MAX_CHARS]


class SmtpSender:
    """One SMTP connection per message: STARTTLS or implicit TLS, optional AUTH, bounded timeouts.

    A connection per message keeps failure handling simple (no half-dead pooled connection); the
    per-domain rate limit keeps the volume where that is affordable.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        security: SmtpSecurity = "starttls",
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._security = security
        self._username = username
        self._password = password
        self._timeout_s = timeout_s
        self._tls_context = tls_context

    @classmethod
    def from_settings(cls, settings: Settings, *, tls_context: ssl.SSLContext | None = None) -> SmtpSender:
        if settings.smtp_host is None:
            raise ValueError("smtp_host is not set")
        password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        return cls(
            settings.smtp_host,
            settings.smtp_port,
            security=settings.smtp_security,
            username=settings.smtp_username,
            password=password,
            timeout_s=settings.smtp_timeout_s,
            tls_context=tls_context,
        )

    async def send(self, message: EmailMessage) -> str:
        message_id = ensure_message_id(message)
        client = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            timeout=self._timeout_s,
            use_tls=self._security == "tls",
            # True = STARTTLS is required, never silently skipped; False = never attempted.
            start_tls=self._security == "starttls",
            tls_context=self._tls_context,
            username=self._username,
            password=self._password,
        )
        try:
            async with client:
                await client.send_message(message)
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError, TimeoutError) as error:
            raise classify_smtp_error(error) from error
        return message_id


class EmlFileSender:
    """Writes each message to `<directory>/<message-id>.eml` (embedded mode without SMTP).

    The write is atomic (a temporary file renamed into place), so a reader never sees half a mail,
    and a redelivered job with the same Message-ID replaces its file instead of adding another.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    @classmethod
    def from_settings(cls, settings: Settings) -> EmlFileSender:
        return cls(settings.data_dir / MAIL_DIR_NAME)

    @property
    def directory(self) -> Path:
        return self._directory

    def path_for(self, message_id: str) -> Path:
        """Where the message with this Message-ID is written."""
        name = _UNSAFE_FILE_CHARS.sub("_", message_id.strip().strip("<>"))
        return self._directory / f"{name}.eml"

    async def send(self, message: EmailMessage) -> str:
        message_id = ensure_message_id(message)
        try:
            await asyncio.to_thread(self._write, self.path_for(message_id), message.as_bytes())
        except OSError as error:
            raise TemporaryDeliveryError(f"cannot write the .eml file: {error.strerror or error}") from error
        return message_id

    def _write(self, path: Path, content: bytes) -> None:
        # Owner-only: a mail holds a live verification or reset link (services/common/data_dir.py).
        path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid4().hex}.tmp")
        with os.fdopen(
            os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE), "wb"
        ) as file:
            file.write(content)
        partial.replace(path)


def build_sender(settings: Settings) -> MailSender:
    """SMTP when `smtp_host` is set, else `.eml` files under the data dir."""
    if settings.smtp_host is not None:
        return SmtpSender.from_settings(settings)
    logger.info("no SMTP host configured: emails are written under %s", settings.data_dir / MAIL_DIR_NAME)
    return EmlFileSender.from_settings(settings)
