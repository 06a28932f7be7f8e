"""Billing through `parley up`'s gateway, as a web client sees it: a new user lands on the free plan
(billing consumed `user.registered`) and reads their subscription and live usage; the internal
service is not routable."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from parley.events.v1 import events_pb2
from services.billing.payments import SUCCEEDS, SandboxPaymentProvider
from services.billing.webhook_signatures import sign
from services.common.money import Money
from tests.support.parley_process import Up
from tests.support.polling import eventually

PASSWORD = "amber-lighthouse-quartz-58"


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, f"{response.request.method} {response.request.url}: {response.text}"
    body: dict[str, Any] = response.json()
    return body


def reason_of(response: httpx.Response) -> str:
    [info] = [detail for detail in response.json()["details"] if detail["@type"].endswith("ErrorInfo")]
    reason: str = info["reason"]
    return reason


async def test_a_new_user_is_on_free_and_reads_subscription_and_usage_through_the_gateway(up: Up) -> None:
    process, client = up.process, up.client
    email = f"billing-{uuid.uuid4().hex[:10]}@example.com"
    registered = ok(
        client.post(
            "/v1/auth/register", json={"email": email, "password": PASSWORD, "display_name": "Billing"}
        )
    )
    user_id = registered["user"]["id"]

    # No billing call has been made: the subscription comes from consuming user.registered.
    async def started() -> list[events_pb2.Event] | None:
        return await up.events("subscription.changed", user_id) or None

    [created] = await eventually(
        started, what="billing starting the new user's subscription", alive=process.check_alive
    )
    assert created.source == "billing"
    assert created.subscription_changed.plan_id == "free"

    anonymous = client.get("/v1/billing/usage")
    assert anonymous.status_code == 401
    assert reason_of(anonymous) == "UNAUTHENTICATED"

    login = ok(client.post("/v1/auth/login", json={"email": email, "password": PASSWORD}))
    headers = {"authorization": f"Bearer {login['tokens']['access_token']}"}
    subscription = ok(client.get("/v1/billing/subscription", headers=headers))
    assert subscription["subscription"]["user_id"] == user_id
    assert subscription["subscription"]["plan_id"] == "free"
    assert subscription["subscription"]["status"] == "SUBSCRIPTION_STATUS_ACTIVE"
    assert subscription["plan"]["hard_stop"] is True

    usage = ok(client.get("/v1/billing/usage", headers=headers))
    balance = usage["balance"]
    # int64 fields are JSON strings (proto3 JSON mapping).
    assert (balance["included_tokens"], balance["remaining_tokens"]) == ("100000", "100000")
    assert balance["period_start_time"] == subscription["subscription"]["current_period_start_time"]
    assert usage.get("models", []) == []

    internal = client.post(
        "/parley.billing.v1.BillingInternalService/ReserveCredits",
        json={
            "request_id": "r",
            "user_id": user_id,
            "estimate": {"model": "parley-local", "input_tokens": 1},
        },
        headers={**headers, "content-type": "application/json"},
    )
    assert internal.status_code == 404
    assert reason_of(internal) == "ROUTE_NOT_FOUND"


def test_a_top_up_is_paid_by_a_signed_webhook_through_the_gateway_and_credited_at_once(up: Up) -> None:
    client, data_dir = up.client, up.data_dir
    email = f"top-up-{uuid.uuid4().hex[:10]}@example.com"
    ok(client.post("/v1/auth/register", json={"email": email, "password": PASSWORD, "display_name": "Top"}))
    login = ok(client.post("/v1/auth/login", json={"email": email, "password": PASSWORD}))
    headers = {"authorization": f"Bearer {login['tokens']['access_token']}"}

    packs = ok(client.get("/v1/billing/credit-packs"))
    assert [pack["id"] for pack in packs["credit_packs"]] == ["tokens-1m", "tokens-5m"]
    opened = ok(
        client.post(
            "/v1/billing/checkout",
            json={"request_id": "buy-1", "credit_pack_id": "tokens-1m"},
            headers=headers,
        )
    )["checkout_session"]
    assert opened["status"] == "CHECKOUT_SESSION_STATUS_OPEN"
    assert (opened["amount"]["currency_code"], opened["amount"]["amount_minor"]) == ("USD", "1000")

    # What the sandbox sends when the user pays: signed with the secret `parley up` made.
    secret = (data_dir / "secrets" / "billing-webhook").read_text().strip()
    sandbox = SandboxPaymentProvider([secret])
    body, signature = sandbox.pay(
        opened["id"], opened["provider_session_id"], Money("USD", 1_000), SUCCEEDS, at=datetime.now(UTC)
    )
    webhook = {"content-type": "application/json", "stripe-signature": signature}

    tampered = client.post(
        "/v1/billing/webhooks/sandbox", content=body.replace(b"1000", b"1001"), headers=webhook
    )
    assert tampered.status_code == 400, tampered.text
    assert reason_of(tampered) == "WEBHOOK_SIGNATURE_INVALID"
    stale_signature = sign(body, secret, at=datetime.now(UTC) - timedelta(minutes=6))
    stale = client.post(
        "/v1/billing/webhooks/sandbox",
        content=body,
        headers={**webhook, "stripe-signature": stale_signature},
    )
    assert stale.status_code == 400, stale.text
    assert reason_of(stale) == "WEBHOOK_SIGNATURE_EXPIRED"
    assert ok(client.get("/v1/billing/usage", headers=headers))["balance"].get("purchased_tokens", "0") == "0"

    applied = ok(client.post("/v1/billing/webhooks/sandbox", content=body, headers=webhook))
    assert applied["duplicate"] is False
    replayed = ok(client.post("/v1/billing/webhooks/sandbox", content=body, headers=webhook))
    assert (replayed["event_id"], replayed["duplicate"]) == (applied["event_id"], True)

    balance = ok(client.get("/v1/billing/usage", headers=headers))["balance"]
    assert (balance["purchased_tokens"], balance["remaining_tokens"]) == ("1000000", "1100000")
    [invoice] = ok(client.get("/v1/billing/invoices", headers=headers))["invoices"]
    assert (invoice["status"], invoice["reason"]) == ("INVOICE_STATUS_PAID", "INVOICE_REASON_TOP_UP")
    assert (invoice["total"]["currency_code"], invoice["total"]["amount_minor"]) == ("USD", "1000")
    assert ok(client.get(f"/v1/billing/invoices/{invoice['id']}", headers=headers))["invoice"] == invoice


def sign_up(client: httpx.Client, name: str) -> dict[str, str]:
    """A new user's bearer header."""
    email = f"{name}-{uuid.uuid4().hex[:10]}@example.com"
    ok(client.post("/v1/auth/register", json={"email": email, "password": PASSWORD, "display_name": name}))
    login = ok(client.post("/v1/auth/login", json={"email": email, "password": PASSWORD}))
    return {"authorization": f"Bearer {login['tokens']['access_token']}"}


