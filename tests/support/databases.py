"""Throwaway databases for tests: a fresh PostgreSQL database per use, or a SQLite file under tmp_path.

Every PostgreSQL database made here is named ``parley_test_<pid>_<random>``: the pid lets a later run
drop databases that a killed run left behind (see ``drop_abandoned_test_databases``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import URL, make_url

# The two SQL adapters, as fixture parameters: every port with both is tested on both.
DIALECTS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]

TEST_DATABASE_PREFIX = "parley_test_"
CONNECT_TIMEOUT_SECONDS = 10.0


class PostgresUnavailableError(RuntimeError):
    """The PostgreSQL server named by a test URL refused or could not take a connection."""


def redacted(url: str | URL) -> str:
    """The URL with any password masked, fit for error messages."""
    return make_url(url).render_as_string(hide_password=True)


def asyncpg_dsn(url: str | URL) -> str:
    """asyncpg takes a plain ``postgresql://`` DSN, not SQLAlchemy's ``postgresql+asyncpg://`` form."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def with_database(url: str | URL, database: str) -> str:
    """The same server URL (driver, user, host, query options) pointing at another database."""
    return make_url(url).set(database=database).render_as_string(hide_password=False)


async def connect_admin(base_url: str) -> Any:
    """An asyncpg connection to the base database, from which test databases are created and dropped."""
    try:
        return await asyncpg.connect(asyncpg_dsn(base_url), timeout=CONNECT_TIMEOUT_SECONDS)
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        raise PostgresUnavailableError(
            f"cannot connect to PostgreSQL at {redacted(base_url)}: {type(error).__name__}: {error}"
        ) from error


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


@contextlib.asynccontextmanager
async def fresh_postgres_database(base_url: str) -> AsyncIterator[str]:
    """Create an empty database on the server of ``base_url``; yield its URL; drop it afterwards.

    The yielded URL keeps the driver of ``base_url`` (``postgresql+asyncpg://...`` for SQLAlchemy).
    Connections still open at the end are terminated, so a leaked pool cannot keep the database alive.
    """
    name = f"{TEST_DATABASE_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
    admin = await connect_admin(base_url)
    try:
        await admin.execute(f"CREATE DATABASE {_quoted(name)}")
    finally:
        await admin.close()
    try:
        yield with_database(base_url, name)
    finally:
        admin = await connect_admin(base_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {_quoted(name)} WITH (FORCE)")
        finally:
            await admin.close()


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def drop_abandoned_test_databases(base_url: str) -> list[str]:
    """Drop test databases whose creating process is gone (a run killed before its teardown).

    Returns the names dropped. Databases of live processes, such as a concurrent test run, are kept.
    """
    admin = await connect_admin(base_url)
    dropped: list[str] = []
    try:
        rows = await admin.fetch(
            "SELECT datname FROM pg_database WHERE starts_with(datname, $1)", TEST_DATABASE_PREFIX
        )
        for row in rows:
            name: str = row["datname"]
            pid_text = name.removeprefix(TEST_DATABASE_PREFIX).split("_", 1)[0]
            if not pid_text.isdigit() or _process_exists(int(pid_text)):
                continue
            await admin.execute(f"DROP DATABASE IF EXISTS {_quoted(name)} WITH (FORCE)")
            dropped.append(name)
    finally:
        await admin.close()
    return dropped


def fresh_sqlite_url(tmp_path: Path) -> str:
    """A SQLAlchemy async URL for a new SQLite file in ``tmp_path`` (distinct on every call)."""
    database_file = tmp_path / f"parley-{secrets.token_hex(4)}.sqlite3"
    return f"sqlite+aiosqlite:///{database_file}"
