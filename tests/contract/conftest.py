"""Fixtures for the data-layer contract suite: every test runs against SQLite and PostgreSQL alike."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.common.db import Database
from services.common.migrate import upgrade_async

DIALECTS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=DIALECTS)
def database_url(request: pytest.FixtureRequest) -> str:
    """URL of a fresh, empty database: a SQLite file under tmp_path, or a new PostgreSQL database."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """A `Database` on a fresh database migrated to every branch's head."""
    await upgrade_async(database_url)
    db = Database(database_url, connect_timeout_s=3.0)
    try:
        yield db
    finally:
        await db.dispose()
