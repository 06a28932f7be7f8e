"""The SQL side of every service's unit of work (see `services.common.unit_of_work` for the ports).

`SqlUnitsOfWork` opens `Database.unit_of_work`, binds the service's repositories to that one
session through a `SqlTransaction`, and, once a writing unit has committed, runs the after-commit
hooks with what it made stale. A service's adapter module subclasses nothing: it passes a function
that builds its unit of work from a `SqlTransaction`.

Reads written as `HotRead`s (`SqlTransaction.fetch_all` / `fetch_first`) run on the database's hot
path in a read-only unit of work, which then opens its session only if another repository call
needs it; in a writing unit they run in its transaction, so they see its own changes and locks.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Generic, TypeVar

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from services.common.db import Database
from services.common.hot_reads import HotRead, HotReads
from services.common.outbox import EVENTS_ADDED, INSERT_EVENTS, outbox_row
from services.common.unit_of_work import AfterCommitHook, Changes, StaleEntry

logger = logging.getLogger(__name__)

UowT = TypeVar("UowT")
RowT = TypeVar("RowT")

# `outbox_events.subject` holds 255 characters.
_SUBJECT_MAX: Final = 255


def event_subject(value: str) -> str:
    """An outbox subject for `value`: itself when it fits the column, else a stable digest."""
    if len(value) <= _SUBJECT_MAX:
        return value
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()


class SqlOutbox:
    """`Outbox` over the unit of work's session: events commit with the state change.

    Recorded events are kept until `flush`, which the writing unit of work awaits before it commits:
    their rows go in as one prebuilt INSERT instead of an ORM object each.
    """

    def __init__(self, open_session: Callable[[], AsyncSession], *, source: str, writable: bool) -> None:
        self._open_session = open_session
        self._source = source
        self._writable = writable
        self._rows: list[dict[str, Any]] = []

    def record(self, *, subject: str, payload: Message, deliver_after: datetime | None = None) -> None:
        if not self._writable:
            raise RuntimeError("a read-only unit of work cannot record events")
        _, row = outbox_row(
            source=self._source, subject=event_subject(subject), payload=payload, deliver_after=deliver_after
        )
        self._rows.append(row)

    async def flush(self) -> None:
        """Insert the events recorded since the last flush, in the order they were recorded."""
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        session = self._open_session()
        session.info[EVENTS_ADDED] = True
        await session.execute(INSERT_EVENTS, rows)


@dataclass(frozen=True)
class SqlTransaction:
    """What the repositories of one unit of work share: its session, its changes and its outbox."""

    open_session: Callable[[], AsyncSession]
    hot_reads: HotReads
    changes: Changes
    outbox: SqlOutbox
    read_only: bool

    @property
    def session(self) -> AsyncSession:
        """The unit of work's session (opened now if it was not yet)."""
        return self.open_session()

    async def fetch_all(self, read: HotRead[RowT], **parameters: Any) -> list[RowT]:
        """Every row of `read`: on the hot path when read-only, else in this transaction."""
        if self.read_only:
            return await self.hot_reads.all(read, **parameters)
        rows = (await self.session.execute(read.statement, parameters)).all()
        return [read.build(row) for row in rows]

    async def fetch_first(self, read: HotRead[RowT], **parameters: Any) -> RowT | None:
        """The first row of `read`, or None (see `fetch_all`)."""
        if self.read_only:
            return await self.hot_reads.first(read, **parameters)
        row = (await self.session.execute(read.statement, parameters)).first()
        return None if row is None else read.build(row)


class SqlUnitsOfWork(Generic[UowT]):
    """`UnitsOfWork` over a `Database`: each unit is one transaction with the service's repositories.

    `bind` builds the service's unit of work from the transaction. `source` names the service in
    the events its outbox records.
    """

    def __init__(self, database: Database, *, source: str, bind: Callable[[SqlTransaction], UowT]) -> None:
        self._database = database
        self._source = source
        self._bind = bind
        self._hooks: list[AfterCommitHook] = []

    @property
    def database(self) -> Database:
        return self._database

    def after_commit(self, hook: AfterCommitHook) -> None:
        """Run `hook` after every writing unit of work that made something stale, once it committed.

        Hooks run in registration order, before `write()` returns to its caller, shielded from the
        caller's cancellation. One that raises is logged and the others still run: the change has
        committed, so failing the call would only mislead its caller.
        """
        self._hooks.append(hook)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[UowT]:
        changes = Changes()
        async with self._database.unit_of_work() as session:
            outbox = SqlOutbox(lambda: session, source=self._source, writable=True)
            yield self._bind(
                SqlTransaction(
                    open_session=lambda: session,
                    hot_reads=self._database.hot_reads,
                    changes=changes,
                    outbox=outbox,
                    read_only=False,
                )
            )
            await outbox.flush()
        stale = changes.stale
        if stale and self._hooks:
            await asyncio.shield(self._run_hooks(stale))

    @asynccontextmanager
    async def read(self) -> AsyncIterator[UowT]:
        async with self._database.read_lazily() as open_session:
            outbox = SqlOutbox(open_session, source=self._source, writable=False)
            yield self._bind(
                SqlTransaction(
                    open_session=open_session,
                    hot_reads=self._database.hot_reads,
                    changes=Changes(writable=False),
                    outbox=outbox,
                    read_only=True,
                )
            )

    async def _run_hooks(self, stale: frozenset[StaleEntry]) -> None:
        for hook in self._hooks:
            try:
                await hook(stale)
            except Exception:
                logger.exception("an after-commit hook failed; cached copies may stay stale until their TTL")
