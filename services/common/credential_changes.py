"""Credential changes: how cached answers of credential checks learn, within a second, that they are stale.

Two places keep auth's answers to "whose is this API key (or cookie session), with which plan and
roles?": auth's own API-key check cache and the gateway edge's ext_authz cache, in every replica of
each. Every such answer is about one user. When something changes what a check answers for a user
(a key revoked, the user disabled, their roles or password changed, a session ended), auth calls
`RevocationList.credentials_changed(user_id)`; the list carries it to every process (in process when
embedded; through its Redis feed otherwise), where this process's `CredentialChangeHub` hands it to
its listeners: the API-key cache, and each `WatchCredentialChanges` stream auth serves to an edge.

A cache may not trust that it heard everything. Its hub knows how long ago its source was last
confirmed complete (`confirmed_age_s`: 0 for the in-process list, the age of the last feed read that
returned for a Redis mirror, the age auth reported plus the transit for an edge); when it does not
know, or that was `MAX_CONFIRMED_AGE_S` or longer ago, a `WatchedCache` answers nothing and every
check goes to the source of truth. And whenever a listener may have missed something (a new
stream, a feed that came back after a gap), it is told to forget everything.

Pieces:
- `CredentialListener`: what hears changes (`forget_user`, `forget_everything`).
- `CredentialChangeHub`: one process's fan-out to its listeners, and `follow()`, the stream of
  `CredentialNews` auth sends each edge.
- `FeedConfirmation`: when a follower last heard its feed confirmed complete (the edge's side).
- `WatchedCache`: a bounded cache of answers, each about one user, that forgets what it hears, answers
  only while its feed is confirmed, and never stores an answer a change may have overtaken.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeVar

from cachetools import TLRUCache

# A cache answers only while its feed was confirmed complete within this long: the longest a change
# can go unseen by a cache, whatever fails (a stream or a Redis connection that dies silently).
MAX_CONFIRMED_AGE_S: Final = 1.0
# How often auth sends an edge a message when nothing changed; well inside MAX_CONFIRMED_AGE_S, with
# room for the age of a Redis mirror's last read (up to its block time) and for scheduling delays.
HEARTBEAT_INTERVAL_S: Final = 0.2
# Changes queued for one stream beyond this many users become "forget everything".
MAX_PENDING_USERS: Final = 10_000
# An answer that took longer than this to arrive is not cached: the record of the changes it may
# have missed is not kept that long.
MAX_ANSWER_WAIT_S: Final = 10.0

V = TypeVar("V")


class CredentialListener(Protocol):
    """Hears that cached credential decisions went stale."""

    def forget_user(self, user_id: str) -> int:
        """Drop every cached decision about `user_id`; returns how many were dropped."""
        ...

    def forget_everything(self) -> int:
        """Drop every cached decision (changes may have been missed); returns how many were dropped."""
        ...


class CredentialChangeFeed(Protocol):
    """Where credential changes are announced and heard: the revocation list (`RevocationList`)."""

    async def credentials_changed(self, user_id: str) -> None:
        """Tell every listener, in every process, to forget `user_id`'s cached decisions."""
        ...

    def credential_changes(self) -> CredentialChangeHub:
        """This process's hub of listeners."""
        ...


@dataclass(frozen=True)
class CredentialNews:
    """One message of a credential-change stream: what to forget, and how current the sender was."""

    user_ids: frozenset[str]
    # Forget every cached decision, not only those of `user_ids`: the first message, and after a gap.
    everything: bool
    # How long ago the sender was last confirmed to have seen every change (0: it is the source).
    confirmed_age_s: float


