"""A read-through cache for hot reads: Redis when configured (shared by every replica), else memory.

`ReadCache` is the port: `get`, `set`, `delete`, and `get_or_load`, which reads through to a loader
on a miss and stores what it loaded. `named(name)` gives a view whose keys live under `<name>:` and
whose metrics carry `cache=<name>`; views share everything else (storage, in-flight loads).

Invalidation. Writers delete the entries they made stale *after* their transaction commits:
repositories mark what they change (`services.common.unit_of_work.Changes.mark_stale`), and the
hook `read_cache_invalidation` deletes those keys once the unit of work committed (before the write
returns). That alone
leaves the classic race: a reader misses, loads the old row, the writer commits and deletes, and
the reader then stores the old row, stale until its TTL. So fills are guarded by a per-key lease
(a fill token, as in memcache's leases): on a miss the reader atomically puts its lease marker where
the value would be, loads, and stores its value only if its own marker is still there
(compare-and-set). A delete removes the marker along with any value, so a fill that raced a write
is refused whatever the timings; no clock is involved. A failed load hands its lease back; a lease's
TTL only frees the key when its filler died. While another filler holds a key's lease, readers load
without storing.

Single flight. Inside one process, concurrent `get_or_load` calls for one key share one load. A
caller that joined someone else's load takes its result only when the cache vouched for it (a hit,
or a fill that kept its lease); otherwise a write may have raced that load, and the joiner, which
may have arrived after the write, loads for itself. `delete` also detaches this process's in-flight
loads of its keys, so a read that starts after a local write never joins a load that began before.

Outages. A cache that cannot answer (Redis down or slow) never fails a read or a write: reads fall
back to the loader, fills, sets and deletes become no-ops; each failure is logged and counted in
`parley_cache_errors_total`. After a failure, reads skip the backend for `retry_after_s`, so a dead
Redis costs its timeout once per interval instead of on every read. While the cache is unavailable,
concurrent loads of one key are still shared (the database is then the only source, and the one to
protect). A delete lost to an outage leaves that entry stale until its TTL, so keep TTLs short.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import secrets
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Final, Self, TypeVar

from prometheus_client import CollectorRegistry, Counter
from redis import RedisError
from redis.asyncio import Redis

from services.common.unit_of_work import AfterCommitHook, StaleEntry

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a reader's fill lease keeps other fillers off a key. Loads take milliseconds; this only
# matters when a filler dies mid-load, and then the key is uncached (not wrong) for this long.
DEFAULT_LEASE_TTL_S: Final = 5.0
# After a cache failure, reads go straight to the loader for this long before trying the cache again.
DEFAULT_RETRY_AFTER_S: Final = 1.0
DEFAULT_MAX_ENTRIES: Final = 10_000


class CacheMetrics:
    """Hits, misses and failures per cache name."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.hits = Counter(
            "parley_cache_hits_total",
            "Reads answered without loading: from the cache, or by sharing a concurrent load.",
            ("cache",),
            registry=registry,
        )
        self.misses = Counter(
            "parley_cache_misses_total",
            "Reads that had to load: the entry was absent or expired, or the cache was unavailable.",
            ("cache",),
            registry=registry,
        )
        self.errors = Counter(
            "parley_cache_errors_total",
            "Cache operations that failed and were treated as a miss or skipped.",
            ("cache",),
            registry=registry,
        )


@dataclass(frozen=True)
class _Lookup:
    """A read that may have taken the key's fill lease."""

    value: bytes | None
    leased: bool


@dataclass
class _SharedState:
    """What every view of one cache shares besides its storage."""

    metrics: CacheMetrics | None
    # full key -> the load in flight for it; resolves to the encoded value joiners may take, or
    # None when they must load for themselves.
    flights: dict[str, asyncio.Future[bytes | None]] = field(default_factory=dict)
    # time.monotonic() before which reads skip the backend, after a failure.
    skip_reads_until: float = 0.0


