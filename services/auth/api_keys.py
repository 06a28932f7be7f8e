"""API keys: programmatic credentials `pk_<prefix>_<secret>`, created, listed, revoked and checked.

Format: `pk_` + a 12-character lookup prefix (lowercase base32, 60 random bits, unique) + `_` +
a 43-character URL-safe secret (`opaque.new_secret()`, 256 bits). The database keeps the prefix,
the last four characters and the SHA-256 of the whole key; the plaintext is shown once, at creation.

A check parses the key (a malformed one is refused without touching the database), finds the row
by prefix, compares hashes in constant time, and refuses revoked and expired keys and keys of
disabled users. `last_used_at` is written at most once a minute per key, so a busy key does not
turn every request into a write.

Cache: a successful check is remembered in process for `cache_ttl_s` seconds (bounded, LRU), keyed
by the key's SHA-256 — never by the plaintext. Revoking a key through this manager evicts it here at
once; other replicas (and the gateway's own cache, which `CheckApiKeyResponse.cache_ttl` bounds) can
keep accepting a revoked key, a disabled user's key or a stale plan and roles for up to the TTL.
A Redis-backed shared cache with active eviction arrives with the gateway issue. `cache_ttl_s=0`
turns the cache off (the benchmark runs with and without it).

No SQL or gRPC here: storage is behind `ApiKeyStores` (see `services.auth.session_repository`).
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Final, Protocol

from google.protobuf.message import Message

from parley.events.v1 import events_pb2
from services.auth.opaque import new_secret, secret_hash
from services.common.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from services.common.models import utc_now
from services.common.pagination import (
    PageCursor,
    cursor_time_and_id,
    decode_page_token,
    effective_page_size,
    encode_page_token,
    query_fingerprint,
)

logger = logging.getLogger(__name__)

KEY_PREFIX: Final = "pk_"
LOOKUP_PREFIX_LENGTH: Final = 12
LOOKUP_PREFIX_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz234567"
SECRET_LENGTH: Final = 43  # opaque.new_secret() of 32 bytes
KEY_LENGTH: Final = len(KEY_PREFIX) + LOOKUP_PREFIX_LENGTH + 1 + SECRET_LENGTH
NAME_MAX: Final = 100

# Every scope a key may carry. "*" grants whatever its user may do; an empty request means "*".
# Each service decides which scope an RPC needs; a key without it gets INSUFFICIENT_SCOPE there.
ALLOWED_SCOPES: Final[dict[str, str]] = {
    "*": "everything the key's user may do",
    "chat": "conversations, messages and completions (read and write)",
    "chat:read": "read conversations and messages",
    "billing:read": "read the plan, subscription, credits, usage and invoices",
    "analytics:read": "read the user's own usage analytics",
}
ALL_SCOPES: Final = "*"

DEFAULT_CACHE_TTL_S: Final = 30.0
DEFAULT_CACHE_MAX_ENTRIES: Final = 10_000
LAST_USED_INTERVAL: Final = timedelta(minutes=1)

_KEY_PATTERN: Final = re.compile(
    rf"{KEY_PREFIX}(?P<prefix>[{LOOKUP_PREFIX_ALPHABET}]{{{LOOKUP_PREFIX_LENGTH}}})_[A-Za-z0-9_-]{{{SECRET_LENGTH}}}"
)


@dataclass(frozen=True)
class ApiKey:
    """An API key as its owner sees it: never the secret."""

    id: str
    user_id: str
    name: str
    # The 12-character lookup prefix; the key starts with `display_prefix`.
    prefix: str
    last_four: str
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def display_prefix(self) -> str:
        """How the key starts, e.g. "pk_abcdefgh2345", to recognise it by."""
        return f"{KEY_PREFIX}{self.prefix}"

    def is_active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


@dataclass(frozen=True)
class CreatedApiKey:
    """A new key and its plaintext, which is never retrievable again."""

    api_key: ApiKey
    plaintext: str


@dataclass(frozen=True)
class ApiKeyPage:
    api_keys: tuple[ApiKey, ...]
    next_page_token: str


@dataclass(frozen=True)
class ApiKeyIdentity:
    """Who a checked key acts for, in the shape the gateway's identity headers need."""

    user_id: str
    key_id: str
    scopes: tuple[str, ...]
    plan_id: str
    roles: tuple[str, ...]
    email_verified: bool

    def allows(self, scope: str) -> bool:
        """Whether the key grants `scope` (a "*" key grants every scope)."""
        return ALL_SCOPES in self.scopes or scope in self.scopes


