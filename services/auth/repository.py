"""Auth's SQL: every repository of `services.auth.ports`, and the unit of work that binds them.

`auth_units_of_work(database)` is the one way auth persists: each unit of work is one transaction
(`services.common.sql_unit_of_work`), and its repositories share that session, never commit, and
return the domain's frozen dataclasses (no ORM record leaves this module). Times are passed in by
the caller (its injectable clock), never read here.

The hot reads (user by id, active sessions of a user, session by id, API key by prefix) are
distinct methods, so each can get its own faster statement without touching the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from typing import Any, Final

from sqlalchemy import (
    Integer,
    Row,
    String,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import exc as sqlalchemy_errors
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from services.auth.accounts import User
from services.auth.api_keys import ApiKey, KeyOwner, StoredApiKey
from services.auth.models import (
    ApiKeyRecord,
    LoginThrottleRecord,
    OneTimeTokenRecord,
    RefreshTokenRecord,
    SessionRecord,
    SigningKeyRecord,
    UserRecord,
)
from services.auth.ports import (
    API_KEY_CHECK_CACHE,
    USER_CACHE,
    AuthUnitOfWork,
    EmailTaken,
    OneTimeToken,
    StoredSigningKey,
    UserCredentials,
    UserQuery,
)
from services.auth.sessions import (
    AuthMethod,
    RevokeReason,
    Session,
    SessionOwner,
    StoredRefreshToken,
    StoredSession,
)
from services.auth.throttle import ThrottleState
from services.common.db import Database
from services.common.hot_reads import HotRead
from services.common.models import UTCDateTime, new_id
from services.common.processed_events import record_processed
from services.common.roles import ordered_roles
from services.common.sql_unit_of_work import SqlOutbox, SqlTransaction, SqlUnitsOfWork

EVENT_SOURCE: Final = "auth"

# Serialises signing-key creation and rotation across replicas on PostgreSQL (SQLite's BEGIN
# IMMEDIATE already serialises writers). Any fixed 64-bit number works; this one is derived from a name.
_SIGNING_KEYS_LOCK_ID: Final = int.from_bytes(
    hashlib.sha256(b"parley.auth.signing_keys").digest()[:8], "big", signed=True
)


def auth_units_of_work(database: Database) -> SqlUnitsOfWork[AuthUnitOfWork]:
    """Auth's units of work over `database`; register after-commit hooks on the result."""
    return SqlUnitsOfWork(database, source=EVENT_SOURCE, bind=SqlAuthUnitOfWork)


class SqlAuthUnitOfWork:
    """`AuthUnitOfWork` over one SQL transaction; repositories are built when first used."""

    def __init__(self, transaction: SqlTransaction) -> None:
        self._transaction = transaction

    @cached_property
    def users(self) -> SqlUserRepository:
        return SqlUserRepository(self._transaction)

    @cached_property
    def tokens(self) -> SqlOneTimeTokenRepository:
        return SqlOneTimeTokenRepository(self._transaction.session)

    @cached_property
    def throttle(self) -> SqlThrottleRepository:
        return SqlThrottleRepository(self._transaction.session)

    @cached_property
    def sessions(self) -> SqlSessionRepository:
        return SqlSessionRepository(self._transaction)

    @cached_property
    def api_keys(self) -> SqlApiKeyRepository:
        return SqlApiKeyRepository(self._transaction)

    @cached_property
    def signing_keys(self) -> SqlSigningKeyRepository:
        return SqlSigningKeyRepository(self._transaction.session)

    @property
    def outbox(self) -> SqlOutbox:
        return self._transaction.outbox

    def record_processed(self, consumer: str, event_id: str) -> None:
        record_processed(self._transaction.session, consumer, event_id)


# --------------------------------------------------------------------------------------------------
# Users
# --------------------------------------------------------------------------------------------------


