"""Billing's tables."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, Index, Integer, String, UniqueConstraint, text
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
