"""Contract of sign-in throttling (services.auth.throttle through AccountService), on SQLite and
PostgreSQL: exponential backoff, lockout, per-account and per-client keys, no existence leak.
Time is an injected clock; nothing sleeps."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from sqlalchemy import select

from parley.events.v1 import events_pb2
from services.auth.accounts import User
from services.auth.models import LoginThrottleRecord
from services.auth.throttle import LoginThrottleSettings, ThrottlePolicy
from services.common.db import Database
from services.common.errors import ParleyError, QuotaViolation, ResourceExhausted, Unauthenticated
from tests.support.auth_accounts import (
    OTHER_PASSWORD,
    STRONG_PASSWORD,
    AuthWorld,
    build_world,
    fast_settings,
    shape,
)
from tests.support.domain import payloads, refusal

IP = "198.51.100.23"
OTHER_IP = "2001:db8::1"


@pytest.fixture
def world(database: Database) -> AuthWorld:
    return build_world(database)


async def attempt(world: AuthWorld, email: str, password: str, *, ip: str = "") -> User | ParleyError:
    try:
        return await world.accounts.authenticate(email, password, client_ip=ip)
    except ParleyError as error:
        return error


def locked_for(outcome: User | ParleyError) -> int:
    """The Retry-After seconds of a lockout reply (fails on anything else)."""
    assert isinstance(outcome, ResourceExhausted), outcome
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert outcome.reason == "ACCOUNT_LOCKED"
    return int(outcome.metadata["retry_after_s"])


def is_invalid_credentials(outcome: User | ParleyError) -> bool:
    return isinstance(outcome, Unauthenticated) and outcome.reason == "INVALID_CREDENTIALS"


async def throttle_rows(database: Database) -> dict[str, int]:
    async with database.unit_of_work(read_only=True) as session:
        rows = await session.scalars(select(LoginThrottleRecord))
        return {row.key: row.failures for row in rows}


async def test_failures_back_off_exponentially_then_lock_the_account(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    for _ in range(3):  # free failures: the next attempt may come at once
        assert is_invalid_credentials(await attempt(world, "ada@example.com", OTHER_PASSWORD))
    # From the 4th failure on, each locks for 1, 2, 4, ... 32 seconds; even the right password waits.
    for expected_lock in (1, 2, 4, 8, 16, 32):
        assert is_invalid_credentials(await attempt(world, "ada@example.com", OTHER_PASSWORD))
        assert locked_for(await attempt(world, "ada@example.com", STRONG_PASSWORD)) == expected_lock
        world.clock.advance(timedelta(seconds=expected_lock - 1))
        assert locked_for(await attempt(world, "ada@example.com", OTHER_PASSWORD)) == 1
        world.clock.advance(timedelta(seconds=1))
    assert await payloads(world.database, "user.locked", events_pb2.UserLocked) == []

    # The 10th failure starts the 15-minute lockout, announced by user.locked.
    assert is_invalid_credentials(await attempt(world, "ada@example.com", OTHER_PASSWORD))
    assert locked_for(await attempt(world, "ada@example.com", STRONG_PASSWORD)) == 15 * 60
    (locked,) = await payloads(world.database, "user.locked", events_pb2.UserLocked)
    assert (locked.user_id, locked.scope, locked.failed_attempts) == (
        user.id,
        events_pb2.LOCK_SCOPE_ACCOUNT,
        10,
    )
    assert locked.locked_until_time.ToDatetime().replace(
        tzinfo=world.clock.now.tzinfo
    ) == world.clock.now + timedelta(minutes=15)

    world.clock.advance(timedelta(minutes=15) - timedelta(seconds=1))
    assert locked_for(await attempt(world, "ada@example.com", STRONG_PASSWORD)) == 1
    world.clock.advance(timedelta(seconds=1))
    signed_in = await attempt(world, "ada@example.com", STRONG_PASSWORD)
    assert isinstance(signed_in, User) and signed_in.id == user.id

    # Success cleared the account's count: three free failures again.
    for _ in range(3):
        assert is_invalid_credentials(await attempt(world, "ada@example.com", OTHER_PASSWORD))
    assert is_invalid_credentials(await attempt(world, "ada@example.com", OTHER_PASSWORD))
    assert locked_for(await attempt(world, "ada@example.com", OTHER_PASSWORD)) == 1


async def test_failures_after_a_lockout_renew_it(world: AuthWorld) -> None:
    await world.register("ada@example.com")
    for _ in range(10):
        await attempt(world, "ada@example.com", OTHER_PASSWORD)
        world.clock.advance(timedelta(minutes=1))
    world.clock.advance(timedelta(minutes=15))
    assert is_invalid_credentials(await attempt(world, "ada@example.com", OTHER_PASSWORD))
    assert locked_for(await attempt(world, "ada@example.com", OTHER_PASSWORD)) == 15 * 60
    assert [
        e.failed_attempts for e in await payloads(world.database, "user.locked", events_pb2.UserLocked)
    ] == [10, 11]


async def test_locked_attempts_are_audited_but_not_counted(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    for _ in range(4):
        await attempt(world, "ada@example.com", OTHER_PASSWORD, ip=IP)
    for _ in range(3):
        locked_for(await attempt(world, "ada@example.com", OTHER_PASSWORD, ip=IP))
    assert (await throttle_rows(world.database))["email:ada@example.com"] == 4
    failed = await payloads(world.database, "user.login_failed", events_pb2.UserLoginFailed)
    assert [(e.reason, e.failed_attempts) for e in failed] == [
        (events_pb2.LOGIN_FAILURE_REASON_INVALID_CREDENTIALS, 1),
        (events_pb2.LOGIN_FAILURE_REASON_INVALID_CREDENTIALS, 2),
        (events_pb2.LOGIN_FAILURE_REASON_INVALID_CREDENTIALS, 3),
        (events_pb2.LOGIN_FAILURE_REASON_INVALID_CREDENTIALS, 4),
        (events_pb2.LOGIN_FAILURE_REASON_LOCKED, 4),
        (events_pb2.LOGIN_FAILURE_REASON_LOCKED, 4),
        (events_pb2.LOGIN_FAILURE_REASON_LOCKED, 4),
    ]
    assert {(e.user_id, e.ip_address) for e in failed} == {(user.id, IP)}


async def test_the_lockout_reply_is_the_same_for_unknown_emails(world: AuthWorld) -> None:
    await world.register("ada@example.com")
    known_replies: list[ParleyError] = []
    unknown_replies: list[ParleyError] = []
    for step in range(14):
        for email, replies in (("ada@example.com", known_replies), ("ghost@example.com", unknown_replies)):
            outcome = await attempt(world, email, OTHER_PASSWORD)
            assert isinstance(outcome, ParleyError)
            replies.append(outcome)
        world.clock.advance(timedelta(seconds=step % 3))
    assert [shape(error) for error in known_replies] == [shape(error) for error in unknown_replies]
    assert {error.reason for error in known_replies} == {"INVALID_CREDENTIALS", "ACCOUNT_LOCKED"}
    lock = next(error for error in unknown_replies if isinstance(error, ResourceExhausted))
    assert lock.message == "Too many failed sign-in attempts; try again later."
    assert lock.quota_violations[0].subject == "account"
    # Unknown emails are locked too (user.locked with no user id).
    for _ in range(10):
        await attempt(world, "phantom@example.com", OTHER_PASSWORD)
        world.clock.advance(timedelta(minutes=1))
    phantom = [
        e
        for e in await payloads(world.database, "user.locked", events_pb2.UserLocked)
        if e.failed_attempts == 10
    ]
    assert any(e.user_id == "" and e.scope == events_pb2.LOCK_SCOPE_ACCOUNT for e in phantom)


async def test_a_client_ip_is_throttled_across_accounts(database: Database) -> None:
    settings = fast_settings(
        throttle=LoginThrottleSettings(
            client_ip=ThrottlePolicy(free_failures=4, lockout_after=6, lockout_duration=timedelta(minutes=15))
        )
    )
    world = build_world(database, settings=settings)
    user = await world.register("ada@example.com")
    for n in range(4):
        assert is_invalid_credentials(await attempt(world, f"guess{n}@example.com", OTHER_PASSWORD, ip=IP))
    assert is_invalid_credentials(await attempt(world, "guess4@example.com", OTHER_PASSWORD, ip=IP))
    # The client is now locked for every account, including a right password for a real one ...
    refused = await attempt(world, "ada@example.com", STRONG_PASSWORD, ip=IP)
    assert locked_for(refused) == 1
    assert isinstance(refused, ResourceExhausted)
    assert refused.quota_violations[0].subject == "client_ip"
    assert refused.metadata["scope"] == "client_ip"
    # ... while other clients are not.
    assert isinstance(await attempt(world, "ada@example.com", STRONG_PASSWORD, ip=OTHER_IP), User)

    world.clock.advance(timedelta(seconds=1))
    assert is_invalid_credentials(await attempt(world, "guess5@example.com", OTHER_PASSWORD, ip=IP))
    assert locked_for(await attempt(world, "ada@example.com", STRONG_PASSWORD, ip=IP)) == 15 * 60
    (locked,) = await payloads(world.database, "user.locked", events_pb2.UserLocked)
    assert (locked.user_id, locked.ip_address, locked.scope, locked.failed_attempts) == (
        "",
        IP,
        events_pb2.LOCK_SCOPE_CLIENT_IP,
        6,
    )
    # For unknown emails the failure event counts the client's failures.
    failed = await payloads(world.database, "user.login_failed", events_pb2.UserLoginFailed)
    assert [e.failed_attempts for e in failed if e.user_id == "" and e.reason == 1] == [1, 2, 3, 4, 5, 6]
    assert user.id  # the real account was never locked itself
    assert "email:ada@example.com" not in await throttle_rows(world.database)


async def test_success_clears_the_account_count_but_not_the_clients(world: AuthWorld) -> None:
    await world.register("ada@example.com")
    for _ in range(3):
        await attempt(world, "ada@example.com", OTHER_PASSWORD, ip=IP)
    await attempt(world, "someone@example.com", OTHER_PASSWORD, ip=IP)
    assert await throttle_rows(world.database) == {
        "email:ada@example.com": 3,
        "email:someone@example.com": 1,
        f"ip:{IP}": 4,
    }
    assert isinstance(await attempt(world, "ada@example.com", STRONG_PASSWORD, ip=IP), User)
    assert await throttle_rows(world.database) == {"email:someone@example.com": 1, f"ip:{IP}": 4}


async def test_failures_are_forgotten_after_an_hour_without_one(world: AuthWorld) -> None:
    await world.register("ada@example.com")
    for _ in range(3):
        await attempt(world, "ada@example.com", OTHER_PASSWORD)
    world.clock.advance(timedelta(hours=1, seconds=1))
    assert is_invalid_credentials(await attempt(world, "ada@example.com", OTHER_PASSWORD))
    assert is_invalid_credentials(await attempt(world, "ada@example.com", OTHER_PASSWORD))
    assert (await throttle_rows(world.database))["email:ada@example.com"] == 2


async def test_concurrent_failures_are_each_counted(database: Database) -> None:
    settings = fast_settings(
        throttle=LoginThrottleSettings(account=ThrottlePolicy(free_failures=50, lockout_after=60))
    )
    world = build_world(database, settings=settings)
    await world.register("ada@example.com")
    outcomes = await asyncio.gather(
        *(attempt(world, "ada@example.com", OTHER_PASSWORD, ip=IP) for _ in range(8))
    )
    assert all(is_invalid_credentials(outcome) for outcome in outcomes)
    assert await throttle_rows(world.database) == {"email:ada@example.com": 8, f"ip:{IP}": 8}


async def test_wrong_current_passwords_count_towards_the_lockout(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    for _ in range(10):
        error = await refusal(
            world.accounts.change_password(user.id, OTHER_PASSWORD, OTHER_PASSWORD), ParleyError
        )
        assert error.reason == "CURRENT_PASSWORD_INCORRECT"
        world.clock.advance(timedelta(minutes=1))
    error = await refusal(
        world.accounts.change_password(user.id, STRONG_PASSWORD, OTHER_PASSWORD), ResourceExhausted
    )
    assert error.reason == "ACCOUNT_LOCKED"
    assert locked_for(await attempt(world, "ada@example.com", STRONG_PASSWORD)) > 0
    (locked,) = await payloads(world.database, "user.locked", events_pb2.UserLocked)
    assert (locked.user_id, locked.scope) == (user.id, events_pb2.LOCK_SCOPE_ACCOUNT)


async def test_the_lock_reply_carries_a_quota_failure(world: AuthWorld) -> None:
    for _ in range(4):
        await attempt(world, "ada@example.com", OTHER_PASSWORD)
    error = await attempt(world, "ada@example.com", OTHER_PASSWORD)
    assert isinstance(error, ResourceExhausted)
    assert error.metadata == {"retry_after_s": "1", "scope": "account"}
    assert error.quota_violations == (
        QuotaViolation(subject="account", description="Failed sign-ins locked this account; retry in 1 s."),
    )
