"""API keys: programmatic credentials `pk_<prefix>_<secret>`, created, listed, revoked and checked.

Format: `pk_` + a 12-character lookup prefix (lowercase base32, 60 random bits, unique) + `_` +
a 43-character URL-safe secret (`opaque.new_secret()`, 256 bits). The database keeps the prefix,
the last four characters and the SHA-256 of the whole key; the plaintext is shown once, at creation.

A check parses the key (a malformed one is refused without touching the database), finds the row
by prefix, compares hashes in constant time, and refuses revoked and expired keys and keys of
disabled users. `last_used_at` is written at most once a minute per key, so a busy key does not
turn every request into a write.

Cache: a successful check is remembered in process for `cache_ttl_s` seconds (a
`services.common.credential_changes.WatchedCache`: bounded, least recently used first out), keyed by
the key's SHA-256, never by the plaintext. Three things clear it:
- the after-commit hook `invalidate`: revoking a key evicts that key, and any committed change to a
  user (disable, enable, roles, password, plan: every `users.save`) evicts that user's keys,
  whichever code path made the change, in this process;
- credential changes heard from the revocation list (`changes`), which every replica hears: a
  revoked key (announced by `revoke`), a disabled user, changed roles or password (announced by
  the session manager), so every replica, and every gateway edge, forgets the user's keys;
- a gap in hearing them: while the list is not confirmed current the cache answers nothing.
A check that a change overtook is not cached. `check(skip_cache=True)` (sensitive actions) reads
the database whatever is cached. `cache_ttl_s=0` turns the cache off (the benchmark runs with and
without it).

Creating a key may need a verified email address (`require_verified_email`); that rule is checked
from the users repository inside the same unit of work that inserts the key.

No SQL or gRPC here: storage is the auth unit of work's `api_keys` repository (`services.auth.ports`).
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Final

from parley.events.v1 import events_pb2
from services.auth.opaque import new_secret, secret_hash
from services.auth.ports import API_KEY_CHECK_CACHE, USER_CACHE, AuthUnitsOfWork
from services.common.clock import utc_now
from services.common.credential_changes import CredentialChangeFeed, WatchedCache
from services.common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from services.common.pagination import BY_TIME, Page, keyset_page
from services.common.unit_of_work import StaleEntry, keys_of

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

# The feature name `PARLEY_AUTH_REQUIRE_VERIFIED_EMAIL_FOR` uses for creating API keys.
API_KEYS_FEATURE: Final = "api_keys"

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


@dataclass
class _CachedCheck:
    identity: ApiKeyIdentity
    key_expires_at: datetime | None
    last_used_at: datetime | None


class ApiKeyManager:
    """Creates, lists, revokes and checks API keys."""

    def __init__(
        self,
        units: AuthUnitsOfWork,
        *,
        changes: CredentialChangeFeed,
        clock: Callable[[], datetime] = utc_now,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        cache_max_entries: int = DEFAULT_CACHE_MAX_ENTRIES,
        last_used_interval: timedelta = LAST_USED_INTERVAL,
        require_verified_email: bool = False,
    ) -> None:
        """`changes`: where revocations are announced and every replica hears credential changes
        (the revocation list). `require_verified_email`: creating a key needs a verified email."""
        if cache_ttl_s < 0 or cache_max_entries < 1:
            raise ValueError("cache_ttl_s must be >= 0 and cache_max_entries >= 1")
        self._units = units
        self._changes = changes
        self._clock = clock
        self._cache_ttl = timedelta(seconds=cache_ttl_s)
        self._last_used_interval = last_used_interval
        self._require_verified_email = require_verified_email
        # Full-key SHA-256 → the last successful check, timed by the injected clock.
        self._cache: WatchedCache[_CachedCheck] | None = None
        if cache_ttl_s > 0:
            hub = changes.credential_changes()
            self._cache = WatchedCache(
                max_entries=cache_max_entries,
                confirmed_age_s=hub.confirmed_age_s,
                timer=lambda: self._clock().timestamp(),
            )
            hub.subscribe(self._cache)

    @property
    def cache_ttl(self) -> timedelta:
        """How long a successful check may be reused (zero: the cache is off)."""
        return self._cache_ttl

    @property
    def cache_enabled(self) -> bool:
        return self._cache is not None

    async def create(
        self,
        user_id: str,
        *,
        name: str,
        scopes: Collection[str] = (),
        expires_at: datetime | None = None,
    ) -> CreatedApiKey:
        """Create a key; writes `api_key.created`. Invalid input is INVALID_ARGUMENT with one field
        violation per problem (`name`, `scopes[i]`, `expire_time`); an unknown user is NOT_FOUND, and
        an unverified one FAILED_PRECONDITION / EMAIL_NOT_VERIFIED when keys need a verified email."""
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
        async with self._units.write() as uow:
            owner = await uow.users.by_id(user_id)
            if owner is None:
                raise NotFound(
                    "No such user.", reason="NOT_FOUND", metadata={"resource": "user", "id": user_id}
                )
            if self._require_verified_email and not owner.email_verified:
                raise email_not_verified(API_KEYS_FEATURE)
            api_key = await uow.api_keys.add_key(
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
            uow.outbox.record(subject=user_id, payload=created)
        return CreatedApiKey(api_key=api_key, plaintext=plaintext)

    async def list_keys(
        self, user_id: str, *, page_size: int = 0, page_token: str = "", show_revoked: bool = False
    ) -> Page[ApiKey]:
        """The user's keys, newest first; revoked and expired ones only with `show_revoked`."""
        now = self._clock()

        async def fetch(after: tuple[datetime, str] | None, limit: int) -> Sequence[ApiKey]:
            async with self._units.read() as uow:
                return await uow.api_keys.list_keys(
                    user_id, now=now, include_inactive=show_revoked, after=after, limit=limit
                )

        return await keyset_page(
            page_size=page_size,
            page_token=page_token,
            query=("api_keys", user_id, show_revoked),
            sort_key=BY_TIME,
            position=lambda key: (key.created_at, key.id),
            fetch=fetch,
        )

    async def revoke(self, user_id: str, key_id: str, *, actor_user_id: str | None = None) -> ApiKey:
        """Revoke one of the user's keys; another user's (or an unknown) id is NOT_FOUND.

        Writes `api_key.revoked` (once: revoking again changes nothing); once that commits, the
        key's cached check is evicted here and the change is announced to every replica and gateway
        (again on every call, so a retry after a failed announcement repairs it). `actor_user_id`
        defaults to the owner; pass an administrator's id.
        """
        now = self._clock()
        async with self._units.write() as uow:
            stored = await uow.api_keys.find_by_id(key_id)
            if stored is None or stored.api_key.user_id != user_id:
                raise NotFound(
                    "No such API key.", reason="NOT_FOUND", metadata={"resource": "api_key", "id": key_id}
                )
            api_key = stored.api_key
            if await uow.api_keys.revoke_key(key_id, now=now, secret_hash=stored.secret_hash):
                uow.outbox.record(
                    subject=user_id,
                    payload=events_pb2.ApiKeyRevoked(
                        user_id=user_id,
                        api_key_id=key_id,
                        actor_user_id=user_id if actor_user_id is None else actor_user_id,
                    ),
                )
                api_key = replace(api_key, revoked_at=now)
        await self._changes.credentials_changed(user_id)
        return api_key

    async def invalidate(self, stale: frozenset[StaleEntry]) -> None:
        """The after-commit hook: evict the checks of revoked keys and of every key of a changed user."""
        if self._cache is None:
            return
        for digest in keys_of(stale, API_KEY_CHECK_CACHE):
            self._cache.pop(digest)
        for user_id in keys_of(stale, USER_CACHE):
            self.forget_user(user_id)

    def forget_user(self, user_id: str) -> int:
        """Evict every cached check of a user's keys in this process; returns how many were evicted."""
        return self._cache.forget_user(user_id) if self._cache is not None else 0

    async def check(self, plaintext: str, *, skip_cache: bool = False) -> ApiKeyIdentity:
        """The identity a presented key acts for; with `skip_cache`, read from the database even
        when a checked answer is cached (a sensitive action).

        Raises `Unauthenticated` API_KEY_INVALID (malformed, unknown or wrong secret),
        API_KEY_REVOKED or API_KEY_EXPIRED, and `PermissionDenied` ACCOUNT_DISABLED.
        """
        match = _KEY_PATTERN.fullmatch(plaintext) if len(plaintext) == KEY_LENGTH else None
        if match is None:
            raise _invalid_key("malformed")
        digest = secret_hash(plaintext)
        now = self._clock()
        cache = self._cache
        cached = cache.get(digest) if cache is not None and not skip_cache else None
        if cached is not None:
            if cached.key_expires_at is not None and cached.key_expires_at <= now:
                self._forget_check(digest)
                raise _expired_key()
            await self._mark_used(cached, now)
            return cached.identity
        ticket = cache.ticket() if cache is not None else None
        async with self._units.read() as uow:
            stored = await uow.api_keys.find_by_prefix(match.group("prefix"))
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
            last_used_at=api_key.last_used_at,
        )
        if cache is not None and ticket is not None:
            cache.put(digest, api_key.user_id, entry, ttl_s=self._cache_ttl.total_seconds(), ticket=ticket)
        await self._mark_used(entry, now)
        return entry.identity

    def _forget_check(self, digest: str) -> None:
        if self._cache is not None:
            self._cache.pop(digest)

    async def _mark_used(self, entry: _CachedCheck, now: datetime) -> None:
        """Write `last_used_at` when the one we know of is a minute old or more; best effort."""
        last = entry.last_used_at
        if last is not None and now - last < self._last_used_interval:
            return
        # Set first: concurrent checks of the same key in this process then skip the write.
        entry.last_used_at = now
        try:
            async with self._units.write() as uow:
                await uow.api_keys.mark_used(
                    entry.identity.key_id, now=now, unless_since=now - self._last_used_interval
                )
        except Unavailable:
            # The key was verified; a missed usage timestamp must not turn that into a failure.
            logger.warning("could not record last use of API key %s", entry.identity.key_id)


def email_not_verified(feature: str) -> FailedPrecondition:
    return FailedPrecondition(
        "Verify your email address to use this feature.",
        reason="EMAIL_NOT_VERIFIED",
        metadata={"feature": feature},
    )


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
