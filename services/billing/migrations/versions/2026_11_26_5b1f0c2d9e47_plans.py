"""plans: the plan catalog, seeded with free, pro and team

Revision ID: 5b1f0c2d9e47
Create Date: 2026-11-26 05:00:00.000000+00:00
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "5b1f0c2d9e47"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("billing",)
depends_on: str | Sequence[str] | None = None

# Launch catalog; prices in USD cents. Free stops hard at its allowance (no overage price).
_SEED_PLANS = [
    {
        "id": "free",
        "display_name": "Free",
        "description": "Try Parley with a monthly token allowance and no card.",
        "tier": "free",
        "currency_code": "USD",
        "monthly_price_minor": 0,
        "included_tokens": 100_000,
        "overage_price_per_1k_tokens_minor": None,
        "allowed_models": ["parley-local", "gpt-4o-mini"],
        "rate_limit_tier": "free",
        "sort_order": 10,
    },
    {
        "id": "pro",
        "display_name": "Pro",
        "description": "For individuals: a large allowance, the best models and pay-as-you-go overage.",
        "tier": "pro",
        "currency_code": "USD",
        "monthly_price_minor": 2_000,
        "included_tokens": 2_000_000,
        "overage_price_per_1k_tokens_minor": 1,
        "allowed_models": ["parley-local", "gpt-4o-mini", "gpt-4o", "claude-sonnet"],
        "rate_limit_tier": "pro",
        "sort_order": 20,
    },
    {
        "id": "team",
        "display_name": "Team",
        "description": "For teams: pooled usage, higher rate limits and every model.",
        "tier": "team",
        "currency_code": "USD",
        "monthly_price_minor": 5_000,
        "included_tokens": 10_000_000,
        "overage_price_per_1k_tokens_minor": 1,
        "allowed_models": ["parley-local", "gpt-4o-mini", "gpt-4o", "claude-sonnet", "claude-opus"],
        "rate_limit_tier": "team",
        "sort_order": 30,
    },
]


def upgrade() -> None:
    plans = op.create_table(
        "plans",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("display_name", sa.String(length=100), nullable=False),
        sa.Column("description", sa.String(length=500), nullable=False),
        sa.Column("tier", sa.String(length=16), nullable=False),
        sa.Column("currency_code", sa.String(length=3), nullable=False),
        sa.Column("monthly_price_minor", sa.BigInteger(), nullable=False),
        sa.Column("included_tokens", sa.BigInteger(), nullable=False),
        sa.Column("overage_price_per_1k_tokens_minor", sa.BigInteger(), nullable=True),
        sa.Column("allowed_models", sa.JSON(), nullable=False),
        sa.Column("rate_limit_tier", sa.String(length=32), nullable=False),
        sa.Column("sort_order", sa.Integer(), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plans")),
    )
    # SQLite stores naive UTC text (see UTCDateTime); PostgreSQL takes the aware value as is.
    now = datetime.now(UTC)
    created = now.replace(tzinfo=None) if op.get_bind().dialect.name == "sqlite" else now
    op.bulk_insert(plans, [{**plan, "created_at": created, "updated_at": created} for plan in _SEED_PLANS])


def downgrade() -> None:
    op.drop_table("plans")
