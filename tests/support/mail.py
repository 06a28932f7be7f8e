"""A real SMTP server (aiosmtpd) for email tests, with scripted replies, and sample email jobs."""

from __future__ import annotations

import asyncio
import ssl
import threading
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from parley.events.v1 import events_pb2
from tests.support.gateway import free_port

ACCEPTED = "250 2.0.0 OK: queued"

# Parameters that satisfy each template, as the emitting services send them.
SAMPLE_PARAMS: Mapping[str, Mapping[str, str]] = {
    "verify_email": {
        "display_name": "Ada",
        "token": "tok-verify-0123456789",
        "link_path": "/verify-email?token=tok-verify-0123456789",
        "expire_time": "2026-11-27T08:00:00+00:00",
    },
    "password_reset": {
        "display_name": "Ada",
        "token": "tok-reset-0123456789",
        "link_path": "/reset-password?token=tok-reset-0123456789",
        "expire_time": "2026-11-26T09:00:00+00:00",
    },
    "welcome": {"display_name": "Ada"},
    "new_login": {
        "display_name": "Ada",
        "login_time": "2026-11-26T08:15:00+00:00",
        "ip_address": "203.0.113.7",
        "device_name": "Firefox on Linux",
    },
    "invoice_receipt": {
        "display_name": "Ada",
        "invoice_number": "INV-2026-0042",
        "amount_minor": "2900",
        "currency": "EUR",
    },
    "payment_failed": {
        "display_name": "Ada",
        "invoice_number": "INV-2026-0043",
        "amount_minor": "2900",
        "currency": "EUR",
        "next_retry_time": "2026-11-29T08:00:00+00:00",
    },
    "quota_80": {
        "display_name": "Ada",
        "used_tokens": "800000",
        "included_tokens": "1000000",
        "period_end_time": "2026-12-01T00:00:00+00:00",
    },
    "quota_100": {
        "display_name": "Ada",
        "used_tokens": "1000000",
        "included_tokens": "1000000",
        "period_end_time": "2026-12-01T00:00:00+00:00",
    },
}

# The path each template's main link points at (on the public base URL).
SAMPLE_LINK_PATHS: Mapping[str, str] = {
    "verify_email": "/verify-email?token=tok-verify-0123456789",
    "password_reset": "/reset-password?token=tok-reset-0123456789",
    "welcome": "/chat",
    "new_login": "/settings/security",
    "invoice_receipt": "/billing/invoices",
    "payment_failed": "/billing",
    "quota_80": "/billing/usage",
    "quota_100": "/billing",
}


def email_requested_event(
    template: str,
    recipient: str = "ada@example.com",
    params: Mapping[str, str] | None = None,
    *,
    event_id: str = "",
) -> events_pb2.Event:
    """An `email.requested` event envelope as the outbox would deliver it."""
    event = events_pb2.Event(id=event_id or str(uuid.uuid4()), type="email.requested", source="auth")
    event.email_requested.template = template
    event.email_requested.recipient = recipient
    event.email_requested.user_id = "user-1"
    event.email_requested.params.update(SAMPLE_PARAMS.get(template, {}) if params is None else params)
    return event


