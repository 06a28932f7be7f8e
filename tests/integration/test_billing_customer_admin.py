"""BillingAdminService's customer RPCs over real gRPC and mTLS, on SQLite and PostgreSQL: an admin
looks a user up, adjusts their credit and refunds the pack they paid for at the sandbox; a signed-in
user or an anonymous caller is refused every one of them before anything is read or changed.

The production server chain (`create_server`: identity, caller check, validation, error mapping)
hosts billing's wiring with the sandbox configured; calls come through the gateway's channel with the
identity headers it sets.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import pytest
from google.api import httpbody_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from services.billing.payments import SUCCEEDS, SandboxPaymentProvider
from services.billing.webhook_signatures import SIGNATURE_HEADER
from services.common.db import Database
from services.common.identity import AUTH_METHOD_HEADER, ROLES_HEADER, USER_ID_HEADER, encode_roles_header
from services.common.migrate import upgrade_async
from services.common.money import Money
from tests.support.pki import ServicePki
from tests.support.servers import RunningServer, hosted, rich_status, serving

Metadata = tuple[tuple[str, str], ...]
SECRET = "whsec_customer_admin"


def identity(user_id: str, *roles: str) -> Metadata:
    """What the gateway sets for a caller with an API key holding these roles."""
    return (
        (USER_ID_HEADER, user_id),
        (AUTH_METHOD_HEADER, "api_key"),
        (ROLES_HEADER, encode_roles_header(list(roles))),
    )


ADMIN_ID = str(uuid.uuid4())
AS_ADMIN = identity(ADMIN_ID, "user", "admin")


@dataclass
class Billing:
    running: RunningServer
    # A user billing knows, with a paid credit pack.
    user_id: str
    invoice_id: str

    @property
    def admin(self) -> billing_pb2_grpc.BillingAdminServiceStub:
        return billing_pb2_grpc.BillingAdminServiceStub(self.running.channel)

    @property
    def public(self) -> billing_pb2_grpc.BillingServiceStub:
        return billing_pb2_grpc.BillingServiceStub(self.running.channel)

    @property
    def as_user(self) -> Metadata:
        return identity(self.user_id, "user")


@pytest.fixture
async def billing(
    database_url: str, service_pki: ServicePki, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Billing]:
    monkeypatch.setenv("PARLEY_BILLING_WEBHOOK_SECRETS", SECRET)
    await upgrade_async(database_url)
    database = Database(database_url)
    try:
        async with serving(hosted(["billing"], database), pki=service_pki) as running:
            yield await with_paid_pack(running)
    finally:
        await database.dispose()


async def with_paid_pack(running: RunningServer) -> Billing:
    """A new user who bought the 1M-token pack and paid for it at the sandbox."""
    user_id = str(uuid.uuid4())
    public = billing_pb2_grpc.BillingServiceStub(running.channel)
    opened = await public.CreateCheckoutSession(
        billing_pb2.CreateCheckoutSessionRequest(request_id="buy", credit_pack_id="tokens-1m"),
        metadata=identity(user_id, "user"),
    )
    session = opened.checkout_session
    body, signature = SandboxPaymentProvider([SECRET]).pay(
        session.id, session.provider_session_id, Money("USD", 1_000), SUCCEEDS, at=datetime.now(UTC)
    )
    await public.HandleWebhook(
        billing_pb2.HandleWebhookRequest(
            provider="sandbox", body=httpbody_pb2.HttpBody(content_type="application/json", data=body)
        ),
        metadata=((SIGNATURE_HEADER, signature),),
    )
    [invoice] = (
        await public.ListInvoices(billing_pb2.ListInvoicesRequest(), metadata=identity(user_id, "user"))
    ).invoices
    assert invoice.status == billing_pb2.INVOICE_STATUS_PAID
    return Billing(running, user_id, invoice.id)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    info = rich_status(error)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info


async def refused(call: Awaitable[Message]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


async def test_an_admin_looks_a_customer_up_adjusts_their_credit_and_refunds_their_pack(
    billing: Billing,
) -> None:
    customer = await billing.admin.GetCustomer(
        billing_pb2.GetCustomerRequest(user_id=billing.user_id), metadata=AS_ADMIN
    )
    assert (customer.subscription.user_id, customer.plan.id) == (billing.user_id, "free")
    assert (customer.balance.purchased_tokens, customer.balance.remaining_tokens) == (1_000_000, 1_100_000)

    adjust = billing_pb2.AdjustCreditsRequest(
        request_id="adj-1", user_id=billing.user_id, tokens=-40_000, reason="abuse"
    )
    adjusted = await billing.admin.AdjustCredits(adjust, metadata=AS_ADMIN)
    entry = adjusted.ledger_entry
    assert (entry.kind, entry.purchased_tokens_delta, entry.reason, entry.actor_user_id) == (
        billing_pb2.LEDGER_ENTRY_KIND_ADJUSTMENT,
        -40_000,
        "abuse",
        ADMIN_ID,
    )
    assert adjusted.balance.remaining_tokens == 1_060_000
    assert (await billing.admin.AdjustCredits(adjust, metadata=AS_ADMIN)) == adjusted
    reused = await refused(
        billing.admin.AdjustCredits(
            billing_pb2.AdjustCreditsRequest(
                request_id="adj-1", user_id=billing.user_id, tokens=1, reason="x"
            ),
            metadata=AS_ADMIN,
        )
    )
    assert (reused.code(), error_info(reused).reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")

    refund = billing_pb2.RefundInvoiceRequest(
        request_id="refund-1", user_id=billing.user_id, invoice_id=billing.invoice_id, reason="bought twice"
    )
    credit_note = (await billing.admin.RefundInvoice(refund, metadata=AS_ADMIN)).credit_note
    assert (credit_note.reason, credit_note.status, credit_note.credited_invoice_id, credit_note.memo) == (
        billing_pb2.INVOICE_REASON_CREDIT_NOTE,
        billing_pb2.INVOICE_STATUS_PAID,
        billing.invoice_id,
        "bought twice",
    )
    assert (credit_note.total.amount_minor, credit_note.line_items[0].amount.amount_minor) == (-1_000, -1_000)
    again = await refused(
        billing.admin.RefundInvoice(
            billing_pb2.RefundInvoiceRequest(
                request_id="refund-2", user_id=billing.user_id, invoice_id=billing.invoice_id, reason="again"
            ),
            metadata=AS_ADMIN,
        )
    )
    assert (again.code(), error_info(again).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "INVOICE_NOT_REFUNDABLE",
    )

    ledger = await billing.admin.ListLedgerEntries(
        billing_pb2.ListLedgerEntriesRequest(user_id=billing.user_id, page_size=2), metadata=AS_ADMIN
    )
    assert [entry.purchased_tokens_delta for entry in ledger.ledger_entries] == [-1_000_000, -40_000]
    assert ledger.next_page_token
    invoices = await billing.admin.ListCustomerInvoices(
        billing_pb2.ListCustomerInvoicesRequest(user_id=billing.user_id), metadata=AS_ADMIN
    )
    assert [invoice.id for invoice in invoices.invoices] == [credit_note.id, billing.invoice_id]
    # The user sees the credit note among their own invoices.
    own = await billing.public.ListInvoices(billing_pb2.ListInvoicesRequest(), metadata=billing.as_user)
    assert own.invoices == invoices.invoices
    usage = await billing.public.GetUsage(billing_pb2.GetUsageRequest(), metadata=billing.as_user)
    assert (usage.balance.purchased_tokens, usage.balance.remaining_tokens) == (0, 60_000)


def every_customer_call(billing: Billing) -> list[Callable[[Metadata], Awaitable[Message]]]:
    user_id, invoice_id = billing.user_id, billing.invoice_id
    admin = billing.admin
    return [
        lambda metadata: admin.GetCustomer(
            billing_pb2.GetCustomerRequest(user_id=user_id), metadata=metadata
        ),
        lambda metadata: admin.ListLedgerEntries(
            billing_pb2.ListLedgerEntriesRequest(user_id=user_id), metadata=metadata
        ),
        lambda metadata: admin.ListCustomerInvoices(
            billing_pb2.ListCustomerInvoicesRequest(user_id=user_id), metadata=metadata
        ),
        lambda metadata: admin.AdjustCredits(
            billing_pb2.AdjustCreditsRequest(
                request_id="a", user_id=user_id, tokens=10**9, reason="free money"
            ),
            metadata=metadata,
        ),
        lambda metadata: admin.RefundInvoice(
            billing_pb2.RefundInvoiceRequest(
                request_id="r", user_id=user_id, invoice_id=invoice_id, reason="x"
            ),
            metadata=metadata,
        ),
    ]


@pytest.mark.parametrize(
    ("caller", "code", "reason"),
    [
        ("user", grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
        ("anonymous", grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    ],
)
async def test_only_admins_may_look_customers_up_adjust_or_refund(
    billing: Billing, caller: str, code: grpc.StatusCode, reason: str
) -> None:
    # The customer themself is no admin either.
    metadata = billing.as_user if caller == "user" else ()
    for call in every_customer_call(billing):
        error = await refused(call(metadata))
        assert (error.code(), error_info(error).reason) == (code, reason)

    usage = await billing.public.GetUsage(billing_pb2.GetUsageRequest(), metadata=billing.as_user)
    assert usage.balance.purchased_tokens == 1_000_000
    [invoice] = (
        await billing.public.ListInvoices(billing_pb2.ListInvoicesRequest(), metadata=billing.as_user)
    ).invoices
    assert invoice.status == billing_pb2.INVOICE_STATUS_PAID


async def test_missing_fields_are_required_field_and_an_unknown_user_not_found(billing: Billing) -> None:
    missing = await refused(
        billing.admin.AdjustCredits(billing_pb2.AdjustCreditsRequest(), metadata=AS_ADMIN)
    )
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = rich_status(missing)["BadRequest"]
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    assert sorted(violation.field for violation in bad_request.field_violations) == [
        "reason",
        "request_id",
        "user_id",
    ]
    zero = await refused(
        billing.admin.AdjustCredits(
            billing_pb2.AdjustCreditsRequest(request_id="a", user_id=billing.user_id, tokens=0, reason="x"),
            metadata=AS_ADMIN,
        )
    )
    assert (zero.code(), error_info(zero).reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")

    unknown = await refused(
        billing.admin.GetCustomer(
            billing_pb2.GetCustomerRequest(user_id=str(uuid.uuid4())), metadata=AS_ADMIN
        )
    )
    assert (unknown.code(), error_info(unknown).reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
