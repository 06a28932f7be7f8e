"""Contract of account administration (services.auth.admin over SQL), on SQLite and PostgreSQL:
listing with filters and pages, disable/enable, roles, the last-admin rule and the bootstrap."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest

from parley.common.v1 import common_pb2
from parley.events.v1 import events_pb2
from services.auth.accounts import User
from services.auth.admin import UserQuery
from services.common.db import Database
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from tests.support.auth_accounts import (
    OTHER_PASSWORD,
    STRONG_PASSWORD,
    AuthWorld,
    build_world,
    email_token,
    violations,
)
from tests.support.domain import outbox, payloads, refusal

IP = "192.0.2.44"


@pytest.fixture
def world(database: Database) -> AuthWorld:
    return build_world(database)


async def first_admin(world: AuthWorld) -> User:
    return (await world.admin.create_admin("root@example.com", STRONG_PASSWORD, "Root")).user


# --- bootstrap ----------------------------------------------------------------------------------------


async def test_create_admin_creates_a_verified_admin_once(world: AuthWorld) -> None:
    created = await world.admin.create_admin(" Root@Example.com ", STRONG_PASSWORD, "Root")
    assert (created.created, created.changed) == (True, True)
    assert created.user.roles == ("user", "admin")
    assert created.user.email == "root@example.com"
    assert created.user.email_verified
    assert (await world.accounts.authenticate("root@example.com", STRONG_PASSWORD, client_ip=IP)).is_admin

    events = await outbox(world.database)
    assert [e.type for e in events][:3] == ["user.registered", "user.email_verified", "user.role_changed"]
    role_changed = events[2].payload
    assert role_changed == events_pb2.UserRoleChanged(
        user_id=created.user.id,
        previous_roles=[],
        roles=[common_pb2.ROLE_USER, common_pb2.ROLE_ADMIN],
        actor_user_id="",
    )
    assert await outbox(world.database, "email.requested") == []
    before = len(await outbox(world.database))

    again = await world.admin.create_admin("root@example.com", OTHER_PASSWORD, "Another Name")
    assert (again.created, again.changed) == (False, False)
    assert again.user.id == created.user.id
    assert len(await outbox(world.database)) == before
    # The password was not replaced by the second run.
    await world.accounts.authenticate("root@example.com", STRONG_PASSWORD, client_ip=IP)


async def test_create_admin_promotes_and_re_enables_an_existing_user(world: AuthWorld) -> None:
    root = await first_admin(world)
    ada = await world.register("ada@example.com")
    await world.admin.disable_user(ada.id, actor_id=root.id)

    promoted = await world.admin.create_admin("ada@example.com", "whatever-is-ignored-here", "Ignored")
    assert (promoted.created, promoted.changed) == (False, True)
    assert promoted.user.roles == ("user", "admin")
    assert not promoted.user.disabled
    assert promoted.user.display_name == "Ada"
    changed = [
        e
        for e in await payloads(world.database, "user.role_changed", events_pb2.UserRoleChanged)
        if e.user_id == ada.id
    ]
    assert changed == [
        events_pb2.UserRoleChanged(
            user_id=ada.id,
            previous_roles=[common_pb2.ROLE_USER],
            roles=[common_pb2.ROLE_USER, common_pb2.ROLE_ADMIN],
        )
    ]
    assert await payloads(world.database, "user.enabled", events_pb2.UserEnabled) == [
        events_pb2.UserEnabled(user_id=ada.id, actor_user_id="")
    ]
    await world.accounts.authenticate("ada@example.com", STRONG_PASSWORD, client_ip=IP)


async def test_create_admin_checks_its_input(world: AuthWorld) -> None:
    error = await refusal(world.admin.create_admin("root@example.com", "short", "Root"), InvalidArgument)
    assert error.reason == "PASSWORD_POLICY_VIOLATION"
    error = await refusal(world.admin.create_admin("root", STRONG_PASSWORD, ""), InvalidArgument)
    assert sorted(violations(error)) == [("display_name", "INVALID_ARGUMENT"), ("email", "INVALID_ARGUMENT")]
    assert await outbox(world.database) == []


async def test_concurrent_bootstraps_make_one_admin(world: AuthWorld) -> None:
    outcomes = await asyncio.gather(
        *(world.admin.create_admin("root@example.com", STRONG_PASSWORD, "Root") for _ in range(3))
    )
    assert sum(outcome.created for outcome in outcomes) == 1
    assert len({outcome.user.id for outcome in outcomes}) == 1
    page = await world.admin.list_users()
    assert [user.email for user in page.items] == ["root@example.com"]


# --- listing ------------------------------------------------------------------------------------------


async def populate(world: AuthWorld) -> dict[str, User]:
    """Six users a minute apart, with a mix of roles, verification and disabled state."""
    users: dict[str, User] = {}
    users["root"] = await first_admin(world)
    for name in ("ada", "bob", "cyd", "dee", "eve"):
        world.clock.advance(timedelta(minutes=1))
        users[name] = await world.register(f"{name}@example.com", name=f"{name.title()} Tester")
    await world.accounts.verify_email(await email_token(world.database, users["ada"].id, "verify_email"))
    users["bob"] = (await world.admin.disable_user(users["bob"].id, actor_id=users["root"].id)).user
    users["cyd"] = await world.admin.set_roles(users["cyd"].id, ["admin"], actor_id=users["root"].id)
    return users


async def test_list_users_pages_newest_first(world: AuthWorld) -> None:
    users = await populate(world)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await world.admin.list_users(page_size=2, page_token=token)
        pages += 1
        assert len(page.items) <= 2
        seen.extend(user.email for user in page.items)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == [f"{name}@example.com" for name in ("eve", "dee", "cyd", "bob", "ada", "root")]
    everyone = await world.admin.list_users(page_size=0)
    assert everyone.next_page_token == ""
    assert [user.id for user in everyone.items] == [
        users[n].id for n in ("eve", "dee", "cyd", "bob", "ada", "root")
    ]


async def test_users_created_in_the_same_instant_page_by_id(world: AuthWorld) -> None:
    for n in range(5):
        await world.register(f"twin{n}@example.com")
    first = await world.admin.list_users(page_size=3)
    second = await world.admin.list_users(page_size=3, page_token=first.next_page_token)
    ids = [user.id for user in (*first.items, *second.items)]
    assert len(ids) == len(set(ids)) == 5
    assert ids == sorted(ids, reverse=True)
    assert second.next_page_token == ""


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (UserQuery(text="EXAMPLE.com"), ["eve", "dee", "cyd", "bob", "ada", "root"]),
        (UserQuery(text="ada"), ["ada"]),
        (UserQuery(text="DEE TEST"), ["dee"]),
        (UserQuery(text="%"), []),
        (UserQuery(text="_"), []),
        (UserQuery(role="admin"), ["cyd", "root"]),
        (UserQuery(role="user"), ["eve", "dee", "cyd", "bob", "ada", "root"]),
        (UserQuery(disabled=True), ["bob"]),
        (UserQuery(disabled=False, role="admin"), ["cyd", "root"]),
        (UserQuery(email_verified=True), ["ada", "root"]),
        (UserQuery(email_verified=False, disabled=False), ["eve", "dee", "cyd"]),
        (UserQuery(plan_id="free"), ["eve", "dee", "cyd", "bob", "ada", "root"]),
        (UserQuery(plan_id="pro"), []),
    ],
)
async def test_list_users_filters(world: AuthWorld, query: UserQuery, expected: list[str]) -> None:
    await populate(world)
    page = await world.admin.list_users(filters=query)
    assert [user.email.partition("@")[0] for user in page.items] == expected


async def test_list_users_filters_by_creation_time(world: AuthWorld) -> None:
    users = await populate(world)
    query = UserQuery(created_at_or_after=users["bob"].created_at, created_before=users["eve"].created_at)
    page = await world.admin.list_users(filters=query)
    assert [user.email for user in page.items] == ["dee@example.com", "cyd@example.com", "bob@example.com"]


async def test_list_users_refuses_bad_requests(world: AuthWorld) -> None:
    await populate(world)
    first = await world.admin.list_users(page_size=2)
    error = await refusal(
        world.admin.list_users(
            page_size=2, page_token=first.next_page_token, filters=UserQuery(role="admin")
        ),
        InvalidArgument,
    )
    assert error.reason == "INVALID_PAGE_TOKEN"
    assert (
        await refusal(world.admin.list_users(page_token="garbage!"), InvalidArgument)
    ).reason == "INVALID_PAGE_TOKEN"
    assert (
        await refusal(world.admin.list_users(page_size=-1), InvalidArgument)
    ).reason == "INVALID_PAGE_SIZE"
    error = await refusal(world.admin.list_users(filters=UserQuery(role="owner")), InvalidArgument)
    assert violations(error) == [("role", "INVALID_ARGUMENT")]
    now = world.clock.now
    error = await refusal(
        world.admin.list_users(filters=UserQuery(created_at_or_after=now, created_before=now)),
        InvalidArgument,
    )
    assert error.reason == "INVALID_TIME_RANGE"


async def test_get_user(world: AuthWorld) -> None:
    root = await first_admin(world)
    assert await world.admin.get_user(root.id) == root
    error = await refusal(world.admin.get_user("nobody"), NotFound)
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")


# --- disable and enable --------------------------------------------------------------------------------


async def test_disable_user_ends_their_sessions_and_refuses_them(world: AuthWorld) -> None:
    root = await first_admin(world)
    ada = await world.register("ada@example.com")
    sessions = [
        (await world.accounts.sign_in("ada@example.com", STRONG_PASSWORD, client_ip=IP)).started.session
        for _ in range(2)
    ]
    world.clock.advance(timedelta(minutes=1))

    disabled = await world.admin.disable_user(ada.id, actor_id=root.id, reason="abuse report #12")
    assert disabled.user.disabled and disabled.user.disabled_at == world.clock.now
    assert sorted(disabled.revoked.session_ids) == sorted(s.id for s in sessions)
    # Every session and every access token issued so far is refused.
    for session in sessions:
        assert await world.revocations.is_revoked(session.id, ada.id, session.created_at)
    assert await world.revocations.is_revoked("", ada.id, world.clock.now - timedelta(seconds=1))
    assert await payloads(world.database, "user.disabled", events_pb2.UserDisabled) == [
        events_pb2.UserDisabled(user_id=ada.id, actor_user_id=root.id, reason="abuse report #12")
    ]
    revoked = await payloads(world.database, "session.revoked", events_pb2.SessionRevoked)
    assert {(e.session_id, e.reason, e.actor_user_id) for e in revoked} == {
        (s.id, events_pb2.SESSION_REVOKE_REASON_USER_DISABLED, root.id) for s in sessions
    }
    error = await refusal(
        world.accounts.sign_in("ada@example.com", STRONG_PASSWORD, client_ip=IP), PermissionDenied
    )
    assert error.reason == "ACCOUNT_DISABLED"

    # Disabling again changes nothing.
    again = await world.admin.disable_user(ada.id, actor_id=root.id)
    assert again.revoked.session_ids == ()
    assert again.user.disabled_at == disabled.user.disabled_at
    assert len(await outbox(world.database, "user.disabled")) == 1


async def test_enable_user_lets_them_sign_in_again(world: AuthWorld) -> None:
    root = await first_admin(world)
    ada = await world.register("ada@example.com")
    await world.admin.disable_user(ada.id, actor_id=root.id)
    enabled = await world.admin.enable_user(ada.id, actor_id=root.id)
    assert not enabled.disabled
    await world.accounts.sign_in("ada@example.com", STRONG_PASSWORD, client_ip=IP)
    assert await world.admin.enable_user(ada.id, actor_id=root.id) == await world.admin.get_user(ada.id)
    assert await payloads(world.database, "user.enabled", events_pb2.UserEnabled) == [
        events_pb2.UserEnabled(user_id=ada.id, actor_user_id=root.id)
    ]
    with pytest.raises(NotFound):
        await world.admin.enable_user("nobody", actor_id=root.id)
    with pytest.raises(NotFound):
        await world.admin.disable_user("nobody", actor_id=root.id)


async def test_the_last_enabled_admin_cannot_be_disabled(world: AuthWorld) -> None:
    root = await first_admin(world)
    error = await refusal(world.admin.disable_user(root.id, actor_id=root.id), FailedPrecondition)
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LAST_ADMIN")
    assert not (await world.admin.get_user(root.id)).disabled

    second = await world.admin.create_admin("second@example.com", STRONG_PASSWORD, "Second")
    await world.admin.disable_user(root.id, actor_id=root.id)  # allowed: another admin remains
    error = await refusal(
        world.admin.disable_user(second.user.id, actor_id=second.user.id), FailedPrecondition
    )
    assert error.reason == "LAST_ADMIN"


# --- roles ----------------------------------------------------------------------------------------------


async def test_set_roles_replaces_roles_and_keeps_user(world: AuthWorld) -> None:
    root = await first_admin(world)
    ada = await world.register("ada@example.com")
    promoted = await world.admin.set_roles(ada.id, ["admin"], actor_id=root.id)
    assert promoted.roles == ("user", "admin")
    assert await world.admin.set_roles(ada.id, ["admin", "user", "admin"], actor_id=root.id) == promoted
    demoted = await world.admin.set_roles(ada.id, [], actor_id=root.id)
    assert demoted.roles == ("user",)
    changes = [
        e
        for e in await payloads(world.database, "user.role_changed", events_pb2.UserRoleChanged)
        if e.user_id == ada.id
    ]
    assert [(list(e.previous_roles), list(e.roles), e.actor_user_id) for e in changes] == [
        ([common_pb2.ROLE_USER], [common_pb2.ROLE_USER, common_pb2.ROLE_ADMIN], root.id),
        ([common_pb2.ROLE_USER, common_pb2.ROLE_ADMIN], [common_pb2.ROLE_USER], root.id),
    ]


async def test_losing_the_admin_role_refuses_the_tokens_that_still_carry_it(world: AuthWorld) -> None:
    root = await first_admin(world)
    ada = await world.register("ada@example.com")
    await world.admin.set_roles(ada.id, ["admin"], actor_id=root.id)
    signed_in = await world.accounts.sign_in("ada@example.com", STRONG_PASSWORD, client_ip=IP)
    world.clock.advance(timedelta(minutes=1))
    issued_before = world.clock.now - timedelta(seconds=1)
    assert not await world.revocations.is_revoked(signed_in.started.session.id, ada.id, issued_before)
    await world.admin.set_roles(ada.id, ["user"], actor_id=root.id)
    assert await world.revocations.is_revoked(signed_in.started.session.id, ada.id, issued_before)
    # The session itself stays: a refresh mints a token with the new roles.
    refreshed = await world.sessions.refresh(signed_in.started.refresh_token)
    assert refreshed.owner.roles == ("user",)


async def test_set_roles_refuses_unknown_roles_and_removing_the_last_admin(world: AuthWorld) -> None:
    root = await first_admin(world)
    error = await refusal(
        world.admin.set_roles(root.id, ["admin", "owner"], actor_id=root.id), InvalidArgument
    )
    assert violations(error) == [("roles", "INVALID_ARGUMENT")]
    last = await refusal(world.admin.set_roles(root.id, ["user"], actor_id=root.id), FailedPrecondition)
    assert last.reason == "LAST_ADMIN"
    assert (await world.admin.get_user(root.id)).is_admin
    with pytest.raises(NotFound):
        await world.admin.set_roles("nobody", ["user"], actor_id=root.id)


async def test_a_disabled_admin_does_not_count_as_the_remaining_admin(world: AuthWorld) -> None:
    root = await first_admin(world)
    second = (await world.admin.create_admin("second@example.com", STRONG_PASSWORD, "Second")).user
    await world.admin.disable_user(second.id, actor_id=root.id)
    error = await refusal(world.admin.set_roles(root.id, ["user"], actor_id=root.id), FailedPrecondition)
    assert error.reason == "LAST_ADMIN"
    # Demoting the disabled admin is fine: it was not keeping the system administrable.
    await world.admin.set_roles(second.id, ["user"], actor_id=root.id)


async def test_two_admins_demoting_each_other_at_once_leave_one_admin(world: AuthWorld) -> None:
    first = await first_admin(world)
    second = (await world.admin.create_admin("second@example.com", STRONG_PASSWORD, "Second")).user
    outcomes = await asyncio.gather(
        world.admin.set_roles(first.id, ["user"], actor_id=second.id),
        world.admin.set_roles(second.id, ["user"], actor_id=first.id),
        return_exceptions=True,
    )
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(failures) == 1
    assert isinstance(failures[0], FailedPrecondition) and failures[0].reason == "LAST_ADMIN"
    admins = await world.admin.list_users(filters=UserQuery(role="admin"))
    assert len(admins.items) == 1


async def test_two_admins_disabling_each_other_at_once_leave_one_admin(world: AuthWorld) -> None:
    first = await first_admin(world)
    second = (await world.admin.create_admin("second@example.com", STRONG_PASSWORD, "Second")).user
    outcomes = await asyncio.gather(
        world.admin.disable_user(first.id, actor_id=second.id),
        world.admin.disable_user(second.id, actor_id=first.id),
        return_exceptions=True,
    )
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(failures) == 1
    assert isinstance(failures[0], FailedPrecondition) and failures[0].reason == "LAST_ADMIN"
    admins = await world.admin.list_users(filters=UserQuery(role="admin", disabled=False))
    assert len(admins.items) == 1
