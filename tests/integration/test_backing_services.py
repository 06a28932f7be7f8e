"""Each backing server the integration and e2e suites rely on answers a real client."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
import httpx
import pytest
import redis.asyncio
from sqlalchemy.engine import make_url

from tests.support.databases import asyncpg_dsn, fresh_postgres_database, fresh_sqlite_url


@pytest.mark.postgres
async def test_postgres_answers_on_a_fresh_database(postgres_url: str) -> None:
    expected_name = make_url(postgres_url).database
    connection = await asyncpg.connect(asyncpg_dsn(postgres_url), timeout=10)
    try:
        assert await connection.fetchval("SELECT 1") == 1
        assert await connection.fetchval("SELECT current_database()") == expected_name
        # A fresh database holds no tables of its own.
        user_tables = await connection.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        )
        assert user_tables == 0
    finally:
        await connection.close()


@pytest.mark.postgres
async def test_fresh_postgres_database_is_dropped_even_with_a_connection_left_open(
    postgres_server_url: str,
) -> None:
    async with fresh_postgres_database(postgres_server_url) as url:
        name = make_url(url).database
        forgotten = await asyncpg.connect(asyncpg_dsn(url), timeout=10)
    try:
        admin = await asyncpg.connect(asyncpg_dsn(postgres_server_url), timeout=10)
        try:
            remaining = await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name)
        finally:
            await admin.close()
        assert remaining == 0
    finally:
        forgotten.terminate()


def test_sqlite_urls_are_distinct_files_under_tmp_path(tmp_path: Path) -> None:
    first, second = fresh_sqlite_url(tmp_path), fresh_sqlite_url(tmp_path)
    assert first != second
    assert first.startswith(f"sqlite+aiosqlite:///{tmp_path}/")


@pytest.mark.redis
async def test_redis_answers_ping(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


@pytest.mark.clickhouse
async def test_clickhouse_http_reports_version_18_or_newer(clickhouse_http_url: str) -> None:
    async with httpx.AsyncClient(base_url=clickhouse_http_url, timeout=10) as client:
        response = await client.post("/", content="SELECT version()")
    response.raise_for_status()
    version = response.text.strip()
    match = re.match(r"(\d+)\.\d+", version)
    assert match is not None, f"unexpected version string {version!r}"
    assert int(match.group(1)) >= 18, f"ClickHouse {version} is older than the 18.16 baseline"
