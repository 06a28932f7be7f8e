"""The plan catalog administered through `parley up`'s gateway: the first admin (bootstrapped with
`parley admin create-admin`) adds a plan and retires it, the public catalog follows, and neither a
signed-in user nor an anonymous caller may change it."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.databases import DIALECTS
from tests.support.parley_process import create_admin, parley_up_serving

PASSWORD = "copper-meadow-signal-73"

PLUS = {
    "id": "plus",
    "display_name": "Plus",
    "description": "Between free and pro.",
    "tier": "PLAN_TIER_PRO",
    "monthly_price": {"currency_code": "USD", "amount_minor": "1000"},
    "included_tokens": "500000",
    "overage_price_per_1k_tokens": {"currency_code": "USD", "amount_minor": "2"},
    "allowed_models": ["parley-local", "gpt-4o-mini"],
    "rate_limit_tier": "pro",
}


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, f"{response.request.method} {response.request.url}: {response.text}"
    body: dict[str, Any] = response.json()
    return body


def reason_of(response: httpx.Response) -> str:
    [info] = [detail for detail in response.json()["details"] if detail["@type"].endswith("ErrorInfo")]
    reason: str = info["reason"]
    return reason


def bearer(client: httpx.Client, email: str) -> dict[str, str]:
    signed_in = ok(client.post("/v1/auth/login", json={"email": email, "password": PASSWORD}))
    return {"authorization": f"Bearer {signed_in['tokens']['access_token']}"}


def offered(client: httpx.Client, **params: str) -> list[str]:
    return [plan["id"] for plan in ok(client.get("/v1/billing/plans", params=params))["plans"]]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_an_admin_adds_and_retires_a_plan_through_the_gateway(
    request: pytest.FixtureRequest, tmp_path: Path, dialect: str
) -> None:
    data_dir = tmp_path / "data"
    # `parley up` on SQLite (its default) and on a fresh PostgreSQL database; the CLI uses the same one.
    env = {"PARLEY_DATA_DIR": str(data_dir)}
    if dialect == "postgresql":
        env["PARLEY_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    with (
        parley_up_serving(data_dir, log_path=tmp_path / "parley-up.log", env=env) as (process, ports),
        httpx.Client(base_url=f"http://127.0.0.1:{ports.http}", timeout=10.0) as client,
    ):
        admin_email = f"root-{uuid.uuid4().hex[:10]}@example.com"
        create_admin(admin_email, PASSWORD, env=env)
        as_admin = bearer(client, admin_email)
        user_email = f"member-{uuid.uuid4().hex[:10]}@example.com"
        ok(
            client.post(
                "/v1/auth/register",
                json={"email": user_email, "password": PASSWORD, "display_name": "Member"},
            )
        )
        as_user = bearer(client, user_email)
        assert offered(client) == ["free", "pro", "team"]

        body = {"request_id": "add-plus", "plan": PLUS}
        for headers, status, reason in (
            ({}, 401, "UNAUTHENTICATED"),
            (as_user, 403, "PERMISSION_DENIED"),
        ):
            refused = client.post("/v1/admin/billing/plans", json=body, headers=headers)
            assert refused.status_code == status, refused.text
            assert reason_of(refused) == reason

        created = ok(client.post("/v1/admin/billing/plans", json=body, headers=as_admin))["plan"]
        assert (created["id"], created["tier"], created["included_tokens"]) == (
            "plus",
            "PLAN_TIER_PRO",
            "500000",
        )
        assert ok(client.post("/v1/admin/billing/plans", json=body, headers=as_admin))["plan"] == created
        assert offered(client) == ["free", "plus", "pro", "team"]

        reused = client.post(
            "/v1/admin/billing/plans",
            json={"request_id": "add-plus", "plan": {**PLUS, "id": "plus-two"}},
            headers=as_admin,
        )
        assert reused.status_code == 409, reused.text
        assert reason_of(reused) == "REQUEST_ID_REUSED"

        invalid = client.post(
            "/v1/admin/billing/plans",
            json={"request_id": "add-bad", "plan": {**PLUS, "id": "Bad Id", "rate_limit_tier": "gold"}},
            headers=as_admin,
        )
        assert invalid.status_code == 400, invalid.text
        assert reason_of(invalid) == "INVALID_ARGUMENT"

        refused = client.post(
            "/v1/admin/billing/plans/plus:retire", json={"request_id": "r"}, headers=as_user
        )
        assert refused.status_code == 403, refused.text
        retired = ok(
            client.post(
                "/v1/admin/billing/plans/plus:retire", json={"request_id": "retire-plus"}, headers=as_admin
            )
        )["plan"]
        assert retired["retired"] is True
        assert "retire_time" in retired
        assert offered(client) == ["free", "pro", "team"]
        assert offered(client, show_retired="true") == ["free", "plus", "pro", "team"]
        assert ok(client.get("/v1/billing/plans/plus"))["plan"] == retired

        free = client.post(
            "/v1/admin/billing/plans/free:retire", json={"request_id": "retire-free"}, headers=as_admin
        )
        assert free.status_code == 400, free.text
        process.check_alive()
