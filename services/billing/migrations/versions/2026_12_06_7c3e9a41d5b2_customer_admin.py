"""billing customer admin: who made a ledger adjustment, and credit notes that refund an invoice

`credit_ledger_entries.actor_id` is the admin behind an adjustment (null for every entry billing
makes on its own, which is every row that exists today). `invoices.credited_invoice_id` links a
credit note to the invoice it refunds, unique so no invoice is refunded twice, and `invoices.memo`
holds the admin's reason printed on it. Existing rows start at null: none of them is a credit note.

Revision ID: 7c3e9a41d5b2
Revises: c442e7205e89
Create Date: 2026-12-06 09:12:40.512604+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7c3e9a41d5b2"
down_revision: str | Sequence[str] | None = "c442e7205e89"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("credit_ledger_entries", sa.Column("actor_id", sa.String(length=36), nullable=True))
    op.add_column("invoices", sa.Column("credited_invoice_id", sa.String(length=36), nullable=True))
    op.add_column("invoices", sa.Column("memo", sa.String(length=200), nullable=True))
    # An index, not a constraint: SQLite adds a unique index to an existing table, not a constraint.
    op.create_index(op.f("ix_invoices_credited_invoice_id"), "invoices", ["credited_invoice_id"], unique=True)


def downgrade() -> None:
    op.drop_index(op.f("ix_invoices_credited_invoice_id"), table_name="invoices")
    # Batch mode: SQLite rebuilds the tables to drop a column (migrations run with its foreign keys
    # off, so rebuilding `invoices` leaves `invoice_lines` alone).
    with op.batch_alter_table("invoices") as batch:
        batch.drop_column("memo")
        batch.drop_column("credited_invoice_id")
    with op.batch_alter_table("credit_ledger_entries") as batch:
        batch.drop_column("actor_id")
