"""Contract of API keys (services.auth.api_keys over SQL), on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from parley.events.v1 import events_pb2
from services.auth.api_keys import ALLOWED_SCOPES, KEY_LENGTH, ApiKeyManager
from services.auth.models import ApiKeyRecord, UserRecord
from services.auth.opaque import secret_hash
from services.auth.ports import AuthUnitOfWork
from services.auth.repository import auth_units_of_work
from services.common.db import Database
from services.common.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    ParleyError,
    PermissionDenied,
    Unauthenticated,
)
from services.common.redis_multiplex import MultiplexedRedis
from services.common.revocation import InMemoryRevocationList, RedisRevocationList, RevocationList
from tests.support.auth_accounts import set_disabled, user_events
from tests.support.domain import START, Clock

KEY_FORMAT = re.compile(r"pk_[a-z2-7]{12}_[A-Za-z0-9_-]{43}")
CACHE_TTL_S = 30.0


class CountingUnits:
    """One replica's real SQL units of work, counting those opened (to prove what skips the database),
    and the revocation list its replicas share (in one process, like every replica on one Redis)."""

    def __init__(self, database: Database, feed: RevocationList) -> None:
        self._units = auth_units_of_work(database)
        self._feed = feed
        self.reads = 0
        self.writes = 0

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AuthUnitOfWork]:
        self.writes += 1
        async with self._units.write() as uow:
            yield uow

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AuthUnitOfWork]:
        self.reads += 1
        async with self._units.read() as uow:
            yield uow

    def manager(self, clock: Clock, **options: Any) -> ApiKeyManager:
        """An ApiKeyManager over these units, evicting its cache after their commits as wiring does."""
        keys = ApiKeyManager(self, changes=self._feed, clock=clock, **options)
        self._units.after_commit(keys.invalidate)
        return keys


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def feed() -> InMemoryRevocationList:
    return InMemoryRevocationList()


@pytest.fixture
def stores(database: Database, feed: InMemoryRevocationList) -> CountingUnits:
    return CountingUnits(database, feed)


@pytest.fixture
def keys(stores: CountingUnits, clock: Clock) -> ApiKeyManager:
    return stores.manager(clock, cache_ttl_s=CACHE_TTL_S)


async def add_user(database: Database, name: str) -> str:
    async with database.unit_of_work() as session:
        user = UserRecord(
            email=f"{name}@example.com",
            display_name=name.title(),
            password_hash="not-a-real-hash",
            roles=["user"],
            plan_id="team",
        )
        session.add(user)
        await session.flush()
        return user.id


@pytest.fixture
async def alice(database: Database) -> str:
    return await add_user(database, "alice")


@pytest.fixture
async def bob(database: Database) -> str:
    return await add_user(database, "bob")


async def key_row(database: Database, key_id: str) -> ApiKeyRecord:
    async with database.unit_of_work(read_only=True) as session:
        return (await session.scalars(select(ApiKeyRecord).where(ApiKeyRecord.id == key_id))).one()


async def revoke_behind_the_back(database: Database, key_id: str) -> None:
    """Revoke a key in the table directly: no after-commit hook runs, no change is announced."""
    async with database.unit_of_work() as session:
        await session.execute(update(ApiKeyRecord).where(ApiKeyRecord.id == key_id).values(revoked_at=START))


async def fails_with(call: Awaitable[object], error_type: type[ParleyError], reason: str) -> ParleyError:
    with pytest.raises(error_type) as caught:
        await call
    assert caught.value.reason == reason
    return caught.value


# --- create ---------------------------------------------------------------------------------------


async def test_create_shows_the_secret_once_and_stores_only_its_hash(
    keys: ApiKeyManager, database: Database, alice: str
) -> None:
    expiry = START + timedelta(days=90)

    created = await keys.create(
        alice, name=" CI deploys ", scopes=["chat", "billing:read", "chat"], expires_at=expiry
    )

    plaintext, api_key = created.plaintext, created.api_key
    assert KEY_FORMAT.fullmatch(plaintext)
    assert len(plaintext) == KEY_LENGTH
    assert api_key.name == "CI deploys"
    assert plaintext.startswith(api_key.display_prefix + "_")
    assert api_key.display_prefix == f"pk_{api_key.prefix}"
    assert api_key.last_four == plaintext[-4:]
    assert api_key.scopes == ("billing:read", "chat")
    assert (api_key.created_at, api_key.expires_at, api_key.last_used_at, api_key.revoked_at) == (
        START,
        expiry,
        None,
        None,
    )
    row = await key_row(database, api_key.id)
    assert row.secret_hash == secret_hash(plaintext)
    assert (row.prefix, row.last_four, row.user_id) == (api_key.prefix, api_key.last_four, alice)
    secret = plaintext[len("pk_") + 12 + 1 :]
    assert len(secret) == 43
    assert all(secret not in str(value) for value in vars(row).values())
    expected_event = events_pb2.ApiKeyCreated(
        user_id=alice,
        api_key_id=api_key.id,
        name="CI deploys",
        prefix=api_key.display_prefix,
        scopes=["billing:read", "chat"],
    )
    expected_event.expire_time.FromDatetime(expiry)
    assert await user_events(database, events_pb2.ApiKeyCreated) == [expected_event]


@pytest.mark.parametrize(
    ("scopes", "stored"),
    [([], ("*",)), (["*"], ("*",)), (["chat", "*"], ("*",)), (["analytics:read"], ("analytics:read",))],
)
async def test_scopes_are_normalized(
    keys: ApiKeyManager, alice: str, scopes: list[str], stored: tuple[str, ...]
) -> None:
    created = await keys.create(alice, name="key", scopes=scopes)
    assert created.api_key.scopes == stored
    identity = await keys.check(created.plaintext)
    assert identity.scopes == stored
    assert identity.allows("chat") == ("*" in stored or "chat" in stored)


async def test_the_allowed_scopes_are_documented() -> None:
    assert set(ALLOWED_SCOPES) == {"*", "chat", "chat:read", "billing:read", "analytics:read"}


async def test_create_reports_every_invalid_field(
    keys: ApiKeyManager, stores: CountingUnits, database: Database, alice: str
) -> None:
    error = await fails_with(
        keys.create(alice, name="   ", scopes=["chat", "admin", "billing:write"], expires_at=START),
        InvalidArgument,
        "INVALID_ARGUMENT",
    )

    assert [v.field for v in error.field_violations] == ["name", "scopes[1]", "scopes[2]", "expire_time"]
    assert all(v.reason == "INVALID_FIELD" for v in error.field_violations)
    too_long = await fails_with(keys.create(alice, name="n" * 101), InvalidArgument, "INVALID_ARGUMENT")
    assert too_long.field_violations == (FieldViolation("name", "The name must be at most 100 characters."),)
    assert (await keys.create(alice, name="n" * 100)).api_key.name == "n" * 100
    naive = await fails_with(
        keys.create(alice, name="k", expires_at=datetime(2040, 1, 1)), InvalidArgument, "INVALID_ARGUMENT"
    )
    assert [v.field for v in naive.field_violations] == ["expire_time"]
    assert stores.writes == 1  # only the valid key reached the database
    assert len(await user_events(database, events_pb2.ApiKeyCreated)) == 1


# --- list -----------------------------------------------------------------------------------------


async def test_list_shows_the_owners_keys_newest_first_without_secrets(
    keys: ApiKeyManager, clock: Clock, alice: str, bob: str
) -> None:
    await keys.create(alice, name="old")
    clock.advance(timedelta(minutes=1))
    expiring = await keys.create(alice, name="expiring", expires_at=clock.now + timedelta(hours=1))
    clock.advance(timedelta(minutes=1))
    revoked = await keys.create(alice, name="revoked")
    clock.advance(timedelta(minutes=1))
    new = await keys.create(alice, name="new")
    await keys.create(bob, name="bob's")
    await keys.revoke(alice, revoked.api_key.id)
    await keys.check(new.plaintext)

    page = await keys.list_keys(alice)

    assert [k.name for k in page.items] == ["new", "expiring", "old"]
    assert page.next_page_token == ""
    listed_new = page.items[0]
    assert (listed_new.prefix, listed_new.last_four) == (new.api_key.prefix, new.plaintext[-4:])
    assert listed_new.last_used_at == clock.now
    assert all(new.plaintext[16:] not in repr(k) for k in page.items)

    clock.advance(timedelta(hours=2))
    assert [k.name for k in (await keys.list_keys(alice)).items] == ["new", "old"]
    everything = await keys.list_keys(alice, show_revoked=True)
    assert [k.name for k in everything.items] == ["new", "revoked", "expiring", "old"]
    assert everything.items[1].revoked_at is not None

    first = await keys.list_keys(alice, page_size=2, show_revoked=True)
    second = await keys.list_keys(alice, page_size=2, show_revoked=True, page_token=first.next_page_token)
    assert [k.name for k in first.items + second.items] == ["new", "revoked", "expiring", "old"]
    assert second.next_page_token == ""
    await fails_with(
        keys.list_keys(alice, page_size=2, page_token=first.next_page_token),
        InvalidArgument,
        "INVALID_PAGE_TOKEN",
    )
    assert expiring.api_key.id not in {k.id for k in (await keys.list_keys(bob)).items}


# --- revoke ---------------------------------------------------------------------------------------


async def test_revoke_is_for_the_owner_only_and_happens_once(
    keys: ApiKeyManager, database: Database, clock: Clock, alice: str, bob: str
) -> None:
    created = await keys.create(alice, name="key")
    key_id = created.api_key.id
    await keys.check(created.plaintext)  # now cached

    await fails_with(keys.revoke(bob, key_id), NotFound, "NOT_FOUND")
    await fails_with(keys.revoke(alice, "no-such-key"), NotFound, "NOT_FOUND")
    await keys.check(created.plaintext)

    revoked = await keys.revoke(alice, key_id)

    assert revoked.revoked_at == clock.now
    assert (await key_row(database, key_id)).revoked_at == clock.now
    assert await user_events(database, events_pb2.ApiKeyRevoked) == [
        events_pb2.ApiKeyRevoked(user_id=alice, api_key_id=key_id, actor_user_id=alice)
    ]
    # Evicted from this process's cache at once.
    await fails_with(keys.check(created.plaintext), Unauthenticated, "API_KEY_REVOKED")
    again = await keys.revoke(alice, key_id, actor_user_id="admin-1")
    assert again.revoked_at == revoked.revoked_at
    assert len(await user_events(database, events_pb2.ApiKeyRevoked)) == 1


# --- check ----------------------------------------------------------------------------------------


async def test_check_answers_with_the_keys_identity(keys: ApiKeyManager, alice: str) -> None:
    created = await keys.create(alice, name="key", scopes=["chat"])

    identity = await keys.check(created.plaintext)

    assert identity.user_id == alice
    assert identity.key_id == created.api_key.id
    assert identity.scopes == ("chat",)
    assert (identity.plan_id, identity.roles, identity.email_verified) == ("team", ("user",), False)
    assert identity.allows("chat")
    assert not identity.allows("billing:read")


@pytest.mark.parametrize(
    "presented",
    [
        "",
        "pk_",
        "sk_abcdefghijkl_" + "a" * 43,
        "pk_ABCDEFGHIJKL_" + "a" * 43,  # upper case is not in the prefix alphabet
        "pk_abcdefghijk1_" + "a" * 43,  # nor are 0, 1, 8 and 9
        "pk_abcdefghijkl-" + "a" * 43,
        "pk_abcdefghijkl_" + "a" * 42,
        "pk_abcdefghijkl_" + "a" * 44,
        "pk_abcdefghijkl_" + "a" * 42 + "=",
        "pk_abcdefghijkl_" + "a" * 10_000,
        " pk_abcdefghijkl_" + "a" * 43,
    ],
)
async def test_malformed_keys_are_refused_without_touching_the_database(
    keys: ApiKeyManager, stores: CountingUnits, presented: str
) -> None:
    error = await fails_with(keys.check(presented), Unauthenticated, "API_KEY_INVALID")
    assert error.metadata == {"cause": "malformed"}
    assert (stores.reads, stores.writes) == (0, 0)


async def test_unknown_or_wrong_secret_is_invalid(keys: ApiKeyManager, alice: str) -> None:
    created = await keys.create(alice, name="key")
    plaintext = created.plaintext
    tampered = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    unknown_prefix = "pk_" + "a" * 12 + plaintext[15:]

    for presented in (tampered, unknown_prefix):
        error = await fails_with(keys.check(presented), Unauthenticated, "API_KEY_INVALID")
        assert error.metadata == {"cause": "unknown"}
    await keys.check(plaintext)


async def test_expired_keys_are_refused_even_from_the_cache(
    keys: ApiKeyManager, stores: CountingUnits, clock: Clock, alice: str
) -> None:
    created = await keys.create(alice, name="key", expires_at=START + timedelta(seconds=10))
    await keys.check(created.plaintext)  # cached
    clock.advance(timedelta(seconds=10))

    await fails_with(keys.check(created.plaintext), Unauthenticated, "API_KEY_EXPIRED")
    reads = stores.reads
    await fails_with(keys.check(created.plaintext), Unauthenticated, "API_KEY_EXPIRED")
    assert stores.reads == reads + 1  # the expired entry left the cache; the database says expired


async def test_a_disabled_users_keys_are_refused(
    database: Database, stores: CountingUnits, feed: InMemoryRevocationList, clock: Clock, alice: str
) -> None:
    keys = stores.manager(clock, cache_ttl_s=CACHE_TTL_S)
    created = await keys.create(alice, name="key")
    await keys.check(created.plaintext)
    await set_disabled(database, alice, True)

    # This replica forgets the user's cached checks when told (the others hear it from the feed).
    assert keys.forget_user(alice) == 1
    await fails_with(keys.check(created.plaintext), PermissionDenied, "ACCOUNT_DISABLED")

    other_replica = CountingUnits(database, feed).manager(clock, cache_ttl_s=CACHE_TTL_S)
    await fails_with(other_replica.check(created.plaintext), PermissionDenied, "ACCOUNT_DISABLED")
    await set_disabled(database, alice, False)
    assert (await keys.check(created.plaintext)).user_id == alice


async def test_last_used_is_written_at_most_once_a_minute(
    database: Database, stores: CountingUnits, clock: Clock, alice: str
) -> None:
    for cache_ttl_s in (0.0, CACHE_TTL_S):
        keys = stores.manager(clock, cache_ttl_s=cache_ttl_s)
        created = await keys.create(alice, name=f"cache {cache_ttl_s}")
        key_id = created.api_key.id
        first_use = clock.now
        writes = stores.writes

        await keys.check(created.plaintext)
        assert (await key_row(database, key_id)).last_used_at == first_use
        assert stores.writes == writes + 1
        for _ in range(5):
            clock.advance(timedelta(seconds=10))
            await keys.check(created.plaintext)
        assert (await key_row(database, key_id)).last_used_at == first_use
        assert stores.writes == writes + 1

        clock.advance(timedelta(seconds=10))  # a minute after the first use
        await keys.check(created.plaintext)
        assert (await key_row(database, key_id)).last_used_at == clock.now
        assert stores.writes == writes + 2


async def test_another_replica_does_not_rewrite_a_fresh_last_used(
    database: Database, stores: CountingUnits, clock: Clock, alice: str
) -> None:
    first = stores.manager(clock, cache_ttl_s=0)
    created = await first.create(alice, name="key")
    await first.check(created.plaintext)
    used_at = clock.now
    clock.advance(timedelta(seconds=20))

    second = stores.manager(clock, cache_ttl_s=0)
    writes = stores.writes
    await second.check(created.plaintext)  # it reads last_used_at 20 s ago, so it does not write

    assert stores.writes == writes
    assert (await key_row(database, created.api_key.id)).last_used_at == used_at


async def test_the_cache_skips_the_database_until_its_ttl_passes(
    keys: ApiKeyManager, stores: CountingUnits, clock: Clock, alice: str
) -> None:
    created = await keys.create(alice, name="key")
    assert keys.cache_enabled
    assert keys.cache_ttl == timedelta(seconds=CACHE_TTL_S)

    await keys.check(created.plaintext)
    reads = stores.reads
    for _ in range(10):
        await keys.check(created.plaintext)
    assert stores.reads == reads

    clock.advance(timedelta(seconds=CACHE_TTL_S))
    await keys.check(created.plaintext)
    assert stores.reads == reads + 1


async def test_the_cache_can_be_turned_off(stores: CountingUnits, clock: Clock, alice: str) -> None:
    keys = stores.manager(clock, cache_ttl_s=0)
    created = await keys.create(alice, name="key")
    assert not keys.cache_enabled

    for _ in range(3):
        await keys.check(created.plaintext)

    assert stores.reads == 3


async def test_the_cache_is_bounded(stores: CountingUnits, clock: Clock, alice: str) -> None:
    keys = stores.manager(clock, cache_ttl_s=CACHE_TTL_S, cache_max_entries=2)
    created = [await keys.create(alice, name=f"key {n}") for n in range(3)]
    for key in created:
        await keys.check(key.plaintext)  # the third evicts the least recently used, the first
    reads = stores.reads

    await keys.check(created[2].plaintext)
    await keys.check(created[1].plaintext)
    assert stores.reads == reads
    await keys.check(created[0].plaintext)
    assert stores.reads == reads + 1


async def test_other_replicas_forget_a_revoked_key_at_once(
    database: Database, stores: CountingUnits, feed: InMemoryRevocationList, clock: Clock, alice: str
) -> None:
    here = stores.manager(clock, cache_ttl_s=CACHE_TTL_S)
    elsewhere_units = CountingUnits(database, feed)
    elsewhere = elsewhere_units.manager(clock, cache_ttl_s=CACHE_TTL_S)
    created = await here.create(alice, name="key")
    kept = await here.create(alice, name="another key")
    await elsewhere.check(created.plaintext)
    await elsewhere.check(kept.plaintext)
    reads = elsewhere_units.reads
    await elsewhere.check(created.plaintext)
    assert elsewhere_units.reads == reads, "cached there"

    await here.revoke(alice, created.api_key.id)

    await fails_with(here.check(created.plaintext), Unauthenticated, "API_KEY_REVOKED")
    await fails_with(elsewhere.check(created.plaintext), Unauthenticated, "API_KEY_REVOKED")
    # The owner's other keys were forgotten too (one change to the user), and still work.
    assert (await elsewhere.check(kept.plaintext)).key_id == kept.api_key.id


async def test_a_replica_that_does_not_hear_changes_never_answers_from_its_cache(
    database: Database, clock: Clock, alice: str
) -> None:
    # A list with no mirror of its feed is never confirmed current; the address leads nowhere.
    deaf = RedisRevocationList(MultiplexedRedis.from_url("redis://127.0.0.1:1/0"), key_prefix="deaf:")
    try:
        units = CountingUnits(database, deaf)
        keys = units.manager(clock, cache_ttl_s=CACHE_TTL_S)
        writer = CountingUnits(database, InMemoryRevocationList()).manager(clock)
        created = await writer.create(alice, name="key")

        for _ in range(3):
            await keys.check(created.plaintext)
        assert units.reads == 3
    finally:
        await deaf.aclose()


async def test_a_sensitive_check_reads_the_database_whatever_is_cached(
    keys: ApiKeyManager, stores: CountingUnits, database: Database, alice: str
) -> None:
    created = await keys.create(alice, name="key")
    await keys.check(created.plaintext)
    reads = stores.reads

    # Revoked behind the services' back: only a read of the database can see it.
    await revoke_behind_the_back(database, created.api_key.id)

    assert (await keys.check(created.plaintext)).key_id == created.api_key.id  # from the cache
    await fails_with(keys.check(created.plaintext, skip_cache=True), Unauthenticated, "API_KEY_REVOKED")
    assert stores.reads == reads + 1


async def test_a_check_overtaken_by_a_change_is_not_cached(
    database: Database, feed: InMemoryRevocationList, clock: Clock, alice: str
) -> None:
    # The change lands while the check reads the database: the answer read may predate it.
    class RevokingMidRead(CountingUnits):
        @contextlib.asynccontextmanager
        async def read(self) -> AsyncIterator[AuthUnitOfWork]:
            async with super().read() as uow:
                yield uow
            await feed.credentials_changed(alice)

    units = RevokingMidRead(database, feed)
    keys = units.manager(clock, cache_ttl_s=CACHE_TTL_S)
    created = await keys.create(alice, name="key")

    await keys.check(created.plaintext)
    await keys.check(created.plaintext)
    assert units.reads == 2
