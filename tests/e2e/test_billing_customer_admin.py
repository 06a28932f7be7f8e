"""Customer administration through `parley up`'s gateway: the first admin (bootstrapped with
`parley admin create-admin`) looks up a user who bought a credit pack at the sandbox, adjusts their
credit, reads their ledger and refunds the pack; the user sees the credit note, and may call none of
the admin routes themself."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.billing.payments import SUCCEEDS, SandboxPaymentProvider
from services.common.money import Money
from tests.support.databases import DIALECTS
from tests.support.parley_process import create_admin, parley_up_serving

PASSWORD = "copper-meadow-signal-73"


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


def buy_a_pack(client: httpx.Client, headers: dict[str, str], data_dir: Path) -> None:
    """Buy the 1M-token pack and pay at the sandbox with the webhook secret `parley up` made."""
    session = ok(
        client.post(
            "/v1/billing/checkout", json={"request_id": "buy", "credit_pack_id": "tokens-1m"}, headers=headers
        )
    )["checkout_session"]
    secret = (data_dir / "secrets" / "billing-webhook").read_text().strip()
    body, signature = SandboxPaymentProvider([secret]).pay(
        session["id"], session["provider_session_id"], Money("USD", 1_000), SUCCEEDS, at=datetime.now(UTC)
    )
    ok(
        client.post(
            "/v1/billing/webhooks/sandbox",
            content=body,
            headers={"content-type": "application/json", "stripe-signature": signature},
        )
    )


@pytest.mark.parametrize("dialect", DIALECTS)
def test_an_admin_adjusts_a_customers_credit_and_refunds_their_pack_through_the_gateway(
    request: pytest.FixtureRequest, tmp_path: Path, dialect: str
) -> None:
    data_dir = tmp_path / "data"
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
        user_id = ok(
            client.post(
                "/v1/auth/register",
                json={"email": user_email, "password": PASSWORD, "display_name": "Member"},
            )
        )["user"]["id"]
        as_user = bearer(client, user_email)
        buy_a_pack(client, as_user, data_dir)
        [invoice] = ok(client.get("/v1/billing/invoices", headers=as_user))["invoices"]
        customer_path = f"/v1/admin/billing/customers/{user_id}"
        refund_path = f"{customer_path}/invoices/{invoice['id']}:refund"

        for headers, status, reason in (({}, 401, "UNAUTHENTICATED"), (as_user, 403, "PERMISSION_DENIED")):
            for refused in (
                client.get(customer_path, headers=headers),
                client.get(f"{customer_path}/ledger-entries", headers=headers),
                client.get(f"{customer_path}/invoices", headers=headers),
                client.post(
                    f"{customer_path}:adjustCredits",
                    json={"request_id": "a", "tokens": "1000000000", "reason": "free money"},
                    headers=headers,
                ),
                client.post(refund_path, json={"request_id": "r", "reason": "x"}, headers=headers),
            ):
                assert refused.status_code == status, refused.text
                assert reason_of(refused) == reason

        customer = ok(client.get(customer_path, headers=as_admin))
        assert (customer["subscription"]["user_id"], customer["plan"]["id"]) == (user_id, "free")
        assert customer["balance"]["purchased_tokens"] == "1000000"

        adjust = {"request_id": "adj-1", "tokens": "250000", "reason": "outage on Tuesday"}
        adjusted = ok(client.post(f"{customer_path}:adjustCredits", json=adjust, headers=as_admin))
        entry = adjusted["ledger_entry"]
        assert (entry["kind"], entry["purchased_tokens_delta"], entry["reason"]) == (
            "LEDGER_ENTRY_KIND_ADJUSTMENT",
            "250000",
            "outage on Tuesday",
        )
        assert adjusted["balance"]["remaining_tokens"] == "1350000"
        assert ok(client.post(f"{customer_path}:adjustCredits", json=adjust, headers=as_admin)) == adjusted
        reused = client.post(
            f"{customer_path}:adjustCredits", json={**adjust, "tokens": "1"}, headers=as_admin
        )
        assert reused.status_code == 409, reused.text
        assert reason_of(reused) == "REQUEST_ID_REUSED"

        ledger = ok(
            client.get(f"{customer_path}/ledger-entries", params={"page_size": "2"}, headers=as_admin)
        )
        assert [item["kind"] for item in ledger["ledger_entries"]] == [
            "LEDGER_ENTRY_KIND_ADJUSTMENT",
            "LEDGER_ENTRY_KIND_TOP_UP",
        ]
        assert ledger["ledger_entries"][0]["actor_user_id"] == entry["actor_user_id"] != ""
        assert ledger["next_page_token"]

        refund = {"request_id": "refund-1", "reason": "bought by mistake"}
        credit_note = ok(client.post(refund_path, json=refund, headers=as_admin))["credit_note"]
        assert (credit_note["reason"], credit_note["status"], credit_note["credited_invoice_id"]) == (
            "INVOICE_REASON_CREDIT_NOTE",
            "INVOICE_STATUS_PAID",
            invoice["id"],
        )
        assert credit_note["total"]["amount_minor"] == "-1000"
        assert ok(client.post(refund_path, json=refund, headers=as_admin))["credit_note"] == credit_note
        twice = client.post(refund_path, json={**refund, "request_id": "refund-2"}, headers=as_admin)
        assert twice.status_code == 400, twice.text  # FAILED_PRECONDITION maps to 400
        assert reason_of(twice) == "INVOICE_NOT_REFUNDABLE"

        listed = ok(client.get(f"{customer_path}/invoices", headers=as_admin))["invoices"]
        assert [item["id"] for item in listed] == [credit_note["id"], invoice["id"]]
        assert ok(client.get("/v1/billing/invoices", headers=as_user))["invoices"] == listed
        balance = ok(client.get("/v1/billing/usage", headers=as_user))["balance"]
        assert balance["remaining_tokens"] == "350000"

        unknown = client.get(f"/v1/admin/billing/customers/{uuid.uuid4()}", headers=as_admin)
        assert unknown.status_code == 404, unknown.text
        process.check_alive()
