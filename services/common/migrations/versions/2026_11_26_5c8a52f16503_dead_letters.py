"""dead letters: embedded mode's dead letters, kept in the database so they survive a restart

Revision ID: 5c8a52f16503
Revises: 3742bb072dd7
Create Date: 2026-11-26 11:03:26.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5c8a52f16503"
down_revision: str | Sequence[str] | None = "3742bb072dd7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        # BIGSERIAL on PostgreSQL; on SQLite INTEGER PRIMARY KEY AUTOINCREMENT, so the id of a replayed
        # (deleted) dead letter is never given to a new one: an operator's id always means one letter.
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("consumer", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("stream", sa.String(length=255), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_dead_letters_consumer_id", "dead_letters", ["consumer", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_dead_letters_consumer_id", table_name="dead_letters")
    op.drop_table("dead_letters")
