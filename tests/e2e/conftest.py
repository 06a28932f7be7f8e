"""Fixtures the end-to-end suites share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.databases import DIALECTS
from tests.support.parley_process import Up, parley_up_serving


@pytest.fixture(params=DIALECTS)
def up(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Up]:
    """`parley up` on SQLite (its default) and on a fresh PostgreSQL database."""
    data_dir = tmp_path / "data"
    env: dict[str, str] = {}
    if request.param == "sqlite":
        database_url = f"sqlite+aiosqlite:///{data_dir / 'parley.db'}"
    else:
        database_url = request.getfixturevalue("postgres_url")
        env["PARLEY_DATABASE_URL"] = database_url
    with (
        parley_up_serving(data_dir, log_path=tmp_path / "parley-up.log", env=env) as (process, ports),
        httpx.Client(base_url=f"http://127.0.0.1:{ports.http}", timeout=10.0) as client,
    ):
        yield Up(process, client, data_dir, database_url)
