"""The `stripe` payment provider: checkouts and saved-card charges through Stripe's official SDK.

Checkouts are Stripe Checkout Sessions in payment mode, one line item priced inline, so nothing has
to be set up at Stripe beforehand but the webhook endpoint. The session names our checkout twice:
as `client_reference_id`, which `checkout.session.completed` carries back, and as
`payment_intent_data.metadata.parley_checkout_id`, which the payment intent's failure events carry.
It also creates a customer and keeps the card for off-session use, which is what `charge` (renewals)
needs: an off-session PaymentIntent on that card and its customer, confirmed at once. A refund (an
admin's RefundInvoice) is a Refund of the payment's PaymentIntent, for the amount paid.

Webhooks are checked by `webhook_signatures.verify` and parsed by `parse_event`, exactly as the
sandbox's are; the SDK's own webhook helper is deliberately unused, so one implementation decides
what a valid delivery is.

The SDK talks through its httpx client's async API, so a slow Stripe holds a coroutine, not a
thread. A `StripeClient` of our own carries the key: the SDK's module-level `stripe.api_key` is never
set. What Stripe answers becomes a ParleyError or a charge's outcome:

- unreachable, timed out, cut off, 5xx or 429: UNAVAILABLE, PAYMENT_PROVIDER_UNAVAILABLE;
- 401 or 403, a key Stripe refuses: the same UNAVAILABLE (the user can do nothing about our
  configuration), with an error in the log that names the setting to fix;
- 402 card errors: a failed charge with PAYMENT_INSUFFICIENT_FUNDS or PAYMENT_DECLINED (or one that
  requires action, when the bank wants the user to authenticate). Opening a session charges nothing,
  so Stripe is not expected to answer it with a card error; if it does, the error is
  FAILED_PRECONDITION with the same reasons, the code the contract gives both (common.proto);
- other 400 and 404 answers: for a checkout, INVALID_ARGUMENT on `success_url` or `cancel_url` when
  Stripe names one of them (the caller gave them), else INTERNAL, logged with Stripe's request id,
  as we sent what Stripe refuses; for a charge, a declined charge (the saved card is gone); for a
  refund, a refused refund with Stripe's code (the payment is refunded already, disputed, or gone).

Neither our errors nor our log lines include the API key or Stripe's messages. Stripe's messages
about keys quote a masked key, and they still stay out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Final

import httpx
import stripe
from pydantic import SecretStr
from stripe.params import PaymentIntentCreateParams, RefundCreateParams
from stripe.params.checkout import SessionCreateParams

from services.billing.payments import (
    ChargeResult,
    CheckoutRequest,
    ProviderCheckout,
    ProviderEvent,
    RefundResult,
    check_body_size,
    parse_event,
)
from services.billing.webhook_signatures import DEFAULT_TOLERANCE, verify
from services.common.errors import (
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    ParleyError,
    Unavailable,
)
from services.common.money import Money

logger = logging.getLogger(__name__)

# A user waits on the checkout RPC while Stripe opens the session, which it normally does in well
# under a second; these bound how long an unhealthy Stripe can hold them.
DEFAULT_CONNECT_TIMEOUT: Final = timedelta(seconds=5)
DEFAULT_READ_TIMEOUT: Final = timedelta(seconds=20)
# The SDK retries connection failures, 409 and 5xx with backoff. Every create carries an idempotency
# key (the checkout id, or the caller's for a charge or a refund), so a retry returns what the first
# attempt made rather than open a second session, charge twice or refund twice.
DEFAULT_NETWORK_RETRIES: Final = 1
# Caller-supplied parameters of CreateCheckoutSession that Stripe validates for us.
_CALLER_FIELDS: Final = frozenset({"success_url", "cancel_url"})
_API_KEY_SETTING: Final = "PARLEY_BILLING_STRIPE_API_KEY"


class StripePaymentProvider:
    """Checkouts and charges through Stripe's API, and Stripe's webhooks verified with our secrets."""

    name: Final = "stripe"

    def __init__(
        self,
        api_key: SecretStr,
        webhook_secrets: Sequence[str],
        *,
        api_base: str | None = None,
        connect_timeout: timedelta = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: timedelta = DEFAULT_READ_TIMEOUT,
        max_network_retries: int = DEFAULT_NETWORK_RETRIES,
        tolerance: timedelta = DEFAULT_TOLERANCE,
    ) -> None:
        if not api_key.get_secret_value():
            raise ValueError("Stripe needs the account's secret API key")
        if not webhook_secrets or not all(webhook_secrets):
            raise ValueError("Stripe signs its webhooks: give at least one signing secret, none empty")
        if connect_timeout <= timedelta(0) or read_timeout <= timedelta(0):
            raise ValueError("the Stripe timeouts must be positive")
        if max_network_retries < 0:
            raise ValueError("max_network_retries cannot be negative")
        self._secrets = tuple(webhook_secrets)
        self._tolerance = tolerance
        self._http = stripe.HTTPXClient(
            timeout=httpx.Timeout(read_timeout.total_seconds(), connect=connect_timeout.total_seconds())
        )
        self._client = stripe.StripeClient(
            api_key.get_secret_value(),
            base_addresses={"api": api_base.rstrip("/")} if api_base else None,
            max_network_retries=max_network_retries,
            http_client=self._http,
        )

    async def create_checkout(self, request: CheckoutRequest) -> ProviderCheckout:
        try:
            session = await self._client.v1.checkout.sessions.create_async(
                _session_params(request), {"idempotency_key": request.checkout_id}
            )
        except stripe.CardError as error:
            raise _declined(error) from None
        except stripe.InvalidRequestError as error:
            raise _refused_checkout(error, request.checkout_id) from None
        except stripe.StripeError as error:
            raise _unavailable(error, f"open checkout {request.checkout_id}") from None
        if not session.id or not session.url:
            logger.error(
                "Stripe opened checkout session %s for checkout %s without a URL to send the user to",
                session.id,
                request.checkout_id,
            )
            raise Unavailable(
                "The payment provider did not return a checkout page; try again shortly.",
                reason="PAYMENT_PROVIDER_UNAVAILABLE",
            )
        return ProviderCheckout(session.id, session.url)

    async def charge(
        self, payment_method: str, amount: Money, *, idempotency_key: str, description: str
    ) -> ChargeResult:
        """An off-session PaymentIntent, confirmed at once, on the saved method and its customer."""
        try:
            # A saved card belongs to the customer its checkout created, and Stripe charges it only
            # together with that customer.
            method = await self._client.v1.payment_methods.retrieve_async(payment_method)
            params: PaymentIntentCreateParams = {
                "amount": amount.amount_minor,
                "currency": amount.currency_code.lower(),
                "payment_method": payment_method,
                "off_session": True,
                "confirm": True,
                "description": description,
            }
            if method.customer is not None:
                params["customer"] = (
                    method.customer if isinstance(method.customer, str) else method.customer.id
                )
            intent = await self._client.v1.payment_intents.create_async(
                params, {"idempotency_key": idempotency_key}
            )
        except stripe.CardError as error:
            attempt = error.error.payment_intent if error.error else None
            payment_id = attempt.id if attempt is not None else ""
            if error.code == "authentication_required":
                return ChargeResult("requires_action", payment_id)
            return ChargeResult("failed", payment_id, _decline_reason(error))
        except (stripe.InvalidRequestError, stripe.IdempotencyError) as error:
            # The saved method is gone (detached, deleted) or unusable: the user has to pay again,
            # which dunning asks them to do.
            logger.warning(
                "Stripe refused to charge the saved payment method: HTTP %s, code %s, Stripe request %s",
                error.http_status,
                error.code,
                error.request_id or "none",
            )
            return ChargeResult("failed", "", "PAYMENT_DECLINED")
        except stripe.StripeError as error:
            raise _unavailable(error, f"charge for {idempotency_key}") from None
        if intent.status == "succeeded":
            return ChargeResult("succeeded", intent.id)
        if intent.status == "requires_action":
            return ChargeResult("requires_action", intent.id)
        # Cards settle at once; an asynchronous method (a bank debit) would still be "processing".
        logger.warning("Stripe left the charge %s %s; it counts as declined", intent.id, intent.status)
        return ChargeResult("failed", intent.id, "PAYMENT_DECLINED")

    async def refund(self, provider_payment_id: str, amount: Money, *, idempotency_key: str) -> RefundResult:
        """A Refund of the payment's PaymentIntent (our payments' provider ids are PaymentIntent ids)."""
        params: RefundCreateParams = {"payment_intent": provider_payment_id, "amount": amount.amount_minor}
        try:
            refund = await self._client.v1.refunds.create_async(params, {"idempotency_key": idempotency_key})
        except (stripe.InvalidRequestError, stripe.IdempotencyError, stripe.CardError) as error:
            # Refunded already (at Stripe's dashboard, say), disputed, or the intent is unknown:
            # retrying cannot change that, so it is a refusal for the admin to look into.
            logger.warning(
                "Stripe refused to refund %s: HTTP %s, code %s, Stripe request %s",
                provider_payment_id,
                error.http_status,
                error.code,
                error.request_id or "none",
            )
            return RefundResult("failed", "", error.code or "refused")
        except stripe.StripeError as error:
            raise _unavailable(error, f"refund {provider_payment_id}") from None
        if refund.status == "succeeded":
            return RefundResult("succeeded", refund.id)
        if refund.status in ("pending", "requires_action"):
            # Card refunds that Stripe finishes later; a later failure is not reported back yet.
            logger.info(
                "Stripe accepted refund %s of %s as %s", refund.id, provider_payment_id, refund.status
            )
            return RefundResult("pending", refund.id)
        return RefundResult("failed", refund.id, refund.failure_reason or refund.status or "failed")

    def verify_event(self, body: bytes, signature_header: str | None, *, now: datetime) -> ProviderEvent:
        check_body_size(body)
        verify(body, signature_header, self._secrets, now=now, tolerance=self._tolerance)
        return parse_event(body)

    async def aclose(self) -> None:
        """Close the connections to Stripe (at shutdown)."""
        await self._http.close_async()


def _session_params(request: CheckoutRequest) -> SessionCreateParams:
    params: SessionCreateParams = {
        "mode": "payment",
        "line_items": [
            {
                "quantity": 1,
                "price_data": {
                    "currency": request.amount.currency_code.lower(),
                    "unit_amount": request.amount.amount_minor,
                    "product_data": {"name": request.description},
                },
            }
        ],
        "client_reference_id": request.checkout_id,
        # A customer to keep the card on, and the card kept for off-session charges (renewals).
        "customer_creation": "always",
        "payment_intent_data": {
            "metadata": {"parley_checkout_id": request.checkout_id},
            "setup_future_usage": "off_session",
        },
        "expires_at": int(request.expires_at.timestamp()),
    }
    # Both are optional in our contract; Stripe applies its own rules when they are left out.
    if request.success_url:
        params["success_url"] = request.success_url
    if request.cancel_url:
        params["cancel_url"] = request.cancel_url
    return params


def _decline_reason(error: stripe.CardError) -> str:
    decline = (error.error.decline_code if error.error else None) or error.code or ""
    return "PAYMENT_INSUFFICIENT_FUNDS" if decline == "insufficient_funds" else "PAYMENT_DECLINED"


def _declined(error: stripe.CardError) -> ParleyError:
    if _decline_reason(error) == "PAYMENT_INSUFFICIENT_FUNDS":
        return FailedPrecondition("The card has insufficient funds.", reason="PAYMENT_INSUFFICIENT_FUNDS")
    return FailedPrecondition("The card was declined.", reason="PAYMENT_DECLINED")


def _refused_checkout(error: stripe.InvalidRequestError, checkout_id: str) -> ParleyError:
    if error.param in _CALLER_FIELDS:
        return InvalidArgument(
            f"The payment provider refused {error.param}.",
            reason="INVALID_ARGUMENT",
            field_violations=[
                FieldViolation(field=error.param, description="The payment provider refused this URL.")
            ],
        )
    logger.error(
        "Stripe refused to open checkout %s: HTTP %s, code %s, param %s, Stripe request %s",
        checkout_id,
        error.http_status,
        error.code,
        error.param,
        error.request_id or "none",
    )
    return Internal("The payment provider refused the checkout.", reason="INTERNAL")


def _unavailable(error: stripe.StripeError, doing: str) -> Unavailable:
    """UNAVAILABLE for every failure that says "not now" rather than "never", after logging it."""
    status = error.http_status
    stripe_request = error.request_id or "none"
    if isinstance(error, stripe.AuthenticationError | stripe.PermissionError):
        logger.error(
            "Stripe refused our API key (HTTP %s, Stripe request %s): check %s",
            status,
            stripe_request,
            _API_KEY_SETTING,
        )
    else:
        # APIConnectionError (unreachable, timed out, cut off), APIError (5xx), RateLimitError, and
        # any error class a newer SDK adds.
        cause = type(error.__cause__ or error).__name__
        logger.warning(
            "Stripe could not %s: %s (HTTP %s, Stripe request %s)", doing, cause, status, stripe_request
        )
    return Unavailable(
        "The payment provider cannot be reached; try again shortly.", reason="PAYMENT_PROVIDER_UNAVAILABLE"
    )
