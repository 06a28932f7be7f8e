"""Payment providers: the port billing takes payments through, Stripe-shaped events, and the sandbox.

A provider does two things for billing: it opens a checkout (a page where the user pays an amount)
and it reports what happened as signed webhook events. It also charges saved cards (renewals) and
refunds payments (an admin's RefundInvoice). Both adapters speak Stripe's event shapes and
signature scheme, so one parser (`parse_event`) and one check (`webhook_signatures.verify`) serve:

- `sandbox` (this module) is deterministic and offline, and the default in embedded mode. Its
  checkout "page" is an address nobody serves; a payment is what `SandboxPaymentProvider.pay`
  produces: the signed webhook the sandbox would send when the user pays with a test card.
- `stripe` uses the official SDK (configured by keys).

The events billing acts on, and what it reads from them:

- `checkout.session.completed` with payment_status "paid": paid. Reads client_reference_id (our
  checkout id, given when the checkout is opened), payment_intent, amount_total and currency.
- `payment_intent.payment_failed`: failed. Reads object.id, metadata.parley_checkout_id (our checkout
  id, given to the payment intent when the checkout is opened) and last_payment_error.
- `payment_intent.requires_action`: the user must act. Reads object.id and the same metadata.
- `payment_intent.succeeded` with that metadata: the card the checkout was paid with
  (object.payment_method), saved for renewals. Payment-intent events without it are billing's own
  renewal charges, whose outcome billing already recorded: they are ignored.

Every other type is acknowledged and ignored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal, Protocol

from services.billing.webhook_signatures import DEFAULT_TOLERANCE, sign, verify
from services.common.errors import InvalidArgument, Unavailable
from services.common.ids import new_id
from services.common.money import Money

EventKind = Literal["paid", "failed", "requires_action", "method", "ignored"]
ChargeStatus = Literal["succeeded", "failed", "requires_action"]
# "pending": accepted, the money on its way back (Stripe completes some card refunds later).
RefundStatus = Literal["succeeded", "pending", "failed"]

# Test cards of the sandbox and what paying with each does (Stripe's test numbers, same outcomes).
SUCCEEDS: Final = "4242424242424242"
DECLINED: Final = "4000000000000002"
INSUFFICIENT_FUNDS: Final = "4000000000009995"
REQUIRES_ACTION: Final = "4000002500003155"
# Pays at checkout, then every later charge to it is declined (Stripe's "attach, then fail" card).
FAILS_LATER: Final = "4000000000000341"
_CARD_OUTCOMES: Final[Mapping[str, tuple[str, str]]] = {
    SUCCEEDS: ("checkout.session.completed", ""),
    DECLINED: ("payment_intent.payment_failed", "card_declined"),
    INSUFFICIENT_FUNDS: ("payment_intent.payment_failed", "insufficient_funds"),
    REQUIRES_ACTION: ("payment_intent.requires_action", ""),
    FAILS_LATER: ("checkout.session.completed", ""),
}
# What a later (off-session) charge to a saved card does.
_CHARGE_OUTCOMES: Final[Mapping[str, tuple[ChargeStatus, str]]] = {
    SUCCEEDS: ("succeeded", ""),
    DECLINED: ("failed", "PAYMENT_DECLINED"),
    INSUFFICIENT_FUNDS: ("failed", "PAYMENT_INSUFFICIENT_FUNDS"),
    REQUIRES_ACTION: ("requires_action", ""),
    FAILS_LATER: ("failed", "PAYMENT_DECLINED"),
}
_SANDBOX_METHOD_PREFIX: Final = "pm_sandbox_"
# Bounds on what a webhook body may make us parse.
MAX_WEBHOOK_BYTES: Final = 64 * 1024


@dataclass(frozen=True)
class CheckoutRequest:
    """What billing asks a provider to collect."""

    checkout_id: str
    amount: Money
    description: str
    success_url: str
    cancel_url: str
    expires_at: datetime


@dataclass(frozen=True)
class ProviderCheckout:
    provider_session_id: str
    url: str


@dataclass(frozen=True)
class ProviderEvent:
    """A verified webhook event, reduced to what billing acts on."""

    event_id: str
    event_type: str
    kind: EventKind
    # Our checkout session's id, as we gave it to the provider when the checkout was opened.
    checkout_id: str = ""
    provider_payment_id: str = ""
    amount: Money | None = None
    # The ErrorReason of a failed payment: PAYMENT_DECLINED or PAYMENT_INSUFFICIENT_FUNDS.
    failure_reason: str = ""
    # The payment method a paid checkout saved for later charges (renewals), when it says.
    payment_method: str = ""


@dataclass(frozen=True)
class ChargeResult:
    """The outcome of charging a saved payment method."""

    status: ChargeStatus
    provider_payment_id: str
    # The ErrorReason of a failure: PAYMENT_DECLINED or PAYMENT_INSUFFICIENT_FUNDS.
    failure_reason: str = ""


@dataclass(frozen=True)
class RefundResult:
    """The outcome of refunding a payment."""

    status: RefundStatus
    # The provider's id for the refund; empty when it refused to make one.
    provider_refund_id: str
    # Why the provider refused, in its own words (a code, never a secret); empty otherwise.
    failure_reason: str = ""


class PaymentProvider(Protocol):
    @property
    def name(self) -> str: ...

    async def create_checkout(self, request: CheckoutRequest) -> ProviderCheckout:
        """Open a checkout; PAYMENT_PROVIDER_UNAVAILABLE (UNAVAILABLE) when the provider cannot be reached."""
        ...

    def verify_event(self, body: bytes, signature_header: str | None, *, now: datetime) -> ProviderEvent:
        """The event in a webhook delivery, if the provider signed it (INVALID_ARGUMENT otherwise)."""
        ...

    async def charge(
        self, payment_method: str, amount: Money, *, idempotency_key: str, description: str
    ) -> ChargeResult:
        """Charge a saved payment method without the user (a renewal); a repeat of
        `idempotency_key` returns the first outcome. PAYMENT_PROVIDER_UNAVAILABLE when unreachable."""
        ...

    async def refund(self, provider_payment_id: str, amount: Money, *, idempotency_key: str) -> RefundResult:
        """Pay `amount` of the payment back to the user; a repeat of `idempotency_key` returns the
        first outcome instead of refunding twice. PAYMENT_PROVIDER_UNAVAILABLE when unreachable."""
        ...


def parse_event(body: bytes) -> ProviderEvent:
    """A Stripe-shaped event; WEBHOOK_PAYLOAD_INVALID when the body is not one."""
    try:
        document = json.loads(body)
        event_id = _text(document, "id")
        event_type = _text(document, "type")
        data = _object(document["data"]["object"])
        if event_type == "checkout.session.completed":
            return _checkout_completed(event_id, event_type, data)
        if event_type.startswith("payment_intent."):
            return _payment_intent(event_id, event_type, data)
        return ProviderEvent(event_id, event_type, "ignored")
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidArgument(
            f"The webhook body is not a payment event this endpoint understands: {error}.",
            reason="WEBHOOK_PAYLOAD_INVALID",
        ) from None


def _checkout_completed(event_id: str, event_type: str, data: dict[str, Any]) -> ProviderEvent:
    if data.get("payment_status") != "paid":
        return ProviderEvent(event_id, event_type, "ignored")
    return ProviderEvent(
        event_id,
        event_type,
        "paid",
        checkout_id=_text(data, "client_reference_id"),
        provider_payment_id=_text(data, "payment_intent"),
        amount=Money(_text(data, "currency").upper(), _whole(data, "amount_total")),
        payment_method=_text(data, "payment_method") if "payment_method" in data else "",
    )


def _payment_intent(event_id: str, event_type: str, data: dict[str, Any]) -> ProviderEvent:
    metadata = data.get("metadata") or {}
    if "parley_checkout_id" not in metadata:
        # Renewal charges are made and their outcome recorded by billing itself; their
        # payment-intent events carry no checkout and need nothing more.
        return ProviderEvent(event_id, event_type, "ignored")
    checkout_id = _text(metadata, "parley_checkout_id")
    payment_id = _text(data, "id")
    if event_type == "payment_intent.succeeded":
        # Where a checkout's card is reported (Stripe's session object does not carry it).
        method = _text(data, "payment_method") if data.get("payment_method") else ""
        return ProviderEvent(
            event_id, event_type, "method", checkout_id, provider_payment_id=payment_id, payment_method=method
        )
    if event_type == "payment_intent.requires_action":
        return ProviderEvent(
            event_id, event_type, "requires_action", checkout_id, provider_payment_id=payment_id
        )
    if event_type == "payment_intent.payment_failed":
        error = data.get("last_payment_error") or {}
        code = error.get("decline_code") or error.get("code") or ""
        reason = "PAYMENT_INSUFFICIENT_FUNDS" if code == "insufficient_funds" else "PAYMENT_DECLINED"
        return ProviderEvent(
            event_id, event_type, "failed", checkout_id, provider_payment_id=payment_id, failure_reason=reason
        )
    return ProviderEvent(event_id, event_type, "ignored")


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError("data.object is not an object")
    return value


def _text(document: Any, key: str) -> str:
    value = document[key]
    if not isinstance(value, str) or not value or len(value) > 255:
        raise ValueError(f"{key} must be a non-empty string of at most 255 characters")
    return value


def _whole(document: Any, key: str) -> int:
    value = document[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer")
    return value


def check_body_size(body: bytes) -> None:
    if len(body) > MAX_WEBHOOK_BYTES:
        raise InvalidArgument(
            f"A webhook body is at most {MAX_WEBHOOK_BYTES} bytes.", reason="WEBHOOK_PAYLOAD_INVALID"
        )


class SandboxPaymentProvider:
    """The offline provider: checkouts nobody serves, and payments by test card (`pay`)."""

    name: Final = "sandbox"

    def __init__(
        self,
        webhook_secrets: Sequence[str],
        *,
        base_url: str = "https://sandbox.parley.invalid",
        tolerance: timedelta = DEFAULT_TOLERANCE,
    ) -> None:
        if not webhook_secrets:
            raise ValueError("the sandbox signs its webhooks: give it at least one secret")
        self._secrets = tuple(webhook_secrets)
        self._base_url = base_url.rstrip("/")
        self._tolerance = tolerance

    async def create_checkout(self, request: CheckoutRequest) -> ProviderCheckout:
        session_id = f"cs_sandbox_{request.checkout_id.replace('-', '')}"
        return ProviderCheckout(session_id, f"{self._base_url}/checkout/{session_id}")

    def verify_event(self, body: bytes, signature_header: str | None, *, now: datetime) -> ProviderEvent:
        check_body_size(body)
        verify(body, signature_header, self._secrets, now=now, tolerance=self._tolerance)
        return parse_event(body)

    async def charge(
        self, payment_method: str, amount: Money, *, idempotency_key: str, description: str
    ) -> ChargeResult:
        card = payment_method.removeprefix(_SANDBOX_METHOD_PREFIX)
        status, failure = _CHARGE_OUTCOMES.get(card, ("failed", "PAYMENT_DECLINED"))
        # Deterministic per idempotency key, as a real provider's retry of the same key would be.
        payment_id = "pi_sandbox_" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:24]
        return ChargeResult(status, payment_id, failure)

    async def refund(self, provider_payment_id: str, amount: Money, *, idempotency_key: str) -> RefundResult:
        """Every sandbox payment can be refunded; the refund id is the same for the same key."""
        if not provider_payment_id or amount.amount_minor <= 0:
            return RefundResult("failed", "", "nothing to refund")
        refund_id = "re_sandbox_" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:24]
        return RefundResult("succeeded", refund_id)

    def pay(
        self, checkout_id: str, provider_session_id: str, amount: Money, card: str, *, at: datetime
    ) -> tuple[bytes, str]:
        """The webhook (body, signature header) the sandbox sends when the user pays with `card` on
        the checkout `provider_session_id` that billing opened as `checkout_id`."""
        try:
            event_type, failure = _CARD_OUTCOMES[card]
        except KeyError:
            raise InvalidArgument(
                f"The sandbox knows the test cards {', '.join(_CARD_OUTCOMES)}.", reason="INVALID_ARGUMENT"
            ) from None
        payment_id = f"pi_sandbox_{new_id().replace('-', '')}"
        event: dict[str, Any] = {"id": f"evt_sandbox_{new_id().replace('-', '')}", "type": event_type}
        if event_type == "checkout.session.completed":
            event["data"] = {
                "object": {
                    "id": provider_session_id,
                    "client_reference_id": checkout_id,
                    "payment_status": "paid",
                    "payment_intent": payment_id,
                    "amount_total": amount.amount_minor,
                    "currency": amount.currency_code.lower(),
                    "payment_method": _SANDBOX_METHOD_PREFIX + card,
                }
            }
        else:
            intent: dict[str, Any] = {
                "id": payment_id,
                "metadata": {"parley_checkout_id": checkout_id},
            }
            if failure:
                intent["last_payment_error"] = {"code": "card_declined", "decline_code": failure}
            event["data"] = {"object": intent}
        body = json.dumps(event, separators=(",", ":")).encode()
        return body, sign(body, self._secrets[0], at=at)


def require_provider(provider: PaymentProvider | None, unconfigured_reason: str) -> PaymentProvider:
    """The deployment's provider, or UNAVAILABLE (PAYMENT_PROVIDER_UNAVAILABLE) naming what to set."""
    if provider is None:
        raise Unavailable(
            f"Payments are not configured on this deployment: {unconfigured_reason}",
            reason="PAYMENT_PROVIDER_UNAVAILABLE",
        )
    return provider
