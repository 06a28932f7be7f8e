"""auth: store every email address in its canonical spelling (ADR 0015)

Before this revision an address was only trimmed and lower-cased, so `users.email` may hold
spellings that `normalize_email` now folds together (fullwidth or mathematical letters, ligatures).
Each row gets its canonical spelling. When several rows share one, the account that keeps the
address is, in this order: the row already spelled canonically, an enabled one, a verified one,
the oldest (then the smallest id). The others keep their rows, data and old spelling, which no
sign-in can reach any more (every look-up goes through the canonical spelling), and are disabled,
so a look-alike that was registered beside a real account stops working; an admin can list them
with the `disabled` filter and enable one after review. Nothing is deleted.

Rows whose address new registrations may no longer use (a non-ASCII local part) keep working under
their canonical spelling: they are logged by id, not disabled.

Revision ID: d4b91c847728
Revises: 4f0d1e597c9e
Create Date: 2026-12-05 12:33:47.050699+00:00
"""

import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

# The application's function on purpose, not a copy: the stored spelling must be exactly what every
# look-up computes. A later change to the spelling rules comes with a migration of its own.
from services.auth.emails import email_violations, normalize_email

revision: str = "d4b91c847728"
down_revision: str | Sequence[str] | None = "4f0d1e597c9e"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

logger = logging.getLogger("services.auth.migrations")

_BATCH = 1000

users = sa.table(
    "users",
    sa.column("id", sa.String(36)),
    sa.column("email", sa.String(320)),
    sa.column("email_verified_at", sa.DateTime(timezone=True)),
    sa.column("disabled_at", sa.DateTime(timezone=True)),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("updated_at", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    connection = op.get_bind()
    now = datetime.now(UTC)
    if connection.dialect.name == "sqlite":  # stored as naive UTC text there (services.common.models)
        now = now.replace(tzinfo=None)

    respelled: dict[str, list[Any]] = defaultdict(list)
    grandfathered: list[str] = []
    after = ""
    while True:
        rows = connection.execute(
            sa.select(
                users.c.id, users.c.email, users.c.email_verified_at, users.c.created_at, users.c.disabled_at
            )
            .where(users.c.id > after)
            .order_by(users.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        after = rows[-1].id
        for row in rows:
            canonical = normalize_email(row.email)
            if canonical != row.email:
                respelled[canonical].append(row)
            if email_violations(canonical):
                grandfathered.append(row.id)

    disabled: list[str] = []
    for canonical, rows in respelled.items():
        holder = connection.execute(sa.select(users.c.id).where(users.c.email == canonical)).first()
        losers = list(rows)
        if holder is None:
            keeper = min(
                rows,
                key=lambda row: (
                    row.disabled_at is not None,
                    row.email_verified_at is None,
                    row.created_at,
                    row.id,
                ),
            )
            losers.remove(keeper)
            connection.execute(
                sa.update(users).where(users.c.id == keeper.id).values(email=canonical, updated_at=now)
            )
        for loser in losers:
            if loser.disabled_at is None:
                connection.execute(
                    sa.update(users).where(users.c.id == loser.id).values(disabled_at=now, updated_at=now)
                )
                disabled.append(loser.id)

    if disabled:
        logger.warning(
            "%d account(s) spelled another account's address differently and were disabled (their data "
            "is kept; their address can no longer sign in): %s",
            len(disabled),
            ", ".join(disabled),
        )
    if grandfathered:
        logger.warning(
            "%d account(s) have an address new registrations may no longer use (ADR 0015); they keep "
            "signing in with it: %s",
            len(grandfathered),
            ", ".join(grandfathered),
        )


def downgrade() -> None:
    # Canonical spellings are valid under the earlier rules too; the old spellings are not kept.
    pass
