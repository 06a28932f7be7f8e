"""The plan claim follows billing through `parley up`: billing starts a new user's subscription on
free and writes `subscription.changed`, auth consumes it (its group `auth`, in process), and the
access token the next refresh mints says "free". An upgrade cannot be made through the API yet; the
change of plan itself is proven in tests/integration/test_plan_claim.py.
"""

from __future__ import annotations

import sqlite3
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import jwt

from parley.events.v1 import events_pb2
from tests.support.outbox import read_events
from tests.support.parley_process import parley_up_serving
from tests.support.polling import eventually_sync

PASSWORD = "amber-lighthouse-quartz-58"


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, f"{response.request.method} {response.request.url}: {response.text}"
    body: dict[str, Any] = response.json()
    return body


def plan_claim(access_token: str) -> str:
    # The signature is the gateway's to check (tests/e2e/test_auth_flows.py); here only the claim counts.
    plan: str = jwt.decode(access_token, options={"verify_signature": False})["plan"]
    return plan


def processed_by_auth(database: Path, event_id: str) -> bool:
    uri = f"{database.resolve().as_uri()}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=10.0)) as connection:
        row = connection.execute(
            "SELECT 1 FROM processed_events WHERE consumer = 'auth' AND event_id = ?", (event_id,)
        ).fetchone()
    return row is not None


def test_a_new_users_refreshed_token_carries_the_plan_billing_started_them_on(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    database = data_dir / "parley.db"
    with (
        parley_up_serving(data_dir, log_path=tmp_path / "parley-up.log") as (process, ports),
        httpx.Client(base_url=f"http://127.0.0.1:{ports.http}", timeout=10.0) as client,
    ):
        email = f"plan-{uuid.uuid4().hex[:10]}@example.com"
        account = {"email": email, "password": PASSWORD}
        registered = ok(client.post("/v1/auth/register", json={**account, "display_name": "Plan"}))
        user_id = registered["user"]["id"]
        tokens = ok(client.post("/v1/auth/login", json=account))["tokens"]

        def started() -> list[events_pb2.Event] | None:
            return read_events(database, "subscription.changed", subject=user_id) or None

        [created] = eventually_sync(
            started, what="billing starting the new user's subscription", alive=process.check_alive
        )
        change = created.subscription_changed
        assert (change.kind, change.plan_id) == (events_pb2.SUBSCRIPTION_CHANGE_KIND_CREATED, "free")
        eventually_sync(
            lambda: processed_by_auth(database, created.id),
            what="auth consuming billing's subscription.changed",
            alive=process.check_alive,
        )

        refreshed = ok(client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}))
        access_token = refreshed["tokens"]["access_token"]
        assert plan_claim(access_token) == "free"
        me = ok(client.get("/v1/users/me", headers={"authorization": f"Bearer {access_token}"}))
        assert me["user"]["plan_id"] == "free"
