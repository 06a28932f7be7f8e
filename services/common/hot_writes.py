"""Hot writes: the few writes every request makes, run on the driver itself and kept as short as they can be.

A unit of work costs far more than a short write: an ORM session, a pooled checkout (with a ping on
PostgreSQL), BEGIN and COMMIT through SQLAlchemy's execution layers, and on SQLite a hop to
aiosqlite's thread for every step. Worse, under contention, every round trip a transaction makes
while it holds a row lock is time other writers of that row wait, and in an async server that round
trip lasts until the event loop gets back to the transaction. `HotWrites` runs prebuilt statements
on the driver instead:

- `atomic(write)` runs ONE statement as its own transaction. On PostgreSQL that is autocommit on a
  hot-path asyncpg connection: a statement whose CTEs update, insert and return does a whole state
  change in one round trip and holds its row locks only while PostgreSQL runs it. On SQLite it is
  `transaction()` around the one statement.
- `transaction()` runs several statements between BEGIN and COMMIT. On PostgreSQL that is one
  hot-path connection for the block. On SQLite it is one writable sqlite3 connection of its own,
  used synchronously on the event loop in `BEGIN IMMEDIATE … COMMIT`, inside the database's writer
  turn (where `Database.unit_of_work` queues this process's writers), so it never waits on a writer
  of this process; a writer in another process makes it give up within
  `SQLITE_WRITE_BUSY_TIMEOUT_MS` (`HotWriteBusy`) rather than hold up the event loop, and the
  caller then writes through a unit of work instead. Its statements take microseconds; a commit
  that triggers a WAL checkpoint takes longer, on the loop.

Statements are SQLAlchemy Core, compiled once per dialect with the column types' bind and result
processors (`services.common.hot_reads.compile_statement`), so values go in and come back exactly as
through a session. A unique constraint that refuses a row raises `UniqueViolation` on both
databases, and the transaction (or the statement) is rolled back. A write that puts rows in the
outbox says so (`HotWrite(..., records_events=True)`): once it committed, the listeners registered
with `after_events_committed` run (the outbox relay wakes), as a session's commit hook does.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Generic, TypeVar

import asyncpg
from sqlalchemy import Select
from sqlalchemy.engine import URL, Dialect
from sqlalchemy.sql.dml import UpdateBase

from services.common.hot_reads import (
    CompiledStatement,
    PostgresConnections,
    bind_arguments,
    compile_statement,
    decode_row,
)

logger = logging.getLogger(__name__)

RowT = TypeVar("RowT")

# Connections the hot writes keep at most on PostgreSQL, apart from the hot reads' (a write may
# wait on a row lock, and reads must not queue behind it).
DEFAULT_POSTGRES_WRITE_CONNECTIONS: Final = 8
# How long a SQLite hot write waits for another process's write lock, on the event loop, before it
# gives up (`HotWriteBusy`).
SQLITE_WRITE_BUSY_TIMEOUT_MS: Final = 100

WriterTurn = Callable[[], AbstractAsyncContextManager[None]]


class UniqueViolation(Exception):  # noqa: N818 - named for the database's refusal, like IntegrityError.
    """A unique constraint refused a row; the statement (and its transaction) wrote nothing."""


class HotWriteBusy(Exception):  # noqa: N818 - named for the condition.
    """SQLite: another process held the write lock; nothing was written, a unit of work may retry."""


class HotWrite(Generic[RowT]):
    """A statement that writes (an INSERT, UPDATE or DELETE, or a SELECT whose CTEs do), written
    once, and how to turn one of its returned rows into a `RowT`."""

    def __init__(
        self,
        statement: Select[*tuple[Any, ...]] | UpdateBase,
        build: Callable[[Any], RowT],
        *,
        records_events: bool = False,
    ) -> None:
        self.statement = statement
        self.build = build
        self.records_events = records_events
        self._compiled: dict[str, CompiledStatement] = {}

    def compiled_for(self, dialect: Dialect) -> CompiledStatement:
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = compile_statement(self.statement, dialect)
        return compiled


class HotTransaction(ABC):
    """The statements of one `HotWrites.transaction()`."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.records_events = False

    async def fetch(self, write: HotWrite[RowT], **parameters: Any) -> list[RowT]:
        """Run `write` in this transaction; the rows it returned, built."""
        compiled = write.compiled_for(self.dialect)
        rows = await self._run(compiled, bind_arguments(compiled, parameters))
        self.records_events = self.records_events or write.records_events
        return [write.build(decode_row(compiled, row)) for row in rows]

    @abstractmethod
    async def _run(self, compiled: CompiledStatement, arguments: list[Any]) -> list[Any]:
        """Execute one compiled statement on this transaction's connection; its raw rows."""