def _role_held(role: str) -> ColumnElement[bool]:
    """Whether `users.roles` (a JSON list of names) contains `role`.

    `json` on PostgreSQL has no containment operator (only `jsonb` does), and SQLite stores the list
    as text; both render the list as text with each name in double quotes, so a LIKE on the quoted
    name is exact for role names (lower-case letters, never containing quotes or LIKE wildcards).
    """
    return cast(UserRecord.roles, String).like(f'%"{role}"%')


def _user_of(record: UserRecord) -> User:
    return User(
        id=record.id,
        email=record.email,
        display_name=record.display_name,
        roles=ordered_roles(record.roles),
        plan_id=record.plan_id,
        plan_changed_at=record.plan_changed_at,
        plan_change_recorded_at=record.plan_change_recorded_at,
        email_verified_at=record.email_verified_at,
        last_login_at=record.last_login_at,
        disabled_at=record.disabled_at,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


# GetCurrentUser's read (on a read-cache miss). Its rows have the attributes `_user_of` reads.
_USER_BY_ID: Final = HotRead(
    select(*UserRecord.__table__.columns).where(UserRecord.id == bindparam("user_id")), _user_of
)


class SqlUserRepository:
    """Rows of `users`."""

    def __init__(self, transaction: SqlTransaction) -> None:
        self._transaction = transaction
        self._changes = transaction.changes

    @property
    def _session(self) -> AsyncSession:
        return self._transaction.session

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
        record = UserRecord(
            id=new_id(),
            email=email,
            display_name=display_name,
            password_hash=password_hash,
            roles=list(roles),
            plan_id=plan_id,
            plan_changed_at=None,
            plan_change_recorded_at=None,
            email_verified_at=email_verified_at,
            last_login_at=None,
            disabled_at=None,
            created_at=now,
            updated_at=now,
        )
        self._session.add(record)
        try:
            # A savepoint, so a losing racer's transaction stays usable for whatever the caller does next.
            async with self._session.begin_nested():
                await self._session.flush()
        except sqlalchemy_errors.IntegrityError as error:
            raise EmailTaken(email) from error
        return _user_of(record)

    async def by_id(self, user_id: str, *, for_update: bool = False) -> User | None:
        if not for_update:
            return await self._transaction.fetch_first(_USER_BY_ID, user_id=user_id)
        record = await self._record(UserRecord.id == user_id, for_update=for_update)
        return None if record is None else _user_of(record)

    async def by_email(self, email: str, *, for_update: bool = False) -> User | None:
        record = await self._record(UserRecord.email == email, for_update=for_update)
        return None if record is None else _user_of(record)

    async def credentials_by_id(self, user_id: str, *, for_update: bool = False) -> UserCredentials | None:
        record = await self._record(UserRecord.id == user_id, for_update=for_update)
        return None if record is None else UserCredentials(_user_of(record), record.password_hash)

    async def credentials_by_email(self, email: str) -> UserCredentials | None:
        record = await self._record(UserRecord.email == email, for_update=False)
        return None if record is None else UserCredentials(_user_of(record), record.password_hash)

    async def _record(self, condition: ColumnElement[bool], *, for_update: bool) -> UserRecord | None:
        query = select(UserRecord).where(condition)
        if for_update:
            query = query.with_for_update()
        return (await self._session.scalars(query.execution_options(populate_existing=True))).first()

    async def save(self, user: User, *, now: datetime, password_hash: str | None = None) -> User:
        values: dict[str, Any] = {
            "display_name": user.display_name,
            "roles": list(user.roles),
            "plan_id": user.plan_id,
            "plan_changed_at": user.plan_changed_at,
            "plan_change_recorded_at": user.plan_change_recorded_at,
            "email_verified_at": user.email_verified_at,
            "last_login_at": user.last_login_at,
            "disabled_at": user.disabled_at,
            "updated_at": now,
        }
        if password_hash is not None:
            values["password_hash"] = password_hash
        await self._session.execute(
            update(UserRecord)
            .where(UserRecord.id == user.id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        self._changes.mark_stale(USER_CACHE, user.id)
        return User(
            id=user.id,
            email=user.email,
            display_name=user.display_name,
            roles=ordered_roles(user.roles),
            plan_id=user.plan_id,
            plan_changed_at=user.plan_changed_at,
            plan_change_recorded_at=user.plan_change_recorded_at,
            email_verified_at=user.email_verified_at,
            last_login_at=user.last_login_at,
            disabled_at=user.disabled_at,
            created_at=user.created_at,
            updated_at=now,
        )

    async def enabled_admin_ids(self, *, for_update: bool = False) -> list[str]:
        query = (
            select(UserRecord.id)
            .where(_role_held("admin"), UserRecord.disabled_at.is_(None))
            .order_by(UserRecord.id)
        )
        if for_update:
            query = query.with_for_update()
        return list((await self._session.scalars(query)).all())

    async def list_after(
        self, query: UserQuery, *, after: tuple[datetime, str] | None, limit: int
    ) -> Sequence[User]:
        statement = (
            select(UserRecord).order_by(UserRecord.created_at.desc(), UserRecord.id.desc()).limit(limit)
        )
        for condition in _conditions(query):
            statement = statement.where(condition)
        if after is not None:
            created_at, user_id = after
            statement = statement.where(
                or_(
                    UserRecord.created_at < created_at,
                    and_(UserRecord.created_at == created_at, UserRecord.id < user_id),
                )
            )
        return [_user_of(record) for record in (await self._session.scalars(statement)).all()]


def _conditions(query: UserQuery) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if query.text:
        matches = [func.lower(UserRecord.display_name).contains(query.text.lower(), autoescape=True)]
        matches += [UserRecord.email.contains(text, autoescape=True) for text in query.email_texts]
        conditions.append(or_(*matches))
    if query.role is not None:
        conditions.append(_role_held(query.role))
    if query.plan_id:
        conditions.append(UserRecord.plan_id == query.plan_id)
    if query.disabled is not None:
        conditions.append(
            UserRecord.disabled_at.is_not(None) if query.disabled else UserRecord.disabled_at.is_(None)
        )
    if query.email_verified is not None:
        conditions.append(
            UserRecord.email_verified_at.is_not(None)
            if query.email_verified
            else UserRecord.email_verified_at.is_(None)
        )
    if query.created_at_or_after is not None:
        conditions.append(UserRecord.created_at >= query.created_at_or_after)
    if query.created_before is not None:
        conditions.append(UserRecord.created_at < query.created_before)
    return conditions


# --------------------------------------------------------------------------------------------------
# One-time tokens and sign-in throttles
# --------------------------------------------------------------------------------------------------


def _token_of(record: OneTimeTokenRecord) -> OneTimeToken:
    return OneTimeToken(
        id=record.id,
        user_id=record.user_id,
        purpose=record.purpose,
        expires_at=record.expires_at,
        used_at=record.used_at,
    )


class SqlOneTimeTokenRepository:
    """Rows of `one_time_tokens`: hashed, single-use, expiring email tokens."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(
        self, *, user_id: str, purpose: str, token_hash: str, expires_at: datetime, now: datetime
    ) -> OneTimeToken:
        record = OneTimeTokenRecord(
            id=new_id(),
            user_id=user_id,
            purpose=purpose,
            token_hash=token_hash,
            expires_at=expires_at,
            used_at=None,
            created_at=now,
            updated_at=now,
        )
        self._session.add(record)
        await self._session.flush()
        return _token_of(record)

    async def find(self, token_hash: str, purpose: str) -> OneTimeToken | None:
        record = (
            await self._session.scalars(
                select(OneTimeTokenRecord).where(
                    OneTimeTokenRecord.token_hash == token_hash, OneTimeTokenRecord.purpose == purpose
                )
            )
        ).first()
        return None if record is None else _token_of(record)

    async def consume(self, token_id: str, *, now: datetime) -> bool:
        """Mark the token used if it is still unused and unexpired; False when another caller won.

        One conditional UPDATE: on PostgreSQL a concurrent consumer waits for the row lock, then
        re-checks `used_at` and updates nothing.
        """
        result: Any = await self._session.execute(
            update(OneTimeTokenRecord)
            .where(
                OneTimeTokenRecord.id == token_id,
                OneTimeTokenRecord.used_at.is_(None),
                OneTimeTokenRecord.expires_at > now,
            )
            .values(used_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)

    async def discard_unused(self, user_id: str, purpose: str) -> int:
        """Delete the user's unused tokens of `purpose`, so only the newest link works."""
        result: Any = await self._session.execute(
            delete(OneTimeTokenRecord)
            .where(
                OneTimeTokenRecord.user_id == user_id,
                OneTimeTokenRecord.purpose == purpose,
                OneTimeTokenRecord.used_at.is_(None),
            )
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount or 0)

    async def latest_issued_at(self, user_id: str, purpose: str) -> datetime | None:
        """When the user's newest token of `purpose` was issued, used or not."""
        latest: datetime | None = await self._session.scalar(
            select(OneTimeTokenRecord.created_at)
            .where(OneTimeTokenRecord.user_id == user_id, OneTimeTokenRecord.purpose == purpose)
            .order_by(OneTimeTokenRecord.created_at.desc())
            .limit(1)
        )
        return latest


class SqlThrottleRepository:
    """Rows of `login_throttles`."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def states(self, keys: Sequence[str]) -> Mapping[str, ThrottleState]:
        if not keys:
            return {}
        rows = await self._session.scalars(
            select(LoginThrottleRecord)
            .where(LoginThrottleRecord.key.in_(list(keys)))
            .execution_options(populate_existing=True)
        )
        return {
            row.key: ThrottleState(
                key=row.key,
                failures=row.failures,
                last_failure_at=row.last_failure_at,
                locked_until=row.locked_until,
            )
            for row in rows
        }

    async def add_failure(self, key: str, *, now: datetime, forget_before: datetime) -> int:
        """One atomic upsert: concurrent failures of the same key each count (PostgreSQL locks the
        row for the rest of the transaction; SQLite has one writer at a time)."""
        dialect = self._session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        record = LoginThrottleRecord
        values = insert(record).values(key=key, failures=1, last_failure_at=now, locked_until=None)
        forgotten = record.last_failure_at < bindparam("forget_before", forget_before, type_=UTCDateTime())
        statement = values.on_conflict_do_update(
            index_elements=[record.key],
            set_={
                "failures": case((forgotten, 1), else_=record.failures + 1),
                "last_failure_at": values.excluded.last_failure_at,
            },
        ).returning(record.failures)
        failures: int = (await self._session.execute(statement)).scalar_one()
        return failures

    async def lock(self, key: str, until: datetime) -> None:
        await self._session.execute(
            update(LoginThrottleRecord)
            .where(LoginThrottleRecord.key == key)
            .values(locked_until=until)
            .execution_options(synchronize_session=False)
        )

    async def clear(self, key: str) -> None:
        await self._session.execute(
            delete(LoginThrottleRecord)
            .where(LoginThrottleRecord.key == key)
            .execution_options(synchronize_session=False)
        )


# --------------------------------------------------------------------------------------------------
# Sessions, refresh tokens and API keys
# --------------------------------------------------------------------------------------------------

# The columns a `Session` is built from, in one place so RETURNING and SELECT agree.
_SESSION_COLUMNS: Final = (
    SessionRecord.id,
    SessionRecord.user_id,
    SessionRecord.auth_method,
    SessionRecord.device,
    SessionRecord.user_agent,
    SessionRecord.ip_address,
    SessionRecord.created_at,
    SessionRecord.last_seen_at,
    SessionRecord.expires_at,
    SessionRecord.revoked_at,
    SessionRecord.revoke_reason,
)
_OWNER_COLUMNS: Final = (
    UserRecord.plan_id.label("owner_plan_id"),
    UserRecord.roles.label("owner_roles"),
    UserRecord.email_verified_at.label("owner_email_verified_at"),
    UserRecord.disabled_at.label("owner_disabled_at"),
)


def _session_of(row: Row[*tuple[Any, ...]]) -> Session:
    return Session(
        id=row.id,
        user_id=row.user_id,
        auth_method=AuthMethod(row.auth_method),
        device=row.device,
        user_agent=row.user_agent,
        ip_address=row.ip_address,
        created_at=row.created_at,
        last_seen_at=row.last_seen_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        revoke_reason=row.revoke_reason,
    )


def _session_owner_of(row: Row[*tuple[Any, ...]]) -> SessionOwner:
    return SessionOwner(
        user_id=row.user_id,
        plan_id=row.owner_plan_id,
        roles=tuple(row.owner_roles),
        email_verified=row.owner_email_verified_at is not None,
        disabled=row.owner_disabled_at is not None,
    )


def _api_key_of(row: Row[*tuple[Any, ...]]) -> ApiKey:
    return ApiKey(
        id=row.id,
        user_id=row.user_id,
        name=row.name,
        prefix=row.prefix,
        last_four=row.last_four,
        scopes=tuple(row.scopes),
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


class SqlSessionRepository:
    """Rows of `sessions` and `refresh_tokens`; the owner's columns are read from `users`, joined."""

    def __init__(self, transaction: SqlTransaction) -> None:
        self._transaction = transaction

    @property
    def _session(self) -> AsyncSession:
        return self._transaction.session

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
    ) -> Session:
        record = SessionRecord(
            user_id=user_id,
            auth_method=auth_method.value,
            device=device,
            user_agent=user_agent,
            ip_address=ip_address,
            last_seen_at=now,
            expires_at=expires_at,
            csrf_token_hash=csrf_token_hash,
            created_at=now,
            updated_at=now,
        )
        self._session.add(record)
        await self._session.flush()
        return Session(
            id=record.id,
            user_id=record.user_id,
            auth_method=auth_method,
            device=record.device,
            user_agent=record.user_agent,
            ip_address=record.ip_address,
            created_at=now,
            last_seen_at=now,
            expires_at=expires_at,
            revoked_at=None,
            revoke_reason=None,
        )

    async def add_refresh_token(self, *, session_id: str, token_hash: str, expires_at: datetime) -> None:
        self._session.add(
            RefreshTokenRecord(session_id=session_id, token_hash=token_hash, expires_at=expires_at)
        )
        await self._session.flush()

    async def find_refresh_token(self, token_hash: str) -> StoredRefreshToken | None:
        row = (
            await self._session.execute(
                select(
                    RefreshTokenRecord.id.label("token_id"),
                    RefreshTokenRecord.expires_at.label("token_expires_at"),
                    RefreshTokenRecord.rotated_at.label("token_rotated_at"),
                    *_SESSION_COLUMNS,
                    *_OWNER_COLUMNS,
                )
                .join(SessionRecord, SessionRecord.id == RefreshTokenRecord.session_id)
                .join(UserRecord, UserRecord.id == SessionRecord.user_id)
                .where(RefreshTokenRecord.token_hash == token_hash)
            )
        ).one_or_none()
        if row is None:
            return None
        return StoredRefreshToken(
            id=row.token_id,
            session=_session_of(row),
            owner=_session_owner_of(row),
            expires_at=row.token_expires_at,
            rotated_at=row.token_rotated_at,
        )

    async def spend_refresh_token(self, token_id: str, *, now: datetime) -> bool:
        # The conditional UPDATE is the whole concurrency story: under READ COMMITTED a concurrent
        # spender waits for our row lock, then re-checks `rotated_at IS NULL` and matches nothing.
        result = await self._session.execute(
            update(RefreshTokenRecord)
            .where(RefreshTokenRecord.id == token_id, RefreshTokenRecord.rotated_at.is_(None))
            .values(rotated_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return _rows_changed(result) == 1

    async def extend_session(
        self,
        session_id: str,
        *,
        now: datetime,
        ip_address: str,
        expires_at: datetime,
        csrf_token_hash: str | None,
    ) -> Session | None:
        values: dict[str, Any] = {
            "last_seen_at": now,
            "ip_address": ip_address,
            "expires_at": expires_at,
            "updated_at": now,
        }
        if csrf_token_hash is not None:
            values["csrf_token_hash"] = csrf_token_hash
        row = (
            await self._session.execute(
                update(SessionRecord)
                .where(SessionRecord.id == session_id, SessionRecord.revoked_at.is_(None))
                .values(**values)
                .returning(*_SESSION_COLUMNS)
                .execution_options(synchronize_session=False)
            )
        ).one_or_none()
        return None if row is None else _session_of(row)

    async def find_session(self, session_id: str) -> StoredSession | None:
        return await self._transaction.fetch_first(_SESSION_BY_ID, session_id=session_id)

    async def revoke_session(self, session_id: str, *, now: datetime, reason: RevokeReason) -> bool:
        result = await self._session.execute(
            update(SessionRecord)
            .where(SessionRecord.id == session_id, SessionRecord.revoked_at.is_(None))
            .values(revoked_at=now, revoke_reason=reason.value, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return _rows_changed(result) == 1

    async def revoke_user_sessions(
        self, user_id: str, *, except_session_id: str | None, now: datetime, reason: RevokeReason
    ) -> Sequence[str]:
        conditions: list[ColumnElement[bool]] = [
            SessionRecord.user_id == user_id,
            SessionRecord.revoked_at.is_(None),
        ]
        if except_session_id is not None:
            conditions.append(SessionRecord.id != except_session_id)
        ids = (
            await self._session.scalars(
                update(SessionRecord)
                .where(*conditions)
                .values(revoked_at=now, revoke_reason=reason.value, updated_at=now)
                .returning(SessionRecord.id)
                .execution_options(synchronize_session=False)
            )
        ).all()
        return sorted(ids)

    async def has_other_session_on(self, user_id: str, *, device: str, except_session_id: str) -> bool:
        found = await self._session.scalar(
            select(SessionRecord.id)
            .where(
                SessionRecord.user_id == user_id,
                SessionRecord.device == device,
                SessionRecord.id != except_session_id,
            )
            .limit(1)
        )
        return found is not None

    async def list_active_sessions(
        self, user_id: str, *, now: datetime, after: tuple[datetime, str] | None, limit: int
    ) -> Sequence[Session]:
        if after is None:
            return await self._transaction.fetch_all(_ACTIVE_SESSIONS, user_id=user_id, now=now, limit=limit)
        after_last_seen, after_id = after
        return await self._transaction.fetch_all(
            _ACTIVE_SESSIONS_AFTER,
            user_id=user_id,
            now=now,
            limit=limit,
            after_last_seen=after_last_seen,
            after_id=after_id,
        )


# Built once: constructing the statement costs more Python time than running it on SQLite.
_ACTIVE_SESSIONS_SELECT: Final = (
    select(*_SESSION_COLUMNS)
    .where(
        SessionRecord.user_id == bindparam("user_id"),
        SessionRecord.revoked_at.is_(None),
        SessionRecord.expires_at > bindparam("now"),
    )
    .order_by(SessionRecord.last_seen_at.desc(), SessionRecord.id.desc())
    .limit(bindparam("limit", type_=Integer))
)
# ListSessions' read, the first page and the next ones. The keyset condition is spelled out rather
# than a row-value comparison, so the datetime is bound with the column's UTC type on SQLite too.
_ACTIVE_SESSIONS: Final = HotRead(_ACTIVE_SESSIONS_SELECT, _session_of)
_ACTIVE_SESSIONS_AFTER: Final = HotRead(
    _ACTIVE_SESSIONS_SELECT.where(
        or_(
            SessionRecord.last_seen_at < bindparam("after_last_seen"),
            and_(
                SessionRecord.last_seen_at == bindparam("after_last_seen"),
                SessionRecord.id < bindparam("after_id"),
            ),
        )
    ),
    _session_of,
)


def _stored_session_of(row: Any) -> StoredSession:
    return StoredSession(
        session=_session_of(row), csrf_token_hash=row.csrf_token_hash, owner=_session_owner_of(row)
    )


# CheckSession's read: every cookie-authenticated request at the gateway asks it.
_SESSION_BY_ID: Final = HotRead(
    select(*_SESSION_COLUMNS, SessionRecord.csrf_token_hash, *_OWNER_COLUMNS)
    .join(UserRecord, UserRecord.id == SessionRecord.user_id)
    .where(SessionRecord.id == bindparam("session_id")),
    _stored_session_of,
)


_API_KEY_COLUMNS: Final = (
    ApiKeyRecord.id,
    ApiKeyRecord.user_id,
    ApiKeyRecord.name,
    ApiKeyRecord.prefix,
    ApiKeyRecord.last_four,
    ApiKeyRecord.scopes,
    ApiKeyRecord.created_at,
    ApiKeyRecord.expires_at,
    ApiKeyRecord.last_used_at,
    ApiKeyRecord.revoked_at,
)


def _stored_api_key_of(row: Any) -> StoredApiKey:
    return StoredApiKey(
        api_key=_api_key_of(row),
        secret_hash=row.secret_hash,
        owner=KeyOwner(
            plan_id=row.owner_plan_id,
            roles=tuple(row.owner_roles),
            email_verified=row.owner_email_verified_at is not None,
            disabled=row.owner_disabled_at is not None,
        ),
    )


_STORED_API_KEY: Final = select(*_API_KEY_COLUMNS, ApiKeyRecord.secret_hash, *_OWNER_COLUMNS).join(
    UserRecord, UserRecord.id == ApiKeyRecord.user_id
)
# CheckApiKey's read (on a miss of its cache), and the look-up before a revocation.
_API_KEY_BY_PREFIX: Final = HotRead(
    _STORED_API_KEY.where(ApiKeyRecord.prefix == bindparam("prefix")), _stored_api_key_of
)
_API_KEY_BY_ID: Final = HotRead(
    _STORED_API_KEY.where(ApiKeyRecord.id == bindparam("key_id")), _stored_api_key_of
)


class SqlApiKeyRepository:
    """Rows of `api_keys`; the owner's columns are read from `users`, joined."""

    def __init__(self, transaction: SqlTransaction) -> None:
        self._transaction = transaction
        self._changes = transaction.changes

    @property
    def _session(self) -> AsyncSession:
        return self._transaction.session

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
    ) -> ApiKey:
        record = ApiKeyRecord(
            user_id=user_id,
            name=name,
            prefix=prefix,
            last_four=last_four,
            secret_hash=secret_hash,
            scopes=list(scopes),
            expires_at=expires_at,
            created_at=now,
            updated_at=now,
        )
        self._session.add(record)
        await self._session.flush()
        return ApiKey(
            id=record.id,
            user_id=user_id,
            name=name,
            prefix=prefix,
            last_four=last_four,
            scopes=tuple(scopes),
            created_at=now,
            expires_at=expires_at,
            last_used_at=None,
            revoked_at=None,
        )

    async def find_by_prefix(self, prefix: str) -> StoredApiKey | None:
        return await self._transaction.fetch_first(_API_KEY_BY_PREFIX, prefix=prefix)

    async def find_by_id(self, key_id: str) -> StoredApiKey | None:
        return await self._transaction.fetch_first(_API_KEY_BY_ID, key_id=key_id)

    async def list_keys(
        self,
        user_id: str,
        *,
        now: datetime,
        include_inactive: bool,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> Sequence[ApiKey]:
        query = (
            select(*_API_KEY_COLUMNS)
            .where(ApiKeyRecord.user_id == user_id)
            .order_by(ApiKeyRecord.created_at.desc(), ApiKeyRecord.id.desc())
            .limit(limit)
        )
        if not include_inactive:
            query = query.where(
                ApiKeyRecord.revoked_at.is_(None),
                or_(ApiKeyRecord.expires_at.is_(None), ApiKeyRecord.expires_at > now),
            )
        if after is not None:
            created, key_id = after
            query = query.where(
                or_(
                    ApiKeyRecord.created_at < created,
                    and_(ApiKeyRecord.created_at == created, ApiKeyRecord.id < key_id),
                )
            )
        rows = (await self._session.execute(query)).all()
        return [_api_key_of(row) for row in rows]

    async def revoke_key(self, key_id: str, *, now: datetime, secret_hash: str) -> bool:
        result = await self._session.execute(
            update(ApiKeyRecord)
            .where(ApiKeyRecord.id == key_id, ApiKeyRecord.revoked_at.is_(None))
            .values(revoked_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        self._changes.mark_stale(API_KEY_CHECK_CACHE, secret_hash)
        return _rows_changed(result) == 1

    async def mark_used(self, key_id: str, *, now: datetime, unless_since: datetime) -> None:
        # Conditional, so several replicas noticing the same stale timestamp write it once a minute.
        await self._session.execute(
            update(ApiKeyRecord)
            .where(
                ApiKeyRecord.id == key_id,
                or_(ApiKeyRecord.last_used_at.is_(None), ApiKeyRecord.last_used_at <= unless_since),
            )
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )


def _rows_changed(result: object) -> int:
    """The row count of an UPDATE (the async session types its result as a plain `Result`)."""
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


# --------------------------------------------------------------------------------------------------
# Signing keys
# --------------------------------------------------------------------------------------------------


def _signing_key_of(record: SigningKeyRecord) -> StoredSigningKey:
    return StoredSigningKey(
        kid=record.kid,
        algorithm=record.algorithm,
        public_jwk=dict(record.public_jwk),
        private_key_encrypted=bytes(record.private_key_encrypted),
        created_at=record.created_at,
        retired_at=record.retired_at,
    )


class SqlSigningKeyRepository:
    """Rows of `signing_keys`, and the PostgreSQL advisory lock that serialises their changes."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def lock(self) -> None:
        if self._session.get_bind().dialect.name == "postgresql":
            await self._session.execute(
                text("SELECT pg_advisory_xact_lock(:lock_id)"), {"lock_id": _SIGNING_KEYS_LOCK_ID}
            )

    async def active(self) -> StoredSigningKey | None:
        record = (
            await self._session.scalars(
                select(SigningKeyRecord)
                .where(SigningKeyRecord.retired_at.is_(None))
                .order_by(SigningKeyRecord.created_at.desc())
                .limit(1)
            )
        ).first()
        return None if record is None else _signing_key_of(record)

    async def contains(self, kid: str) -> bool:
        return await self._session.get(SigningKeyRecord, kid) is not None

    async def retire_active(self, *, at: datetime) -> None:
        await self._session.execute(
            update(SigningKeyRecord).where(SigningKeyRecord.retired_at.is_(None)).values(retired_at=at)
        )

    async def add(self, key: StoredSigningKey) -> None:
        self._session.add(
            SigningKeyRecord(
                kid=key.kid,
                algorithm=key.algorithm,
                public_jwk=dict(key.public_jwk),
                private_key_encrypted=key.private_key_encrypted,
                created_at=key.created_at,
                retired_at=key.retired_at,
            )
        )
        await self._session.flush()

    async def published(self, *, retired_after: datetime) -> Sequence[Mapping[str, str]]:
        records = (
            await self._session.scalars(
                select(SigningKeyRecord)
                .where(SigningKeyRecord.retired_at.is_(None) | (SigningKeyRecord.retired_at > retired_after))
                .order_by(SigningKeyRecord.retired_at.is_not(None), SigningKeyRecord.created_at.desc())
            )
        ).all()
        return [dict(record.public_jwk) for record in records]
