"""Shared pieces of the auth account contract suites: real argon2 with cheap parameters, a settable
clock, the services wired over a test database, and readers for the outbox and error details."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from google.protobuf.message import Message
from sqlalchemy import select, update

from parley.events.v1 import events_pb2
from services.auth.accounts import AccountService, AccountSettings, User
from services.auth.admin import AccountAdmin
from services.auth.models import UserRecord
from services.auth.passwords import Argon2Parameters, PasswordHasher, PasswordPolicy
from services.auth.ports import AuthUnitOfWork
from services.auth.repository import auth_units_of_work
from services.auth.sessions import SessionManager
from services.common.db import Database
from services.common.errors import ParleyError
from services.common.events import event_type_for, payload_of
from services.common.outbox import OutboxEvent
from services.common.revocation import InMemoryRevocationList
from services.common.sql_unit_of_work import SqlUnitsOfWork

START = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)
ACCESS_TTL = timedelta(minutes=15)
# Real argon2id, at the smallest cost argon2 accepts, so each hash takes well under a millisecond.
CHEAP_ARGON2 = Argon2Parameters(time_cost=1, memory_cost_kib=64, parallelism=1)
STRONG_PASSWORD = "violet-harbour-lantern-42"
OTHER_PASSWORD = "copper-meadow-falcon-77"

ErrorT = TypeVar("ErrorT", bound=ParleyError)
PayloadT = TypeVar("PayloadT", bound=Message)


class Clock:
    """A settable clock shared by every component under test."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class AuthWorld:
    """The account services over one test database, sharing one clock and revocation list."""

    database: Database
    units: SqlUnitsOfWork[AuthUnitOfWork]
    clock: Clock
    hasher: PasswordHasher
    policy: PasswordPolicy
    sessions: SessionManager
    revocations: InMemoryRevocationList
    accounts: AccountService
    admin: AccountAdmin

    def with_settings(self, settings: AccountSettings) -> AccountService:
        """Another AccountService over the same database, with other settings."""
        return AccountService(
            self.units,
            hasher=self.hasher,
            policy=self.policy,
            sessions=self.sessions,
            settings=settings,
            clock=self.clock,
        )

    async def register(self, email: str, *, name: str = "Ada", password: str = STRONG_PASSWORD) -> User:
        return await self.accounts.register(email, password, name)

    async def registered_verified(self, email: str, *, name: str = "Ada") -> User:
        user = await self.register(email, name=name)
        token = await email_token(self.database, user.id, "verify_email")
        return await self.accounts.verify_email(token)


def fast_settings(**overrides: Any) -> AccountSettings:
    """Product defaults, except that forgot-password replies at once (its timing floor is tested apart)."""
    values: dict[str, Any] = {"forgot_password_min_duration": timedelta(0)}
    values.update(overrides)
    return AccountSettings(**values)


def build_world(database: Database, *, settings: AccountSettings | None = None) -> AuthWorld:
    clock = Clock()
    hasher = PasswordHasher(CHEAP_ARGON2)
    policy = PasswordPolicy()
    revocations = InMemoryRevocationList(clock=clock)
    units = auth_units_of_work(database)
    sessions = SessionManager(units, revocations, access_ttl=ACCESS_TTL, clock=clock)
    accounts = AccountService(
        units,
        hasher=hasher,
        policy=policy,
        sessions=sessions,
        settings=settings or fast_settings(),
        clock=clock,
    )
    admin = AccountAdmin(units, hasher=hasher, policy=policy, sessions=sessions, clock=clock)
    return AuthWorld(database, units, clock, hasher, policy, sessions, revocations, accounts, admin)


@dataclass(frozen=True)
class StoredEvent:
    type: str
    subject: str
    source: str
    event: events_pb2.Event
    payload: Message


async def outbox(database: Database, event_type: str | None = None) -> list[StoredEvent]:
    """The events in the outbox, oldest first (only those of `event_type` when given)."""
    async with database.unit_of_work(read_only=True) as session:
        rows = list(await session.scalars(select(OutboxEvent).order_by(OutboxEvent.sequence)))
    found = []
    for row in rows:
        event = events_pb2.Event.FromString(row.payload)
        assert event.type == row.event_type
        found.append(StoredEvent(row.event_type, row.subject, row.source, event, payload_of(event)))
    return [item for item in found if event_type is None or item.type == event_type]


async def payloads(database: Database, event_type: str, kind: type[PayloadT]) -> list[PayloadT]:
    found = []
    for item in await outbox(database, event_type):
        assert isinstance(item.payload, kind)
        found.append(item.payload)
    return found


async def user_events(database: Database, payload_type: type[PayloadT]) -> list[PayloadT]:
    """The payloads of the outbox events carrying `payload_type`, in order, each checked to come
    from auth with the user it is about as its subject."""
    found = []
    for item in await outbox(database, event_type_for(payload_type())):
        assert item.event.source == "auth"
        assert isinstance(item.payload, payload_type)
        assert item.event.subject == getattr(item.payload, "user_id")  # noqa: B009 - any payload type
        found.append(item.payload)
    return found


async def set_disabled(database: Database, user_id: str, disabled: bool) -> None:
    """Disable (at START) or re-enable a user directly in the table, bypassing the services."""
    async with database.unit_of_work() as session:
        await session.execute(
            update(UserRecord).where(UserRecord.id == user_id).values(disabled_at=START if disabled else None)
        )


async def email_token(database: Database, user_id: str, purpose: str) -> str:
    """The plaintext token of the newest email of `purpose` queued for the user, read from the outbox
    (the only place it exists in plaintext)."""
    template = {"verify_email": "verify_email", "reset_password": "password_reset"}[purpose]
    mails = [
        mail
        for mail in await payloads(database, "email.requested", events_pb2.EmailRequested)
        if mail.user_id == user_id and mail.template == template
    ]
    assert mails, f"no {template} email for {user_id}"
    return mails[-1].params["token"]


async def refusal(awaitable: Awaitable[object], kind: type[ErrorT]) -> ErrorT:
    """The error `awaitable` raises, checked to be a `kind`."""
    with pytest.raises(kind) as raised:
        await awaitable
    return raised.value


def shape(error: ParleyError) -> tuple[object, ...]:
    """Everything a client sees of an error, for comparing two replies."""
    return (
        type(error),
        error.code,
        error.reason,
        error.message,
        tuple(sorted(error.metadata.items())),
        error.field_violations,
        error.quota_violations,
    )


def violations(error: ParleyError) -> list[tuple[str, str]]:
    return [(violation.field, violation.reason) for violation in error.field_violations]
