"""Alembic environment for every Parley branch; configured by `services.common.migrate`, not an ini file.

Runs on the async drivers (asyncpg, aiosqlite) inside its own event loop, so `migrate.upgrade`
must be called from a thread without a running loop (`migrate.upgrade_async` does that).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection, text

from services.common.db import async_database_url, create_engine_for
from services.common.migrate import DATABASE_URL_ATTRIBUTE, MIGRATION_ADVISORY_LOCK_KEY, load_model_metadata
from services.common.models import UTCDateTime

config = context.config
target_metadata = load_model_metadata()


def _database_url() -> str:
    url = config.attributes.get(DATABASE_URL_ATTRIBUTE)
    if not url:
        raise RuntimeError(f"no database URL: put it in Config.attributes[{DATABASE_URL_ATTRIBUTE!r}]")
    return str(url)


def _render_item(kind: str, item: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Write application column types as the plain SQLAlchemy types they store, so a revision keeps
    working after the Python type it was generated from changes or moves."""
    if kind == "type" and isinstance(item, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**options: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead (a no-op elsewhere).
        render_as_batch=True,
        render_item=_render_item,
        **options,
    )


def run_migrations_offline() -> None:
    """`--sql` mode: print the SQL instead of running it."""
    _configure(
        url=async_database_url(_database_url()), literal_binds=True, dialect_opts={"paramstyle": "named"}
    )
    with context.begin_transaction():
        context.run_migrations()


def _migrate(connection: Connection) -> None:
    # All pending revisions run in one transaction on both databases. Alembic assumes SQLite has no
    # transactional DDL because the sqlite3 module autocommits DDL; Parley's engine emits its own
    # BEGIN IMMEDIATE (services.common.db), so DDL is transactional there and a failed migration
    # leaves nothing half-done.
    _configure(connection=connection, transactional_ddl=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Replicas starting together queue here; each then sees what the previous one applied.
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_ADVISORY_LOCK_KEY}
            )
        context.run_migrations()
    if connection.dialect.name == "sqlite":
        # Foreign keys were off for the table rebuilds; prove the data still satisfies them.
        violations = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        connection.rollback()
        if violations:
            raise RuntimeError(f"migrations left rows that break foreign keys: {violations[:10]}")


async def _migrate_with_own_engine(url: str) -> None:
    engine = create_engine_for(url, sqlite_foreign_keys=False)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_migrate)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        _migrate(connection)
    else:
        asyncio.run(_migrate_with_own_engine(_database_url()))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
