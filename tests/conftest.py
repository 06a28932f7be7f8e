"""Fixtures for the real backing servers (PostgreSQL, Redis, ClickHouse) shared by every suite.

The server addresses come from these variables; the defaults match what scripts/ensure-services provides:

    PARLEY_TEST_POSTGRES_URL     postgresql+asyncpg://postgres@127.0.0.1:5432/test
    PARLEY_TEST_REDIS_URL        redis://127.0.0.1:6379/15
    PARLEY_TEST_CLICKHOUSE_URL   clickhouse://127.0.0.1:19000/default
    PARLEY_TEST_CLICKHOUSE_HTTP  http://127.0.0.1:18123

scripts/test guarantees the servers are up, so an unreachable one fails the tests that need it instead of
skipping them: a skipped integration suite would pass CI while proving nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from services.common.db import Database
from services.common.migrate import upgrade_async
from tests.support.databases import (
    DIALECTS,
    PostgresUnavailableError,
    drop_abandoned_test_databases,
    fresh_postgres_database,
    fresh_sqlite_url,
)
from tests.support.pki import ServicePki, make_test_pki

DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
DEFAULT_CLICKHOUSE_URL = "clickhouse://127.0.0.1:19000/default"
DEFAULT_CLICKHOUSE_HTTP = "http://127.0.0.1:18123"
REACHABILITY_TIMEOUT_SECONDS = 5.0
HOW_TO_START = (
    "scripts/test starts the backing servers through scripts/ensure-services; "
    "run that first when calling pytest directly."
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _setting(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _redacted(url: str) -> str:
    """The URL with any password masked, fit for failure messages."""
    password = urlsplit(url).password
    return url if password is None else url.replace(f":{password}@", ":***@", 1)


def _unreachable(service: str, variable: str, url: str, error: BaseException) -> str:
    """The failure message for a server that did not answer."""
    return (
        f"{service} is not reachable at {_redacted(url)} ({variable}): "
        f"{type(error).__name__}: {error}. {HOW_TO_START}"
    )


def _run_on_private_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from a sync session fixture without touching pytest-asyncio's event loops."""
    with ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(asyncio.run, coroutine).result()


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """URL of the PostgreSQL base database (``test``), checked once per session.

    Tests normally want ``postgres_url`` instead; this one is for fixtures that manage their own
    databases, e.g. a session-wide one through ``tests.support.databases.fresh_postgres_database``.
    """
    url = _setting("PARLEY_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    failure = None
    try:
        dropped = _run_on_private_loop(drop_abandoned_test_databases(url))
    except PostgresUnavailableError as error:
        failure = f"{error} (PARLEY_TEST_POSTGRES_URL). {HOW_TO_START}"
    # Failing outside the except block keeps the report to one message instead of a chain of causes.
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    if dropped:
        logger.info("dropped %d test database(s) left by killed runs: %s", len(dropped), ", ".join(dropped))
    return url


@pytest.fixture
async def postgres_url(postgres_server_url: str) -> AsyncIterator[str]:
    """URL (``postgresql+asyncpg://``) of a brand-new empty database, dropped after the test."""
    async with fresh_postgres_database(postgres_server_url) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL (``sqlite+aiosqlite://``) of a new SQLite file private to the test."""
    return fresh_sqlite_url(tmp_path)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the Redis test database (db 15 by default), checked with PING once per session.

    The database is shared with any concurrent test run, so tests namespace their keys.
    """
    url = _setting("PARLEY_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    client = redis.Redis.from_url(
        url, socket_connect_timeout=REACHABILITY_TIMEOUT_SECONDS, socket_timeout=REACHABILITY_TIMEOUT_SECONDS
    )
    failure = None
    try:
        client.ping()
    except redis.RedisError as error:
        failure = _unreachable("Redis", "PARLEY_TEST_REDIS_URL", url, error)
    finally:
        client.close()
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    return url


@pytest.fixture(name="redis")
async def redis_client(redis_url: str) -> AsyncIterator[AsyncRedis]:
    """An asyncio client of the Redis test database, closed after the test."""
    client = AsyncRedis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def clickhouse_http_url() -> str:
    """Base URL of the ClickHouse HTTP interface (no trailing slash), checked with ``SELECT 1``."""
    url = _setting("PARLEY_TEST_CLICKHOUSE_HTTP", DEFAULT_CLICKHOUSE_HTTP).rstrip("/")
    failure = None
    try:
        response = httpx.get(f"{url}/", params={"query": "SELECT 1"}, timeout=REACHABILITY_TIMEOUT_SECONDS)
        response.raise_for_status()
        if response.text.strip() != "1":
            failure = f"{url} answered SELECT 1 with {response.text[:200]!r}; is it ClickHouse?"
    except httpx.HTTPError as error:
        failure = _unreachable("ClickHouse (HTTP)", "PARLEY_TEST_CLICKHOUSE_HTTP", url, error)
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    return url


@pytest.fixture(scope="session")
def clickhouse_url() -> str:
    """URL of the ClickHouse native protocol (``clickhouse://host:port/db``), checked with a TCP connect."""
    url = _setting("PARLEY_TEST_CLICKHOUSE_URL", DEFAULT_CLICKHOUSE_URL)
    parts = urlsplit(url)
    failure = None
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 9000), timeout=REACHABILITY_TIMEOUT_SECONDS
        ):
            pass
    except OSError as error:
        failure = _unreachable("ClickHouse (native)", "PARLEY_TEST_CLICKHOUSE_URL", url, error)
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    return url


# Every port with a SQLite and a PostgreSQL adapter is tested on both through these two fixtures.


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


@pytest.fixture(scope="session")
def service_pki(tmp_path_factory: pytest.TempPathFactory) -> ServicePki:
    """The session's CA and a certificate for every workload (tests/support/pki.py)."""
    return make_test_pki(tmp_path_factory.mktemp("service-pki"))


@pytest.fixture(scope="session")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> ServicePki:
    """Another CA with the same workloads' certificates: whatever it signed, Parley servers refuse."""
    return make_test_pki(tmp_path_factory.mktemp("foreign-pki"))