def test_upgrade_cancel_and_resume_through_the_gateway(up: Up) -> None:
    client = up.client
    headers = sign_up(client, "Changer")
    change = ok(
        client.post(
            "/v1/billing/subscription:change", json={"request_id": "up-1", "plan_id": "pro"}, headers=headers
        )
    )
    assert change["subscription"]["plan_id"] == "free"
    assert change["invoice"]["reason"] == "INVOICE_REASON_UPGRADE"
    session = change["checkout_session"]
    amount = Money(session["amount"]["currency_code"], int(session["amount"]["amount_minor"]))
    secret = (up.data_dir / "secrets" / "billing-webhook").read_text().strip()
    body, signature = SandboxPaymentProvider([secret]).pay(
        session["id"], session["provider_session_id"], amount, SUCCEEDS, at=datetime.now(UTC)
    )
    ok(
        client.post(
            "/v1/billing/webhooks/sandbox",
            content=body,
            headers={"content-type": "application/json", "stripe-signature": signature},
        )
    )
    subscription = ok(client.get("/v1/billing/subscription", headers=headers))
    assert (subscription["subscription"]["plan_id"], subscription["plan"]["hard_stop"]) == ("pro", False)

    cancelled = ok(
        client.post("/v1/billing/subscription:cancel", json={"request_id": "c-1"}, headers=headers)
    )
    assert cancelled["subscription"]["cancel_at_period_end"] is True
    resumed = ok(client.post("/v1/billing/subscription:resume", json={"request_id": "r-1"}, headers=headers))
    assert resumed["subscription"]["cancel_at_period_end"] is False
    again = client.post("/v1/billing/subscription:resume", json={"request_id": "r-2"}, headers=headers)
    assert again.status_code == 400, again.text
    assert reason_of(again) == "SUBSCRIPTION_NOT_CANCELLING"

    down = ok(
        client.post(
            "/v1/billing/subscription:change", json={"request_id": "down", "plan_id": "free"}, headers=headers
        )
    )
    assert (down["subscription"]["plan_id"], down["subscription"]["pending_plan_id"]) == ("pro", "free")
    assert down["effective_time"] == down["subscription"]["current_period_end_time"]
    unknown = client.post(
        "/v1/billing/subscription:change", json={"request_id": "x", "plan_id": "platinum"}, headers=headers
    )
    assert unknown.status_code == 404, unknown.text
    assert reason_of(unknown) == "PLAN_NOT_FOUND"
