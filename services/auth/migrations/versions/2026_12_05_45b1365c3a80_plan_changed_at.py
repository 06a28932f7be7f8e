"""auth: users.plan_changed_at and plan_change_recorded_at, which order subscription changes

Auth follows billing's `subscription.changed` into `users.plan_id`; events can arrive out of order,
and these columns (the newest applied change's effective time, and when billing recorded it) are
what an older one is compared with. Existing rows start at NULL: billing's next change applies.

Revision ID: 45b1365c3a80
Revises: d4b91c847728
Create Date: 2026-12-05 16:34:25.118805+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "45b1365c3a80"
down_revision: str | Sequence[str] | None = "d4b91c847728"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("plan_changed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("users", sa.Column("plan_change_recorded_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite rebuilds the table to drop a column.
    with op.batch_alter_table("users") as batch:
        batch.drop_column("plan_change_recorded_at")
        batch.drop_column("plan_changed_at")
