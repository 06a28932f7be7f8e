"""Auth's persistence as its domain sees it: one unit of work with typed repositories.

`AuthUnitsOfWork.write()` opens a writing unit of work (one transaction), `read()` a read-only
one; both yield an `AuthUnitOfWork` whose repositories return plain frozen dataclasses from the
domain modules. Repositories never commit, and take the caller's clock readings (`now`) instead of
reading one. Every change to a user goes through `users.save`, which marks the user's cached copies
stale, so the after-commit hooks drop them (the read cache of `GetCurrentUser`, the API-key check
cache), whichever path changed the user.

The SQL implementation is `services.auth.repository`; domain modules never import it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final, Protocol

from services.auth.emails import email_search_texts
from services.common.unit_of_work import Outbox, UnitsOfWork

if TYPE_CHECKING:
    from services.auth.accounts import User
    from services.auth.api_keys import ApiKey, StoredApiKey
    from services.auth.sessions import AuthMethod, RevokeReason, Session, StoredRefreshToken, StoredSession
    from services.auth.throttle import ThrottleState

# The name of the cache of users by id (`AccountService.get_user`); a user's entry is marked stale by
# every `UserRepository.save` and `add`, and the API-key check cache listens for the same marks.
USER_CACHE: Final = "auth.user.v1"
# Checked API keys by the SHA-256 of the whole key (`ApiKeyManager.check`); revoking one marks it stale.
API_KEY_CHECK_CACHE: Final = "auth.api_key_check.v1"


class EmailTaken(Exception):  # noqa: N818 - named for the condition, like KeyError.
    """The address is registered already (also when a concurrent registration won the race)."""


@dataclass(frozen=True)
class UserQuery:
    """Filters of the admin user list; unset filters match everything."""

    # Case-insensitive substring of the email or the display name.
    text: str = ""
    role: str | None = None
    plan_id: str = ""
    disabled: bool | None = None
    email_verified: bool | None = None
    created_at_or_after: datetime | None = None
    created_before: datetime | None = None

    @property
    def email_texts(self) -> tuple[str, ...]:
        """`text` as it may appear inside stored addresses (`emails.email_search_texts`); an address
        containing any of them matches."""
        return email_search_texts(self.text)


@dataclass(frozen=True)
class UserCredentials:
    """A user with their password hash: only the sign-in and password flows read the hash."""

    user: User
    password_hash: str


@dataclass(frozen=True)
class OneTimeToken:
    """A single-use emailed token (its hash stays in the repository)."""

    id: str
    user_id: str
    purpose: str
    expires_at: datetime
    used_at: datetime | None


@dataclass(frozen=True)
class StoredSigningKey:
    """A row of `signing_keys`: the public JWK and the private key sealed under the KEK."""

    kid: str
    algorithm: str
    public_jwk: Mapping[str, str]
    private_key_encrypted: bytes
    created_at: datetime
    retired_at: datetime | None


class UserRepository(Protocol):
    async def add(
        self,
        *,
        email: str,
        display_name: str,
        password_hash: str,
        roles: Sequence[str],
        plan_id: str,
        email_verified_at: datetime | None,
        now: datetime,
    ) -> User:
        """Insert a user; `EmailTaken` when the address is registered (the unit of work stays usable)."""
        ...

    async def by_id(self, user_id: str, *, for_update: bool = False) -> User | None:
        """The user (GetCurrentUser's hot read); `for_update` locks the row until the unit ends."""
        ...

    async def by_email(self, email: str, *, for_update: bool = False) -> User | None: ...

    async def credentials_by_id(
        self, user_id: str, *, for_update: bool = False
    ) -> UserCredentials | None: ...

    async def credentials_by_email(self, email: str) -> UserCredentials | None: ...

    async def save(self, user: User, *, now: datetime, password_hash: str | None = None) -> User:
        """Write the user's mutable fields (display name, roles, plan and when it changed,
        verification, last sign-in, disabled), and the password hash when given; returns the user as
        stored (`updated_at=now`).

        Marks the user's cached copies stale for after the commit.
        """
        ...

    async def enabled_admin_ids(self, *, for_update: bool = False) -> list[str]:
        """Ids of the enabled admins; `for_update` locks their rows (PostgreSQL), so two concurrent
        demotions cannot each see the other admin still in place."""
        ...

    async def list_after(
        self, query: UserQuery, *, after: tuple[datetime, str] | None, limit: int
    ) -> Sequence[User]:
        """Users matching `query` by (created_at, id) descending, strictly after `after`."""
        ...


class OneTimeTokenRepository(Protocol):
    async def add(
        self, *, user_id: str, purpose: str, token_hash: str, expires_at: datetime, now: datetime
    ) -> OneTimeToken: ...

    async def find(self, token_hash: str, purpose: str) -> OneTimeToken | None:
        """The token with this hash and purpose, used or not, expired or not."""
        ...

    async def consume(self, token_id: str, *, now: datetime) -> bool:
        """Mark it used if still unused and unexpired; False when another caller won."""
        ...

    async def discard_unused(self, user_id: str, purpose: str) -> int:
        """Delete the user's unused tokens of `purpose`, so only the newest link works."""
        ...

    async def latest_issued_at(self, user_id: str, purpose: str) -> datetime | None: ...


class ThrottleRepository(Protocol):
    """The sign-in failure counters (`login_throttles`)."""

    async def states(self, keys: Sequence[str]) -> Mapping[str, ThrottleState]:
        """The rows of those keys that exist."""
        ...

    async def add_failure(self, key: str, *, now: datetime, forget_before: datetime) -> int:
        """Count one failure atomically (restarting from 1 if the last one was before
        `forget_before`) and return the new count."""
        ...

    async def lock(self, key: str, until: datetime) -> None: ...

    async def clear(self, key: str) -> None:
        """Forget the key's failures and lock."""
        ...


class SessionRepository(Protocol):
    """Sessions and their refresh tokens."""

    async def add_session(
        self,
        *,
        user_id: str,
        auth_method: AuthMethod,
        device: str,
        user_agent: str,
        ip_address: str,
        now: datetime,
        expires_at: datetime,
        csrf_token_hash: str | None,
    ) -> Session: ...

    async def add_refresh_token(self, *, session_id: str, token_hash: str, expires_at: datetime) -> None: ...

    async def find_refresh_token(self, token_hash: str) -> StoredRefreshToken | None: ...

    async def spend_refresh_token(self, token_id: str, *, now: datetime) -> bool:
        """Set `rotated_at` if still unset; True only for the one caller that changed the row."""
        ...

    async def extend_session(
        self,
        session_id: str,
        *,
        now: datetime,
        ip_address: str,
        expires_at: datetime,
        csrf_token_hash: str | None,
    ) -> Session | None:
        """Record activity on a session that is still unrevoked; None when it was revoked meanwhile.

        `csrf_token_hash` None keeps the stored hash."""
        ...

    async def find_session(self, session_id: str) -> StoredSession | None:
        """The session with its owner (CheckSession's hot read)."""
        ...

    async def has_other_session_on(self, user_id: str, *, device: str, except_session_id: str) -> bool:
        """Whether the user signed in on `device` before (any session but `except_session_id`)."""
        ...

    async def revoke_session(self, session_id: str, *, now: datetime, reason: RevokeReason) -> bool:
        """Revoke if not yet revoked; True only when this call revoked it."""
        ...

    async def revoke_user_sessions(
        self, user_id: str, *, except_session_id: str | None, now: datetime, reason: RevokeReason
    ) -> Sequence[str]:
        """Revoke every unrevoked session of the user but one; the ids this call revoked."""
        ...

    async def list_active_sessions(
        self, user_id: str, *, now: datetime, after: tuple[datetime, str] | None, limit: int
    ) -> Sequence[Session]:
        """Unrevoked, unexpired sessions by (last_seen_at, id) descending, strictly after `after`
        (ListSessions' hot read)."""
        ...


class ApiKeyRepository(Protocol):
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

    async def find_by_prefix(self, prefix: str) -> StoredApiKey | None:
        """The key with its hash and owner (CheckApiKey's hot read)."""
        ...

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

    async def revoke_key(self, key_id: str, *, now: datetime, secret_hash: str) -> bool:
        """Revoke if not yet revoked; True only when this call revoked it. Marks the key's cached
        check (`secret_hash`) stale for after the commit."""
        ...

    async def mark_used(self, key_id: str, *, now: datetime, unless_since: datetime) -> None:
        """Set `last_used_at = now` unless it is already later than `unless_since`."""
        ...


class SigningKeyRepository(Protocol):
    async def lock(self) -> None:
        """Hold the signing-key lock until the unit of work ends, so creations and rotations never
        interleave across replicas."""
        ...

    async def active(self) -> StoredSigningKey | None:
        """The newest unretired key."""
        ...

    async def contains(self, kid: str) -> bool: ...

    async def retire_active(self, *, at: datetime) -> None:
        """Retire every unretired key at `at`."""
        ...

    async def add(self, key: StoredSigningKey) -> None: ...

    async def published(self, *, retired_after: datetime) -> Sequence[Mapping[str, str]]:
        """The public JWKs to publish: unretired keys first, then keys retired after `retired_after`,
        newest first within each."""
        ...


class AuthUnitOfWork(Protocol):
    """One transaction of the auth service, with its repositories and its outbox."""

    @property
    def users(self) -> UserRepository: ...

    @property
    def tokens(self) -> OneTimeTokenRepository: ...

    @property
    def throttle(self) -> ThrottleRepository: ...

    @property
    def sessions(self) -> SessionRepository: ...

    @property
    def api_keys(self) -> ApiKeyRepository: ...

    @property
    def signing_keys(self) -> SigningKeyRepository: ...

    def record_processed(self, consumer: str, event_id: str) -> None:
        """Record that `consumer` handled the event, committed with the handler's effect (a second
        commit of the same record fails, and the effect is rolled back with it)."""
        ...

    @property
    def outbox(self) -> Outbox: ...


AuthUnitsOfWork = UnitsOfWork[AuthUnitOfWork]
