"""The plan claim follows billing through `parley up`'s gateway, on SQLite and on PostgreSQL: a new
user's subscription starts on free and their refreshed token says "free"; they upgrade to pro, pay
at the sandbox's checkout (its signed webhook), and the next refresh mints a token that says "pro",
once auth consumed billing's `subscription.changed` (its group `auth`, in process).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
from sqlalchemy import select

from parley.events.v1 import events_pb2
from services.billing.payments import SUCCEEDS, SandboxPaymentProvider
from services.common.db import Database
from services.common.money import Money
from services.common.processed_events import ProcessedEvent
from tests.support.domain import outbox
from tests.support.parley_process import Up
from tests.support.polling import eventually

PASSWORD = "amber-lighthouse-quartz-58"


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, f"{response.request.method} {response.request.url}: {response.text}"
    body: dict[str, Any] = response.json()
    return body


def plan_claim(access_token: str) -> str:
    # Signatures are the gateway's to check (and tests/e2e/test_auth_flows.py's); here the claim counts.
    plan: str = jwt.decode(access_token, options={"verify_signature": False})["plan"]
    return plan


async def consumed_by_auth(up: Up, user_id: str, kind: events_pb2.SubscriptionChangeKind.ValueType) -> bool:
    """Whether billing wrote a `subscription.changed` of `kind` for the user and auth processed it."""
    database = Database(up.database_url)
    try:
        written = [
            item.event.id
            for item in await outbox(database, "subscription.changed")
            if item.subject == user_id and item.event.subscription_changed.kind == kind
        ]
        async with database.unit_of_work(read_only=True) as session:
            processed = set(
                await session.scalars(
                    select(ProcessedEvent.event_id).where(ProcessedEvent.consumer == "auth")
                )
            )
    finally:
        await database.dispose()
    return bool(written) and set(written) <= processed


async def test_the_refreshed_token_carries_the_plan_from_free_to_a_paid_upgrade(up: Up) -> None:
    client = up.client
    account = {"email": f"plan-{uuid.uuid4().hex[:10]}@example.com", "password": PASSWORD}
    user_id = ok(client.post("/v1/auth/register", json={**account, "display_name": "Plan"}))["user"]["id"]
    tokens = ok(client.post("/v1/auth/login", json=account))["tokens"]

    async def consumed(kind: events_pb2.SubscriptionChangeKind.ValueType) -> bool:
        return await consumed_by_auth(up, user_id, kind)

    # Billing starts the new user on free (it consumed user.registered), and auth follows.
    await eventually(
        lambda: consumed(events_pb2.SUBSCRIPTION_CHANGE_KIND_CREATED),
        what="auth consuming the subscription billing started",
        alive=up.process.check_alive,
    )
    tokens = ok(client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}))["tokens"]
    assert plan_claim(tokens["access_token"]) == "free"
    before_upgrade = tokens["access_token"]
    headers = {"authorization": f"Bearer {before_upgrade}"}

    change = ok(
        client.post(
            "/v1/billing/subscription:change", json={"request_id": "up-1", "plan_id": "pro"}, headers=headers
        )
    )
    checkout = change["checkout_session"]
    # What the sandbox sends when the user pays: signed with the secret `parley up` made.
    secret = (up.data_dir / "secrets" / "billing-webhook").read_text().strip()
    amount = Money(checkout["amount"]["currency_code"], int(checkout["amount"]["amount_minor"]))
    body, signature = SandboxPaymentProvider([secret]).pay(
        checkout["id"], checkout["provider_session_id"], amount, SUCCEEDS, at=datetime.now(UTC)
    )
    ok(
        client.post(
            "/v1/billing/webhooks/sandbox",
            content=body,
            headers={"content-type": "application/json", "stripe-signature": signature},
        )
    )
    await eventually(
        lambda: consumed(events_pb2.SUBSCRIPTION_CHANGE_KIND_UPGRADED),
        what="auth consuming the upgrade",
        alive=up.process.check_alive,
    )

    tokens = ok(client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}))["tokens"]
    assert plan_claim(tokens["access_token"]) == "pro"
    upgraded = {"authorization": f"Bearer {tokens['access_token']}"}
    assert ok(client.get("/v1/users/me", headers=upgraded))["user"]["plan_id"] == "pro"
    assert ok(client.get("/v1/billing/subscription", headers=upgraded))["subscription"]["plan_id"] == "pro"
    # The token minted before the upgrade still works and still says free: a plan change revokes nothing.
    assert plan_claim(before_upgrade) == "free"
    assert ok(client.get("/v1/users/me", headers=headers))["user"]["id"] == user_id
