"""credit ledger: subscriptions, the append-only ledger, its cached balances and reservations

Revision ID: 9218c5245fa9
Revises: 5b1f0c2d9e47
Create Date: 2026-12-05 17:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9218c5245fa9"
down_revision: str | Sequence[str] | None = "5b1f0c2d9e47"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _moment(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "subscriptions",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("plan_id", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        _moment("current_period_start"),
        _moment("current_period_end"),
        sa.Column("cancel_at_period_end", sa.Boolean(), nullable=False),
        sa.Column("pending_plan_id", sa.String(length=32), nullable=True),
        _moment("ended_at", nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscriptions")),
    )
    op.create_index(
        "ix_subscriptions_current_user_id",
        "subscriptions",
        ["user_id"],
        unique=True,
        postgresql_where=sa.text("ended_at IS NULL"),
        sqlite_where=sa.text("ended_at IS NULL"),
    )
    op.create_table(
        "credit_accounts",
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("plan_id", sa.String(length=32), nullable=False),
        sa.Column("hard_stop", sa.Boolean(), nullable=False),
        _moment("period_start"),
        _moment("period_end"),
        sa.Column("included_tokens", sa.BigInteger(), nullable=False),
        sa.Column("purchased_tokens", sa.BigInteger(), nullable=False),
        sa.Column("used_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reserved_tokens", sa.BigInteger(), nullable=False),
        sa.Column("notified_percent", sa.Integer(), nullable=False),
        _moment("updated_at"),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_credit_accounts")),
    )
    op.create_table(
        "credit_ledger_entries",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        _moment("period_start"),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("included_delta", sa.BigInteger(), nullable=False),
        sa.Column("purchased_delta", sa.BigInteger(), nullable=False),
        sa.Column("used_delta", sa.BigInteger(), nullable=False),
        sa.Column("reserved_delta", sa.BigInteger(), nullable=False),
        sa.Column("reservation_id", sa.String(length=36), nullable=True),
        sa.Column("reason", sa.String(length=200), nullable=False),
        _moment("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_ledger_entries")),
    )
    op.create_index(
        op.f("ix_credit_ledger_entries_account_id_period_start"),
        "credit_ledger_entries",
        ["account_id", "period_start"],
    )
    op.create_table(
        "credit_reservations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        _moment("period_start"),
        sa.Column("reserved_tokens", sa.BigInteger(), nullable=False),
        sa.Column("settled_tokens", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        _moment("created_at"),
        _moment("expires_at"),
        _moment("closed_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_reservations")),
        sa.UniqueConstraint(
            "account_id", "request_id", name=op.f("uq_credit_reservations_account_id_request_id")
        ),
    )
    op.create_index(
        op.f("ix_credit_reservations_status_expires_at"), "credit_reservations", ["status", "expires_at"]
    )


def downgrade() -> None:
    op.drop_table("credit_reservations")
    op.drop_table("credit_ledger_entries")
    op.drop_table("credit_accounts")
    op.drop_index("ix_subscriptions_current_user_id", table_name="subscriptions")
    op.drop_table("subscriptions")
