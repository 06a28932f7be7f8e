"""BillingService over gRPC: decode, call the domain, encode."""

from __future__ import annotations

from datetime import datetime
from typing import Final

import grpc
from google.protobuf.message import Message

from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from parley.common.v1 import common_pb2
from services.billing.checkout import Checkout, CheckoutSession
from services.billing.customer_admin import CustomerAdmin, LedgerRecord
from services.billing.invoices import INVOICE_REASONS, Invoice, InvoiceBook, InvoiceStatus
from services.billing.ledger import CreditAccount, CreditLedger, EntryKind, Estimate, Reservation, Usage
from services.billing.plan_admin import PlanAdmin, PlanDraft, PriceDraft
from services.billing.plans import Plan, PlanCatalog, plan_tier_from_proto, plan_tier_to_proto
from services.billing.subscriptions import Subscription, SubscriptionManager, subscription_status_to_proto
from services.billing.webhook_signatures import SIGNATURE_HEADER
from services.common.call_context import current_identity
from services.common.encoding import money_to_proto, timestamp_to_proto
from services.common.errors import FieldViolation, InvalidArgument
from services.common.http_cache import CATALOG_CACHE, send_cache_headers
from services.common.money import Money
from services.common.roles import ROLE_ADMIN


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    """The public billing API; RPCs not overridden here answer UNIMPLEMENTED until they are built."""

    def __init__(
        self,
        catalog: PlanCatalog,
        subscriptions: SubscriptionManager,
        ledger: CreditLedger,
        checkout: Checkout,
        invoices: InvoiceBook,
    ) -> None:
        self._catalog = catalog
        self._subscriptions = subscriptions
        self._ledger = ledger
        self._checkout = checkout
        self._invoices = invoices

    async def ListPlans(
        self, request: billing_pb2.ListPlansRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.ListPlansResponse:
        page = await self._catalog.list_plans(
            page_size=request.page_size, page_token=request.page_token, include_retired=request.show_retired
        )
        reply = billing_pb2.ListPlansResponse(
            plans=[plan_to_proto(plan) for plan in page.items], next_page_token=page.next_page_token
        )
        return await send_cache_headers(context, reply, CATALOG_CACHE)

    async def GetPlan(
        self, request: billing_pb2.GetPlanRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetPlanResponse:
        plan = await self._catalog.get_plan(request.plan_id)
        reply = billing_pb2.GetPlanResponse(plan=plan_to_proto(plan))
        return await send_cache_headers(context, reply, CATALOG_CACHE)

    async def GetSubscription(
        self, request: billing_pb2.GetSubscriptionRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetSubscriptionResponse:
        caller = current_identity.get().require_user()
        subscription, plan = await self._subscriptions.current(caller.user_id)
        return billing_pb2.GetSubscriptionResponse(
            subscription=subscription_to_proto(subscription), plan=plan_to_proto(plan)
        )

    async def GetUsage(
        self, request: billing_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetUsageResponse:
        caller = current_identity.get().require_user()
        usage = await self._ledger.usage(caller.user_id)
        return billing_pb2.GetUsageResponse(
            balance=balance_to_proto(usage.account),
            models=[
                billing_pb2.ModelUsage(
                    model=model.usage.model,
                    input_tokens=model.usage.input_tokens,
                    output_tokens=model.usage.output_tokens,
                    requests=model.usage.requests,
                    cost=money_to_proto(model.cost),
                )
                for model in usage.models
            ],
            overage_cost=money_to_proto(usage.overage_cost),
        )

    async def ChangeSubscription(
        self, request: billing_pb2.ChangeSubscriptionRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.ChangeSubscriptionResponse:
        caller = current_identity.get().require_user()
        change = await self._checkout.change_plan(caller.user_id, request.request_id, request.plan_id)
        reply = billing_pb2.ChangeSubscriptionResponse(
            subscription=subscription_to_proto(change.subscription),
            effective_time=timestamp_to_proto(change.effective_time),
        )
        if change.invoice is not None:
            reply.invoice.CopyFrom(invoice_to_proto(change.invoice))
        if change.checkout_session is not None:
            reply.checkout_session.CopyFrom(checkout_session_to_proto(change.checkout_session))
        return reply

    async def CancelSubscription(
        self, request: billing_pb2.CancelSubscriptionRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.CancelSubscriptionResponse:
        caller = current_identity.get().require_user()
        subscription = await self._subscriptions.cancel(caller.user_id)
        return billing_pb2.CancelSubscriptionResponse(subscription=subscription_to_proto(subscription))

    async def ResumeSubscription(
        self, request: billing_pb2.ResumeSubscriptionRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.ResumeSubscriptionResponse:
        caller = current_identity.get().require_user()
        subscription = await self._subscriptions.resume(caller.user_id)
        return billing_pb2.ResumeSubscriptionResponse(subscription=subscription_to_proto(subscription))

    async def ListCreditPacks(
        self, request: billing_pb2.ListCreditPacksRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.ListCreditPacksResponse:
        page = await self._checkout.list_credit_packs(
            page_size=request.page_size, page_token=request.page_token
        )
        reply = billing_pb2.ListCreditPacksResponse(
            credit_packs=[
                billing_pb2.CreditPack(
                    id=pack.id,
                    display_name=pack.display_name,
                    tokens=pack.tokens,
                    price=money_to_proto(pack.price),
                )
                for pack in page.items
            ],
            next_page_token=page.next_page_token,
        )
        return await send_cache_headers(context, reply, CATALOG_CACHE)

    async def CreateCheckoutSession(
        self, request: billing_pb2.CreateCheckoutSessionRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.CreateCheckoutSessionResponse:
        caller = current_identity.get().require_user()
        session = await self._checkout.create_session(
            caller.user_id,
            request.request_id,
            credit_pack_id=request.credit_pack_id,
            plan_id=request.plan_id,
            success_url=request.success_url,
            cancel_url=request.cancel_url,
        )
        return billing_pb2.CreateCheckoutSessionResponse(checkout_session=checkout_session_to_proto(session))

    async def HandleWebhook(
        self, request: billing_pb2.HandleWebhookRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.HandleWebhookResponse:
        signature = next(
            (value for key, value in context.invocation_metadata() or () if key == SIGNATURE_HEADER), None
        )
        outcome = await self._checkout.handle_webhook(
            request.provider, request.body.data, signature if isinstance(signature, str) else None
        )
        return billing_pb2.HandleWebhookResponse(event_id=outcome.event_id, duplicate=outcome.duplicate)

    async def ListInvoices(
        self, request: billing_pb2.ListInvoicesRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.ListInvoicesResponse:
        caller = current_identity.get().require_user()
        if request.status and request.status not in _INVOICE_STATUS_NAMES:
            raise InvalidArgument(
                "status is not an invoice state.",
                field_violations=[FieldViolation("status", "must be one of the InvoiceStatus values")],
            )
        page = await self._invoices.list_invoices(
            caller.user_id,
            page_size=request.page_size,
            page_token=request.page_token,
            status=_INVOICE_STATUS_NAMES.get(request.status),
        )
        return billing_pb2.ListInvoicesResponse(
            invoices=[invoice_to_proto(invoice) for invoice in page.items],
            next_page_token=page.next_page_token,
        )

    async def GetInvoice(
        self, request: billing_pb2.GetInvoiceRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetInvoiceResponse:
        caller = current_identity.get().require_user()
        return billing_pb2.GetInvoiceResponse(
            invoice=invoice_to_proto(await self._invoices.get_invoice(caller.user_id, request.invoice_id))
        )


class BillingInternalServicer(billing_pb2_grpc.BillingInternalServiceServicer):
    """Credit reservations for the chat service (its contract admits only chat's workload)."""

    def __init__(self, ledger: CreditLedger) -> None:
        self._ledger = ledger

    async def ReserveCredits(
        self, request: billing_pb2.ReserveCreditsRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.ReserveCreditsResponse:
        estimate = Estimate(
            model=request.estimate.model,
            input_tokens=request.estimate.input_tokens,
            max_output_tokens=request.estimate.max_output_tokens,
        )
        reservation, account = await self._ledger.reserve(request.request_id, request.user_id, estimate)
        return billing_pb2.ReserveCreditsResponse(
            reservation=reservation_to_proto(reservation), balance=balance_to_proto(account)
        )

    async def SettleReservation(
        self, request: billing_pb2.SettleReservationRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.SettleReservationResponse:
        usage = request.actual_usage
        settlement = await self._ledger.settle(
            request.reservation_id,
            request.request_id,
            Usage(
                model=usage.model,
                provider=usage.provider,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
            ),
        )
        return billing_pb2.SettleReservationResponse(
            reservation=reservation_to_proto(settlement.reservation),
            balance=balance_to_proto(settlement.account),
            cost=money_to_proto(settlement.cost),
        )

    async def ReleaseReservation(
        self, request: billing_pb2.ReleaseReservationRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.ReleaseReservationResponse:
        reservation, account = await self._ledger.release(request.reservation_id, request.request_id)
        return billing_pb2.ReleaseReservationResponse(
            reservation=reservation_to_proto(reservation), balance=balance_to_proto(account)
        )

    async def GetBalance(
        self, request: billing_pb2.GetBalanceRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetBalanceResponse:
        return billing_pb2.GetBalanceResponse(
            balance=balance_to_proto(await self._ledger.balance(request.user_id))
        )


_RESERVATION_STATUSES = {
    "held": billing_pb2.RESERVATION_STATUS_HELD,
    "settled": billing_pb2.RESERVATION_STATUS_SETTLED,
    "released": billing_pb2.RESERVATION_STATUS_RELEASED,
    "expired": billing_pb2.RESERVATION_STATUS_EXPIRED,
}


def reservation_to_proto(reservation: Reservation) -> billing_pb2.CreditReservation:
    message = billing_pb2.CreditReservation(
        id=reservation.id,
        request_id=reservation.request_id,
        user_id=reservation.account_id,
        status=_RESERVATION_STATUSES[reservation.status],
        reserved_tokens=reservation.reserved_tokens,
        settled_tokens=reservation.settled_tokens,
        model=reservation.model,
        create_time=timestamp_to_proto(reservation.create_time),
        expire_time=timestamp_to_proto(reservation.expire_time),
    )
    if reservation.close_time is not None:
        message.close_time.CopyFrom(timestamp_to_proto(reservation.close_time))
    return message


_INVOICE_STATUSES: Final[dict[InvoiceStatus, billing_pb2.InvoiceStatus.ValueType]] = {
    "draft": billing_pb2.INVOICE_STATUS_DRAFT,
    "open": billing_pb2.INVOICE_STATUS_OPEN,
    "paid": billing_pb2.INVOICE_STATUS_PAID,
    "void": billing_pb2.INVOICE_STATUS_VOID,
    "uncollectible": billing_pb2.INVOICE_STATUS_UNCOLLECTIBLE,
}
_INVOICE_STATUS_NAMES: Final[dict[int, InvoiceStatus]] = {
    value: key for key, value in _INVOICE_STATUSES.items()
}
_LINE_KINDS: Final = {
    "subscription": billing_pb2.LINE_ITEM_KIND_SUBSCRIPTION,
    "overage": billing_pb2.LINE_ITEM_KIND_OVERAGE,
    "credits": billing_pb2.LINE_ITEM_KIND_CREDITS,
    "proration_credit": billing_pb2.LINE_ITEM_KIND_PRORATION_CREDIT,
}
_CHECKOUT_STATUSES: Final = {
    "open": billing_pb2.CHECKOUT_SESSION_STATUS_OPEN,
    "complete": billing_pb2.CHECKOUT_SESSION_STATUS_COMPLETE,
    "expired": billing_pb2.CHECKOUT_SESSION_STATUS_EXPIRED,
}


def invoice_to_proto(invoice: Invoice) -> billing_pb2.Invoice:
    def money(amount_minor: int) -> common_pb2.Money:
        return money_to_proto(Money(invoice.currency_code, amount_minor))

    message = billing_pb2.Invoice(
        id=invoice.id,
        number=invoice.number or "",
        user_id=invoice.user_id,
        status=_INVOICE_STATUSES[invoice.status],
        reason=INVOICE_REASONS[invoice.reason],
        subtotal=money(invoice.subtotal_minor),
        tax=money(invoice.tax_minor),
        total=money(invoice.total_minor),
        amount_paid=money(invoice.amount_paid_minor),
        create_time=timestamp_to_proto(invoice.create_time),
    )
    for line in invoice.lines:
        item = message.line_items.add(
            kind=_LINE_KINDS[line.kind],
            description=line.description,
            quantity=line.quantity,
            unit_price=money(line.unit_price_minor),
            amount=money(line.amount_minor),
            plan_id=line.plan_id or "",
            credit_pack_id=line.credit_pack_id or "",
        )
        _set_time(item, "period_start_time", line.period_start)
        _set_time(item, "period_end_time", line.period_end)
    if invoice.credited_invoice_id is not None:
        message.credited_invoice_id = invoice.credited_invoice_id
    if invoice.memo is not None:
        message.memo = invoice.memo
    for field, moment in (
        ("period_start_time", invoice.period_start),
        ("period_end_time", invoice.period_end),
        ("finalize_time", invoice.finalize_time),
        ("due_time", invoice.due_time),
        ("paid_time", invoice.paid_time),
        ("close_time", invoice.close_time),
    ):
        _set_time(message, field, moment)
    return message


def checkout_session_to_proto(session: CheckoutSession) -> billing_pb2.CheckoutSession:
    return billing_pb2.CheckoutSession(
        id=session.id,
        provider=session.provider,
        provider_session_id=session.provider_session_id,
        url=session.url,
        status=_CHECKOUT_STATUSES[session.status],
        plan_id=session.plan_id or "",
        credit_pack_id=session.credit_pack_id or "",
        amount=money_to_proto(session.amount),
        expire_time=timestamp_to_proto(session.expire_time),
    )


def _set_time(message: Message, field: str, moment: datetime | None) -> None:
    if moment is not None:
        getattr(message, field).CopyFrom(timestamp_to_proto(moment))


def balance_to_proto(account: CreditAccount) -> billing_pb2.Balance:
    return billing_pb2.Balance(
        user_id=account.account_id,
        plan_id=account.plan_id,
        period_start_time=timestamp_to_proto(account.period_start),
        period_end_time=timestamp_to_proto(account.period_end),
        included_tokens=account.included_tokens,
        purchased_tokens=account.purchased_available,
        used_tokens=account.used_tokens,
        reserved_tokens=account.reserved_tokens,
        remaining_tokens=account.remaining_tokens,
        overage_tokens=account.overage_tokens,
        hard_stop=account.hard_stop,
    )


def subscription_to_proto(subscription: Subscription) -> billing_pb2.Subscription:
    message = billing_pb2.Subscription(
        id=subscription.id,
        user_id=subscription.user_id,
        plan_id=subscription.plan_id,
        status=subscription_status_to_proto(subscription.status),
        current_period_start_time=timestamp_to_proto(subscription.current_period_start),
        current_period_end_time=timestamp_to_proto(subscription.current_period_end),
        cancel_at_period_end=subscription.cancel_at_period_end,
        pending_plan_id=subscription.pending_plan_id or "",
        create_time=timestamp_to_proto(subscription.create_time),
        update_time=timestamp_to_proto(subscription.update_time),
    )
    if subscription.end_time is not None:
        message.end_time.CopyFrom(timestamp_to_proto(subscription.end_time))
    return message


def plan_to_proto(plan: Plan) -> billing_pb2.Plan:
    message = billing_pb2.Plan(
        id=plan.id,
        display_name=plan.display_name,
        description=plan.description,
        tier=plan_tier_to_proto(plan.tier),
        monthly_price=money_to_proto(plan.monthly_price),
        included_tokens=plan.included_tokens,
        hard_stop=plan.hard_stop,
        allowed_models=plan.allowed_models,
        rate_limit_tier=plan.rate_limit_tier,
        retired=plan.retired,
        create_time=timestamp_to_proto(plan.create_time),
    )
    if plan.overage_price_per_1k_tokens is not None:
        message.overage_price_per_1k_tokens.CopyFrom(money_to_proto(plan.overage_price_per_1k_tokens))
    if plan.retire_time is not None:
        message.retire_time.CopyFrom(timestamp_to_proto(plan.retire_time))
    return message


class BillingAdminServicer(billing_pb2_grpc.BillingAdminServiceServicer):
    """Plan catalog and customer administration; every RPC needs the admin role."""

    def __init__(self, admin: PlanAdmin, customers: CustomerAdmin) -> None:
        self._admin = admin
        self._customers = customers

    async def CreatePlan(
        self, request: billing_pb2.CreatePlanRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.CreatePlanResponse:
        actor = current_identity.get().require_role(ROLE_ADMIN)
        plan = await self._admin.create_plan(
            request.request_id, plan_draft_from_proto(request.plan), actor_id=actor.user_id
        )
        return billing_pb2.CreatePlanResponse(plan=plan_to_proto(plan))

    async def RetirePlan(
        self, request: billing_pb2.RetirePlanRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.RetirePlanResponse:
        actor = current_identity.get().require_role(ROLE_ADMIN)
        plan = await self._admin.retire_plan(request.request_id, request.plan_id, actor_id=actor.user_id)
        return billing_pb2.RetirePlanResponse(plan=plan_to_proto(plan))

    async def GetCustomer(
        self, request: billing_pb2.GetCustomerRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetCustomerResponse:
        current_identity.get().require_role(ROLE_ADMIN)
        customer = await self._customers.customer(request.user_id)
        return billing_pb2.GetCustomerResponse(
            subscription=subscription_to_proto(customer.subscription),
            plan=plan_to_proto(customer.plan),
            balance=balance_to_proto(customer.account),
        )

    async def ListLedgerEntries(
        self, request: billing_pb2.ListLedgerEntriesRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.ListLedgerEntriesResponse:
        current_identity.get().require_role(ROLE_ADMIN)
        page = await self._customers.ledger_entries(
            request.user_id, page_size=request.page_size, page_token=request.page_token
        )
        return billing_pb2.ListLedgerEntriesResponse(
            ledger_entries=[ledger_entry_to_proto(record) for record in page.items],
            next_page_token=page.next_page_token,
        )

    async def ListCustomerInvoices(
        self, request: billing_pb2.ListCustomerInvoicesRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.ListCustomerInvoicesResponse:
        current_identity.get().require_role(ROLE_ADMIN)
        page = await self._customers.invoices(
            request.user_id,
            page_size=request.page_size,
            page_token=request.page_token,
            status=_INVOICE_STATUS_NAMES.get(request.status),
        )
        return billing_pb2.ListCustomerInvoicesResponse(
            invoices=[invoice_to_proto(invoice) for invoice in page.items],
            next_page_token=page.next_page_token,
        )

    async def AdjustCredits(
        self, request: billing_pb2.AdjustCreditsRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.AdjustCreditsResponse:
        actor = current_identity.get().require_role(ROLE_ADMIN)
        adjustment = await self._customers.adjust_credits(
            request.request_id, request.user_id, request.tokens, request.reason, actor_id=actor.user_id
        )
        return billing_pb2.AdjustCreditsResponse(
            ledger_entry=ledger_entry_to_proto(adjustment.record),
            balance=balance_to_proto(adjustment.account),
        )

    async def RefundInvoice(
        self, request: billing_pb2.RefundInvoiceRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.RefundInvoiceResponse:
        actor = current_identity.get().require_role(ROLE_ADMIN)
        credit_note = await self._customers.refund_invoice(
            request.request_id, request.user_id, request.invoice_id, request.reason, actor_id=actor.user_id
        )
        return billing_pb2.RefundInvoiceResponse(credit_note=invoice_to_proto(credit_note))


_LEDGER_ENTRY_KINDS: Final[dict[EntryKind, billing_pb2.LedgerEntryKind.ValueType]] = {
    "grant": billing_pb2.LEDGER_ENTRY_KIND_GRANT,
    "carry": billing_pb2.LEDGER_ENTRY_KIND_CARRY,
    "reservation": billing_pb2.LEDGER_ENTRY_KIND_RESERVATION,
    "settlement": billing_pb2.LEDGER_ENTRY_KIND_SETTLEMENT,
    "release": billing_pb2.LEDGER_ENTRY_KIND_RELEASE,
    "expiry": billing_pb2.LEDGER_ENTRY_KIND_EXPIRY,
    "top_up": billing_pb2.LEDGER_ENTRY_KIND_TOP_UP,
    "adjustment": billing_pb2.LEDGER_ENTRY_KIND_ADJUSTMENT,
}


def ledger_entry_to_proto(record: LedgerRecord) -> billing_pb2.LedgerEntry:
    entry = record.entry
    return billing_pb2.LedgerEntry(
        id=record.id,
        kind=_LEDGER_ENTRY_KINDS[entry.kind],
        included_tokens_delta=entry.included_delta,
        purchased_tokens_delta=entry.purchased_delta,
        used_tokens_delta=entry.used_delta,
        reserved_tokens_delta=entry.reserved_delta,
        reservation_id=entry.reservation_id or "",
        reason=entry.reason,
        actor_user_id=record.actor_id or "",
        create_time=timestamp_to_proto(record.create_time),
        period_start_time=timestamp_to_proto(record.period_start),
    )


def plan_draft_from_proto(message: billing_pb2.Plan) -> PlanDraft:
    """The plan a request submits; its OUTPUT_ONLY fields (retired, create and retire times) are ignored."""
    overage = message.overage_price_per_1k_tokens if message.HasField("overage_price_per_1k_tokens") else None
    return PlanDraft(
        id=message.id,
        display_name=message.display_name,
        description=message.description,
        tier=plan_tier_from_proto(message.tier),
        monthly_price=_price_draft(message.monthly_price) if message.HasField("monthly_price") else None,
        included_tokens=message.included_tokens,
        overage_price_per_1k_tokens=None if overage is None else _price_draft(overage),
        hard_stop=message.hard_stop,
        allowed_models=tuple(message.allowed_models),
        rate_limit_tier=message.rate_limit_tier,
    )


def _price_draft(message: common_pb2.Money) -> PriceDraft:
    return PriceDraft(message.currency_code, message.amount_minor, message.minor_nanos)
