"""Hot reads: SQLAlchemy Core SELECTs compiled once per dialect and run on the driver itself.

A unit of work costs far more than the query it wraps: an ORM session, a pooled checkout (with a
ping on PostgreSQL), BEGIN and COMMIT, and on SQLite a hop to aiosqlite's thread and back for every
step. For a read that is one bounded statement (an indexed look-up, a LIMITed page) none of that buys
anything, and on the request path it is most of the CPU. `HotReads` runs such a statement directly:

- SQLite: one read-only connection of its own, used synchronously on the event loop. In WAL mode an
  indexed read takes tens of microseconds and never waits for a writer; each statement reads the
  latest committed snapshot. A slow statement would block the loop, so only bounded ones belong here.
- PostgreSQL: a few asyncpg connections of its own; asyncpg prepares each statement once per
  connection and reuses it. A connection that fails is dropped, and the read answers UNAVAILABLE
  like a unit of work does.

The SQL is still written once, as a SQLAlchemy Core `Select`, and compiled for the engine's dialect
with the column types' own bind and result processors, so values come back exactly as the ORM
returns them (UTC datetimes, decoded JSON), in rows whose attributes are the selected columns' keys,
as SQLAlchemy's rows have. Reads that need several statements in one snapshot, or that write, stay
in `Database.unit_of_work`; `services.common.sql_unit_of_work` sends a read-only unit of work's
`HotRead`s here and a writing one's through its transaction.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import asyncpg
from sqlalchemy import Select
from sqlalchemy.engine import URL, Dialect
from sqlalchemy.sql.dml import UpdateBase

from services.common.errors import Unavailable

logger = logging.getLogger(__name__)

RowT = TypeVar("RowT")

# PostgreSQL connections the hot reads keep at most; statements are sub-millisecond, so a handful
# serves hundreds of concurrent requests.
DEFAULT_POSTGRES_CONNECTIONS: Final = 8
# A WAL reader is only ever kept waiting by recovery or a checkpoint's brief lock; waiting on the event
# loop must stay short, and a longer wait is an outage to report rather than ride out.
SQLITE_READ_BUSY_TIMEOUT_MS: Final = 200

Processor = Callable[[Any], Any]


@dataclass(frozen=True)
class CompiledStatement:
    """One statement compiled for one dialect, with what binding and decoding need."""

    sql: str
    # The bind names in the order the driver wants their values (a name may repeat for `?` styles).
    parameter_order: tuple[str, ...]
    # Values of binds the statement fixes itself (e.g. SQLite's `OFFSET` of a `LIMIT`).
    fixed_values: Mapping[str, Any]
    bind_processors: Mapping[str, Processor]
    result_processors: tuple[Processor | None, ...]
    # A named tuple of the selected (or returned) columns' keys.
    row_type: Callable[[Sequence[Any]], Any]


class HotRead(Generic[RowT]):
    """A SELECT, written once, and how to turn one of its rows into a `RowT`. A row has an attribute
    per selected column (its key), whether it came from here or from a SQLAlchemy session."""

    def __init__(self, statement: Select[*tuple[Any, ...]], build: Callable[[Any], RowT]) -> None:
        self.statement = statement
        self.build = build
        self._compiled: dict[str, CompiledStatement] = {}

    def compiled_for(self, dialect: Dialect) -> CompiledStatement:
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = compile_statement(self.statement, dialect)
        return compiled


def compile_statement(
    statement: Select[*tuple[Any, ...]] | UpdateBase, dialect: Dialect
) -> CompiledStatement:
    """`statement` (a SELECT, or an INSERT, UPDATE or DELETE with or without RETURNING) for `dialect`."""
    compiled = statement.compile(dialect=dialect)
    if compiled.positiontup is None:
        raise ValueError(f"the hot path needs a positional paramstyle, not {dialect.paramstyle}")
    bind_processors: dict[str, Processor] = {}
    fixed: dict[str, Any] = {}
    for name, bind in compiled.binds.items():
        if bind.expanding:
            raise ValueError(f"bind {name!r} expands (IN with a list); the hot path takes fixed shapes")
        processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            bind_processors[name] = processor
        if not bind.required:
            fixed[name] = bind.effective_value
    result_processors = tuple(
        column.type.dialect_impl(dialect).result_processor(dialect, None)
        for column in statement.exported_columns
    )
    # The fields are known only at run time; rename=True turns an unnamed column into `_<index>`.
    row_type = collections.namedtuple(  # type: ignore[misc]
        "HotRow", [str(column.key) for column in statement.exported_columns], rename=True
    )
    return CompiledStatement(
        sql=compiled.string,
        parameter_order=tuple(compiled.positiontup),
        fixed_values=fixed,
        bind_processors=bind_processors,
        result_processors=result_processors,
        row_type=row_type._make,
    )


def bind_arguments(compiled: CompiledStatement, parameters: Mapping[str, Any]) -> list[Any]:
    """The driver's arguments for `compiled`, in order, from `parameters` by bind name."""
    values = []
    for name in compiled.parameter_order:
        value = parameters[name] if name in parameters else compiled.fixed_values[name]
        processor = compiled.bind_processors.get(name)
        values.append(value if processor is None or value is None else processor(value))
    return values


def decode_row(compiled: CompiledStatement, row: Sequence[Any]) -> Any:
    """A driver's row of `compiled` as a row with a typed attribute per column."""
    return compiled.row_type(
        [
            value if processor is None else processor(value)
            for value, processor in zip(row, compiled.result_processors, strict=True)
        ]
    )


