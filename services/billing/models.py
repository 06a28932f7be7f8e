"""Billing's tables."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from services.common.models import Base, Timestamps


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
