"""billing idempotency keys: the request ids billing's mutating RPCs have acted on

Revision ID: c442e7205e89
Revises: 30baf2159f21
Create Date: 2026-12-05 16:34:22.680182+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c442e7205e89"
down_revision: str | Sequence[str] | None = "30baf2159f21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "billing_idempotency_keys",
        sa.Column("scope", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("operation", sa.String(length=64), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("result_key", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("scope", "request_id", name=op.f("pk_billing_idempotency_keys")),
    )
    op.create_index(
        op.f("ix_billing_idempotency_keys_created_at"), "billing_idempotency_keys", ["created_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_billing_idempotency_keys_created_at"), table_name="billing_idempotency_keys")
    op.drop_table("billing_idempotency_keys")