class HotReads(ABC):
    """Runs `HotRead`s against one database (see the module docstring); create with `for_url`."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect

    @staticmethod
    def for_url(url: URL, dialect: Dialect, *, connect_timeout_s: float) -> HotReads:
        if dialect.name == "sqlite":
            return _SqliteReads(dialect, url.database or "")
        return _PostgresReads(dialect, PostgresConnections(url, connect_timeout_s=connect_timeout_s))

    async def all(self, read: HotRead[RowT], **parameters: Any) -> list[RowT]:
        """Every row the statement returns, built into `RowT`s."""
        compiled = read.compiled_for(self.dialect)
        rows = await self._fetch(compiled, bind_arguments(compiled, parameters))
        return [read.build(decode_row(compiled, row)) for row in rows]

    async def first(self, read: HotRead[RowT], **parameters: Any) -> RowT | None:
        """The first row, or None when there is none."""
        found = await self.all(read, **parameters)
        return found[0] if found else None

    @abstractmethod
    async def _fetch(self, compiled: CompiledStatement, arguments: list[Any]) -> Sequence[Sequence[Any]]:
        """Run one compiled read on a connection of this database; its raw rows."""

    @abstractmethod
    async def close(self) -> None:
        """Close the connections; the next read opens new ones."""


class _SqliteReads(HotReads):
    def __init__(self, dialect: Dialect, path: str) -> None:
        super().__init__(dialect)
        self._path = path
        self._connection: sqlite3.Connection | None = None
        # Reads run synchronously, so within one event loop they never overlap; the lock covers a
        # `Database` shared with another thread (operator commands, tests).
        self._lock = threading.Lock()

    def _connected(self) -> sqlite3.Connection:
        if self._connection is None:
            connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            connection.execute(f"PRAGMA busy_timeout={SQLITE_READ_BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA query_only=ON")
            self._connection = connection
        return self._connection

    async def _fetch(self, compiled: CompiledStatement, arguments: list[Any]) -> Sequence[Sequence[Any]]:
        with self._lock:
            try:
                cursor = self._connected().execute(compiled.sql, arguments)
                try:
                    return cursor.fetchall()
                finally:
                    cursor.close()
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) and "busy" not in str(error):
                    raise
                logger.warning("a hot read found SQLite busy: %s", error)
                raise _database_unavailable() from error

    async def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


# Failures that mean the connection (or the server) is gone rather than that the statement is wrong.
_POSTGRES_CONNECTION_ERRORS: Final = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
)


class _PostgresReads(HotReads):
    def __init__(self, dialect: Dialect, connections: PostgresConnections) -> None:
        super().__init__(dialect)
        self._connections = connections

    async def _fetch(self, compiled: CompiledStatement, arguments: list[Any]) -> Sequence[Sequence[Any]]:
        async with self._connections.connection() as connection:
            return await self._connections.fetch(connection, compiled.sql, arguments)

    async def close(self) -> None:
        await self._connections.close()


class PostgresConnections:
    """A few asyncpg connections of the hot path's own, each used by one statement (or one short
    transaction) at a time. asyncpg prepares a statement once per connection and reuses it. A
    connection that fails is dropped, and the call answers UNAVAILABLE like a unit of work does."""

    def __init__(
        self, url: URL, *, connect_timeout_s: float, max_connections: int = DEFAULT_POSTGRES_CONNECTIONS
    ) -> None:
        self._dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._connect_timeout_s = connect_timeout_s
        self._idle: list[asyncpg.Connection] = []
        # One slot per connection that may be open (idle or in use).
        self._slots = asyncio.Semaphore(max_connections)

    async def fetch(self, connection: asyncpg.Connection, sql: str, arguments: list[Any]) -> list[Any]:
        """The rows of one statement on `connection`, bounded in time like a unit of work's."""
        rows: list[Any] = await connection.fetch(sql, *arguments, timeout=self._connect_timeout_s * 10)
        return rows

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for the block's own use."""
        connection = await self._acquire()
        healthy = False
        try:
            yield connection
            healthy = True
        except _POSTGRES_CONNECTION_ERRORS as error:
            logger.warning("the hot path lost its PostgreSQL connection: %s", error or type(error).__name__)
            raise _database_unavailable() from error
        finally:
            await self._release(connection, healthy=healthy and not connection.is_closed())

    async def _acquire(self) -> asyncpg.Connection:
        await self._slots.acquire()
        try:
            return self._idle.pop() if self._idle else await self._connect()
        except BaseException:
            self._slots.release()
            raise

    async def _connect(self) -> asyncpg.Connection:
        try:
            connection = await asyncpg.connect(
                self._dsn,
                timeout=self._connect_timeout_s,
                server_settings={"application_name": "parley"},
            )
        except _POSTGRES_CONNECTION_ERRORS as error:
            logger.warning("the hot path cannot connect to PostgreSQL: %s", error or type(error).__name__)
            raise _database_unavailable() from error
        # JSON arrives decoded, as the SQLAlchemy dialect hands it over (its result processor is None).
        for type_name in ("json", "jsonb"):
            await connection.set_type_codec(
                type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )
        return connection

    async def _release(self, connection: asyncpg.Connection, *, healthy: bool) -> None:
        try:
            if healthy:
                self._idle.append(connection)
            else:
                with contextlib.suppress(*_POSTGRES_CONNECTION_ERRORS):
                    await connection.close(timeout=self._connect_timeout_s)
        finally:
            self._slots.release()

    async def close(self) -> None:
        """Close the idle connections; the next use opens new ones."""
        idle, self._idle = self._idle, []
        for connection in idle:
            with contextlib.suppress(*_POSTGRES_CONNECTION_ERRORS):
                await connection.close(timeout=self._connect_timeout_s)


def _database_unavailable() -> Unavailable:
    return Unavailable(
        "The database is unavailable; try again shortly.",
        reason="SERVICE_UNAVAILABLE",
        metadata={"dependency": "database"},
    )
