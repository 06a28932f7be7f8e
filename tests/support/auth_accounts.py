"""Shared pieces of the auth account contract suites: real argon2 with cheap parameters, a settable
clock, the services wired over a test database, and readers for the outbox and error details."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import update

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
from services.common.events import event_type_for
from services.common.revocation import InMemoryRevocationList
from services.common.sql_unit_of_work import SqlUnitsOfWork
from tests.support.domain import START, Clock, PayloadT, outbox, payloads

ACCESS_TTL = timedelta(minutes=15)
# Real argon2id, at the smallest cost argon2 accepts, so each hash takes well under a millisecond.
CHEAP_ARGON2 = Argon2Parameters(time_cost=1, memory_cost_kib=64, parallelism=1)
STRONG_PASSWORD = "violet-harbour-lantern-42"
OTHER_PASSWORD = "copper-meadow-falcon-77"


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
