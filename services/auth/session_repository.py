"""SQL for sessions, refresh tokens and API keys. Stores take a session and never commit.

The users table belongs to accounts; these stores only read it (joined), for the owner's plan,
roles, verification and disabled state.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Final, Generic, TypeVar

from google.protobuf.message import Message
from sqlalchemy import Integer, Row, and_, bindparam, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from services.auth.api_keys import ApiKey, KeyOwner, StoredApiKey
from services.auth.models import ApiKeyRecord, RefreshTokenRecord, SessionRecord, UserRecord
from services.auth.sessions import (
    AuthMethod,
    RevokeReason,
    Session,
    SessionOwner,
    StoredRefreshToken,
    StoredSession,
)
from services.common.db import Database
from services.common.hot_reads import HotRead
from services.common.outbox import add_event

EVENT_SOURCE: Final = "auth"

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


class SqlSessionStore:
    """Sessions and refresh tokens over SQLAlchemy (implements `sessions.SessionStore`)."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

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
        row = (
            await self._session.execute(
                select(*_SESSION_COLUMNS, SessionRecord.csrf_token_hash, *_OWNER_COLUMNS)
                .join(UserRecord, UserRecord.id == SessionRecord.user_id)
                .where(SessionRecord.id == session_id)
            )
        ).one_or_none()
        if row is None:
            return None
        return StoredSession(
            session=_session_of(row), csrf_token_hash=row.csrf_token_hash, owner=_session_owner_of(row)
        )

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

    async def list_active_sessions(
        self, user_id: str, *, now: datetime, after: tuple[datetime, str] | None, limit: int
    ) -> Sequence[Session]:
        parameters: dict[str, Any] = {"user_id": user_id, "now": now, "limit": limit}
        query = _ACTIVE_SESSIONS
        if after is not None:
            query = _ACTIVE_SESSIONS_AFTER
            parameters["after_last_seen"], parameters["after_id"] = after
        rows = (await self._session.execute(query, parameters)).all()
        return [_session_of(row) for row in rows]

    def record_event(self, *, subject: str, payload: Message) -> None:
        add_event(self._session, source=EVENT_SOURCE, subject=subject, payload=payload)


# Built once: constructing the statement costs more Python time than running it on SQLite.
_ACTIVE_SESSIONS: Final = (
    select(*_SESSION_COLUMNS)
    .where(
        SessionRecord.user_id == bindparam("user_id"),
        SessionRecord.revoked_at.is_(None),
        SessionRecord.expires_at > bindparam("now"),
    )
    .order_by(SessionRecord.last_seen_at.desc(), SessionRecord.id.desc())
    .limit(bindparam("limit", type_=Integer))
)
# Spelled out rather than a row-value comparison, so the datetime is bound with the column's UTC
# type on SQLite too.
_ACTIVE_SESSIONS_AFTER: Final = _ACTIVE_SESSIONS.where(
    or_(
        SessionRecord.last_seen_at < bindparam("after_last_seen"),
        and_(
            SessionRecord.last_seen_at == bindparam("after_last_seen"),
            SessionRecord.id < bindparam("after_id"),
        ),
    )
)


def _session_from_values(values: tuple[Any, ...]) -> Session:
    (id_, user_id, auth_method, device, user_agent, ip, created, last_seen, expires, revoked, reason) = values
    return Session(
        id=id_,
        user_id=user_id,
        auth_method=AuthMethod(auth_method),
        device=device,
        user_agent=user_agent,
        ip_address=ip,
        created_at=created,
        last_seen_at=last_seen,
        expires_at=expires,
        revoked_at=revoked,
        revoke_reason=reason,
    )


_HOT_ACTIVE_SESSIONS: Final = HotRead(_ACTIVE_SESSIONS, _session_from_values)
_HOT_ACTIVE_SESSIONS_AFTER: Final = HotRead(_ACTIVE_SESSIONS_AFTER, _session_from_values)

StoreT = TypeVar("StoreT")


class _StoresPerUnitOfWork(Generic[StoreT]):
    """Opens a unit of work per operation and hands out a store bound to it."""

    def __init__(self, database: Database, bind: Callable[[AsyncSession], StoreT]) -> None:
        self._database = database
        self._bind = bind

    @asynccontextmanager
    async def write(self) -> AsyncIterator[StoreT]:
        async with self._database.unit_of_work() as session:
            yield self._bind(session)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[StoreT]:
        async with self._database.unit_of_work(read_only=True) as session:
            yield self._bind(session)


class SqlSessionStores(_StoresPerUnitOfWork[SqlSessionStore]):
    """Opens a unit of work per operation and hands out a `SqlSessionStore` bound to it."""

    def __init__(self, database: Database) -> None:
        super().__init__(database, SqlSessionStore)

    async def list_active_sessions(
        self, user_id: str, *, now: datetime, after: tuple[datetime, str] | None, limit: int
    ) -> Sequence[Session]:
        """`SqlSessionStore.list_active_sessions` as a hot read: no unit of work around it."""
        if after is None:
            return await self._database.hot_reads.all(
                _HOT_ACTIVE_SESSIONS, user_id=user_id, now=now, limit=limit
            )
        return await self._database.hot_reads.all(
            _HOT_ACTIVE_SESSIONS_AFTER,
            user_id=user_id,
            now=now,
            limit=limit,
            after_last_seen=after[0],
            after_id=after[1],
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


class SqlApiKeyStore:
    """API keys over SQLAlchemy (implements `api_keys.ApiKeyStore`)."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

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
        return await self._find(ApiKeyRecord.prefix == prefix)

    async def find_by_id(self, key_id: str) -> StoredApiKey | None:
        return await self._find(ApiKeyRecord.id == key_id)

    async def _find(self, condition: ColumnElement[bool]) -> StoredApiKey | None:
        row = (
            await self._session.execute(
                select(*_API_KEY_COLUMNS, ApiKeyRecord.secret_hash, *_OWNER_COLUMNS)
                .join(UserRecord, UserRecord.id == ApiKeyRecord.user_id)
                .where(condition)
            )
        ).one_or_none()
        if row is None:
            return None
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

    async def revoke_key(self, key_id: str, *, now: datetime) -> bool:
        result = await self._session.execute(
            update(ApiKeyRecord)
            .where(ApiKeyRecord.id == key_id, ApiKeyRecord.revoked_at.is_(None))
            .values(revoked_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
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

    def record_event(self, *, subject: str, payload: Message) -> None:
        add_event(self._session, source=EVENT_SOURCE, subject=subject, payload=payload)


class SqlApiKeyStores(_StoresPerUnitOfWork[SqlApiKeyStore]):
    """Opens a unit of work per operation and hands out a `SqlApiKeyStore` bound to it."""

    def __init__(self, database: Database) -> None:
        super().__init__(database, SqlApiKeyStore)


def _rows_changed(result: object) -> int:
    """The row count of an UPDATE (the async session types its result as a plain `Result`)."""
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


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