class ReadCache(ABC):
    """The port: a cache of encoded values by key, with a read-through helper (see the module doc)."""

    # The backend's errors that mean "unavailable": logged, counted, and treated as a miss or no-op.
    _unavailable_errors: ClassVar[tuple[type[Exception], ...]] = ()

    def __init__(self, *, metrics: CacheMetrics | None, retry_after_s: float) -> None:
        if retry_after_s < 0:
            raise ValueError("retry_after_s must not be negative")
        self.name = "default"
        self._retry_after_s = retry_after_s
        self._shared = _SharedState(metrics=metrics)

    def named(self, name: str) -> Self:
        """A view of this cache whose keys live under `<name>:` and whose metrics say `cache=<name>`.

        Put a format version in the name (`auth.user.v1`) and bump it when the encoding changes.
        """
        if not name or ":" in name:
            raise ValueError("a cache name is non-empty and has no ':'")
        view = copy.copy(self)
        view.name = name
        return view

    # ---- the port ---------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        """The cached value, or None when absent, expired, being filled, or the cache is unavailable."""
        value: bytes | None = None
        if self._reads_enabled():
            try:
                value = await self._get(self._full_key(key))
            except self._unavailable_errors as error:
                self._failed("get", error)
        self._count_read(hit=value is not None)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store `value` for `ttl_s` seconds, unconditionally.

        Only for values nothing invalidates: a read-through of data that writers change goes through
        `get_or_load`, whose fills a concurrent `delete` refuses.
        """
        _check_ttl(ttl_s)
        try:
            await self._set(self._full_key(key), value, ttl_s)
        except self._unavailable_errors as error:
            self._failed("set", error)

    async def delete(self, *keys: str) -> None:
        """Remove the entries (and any fill lease on them); a no-op, logged, when the cache is down."""
        full_keys = [self._full_key(key) for key in keys]
        if not full_keys:
            return
        self._detach_flights(full_keys)
        try:
            await self._delete(full_keys)
        except self._unavailable_errors as error:
            self._failed("delete", error)
        # Again: a load that started while the delete was on its way may have read the old entry.
        self._detach_flights(full_keys)

    async def get_or_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        ttl_s: float,
        encode: Callable[[T], bytes],
        decode: Callable[[bytes], T],
    ) -> T:
        """The cached value, else `loader()`'s, stored for `ttl_s` seconds unless a write raced it.

        Concurrent calls for one key in this process share one load. The loader's exceptions
        propagate and nothing is cached for them.
        """
        _check_ttl(ttl_s)
        full_key = self._full_key(key)
        in_flight = self._shared.flights.get(full_key)
        if in_flight is not None:
            # Shielded: a joiner cancelled by its caller must not cancel the load others wait on.
            shared = await asyncio.shield(in_flight)
            self._count_read(hit=shared is not None)
            return decode(shared) if shared is not None else await loader()

        flight: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._shared.flights[full_key] = flight
        shareable: bytes | None = None
        try:
            value, shareable = await self._read_through(full_key, loader, ttl_s, encode, decode)
            return value
        finally:
            if self._shared.flights.get(full_key) is flight:
                del self._shared.flights[full_key]
            flight.set_result(shareable)

    async def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release the backend's connections; call once at shutdown."""

    # ---- the backend ------------------------------------------------------------------------------

    @abstractmethod
    async def _get(self, full_key: str) -> bytes | None:
        """The stored value (never a lease marker)."""

    @abstractmethod
    async def _get_or_lease(self, full_key: str, lease: str) -> _Lookup:
        """Atomically: the stored value, or, when the key is empty, put `lease` there and say so."""

    @abstractmethod
    async def _fill(self, full_key: str, lease: str, value: bytes, ttl_s: float) -> bool:
        """Atomically: store `value` if the key still holds `lease`; False when it does not."""

    @abstractmethod
    async def _release(self, full_key: str, lease: str) -> None:
        """Atomically: empty the key if it still holds `lease` (its load failed)."""

    @abstractmethod
    async def _set(self, full_key: str, value: bytes, ttl_s: float) -> None: ...

    @abstractmethod
    async def _delete(self, full_keys: Sequence[str]) -> None: ...

    # ---- internals --------------------------------------------------------------------------------

    async def _read_through(
        self,
        full_key: str,
        loader: Callable[[], Awaitable[T]],
        ttl_s: float,
        encode: Callable[[T], bytes],
        decode: Callable[[bytes], T],
    ) -> tuple[T, bytes | None]:
        """The value, and its encoding when joiners of this load may take it (None: they may not)."""
        lease = secrets.token_hex(8)
        lookup: _Lookup | None = None
        if self._reads_enabled():
            try:
                lookup = await self._get_or_lease(full_key, lease)
            except self._unavailable_errors as error:
                self._failed("get", error)
        if lookup is not None and lookup.value is not None:
            self._count_read(hit=True)
            return decode(lookup.value), lookup.value
        self._count_read(hit=False)
        try:
            value = await loader()
            encoded = encode(value)
        except BaseException:
            if lookup is not None and lookup.leased:
                # Shielded: a cancelled load must still hand the key back to the next filler.
                await asyncio.shield(self._give_back(full_key, lease))
            raise
        if lookup is None:
            # Unavailable: nothing vouches for the load, but the database is the only source now.
            return value, encoded
        if not lookup.leased:
            # Another filler holds the lease; a write may race this load unseen, so share nothing.
            return value, None
        try:
            stored = await self._fill(full_key, lease, encoded, ttl_s)
        except self._unavailable_errors as error:
            self._failed("fill", error)
            return value, encoded
        # Refused: a delete took the lease while we loaded, so the value may predate that write.
        return value, encoded if stored else None

    async def _give_back(self, full_key: str, lease: str) -> None:
        try:
            await self._release(full_key, lease)
        except self._unavailable_errors as error:
            self._failed("release", error)

    def _full_key(self, key: str) -> str:
        return f"{self.name}:{key}"

    def _detach_flights(self, full_keys: Sequence[str]) -> None:
        for full_key in full_keys:
            self._shared.flights.pop(full_key, None)

    def _reads_enabled(self) -> bool:
        return time.monotonic() >= self._shared.skip_reads_until

    def _count_read(self, *, hit: bool) -> None:
        metrics = self._shared.metrics
        if metrics is not None:
            (metrics.hits if hit else metrics.misses).labels(cache=self.name).inc()

    def _failed(self, operation: str, error: Exception) -> None:
        self._shared.skip_reads_until = time.monotonic() + self._retry_after_s
        logger.warning(
            "the %s cache is unavailable (%s): %s", self.name, operation, error or type(error).__name__
        )
        if self._shared.metrics is not None:
            self._shared.metrics.errors.labels(cache=self.name).inc()


