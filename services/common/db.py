"""The relational database: one async engine and session factory per process, for PostgreSQL or SQLite.

Every RPC is one unit of work (`Database.unit_of_work`): it commits when the block succeeds and
rolls back on any exception, cancellation included. Repositories receive the session and never commit.
Bounded single-statement reads on the request path may instead go through `Database.hot_reads`
(see `services.common.hot_reads`), which skips the ORM and the transaction around one SELECT, and
the few writes every request makes through `Database.hot_writes` (`services.common.hot_writes`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

from sqlalchemy import event, text
from sqlalchemy import exc as sqlalchemy_errors
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import ConnectionPoolEntry

from services.common.errors import Unavailable
from services.common.hot_reads import HotReads
from services.common.hot_writes import HotWrites

logger = logging.getLogger(__name__)

# How long a SQLite connection waits for the write lock before failing with "database is locked".
# Write transactions here are short (milliseconds), so this only runs out when something is stuck.
SQLITE_BUSY_TIMEOUT_MS: Final = 15_000

# Execution option naming a read-only transaction; see `_configure_sqlite` for what it changes there.
_READ_ONLY_OPTION: Final = "parley_read_only"

# The async driver used when a URL names only the database ("postgresql://", "sqlite://").
_DEFAULT_ASYNC_DRIVERS: Final = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}
_SUPPORTED_DRIVERS: Final = frozenset({"postgresql+asyncpg", "postgresql+psycopg", "sqlite+aiosqlite"})


class DatabaseUnavailable(Exception):  # noqa: N818 - reads as the condition it reports, like TimeoutError.
    """The database could not be reached or did not answer in time."""


def async_database_url(url: str | URL) -> URL:
    """The URL with an async driver, so `postgresql://…` and `sqlite:///…` work like the explicit forms."""
    parsed = make_url(url)
    drivername = _DEFAULT_ASYNC_DRIVERS.get(parsed.drivername, parsed.drivername)
    if drivername not in _SUPPORTED_DRIVERS:
        raise ValueError(
            f"unsupported database driver {parsed.drivername!r}; "
            f"use one of {', '.join(sorted(_SUPPORTED_DRIVERS))}"
        )
    return parsed.set(drivername=drivername)


def create_engine_for(
    url: str | URL,
    *,
    echo: bool = False,
    connect_timeout_s: float = 3.0,
    sqlite_foreign_keys: bool = True,
) -> AsyncEngine:
    """An engine configured for Parley's use of the dialect (see `Database` for what that means).

    `sqlite_foreign_keys=False` is only for migrations: SQLite's table rebuilds (Alembic batch mode)
    must run with foreign-key enforcement off, or dropping the old table trips, or cascades, the
    constraints of the tables that reference it.
    """
    parsed = async_database_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            # Every pooled connection would see its own empty database, and WAL needs a file.
            raise ValueError(
                "Parley needs a file-backed SQLite database, e.g. sqlite+aiosqlite:///var/parley.db"
            )
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(parsed, echo=echo, pool_timeout=30)
        _configure_sqlite(engine, foreign_keys=sqlite_foreign_keys)
        return engine

    connect_args: dict[str, Any]
    if parsed.drivername == "postgresql+asyncpg":
        connect_args = {"timeout": connect_timeout_s, "server_settings": {"application_name": "parley"}}
    else:
        connect_args = {"connect_timeout": max(1, round(connect_timeout_s)), "application_name": "parley"}
    return create_async_engine(
        parsed,
        echo=echo,
        pool_size=10,
        max_overflow=10,
        # A restarted server or a proxy that drops idle connections must not surface as RPC errors.
        pool_pre_ping=True,
        pool_recycle=1800,
        pool_timeout=30,
        connect_args=connect_args,
    )


def _configure_sqlite(engine: AsyncEngine, *, foreign_keys: bool) -> None:
    """Make SQLite behave like a proper transactional database under concurrent async writers.

    SQLite allows one writer at a time. A transaction that starts as a reader (sqlite3's default,
    "deferred") and later writes must upgrade its lock; when another connection wrote in between,
    that upgrade fails at once with "database is locked" and the busy timeout cannot help. So every
    transaction here begins with `BEGIN IMMEDIATE`, which takes the write lock up front, where
    `busy_timeout` makes concurrent writers queue instead of failing. That serializes writers per
    database file, across processes too and for sessions opened directly; on top of it,
    `Database.unit_of_work` queues this process's writers in order so they rarely reach the lock.
    Read-only units of work (`Database.unit_of_work(read_only=True)`, the health ping) begin
    `DEFERRED` with `query_only` on, so under WAL they read a snapshot without waiting for writers.
    """
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Take transaction control away from the sqlite3 module, which would otherwise emit its own
        # deferred BEGIN only before DML (not before SELECT or DDL); `_on_begin` emits ours instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL never corrupts the database; it may lose the last commits on power loss.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        read_only = bool(connection.get_execution_options().get(_READ_ONLY_OPTION, False))
        # `info` lives as long as the pooled DBAPI connection, so the pragma is only sent on a change.
        if connection.info.get(_READ_ONLY_OPTION, False) != read_only:
            connection.exec_driver_sql(f"PRAGMA query_only={'ON' if read_only else 'OFF'}")
            connection.info[_READ_ONLY_OPTION] = read_only
        connection.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")


def _is_connection_failure(error: BaseException) -> bool:
    """True when `error` says the database could not be reached, rather than that a statement failed."""
    if isinstance(error, sqlalchemy_errors.DBAPIError):
        # SQLAlchemy flags the errors its dialect recognises as a lost connection.
        return error.connection_invalidated
    # Drivers raise the socket's own errors (refused, reset) and timeouts while connecting, and the
    # pool raises its TimeoutError when no connection frees up in time.
    return isinstance(error, ConnectionError | TimeoutError | sqlalchemy_errors.TimeoutError)


def _outage(error: BaseException) -> Unavailable | None:
    """UNAVAILABLE (retry later) when `error` says the database is unreachable: an outage is not an
    INTERNAL bug for the caller. None for any other error, which the unit of work re-raises."""
    if not _is_connection_failure(error):
        return None
    logger.warning("the database is unavailable: %s", error or type(error).__name__)
    return Unavailable(
        "The database is unavailable; try again shortly.",
        reason="SERVICE_UNAVAILABLE",
        metadata={"dependency": "database"},
    )


class Database:
    """The process's connection to its relational database.

    PostgreSQL (`postgresql+asyncpg://…`) in microservices mode, SQLite (`sqlite+aiosqlite:///path`)
    when embedded. Create one per process at the composition root and pass it to what needs it.
    """

    def __init__(self, url: str, *, echo: bool = False, connect_timeout_s: float = 3.0) -> None:
        if connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s must be positive")
        self._connect_timeout_s = connect_timeout_s
        self.engine: AsyncEngine = create_engine_for(url, echo=echo, connect_timeout_s=connect_timeout_s)
        # A Session class of this Database's own, so commit hooks fire for its sessions only.
        self._session_class: type[Session] = type("ParleySession", (Session,), {})
        self.sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False, sync_session_class=self._session_class
        )
        # Shares the engine's pool; only the transaction's characteristics differ.
        read_only_options: dict[str, Any] = {_READ_ONLY_OPTION: True}
        if self.dialect_name == "postgresql":
            read_only_options["postgresql_readonly"] = True
        self._read_only_engine = self.engine.execution_options(**read_only_options)
        self._read_only_sessions = async_sessionmaker(
            self._read_only_engine, expire_on_commit=False, sync_session_class=self._session_class
        )
        # SQLite: writing units of work in this process queue here, first come first served, instead
        # of polling the file lock through busy_timeout's sleeps (tens of times slower under contention).
        # BEGIN IMMEDIATE still guards sessions opened directly and other processes.
        self._sqlite_writer_turn = asyncio.Lock() if self.dialect_name == "sqlite" else None
        self.hot_reads: HotReads = HotReads.for_url(
            self.engine.url, self.engine.dialect, connect_timeout_s=connect_timeout_s
        )
        self.hot_writes: HotWrites = HotWrites.for_url(
            self.engine.url,
            self.engine.dialect,
            connect_timeout_s=connect_timeout_s,
            writer_turn=self._writer_turn,
        )

    def after_commit(self, hook: Callable[[Session], None]) -> None:
        """Call `hook(session)` after every commit of this Database's sessions, on the committing thread.

        The outbox relay uses it to wake up as soon as a unit of work that wrote events commits.
        """
        event.listen(self._session_class, "after_commit", hook)

    @property
    def dialect_name(self) -> str:
        """`"postgresql"` or `"sqlite"`."""
        return self.engine.dialect.name

    @property
    def url(self) -> URL:
        """The URL in use (render it with `render_as_string(hide_password=True)` for logs)."""
        return self.engine.url

    @asynccontextmanager
    async def unit_of_work(self, *, read_only: bool = False) -> AsyncIterator[AsyncSession]:
        """One transaction: commit when the block finishes, roll back on any exception, then re-raise.

        `read_only=True` is for queries: the database refuses writes in it, and on SQLite it does not
        queue behind writers.

        On SQLite a writing unit of work holds the database's only write turn from entry to exit, so
        keep it short and never wait inside it on another service: embedded, that call lands in this
        process and its own write waits for this one (it fails after `SQLITE_BUSY_TIMEOUT_MS`).
        Read, call, then write in a unit of work of its own.
        """
        if read_only:
            async with self._transaction(read_only=True) as session:
                yield session
            return
        async with self._writer_turn(), self._transaction(read_only=False) as session:
            yield session

    @asynccontextmanager
    async def _writer_turn(self) -> AsyncIterator[None]:
        """SQLite: this process's turn to write, held for the block (see `unit_of_work`); nothing to
        wait for on PostgreSQL."""
        if self._sqlite_writer_turn is None:
            yield
            return
        try:
            async with asyncio.timeout(SQLITE_BUSY_TIMEOUT_MS / 1000):
                await self._sqlite_writer_turn.acquire()
        except TimeoutError:
            raise TimeoutError(
                f"waited {SQLITE_BUSY_TIMEOUT_MS / 1000:g}s for SQLite's write turn; "
                "is a unit of work nested inside another one?"
            ) from None
        try:
            yield
        finally:
            self._sqlite_writer_turn.release()

    @asynccontextmanager
    async def read_lazily(self) -> AsyncIterator[Callable[[], AsyncSession]]:
        """A read-only unit of work whose session opens only if something asks for it.

        Yields a function that returns the session (the same one on every call). A block that
        only runs hot reads (`hot_reads`) never opens one, and so costs no pool checkout, BEGIN or
        COMMIT; otherwise it behaves like `unit_of_work(read_only=True)`.
        """
        opened: list[AsyncSession] = []

        def session() -> AsyncSession:
            if not opened:
                opened.append(self._read_only_sessions())
            return opened[0]

        try:
            yield session
            if opened:
                await opened[0].commit()
        except BaseException as error:
            if opened:
                await opened[0].rollback()
            outage = _outage(error)
            if outage is None:
                raise
            raise outage from error
        finally:
            if opened:
                await opened[0].close()

    @asynccontextmanager
    async def _transaction(self, *, read_only: bool) -> AsyncIterator[AsyncSession]:
        factory = self._read_only_sessions if read_only else self.sessions
        async with factory() as session:
            try:
                yield session
                await session.commit()
            except BaseException as error:
                # BaseException: a cancelled RPC must roll back too, not leave it to connection reset.
                await session.rollback()
                outage = _outage(error)
                if outage is None:
                    raise
                raise outage from error

    async def ping(self) -> None:
        """Run `SELECT 1`; raise `DatabaseUnavailable` if that fails or outlasts the connect timeout.

        Cheap enough for health checks every few seconds, and bounded even when the server is gone.
        """
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                async with self._read_only_engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
        except TimeoutError as error:
            raise DatabaseUnavailable(
                f"{self.dialect_name} did not answer within {self._connect_timeout_s:g}s"
            ) from error
        except Exception as error:  # whatever the driver raises, the database is not usable
            raise DatabaseUnavailable(f"{self.dialect_name} is unavailable: {error}") from error

    async def dispose(self) -> None:
        """Close every pooled connection; call once at shutdown."""
        await self.hot_reads.close()
        await self.hot_writes.close()
        await self.engine.dispose()
