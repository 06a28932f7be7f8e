"""delayed outbox events, processed events: `deliver_after` on the outbox, and the SQL idempotency records

Revision ID: 3742bb072dd7
Revises: 046ef069fa2b
Create Date: 2026-11-26 10:27:39.371665+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3742bb072dd7"
down_revision: str | Sequence[str] | None = "046ef069fa2b"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNRELAYED = sa.text("relayed_at IS NULL")
_UNRELAYED_IMMEDIATE = sa.text("relayed_at IS NULL AND deliver_after IS NULL")
_UNRELAYED_DELAYED = sa.text("relayed_at IS NULL AND deliver_after IS NOT NULL")


def upgrade() -> None:
    # Plain ADD/DROP COLUMN (SQLite has both), not a batch rebuild: a rebuilt table would lose
    # AUTOINCREMENT, and with it the promise that a sequence is never reused.
    op.add_column("outbox_events", sa.Column("deliver_after", sa.DateTime(timezone=True), nullable=True))
    # The relay reads immediate rows in sequence order and due delayed rows by due time, each from an
    # index of its own, so rows due far in the future are never scanned on the way to due ones.
    op.drop_index("ix_outbox_events_unrelayed", table_name="outbox_events")
    op.create_index(
        "ix_outbox_events_unrelayed_immediate",
        "outbox_events",
        ["sequence"],
        postgresql_where=_UNRELAYED_IMMEDIATE,
        sqlite_where=_UNRELAYED_IMMEDIATE,
    )
    op.create_index(
        "ix_outbox_events_unrelayed_delayed",
        "outbox_events",
        ["deliver_after"],
        postgresql_where=_UNRELAYED_DELAYED,
        sqlite_where=_UNRELAYED_DELAYED,
    )
    op.create_table(
        "processed_events",
        sa.Column("consumer", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "event_id", name=op.f("pk_processed_events")),
    )
    op.create_index(
        op.f("ix_processed_events_processed_at"), "processed_events", ["processed_at"], unique=False
    )


def downgrade() -> None:
    # Code from before this revision knows no due times: events still waiting for theirs go out at once.
    op.drop_index(op.f("ix_processed_events_processed_at"), table_name="processed_events")
    op.drop_table("processed_events")
    op.drop_index("ix_outbox_events_unrelayed_delayed", table_name="outbox_events")
    op.drop_index("ix_outbox_events_unrelayed_immediate", table_name="outbox_events")
    op.create_index(
        "ix_outbox_events_unrelayed",
        "outbox_events",
        ["sequence"],
        postgresql_where=_UNRELAYED,
        sqlite_where=_UNRELAYED,
    )
    op.drop_column("outbox_events", "deliver_after")