@dataclass(frozen=True)
class KeyOwner:
    """The parts of the key's user that a check needs (read from `users`, owned by accounts)."""

    plan_id: str
    roles: tuple[str, ...]
    email_verified: bool
    disabled: bool


@dataclass(frozen=True)
class StoredApiKey:
    """An api_keys row with its stored hash and its owner."""

    api_key: ApiKey
    secret_hash: str
    owner: KeyOwner


class ApiKeyStore(Protocol):
    """Storage of API keys, bound to one unit of work (never commits)."""

    async def add_key(
        self,
        *,
        user_id: str,
        name: str,
        prefix: str,
        last_four: str,
        secret_hash: str,
        scopes: Sequence[str],
        expires_at: datetime | None,
        now: datetime,
    ) -> ApiKey: ...

    async def find_by_prefix(self, prefix: str) -> StoredApiKey | None: ...

    async def find_by_id(self, key_id: str) -> StoredApiKey | None: ...

    async def list_keys(
        self,
        user_id: str,
        *,
        now: datetime,
        include_inactive: bool,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> Sequence[ApiKey]:
        """The user's keys by (created_at, id) descending, strictly after `after`."""
        ...

    async def revoke_key(self, key_id: str, *, now: datetime) -> bool:
        """Revoke if not yet revoked; True only when this call revoked it."""
        ...

    async def mark_used(self, key_id: str, *, now: datetime, unless_since: datetime) -> None:
        """Set `last_used_at = now` unless it is already later than `unless_since`."""
        ...

    def record_event(self, *, subject: str, payload: Message) -> None: ...


class ApiKeyStores(Protocol):
    """Opens units of work: `write()` for changes, `read()` for queries."""

    def write(self) -> AbstractAsyncContextManager[ApiKeyStore]: ...

    def read(self) -> AbstractAsyncContextManager[ApiKeyStore]: ...


@dataclass
class _CachedCheck:
    identity: ApiKeyIdentity
    key_expires_at: datetime | None
    cached_at: datetime
    last_used_at: datetime | None


class ApiKeyManager:
    """Creates, lists, revokes and checks API keys."""

    def __init__(
        self,
        stores: ApiKeyStores,
        *,
        clock: Callable[[], datetime] = utc_now,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        cache_max_entries: int = DEFAULT_CACHE_MAX_ENTRIES,
        last_used_interval: timedelta = LAST_USED_INTERVAL,
    ) -> None:
        if cache_ttl_s < 0 or cache_max_entries < 1:
            raise ValueError("cache_ttl_s must be >= 0 and cache_max_entries >= 1")
        self._stores = stores
        self._clock = clock
        self._cache_ttl = timedelta(seconds=cache_ttl_s)
        self._cache_max_entries = cache_max_entries
        self._last_used_interval = last_used_interval
        # Full-key SHA-256 → the last successful check; least recently used first.
        self._cache: OrderedDict[str, _CachedCheck] = OrderedDict()

    @property
    def cache_ttl(self) -> timedelta:
        """How long a successful check may be reused (zero: the cache is off)."""
        return self._cache_ttl

    @property
    def cache_enabled(self) -> bool:
        return self._cache_ttl > timedelta(0)

    async def create(
        self,
        user_id: str,
        *,
        name: str,
        scopes: Collection[str] = (),
        expires_at: datetime | None = None,
    ) -> CreatedApiKey:
        """Create a key; writes `api_key.created`. Invalid input is INVALID_ARGUMENT with one field
        violation per problem (`name`, `scopes[i]`, `expire_time`)."""
        now = self._clock()
        clean_name = name.strip()
        granted = normalize_scopes(scopes)
        violations = _creation_violations(clean_name, scopes, expires_at, now)
        if violations:
            raise InvalidArgument(
                "The API key request is not valid.", reason="INVALID_ARGUMENT", field_violations=violations
            )
        prefix = "".join(secrets.choice(LOOKUP_PREFIX_ALPHABET) for _ in range(LOOKUP_PREFIX_LENGTH))
        plaintext = f"{KEY_PREFIX}{prefix}_{new_secret()}"
        async with self._stores.write() as store:
            api_key = await store.add_key(
                user_id=user_id,
                name=clean_name,
                prefix=prefix,
                last_four=plaintext[-4:],
                secret_hash=secret_hash(plaintext),
                scopes=granted,
                expires_at=expires_at,
                now=now,
            )
            created = events_pb2.ApiKeyCreated(
                user_id=user_id,
                api_key_id=api_key.id,
                name=api_key.name,
                prefix=api_key.display_prefix,
                scopes=api_key.scopes,
            )
            if expires_at is not None:
                created.expire_time.FromDatetime(expires_at)
            store.record_event(subject=user_id, payload=created)
        return CreatedApiKey(api_key=api_key, plaintext=plaintext)

    async def list_keys(
        self, user_id: str, *, page_size: int = 0, page_token: str = "", show_revoked: bool = False
    ) -> ApiKeyPage:
        """The user's keys, newest first; revoked and expired ones only with `show_revoked`."""
        limit = effective_page_size(page_size)
        query = query_fingerprint("api_keys", user_id, show_revoked)
        cursor = decode_page_token(page_token, expected_query=query)
        after = cursor_time_and_id(cursor) if cursor else None
        async with self._stores.read() as store:
            found = list(
                await store.list_keys(
                    user_id, now=self._clock(), include_inactive=show_revoked, after=after, limit=limit + 1
                )
            )
        page, more = found[:limit], len(found) > limit
        next_token = ""
        if more:
            last = page[-1]
            next_token = encode_page_token(
                PageCursor(after=(last.created_at.isoformat(), last.id), query=query)
            )
        return ApiKeyPage(api_keys=tuple(page), next_page_token=next_token)

    async def revoke(self, user_id: str, key_id: str, *, actor_user_id: str | None = None) -> ApiKey:
        """Revoke one of the user's keys; another user's (or an unknown) id is NOT_FOUND.

        Writes `api_key.revoked` (once: revoking again changes nothing) and evicts the key from
        this process's cache. `actor_user_id` defaults to the owner; pass an administrator's id.
        """
        now = self._clock()
        async with self._stores.write() as store:
            stored = await store.find_by_id(key_id)
            if stored is None or stored.api_key.user_id != user_id:
                raise NotFound(
                    "No such API key.", reason="NOT_FOUND", metadata={"resource": "api_key", "id": key_id}
                )
            api_key = stored.api_key
            if await store.revoke_key(key_id, now=now):
                store.record_event(
                    subject=user_id,
                    payload=events_pb2.ApiKeyRevoked(
                        user_id=user_id,
                        api_key_id=key_id,
                        actor_user_id=user_id if actor_user_id is None else actor_user_id,
                    ),
                )
                api_key = replace(api_key, revoked_at=now)
        self._cache.pop(stored.secret_hash, None)
        return api_key

    def forget_user(self, user_id: str) -> int:
        """Evict every cached check of a user's keys (after disabling them, or changing their roles
        or plan); returns how many were evicted. Other replicas catch up within the TTL."""
        stale = [digest for digest, entry in self._cache.items() if entry.identity.user_id == user_id]
        for digest in stale:
            del self._cache[digest]
        return len(stale)

    async def check(self, plaintext: str) -> ApiKeyIdentity:
        """The identity a presented key acts for.

        Raises `Unauthenticated` API_KEY_INVALID (malformed, unknown or wrong secret),
        API_KEY_REVOKED or API_KEY_EXPIRED, and `PermissionDenied` ACCOUNT_DISABLED.
        """
        match = _KEY_PATTERN.fullmatch(plaintext) if len(plaintext) == KEY_LENGTH else None
        if match is None:
            raise _invalid_key("malformed")
        digest = secret_hash(plaintext)
        now = self._clock()
        cached = self._cached(digest, now)
        if cached is not None:
            if cached.key_expires_at is not None and cached.key_expires_at <= now:
                self._cache.pop(digest, None)
                raise _expired_key()
            await self._mark_used(cached, now)
            return cached.identity
        async with self._stores.read() as store:
            stored = await store.find_by_prefix(match.group("prefix"))
        # compare_digest on the hex digests: equal lengths, time independent of where they differ.
        if stored is None or not hmac.compare_digest(digest, stored.secret_hash):
            raise _invalid_key("unknown")
        api_key, owner = stored.api_key, stored.owner
        if api_key.revoked_at is not None:
            raise Unauthenticated("This API key has been revoked.", reason="API_KEY_REVOKED")
        if api_key.expires_at is not None and api_key.expires_at <= now:
            raise _expired_key()
        if owner.disabled:
            raise PermissionDenied(
                "The account this API key belongs to is disabled.", reason="ACCOUNT_DISABLED"
            )
        entry = _CachedCheck(
            identity=ApiKeyIdentity(
                user_id=api_key.user_id,
                key_id=api_key.id,
                scopes=api_key.scopes,
                plan_id=owner.plan_id,
                roles=owner.roles,
                email_verified=owner.email_verified,
            ),
            key_expires_at=api_key.expires_at,
            cached_at=now,
            last_used_at=api_key.last_used_at,
        )
        self._remember(digest, entry)
        await self._mark_used(entry, now)
        return entry.identity

    def _cached(self, digest: str, now: datetime) -> _CachedCheck | None:
        entry = self._cache.get(digest)
        if entry is None:
            return None
        if now - entry.cached_at >= self._cache_ttl or now < entry.cached_at:
            del self._cache[digest]
            return None
        self._cache.move_to_end(digest)
        return entry

    def _remember(self, digest: str, entry: _CachedCheck) -> None:
        if not self.cache_enabled:
            return
        self._cache[digest] = entry
        self._cache.move_to_end(digest)
        while len(self._cache) > self._cache_max_entries:
            self._cache.popitem(last=False)

    async def _mark_used(self, entry: _CachedCheck, now: datetime) -> None:
        """Write `last_used_at` when the one we know of is a minute old or more; best effort."""
        last = entry.last_used_at
        if last is not None and now - last < self._last_used_interval:
            return
        # Set first: concurrent checks of the same key in this process then skip the write.
        entry.last_used_at = now
        try:
            async with self._stores.write() as store:
                await store.mark_used(
                    entry.identity.key_id, now=now, unless_since=now - self._last_used_interval
                )
        except Unavailable:
            # The key was verified; a missed usage timestamp must not turn that into a failure.
            logger.warning("could not record last use of API key %s", entry.identity.key_id)


def normalize_scopes(scopes: Collection[str]) -> tuple[str, ...]:
    """Deduplicated and sorted; empty or containing "*" becomes ("*",). Unknown scopes are kept
    (and reported by validation)."""
    unique = {scope.strip() for scope in scopes}
    if not unique or ALL_SCOPES in unique:
        return (ALL_SCOPES,)
    return tuple(sorted(unique))


def _creation_violations(
    name: str, scopes: Collection[str], expires_at: datetime | None, now: datetime
) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if not name:
        violations.append(FieldViolation("name", "Give the key a name."))
    elif len(name) > NAME_MAX:
        violations.append(FieldViolation("name", f"The name must be at most {NAME_MAX} characters."))
    allowed = ", ".join(sorted(ALLOWED_SCOPES))
    for index, scope in enumerate(scopes):
        if scope.strip() not in ALLOWED_SCOPES:
            violations.append(
                FieldViolation(f"scopes[{index}]", f"Unknown scope {scope!r}; choose from {allowed}.")
            )
    if expires_at is not None:
        if expires_at.tzinfo is None:
            violations.append(FieldViolation("expire_time", "The expiry needs a time zone."))
        elif expires_at <= now:
            violations.append(FieldViolation("expire_time", "The expiry must be in the future."))
    return violations


def _invalid_key(cause: str) -> Unauthenticated:
    return Unauthenticated("The API key is not valid.", reason="API_KEY_INVALID", metadata={"cause": cause})


def _expired_key() -> Unauthenticated:
    return Unauthenticated("This API key has expired.", reason="API_KEY_EXPIRED")