def _check_ttl(ttl_s: float) -> None:
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")


# --------------------------------------------------------------------------------------------------
# In memory
# --------------------------------------------------------------------------------------------------


@dataclass
class _MemoryEntry:
    # Exactly one of the two is set.
    value: bytes | None
    lease: str | None
    expires_at: float


class InMemoryReadCache(ReadCache):
    """This process's memory: right when one process serves every reader (embedded mode).

    A bounded LRU: past `max_entries` the least recently used entry goes. `max_entries=0` stores
    nothing, so every read loads (a cache switched off). `clock` is monotonic seconds.
    """

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        metrics: CacheMetrics | None = None,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 0 or lease_ttl_s <= 0:
            raise ValueError("max_entries must not be negative and lease_ttl_s must be positive")
        super().__init__(metrics=metrics, retry_after_s=0)
        self._max_entries = max_entries
        self._lease_ttl_s = lease_ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, _MemoryEntry] = OrderedDict()

    async def _get(self, full_key: str) -> bytes | None:
        entry = self._live_entry(full_key)
        return None if entry is None else entry.value

    async def _get_or_lease(self, full_key: str, lease: str) -> _Lookup:
        entry = self._live_entry(full_key)
        if entry is not None:
            return _Lookup(value=entry.value, leased=False)
        if self._max_entries == 0:
            return _Lookup(value=None, leased=False)
        self._put(full_key, _MemoryEntry(None, lease, self._clock() + self._lease_ttl_s))
        return _Lookup(value=None, leased=True)

    async def _fill(self, full_key: str, lease: str, value: bytes, ttl_s: float) -> bool:
        entry = self._live_entry(full_key)
        if entry is None or entry.lease != lease:
            return False
        self._put(full_key, _MemoryEntry(value, None, self._clock() + ttl_s))
        return True

    async def _release(self, full_key: str, lease: str) -> None:
        entry = self._live_entry(full_key)
        if entry is not None and entry.lease == lease:
            del self._entries[full_key]

    async def _set(self, full_key: str, value: bytes, ttl_s: float) -> None:
        if self._max_entries > 0:
            self._put(full_key, _MemoryEntry(value, None, self._clock() + ttl_s))

    async def _delete(self, full_keys: Sequence[str]) -> None:
        for full_key in full_keys:
            self._entries.pop(full_key, None)

    def _live_entry(self, full_key: str) -> _MemoryEntry | None:
        entry = self._entries.get(full_key)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            del self._entries[full_key]
            return None
        self._entries.move_to_end(full_key)
        return entry

    def _put(self, full_key: str, entry: _MemoryEntry) -> None:
        self._entries[full_key] = entry
        self._entries.move_to_end(full_key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


# --------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------

# Stored strings start with a tag byte, so a value and a lease marker are never confused.
_VALUE_TAG: Final = b"v"
_LEASE_TAG: Final = b"l"

# KEYS[1]: the entry; ARGV[1]: our lease marker; ARGV[2]: its milliseconds to live.
# Returns what the key holds, or our marker after putting it on an empty key.
_GET_OR_LEASE: Final = """
local current = redis.call('GET', KEYS[1])
if current then return current end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""

# KEYS[1]: the entry; ARGV[1]: our lease marker; ARGV[2]: the tagged value; ARGV[3]: milliseconds.
_FILL: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""


# KEYS[1]: the entry; ARGV[1]: our lease marker.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisReadCache(ReadCache):
    """Redis, shared by every replica: keys `<key_prefix><name>:<key>`, each with its TTL.

    Give it a client with short socket timeouts and no retries (see
    `runtime.process.read_cache_for`): a slow cache must cost less than the read it saves.
    The client must return bytes (`decode_responses` off).
    """

    _unavailable_errors = (RedisError, OSError)

    def __init__(
        self,
        client: Redis,
        *,
        key_prefix: str = "cache:",
        metrics: CacheMetrics | None = None,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        retry_after_s: float = DEFAULT_RETRY_AFTER_S,
    ) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("RedisReadCache needs a client that returns bytes (decode_responses off)")
        if lease_ttl_s <= 0:
            raise ValueError("lease_ttl_s must be positive")
        super().__init__(metrics=metrics, retry_after_s=retry_after_s)
        self._client = client
        self._prefix = key_prefix
        self._lease_ms = _milliseconds(lease_ttl_s)
        self._get_or_lease_script = client.register_script(_GET_OR_LEASE)
        self._fill_script = client.register_script(_FILL)
        self._release_script = client.register_script(_RELEASE)

    def _redis_key(self, full_key: str) -> str:
        return f"{self._prefix}{full_key}"

    async def _get(self, full_key: str) -> bytes | None:
        return _value_of(await self._client.get(self._redis_key(full_key)))

    async def _get_or_lease(self, full_key: str, lease: str) -> _Lookup:
        marker = _LEASE_TAG + lease.encode()
        raw = await self._get_or_lease_script(keys=[self._redis_key(full_key)], args=[marker, self._lease_ms])
        if raw == marker:
            return _Lookup(value=None, leased=True)
        return _Lookup(value=_value_of(raw), leased=False)

    async def _fill(self, full_key: str, lease: str, value: bytes, ttl_s: float) -> bool:
        stored = await self._fill_script(
            keys=[self._redis_key(full_key)],
            args=[_LEASE_TAG + lease.encode(), _VALUE_TAG + value, _milliseconds(ttl_s)],
        )
        return bool(stored)

    async def _release(self, full_key: str, lease: str) -> None:
        await self._release_script(keys=[self._redis_key(full_key)], args=[_LEASE_TAG + lease.encode()])

    async def _set(self, full_key: str, value: bytes, ttl_s: float) -> None:
        await self._client.set(self._redis_key(full_key), _VALUE_TAG + value, px=_milliseconds(ttl_s))

    async def _delete(self, full_keys: Sequence[str]) -> None:
        await self._client.delete(*(self._redis_key(full_key) for full_key in full_keys))

    async def close(self) -> None:
        await self._client.aclose()


def _value_of(raw: object) -> bytes | None:
    if isinstance(raw, bytes) and raw.startswith(_VALUE_TAG):
        return raw[len(_VALUE_TAG) :]
    return None


# --------------------------------------------------------------------------------------------------
# Invalidation after commit
# --------------------------------------------------------------------------------------------------


def read_cache_invalidation(cache: ReadCache) -> AfterCommitHook:
    """The after-commit hook that deletes, from `cache`, what a committed unit of work made stale.

    Register it on a service's units of work (`SqlUnitsOfWork.after_commit`): the deletes finish
    before the write returns, so a write's reply is never followed by a read of the entry it made
    stale. Nothing is deleted when the unit of work rolls back.
    """

    async def delete_stale(stale: frozenset[StaleEntry]) -> None:
        by_name: defaultdict[str, list[str]] = defaultdict(list)
        for entry in stale:
            by_name[entry.cache].append(entry.key)
        for cache_name, keys in sorted(by_name.items()):
            await cache.named(cache_name).delete(*sorted(keys))

    return delete_stale