class _Watch:
    """A listener that queues what it hears for one `follow()` stream, merging bursts."""

    def __init__(self, max_pending: int) -> None:
        self._max_pending = max_pending
        self._users: set[str] = set()
        # A new watcher cannot know what was cached before it came: its first message says so.
        self._everything = True
        self._ready = asyncio.Event()
        self._ready.set()

    def forget_user(self, user_id: str) -> int:
        if not self._everything:
            self._users.add(user_id)
            if len(self._users) > self._max_pending:
                self.forget_everything()
        self._ready.set()
        return 0

    def forget_everything(self) -> int:
        self._everything = True
        self._users.clear()
        self._ready.set()
        return 0

    def wake(self) -> None:
        self._ready.set()

    async def take(self, timeout_s: float) -> tuple[frozenset[str], bool]:
        """What was heard since the last take, waiting up to `timeout_s` for something."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._ready.wait()
        except TimeoutError:
            pass
        users, everything = frozenset(self._users), self._everything
        self._users.clear()
        self._everything = False
        self._ready.clear()
        return users, everything


class CredentialChangeHub:
    """This process's listeners of credential changes, fed by its revocation list.

    `confirmed_age_s` is the owner's answer to "how long ago was I last known to hold every change?"
    (None: not known now). Listeners are called synchronously, in the order they subscribed.
    """

    def __init__(
        self, confirmed_age_s: Callable[[], float | None], *, max_pending: int = MAX_PENDING_USERS
    ) -> None:
        self._confirmed_age_s = confirmed_age_s
        self._max_pending = max_pending
        self._listeners: list[CredentialListener] = []
        self._closed = False

    def confirmed_age_s(self) -> float | None:
        return self._confirmed_age_s()

    def subscribe(self, listener: CredentialListener) -> Callable[[], None]:
        """Have `listener` hear every change from now on; returns the function that unsubscribes it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def changed(self, user_id: str) -> None:
        """`user_id`'s credential decisions changed: every listener forgets theirs."""
        for listener in list(self._listeners):
            listener.forget_user(user_id)

    def lost_track(self) -> None:
        """Changes may have been missed: every listener forgets everything."""
        for listener in list(self._listeners):
            listener.forget_everything()

    async def follow(self, *, heartbeat_s: float = HEARTBEAT_INTERVAL_S) -> AsyncGenerator[CredentialNews]:
        """The stream one edge follows: news as it happens, and at least every `heartbeat_s` while
        this process is confirmed current. While it is not, nothing is sent (the follower's bound
        runs out and it stops trusting its cache), and the next message says "forget everything".
        The first message always does. Ends when the hub is closed."""
        watch = _Watch(self._max_pending)
        unsubscribe = self.subscribe(watch)
        owed_everything = False
        try:
            while not self._closed:
                users, everything = await watch.take(heartbeat_s)
                if self._closed:
                    return
                age = self.confirmed_age_s()
                if age is None:
                    owed_everything = True
                    continue
                yield CredentialNews(users, everything or owed_everything, age)
                owed_everything = False
        finally:
            unsubscribe()

    def close(self) -> None:
        """End every `follow()` stream (at shutdown, so the server's grace is not spent on them)."""
        self._closed = True
        for listener in self._listeners:
            if isinstance(listener, _Watch):
                listener.wake()


