"""The `stripe` payment provider against a local server that answers like Stripe's API.

The official SDK makes real HTTP requests to `FakeStripe`, an asyncio server in the test that
records what it was sent and answers like `POST /v1/checkout/sessions` (and the payment method,
payment intent and refund calls), or fails as scripted: an
error status with Stripe's error body, a hang, or a connection closed without an answer. Webhooks are
Stripe-shaped events signed with `sign`, the way Stripe signs them. Nothing reaches the internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from http import HTTPStatus
from pathlib import Path
from secrets import token_hex
from typing import Any
from urllib.parse import parse_qsl

import pytest
import stripe
from pydantic import SecretStr

from services.billing.checkout import Checkout
from services.billing.ledger import CreditLedger
from services.billing.payments import CheckoutRequest, PaymentProvider
from services.billing.plans import PlanCatalog
from services.billing.repository import billing_units_of_work
from services.billing.stripe_provider import StripePaymentProvider
from services.billing.subscriptions import SubscriptionManager
from services.billing.webhook_signatures import sign
from services.billing.wiring import build, payment_provider
from services.common.context import ServiceContext
from services.common.db import Database
from services.common.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ParleyError,
    Unavailable,
)
from services.common.model_catalog import load_model_catalog
from services.common.money import Money
from services.common.revocation import InMemoryRevocationList
from services.common.settings import load_settings
from tests.support.domain import START, Clock, refusal

# The SDK's httpx client (stripe 16.1.0) hands httpx the encoded form as `data=`, which httpx 0.28
# deprecates in favour of `content=`; the request is sent the same either way.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Use 'content=<...>' to upload raw bytes/text content:DeprecationWarning"
)

API_KEY = "sk_test_51ParleyLocalOnly0123456789abcdefDoNotLeak"
SECRET = "whsec_current_secret"
OLD_SECRET = "whsec_rotated_out_secret"
SESSIONS = "/v1/checkout/sessions"
PAYMENT_METHODS = "/v1/payment_methods/"
PAYMENT_INTENTS = "/v1/payment_intents"
REFUNDS = "/v1/refunds"
CUSTOMER = "cus_test_parley"
# Stripe's test payment methods, and the card error (code, decline code) an off-session charge gets.
SAVED_CARDS = {
    "pm_card_visa": ("", ""),
    "pm_card_chargeDeclined": ("card_declined", "generic_decline"),
    "pm_card_chargeDeclinedInsufficientFunds": ("card_declined", "insufficient_funds"),
    "pm_card_authenticationRequired": ("authentication_required", "authentication_required"),
}
REQUEST = CheckoutRequest(
    checkout_id="0d6f4f2e-7a51-4a8e-9a53-1f0c2b7d9e10",
    amount=Money("USD", 1_000),
    description="1M tokens for Parley",
    success_url="https://parley.example/billing/done",
    cancel_url="https://parley.example/billing",
    expires_at=START + timedelta(hours=24),
)


@dataclass(frozen=True)
class Received:
    """One request the fake was sent; `form` is the decoded form body, keys as Stripe spells them."""

    method: str
    path: str
    headers: dict[str, str]
    form: dict[str, str]


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


class Hang:
    """Read the request, then never answer."""


class Cut:
    """Read the request, then close the connection without a byte."""


Behaviour = Answer | Hang | Cut


def stripe_error(status: int, **error: str) -> Answer:
    return Answer(status, {"error": error})


@dataclass
class FakeStripe:
    """Answers like Stripe's API; each request takes the next scripted behaviour, else succeeds."""

    script: deque[Behaviour] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    # Sessions as the fake opened them, by id, so tests can compare what the provider returned.
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    intents: list[dict[str, Any]] = field(default_factory=list)
    refunds: list[dict[str, Any]] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def api_base(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def then(self, *behaviours: Behaviour) -> None:
        self.script.extend(behaviours)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            try:
                request = await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            self.received.append(request)
            behaviour = self.script.popleft() if self.script else self._answer(request)
            if isinstance(behaviour, Hang):
                await self._released.wait()
            elif isinstance(behaviour, Answer):
                writer.write(_response(behaviour))
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._handlers.discard(task)

    def _answer(self, request: Received) -> Answer:
        if (request.method, request.path) == ("POST", SESSIONS):
            return self._open_session(request.form)
        if request.method == "GET" and request.path.startswith(PAYMENT_METHODS):
            return self._payment_method(request.path.removeprefix(PAYMENT_METHODS))
        if (request.method, request.path) == ("POST", PAYMENT_INTENTS):
            return self._charge(request.form)
        if (request.method, request.path) == ("POST", REFUNDS):
            return self._refund(request.form)
        return stripe_error(404, type="invalid_request_error", message="Unrecognized request URL.")

    def _open_session(self, form: dict[str, str]) -> Answer:
        session_id = f"cs_test_{token_hex(24)}"
        session = {
            "id": session_id,
            "object": "checkout.session",
            "amount_subtotal": int(form["line_items[0][price_data][unit_amount]"]),
            "amount_total": int(form["line_items[0][price_data][unit_amount]"]),
            "cancel_url": form.get("cancel_url"),
            "client_reference_id": form.get("client_reference_id"),
            "created": int(time.time()),
            "currency": form["line_items[0][price_data][currency]"],
            "customer": None,
            "expires_at": int(form["expires_at"]),
            "livemode": False,
            "metadata": {},
            "mode": form["mode"],
            "payment_intent": None,
            "payment_status": "unpaid",
            "status": "open",
            "success_url": form.get("success_url"),
            "ui_mode": "hosted",
            "url": f"https://checkout.stripe.com/c/pay/{session_id}#fidkdWxOYHwnPyd1blpxYHZxWjA0",
        }
        self.sessions[session_id] = session
        return Answer(200, session)

    def _payment_method(self, method_id: str) -> Answer:
        if method_id not in SAVED_CARDS:
            return stripe_error(
                404,
                type="invalid_request_error",
                code="resource_missing",
                param="payment_method",
                message=f"No such PaymentMethod: '{method_id}'",
            )
        card = {"brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2034}
        return Answer(
            200,
            {"id": method_id, "object": "payment_method", "type": "card", "customer": CUSTOMER, "card": card},
        )

    def _charge(self, form: dict[str, str]) -> Answer:
        intent = {
            "id": f"pi_{token_hex(12)}",
            "object": "payment_intent",
            "amount": int(form["amount"]),
            "currency": form["currency"],
            "customer": form.get("customer"),
            "payment_method": form["payment_method"],
            "status": "succeeded",
        }
        self.intents.append(intent)
        code, decline_code = SAVED_CARDS[form["payment_method"]]
        if not code:
            return Answer(200, intent)
        failed = {**intent, "status": "requires_payment_method"}
        error = {
            "type": "card_error",
            "code": code,
            "decline_code": decline_code,
            "message": "Your card was declined.",
            "payment_intent": failed,
        }
        return Answer(402, {"error": error})

    def _refund(self, form: dict[str, str]) -> Answer:
        refund = {
            "id": f"re_{token_hex(12)}",
            "object": "refund",
            "amount": int(form["amount"]),
            "currency": "usd",
            "payment_intent": form["payment_intent"],
            "status": "succeeded",
        }
        self.refunds.append(refund)
        return Answer(200, refund)


async def _read_request(reader: asyncio.StreamReader) -> Received:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    request_line, *header_lines = head.split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    headers = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Received(method, path, headers, dict(parse_qsl(body.decode(), keep_blank_values=True)))


def _response(answer: Answer) -> bytes:
    body = json.dumps(answer.body).encode()
    head = (
        f"HTTP/1.1 {answer.status} {HTTPStatus(answer.status).phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Request-Id: req_{token_hex(7)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


@pytest.fixture
async def fake() -> AsyncIterator[FakeStripe]:
    server = FakeStripe()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def provider(fake: FakeStripe) -> AsyncIterator[StripePaymentProvider]:
    opened = StripePaymentProvider(
        SecretStr(API_KEY),
        [SECRET, OLD_SECRET],
        api_base=fake.api_base,
        read_timeout=timedelta(seconds=0.5),
        max_network_retries=0,
    )
    try:
        yield opened
    finally:
        await opened.aclose()


async def test_a_checkout_is_a_stripe_session_in_payment_mode_for_one_line_item(
    fake: FakeStripe, provider: StripePaymentProvider
) -> None:
    opened = await provider.create_checkout(REQUEST)

    session = fake.sessions[opened.provider_session_id]
    assert opened.url == session["url"]
    [sent] = fake.received
    assert (sent.method, sent.path) == ("POST", SESSIONS)
    assert sent.form == {
        "mode": "payment",
        "line_items[0][quantity]": "1",
        "line_items[0][price_data][currency]": "usd",
        "line_items[0][price_data][unit_amount]": "1000",
        "line_items[0][price_data][product_data][name]": "1M tokens for Parley",
        "client_reference_id": REQUEST.checkout_id,
        "customer_creation": "always",
        "payment_intent_data[metadata][parley_checkout_id]": REQUEST.checkout_id,
        "payment_intent_data[setup_future_usage]": "off_session",
        "expires_at": str(int(REQUEST.expires_at.timestamp())),
        "success_url": REQUEST.success_url,
        "cancel_url": REQUEST.cancel_url,
    }
    assert sent.headers["idempotency-key"] == REQUEST.checkout_id
    # The key travels with our client's requests; the SDK's module-level key stays unset.
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert stripe.api_key is None


async def test_urls_the_caller_left_out_are_not_sent(
    fake: FakeStripe, provider: StripePaymentProvider
) -> None:
    request = CheckoutRequest(
        REQUEST.checkout_id, REQUEST.amount, REQUEST.description, "", "", REQUEST.expires_at
    )
    await provider.create_checkout(request)
    assert "success_url" not in fake.received[0].form
    assert "cancel_url" not in fake.received[0].form


async def test_a_retry_after_a_server_error_reuses_the_idempotency_key(fake: FakeStripe) -> None:
    retrying = StripePaymentProvider(SecretStr(API_KEY), [SECRET], api_base=fake.api_base)
    try:
        fake.then(stripe_error(500, type="api_error", message="An unknown error occurred"))
        opened = await retrying.create_checkout(REQUEST)
    finally:
        await retrying.aclose()
    assert opened.provider_session_id in fake.sessions
    assert [request.headers["idempotency-key"] for request in fake.received] == [REQUEST.checkout_id] * 2


@pytest.mark.parametrize(
    ("behaviour", "kind", "reason"),
    [
        pytest.param(
            stripe_error(500, type="api_error", message="An unknown error occurred"),
            Unavailable,
            "PAYMENT_PROVIDER_UNAVAILABLE",
            id="500",
        ),
        pytest.param(
            stripe_error(503, type="api_error", message="Service unavailable"),
            Unavailable,
            "PAYMENT_PROVIDER_UNAVAILABLE",
            id="503",
        ),
        pytest.param(
            stripe_error(429, type="invalid_request_error", code="rate_limit", message="Too many requests"),
            Unavailable,
            "PAYMENT_PROVIDER_UNAVAILABLE",
            id="429",
        ),
        pytest.param(
            stripe_error(
                402,
                type="card_error",
                code="card_declined",
                decline_code="insufficient_funds",
                message="Your card has insufficient funds.",
            ),
            FailedPrecondition,
            "PAYMENT_INSUFFICIENT_FUNDS",
            id="402-insufficient-funds",
        ),
        pytest.param(
            stripe_error(
                402,
                type="card_error",
                code="card_declined",
                decline_code="generic_decline",
                message="Your card was declined.",
            ),
            FailedPrecondition,
            "PAYMENT_DECLINED",
            id="402-declined",
        ),
        pytest.param(
            stripe_error(
                400,
                type="invalid_request_error",
                code="parameter_invalid_integer",
                param="line_items[0][price_data][unit_amount]",
                message="Invalid integer: -1",
            ),
            Internal,
            "INTERNAL",
            id="400-our-request",
        ),
        pytest.param(Hang(), Unavailable, "PAYMENT_PROVIDER_UNAVAILABLE", id="hang"),
        pytest.param(Cut(), Unavailable, "PAYMENT_PROVIDER_UNAVAILABLE", id="closed-connection"),
        pytest.param(
            Answer(200, {"id": "cs_test_1", "object": "checkout.session", "url": None}),
            Unavailable,
            "PAYMENT_PROVIDER_UNAVAILABLE",
            id="no-url",
        ),
    ],
)
async def test_stripe_failures_are_typed_errors(
    fake: FakeStripe,
    provider: StripePaymentProvider,
    behaviour: Behaviour,
    kind: type[ParleyError],
    reason: str,
) -> None:
    fake.then(behaviour)
    started = time.monotonic()
    refused = await refusal(provider.create_checkout(REQUEST), kind)
    assert refused.reason == reason
    assert time.monotonic() - started < 5, "a hang is cut off by the read timeout"
    assert len(fake.received) == 1


async def test_a_url_stripe_refuses_is_the_callers_field(
    fake: FakeStripe, provider: StripePaymentProvider
) -> None:
    fake.then(
        stripe_error(
            400,
            type="invalid_request_error",
            code="url_invalid",
            param="success_url",
            message="Not a valid URL",
        )
    )
    refused = await refusal(provider.create_checkout(REQUEST), InvalidArgument)
    assert [violation.field for violation in refused.field_violations] == ["success_url"]


async def test_a_refused_api_key_is_unavailable_and_logged_without_the_key(
    fake: FakeStripe, provider: StripePaymentProvider, caplog: pytest.LogCaptureFixture
) -> None:
    # Stripe quotes the key masked, as here; nothing of ours repeats even that.
    masked = f"sk_test_{'*' * 32}{API_KEY[-4:]}"
    fake.then(stripe_error(401, type="invalid_request_error", message=f"Invalid API Key provided: {masked}"))
    with caplog.at_level(logging.DEBUG):
        refused = await refusal(provider.create_checkout(REQUEST), Unavailable)

    assert refused.reason == "PAYMENT_PROVIDER_UNAVAILABLE"
    assert "sk_" not in refused.message
    ours = [record for record in caplog.records if record.name == "services.billing.stripe_provider"]
    assert [record.levelno for record in ours] == [logging.ERROR]
    assert "PARLEY_BILLING_STRIPE_API_KEY" in ours[0].getMessage()
    assert "sk_" not in ours[0].getMessage()
    assert all(API_KEY not in record.getMessage() for record in caplog.records)


async def test_an_unreachable_stripe_is_unavailable() -> None:
    closed = await asyncio.start_server(lambda _reader, _writer: None, "127.0.0.1", 0)
    port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    unreachable = StripePaymentProvider(
        SecretStr(API_KEY), [SECRET], api_base=f"http://127.0.0.1:{port}", max_network_retries=0
    )
    try:
        refused = await refusal(unreachable.create_checkout(REQUEST), Unavailable)
    finally:
        await unreachable.aclose()
    assert refused.reason == "PAYMENT_PROVIDER_UNAVAILABLE"


@pytest.mark.parametrize(
    ("card", "status", "failure_reason"),
    [
        ("pm_card_visa", "succeeded", ""),
        ("pm_card_chargeDeclined", "failed", "PAYMENT_DECLINED"),
        ("pm_card_chargeDeclinedInsufficientFunds", "failed", "PAYMENT_INSUFFICIENT_FUNDS"),
        ("pm_card_authenticationRequired", "requires_action", ""),
    ],
)
async def test_a_saved_card_is_charged_off_session_with_its_customer(
    fake: FakeStripe, provider: StripePaymentProvider, card: str, status: str, failure_reason: str
) -> None:
    result = await provider.charge(
        card, Money("EUR", 2_900), idempotency_key="invoice-7:1", description="Parley invoice 2031-000007"
    )

    [intent] = fake.intents
    assert (result.status, result.provider_payment_id, result.failure_reason) == (
        status,
        intent["id"],
        failure_reason,
    )
    lookup, create = fake.received
    assert (lookup.method, lookup.path) == ("GET", f"{PAYMENT_METHODS}{card}")
    assert (create.method, create.path) == ("POST", PAYMENT_INTENTS)
    assert create.form == {
        "amount": "2900",
        "currency": "eur",
        "customer": CUSTOMER,
        "payment_method": card,
        "off_session": "true",
        "confirm": "true",
        "description": "Parley invoice 2031-000007",
    }
    assert create.headers["idempotency-key"] == "invoice-7:1"


async def test_a_saved_card_stripe_no_longer_has_is_a_declined_charge(
    fake: FakeStripe, provider: StripePaymentProvider
) -> None:
    result = await provider.charge(
        "pm_detached", Money("USD", 1_000), idempotency_key="invoice-8:1", description="Parley invoice"
    )
    assert (result.status, result.provider_payment_id, result.failure_reason) == (
        "failed",
        "",
        "PAYMENT_DECLINED",
    )
    assert fake.intents == []


@pytest.mark.parametrize(
    "behaviour",
    [
        pytest.param(stripe_error(500, type="api_error", message="An unknown error occurred"), id="500"),
        pytest.param(stripe_error(401, type="invalid_request_error", message="Invalid API Key"), id="401"),
        pytest.param(Hang(), id="hang"),
    ],
)
async def test_a_charge_stripe_cannot_take_now_is_unavailable(
    fake: FakeStripe, provider: StripePaymentProvider, behaviour: Behaviour
) -> None:
    fake.then(behaviour)
    refused = await refusal(
        provider.charge(
            "pm_card_visa", Money("USD", 1_000), idempotency_key="invoice-9:1", description="Parley invoice"
        ),
        Unavailable,
    )
    assert refused.reason == "PAYMENT_PROVIDER_UNAVAILABLE"
    assert fake.intents == []


async def test_a_refund_is_a_stripe_refund_of_the_payment_intent_keyed_for_retries(
    fake: FakeStripe, provider: StripePaymentProvider
) -> None:
    result = await provider.refund("pi_paid_once", Money("USD", 4_500), idempotency_key="refund:invoice-7")

    [refund] = fake.refunds
    assert (result.status, result.provider_refund_id, result.failure_reason) == (
        "succeeded",
        refund["id"],
        "",
    )
    [sent] = fake.received
    assert (sent.method, sent.path) == ("POST", REFUNDS)
    assert sent.form == {"payment_intent": "pi_paid_once", "amount": "4500"}
    assert sent.headers["idempotency-key"] == "refund:invoice-7"


@pytest.mark.parametrize(
    ("stripe_status", "status", "failure_reason"),
    [
        ("pending", "pending", ""),
        ("requires_action", "pending", ""),
        ("failed", "failed", "expired_or_canceled_card"),
        ("canceled", "failed", "expired_or_canceled_card"),
    ],
)
async def test_a_refund_stripe_finishes_later_is_pending_and_a_failed_one_failed(
    fake: FakeStripe, provider: StripePaymentProvider, stripe_status: str, status: str, failure_reason: str
) -> None:
    refund = {
        "id": "re_later",
        "object": "refund",
        "amount": 1_000,
        "currency": "usd",
        "status": stripe_status,
        "failure_reason": failure_reason or None,
    }
    fake.then(Answer(200, refund))
    result = await provider.refund("pi_paid_once", Money("USD", 1_000), idempotency_key="refund:invoice-8")
    assert (result.status, result.provider_refund_id, result.failure_reason) == (
        status,
        "re_later",
        failure_reason,
    )


async def test_a_refund_stripe_refuses_is_failed_with_its_code_and_logged(
    fake: FakeStripe, provider: StripePaymentProvider, caplog: pytest.LogCaptureFixture
) -> None:
    fake.then(
        stripe_error(
            400,
            type="invalid_request_error",
            code="charge_already_refunded",
            message="Charge ch_1 has already been refunded.",
        )
    )
    with caplog.at_level(logging.WARNING):
        result = await provider.refund(
            "pi_paid_once", Money("USD", 1_000), idempotency_key="refund:invoice-9"
        )
    assert (result.status, result.provider_refund_id, result.failure_reason) == (
        "failed",
        "",
        "charge_already_refunded",
    )
    [logged] = [record for record in caplog.records if record.name == "services.billing.stripe_provider"]
    assert "charge_already_refunded" in logged.getMessage()
    assert fake.refunds == []


@pytest.mark.parametrize(
    "behaviour",
    [
        pytest.param(stripe_error(500, type="api_error", message="An unknown error occurred"), id="500"),
        pytest.param(stripe_error(401, type="invalid_request_error", message="Invalid API Key"), id="401"),
        pytest.param(Hang(), id="hang"),
        pytest.param(Cut(), id="closed-connection"),
    ],
)
async def test_a_refund_stripe_cannot_take_now_is_unavailable(
    fake: FakeStripe, provider: StripePaymentProvider, behaviour: Behaviour
) -> None:
    fake.then(behaviour)
    refused = await refusal(
        provider.refund("pi_paid_once", Money("USD", 1_000), idempotency_key="refund:invoice-10"), Unavailable
    )
    assert refused.reason == "PAYMENT_PROVIDER_UNAVAILABLE"
    assert fake.refunds == []


def completed_event(checkout_id: str, session_id: str, amount: Money) -> bytes:
    """A `checkout.session.completed` delivery as Stripe sends it (trimmed of fields nobody reads)."""
    event = {
        "id": f"evt_{token_hex(12)}",
        "object": "event",
        "api_version": "2025-09-30.clover",
        "created": int(START.timestamp()),
        "data": {
            "object": {
                "id": session_id,
                "object": "checkout.session",
                "amount_subtotal": amount.amount_minor,
                "amount_total": amount.amount_minor,
                "client_reference_id": checkout_id,
                "currency": amount.currency_code.lower(),
                "customer": None,
                "customer_details": {"email": "ada@example.com", "name": "Ada"},
                "livemode": False,
                "metadata": {},
                "mode": "payment",
                "payment_intent": f"pi_{token_hex(12)}",
                "payment_status": "paid",
                "status": "complete",
            }
        },
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": "checkout.session.completed",
    }
    return json.dumps(event, indent=2).encode()


def payment_failed_event(checkout_id: str, decline_code: str) -> bytes:
    """A `payment_intent.payment_failed` delivery as Stripe sends it (trimmed likewise)."""
    intent_id = f"pi_{token_hex(12)}"
    event = {
        "id": f"evt_{token_hex(12)}",
        "object": "event",
        "api_version": "2025-09-30.clover",
        "created": int(START.timestamp()),
        "data": {
            "object": {
                "id": intent_id,
                "object": "payment_intent",
                "amount": 1_000,
                "currency": "usd",
                "last_payment_error": {
                    "code": "card_declined",
                    "decline_code": decline_code,
                    "doc_url": "https://stripe.com/docs/error-codes/card-declined",
                    "message": "Your card was declined.",
                    "type": "card_error",
                },
                "livemode": False,
                "metadata": {"parley_checkout_id": checkout_id},
                "status": "requires_payment_method",
            }
        },
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": f"req_{token_hex(7)}", "idempotency_key": None},
        "type": "payment_intent.payment_failed",
    }
    return json.dumps(event, indent=2).encode()


async def test_signed_stripe_events_verify_and_parse(provider: StripePaymentProvider) -> None:
    body = completed_event(REQUEST.checkout_id, "cs_test_a1", Money("USD", 1_000))
    paid = provider.verify_event(body, sign(body, SECRET, at=START), now=START + timedelta(seconds=3))
    assert (paid.kind, paid.checkout_id, paid.amount) == ("paid", REQUEST.checkout_id, Money("USD", 1_000))
    assert paid.provider_payment_id.startswith("pi_")

    for decline_code, reason in (
        ("insufficient_funds", "PAYMENT_INSUFFICIENT_FUNDS"),
        ("generic_decline", "PAYMENT_DECLINED"),
    ):
        body = payment_failed_event(REQUEST.checkout_id, decline_code)
        # Signed with the secret being rotated out: still accepted.
        failed = provider.verify_event(body, sign(body, OLD_SECRET, at=START), now=START)
        assert (failed.kind, failed.checkout_id, failed.failure_reason) == (
            "failed",
            REQUEST.checkout_id,
            reason,
        )


async def test_unsigned_forged_stale_and_oversized_events_are_refused(
    provider: StripePaymentProvider,
) -> None:
    body = completed_event(REQUEST.checkout_id, "cs_test_a1", Money("USD", 1_000))
    header = sign(body, SECRET, at=START)
    for bad_body, bad_header, now, reason in (
        (body, None, START, "WEBHOOK_SIGNATURE_INVALID"),
        (body.replace(b"1000", b"1"), header, START, "WEBHOOK_SIGNATURE_INVALID"),
        (body, sign(body, "whsec_someone_else", at=START), START, "WEBHOOK_SIGNATURE_INVALID"),
        (body, header, START + timedelta(minutes=6), "WEBHOOK_SIGNATURE_EXPIRED"),
        (b" " * 70_000, header, START, "WEBHOOK_PAYLOAD_INVALID"),
    ):
        with pytest.raises(InvalidArgument) as refused:
            provider.verify_event(bad_body, bad_header, now=now)
        assert refused.value.reason == reason


async def test_a_top_up_bought_through_stripe_credits_the_balance(
    database: Database, fake: FakeStripe, provider: StripePaymentProvider
) -> None:
    clock = Clock()
    units = billing_units_of_work(database)
    subscriptions = SubscriptionManager(units, PlanCatalog(units), clock=clock)
    ledger = CreditLedger(units, subscriptions, load_model_catalog(), clock=clock)
    checkout = Checkout(units, subscriptions, ledger, provider, clock=clock)
    user = "4b0c1c2e-0f0e-4d5e-8a7b-3b2a19c0d111"

    session = await checkout.create_session(
        user, "buy-1", credit_pack_id="tokens-1m", success_url="https://parley.example/done"
    )
    assert session.provider == "stripe"
    opened = fake.sessions[session.provider_session_id]
    assert (session.url, opened["client_reference_id"], opened["amount_total"]) == (
        opened["url"],
        session.id,
        1_000,
    )
    assert fake.received[0].headers["idempotency-key"] == session.id

    clock.advance(timedelta(minutes=3))
    body = completed_event(session.id, session.provider_session_id, session.amount)
    outcome = await checkout.handle_webhook("stripe", body, sign(body, SECRET, at=clock()))
    assert outcome.duplicate is False
    assert (await ledger.balance(user)).purchased_tokens == 1_000_000
    again = await checkout.handle_webhook("stripe", body, sign(body, SECRET, at=clock()))
    assert again.duplicate is True


@pytest.mark.parametrize("embedded", [False, True])
async def test_wiring_builds_stripe_only_with_a_key_and_stripes_signing_secrets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sqlite_url: str, embedded: bool
) -> None:
    monkeypatch.setenv("PARLEY_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PARLEY_BILLING_PAYMENT_PROVIDER", "stripe")
    database = Database(sqlite_url)

    def wired() -> tuple[PaymentProvider | None, str]:
        return payment_provider(
            ServiceContext(load_settings(), database, InMemoryRevocationList(), embedded=embedded)
        )

    try:
        # Stripe issues the signing secret, so embedded mode does not make one up.
        built, reason = wired()
        assert built is None
        assert "PARLEY_BILLING_WEBHOOK_SECRETS" in reason
        monkeypatch.setenv("PARLEY_BILLING_WEBHOOK_SECRETS", f"{SECRET}, {OLD_SECRET}")
        built, reason = wired()
        assert built is None
        assert "PARLEY_BILLING_STRIPE_API_KEY" in reason
        monkeypatch.setenv("PARLEY_BILLING_STRIPE_API_KEY", API_KEY)
        built, reason = wired()
        assert isinstance(built, StripePaymentProvider)
        assert reason == ""
        await built.aclose()
        # The billing process closes Stripe's connections when it stops.
        bundle = build(ServiceContext(load_settings(), database, InMemoryRevocationList(), embedded=embedded))
        assert len(bundle.on_stop) == 1
        for step in bundle.on_stop:
            await step()
    finally:
        await database.dispose()
