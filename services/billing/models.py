"""Billing's tables."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, Integer, String, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from services.common.models import UUID_LENGTH, Base, Timestamps, UuidPrimaryKey


class PlanRecord(Timestamps, Base):
    """A plan in the catalog; retired plans keep their subscribers but are not offered."""

    __tablename__ = "plans"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(String(500))
    tier: Mapped[str] = mapped_column(String(16))
    currency_code: Mapped[str] = mapped_column(String(3))
    monthly_price_minor: Mapped[int] = mapped_column(BigInteger)
    included_tokens: Mapped[int] = mapped_column(BigInteger)
    # None means a hard stop at the allowance instead of paid overage.
    overage_price_per_1k_tokens_minor: Mapped[int | None] = mapped_column(BigInteger)
    allowed_models: Mapped[list[str]] = mapped_column(JSON)
    rate_limit_tier: Mapped[str] = mapped_column(String(32))
    sort_order: Mapped[int] = mapped_column(Integer)
    retired_at: Mapped[datetime | None]


class SubscriptionRecord(UuidPrimaryKey, Timestamps, Base):
    """A subscription; a user has at most one that has not ended (`ended_at` is null)."""

    __tablename__ = "subscriptions"
    __table_args__ = (
        Index(
            "ix_subscriptions_current_user_id",
            "user_id",
            unique=True,
            postgresql_where=text("ended_at IS NULL"),
            sqlite_where=text("ended_at IS NULL"),
        ),
    )

    user_id: Mapped[str] = mapped_column(String(UUID_LENGTH))
    plan_id: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    current_period_start: Mapped[datetime]
    current_period_end: Mapped[datetime]
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean)
    pending_plan_id: Mapped[str | None] = mapped_column(String(32))
    ended_at: Mapped[datetime | None]


class CreditAccountRecord(Base):
    """The cached balance of one account's current period: the sums of its ledger entries there.

    Every ledger append updates this row in the same transaction, and reservations take credit with
    one conditional UPDATE of it, which is what makes concurrent reservations exact.
    """

    __tablename__ = "credit_accounts"

    account_id: Mapped[str] = mapped_column(String(UUID_LENGTH), primary_key=True)
    plan_id: Mapped[str] = mapped_column(String(32))
    hard_stop: Mapped[bool] = mapped_column(Boolean)
    period_start: Mapped[datetime]
    period_end: Mapped[datetime]
    included_tokens: Mapped[int] = mapped_column(BigInteger)
    purchased_tokens: Mapped[int] = mapped_column(BigInteger)
    used_tokens: Mapped[int] = mapped_column(BigInteger)
    reserved_tokens: Mapped[int] = mapped_column(BigInteger)
    # The highest usage threshold (percent of the allowance) already announced this period.
    notified_percent: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime]


class LedgerEntryRecord(UuidPrimaryKey, Base):
    """One append-only ledger entry: its signed effect on each of the period's token sums."""

    __tablename__ = "credit_ledger_entries"
    __table_args__ = (Index(None, "account_id", "period_start"),)

    account_id: Mapped[str] = mapped_column(String(UUID_LENGTH))
    period_start: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(16))
    included_delta: Mapped[int] = mapped_column(BigInteger)
    purchased_delta: Mapped[int] = mapped_column(BigInteger)
    used_delta: Mapped[int] = mapped_column(BigInteger)
    reserved_delta: Mapped[int] = mapped_column(BigInteger)
    reservation_id: Mapped[str | None] = mapped_column(String(UUID_LENGTH))
    reason: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]
    # The admin who made an adjustment; null for the entries billing makes on its own.
    actor_id: Mapped[str | None] = mapped_column(String(UUID_LENGTH))


class ReservationRecord(UuidPrimaryKey, Base):
    """Credit held for one generation, from ReserveCredits until it is settled, released or expires."""

    __tablename__ = "credit_reservations"
    __table_args__ = (
        UniqueConstraint("account_id", "request_id"),
        Index(None, "status", "expires_at"),
    )

    account_id: Mapped[str] = mapped_column(String(UUID_LENGTH))
    request_id: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    period_start: Mapped[datetime]
    reserved_tokens: Mapped[int] = mapped_column(BigInteger)
    settled_tokens: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(64))
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    closed_at: Mapped[datetime | None]


class CreditPackRecord(Base):
    """A prepaid bundle of tokens on sale (retired packs stay for the invoices that name them)."""

    __tablename__ = "credit_packs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(100))
    tokens: Mapped[int] = mapped_column(BigInteger)
    currency_code: Mapped[str] = mapped_column(String(3))
    price_minor: Mapped[int] = mapped_column(BigInteger)
    sort_order: Mapped[int] = mapped_column(Integer)
    retired_at: Mapped[datetime | None]