@dataclass(frozen=True)
class ReceivedMail:
    """One message the test server accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: EmailMessage
    # Whether the session was under TLS, and the AUTH login if any.
    tls: bool
    login: str | None


class RecordingHandler:
    """Accepts mail and records it; answers the next scripted reply instead of 250 while any is left.

    `rcpt_replies` answer RCPT TO commands, `data_replies` answer DATA; each list is consumed in order.
    """

    def __init__(self, *, rcpt_replies: Iterable[str] = (), data_replies: Iterable[str] = ()) -> None:
        self._rcpt_replies = deque(rcpt_replies)
        self._data_replies = deque(data_replies)
        self._lock = threading.Lock()
        self.received: list[ReceivedMail] = []
        self.data_commands = 0

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        with self._lock:
            reply = self._rcpt_replies.popleft() if self._rcpt_replies else "250 OK"
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        with self._lock:
            self.data_commands += 1
            reply = self._data_replies.popleft() if self._data_replies else ACCEPTED
        if reply.startswith("250"):
            content = envelope.original_content or b""
            message = BytesParser(policy=default_policy).parsebytes(content)
            login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
            with self._lock:
                self.received.append(
                    ReceivedMail(
                        mail_from=str(envelope.mail_from),
                        rcpt_tos=tuple(envelope.rcpt_tos),
                        message=message,
                        tls=session.ssl is not None,
                        login=login,
                    )
                )
        return reply


def password_authenticator(login: str, password: str) -> Any:
    """An aiosmtpd authenticator accepting exactly this login and password."""

    def authenticate(
        server: Any, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        accepted = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == login.encode()
            and auth_data.password == password.encode()
        )
        return AuthResult(success=accepted, handled=False, auth_data=auth_data)

    return authenticate


@contextmanager
def smtp_server(handler: RecordingHandler, **controller_options: Any) -> Iterator[Controller]:
    """A real aiosmtpd server on 127.0.0.1 at a free port (`controller.port`), stopped on exit."""
    controller = smtp_server_at(handler, free_port(), **controller_options)
    try:
        yield controller
    finally:
        controller.stop()


def server_tls_context(cert_path: Any, key_path: Any) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context


def smtp_server_at(handler: RecordingHandler, port: int, **controller_options: Any) -> Controller:
    """A started aiosmtpd server on 127.0.0.1:`port` (one the test reserved earlier); stop it with
    `controller.stop()`. For a test that starts the server only after its clients began trying."""
    controller = Controller(handler, hostname="127.0.0.1", port=port, **controller_options)
    controller.start()
    return controller


# The reply a held DATA gets when the test never releases it: the client must try again later.
HELD_TOO_LONG = "451 4.3.0 Held by the test for too long"


class SteerableHandler(RecordingHandler):
    """A `RecordingHandler` the test steers while mail flows.

    - `refuse(address, reply)` answers RCPT TO for that address with `reply` (a 5xx: a poison job)
      until `stop_refusing()`.
    - `hold_data_number=k` holds the reply to the k-th DATA command (counted from 1) until
      `release(reply)`: the message is in the server's hands but not accepted, so the test can kill
      the sender at that moment. `holding` is set once the k-th DATA waits.
    """

    def __init__(
        self,
        *,
        hold_data_number: int | None = None,
        hold_timeout_s: float = 60.0,
        rcpt_replies: Iterable[str] = (),
        data_replies: Iterable[str] = (),
    ) -> None:
        super().__init__(rcpt_replies=rcpt_replies, data_replies=data_replies)
        self._refusals: dict[str, str] = {}
        self._hold_data_number = hold_data_number
        self._hold_timeout_s = hold_timeout_s
        self._data_seen = 0
        self._released = threading.Event()
        self._release_reply = HELD_TOO_LONG
        # How release(), on the test's thread, wakes the held DATA, which waits on the server's loop.
        self._wake_held: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self.holding = threading.Event()
        self.held_recipients: tuple[str, ...] = ()

    def refuse(self, address: str, reply: str = "550 5.1.1 Mailbox unavailable") -> None:
        with self._lock:
            self._refusals[address.lower()] = reply

    def stop_refusing(self) -> None:
        with self._lock:
            self._refusals.clear()

    def release(self, reply: str) -> None:
        """Answer the held DATA with `reply` (a 250 records the message as received)."""
        with self._lock:
            self._release_reply = reply
            self._released.set()
            waiter = self._wake_held
        if waiter is not None:
            loop, woken = waiter
            with suppress(RuntimeError):  # the server, and its loop, already stopped
                loop.call_soon_threadsafe(woken.set)

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        with self._lock:
            refusal = self._refusals.get(address.lower())
        if refusal is not None:
            return refusal
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        with self._lock:
            self._data_seen += 1
            hold = self._data_seen == self._hold_data_number
        if not hold:
            return await super().handle_DATA(server, session, envelope)
        self.held_recipients = tuple(envelope.rcpt_tos)
        woken = asyncio.Event()
        with self._lock:
            self._wake_held = (asyncio.get_running_loop(), woken)
            if self._released.is_set():
                woken.set()
        self.holding.set()
        # If the client dies meanwhile, aiosmtpd cancels this coroutine.
        with suppress(TimeoutError):
            async with asyncio.timeout(self._hold_timeout_s):
                await woken.wait()
        with self._lock:
            reply = self._release_reply if self._released.is_set() else HELD_TOO_LONG
        if reply.startswith("250"):
            return await super().handle_DATA(server, session, envelope)
        with self._lock:
            self.data_commands += 1
        return reply
