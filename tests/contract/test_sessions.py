"""Contract of sessions and refresh tokens (services.auth.sessions over SQL), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import cast

import pytest
from sqlalchemy import select

from parley.events.v1 import events_pb2
from services.auth.models import RefreshTokenRecord, SessionRecord, UserRecord
from services.auth.opaque import secret_hash
from services.auth.ports import AuthUnitOfWork, SessionRepository
from services.auth.repository import auth_units_of_work
from services.auth.sessions import (
    AuthMethod,
    RefreshedSession,
    RevokeReason,
    SessionManager,
    StoredRefreshToken,
)
from services.common.db import Database
from services.common.errors import NotFound, ParleyError, PermissionDenied, Unauthenticated
from services.common.revocation import InMemoryRevocationList
from tests.support.auth_accounts import set_disabled, user_events
from tests.support.domain import START, Clock

FIREFOX_ON_LINUX = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"
ACCESS_TTL = timedelta(minutes=15)
REFRESH_TTL = timedelta(days=30)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def revocations(clock: Clock) -> InMemoryRevocationList:
    return InMemoryRevocationList(clock=clock)


@pytest.fixture
def manager(database: Database, revocations: InMemoryRevocationList, clock: Clock) -> SessionManager:
    return SessionManager(
        auth_units_of_work(database),
        revocations,
        refresh_ttl=REFRESH_TTL,
        access_ttl=ACCESS_TTL,
        clock=clock,
    )


async def add_user(database: Database, name: str, *, roles: tuple[str, ...] = ("user",)) -> str:
    async with database.unit_of_work() as session:
        user = UserRecord(
            email=f"{name}@example.com",
            display_name=name.title(),
            password_hash="not-a-real-hash",
            roles=list(roles),
            plan_id="pro",
            email_verified_at=START,
        )
        session.add(user)
        await session.flush()
        return user.id


@pytest.fixture
async def alice(database: Database) -> str:
    return await add_user(database, "alice", roles=("user", "admin"))


@pytest.fixture
async def bob(database: Database) -> str:
    return await add_user(database, "bob")


async def session_row(database: Database, session_id: str) -> SessionRecord:
    async with database.unit_of_work(read_only=True) as session:
        return (await session.scalars(select(SessionRecord).where(SessionRecord.id == session_id))).one()


async def refresh_rows(database: Database, session_id: str) -> list[RefreshTokenRecord]:
    async with database.unit_of_work(read_only=True) as session:
        return list(
            await session.scalars(
                select(RefreshTokenRecord)
                .where(RefreshTokenRecord.session_id == session_id)
                .order_by(RefreshTokenRecord.id)
            )
        )


async def fails_with(call: Awaitable[object], error_type: type[ParleyError], reason: str) -> ParleyError:
    with pytest.raises(error_type) as caught:
        await call
    assert caught.value.reason == reason
    return caught.value


# --- start ----------------------------------------------------------------------------------------


async def test_start_creates_a_session_with_a_hashed_refresh_token(
    manager: SessionManager, database: Database, alice: str
) -> None:
    started = await manager.start(
        alice, auth_method="jwt", user_agent=FIREFOX_ON_LINUX, ip_address="203.0.113.7"
    )

    session = started.session
    assert session.user_id == alice
    assert session.auth_method is AuthMethod.JWT
    assert session.device == "Firefox on Linux"
    assert session.ip_address == "203.0.113.7"
    assert session.created_at == session.last_seen_at == START
    assert session.expires_at == START + REFRESH_TTL
    assert started.csrf_token is None
    row = await session_row(database, session.id)
    assert row.csrf_token_hash is None
    assert row.user_agent == FIREFOX_ON_LINUX
    (token,) = await refresh_rows(database, session.id)
    assert token.token_hash == secret_hash(started.refresh_token)
    assert started.refresh_token not in {token.token_hash, row.csrf_token_hash}
    assert token.expires_at == session.expires_at
    assert token.rotated_at is None


async def test_cookie_session_gets_a_csrf_token_stored_hashed_and_a_chosen_device_name(
    manager: SessionManager, database: Database, alice: str
) -> None:
    started = await manager.start(
        alice, auth_method=AuthMethod.COOKIE, device_name="  Work laptop ", user_agent=FIREFOX_ON_LINUX
    )

    assert started.session.auth_method is AuthMethod.COOKIE
    assert started.session.device == "Work laptop"
    assert started.csrf_token
    row = await session_row(database, started.session.id)
    assert row.csrf_token_hash == secret_hash(started.csrf_token)


async def test_start_refuses_an_unknown_auth_method(manager: SessionManager, alice: str) -> None:
    with pytest.raises(ValueError, match="api_key"):
        await manager.start(alice, auth_method="api_key")


# --- refresh --------------------------------------------------------------------------------------


async def test_refresh_rotates_the_token_and_slides_the_session(
    manager: SessionManager, database: Database, clock: Clock, alice: str
) -> None:
    started = await manager.start(alice, auth_method="jwt", ip_address="203.0.113.7")
    clock.advance(timedelta(hours=5))

    refreshed = await manager.refresh(started.refresh_token, ip_address="198.51.100.9")

    assert refreshed.refresh_token != started.refresh_token
    assert refreshed.csrf_token is None
    assert refreshed.session.id == started.session.id
    assert refreshed.session.last_seen_at == clock.now
    assert refreshed.session.ip_address == "198.51.100.9"
    assert refreshed.session.expires_at == clock.now + REFRESH_TTL
    assert refreshed.owner.user_id == alice
    assert refreshed.owner.plan_id == "pro"
    assert refreshed.owner.roles == ("user", "admin")
    assert refreshed.owner.email_verified
    first, second = await refresh_rows(database, started.session.id)
    assert first.token_hash == secret_hash(started.refresh_token)
    assert first.rotated_at == clock.now
    assert second.token_hash == secret_hash(refreshed.refresh_token)
    assert second.rotated_at is None
    assert second.expires_at == clock.now + REFRESH_TTL
    row = await session_row(database, started.session.id)
    assert (row.last_seen_at, row.ip_address, row.expires_at) == (
        clock.now,
        "198.51.100.9",
        clock.now + REFRESH_TTL,
    )

    # The successor works in turn; a refresh without an address keeps the last one seen.
    again = await manager.refresh(refreshed.refresh_token)
    assert again.session.ip_address == "198.51.100.9"


async def test_refreshing_a_cookie_session_rotates_its_csrf_token(
    manager: SessionManager, alice: str
) -> None:
    started = await manager.start(alice, auth_method="cookie")
    assert started.csrf_token is not None

    refreshed = await manager.refresh(started.refresh_token)

    assert refreshed.csrf_token is not None
    assert refreshed.csrf_token != started.csrf_token
    await manager.check_session(started.session.id, refreshed.csrf_token)
    await fails_with(
        manager.check_session(started.session.id, started.csrf_token), PermissionDenied, "CSRF_TOKEN_MISMATCH"
    )


@pytest.mark.parametrize("token", ["", "no-such-token", "x" * 5000])
async def test_unknown_refresh_token_is_invalid(manager: SessionManager, alice: str, token: str) -> None:
    await manager.start(alice, auth_method="jwt")
    await fails_with(manager.refresh(token), Unauthenticated, "REFRESH_TOKEN_INVALID")


async def test_expired_refresh_token_is_invalid(manager: SessionManager, clock: Clock, alice: str) -> None:
    started = await manager.start(alice, auth_method="jwt")
    clock.advance(REFRESH_TTL - timedelta(seconds=1))
    refreshed = await manager.refresh(started.refresh_token)  # still valid, and slides the window

    clock.advance(REFRESH_TTL)
    await fails_with(manager.refresh(refreshed.refresh_token), Unauthenticated, "REFRESH_TOKEN_INVALID")


async def test_reusing_a_rotated_token_revokes_the_whole_family(
    manager: SessionManager,
    database: Database,
    revocations: InMemoryRevocationList,
    clock: Clock,
    alice: str,
) -> None:
    started = await manager.start(alice, auth_method="jwt")
    session_id = started.session.id
    legitimate = await manager.refresh(started.refresh_token)
    clock.advance(timedelta(minutes=3))

    await fails_with(
        manager.refresh(started.refresh_token, ip_address="192.0.2.66"),
        Unauthenticated,
        "REFRESH_TOKEN_REUSED",
    )

    row = await session_row(database, session_id)
    assert row.revoked_at == clock.now
    assert row.revoke_reason == "reuse_detected"
    assert await user_events(database, events_pb2.SessionReuseDetected) == [
        events_pb2.SessionReuseDetected(user_id=alice, session_id=session_id, ip_address="192.0.2.66")
    ]
    assert await user_events(database, events_pb2.SessionRevoked) == [
        events_pb2.SessionRevoked(
            user_id=alice, session_id=session_id, reason=events_pb2.SESSION_REVOKE_REASON_REUSE_DETECTED
        )
    ]
    # Access tokens of the session are refused until the last one could have expired.
    assert await revocations.is_revoked(session_id, alice, clock.now)
    clock.advance(ACCESS_TTL + timedelta(seconds=1))
    assert not await revocations.is_revoked(session_id, alice, clock.now)
    # The legitimate holder's successor token died with the family; so does any further reuse.
    await fails_with(manager.refresh(legitimate.refresh_token), Unauthenticated, "SESSION_REVOKED")
    await fails_with(manager.refresh(started.refresh_token), Unauthenticated, "SESSION_REVOKED")
    assert len(await user_events(database, events_pb2.SessionReuseDetected)) == 1


async def test_a_disabled_user_cannot_refresh_and_the_token_stays_unspent(
    manager: SessionManager, database: Database, alice: str
) -> None:
    started = await manager.start(alice, auth_method="jwt")
    await set_disabled(database, alice, True)

    await fails_with(manager.refresh(started.refresh_token), PermissionDenied, "ACCOUNT_DISABLED")

    (token,) = await refresh_rows(database, started.session.id)
    assert token.rotated_at is None
    await set_disabled(database, alice, False)
    await manager.refresh(started.refresh_token)


class RacingUnits:
    """Real SQL units of work, except that each refresh waits after its read until both have read.

    That forces the interleaving a real race may or may not produce: both transactions see the token
    unspent, so only the conditional UPDATE can tell them apart. Used on PostgreSQL only; SQLite
    serializes writing units of work, so a second reader could never arrive while the first waits.
    """

    def __init__(self, database: Database) -> None:
        self._units = auth_units_of_work(database)
        self.barrier = asyncio.Barrier(2)
        self.spends: list[bool] = []

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AuthUnitOfWork]:
        async with self._units.write() as uow:
            # Structurally an AuthUnitOfWork: every attribute but `sessions` is the real one.
            yield cast(AuthUnitOfWork, _RacingUnitOfWork(uow, self))

    def read(self) -> contextlib.AbstractAsyncContextManager[AuthUnitOfWork]:
        return self._units.read()


class _RacingUnitOfWork:
    """The real unit of work, with its sessions repository replaced by a racing one."""

    def __init__(self, inner: AuthUnitOfWork, race: RacingUnits) -> None:
        self._inner = inner
        self.sessions = _RacingSessions(inner.sessions, race)

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


class _RacingSessions:
    def __init__(self, inner: SessionRepository, race: RacingUnits) -> None:
        self._inner = inner
        self._race = race

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def find_refresh_token(self, token_hash: str) -> StoredRefreshToken | None:
        found = await self._inner.find_refresh_token(token_hash)
        async with asyncio.timeout(10):
            await self._race.barrier.wait()
        return found

    async def spend_refresh_token(self, token_id: str, *, now: datetime) -> bool:
        spent = await self._inner.spend_refresh_token(token_id, now=now)
        self._race.spends.append(spent)
        return spent


async def refresh_race(manager: SessionManager, token: str) -> tuple[RefreshedSession, ParleyError]:
    outcomes = await asyncio.gather(manager.refresh(token), manager.refresh(token), return_exceptions=True)
    winners = [outcome for outcome in outcomes if isinstance(outcome, RefreshedSession)]
    losers = [outcome for outcome in outcomes if isinstance(outcome, ParleyError)]
    assert len(winners) == 1, outcomes
    assert len(losers) == 1, outcomes
    return winners[0], losers[0]


@pytest.mark.parametrize("forced_interleaving", [False, True], ids=["natural", "both-read-first"])
async def test_concurrent_refreshes_of_one_token_let_exactly_one_win_and_revoke_the_family(
    database: Database,
    revocations: InMemoryRevocationList,
    clock: Clock,
    alice: str,
    forced_interleaving: bool,
) -> None:
    if forced_interleaving and database.dialect_name == "sqlite":
        pytest.skip("SQLite serializes writing units of work; both cannot read before either writes")
    racing = RacingUnits(database)
    units = racing if forced_interleaving else auth_units_of_work(database)
    manager = SessionManager(units, revocations, access_ttl=ACCESS_TTL, clock=clock)
    starter = SessionManager(auth_units_of_work(database), revocations, clock=clock)

    for _ in range(20):
        started = await starter.start(alice, auth_method="jwt")
        session_id = started.session.id

        winner, loser = await refresh_race(manager, started.refresh_token)

        assert loser.reason == "REFRESH_TOKEN_REUSED"
        assert isinstance(loser, Unauthenticated)
        row = await session_row(database, session_id)
        assert row.revoked_at is not None
        assert row.revoke_reason == "reuse_detected"
        assert await revocations.is_revoked(session_id, alice, clock.now)
        await fails_with(starter.refresh(winner.refresh_token), Unauthenticated, "SESSION_REVOKED")
        tokens = await refresh_rows(database, session_id)
        assert [token.rotated_at is not None for token in tokens] == [True, False]

    detected = await user_events(database, events_pb2.SessionReuseDetected)
    assert len(detected) == 20
    assert len({event.session_id for event in detected}) == 20
    assert len(await user_events(database, events_pb2.SessionRevoked)) == 20
    if forced_interleaving:
        # Both read the token unspent; the database let exactly one UPDATE through each time.
        assert racing.spends == [True, False] * 20


# --- listing ----------------------------------------------------------------------------------------


async def test_list_sessions_shows_active_ones_most_recent_first_and_flags_the_current(
    manager: SessionManager, clock: Clock, alice: str, bob: str
) -> None:
    phone = await manager.start(alice, auth_method="jwt", device_name="Phone")
    clock.advance(timedelta(hours=1))
    laptop = await manager.start(alice, auth_method="cookie", device_name="Laptop")
    clock.advance(timedelta(hours=1))
    tablet = await manager.start(alice, auth_method="jwt", device_name="Tablet")
    await manager.start(bob, auth_method="jwt", device_name="Bob's phone")
    clock.advance(timedelta(hours=1))
    await manager.refresh(phone.refresh_token)  # the phone is now the most recently used
    await manager.revoke(alice, tablet.session.id)

    page = await manager.list_sessions(alice, current_session_id=laptop.session.id)

    assert [(s.device, s.current) for s in page.items] == [("Phone", False), ("Laptop", True)]
    assert page.next_page_token == ""
    assert page.items[0].last_seen_at == clock.now

    first = await manager.list_sessions(alice, page_size=1)
    assert [s.device for s in first.items] == ["Phone"]
    second = await manager.list_sessions(alice, page_size=1, page_token=first.next_page_token)
    assert [s.device for s in second.items] == ["Laptop"]
    assert second.next_page_token == ""
    await fails_with(
        manager.list_sessions(bob, page_token=first.next_page_token), ParleyError, "INVALID_PAGE_TOKEN"
    )

    clock.advance(REFRESH_TTL - timedelta(minutes=1))  # the laptop, idle 2h longer, has expired
    assert [s.device for s in (await manager.list_sessions(alice)).items] == ["Phone"]


# --- revoking -------------------------------------------------------------------------------------


async def test_revoke_ends_the_owners_session_once(
    manager: SessionManager,
    database: Database,
    revocations: InMemoryRevocationList,
    clock: Clock,
    alice: str,
    bob: str,
) -> None:
    started = await manager.start(alice, auth_method="jwt")
    session_id = started.session.id

    await fails_with(manager.revoke(bob, session_id), NotFound, "NOT_FOUND")
    await fails_with(manager.revoke(alice, "no-such-session"), NotFound, "NOT_FOUND")
    assert (await session_row(database, session_id)).revoked_at is None

    revoked = await manager.revoke(alice, session_id)

    assert revoked.revoked_at == clock.now
    assert revoked.revoke_reason == "revoked"
    assert await user_events(database, events_pb2.SessionRevoked) == [
        events_pb2.SessionRevoked(
            user_id=alice,
            session_id=session_id,
            reason=events_pb2.SESSION_REVOKE_REASON_USER_REVOKED,
            actor_user_id=alice,
        )
    ]
    assert await revocations.is_revoked(session_id, alice, clock.now)
    await fails_with(manager.refresh(started.refresh_token), Unauthenticated, "SESSION_REVOKED")
    again = await manager.revoke(alice, session_id)
    assert again.revoked_at == revoked.revoked_at
    assert len(await user_events(database, events_pb2.SessionRevoked)) == 1


async def test_logout_ends_the_session_by_id_or_by_refresh_token(
    manager: SessionManager, database: Database, alice: str
) -> None:
    by_id = await manager.start(alice, auth_method="jwt")
    by_token = await manager.start(alice, auth_method="cookie")

    assert (await manager.logout(by_id.session.id)).revoke_reason == "logout"
    ended = await manager.logout_with_refresh_token(by_token.refresh_token)

    assert ended.id == by_token.session.id
    assert [event.reason for event in await user_events(database, events_pb2.SessionRevoked)] == [
        events_pb2.SESSION_REVOKE_REASON_LOGOUT,
        events_pb2.SESSION_REVOKE_REASON_LOGOUT,
    ]
    assert (await manager.list_sessions(alice)).items == ()
    await fails_with(manager.logout("no-such-session"), NotFound, "NOT_FOUND")
    await fails_with(
        manager.logout_with_refresh_token("no-such-token"), Unauthenticated, "REFRESH_TOKEN_INVALID"
    )


async def test_revoke_all_but_the_current_session_for_a_password_change(
    manager: SessionManager,
    database: Database,
    revocations: InMemoryRevocationList,
    clock: Clock,
    alice: str,
    bob: str,
) -> None:
    current = await manager.start(alice, auth_method="jwt")
    others = [await manager.start(alice, auth_method="jwt") for _ in range(2)]
    bobs = await manager.start(bob, auth_method="jwt")
    issued_earlier = clock.now
    clock.advance(timedelta(minutes=1))

    revoked = await manager.revoke_all(
        alice, reason=RevokeReason.PASSWORD_CHANGED, except_session_id=current.session.id, actor_user_id=alice
    )

    assert revoked.count == 2
    assert set(revoked.session_ids) == {other.session.id for other in others}
    assert [s.id for s in (await manager.list_sessions(alice)).items] == [current.session.id]
    assert {
        (e.session_id, e.reason, e.actor_user_id)
        for e in await user_events(database, events_pb2.SessionRevoked)
    } == {(other.session.id, events_pb2.SESSION_REVOKE_REASON_PASSWORD_CHANGED, alice) for other in others}
    for other in others:
        assert await revocations.is_revoked(other.session.id, alice, issued_earlier)
    # The kept session's tokens, and other users' sessions, stay valid.
    assert not await revocations.is_revoked(current.session.id, alice, issued_earlier)
    await manager.refresh(current.refresh_token)
    await manager.refresh(bobs.refresh_token)


async def test_revoke_all_for_a_disabled_user_also_cuts_every_earlier_token(
    manager: SessionManager,
    database: Database,
    revocations: InMemoryRevocationList,
    clock: Clock,
    alice: str,
) -> None:
    sessions = [await manager.start(alice, auth_method="jwt") for _ in range(3)]
    issued_earlier = clock.now
    clock.advance(timedelta(minutes=1))

    revoked = await manager.revoke_all(alice, reason=RevokeReason.USER_DISABLED, actor_user_id="admin-1")

    assert revoked.count == 3
    assert revoked.all_sessions
    rows = [await session_row(database, s.session.id) for s in sessions]
    assert {(row.revoked_at, row.revoke_reason) for row in rows} == {(clock.now, "user_disabled")}
    assert len(await user_events(database, events_pb2.SessionRevoked)) == 3
    assert await revocations.is_revoked("some-other-session", alice, issued_earlier)
    again = await manager.revoke_all(alice, reason=RevokeReason.USER_DISABLED)
    assert again.count == 0


async def test_revoke_all_within_the_callers_unit_of_work_commits_or_rolls_back_with_it(
    manager: SessionManager, database: Database, revocations: InMemoryRevocationList, alice: str
) -> None:
    started = await manager.start(alice, auth_method="jwt")

    units = auth_units_of_work(database)
    with pytest.raises(RuntimeError):
        async with units.write() as uow:
            await manager.revoke_all_within(uow, alice, reason=RevokeReason.PASSWORD_RESET)
            raise RuntimeError("the password reset failed")
    assert (await session_row(database, started.session.id)).revoked_at is None
    assert await user_events(database, events_pb2.SessionRevoked) == []

    async with units.write() as uow:
        revoked = await manager.revoke_all_within(uow, alice, reason=RevokeReason.PASSWORD_RESET)
    assert not await revocations.is_revoked(started.session.id, alice, START)
    await manager.propagate(revoked)

    assert revoked.session_ids == (started.session.id,)
    assert (await session_row(database, started.session.id)).revoke_reason == "password_reset"
    assert await revocations.is_revoked(started.session.id, alice, START)


# --- the gateway's cookie check ---------------------------------------------------------------------


async def test_check_session_answers_with_the_identity_and_checks_csrf(
    manager: SessionManager, database: Database, clock: Clock, alice: str
) -> None:
    started = await manager.start(alice, auth_method="cookie")
    assert started.csrf_token is not None
    session_id = started.session.id

    checked = await manager.check_session(session_id, started.csrf_token)

    assert checked.user_id == alice
    assert checked.session_id == session_id
    assert checked.auth_method is AuthMethod.COOKIE
    assert (checked.plan_id, checked.roles, checked.email_verified) == ("pro", ("user", "admin"), True)
    assert checked.expires_at == START + REFRESH_TTL
    assert (await manager.check_session(session_id)).user_id == alice  # CSRF not asked for (e.g. GET)
    await fails_with(manager.check_session(session_id, "forged"), PermissionDenied, "CSRF_TOKEN_MISMATCH")
    await fails_with(manager.check_session(session_id, ""), PermissionDenied, "CSRF_TOKEN_MISMATCH")
    jwt_session = await manager.start(alice, auth_method="jwt")
    await fails_with(
        manager.check_session(jwt_session.session.id, started.csrf_token),
        PermissionDenied,
        "CSRF_TOKEN_MISMATCH",
    )


@pytest.mark.parametrize(
    ("scenario", "error_type", "reason"),
    [
        ("unknown", Unauthenticated, "UNAUTHENTICATED"),
        ("revoked", Unauthenticated, "SESSION_REVOKED"),
        ("expired", Unauthenticated, "SESSION_REVOKED"),
        ("disabled", PermissionDenied, "ACCOUNT_DISABLED"),
    ],
)
async def test_check_session_refuses(
    manager: SessionManager,
    database: Database,
    clock: Clock,
    alice: str,
    scenario: str,
    error_type: type[ParleyError],
    reason: str,
) -> None:
    started = await manager.start(alice, auth_method="cookie")
    session_id = started.session.id
    setups: dict[str, Callable[[], Awaitable[object]]] = {
        "unknown": lambda: asyncio.sleep(0),
        "revoked": lambda: manager.logout(session_id),
        "expired": lambda: asyncio.sleep(0),
        "disabled": lambda: set_disabled(database, alice, True),
    }
    await setups[scenario]()
    if scenario == "unknown":
        session_id = "not-a-session"
    if scenario == "expired":
        clock.advance(REFRESH_TTL)

    error = await fails_with(manager.check_session(session_id, started.csrf_token), error_type, reason)
    if scenario in ("revoked", "expired"):
        assert error.metadata == {"cause": scenario}