class FeedConfirmation:
    """When a follower's feed was last confirmed complete, on this process's monotonic clock."""

    def __init__(self, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._confirmed_at: float | None = None

    def confirmed(self, age_s: float) -> None:
        """The feed's sender says it held every change as of `age_s` ago."""
        self._confirmed_at = self._monotonic() - max(age_s, 0.0)

    def lost(self) -> None:
        """The feed broke: nothing is confirmed until it says so again."""
        self._confirmed_at = None

    def age_s(self) -> float | None:
        confirmed_at = self._confirmed_at
        return None if confirmed_at is None else max(self._monotonic() - confirmed_at, 0.0)


@dataclass(frozen=True)
class Ticket:
    """Taken before asking the source of truth: an answer is cached only if no change overtook it."""

    sequence: int
    asked_at: float


@dataclass(frozen=True)
class _Entry(Generic[V]):
    user_id: str
    value: V
    ttl_s: float


def _time_to_use(_key: str, entry: _Entry[V], now: float) -> float:
    return now + entry.ttl_s


class WatchedCache(Generic[V]):
    """Answers of credential checks by key (a digest, never a secret), each about one user.

    - `get` answers only while the feed is confirmed within `max_age_s` (`trusted`); otherwise
      every check goes to the source of truth.
    - `forget_user` / `forget_everything` make it a `CredentialListener`.
    - `put` stores an answer only if nothing about its user (nor everything) was forgotten since the
      `ticket()` taken before asking, nor within `settle_s` before it: an answer read before a
      change, or from a replica that may not have heard of it yet, is never kept.
    - Bounded: the least recently used answer goes first; each expires after its own TTL.
    """

    def __init__(
        self,
        *,
        max_entries: int,
        confirmed_age_s: Callable[[], float | None],
        timer: Callable[[], float] = time.monotonic,
        max_age_s: float = MAX_CONFIRMED_AGE_S,
        settle_s: float = 0.0,
    ) -> None:
        if max_entries < 1:
            raise ValueError("a cache needs room for at least one entry")
        if max_age_s <= 0 or settle_s < 0:
            raise ValueError("max_age_s must be positive and settle_s not negative")
        self._entries: TLRUCache[str, _Entry[V]] = TLRUCache(max_entries, ttu=_time_to_use, timer=timer)
        self._confirmed_age_s = confirmed_age_s
        self._timer = timer
        self._max_age_s = max_age_s
        self._settle_s = settle_s
        self._sequence = 0
        # When, and at which sequence number, each user's (or everyone's) decisions were last forgotten.
        self._forgotten: dict[str, tuple[int, float]] = {}
        self._everything_forgotten: tuple[int, float] | None = None

    @property
    def trusted(self) -> bool:
        """Whether the feed is confirmed current enough for cached answers to be used."""
        age = self._confirmed_age_s()
        return age is not None and age < self._max_age_s

    def get(self, key: str) -> V | None:
        """The cached answer, unless there is none or the cache is not `trusted`."""
        if not self.trusted:
            return None
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    def ticket(self) -> Ticket:
        return Ticket(self._sequence, self._timer())

    def put(self, key: str, user_id: str, value: V, *, ttl_s: float, ticket: Ticket) -> bool:
        """Keep `value` for `ttl_s` if nothing overtook it (see the class docstring); True if kept.
        A TTL that is not positive keeps nothing and drops an older answer under `key`."""
        if ttl_s <= 0 or not self._may_keep(user_id, ticket):
            self._entries.pop(key, None)
            return False
        self._entries[key] = _Entry(user_id, value, ttl_s)
        return True

    def pop(self, key: str) -> None:
        self._entries.pop(key, None)

    def forget_user(self, user_id: str) -> int:
        self._note_forgotten(user_id)
        stale = [key for key, entry in self._entries.items() if entry.user_id == user_id]
        for key in stale:
            self._entries.pop(key, None)
        return len(stale)

    def forget_everything(self) -> int:
        self._note_forgotten(None)
        dropped = len(self._entries)
        self._entries.clear()
        return dropped

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def _may_keep(self, user_id: str, ticket: Ticket) -> bool:
        now = self._timer()
        if now - ticket.asked_at > MAX_ANSWER_WAIT_S or not self.trusted:
            return False
        overtaking = [self._everything_forgotten, self._forgotten.get(user_id)]
        return not any(
            mark is not None and (mark[0] > ticket.sequence or mark[1] > ticket.asked_at - self._settle_s)
            for mark in overtaking
        )

    def _note_forgotten(self, user_id: str | None) -> None:
        self._sequence += 1
        now = self._timer()
        mark = (self._sequence, now)
        if user_id is None:
            self._everything_forgotten = mark
            self._forgotten.clear()
        else:
            # Re-inserted, so the dict stays in time order for the pruning below.
            self._forgotten.pop(user_id, None)
            self._forgotten[user_id] = mark
        # Marks older than any answer still allowed in (plus the settle window) can no longer matter.
        horizon = now - MAX_ANSWER_WAIT_S - self._settle_s
        for user, (_, at) in list(self._forgotten.items()):
            if at >= horizon:
                break
            del self._forgotten[user]
