"""Contract of the migration that respells stored email addresses (auth revision d4b91c847728), on
SQLite and PostgreSQL: rows written by the earlier rules get their canonical spelling, colliding rows
are kept and disabled but one, and sign-in is unambiguous afterwards (ADR 0015)."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from sqlalchemy import insert, select

from services.auth.models import UserRecord
from services.common.db import Database
from services.common.errors import Unauthenticated
from services.common.migrate import upgrade_async
from tests.support.auth_accounts import STRONG_PASSWORD, build_world
from tests.support.domain import START, refusal
from tests.support.look_alikes import fullwidth, mathematical_bold

BEFORE = "4f0d1e597c9e"  # the auth revision before the respelling
DISABLED_EARLIER = START - timedelta(days=3)

# id: (email as the earlier rules stored it, verified, days before START it was created, disabled)
LEGACY_ROWS = {
    # The canonical spelling is taken: its holder keeps it, however new and unverified.
    "00000000-0000-7000-8000-00000000000a": ("alice@example.com", False, 1, False),
    "00000000-0000-7000-8000-00000000000b": (fullwidth("alice") + "@example.com", True, 9, False),
    # Nobody holds it: the verified row takes it, though it is the newer one.
    "00000000-0000-7000-8000-00000000000c": (fullwidth("bob") + "@example.com", False, 9, False),
    "00000000-0000-7000-8000-00000000000d": (mathematical_bold("bob") + "@example.com", True, 2, False),
    # An enabled row before a disabled one, though that one is older; it stays disabled as it was.
    "00000000-0000-7000-8000-00000000000e": ("\ufb01nn@example.com", False, 5, False),
    "00000000-0000-7000-8000-00000000000f": (fullwidth("finn") + "@example.com", False, 6, True),
    # Both enabled and unverified: the older takes it.
    "00000000-0000-7000-8000-000000000013": (mathematical_bold("gus") + "@example.com", False, 3, False),
    "00000000-0000-7000-8000-000000000014": (fullwidth("gus") + "@example.com", False, 8, False),
    # A look-alike new registrations refuse: it keeps working under its own spelling...
    "00000000-0000-7000-8000-000000000010": ("al\u0131ce@example.com", True, 4, False),
    # ...and a fullwidth spelling of it collides with it.
    "00000000-0000-7000-8000-000000000011": (fullwidth("al") + "\u0131ce@example.com", False, 3, False),
    # Already canonical, nothing to do.
    "00000000-0000-7000-8000-000000000012": ("zed@xn--bcher-kva.example", True, 7, False),
}

# id: (email after the migration, disabled)
EXPECTED = {
    "00000000-0000-7000-8000-00000000000a": ("alice@example.com", False),
    "00000000-0000-7000-8000-00000000000b": (fullwidth("alice") + "@example.com", True),
    "00000000-0000-7000-8000-00000000000c": (fullwidth("bob") + "@example.com", True),
    "00000000-0000-7000-8000-00000000000d": ("bob@example.com", False),
    "00000000-0000-7000-8000-00000000000e": ("finn@example.com", False),
    "00000000-0000-7000-8000-00000000000f": (fullwidth("finn") + "@example.com", True),
    "00000000-0000-7000-8000-000000000013": (mathematical_bold("gus") + "@example.com", True),
    "00000000-0000-7000-8000-000000000014": ("gus@example.com", False),
    "00000000-0000-7000-8000-000000000010": ("al\u0131ce@example.com", False),
    "00000000-0000-7000-8000-000000000011": (fullwidth("al") + "\u0131ce@example.com", True),
    "00000000-0000-7000-8000-000000000012": ("zed@xn--bcher-kva.example", False),
}


async def write_legacy_rows(database: Database) -> None:
    password_hash = build_world(database).hasher.hash(STRONG_PASSWORD)
    async with database.unit_of_work() as session:
        for user_id, (email, verified, age_days, disabled) in LEGACY_ROWS.items():
            created = START - timedelta(days=age_days)
            await session.execute(
                insert(UserRecord).values(
                    id=user_id,
                    email=email,
                    display_name="Legacy",
                    password_hash=password_hash,
                    roles=["user"],
                    plan_id="free",
                    email_verified_at=created if verified else None,
                    last_login_at=None,
                    disabled_at=DISABLED_EARLIER if disabled else None,
                    created_at=created,
                    updated_at=created,
                )
            )


async def stored(database: Database) -> dict[str, UserRecord]:
    async with database.unit_of_work(read_only=True) as session:
        return {record.id: record for record in await session.scalars(select(UserRecord))}


async def test_stored_addresses_are_respelled_and_collisions_leave_one_account(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.auth.migrations")
    await upgrade_async(database_url, target=BEFORE)
    database = Database(database_url)
    try:
        await write_legacy_rows(database)
        await upgrade_async(database_url)

        records = await stored(database)
        assert {
            user_id: (record.email, record.disabled_at is not None) for user_id, record in records.items()
        } == (EXPECTED)
        # Nothing else about a row changed, and rows with nothing to do were not touched.
        unchanged = "00000000-0000-7000-8000-000000000012"
        assert records[unchanged].updated_at == START - timedelta(days=7)
        assert records["00000000-0000-7000-8000-00000000000f"].disabled_at == DISABLED_EARLIER
        assert all(record.display_name == "Legacy" for record in records.values())

        newly_disabled = ["0000000b", "0000000c", "00000011", "00000013"]
        assert "4 account(s) spelled another account's address differently" in caplog.text
        assert all(f"-0000{suffix}" in caplog.text for suffix in newly_disabled)
        assert "2 account(s) have an address new registrations may no longer use" in caplog.text

        # Sign-in is unambiguous: every spelling reaches the account that kept the address.
        world = build_world(database)
        for spelling, owner in [
            (fullwidth("ALICE") + "@example.com", "00000000-0000-7000-8000-00000000000a"),
            ("bob@example.com", "00000000-0000-7000-8000-00000000000d"),
            (fullwidth("bob") + "@example.com", "00000000-0000-7000-8000-00000000000d"),
            ("FINN@example.com", "00000000-0000-7000-8000-00000000000e"),
            (mathematical_bold("gus") + "@example.com", "00000000-0000-7000-8000-000000000014"),
            ("al\u0131ce@example.com", "00000000-0000-7000-8000-000000000010"),
            ("zed@b\u00fccher.example", "00000000-0000-7000-8000-000000000012"),
        ]:
            assert (await world.accounts.authenticate(spelling, STRONG_PASSWORD, client_ip="")).id == owner
        # A disabled loser's own spelling reaches the keeper, never the loser.
        keeper = await world.accounts.authenticate(
            fullwidth("alice") + "@example.com", STRONG_PASSWORD, client_ip=""
        )
        assert keeper.id == "00000000-0000-7000-8000-00000000000a"
    finally:
        await database.dispose()


async def test_a_colliding_rows_password_no_longer_signs_in(database_url: str) -> None:
    """Its spelling now names the account that kept the address, whose password is another."""
    await upgrade_async(database_url, target=BEFORE)
    database = Database(database_url)
    try:
        world = build_world(database)
        async with database.unit_of_work() as session:
            for user_id, email, password in [
                ("00000000-0000-7000-8000-0000000000a1", "carol@example.com", STRONG_PASSWORD),
                (
                    "00000000-0000-7000-8000-0000000000a2",
                    fullwidth("carol") + "@example.com",
                    "mallory-knows-1",
                ),
            ]:
                await session.execute(
                    insert(UserRecord).values(
                        id=user_id,
                        email=email,
                        display_name="Carol",
                        password_hash=world.hasher.hash(password),
                        roles=["user"],
                        plan_id="free",
                        created_at=START,
                        updated_at=START,
                    )
                )
        await upgrade_async(database_url)
        await refusal(
            world.accounts.authenticate(fullwidth("carol") + "@example.com", "mallory-knows-1", client_ip=""),
            Unauthenticated,
        )
        keeper = await world.accounts.authenticate("carol@example.com", STRONG_PASSWORD, client_ip="")
        assert keeper.id == "00000000-0000-7000-8000-0000000000a1"
        # The loser's row is there, disabled, for an admin to find and review.
        loser = await world.admin.get_user("00000000-0000-7000-8000-0000000000a2")
        assert (loser.disabled, loser.email) == (True, fullwidth("carol") + "@example.com")
    finally:
        await database.dispose()
