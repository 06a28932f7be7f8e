"""The unit of work every service persists through, as its domain sees it: no SQL types here.

A service opens one unit of work per operation from its `UnitsOfWork`: `write()` for a change,
`read()` for a query. The unit of work it yields carries that service's typed repositories and its
`outbox`; a state change and the events that describe it are written through them and commit
together, or not at all. Repositories return plain frozen dataclasses.

After a writing unit of work commits, and before `write()` returns to its caller, the service's
after-commit hooks run with every `StaleEntry` its repositories marked (`Changes.mark_stale`): that
is where cached copies of changed rows are dropped (the read cache, the API-key check cache) and,
later, where other replicas are told. Nothing runs when the unit of work rolls back.

The SQL implementation is `services.common.sql_unit_of_work`; domain modules never import it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from google.protobuf.message import Message

UowT_co = TypeVar("UowT_co", covariant=True)


class Outbox(Protocol):
    """Where a unit of work records the events of its state change (the transactional outbox)."""

    def record(self, *, subject: str, payload: Message, deliver_after: datetime | None = None) -> None:
        """Add an event to this unit of work: it is relayed only if, and once, the unit commits.

        `subject` is what the event is about (usually a user id). `deliver_after` (timezone-aware
        UTC) delays it.
        """
        ...


class UnitsOfWork(Protocol[UowT_co]):
    """Opens a service's units of work: `write()` for a change, `read()` for a query."""

    def write(self) -> AbstractAsyncContextManager[UowT_co]:
        """One writing transaction: commits when the block ends, rolls back on any exception.

        Keep it short and never wait inside it on another service or on slow work such as password
        hashing: on SQLite it holds the database's only write turn from entry to exit.
        """
        ...

    def read(self) -> AbstractAsyncContextManager[UowT_co]:
        """One read-only transaction (a snapshot on SQLite, never queued behind writers)."""
        ...


@dataclass(frozen=True)
class StaleEntry:
    """A cached copy a committed change made stale: key `key` of the cache named `cache`."""

    cache: str
    key: str


# Runs once a writing unit of work committed, with everything it made stale.
AfterCommitHook = Callable[[frozenset[StaleEntry]], Awaitable[None]]


class Changes:
    """What one writing unit of work made stale, for its after-commit hooks."""

    def __init__(self, *, writable: bool = True) -> None:
        self._writable = writable
        self._stale: set[StaleEntry] = set()

    def mark_stale(self, cache: str, *keys: str) -> None:
        """Have the cached copies under `keys` of `cache` dropped once this unit of work commits."""
        if not self._writable:
            raise RuntimeError(f"a read-only unit of work cannot change what {cache!r} caches")
        self._stale.update(StaleEntry(cache, key) for key in keys)

    @property
    def stale(self) -> frozenset[StaleEntry]:
        return frozenset(self._stale)


def keys_of(entries: Iterable[StaleEntry], cache: str) -> list[str]:
    """The keys of `cache` among `entries`."""
    return sorted(entry.key for entry in entries if entry.cache == cache)
