"""One transaction per RPC: a state change and its events commit together, or neither does.

A fault is injected inside the writing unit of work, after the state change and before its event
(or between two parts of the state change), through a wrapper of the real SQL units of work; then
the database is read to check that nothing of the operation persisted. Each fault test has a
companion in which the same operation succeeds and everything is there. Also: the after-commit
hooks (cache invalidation) run only after a commit, on every path that changes a user.
On SQLite and PostgreSQL.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import cast

import pytest
from google.protobuf.message import Message
from sqlalchemy import func, select

from parley.events.v1 import events_pb2
from services.auth.accounts import AccountService
from services.auth.api_keys import ApiKeyManager
from services.auth.models import LoginThrottleRecord, OneTimeTokenRecord, RefreshTokenRecord, SessionRecord
from services.auth.passwords import PasswordHasher, PasswordPolicy
from services.auth.ports import USER_CACHE, AuthUnitOfWork, SessionRepository
from services.auth.repository import auth_units_of_work
from services.auth.sessions import SessionManager
from services.common.db import Database
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.events import event_type_for
from services.common.revocation import InMemoryRevocationList
from services.common.sql_unit_of_work import SqlUnitsOfWork
from services.common.unit_of_work import Outbox, StaleEntry
from tests.support.auth_accounts import (
    ACCESS_TTL,
    CHEAP_ARGON2,
    OTHER_PASSWORD,
    STRONG_PASSWORD,
    fast_settings,
    set_disabled,
)
from tests.support.domain import Clock, outbox

IP = "203.0.113.9"
NEW_PASSWORD = "amber-orchard-kettle-19"


class InjectedFaultError(Exception):
    """The failure a test injects inside a unit of work."""


@dataclass
class Faults:
    """What the next writing units of work fail on: recording an event of a type, or a call of a
    sessions-repository method. Disarmed until a test arms it."""

    event_types: set[str] = field(default_factory=set)
    session_methods: set[str] = field(default_factory=set)
    tripped: list[str] = field(default_factory=list)

    def trip(self, what: str) -> None:
        self.tripped.append(what)
        raise InjectedFaultError(what)


class FaultyUnits:
    """The real SQL units of work, whose writing units fail where `faults` says."""

    def __init__(self, units: SqlUnitsOfWork[AuthUnitOfWork], faults: Faults) -> None:
        self._units = units
        self._faults = faults

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AuthUnitOfWork]:
        async with self._units.write() as uow:
            # Structurally an AuthUnitOfWork: every attribute but the faulty ones is the real one.
            yield cast(AuthUnitOfWork, _FaultyUnitOfWork(uow, self._faults))

    def read(self) -> contextlib.AbstractAsyncContextManager[AuthUnitOfWork]:
        return self._units.read()


class _FaultyUnitOfWork:
    def __init__(self, inner: AuthUnitOfWork, faults: Faults) -> None:
        self._inner = inner
        self.outbox = _FaultyOutbox(inner.outbox, faults)
        self.sessions = _FaultySessions(inner.sessions, faults)

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


class _FaultyOutbox:
    def __init__(self, inner: Outbox, faults: Faults) -> None:
        self._inner = inner
        self._faults = faults

    def record(self, *, subject: str, payload: Message, deliver_after: datetime | None = None) -> None:
        event_type = event_type_for(payload)
        if event_type in self._faults.event_types:
            self._faults.trip(event_type)
        self._inner.record(subject=subject, payload=payload, deliver_after=deliver_after)


class _FaultySessions:
    def __init__(self, inner: SessionRepository, faults: Faults) -> None:
        self._inner = inner
        self._faults = faults

    def __getattr__(self, name: str) -> object:
        method = getattr(self._inner, name)
        if name not in self._faults.session_methods:
            return method

        async def failing(*args: object, **kwargs: object) -> object:
            await method(*args, **kwargs)
            self._faults.trip(name)
            raise AssertionError("unreachable")

        return failing


@dataclass
class World:
    database: Database
    units: SqlUnitsOfWork[AuthUnitOfWork]
    faults: Faults
    clock: Clock
    sessions: SessionManager
    accounts: AccountService
    stale: list[frozenset[StaleEntry]]


@pytest.fixture
def world(database: Database) -> World:
    clock = Clock()
    units = auth_units_of_work(database)
    stale: list[frozenset[StaleEntry]] = []

    async def remember(entries: frozenset[StaleEntry]) -> None:
        stale.append(entries)

    units.after_commit(remember)
    faults = Faults()
    faulty = FaultyUnits(units, faults)
    sessions = SessionManager(faulty, InMemoryRevocationList(clock=clock), access_ttl=ACCESS_TTL, clock=clock)
    accounts = AccountService(
        faulty,
        hasher=PasswordHasher(CHEAP_ARGON2),
        policy=PasswordPolicy(),
        sessions=sessions,
        settings=fast_settings(),
        clock=clock,
    )
    return World(database, units, faults, clock, sessions, accounts, stale)


async def count(database: Database, model: type[object], *conditions: object) -> int:
    async with database.unit_of_work(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*conditions)) or 0)  # type: ignore[arg-type]


async def unused_reset_tokens(database: Database) -> int:
    return await count(
        database,
        OneTimeTokenRecord,
        OneTimeTokenRecord.purpose == "reset_password",
        OneTimeTokenRecord.used_at.is_(None),
    )


async def event_types(database: Database) -> list[str]:
    return [item.type for item in await outbox(database)]


async def registered(world: World, email: str = "ada@example.com") -> str:
    user = await world.accounts.register(email, STRONG_PASSWORD, "Ada")
    return user.id


# ---- login ---------------------------------------------------------------------------------------


async def test_a_login_that_fails_between_its_session_and_its_event_leaves_neither(world: World) -> None:
    user_id = await registered(world)
    before = await event_types(world.database)
    world.faults.event_types.add("user.login_succeeded")

    with pytest.raises(InjectedFaultError):
        await world.accounts.sign_in("ada@example.com", STRONG_PASSWORD, client_ip=IP, device_name="Laptop")

    assert world.faults.tripped == ["user.login_succeeded"]
    assert await count(world.database, SessionRecord) == 0
    assert await count(world.database, RefreshTokenRecord) == 0
    assert await event_types(world.database) == before
    async with world.units.read() as uow:
        user = await uow.users.by_id(user_id)
    assert user is not None
    assert user.last_login_at is None
    assert world.stale == []  # nothing committed, so nothing was invalidated


async def test_a_login_commits_its_session_token_stamp_and_event_together(world: World) -> None:
    user_id = await registered(world)

    signed_in = await world.accounts.sign_in(
        "ada@example.com", STRONG_PASSWORD, client_ip=IP, device_name="Laptop"
    )

    session_id = signed_in.started.session.id
    assert await count(world.database, SessionRecord, SessionRecord.id == session_id) == 1
    assert await count(world.database, RefreshTokenRecord, RefreshTokenRecord.session_id == session_id) == 1
    [event] = [item for item in await outbox(world.database) if item.type == "user.login_succeeded"]
    assert isinstance(event.payload, events_pb2.UserLoginSucceeded)
    assert (event.payload.session_id, event.payload.device, event.payload.new_device) == (
        session_id,
        "Laptop",
        True,
    )
    async with world.units.read() as uow:
        user = await uow.users.by_id(user_id)
    assert user is not None
    assert user.last_login_at == world.clock.now
    assert world.stale == [frozenset({StaleEntry(USER_CACHE, user_id)})]


async def test_a_failed_attempt_that_fails_before_its_event_counts_nothing(world: World) -> None:
    await registered(world)
    world.faults.event_types.add("user.login_failed")

    with pytest.raises(InjectedFaultError):
        await world.accounts.sign_in("ada@example.com", OTHER_PASSWORD, client_ip=IP)

    assert await count(world.database, LoginThrottleRecord) == 0
    world.faults.event_types.clear()
    with pytest.raises(Unauthenticated):
        await world.accounts.sign_in("ada@example.com", OTHER_PASSWORD, client_ip=IP)
    assert await count(world.database, LoginThrottleRecord) == 2  # the account and the client address
    assert (await event_types(world.database)).count("user.login_failed") == 1


# ---- refresh -------------------------------------------------------------------------------------


async def test_a_refresh_that_fails_before_its_successor_is_stored_spends_nothing(world: World) -> None:
    await registered(world)
    started = (await world.accounts.sign_in("ada@example.com", STRONG_PASSWORD, client_ip=IP)).started
    world.clock.advance(timedelta(minutes=5))
    world.faults.session_methods.add("add_refresh_token")

    with pytest.raises(InjectedFaultError):
        await world.sessions.refresh(started.refresh_token, ip_address="198.51.100.7")

    async with world.units.read() as uow:
        stored = await uow.sessions.find_session(started.session.id)
    assert stored is not None
    assert stored.session.last_seen_at == started.session.last_seen_at
    assert stored.session.ip_address == IP
    assert await count(world.database, RefreshTokenRecord, RefreshTokenRecord.rotated_at.is_not(None)) == 0
    world.faults.session_methods.clear()
    # The token was never spent, so it still works (no reuse detected).
    refreshed = await world.sessions.refresh(started.refresh_token, ip_address="198.51.100.7")
    assert refreshed.session.last_seen_at == world.clock.now


async def test_a_refresh_commits_the_spent_token_the_successor_and_the_extension_together(
    world: World,
) -> None:
    await registered(world)
    started = (await world.accounts.sign_in("ada@example.com", STRONG_PASSWORD, client_ip=IP)).started
    world.clock.advance(timedelta(minutes=5))

    refreshed = await world.sessions.refresh(started.refresh_token, ip_address="198.51.100.7")

    assert await count(world.database, RefreshTokenRecord, RefreshTokenRecord.rotated_at.is_not(None)) == 1
    assert await count(world.database, RefreshTokenRecord, RefreshTokenRecord.rotated_at.is_(None)) == 1
    async with world.units.read() as uow:
        stored = await uow.sessions.find_session(started.session.id)
    assert stored is not None
    assert (stored.session.last_seen_at, stored.session.ip_address) == (world.clock.now, "198.51.100.7")
    assert stored.session.expires_at == refreshed.session.expires_at


async def test_a_detected_reuse_that_fails_before_its_events_revokes_nothing(world: World) -> None:
    await registered(world)
    started = (await world.accounts.sign_in("ada@example.com", STRONG_PASSWORD, client_ip=IP)).started
    await world.sessions.refresh(started.refresh_token)
    world.faults.event_types.add("session.reuse_detected")

    with pytest.raises(InjectedFaultError):
        await world.sessions.refresh(started.refresh_token)

    assert await count(world.database, SessionRecord, SessionRecord.revoked_at.is_not(None)) == 0
    assert "session.revoked" not in await event_types(world.database)
    world.faults.event_types.clear()
    with pytest.raises(Unauthenticated) as reused:
        await world.sessions.refresh(started.refresh_token)
    assert reused.value.reason == "REFRESH_TOKEN_REUSED"
    assert await count(world.database, SessionRecord, SessionRecord.revoke_reason == "reuse_detected") == 1
    types = await event_types(world.database)
    assert (types.count("session.reuse_detected"), types.count("session.revoked")) == (1, 1)


# ---- password change -----------------------------------------------------------------------------


async def test_a_password_change_that_fails_before_its_event_changes_nothing(world: World) -> None:
    user_id = await registered(world)
    here = (await world.accounts.sign_in("ada@example.com", STRONG_PASSWORD, client_ip=IP)).started
    await world.accounts.sign_in("ada@example.com", STRONG_PASSWORD, client_ip=IP)
    await world.accounts.forgot_password("ada@example.com")
    world.stale.clear()
    world.faults.event_types.add("user.password_changed")

    with pytest.raises(InjectedFaultError):
        await world.accounts.change_password(
            user_id, STRONG_PASSWORD, NEW_PASSWORD, current_session_id=here.session.id
        )

    assert await count(world.database, SessionRecord, SessionRecord.revoked_at.is_not(None)) == 0
    assert await unused_reset_tokens(world.database) == 1
    types = await event_types(world.database)
    assert "session.revoked" not in types and "user.password_changed" not in types
    assert world.stale == []
    # The old password still signs in; the new one does not.
    await world.accounts.sign_in("ada@example.com", STRONG_PASSWORD, client_ip=IP)
    with pytest.raises(Unauthenticated):
        await world.accounts.sign_in("ada@example.com", NEW_PASSWORD, client_ip=IP)


async def test_a_password_change_commits_the_hash_the_revocations_and_the_events_together(
    world: World,
) -> None:
    user_id = await registered(world)
    here = (await world.accounts.sign_in("ada@example.com", STRONG_PASSWORD, client_ip=IP)).started
    there = (await world.accounts.sign_in("ada@example.com", STRONG_PASSWORD, client_ip=IP)).started
    await world.accounts.forgot_password("ada@example.com")

    changed = await world.accounts.change_password(
        user_id, STRONG_PASSWORD, NEW_PASSWORD, current_session_id=here.session.id
    )

    assert changed.revoked.session_ids == (there.session.id,)
    assert await count(world.database, SessionRecord, SessionRecord.revoke_reason == "password_changed") == 1
    assert await unused_reset_tokens(world.database) == 0
    types = await event_types(world.database)
    assert (types.count("session.revoked"), types.count("user.password_changed")) == (1, 1)
    await world.accounts.sign_in("ada@example.com", NEW_PASSWORD, client_ip=IP)


# ---- invalidation after commit -------------------------------------------------------------------


async def test_every_path_that_changes_a_user_evicts_its_api_key_checks(world: World) -> None:
    """Not only the admin RPCs: a password change (here) goes through `users.save` too. (The keys
    hear no credential change: a list of their own, so only the after-commit hook evicts.)"""
    keys = ApiKeyManager(world.units, changes=InMemoryRevocationList(clock=world.clock), clock=world.clock)
    world.units.after_commit(keys.invalidate)
    user_id = await registered(world)
    created = await keys.create(user_id, name="ci")
    assert (await keys.check(created.plaintext)).user_id == user_id  # cached now

    await world.accounts.change_password(user_id, STRONG_PASSWORD, NEW_PASSWORD)
    # Behind the services' back, so only a fresh read of the database can see it.
    await set_disabled(world.database, user_id, True)

    with pytest.raises(PermissionDenied) as refused:
        await keys.check(created.plaintext)
    assert refused.value.reason == "ACCOUNT_DISABLED"


async def test_a_failing_after_commit_hook_does_not_undo_or_fail_the_write(world: World) -> None:
    async def broken(entries: frozenset[StaleEntry]) -> None:
        raise RuntimeError("the cache is on fire")

    world.units.after_commit(broken)
    seen: list[frozenset[StaleEntry]] = []

    async def later(entries: frozenset[StaleEntry]) -> None:
        seen.append(entries)

    world.units.after_commit(later)
    user_id = await registered(world)

    user = await world.accounts.update_profile(user_id, display_name="Ada L.", update_mask=["display_name"])

    assert user.display_name == "Ada L."
    assert seen == [frozenset({StaleEntry(USER_CACHE, user_id)})]
