"""The `stripe` payment provider: checkouts opened through Stripe's API with the official SDK.

Checkouts are Stripe Checkout Sessions in payment mode, one line item priced inline, so nothing has
to be set up at Stripe beforehand but the webhook endpoint. The session names our checkout twice:
as `client_reference_id`, which `checkout.session.completed` carries back, and as
`payment_intent_data.metadata.parley_checkout_id`, which the payment intent's failure events carry.

Webhooks are checked by `webhook_signatures.verify` and parsed by `parse_event`, exactly as the
sandbox's are; the SDK's own webhook helper is deliberately unused, so one implementation decides
what a valid delivery is.

The SDK talks through its httpx client's async API, so a slow Stripe holds a coroutine, not a
thread. A `StripeClient` of our own carries the key: the SDK's module-level `stripe.api_key` is never
set. What Stripe answers becomes a ParleyError:

- unreachable, timed out, cut off, 5xx or 429: UNAVAILABLE, PAYMENT_PROVIDER_UNAVAILABLE;
- 401 or 403, a key Stripe refuses: the same UNAVAILABLE (the user can do nothing about our
  configuration), with an error in the log that names the setting to fix;
- 402 card errors: FAILED_PRECONDITION with PAYMENT_INSUFFICIENT_FUNDS or PAYMENT_DECLINED, the
  code the contract gives both reasons (common.proto); opening a session charges nothing, so Stripe
  is not expected to answer this way, but a card error means the same wherever it comes from;
- 400 about `success_url` or `cancel_url`: INVALID_ARGUMENT on that field (the caller gave them);
- any other 400 or 404: INTERNAL, logged with Stripe's request id, as we sent what Stripe refuses.

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
from stripe.params.checkout import SessionCreateParams

from services.billing.payments import (
    CheckoutRequest,
    ProviderCheckout,
    ProviderEvent,
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

logger = logging.getLogger(__name__)

# A user waits on the checkout RPC while Stripe opens the session, which it normally does in well
# under a second; these bound how long an unhealthy Stripe can hold them.
DEFAULT_CONNECT_TIMEOUT: Final = timedelta(seconds=5)
DEFAULT_READ_TIMEOUT: Final = timedelta(seconds=20)
# The SDK retries connection failures, 409 and 5xx with backoff. The idempotency key (our checkout
# id) makes a retried create return the session of the first attempt rather than open a second.
DEFAULT_NETWORK_RETRIES: Final = 1
# Caller-supplied parameters of CreateCheckoutSession that Stripe validates for us.
_CALLER_FIELDS: Final = frozenset({"success_url", "cancel_url"})
_API_KEY_SETTING: Final = "PARLEY_BILLING_STRIPE_API_KEY"


class StripePaymentProvider:
    """Checkouts through Stripe's API, and Stripe's webhooks verified with our signing secrets."""

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
        except stripe.StripeError as error:
            raise _refusal(error, request.checkout_id) from None
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
        "payment_intent_data": {"metadata": {"parley_checkout_id": request.checkout_id}},
        "expires_at": int(request.expires_at.timestamp()),
    }
    # Both are optional in our contract; Stripe applies its own rules when they are left out.
    if request.success_url:
        params["success_url"] = request.success_url
    if request.cancel_url:
        params["cancel_url"] = request.cancel_url
    return params


def _refusal(error: stripe.StripeError, checkout_id: str) -> ParleyError:
    """The ParleyError for a failed create, after logging what an operator needs to follow it up."""
    status = error.http_status
    stripe_request = error.request_id or "none"
    if isinstance(error, stripe.CardError):
        decline = (error.error.decline_code if error.error else None) or error.code or ""
        if decline == "insufficient_funds":
            return FailedPrecondition("The card has insufficient funds.", reason="PAYMENT_INSUFFICIENT_FUNDS")
        return FailedPrecondition("The card was declined.", reason="PAYMENT_DECLINED")
    if isinstance(error, stripe.AuthenticationError | stripe.PermissionError):
        logger.error(
            "Stripe refused our API key (HTTP %s, Stripe request %s): check %s",
            status,
            stripe_request,
            _API_KEY_SETTING,
        )
        return _unavailable()
    if isinstance(error, stripe.InvalidRequestError) and error.param in _CALLER_FIELDS:
        return InvalidArgument(
            f"The payment provider refused {error.param}.",
            reason="INVALID_ARGUMENT",
            field_violations=[
                FieldViolation(field=error.param, description="The payment provider refused this URL.")
            ],
        )
    if isinstance(error, stripe.InvalidRequestError | stripe.IdempotencyError):
        logger.error(
            "Stripe refused to open checkout %s: HTTP %s, code %s, param %s, Stripe request %s",
            checkout_id,
            status,
            error.code,
            getattr(error, "param", None),
            stripe_request,
        )
        return Internal("The payment provider refused the checkout.", reason="INTERNAL")
    # APIConnectionError (unreachable, timed out, cut off), APIError (5xx), RateLimitError, and any
    # error class a newer SDK adds: all say "not now" rather than "never".
    cause = type(error.__cause__).__name__ if error.__cause__ is not None else type(error).__name__
    logger.warning(
        "Stripe could not open checkout %s: %s (HTTP %s, Stripe request %s)",
        checkout_id,
        cause,
        status,
        stripe_request,
    )
    return _unavailable()


def _unavailable() -> Unavailable:
    return Unavailable(
        "The payment provider cannot be reached; try again shortly.", reason="PAYMENT_PROVIDER_UNAVAILABLE"
    )