class InvoiceRecord(UuidPrimaryKey, Base):
    """An invoice; `number` is given when it is finalized, gapless per year (`invoice_number_counters`)."""

    __tablename__ = "invoices"
    __table_args__ = (
        Index(None, "user_id", "created_at", "id"),
        # At most one credit note per invoice, so an invoice is never refunded twice.
        Index(None, "credited_invoice_id", unique=True),
    )

    number: Mapped[str | None] = mapped_column(String(16), unique=True)
    user_id: Mapped[str] = mapped_column(String(UUID_LENGTH))
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(16))
    currency_code: Mapped[str] = mapped_column(String(3))
    subtotal_minor: Mapped[int] = mapped_column(BigInteger)
    tax_minor: Mapped[int] = mapped_column(BigInteger)
    total_minor: Mapped[int] = mapped_column(BigInteger)
    amount_paid_minor: Mapped[int] = mapped_column(BigInteger)
    period_start: Mapped[datetime | None]
    period_end: Mapped[datetime | None]
    created_at: Mapped[datetime]
    finalized_at: Mapped[datetime | None]
    due_at: Mapped[datetime | None]
    paid_at: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]
    # For a credit note: the invoice it refunds, and why (the admin's reason, shown on it).
    credited_invoice_id: Mapped[str | None] = mapped_column(String(UUID_LENGTH))
    memo: Mapped[str | None] = mapped_column(String(200))


class InvoiceLineRecord(UuidPrimaryKey, Base):
    """One line of an invoice, in the order it was written (`position`)."""

    __tablename__ = "invoice_lines"
    __table_args__ = (UniqueConstraint("invoice_id", "position"),)

    invoice_id: Mapped[str] = mapped_column(
        String(UUID_LENGTH), ForeignKey("invoices.id", ondelete="CASCADE")
    )
    position: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(24))
    description: Mapped[str] = mapped_column(String(200))
    quantity: Mapped[int] = mapped_column(BigInteger)
    unit_price_minor: Mapped[int] = mapped_column(BigInteger)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    plan_id: Mapped[str | None] = mapped_column(String(32))
    credit_pack_id: Mapped[str | None] = mapped_column(String(32))
    period_start: Mapped[datetime | None]
    period_end: Mapped[datetime | None]


class InvoiceNumberCounterRecord(Base):
    """The last invoice number given in a year; incremented in the finalizing transaction, so gapless."""

    __tablename__ = "invoice_number_counters"

    year: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_number: Mapped[int] = mapped_column(Integer)


class CheckoutSessionRecord(UuidPrimaryKey, Base):
    """A payment-provider checkout for a plan or a credit pack, idempotent on (user, request id)."""

    __tablename__ = "checkout_sessions"
    __table_args__ = (
        UniqueConstraint("user_id", "request_id"),
        UniqueConstraint("provider", "provider_session_id"),
    )

    user_id: Mapped[str] = mapped_column(String(UUID_LENGTH))
    request_id: Mapped[str] = mapped_column(String(128))
    provider: Mapped[str] = mapped_column(String(16))
    provider_session_id: Mapped[str] = mapped_column(String(128))
    url: Mapped[str] = mapped_column(String(500))
    status: Mapped[str] = mapped_column(String(16))
    plan_id: Mapped[str | None] = mapped_column(String(32))
    credit_pack_id: Mapped[str | None] = mapped_column(String(32))
    invoice_id: Mapped[str] = mapped_column(String(UUID_LENGTH))
    currency_code: Mapped[str] = mapped_column(String(3))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    # For an upgrade: the share of the period left when it was priced, in millionths.
    upgrade_fraction_ppm: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]


class PaymentRecord(UuidPrimaryKey, Base):
    """One payment attempt for an invoice, as the provider reported it."""

    __tablename__ = "payments"
    __table_args__ = (Index(None, "invoice_id"),)

    invoice_id: Mapped[str] = mapped_column(String(UUID_LENGTH))
    user_id: Mapped[str] = mapped_column(String(UUID_LENGTH))
    provider: Mapped[str] = mapped_column(String(16))
    provider_payment_id: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    currency_code: Mapped[str] = mapped_column(String(3))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    failure_reason: Mapped[str | None] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]


class WebhookEventRecord(Base):
    """A provider event already applied: webhooks are processed once per (provider, event id)."""

    __tablename__ = "webhook_events"

    provider: Mapped[str] = mapped_column(String(16), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    event_type: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime]


class PaymentMethodRecord(Base):
    """The payment method a user's renewals are charged to: the one of their last paid checkout."""

    __tablename__ = "payment_methods"

    user_id: Mapped[str] = mapped_column(String(UUID_LENGTH), primary_key=True)
    provider: Mapped[str] = mapped_column(String(16))
    provider_payment_method: Mapped[str] = mapped_column(String(128))
    updated_at: Mapped[datetime]


class BillingCustomerRecord(Base):
    """Who billing mails about a user's account: copied from auth's `user.registered` and
    `user.email_verified` events (billing never reads auth's tables)."""

    __tablename__ = "billing_customers"

    user_id: Mapped[str] = mapped_column(String(UUID_LENGTH), primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    display_name: Mapped[str] = mapped_column(String(100))
    updated_at: Mapped[datetime]


class IdempotencyKeyRecord(Base):
    """A request id a billing RPC has acted on, so a retry replays its outcome instead of acting twice.

    Meant for every mutating billing RPC: `operation` names the RPC, `fingerprint` digests the
    request's parameters (a different request under a used id is refused), and `result_key` names
    what the first call produced (a plan id, a subscription id).
    """

    __tablename__ = "billing_idempotency_keys"

    # Whose request ids these are (the caller's user id): two callers may pick the same request id.
    scope: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    operation: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64))
    result_key: Mapped[str] = mapped_column(String(64))
    # Indexed so old keys can be pruned by age once retries of them can no longer come.
    created_at: Mapped[datetime] = mapped_column(index=True)
