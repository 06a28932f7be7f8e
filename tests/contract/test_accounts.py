"""Contract of accounts (services.auth.accounts over SQL): registration, verification, sign-in
credential checks, passwords and profile, on SQLite and PostgreSQL, with real argon2."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import grpc
import pytest
from sqlalchemy import func, select

from parley.events.v1 import events_pb2
from services.auth.accounts import AccountSettings
from services.auth.api_keys import ApiKeyManager
from services.auth.models import OneTimeTokenRecord, SessionRecord, UserRecord
from services.auth.opaque import secret_hash
from services.auth.passwords import Argon2Parameters, PasswordHasher
from services.common.db import Database
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from tests.support.auth_accounts import (
    OTHER_PASSWORD,
    STRONG_PASSWORD,
    AuthWorld,
    build_world,
    email_token,
    fast_settings,
    shape,
    user_events,
    violations,
)
from tests.support.domain import outbox, payloads, refusal

IP = "203.0.113.7"


@pytest.fixture
def world(database: Database) -> AuthWorld:
    return build_world(database)


async def count_users(database: Database) -> int:
    async with database.unit_of_work(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(UserRecord)) or 0)


async def stored_user(database: Database, user_id: str) -> UserRecord:
    async with database.unit_of_work(read_only=True) as session:
        record = await session.get(UserRecord, user_id)
    assert record is not None
    return record


async def tokens_of(database: Database, user_id: str, purpose: str) -> list[OneTimeTokenRecord]:
    async with database.unit_of_work(read_only=True) as session:
        return list(
            await session.scalars(
                select(OneTimeTokenRecord).where(
                    OneTimeTokenRecord.user_id == user_id, OneTimeTokenRecord.purpose == purpose
                )
            )
        )


# --- registration ---------------------------------------------------------------------------------


async def test_register_creates_an_unverified_user_and_queues_the_verification_email(
    world: AuthWorld,
) -> None:
    user = await world.accounts.register("  Ada.Lovelace@Example.COM ", STRONG_PASSWORD, "  Ada Lovelace ")

    assert user.email == "ada.lovelace@example.com"
    assert user.display_name == "Ada Lovelace"
    assert user.roles == ("user",)
    assert user.plan_id == "free"
    assert not user.email_verified and not user.disabled
    assert user.created_at == world.clock.now

    record = await stored_user(world.database, user.id)
    assert record.password_hash.startswith("$argon2id$")
    assert STRONG_PASSWORD not in record.password_hash

    events = await outbox(world.database)
    assert [event.type for event in events] == ["user.registered", "email.requested"]
    assert all(event.source == "auth" and event.subject == user.id for event in events)
    registered = events[0].payload
    assert registered == events_pb2.UserRegistered(
        user_id=user.id, email="ada.lovelace@example.com", display_name="Ada Lovelace"
    )
    mail = events[1].payload
    assert isinstance(mail, events_pb2.EmailRequested)
    assert (mail.template, mail.recipient, mail.user_id) == ("verify_email", user.email, user.id)
    token = mail.params["token"]
    assert len(token) >= 43
    assert mail.params["link_path"] == f"/verify-email?token={token}"
    assert mail.params["expire_time"] == (world.clock.now + timedelta(hours=24)).isoformat()

    # Stored only as its hash, single-use, expiring in 24 hours.
    (stored,) = await tokens_of(world.database, user.id, "verify_email")
    assert stored.token_hash == secret_hash(token)
    assert stored.expires_at == world.clock.now + timedelta(hours=24)
    assert stored.used_at is None
    # No event carries the password.
    for event in events:
        assert STRONG_PASSWORD.encode() not in event.event.SerializeToString()


async def test_register_refuses_malformed_fields_without_writing(world: AuthWorld) -> None:
    # The rules themselves, case by case, are in tests/unit/test_email_addresses.py and test_display_names.py.
    error = await refusal(world.accounts.register("ada@localhost", STRONG_PASSWORD, "Ada"), InvalidArgument)
    assert error.reason == "INVALID_ARGUMENT"
    assert violations(error) == [("email", "INVALID_ARGUMENT")]
    error = await refusal(
        world.accounts.register("ada@example.com", STRONG_PASSWORD, "Ada\nL"), InvalidArgument
    )
    assert violations(error) == [("display_name", "INVALID_ARGUMENT")]
    assert await count_users(world.database) == 0
    assert await outbox(world.database) == []
    user = await world.accounts.register("ada@example.com", STRONG_PASSWORD, "  Zoë 👩‍💻 " + "x" * 91)
    assert user.display_name == "Zoë 👩‍💻 " + "x" * 91


async def test_password_policy_runs_before_any_write(world: AuthWorld) -> None:
    error = await refusal(world.accounts.register("ada@example.com", "short", "Ada"), InvalidArgument)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "PASSWORD_POLICY_VIOLATION"
    assert violations(error) == [("password", "PASSWORD_TOO_SHORT")]

    error = await refusal(world.accounts.register("ada@example.com", "password1234", "Ada"), InvalidArgument)
    assert violations(error) == [("password", "PASSWORD_TOO_COMMON")]

    error = await refusal(
        world.accounts.register("lovelace@example.com", "my-lovelace-harbour-9", "Ada"), InvalidArgument
    )
    assert violations(error) == [("password", "PASSWORD_CONTAINS_EMAIL")]

    assert await count_users(world.database) == 0
    assert await outbox(world.database) == []


async def test_every_bad_field_is_reported_at_once(world: AuthWorld) -> None:
    error = await refusal(world.accounts.register("not-an-email", "short", ""), InvalidArgument)
    assert error.reason == "INVALID_ARGUMENT"
    assert sorted(violations(error)) == [
        ("display_name", "INVALID_ARGUMENT"),
        ("email", "INVALID_ARGUMENT"),
        ("password", "PASSWORD_TOO_SHORT"),
    ]


async def test_a_registered_email_cannot_register_again_in_any_case(world: AuthWorld) -> None:
    await world.register("ada@example.com")
    error = await refusal(world.register(" ADA@example.com"), AlreadyExists)
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.reason == "EMAIL_ALREADY_REGISTERED"
    assert violations(error) == [("email", "EMAIL_ALREADY_REGISTERED")]
    assert await count_users(world.database) == 1
    assert len(await outbox(world.database, "user.registered")) == 1


async def test_concurrent_registrations_of_one_email_let_exactly_one_win(world: AuthWorld) -> None:
    outcomes = await asyncio.gather(
        *(world.register("race@example.com", name=f"Racer {n}") for n in range(4)), return_exceptions=True
    )
    winners = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    losers = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(loser, AlreadyExists) for loser in losers)
    assert all(
        isinstance(loser, AlreadyExists) and loser.reason == "EMAIL_ALREADY_REGISTERED" for loser in losers
    )
    assert await count_users(world.database) == 1
    assert len(await outbox(world.database, "user.registered")) == 1
    assert len(await outbox(world.database, "email.requested")) == 1


# --- email verification ---------------------------------------------------------------------------


async def test_verify_email_marks_the_user_verified_once(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    token = await email_token(world.database, user.id, "verify_email")
    world.clock.advance(timedelta(hours=2))

    verified = await world.accounts.verify_email(token)
    assert verified.email_verified and verified.email_verified_at == world.clock.now
    assert (await world.accounts.get_user(user.id)).email_verified
    assert await payloads(world.database, "user.email_verified", events_pb2.UserEmailVerified) == [
        events_pb2.UserEmailVerified(user_id=user.id, email="ada@example.com")
    ]
    (stored,) = await tokens_of(world.database, user.id, "verify_email")
    assert stored.used_at == world.clock.now


async def test_used_unknown_and_expired_verification_tokens_get_one_answer(world: AuthWorld) -> None:
    used_user = await world.register("used@example.com")
    used = await email_token(world.database, used_user.id, "verify_email")
    await world.accounts.verify_email(used)
    expired_user = await world.register("late@example.com")
    expired = await email_token(world.database, expired_user.id, "verify_email")
    world.clock.advance(timedelta(hours=24))

    replies = [
        await refusal(world.accounts.verify_email(token), InvalidArgument)
        for token in (used, expired, "no-such-token", "", "x" * 5000)
    ]
    assert {error.reason for error in replies} == {"VERIFICATION_TOKEN_INVALID"}
    assert len({shape(error) for error in replies}) == 1
    assert not (await world.accounts.get_user(expired_user.id)).email_verified
    assert len(await outbox(world.database, "user.email_verified")) == 1


async def test_a_verification_token_works_until_just_before_its_expiry(world: AuthWorld) -> None:
    accounts = world.with_settings(fast_settings(verification_token_ttl=timedelta(hours=1)))
    user = await accounts.register("ada@example.com", STRONG_PASSWORD, "Ada")
    token = await email_token(world.database, user.id, "verify_email")
    world.clock.advance(timedelta(minutes=59, seconds=59))
    assert (await accounts.verify_email(token)).email_verified


async def test_concurrent_uses_of_one_verification_token_succeed_once(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    token = await email_token(world.database, user.id, "verify_email")
    outcomes = await asyncio.gather(
        *(world.accounts.verify_email(token) for _ in range(4)), return_exceptions=True
    )
    assert sum(not isinstance(outcome, BaseException) for outcome in outcomes) == 1
    assert all(
        isinstance(outcome, InvalidArgument) and outcome.reason == "VERIFICATION_TOKEN_INVALID"
        for outcome in outcomes
        if isinstance(outcome, BaseException)
    )
    assert len(await outbox(world.database, "user.email_verified")) == 1


async def test_resend_verification_has_a_cooldown_and_replaces_the_link(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    first = await email_token(world.database, user.id, "verify_email")

    error = await refusal(world.accounts.resend_verification(user.id), ResourceExhausted)
    assert error.reason == "RATE_LIMITED"
    assert error.metadata == {"retry_after_s": "60"}
    world.clock.advance(timedelta(seconds=45))
    error = await refusal(world.accounts.resend_verification(user.id), ResourceExhausted)
    assert error.metadata == {"retry_after_s": "15"}

    world.clock.advance(timedelta(seconds=15))
    expires = await world.accounts.resend_verification(user.id)
    assert expires == world.clock.now + timedelta(hours=24)
    second = await email_token(world.database, user.id, "verify_email")
    assert second != first
    assert len(await outbox(world.database, "email.requested")) == 2

    # Only the newest link works.
    assert (
        await refusal(world.accounts.verify_email(first), InvalidArgument)
    ).reason == "VERIFICATION_TOKEN_INVALID"
    assert (await world.accounts.verify_email(second)).email_verified

    world.clock.advance(timedelta(minutes=5))
    verified_error = await refusal(world.accounts.resend_verification(user.id), FailedPrecondition)
    assert verified_error.reason == "EMAIL_ALREADY_VERIFIED"
    assert (await refusal(world.accounts.resend_verification("no-such-user"), NotFound)).reason == "NOT_FOUND"


# --- sign-in ---------------------------------------------------------------------------------------


async def test_authenticate_accepts_the_right_password_for_an_unverified_user(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    world.clock.advance(timedelta(minutes=3))
    signed_in = await world.accounts.authenticate(" ADA@example.com ", STRONG_PASSWORD, client_ip=IP)
    assert signed_in.id == user.id
    assert not signed_in.email_verified
    assert signed_in.last_login_at == world.clock.now
    (succeeded,) = await payloads(world.database, "user.login_succeeded", events_pb2.UserLoginSucceeded)
    assert (succeeded.user_id, succeeded.ip_address, succeeded.session_id) == (user.id, IP, "")


async def test_sign_in_starts_a_session_and_reports_new_devices(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    firefox = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"
    first = await world.accounts.sign_in(
        "ada@example.com", STRONG_PASSWORD, client_ip=IP, user_agent=firefox, auth_method="cookie"
    )
    second = await world.accounts.sign_in(
        "ada@example.com", STRONG_PASSWORD, client_ip=IP, user_agent=firefox
    )
    assert first.user.id == user.id
    assert first.started.session.user_id == user.id
    assert first.started.csrf_token is not None and second.started.csrf_token is None
    assert first.started.refresh_token and first.started.refresh_token != second.started.refresh_token

    events = await payloads(world.database, "user.login_succeeded", events_pb2.UserLoginSucceeded)
    assert [(e.session_id, e.device, e.new_device, e.ip_address) for e in events] == [
        (first.started.session.id, "Firefox on Linux", True, IP),
        (second.started.session.id, "Firefox on Linux", False, IP),
    ]


async def test_unknown_email_and_wrong_password_get_the_identical_reply(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    wrong = await refusal(
        world.accounts.authenticate("ada@example.com", OTHER_PASSWORD, client_ip=IP), Unauthenticated
    )
    unknown = await refusal(
        world.accounts.authenticate("nobody@example.com", OTHER_PASSWORD, client_ip=IP), Unauthenticated
    )
    malformed = await refusal(
        world.accounts.authenticate("not an email", OTHER_PASSWORD, client_ip=IP), Unauthenticated
    )
    assert wrong.code == grpc.StatusCode.UNAUTHENTICATED
    assert wrong.reason == "INVALID_CREDENTIALS"
    assert shape(wrong) == shape(unknown) == shape(malformed)

    failed = await payloads(world.database, "user.login_failed", events_pb2.UserLoginFailed)
    assert [(e.user_id, e.ip_address, e.reason) for e in failed] == [
        (user.id, IP, events_pb2.LOGIN_FAILURE_REASON_INVALID_CREDENTIALS),
        ("", IP, events_pb2.LOGIN_FAILURE_REASON_INVALID_CREDENTIALS),
        ("", IP, events_pb2.LOGIN_FAILURE_REASON_INVALID_CREDENTIALS),
    ]
    for event in await outbox(world.database):
        assert OTHER_PASSWORD.encode() not in event.event.SerializeToString()


async def test_unknown_emails_cost_a_full_password_hash(world: AuthWorld) -> None:
    # With production-like argon2 cost, the dummy hash makes an unknown email as slow as a wrong
    # password (the gap is the tiny database lookup difference, not a missing hash).
    slow = PasswordHasher(Argon2Parameters(time_cost=2, memory_cost_kib=8 * 1024))
    world.hasher = slow
    accounts = world.with_settings(fast_settings())
    await accounts.register("ada@example.com", STRONG_PASSWORD, "Ada")

    async def elapsed(email: str) -> float:
        started = time.perf_counter()
        with pytest.raises(Unauthenticated):
            await accounts.authenticate(email, OTHER_PASSWORD, client_ip="")
        return time.perf_counter() - started

    hash_cost = min(timeit_hash(slow) for _ in range(3))
    unknown = min([await elapsed(f"nobody{n}@example.com") for n in range(3)])
    known = min([await elapsed("ada@example.com") for _ in range(3)])
    assert unknown >= hash_cost * 0.8
    assert known >= hash_cost * 0.8


def timeit_hash(hasher: PasswordHasher) -> float:
    started = time.perf_counter()
    hasher.verify_dummy(OTHER_PASSWORD)
    return time.perf_counter() - started


async def test_a_disabled_user_is_refused_only_after_the_right_password(world: AuthWorld) -> None:
    admin = await world.admin.create_admin("root@example.com", STRONG_PASSWORD, "Root")
    user = await world.register("ada@example.com")
    await world.admin.disable_user(user.id, actor_id=admin.user.id)

    wrong = await refusal(
        world.accounts.authenticate("ada@example.com", OTHER_PASSWORD, client_ip=IP), Unauthenticated
    )
    assert wrong.reason == "INVALID_CREDENTIALS"
    right = await refusal(
        world.accounts.authenticate("ada@example.com", STRONG_PASSWORD, client_ip=IP), PermissionDenied
    )
    assert right.code == grpc.StatusCode.PERMISSION_DENIED
    assert right.reason == "ACCOUNT_DISABLED"
    failed = await payloads(world.database, "user.login_failed", events_pb2.UserLoginFailed)
    assert [e.reason for e in failed] == [
        events_pb2.LOGIN_FAILURE_REASON_INVALID_CREDENTIALS,
        events_pb2.LOGIN_FAILURE_REASON_DISABLED,
    ]
    with pytest.raises(PermissionDenied):
        await world.accounts.sign_in("ada@example.com", STRONG_PASSWORD, client_ip=IP)
    async with world.database.unit_of_work(read_only=True) as session:
        assert await session.scalar(select(func.count()).select_from(SessionRecord)) == 0


async def test_a_hash_made_with_old_parameters_is_upgraded_at_sign_in(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    old_hash = (await stored_user(world.database, user.id)).password_hash
    world.hasher = PasswordHasher(Argon2Parameters(time_cost=2, memory_cost_kib=128))
    accounts = world.with_settings(fast_settings())

    await accounts.authenticate("ada@example.com", STRONG_PASSWORD, client_ip=IP)
    new_hash = (await stored_user(world.database, user.id)).password_hash
    assert new_hash != old_hash
    assert "m=128,t=2" in new_hash and "m=64,t=1" in old_hash
    assert not world.hasher.needs_rehash(new_hash)
    # And the upgraded hash still accepts the password (and only it).
    await accounts.authenticate("ada@example.com", STRONG_PASSWORD, client_ip=IP)
    assert (await stored_user(world.database, user.id)).password_hash == new_hash


async def test_api_keys_can_require_a_verified_email_checked_inside_the_creation(world: AuthWorld) -> None:
    strict = ApiKeyManager(
        world.units, changes=world.revocations, clock=world.clock, require_verified_email=True
    )
    user = await world.register("ada@example.com")
    with pytest.raises(FailedPrecondition) as raised:
        await strict.create(user.id, name="ci")
    error = raised.value
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert (error.reason, error.metadata) == ("EMAIL_NOT_VERIFIED", {"feature": "api_keys"})
    assert await user_events(world.database, events_pb2.ApiKeyCreated) == []
    # Nothing is required by default.
    unrestricted = ApiKeyManager(world.units, changes=world.revocations, clock=world.clock)
    await unrestricted.create(user.id, name="unrestricted")
    await world.accounts.verify_email(await email_token(world.database, user.id, "verify_email"))
    assert (await strict.create(user.id, name="ci")).api_key.name == "ci"


# --- forgot and reset -------------------------------------------------------------------------------


async def test_forgot_password_queues_a_reset_email_only_for_an_existing_account(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    # The same (nothing) for every address; only the outbox tells them apart.
    await world.accounts.forgot_password(" Ada@Example.com")
    await world.accounts.forgot_password("nobody@example.com")
    await world.accounts.forgot_password("not an email")

    (mail,) = [
        m
        for m in await payloads(world.database, "email.requested", events_pb2.EmailRequested)
        if m.template == "password_reset"
    ]
    assert (mail.recipient, mail.user_id) == ("ada@example.com", user.id)
    token = mail.params["token"]
    assert mail.params["link_path"] == f"/reset-password?token={token}"
    (stored,) = await tokens_of(world.database, user.id, "reset_password")
    assert stored.token_hash == secret_hash(token)
    assert stored.expires_at == world.clock.now + timedelta(hours=1)


async def test_forgot_password_takes_the_same_time_for_known_and_unknown_emails(database: Database) -> None:
    floor = timedelta(milliseconds=150)
    world = build_world(database, settings=AccountSettings(forgot_password_min_duration=floor))
    await world.register("ada@example.com")

    async def elapsed(email: str) -> float:
        started = time.perf_counter()
        await world.accounts.forgot_password(email)
        return time.perf_counter() - started

    known = await elapsed("ada@example.com")
    unknown = await elapsed("nobody@example.com")
    assert known >= floor.total_seconds() and unknown >= floor.total_seconds()
    assert abs(known - unknown) < 0.1


async def test_forgot_password_is_silent_for_disabled_users_and_within_the_cooldown(world: AuthWorld) -> None:
    admin = await world.admin.create_admin("root@example.com", STRONG_PASSWORD, "Root")
    ada = await world.register("ada@example.com")
    bob = await world.register("bob@example.com", name="Bob")
    await world.admin.disable_user(bob.id, actor_id=admin.user.id)

    await world.accounts.forgot_password("ada@example.com")
    await world.accounts.forgot_password("ada@example.com")
    await world.accounts.forgot_password("bob@example.com")
    resets = [
        m
        for m in await payloads(world.database, "email.requested", events_pb2.EmailRequested)
        if m.template == "password_reset"
    ]
    assert [m.user_id for m in resets] == [ada.id]

    world.clock.advance(timedelta(minutes=1))
    await world.accounts.forgot_password("ada@example.com")
    second = await email_token(world.database, ada.id, "reset_password")
    assert second != resets[0].params["token"]
    # The earlier link died with the new one.
    with pytest.raises(InvalidArgument):
        await world.accounts.reset_password(resets[0].params["token"], OTHER_PASSWORD)


async def test_reset_password_sets_the_password_and_ends_every_session(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    sessions = [
        (await world.accounts.sign_in("ada@example.com", STRONG_PASSWORD, client_ip=IP)).started.session
        for _ in range(2)
    ]
    await world.accounts.forgot_password("ada@example.com")
    token = await email_token(world.database, user.id, "reset_password")
    world.clock.advance(timedelta(minutes=59))

    reset = await world.accounts.reset_password(token, OTHER_PASSWORD)
    assert reset.user.id == user.id
    assert reset.user.email_verified  # the link reached the mailbox
    assert sorted(reset.revoked.session_ids) == sorted(s.id for s in sessions)
    assert reset.revoked.all_sessions
    for session in sessions:
        assert await world.revocations.is_revoked(session.id, user.id, session.created_at)

    with pytest.raises(Unauthenticated):
        await world.accounts.authenticate("ada@example.com", STRONG_PASSWORD, client_ip=IP)
    await world.accounts.authenticate("ada@example.com", OTHER_PASSWORD, client_ip=IP)

    assert await payloads(world.database, "user.password_reset", events_pb2.UserPasswordReset) == [
        events_pb2.UserPasswordReset(user_id=user.id, revoked_session_count=2)
    ]
    revoked = await payloads(world.database, "session.revoked", events_pb2.SessionRevoked)
    assert {(e.session_id, e.reason) for e in revoked} == {
        (s.id, events_pb2.SESSION_REVOKE_REASON_PASSWORD_RESET) for s in sessions
    }
    # Single use.
    error = await refusal(world.accounts.reset_password(token, "another-fine-password-3"), InvalidArgument)
    assert error.reason == "RESET_TOKEN_INVALID"


async def test_reset_tokens_expire_after_an_hour_and_unknown_ones_get_the_same_answer(
    world: AuthWorld,
) -> None:
    user = await world.register("ada@example.com")
    await world.accounts.forgot_password("ada@example.com")
    token = await email_token(world.database, user.id, "reset_password")
    world.clock.advance(timedelta(hours=1))
    expired = await refusal(world.accounts.reset_password(token, OTHER_PASSWORD), InvalidArgument)
    unknown = await refusal(world.accounts.reset_password("no-such-token", OTHER_PASSWORD), InvalidArgument)
    verification = await refusal(
        world.accounts.reset_password(
            await email_token(world.database, user.id, "verify_email"), OTHER_PASSWORD
        ),
        InvalidArgument,
    )
    assert expired.reason == "RESET_TOKEN_INVALID"
    assert shape(expired) == shape(unknown) == shape(verification)
    await world.accounts.authenticate("ada@example.com", STRONG_PASSWORD, client_ip=IP)


async def test_reset_password_applies_the_policy_before_spending_the_token(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    await world.accounts.forgot_password("ada@example.com")
    token = await email_token(world.database, user.id, "reset_password")
    error = await refusal(world.accounts.reset_password(token, "ada-harbour-lantern"), InvalidArgument)
    assert error.reason == "PASSWORD_POLICY_VIOLATION"
    assert violations(error) == [("new_password", "PASSWORD_CONTAINS_EMAIL")]
    await world.accounts.reset_password(token, OTHER_PASSWORD)


async def test_reset_password_unlocks_the_account(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    for _ in range(10):
        with pytest.raises((Unauthenticated, ResourceExhausted)):
            await world.accounts.authenticate("ada@example.com", OTHER_PASSWORD, client_ip="")
        world.clock.advance(timedelta(minutes=1))
    with pytest.raises(ResourceExhausted):
        await world.accounts.authenticate("ada@example.com", STRONG_PASSWORD, client_ip="")
    await world.accounts.forgot_password("ada@example.com")
    await world.accounts.reset_password(
        await email_token(world.database, user.id, "reset_password"), OTHER_PASSWORD
    )
    await world.accounts.authenticate("ada@example.com", OTHER_PASSWORD, client_ip="")


# --- change password --------------------------------------------------------------------------------


async def test_change_password_keeps_the_current_session_and_ends_the_others(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    current, other = [
        (await world.accounts.sign_in("ada@example.com", STRONG_PASSWORD, client_ip=IP)).started.session
        for _ in range(2)
    ]
    await world.accounts.forgot_password("ada@example.com")
    reset_token = await email_token(world.database, user.id, "reset_password")

    changed = await world.accounts.change_password(
        user.id, STRONG_PASSWORD, OTHER_PASSWORD, current_session_id=current.id
    )
    assert changed.revoked.session_ids == (other.id,)
    assert not changed.revoked.all_sessions
    assert await world.revocations.is_revoked(other.id, user.id, other.created_at)
    assert not await world.revocations.is_revoked(current.id, user.id, current.created_at)
    assert await payloads(world.database, "user.password_changed", events_pb2.UserPasswordChanged) == [
        events_pb2.UserPasswordChanged(user_id=user.id, revoked_session_count=1)
    ]
    (revoked,) = await payloads(world.database, "session.revoked", events_pb2.SessionRevoked)
    assert (revoked.session_id, revoked.reason, revoked.actor_user_id) == (
        other.id,
        events_pb2.SESSION_REVOKE_REASON_PASSWORD_CHANGED,
        user.id,
    )
    await world.accounts.authenticate("ada@example.com", OTHER_PASSWORD, client_ip=IP)
    # A reset link sent before the change no longer works.
    with pytest.raises(InvalidArgument):
        await world.accounts.reset_password(reset_token, "yet-another-sound-phrase-5")


async def test_change_password_needs_the_current_password_then_a_policy_compliant_one(
    world: AuthWorld,
) -> None:
    user = await world.register("ada@example.com")
    error = await refusal(
        world.accounts.change_password(user.id, OTHER_PASSWORD, OTHER_PASSWORD), InvalidArgument
    )
    assert error.reason == "CURRENT_PASSWORD_INCORRECT"
    assert violations(error) == [("current_password", "CURRENT_PASSWORD_INCORRECT")]

    error = await refusal(world.accounts.change_password(user.id, STRONG_PASSWORD, "short"), InvalidArgument)
    assert error.reason == "PASSWORD_POLICY_VIOLATION"
    assert violations(error) == [("new_password", "PASSWORD_TOO_SHORT")]
    await world.accounts.authenticate("ada@example.com", STRONG_PASSWORD, client_ip=IP)
    assert await outbox(world.database, "user.password_changed") == []


# --- profile ----------------------------------------------------------------------------------------


async def test_profile_read_and_display_name_update(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    assert await world.accounts.get_user(user.id) == user
    world.clock.advance(timedelta(minutes=1))

    updated = await world.accounts.update_profile(
        user.id, display_name="  Countess  ", update_mask=["display_name"]
    )
    assert updated.display_name == "Countess"
    assert updated.updated_at == world.clock.now
    assert (await world.accounts.get_user(user.id)).display_name == "Countess"

    # AIP-134: an empty mask updates the fields the request sets; an empty string is "not set".
    assert (
        await world.accounts.update_profile(user.id, display_name="Ada L.", update_mask=[])
    ).display_name == "Ada L."
    assert (
        await world.accounts.update_profile(user.id, display_name="", update_mask=[])
    ).display_name == "Ada L."
    assert (
        await world.accounts.update_profile(user.id, display_name="Star", update_mask=["*"])
    ).display_name == "Star"
    error = await refusal(
        world.accounts.update_profile(user.id, display_name="", update_mask=["*"]), InvalidArgument
    )
    assert violations(error) == [("user.display_name", "INVALID_ARGUMENT")]
    error = await refusal(
        world.accounts.update_profile(user.id, display_name="x" * 101, update_mask=["display_name"]),
        InvalidArgument,
    )
    assert violations(error) == [("user.display_name", "INVALID_ARGUMENT")]


async def test_update_mask_names_only_display_name(world: AuthWorld) -> None:
    user = await world.register("ada@example.com")
    for paths in (["email"], ["display_name", "roles"], ["nickname"], ["user.display_name"], [""]):
        error = await refusal(
            world.accounts.update_profile(user.id, display_name="New", update_mask=paths), InvalidArgument
        )
        assert error.reason == "INVALID_UPDATE_MASK", paths
        assert violations(error) == [("update_mask", "INVALID_UPDATE_MASK")]
    assert (await world.accounts.get_user(user.id)).display_name == "Ada"


async def test_unknown_users_are_not_found(world: AuthWorld) -> None:
    assert (await refusal(world.accounts.get_user("nobody"), NotFound)).reason == "NOT_FOUND"
    with pytest.raises(NotFound):
        await world.accounts.update_profile("nobody", display_name="X", update_mask=["display_name"])
    with pytest.raises(NotFound):
        await world.accounts.change_password("nobody", STRONG_PASSWORD, OTHER_PASSWORD)
