"""outbox events: the transactional outbox every service writes its domain events to

Revision ID: 046ef069fa2b
Create Date: 2026-11-26 04:21:40.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "046ef069fa2b"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("common",)
depends_on: str | Sequence[str] | None = None

_UNRELAYED = sa.text("relayed_at IS NULL")


def upgrade() -> None:
    op.create_table(
        "outbox_events",
        # BIGSERIAL on PostgreSQL; SQLite only auto-increments a column declared INTEGER PRIMARY KEY.
        sa.Column(
            "sequence",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("event_type", sa.String(length=128), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("relayed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("sequence", name=op.f("pk_outbox_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_outbox_events_event_id")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_outbox_events_unrelayed",
        "outbox_events",
        ["sequence"],
        postgresql_where=_UNRELAYED,
        sqlite_where=_UNRELAYED,
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_events_unrelayed", table_name="outbox_events")
    op.drop_table("outbox_events")