class HotWrites(ABC):
    """Runs `HotWrite`s against one database (see the module docstring); create with `for_url`."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._events_listeners: list[Callable[[], None]] = []

    @staticmethod
    def for_url(
        url: URL, dialect: Dialect, *, connect_timeout_s: float, writer_turn: WriterTurn
    ) -> HotWrites:
        """`writer_turn` is the database's SQLite write turn (unused on PostgreSQL)."""
        if dialect.name == "sqlite":
            return _SqliteWrites(dialect, url.database or "", writer_turn)
        connections = PostgresConnections(
            url, connect_timeout_s=connect_timeout_s, max_connections=DEFAULT_POSTGRES_WRITE_CONNECTIONS
        )
        return _PostgresWrites(dialect, connections)

    def after_events_committed(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (on the event loop) after every hot write that recorded events commits."""
        self._events_listeners.append(listener)

    async def atomic(self, write: HotWrite[RowT], **parameters: Any) -> list[RowT]:
        """Run `write` as a transaction of its own; the rows it returned, built."""
        async with self.transaction() as transaction:
            return await transaction.fetch(write, **parameters)

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[HotTransaction]:
        """One transaction: commits when the block ends, rolls back on any exception."""

    @abstractmethod
    async def close(self) -> None:
        """Close the connections; the next write opens new ones."""

    def _committed(self, transaction: HotTransaction) -> None:
        if not transaction.records_events:
            return
        for listener in self._events_listeners:
            try:
                listener()
            except Exception:
                logger.exception("an events-committed listener failed")


class _PostgresTransaction(HotTransaction):
    def __init__(self, dialect: Dialect, connections: PostgresConnections, connection: Any) -> None:
        super().__init__(dialect)
        self._connections = connections
        self._connection = connection

    async def _run(self, compiled: CompiledStatement, arguments: list[Any]) -> list[Any]:
        try:
            return await self._connections.fetch(self._connection, compiled.sql, arguments)
        except asyncpg.exceptions.UniqueViolationError as error:
            raise UniqueViolation(str(error)) from error


class _PostgresWrites(HotWrites):
    def __init__(self, dialect: Dialect, connections: PostgresConnections) -> None:
        super().__init__(dialect)
        self._connections = connections

    async def atomic(self, write: HotWrite[RowT], **parameters: Any) -> list[RowT]:
        # No BEGIN and COMMIT around it: a statement outside a transaction is one of its own.
        async with self._connections.connection() as connection:
            transaction = _PostgresTransaction(self.dialect, self._connections, connection)
            rows = await transaction.fetch(write, **parameters)
        self._committed(transaction)
        return rows

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[HotTransaction]:
        async with self._connections.connection() as connection:
            transaction = _PostgresTransaction(self.dialect, self._connections, connection)
            async with connection.transaction():
                yield transaction
        self._committed(transaction)

    async def close(self) -> None:
        await self._connections.close()


class _SqliteTransaction(HotTransaction):
    def __init__(self, dialect: Dialect, connection: sqlite3.Connection) -> None:
        super().__init__(dialect)
        self._connection = connection

    async def _run(self, compiled: CompiledStatement, arguments: list[Any]) -> list[Any]:
        try:
            cursor = self._connection.execute(compiled.sql, arguments)
        except sqlite3.IntegrityError as error:
            if "UNIQUE" not in str(error):
                raise
            raise UniqueViolation(str(error)) from error
        try:
            return cursor.fetchall()
        finally:
            cursor.close()


class _SqliteWrites(HotWrites):
    def __init__(self, dialect: Dialect, path: str, writer_turn: WriterTurn) -> None:
        super().__init__(dialect)
        self._path = path
        self._writer_turn = writer_turn
        self._connection: sqlite3.Connection | None = None

    def _connected(self) -> sqlite3.Connection:
        if self._connection is None:
            # isolation_level=None: transactions are ours (BEGIN IMMEDIATE), never sqlite3's own.
            connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            for pragma in _SQLITE_PRAGMAS:
                connection.execute(pragma)
            self._connection = connection
        return self._connection

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[HotTransaction]:
        async with self._writer_turn():
            connection = self._connected()
            try:
                connection.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) and "busy" not in str(error):
                    raise
                logger.info("a hot write found SQLite locked by another process: %s", error)
                raise HotWriteBusy(str(error)) from error
            transaction = _SqliteTransaction(self.dialect, connection)
            try:
                yield transaction
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        self._committed(transaction)

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


# As the engine's connections have them (`services.common.db._configure_sqlite`), but a short busy
# timeout: this connection waits on the event loop.
_SQLITE_PRAGMAS: Final = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
    f"PRAGMA busy_timeout={SQLITE_WRITE_BUSY_TIMEOUT_MS}",
)
