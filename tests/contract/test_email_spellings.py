"""Contract of email spellings through the account services, on SQLite and PostgreSQL: every spelling
of an address reaches one account (registration, sign-in, its lockout, forgot-password, the admin
bootstrap and search), and a look-alike is refused instead of registering beside the real address.
The spelling rules themselves, case by case, are in tests/unit/test_email_addresses.py."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from parley.events.v1 import events_pb2
from services.auth.models import UserRecord
from services.auth.ports import UserQuery
from services.auth.throttle import LoginThrottleSettings, ThrottlePolicy
from services.common.db import Database
from services.common.errors import AlreadyExists, InvalidArgument, ParleyError, ResourceExhausted
from tests.support.auth_accounts import (
    STRONG_PASSWORD,
    AuthWorld,
    build_world,
    fast_settings,
    shape,
    violations,
)
from tests.support.domain import payloads, refusal
from tests.support.look_alikes import fullwidth, mathematical_bold

ALICE = "alice@example.com"
# The same address, spelled as a user might type or paste it.
ALICE_SPELLINGS = [
    "  Alice@EXAMPLE.com ",
    fullwidth("alice@example.com"),
    fullwidth("ALICE") + "@example.com",
    mathematical_bold("alice") + "@example.com",
    "alice@" + fullwidth("EXAMPLE") + ".com",
]
# Different addresses that look like ALICE: refused, never registered beside it.
ALICE_LOOK_ALIKES = [
    "al\u0131ce@example.com",  # dotless i
    "\u0430lice@example.com",  # Cyrillic a
    "alic\u0435@example.com",  # Cyrillic e
    "\u0251lice@example.com",  # Latin alpha
]


@pytest.fixture
def world(database: Database) -> AuthWorld:
    return build_world(database)


async def user_count(database: Database) -> int:
    async with database.unit_of_work(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(UserRecord)) or 0)


@pytest.mark.parametrize("look_alike", ALICE_LOOK_ALIKES)
async def test_a_look_alike_of_a_registered_address_is_refused(world: AuthWorld, look_alike: str) -> None:
    await world.register(ALICE)
    error = await refusal(world.accounts.register(look_alike, STRONG_PASSWORD, "Mallory"), InvalidArgument)
    assert (error.reason, violations(error)) == (
        "INVALID_ARGUMENT",
        [("email", "EMAIL_LOCAL_PART_NOT_ASCII")],
    )
    # Refused for its shape, registered address or not: the refusal says nothing about ALICE.
    assert await user_count(world.database) == 1
    elsewhere = await refusal(
        world.accounts.register(look_alike.replace("example.com", "example.org"), STRONG_PASSWORD, "M"),
        InvalidArgument,
    )
    assert shape(elsewhere) == shape(error)


@pytest.mark.parametrize("spelling", ALICE_SPELLINGS)
async def test_another_spelling_of_a_registered_address_is_that_address(
    world: AuthWorld, spelling: str
) -> None:
    alice = await world.register(ALICE)
    error = await refusal(world.accounts.register(spelling, STRONG_PASSWORD, "Mallory"), AlreadyExists)
    assert error.reason == "EMAIL_ALREADY_REGISTERED"

    signed_in = await world.accounts.authenticate(spelling, STRONG_PASSWORD, client_ip="")
    assert signed_in.id == alice.id


async def test_a_new_account_is_stored_in_the_canonical_spelling(world: AuthWorld) -> None:
    user = await world.register(fullwidth("ADA") + "@B\u00dcCHER.example")
    assert user.email == "ada@xn--bcher-kva.example"
    (registered,) = await payloads(world.database, "user.registered", events_pb2.UserRegistered)
    (mail,) = await payloads(world.database, "email.requested", events_pb2.EmailRequested)
    # The mail goes to the A-label domain, which any SMTP server accepts without SMTPUTF8.
    assert registered.email == mail.recipient == "ada@xn--bcher-kva.example"
    for spelling in ("ada@b\u00fccher.example", "ADA@XN--BCHER-KVA.EXAMPLE", "ada@bu\u0308cher.example"):
        assert (await world.accounts.authenticate(spelling, STRONG_PASSWORD, client_ip="")).id == user.id


async def test_a_look_alike_domain_is_another_account_shown_by_its_a_label(world: AuthWorld) -> None:
    alice = await world.register(ALICE)
    other = await world.register("alice@ex\u0430mple.com")  # Cyrillic a: a different domain
    assert other.email == "alice@xn--exmple-4nf.com"
    assert (await world.accounts.authenticate(ALICE, STRONG_PASSWORD, client_ip="")).id == alice.id


async def test_signing_in_with_a_refused_look_alike_answers_like_an_unknown_address(world: AuthWorld) -> None:
    await world.register(ALICE)

    async def failure(email: str) -> ParleyError:
        return await refusal(world.accounts.authenticate(email, STRONG_PASSWORD, client_ip=""), ParleyError)

    assert shape(await failure("al\u0131ce@example.com")) == shape(await failure("nobody@example.com"))


async def test_failures_under_every_spelling_count_towards_one_lockout(database: Database) -> None:
    policy = ThrottlePolicy(free_failures=len(ALICE_SPELLINGS) - 1, lockout_after=len(ALICE_SPELLINGS))
    world = build_world(database, settings=fast_settings(throttle=LoginThrottleSettings(account=policy)))
    await world.register(ALICE)
    for spelling in ALICE_SPELLINGS:
        await refusal(world.accounts.authenticate(spelling, "wrong-password-1234", client_ip=""), ParleyError)
    locked = await refusal(
        world.accounts.authenticate(ALICE, STRONG_PASSWORD, client_ip=""), ResourceExhausted
    )
    assert locked.reason == "ACCOUNT_LOCKED"


async def test_forgot_password_under_another_spelling_mails_the_account(world: AuthWorld) -> None:
    alice = await world.register(ALICE)
    await world.accounts.forgot_password(fullwidth("Alice") + "@Example.COM")
    resets = [
        mail
        for mail in await payloads(world.database, "email.requested", events_pb2.EmailRequested)
        if mail.template == "password_reset"
    ]
    assert [(mail.user_id, mail.recipient) for mail in resets] == [(alice.id, ALICE)]


async def test_the_admin_bootstrap_finds_the_account_under_another_spelling(world: AuthWorld) -> None:
    alice = await world.register(ALICE)
    outcome = await world.admin.create_admin(fullwidth("ALICE@example.com"), STRONG_PASSWORD, "Alice")
    assert (outcome.created, outcome.user.id, outcome.user.is_admin) == (False, alice.id, True)
    assert await user_count(world.database) == 1

    error = await refusal(
        world.admin.create_admin("al\u0131ce@example.com", STRONG_PASSWORD, "M"), InvalidArgument
    )
    assert violations(error) == [("email", "EMAIL_LOCAL_PART_NOT_ASCII")]


@pytest.mark.parametrize(
    "text",
    [
        fullwidth("ALICE"),
        "Alice@EXAMPLE",
        "@ex" + fullwidth("AMPLE") + ".com",
        "ada@b\u00fccher",
        "B\u00fcCHER",
    ],
)
async def test_the_admin_search_matches_addresses_in_any_spelling(world: AuthWorld, text: str) -> None:
    await world.register(ALICE, name="Alice")
    await world.register("ada@b\u00fccher.example", name="Ada")
    await world.register("bob@example.org", name="Bob")
    page = await world.admin.list_users(filters=UserQuery(text=text))
    expected = {"ada@xn--bcher-kva.example"} if "b\u00fc" in text.lower() else {ALICE}
    assert {user.email for user in page.items} == expected
