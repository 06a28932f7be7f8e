"""Auth's SQL for accounts: users, one-time tokens and login throttles.

Repositories take the caller's session and never commit: the unit of work around them does.
Times are passed in by the caller (its injectable clock), never read here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import String, and_, bindparam, case, cast, delete, func, or_, select, update
from sqlalchemy import exc as sqlalchemy_errors
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from services.auth.models import LoginThrottleRecord, OneTimeTokenRecord, SessionRecord, UserRecord
from services.auth.throttle import ThrottleState
from services.common.cache import mark_stale
from services.common.models import UTCDateTime, new_id

# The read cache of users by id (`AccountService.get_user`); every change to a user row goes
# through `UserRepository.save`, which marks the user's entry stale for after the commit.
USER_CACHE: Final = "auth.user.v1"


class EmailTaken(Exception):  # noqa: N818 - named for the condition, like KeyError.
    """The unique constraint on `users.email` refused the insert."""


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


def _role_held(role: str) -> ColumnElement[bool]:
    """Whether `users.roles` (a JSON list of names) contains `role`.

    `json` on PostgreSQL has no containment operator (only `jsonb` does), and SQLite stores the list
    as text; both render the list as text with each name in double quotes, so a LIKE on the quoted
    name is exact for role names (lower-case letters, never containing quotes or LIKE wildcards).
    """
    return cast(UserRecord.roles, String).like(f'%"{role}"%')


class UserRepository:
    """Rows of `users`."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

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
    ) -> UserRecord:
        """Insert a user; raises `EmailTaken` when the address is registered already (also when a
        concurrent transaction registered it first)."""
        record = UserRecord(
            id=new_id(),
            email=email,
            display_name=display_name,
            password_hash=password_hash,
            roles=list(roles),
            plan_id=plan_id,
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
        return record

    async def by_id(self, user_id: str, *, for_update: bool = False) -> UserRecord | None:
        query = select(UserRecord).where(UserRecord.id == user_id)
        if for_update:
            query = query.with_for_update()
        return (await self._session.scalars(query.execution_options(populate_existing=True))).first()

    async def by_email(self, email: str, *, for_update: bool = False) -> UserRecord | None:
        query = select(UserRecord).where(UserRecord.email == email)
        if for_update:
            query = query.with_for_update()
        return (await self._session.scalars(query.execution_options(populate_existing=True))).first()

    async def save(self, record: UserRecord, *, now: datetime) -> None:
        """Write the changes made to a loaded record, stamping `updated_at` with the caller's clock.

        The session must come from `services.common.cache.unit_of_work_invalidating`: the user's
        cached copy is deleted once the change commits.
        """
        record.updated_at = now
        await self._session.flush()
        mark_stale(self._session, USER_CACHE, record.id)

    async def has_other_session_on(self, user_id: str, *, device: str, except_session_id: str) -> bool:
        """Whether the user signed in on `device` before (any session but `except_session_id`)."""
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

    async def enabled_admin_ids(self, *, for_update: bool = False) -> list[str]:
        """Ids of the enabled users holding the admin role.

        `for_update` locks those rows on PostgreSQL, so two concurrent demotions cannot each see the
        other admin still in place; SQLite serializes writers anyway.
        """
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
    ) -> list[UserRecord]:
        """Users matching `query`, newest first (then by id, descending), after the cursor."""
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
        return list((await self._session.scalars(statement)).all())


def _conditions(query: UserQuery) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if query.text:
        needle = query.text.lower()
        conditions.append(
            or_(
                UserRecord.email.contains(needle, autoescape=True),
                func.lower(UserRecord.display_name).contains(needle, autoescape=True),
            )
        )
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


class OneTimeTokenRepository:
    """Rows of `one_time_tokens`: hashed, single-use, expiring email tokens."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(
        self, *, user_id: str, purpose: str, token_hash: str, expires_at: datetime, now: datetime
    ) -> OneTimeTokenRecord:
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
        return record

    async def find(self, token_hash: str, purpose: str) -> OneTimeTokenRecord | None:
        """The token with this hash and purpose, used or not, expired or not."""
        return (
            await self._session.scalars(
                select(OneTimeTokenRecord).where(
                    OneTimeTokenRecord.token_hash == token_hash, OneTimeTokenRecord.purpose == purpose
                )
            )
        ).first()

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


class LoginThrottleRepository:
    """Rows of `login_throttles`; implements `services.auth.throttle.ThrottleStore`."""

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
