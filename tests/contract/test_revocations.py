"""Contract of the access-token revocation list: one suite, run against every adapter.

Expiry is checked against real time (Redis expires keys on its own clock), with lifetimes of a few
hundred milliseconds: a test polls until an entry is gone, or until a witness entry with the same
lifetime is, never sleeps a fixed time.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta

import pytest
from redis.asyncio import Redis

from services.common.clock import utc_now
from services.common.errors import Unavailable
from services.common.redis_multiplex import MultiplexedRedis
from services.common.revocation import (
    InMemoryRevocationList,
    RedisRevocationList,
    RevocationFeedMirror,
    RevocationList,
)
from tests.support.polling import eventually
from tests.support.redis_keys import delete_namespace
from tests.support.tcp_proxy import TcpProxy

ADAPTERS = [
    "memory",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("redis-mirrored", marks=pytest.mark.redis),
]
LONG = timedelta(minutes=15)


@pytest.fixture(params=ADAPTERS)
async def revocations(request: pytest.FixtureRequest) -> AsyncIterator[RevocationList]:
    if request.param == "memory":
        yield InMemoryRevocationList()
        return
    redis_url: str = request.getfixturevalue("redis_url")
    client = Redis.from_url(redis_url)
    prefix = f"parley-test:{uuid.uuid4().hex}:revoked:"
    mirror = None
    if request.param == "redis-mirrored":
        mirror = RevocationFeedMirror(redis_url, key_prefix=prefix)
        mirror.start()
        await eventually(lambda: mirror.fresh, what="the mirror follows the feed", timeout_s=5)
    revocations = RedisRevocationList(MultiplexedRedis.from_url(redis_url), key_prefix=prefix, mirror=mirror)
    try:
        yield revocations
    finally:
        await revocations.aclose()
        await delete_namespace(client, prefix)
        await client.aclose()


def revocation_gone(
    revocations: RevocationList, session_id: str, user_id: str, issued_at: datetime
) -> Callable[[], Awaitable[bool]]:
    async def gone() -> bool:
        return not await revocations.is_revoked(session_id, user_id, issued_at)

    return gone


async def test_nothing_is_revoked_at_first(revocations: RevocationList) -> None:
    assert not await revocations.is_revoked("s1", "u1", utc_now())
    assert not await revocations.is_revoked("", "", utc_now())


async def test_a_revoked_session_refuses_its_tokens_only(revocations: RevocationList) -> None:
    now = utc_now()
    await revocations.revoke_session("s1", now + LONG)
    assert await revocations.is_revoked("s1", "u1", now)
    assert await revocations.is_revoked("s1", "u1", now + timedelta(minutes=1))  # any token of it
    assert not await revocations.is_revoked("s2", "u1", now)
    assert not await revocations.is_revoked("", "u1", now)


async def test_a_user_cutoff_refuses_tokens_issued_before_it(revocations: RevocationList) -> None:
    moment = utc_now().replace(microsecond=0)
    await revocations.revoke_user_tokens_before("u1", moment, moment + LONG)
    assert await revocations.is_revoked("s1", "u1", moment - timedelta(seconds=1))
    assert await revocations.is_revoked("s9", "u1", moment - timedelta(minutes=10))
    assert not await revocations.is_revoked("s1", "u1", moment)
    assert not await revocations.is_revoked("s1", "u1", moment + timedelta(seconds=1))
    assert not await revocations.is_revoked("s1", "u2", moment - timedelta(seconds=1))


async def test_a_cutoff_inside_a_second_refuses_tokens_of_that_second(revocations: RevocationList) -> None:
    # `iat` is whole seconds: a token stamped with the cutoff's second may predate it, so it goes
    # (the issuer never stamps a new token there; see AccessTokenIssuer).
    second = utc_now().replace(microsecond=0)
    cutoff = second + timedelta(milliseconds=400)
    await revocations.revoke_user_tokens_before("u1", cutoff, second + LONG)
    assert await revocations.is_revoked("s1", "u1", second)
    assert not await revocations.is_revoked("s1", "u1", second + timedelta(seconds=1))
    assert await revocations.user_cutoff("u1") == cutoff
    assert await revocations.user_cutoff("u2") is None


async def test_the_latest_cutoff_and_the_longest_lifetime_win(revocations: RevocationList) -> None:
    now = utc_now().replace(microsecond=0)
    later = now + timedelta(seconds=30)
    await revocations.revoke_user_tokens_before("u1", later, now + LONG)
    # An older cutoff arriving late must not shorten the later one's reach...
    short = now + timedelta(milliseconds=300)
    await revocations.revoke_user_tokens_before("u1", now, short)
    await revocations.revoke_user_tokens_before("witness", now, short)
    assert await revocations.is_revoked("s1", "u1", later - timedelta(seconds=1))
    # ...nor its lifetime: it outlives a witness that had only the short one.
    witness_gone = revocation_gone(revocations, "", "witness", now - timedelta(seconds=1))
    await eventually(witness_gone, what="the witness cutoff gone")
    assert await revocations.is_revoked("s1", "u1", later - timedelta(seconds=1))

    short = utc_now() + timedelta(milliseconds=300)
    await revocations.revoke_session("s1", utc_now() + LONG)
    await revocations.revoke_session("s1", short)
    await revocations.revoke_session("witness", short)
    await eventually(revocation_gone(revocations, "witness", "u2", now), what="the witness session gone")
    assert await revocations.is_revoked("s1", "u2", now)


async def test_entries_vanish_when_the_tokens_they_refuse_have_expired(revocations: RevocationList) -> None:
    now = utc_now()
    await revocations.revoke_session("s1", now + timedelta(milliseconds=300))
    await revocations.revoke_user_tokens_before("u1", now, now + timedelta(milliseconds=300))
    assert await revocations.is_revoked("s1", "u9", now)
    assert await revocations.is_revoked("s9", "u1", now - timedelta(seconds=1))
    await eventually(revocation_gone(revocations, "s1", "u9", now), what="the session's entry gone")
    await eventually(
        revocation_gone(revocations, "s9", "u1", now - timedelta(seconds=1)), what="the user's cutoff gone"
    )


async def test_a_revocation_that_ends_in_the_past_is_a_no_op(revocations: RevocationList) -> None:
    now = utc_now()
    await revocations.revoke_session("s1", now - timedelta(seconds=1))
    await revocations.revoke_user_tokens_before("u1", now, now - timedelta(seconds=1))
    assert not await revocations.is_revoked("s1", "u1", now - timedelta(minutes=1))


@pytest.mark.redis
async def test_revocations_are_shared_by_every_instance_on_the_same_store(redis_url: str) -> None:
    prefix = f"parley-test:{uuid.uuid4().hex}:revoked:"
    first_client, second_client = Redis.from_url(redis_url), Redis.from_url(redis_url)
    writer = RedisRevocationList(MultiplexedRedis.from_url(redis_url), key_prefix=prefix)
    reader = RedisRevocationList(MultiplexedRedis.from_url(redis_url), key_prefix=prefix)
    other_namespace = RedisRevocationList(MultiplexedRedis.from_url(redis_url), key_prefix=f"{prefix}other:")
    try:
        await writer.revoke_session("s1", utc_now() + LONG)
        assert await reader.is_revoked("s1", "u1", utc_now())
        assert not await other_namespace.is_revoked("s1", "u1", utc_now())
        ttl_ms = await second_client.pttl(f"{prefix}session:s1")
        assert 0 < ttl_ms <= LONG.total_seconds() * 1000
    finally:
        await delete_namespace(first_client, prefix)
        for instance in (writer, reader, other_namespace):
            await instance.aclose()
        await first_client.aclose()
        await second_client.aclose()


async def test_an_unreachable_redis_fails_closed_as_unavailable() -> None:
    # Port 1 on loopback refuses connections at once.
    revocations = RedisRevocationList(
        MultiplexedRedis.from_url("redis://127.0.0.1:1/0"), key_prefix="unreachable:"
    )
    try:
        with pytest.raises(Unavailable) as checking:
            await revocations.is_revoked("s1", "u1", utc_now())
        assert (checking.value.reason, checking.value.metadata) == (
            "SERVICE_UNAVAILABLE",
            {"dependency": "redis"},
        )
        with pytest.raises(Unavailable):
            await revocations.revoke_session("s1", utc_now() + LONG)
    finally:
        await revocations.aclose()


# A reader whose own Redis connection leads nowhere: what it answers comes from its mirror alone.
UNREACHABLE = "redis://127.0.0.1:1/0"


@pytest.mark.redis
async def test_revocations_reach_every_mirror_and_are_answered_from_it(redis_url: str) -> None:
    prefix = f"parley-test:{uuid.uuid4().hex}:revoked:"
    client = Redis.from_url(redis_url)
    writer = RedisRevocationList(MultiplexedRedis.from_url(redis_url), key_prefix=prefix)
    await writer.revoke_session("before", utc_now() + LONG)
    mirror = RevocationFeedMirror(redis_url, key_prefix=prefix)
    reader = RedisRevocationList(MultiplexedRedis.from_url(UNREACHABLE), key_prefix=prefix, mirror=mirror)
    try:
        mirror.start()
        await eventually(lambda: mirror.fresh, what="the mirror follows the feed", timeout_s=5)
        assert await reader.is_revoked("before", "u1", utc_now()), "copied when the mirror started"
        assert not await reader.is_revoked("s1", "u1", utc_now())

        await writer.revoke_session("s1", utc_now() + LONG)
        cutoff = utc_now()
        await writer.revoke_user_tokens_before("u2", cutoff, cutoff + LONG)

        async def seen() -> bool:
            return await reader.is_revoked("s1", "u1", utc_now())

        await eventually(seen, what="the revocation reached the mirror", timeout_s=5, interval_s=0.005)
        assert await reader.is_revoked("", "u2", cutoff - timedelta(seconds=5))
        assert not await reader.is_revoked("", "u2", cutoff + timedelta(seconds=5))
    finally:
        await reader.aclose()
        await writer.aclose()
        await delete_namespace(client, prefix)
        await client.aclose()


@pytest.mark.redis
async def test_a_mirror_that_lost_the_feed_is_not_trusted_and_catches_up_after(redis_url: str) -> None:
    prefix = f"parley-test:{uuid.uuid4().hex}:revoked:"
    client = Redis.from_url(redis_url)
    address = client.connection_pool.connection_kwargs
    proxy = TcpProxy(address.get("host", "127.0.0.1"), address.get("port", 6379))
    await proxy.start()
    mirror = RevocationFeedMirror(f"redis://127.0.0.1:{proxy.port}/{address.get('db', 0)}", key_prefix=prefix)
    reader = RedisRevocationList(MultiplexedRedis.from_url(UNREACHABLE), key_prefix=prefix, mirror=mirror)
    writer = RedisRevocationList(MultiplexedRedis.from_url(redis_url), key_prefix=prefix)
    try:
        mirror.start()
        await eventually(lambda: mirror.fresh, what="the mirror follows the feed", timeout_s=5)
        assert not await reader.is_revoked("s1", "u1", utc_now())

        await proxy.cut()
        await eventually(lambda: not mirror.fresh, what="the mirror knows it lost the feed", timeout_s=5)
        with pytest.raises(Unavailable):
            # Not fresh, so Redis is asked; it cannot be reached: fail closed.
            await reader.is_revoked("s1", "u1", utc_now())
        await writer.revoke_session("s1", utc_now() + LONG)

        await proxy.restore()

        async def caught_up() -> bool:
            return mirror.fresh and await reader.is_revoked("s1", "u1", utc_now())

        await eventually(
            caught_up, what="the mirror copied what it missed", timeout_s=10, retrying_on=(Unavailable,)
        )
    finally:
        await reader.aclose()
        await writer.aclose()
        await proxy.close()
        await delete_namespace(client, prefix)
        await client.aclose()


# ---- credential changes -----------------------------------------------------------------------------


class Heard:
    """A listener of credential changes that records what it was told."""

    def __init__(self) -> None:
        self.users: list[str] = []
        self.everything = 0

    def forget_user(self, user_id: str) -> int:
        self.users.append(user_id)
        return 0

    def forget_everything(self) -> int:
        self.everything += 1
        return 0


# The two lists processes run with: in memory (embedded), and Redis followed by a mirror.
HEARING = ["memory", pytest.param("redis-mirrored", marks=pytest.mark.redis)]


@pytest.fixture(params=HEARING)
async def hearing(request: pytest.FixtureRequest) -> AsyncIterator[RevocationList]:
    if request.param == "memory":
        yield InMemoryRevocationList()
        return
    redis_url: str = request.getfixturevalue("redis_url")
    client = Redis.from_url(redis_url)
    prefix = f"parley-test:{uuid.uuid4().hex}:revoked:"
    mirror = RevocationFeedMirror(redis_url, key_prefix=prefix)
    revocations = RedisRevocationList(MultiplexedRedis.from_url(redis_url), key_prefix=prefix, mirror=mirror)
    try:
        yield revocations
    finally:
        await revocations.aclose()
        await delete_namespace(client, prefix)
        await client.aclose()


async def test_a_credential_change_is_heard_here_at_once_and_refuses_no_token(
    hearing: RevocationList,
) -> None:
    hub = hearing.credential_changes()
    heard = Heard()
    hub.subscribe(heard)
    await eventually(lambda: hub.confirmed_age_s() is not None, what="the list is current", timeout_s=5)

    await hearing.credentials_changed("u1")

    assert heard.users[:1] == ["u1"]
    assert not await hearing.is_revoked("s1", "u1", utc_now() - timedelta(minutes=1))
    age = hub.confirmed_age_s()
    assert age is not None and age < 2.0


async def test_the_stream_an_edge_follows_starts_afresh_and_carries_each_change(
    hearing: RevocationList,
) -> None:
    hub = hearing.credential_changes()
    await eventually(lambda: hub.confirmed_age_s() is not None, what="the list is current", timeout_s=5)
    stream = hub.follow(heartbeat_s=0.05)
    try:
        async with asyncio.timeout(5):
            first = await anext(stream)
            assert first.everything
            await hearing.credentials_changed("u1")
            news = await anext(stream)
            while not news.user_ids:  # a heartbeat may come first
                news = await anext(stream)
        assert news.user_ids == {"u1"}
        assert not news.everything
    finally:
        await stream.aclose()


@pytest.mark.redis
async def test_credential_changes_reach_every_mirror(redis_url: str) -> None:
    prefix = f"parley-test:{uuid.uuid4().hex}:revoked:"
    client = Redis.from_url(redis_url)
    writer = RedisRevocationList(
        MultiplexedRedis.from_url(redis_url),
        key_prefix=prefix,
        mirror=RevocationFeedMirror(redis_url, key_prefix=prefix),
    )
    # Another replica: what it hears comes through the feed, its own connection leads nowhere.
    mirror = RevocationFeedMirror(redis_url, key_prefix=prefix)
    reader = RedisRevocationList(MultiplexedRedis.from_url(UNREACHABLE), key_prefix=prefix, mirror=mirror)
    heard = Heard()
    hub = reader.credential_changes()
    hub.subscribe(heard)
    try:
        # Asking how current it is starts the following, as a cache's first lookup does.
        await eventually(lambda: hub.confirmed_age_s() is not None, what="the mirror follows", timeout_s=5)
        assert heard.everything == 1, "listeners forget everything whenever following starts"

        await writer.credentials_changed("u1")

        await eventually(lambda: heard.users == ["u1"], what="the change reached the mirror", timeout_s=5)
        # A change refuses nothing: the feed entry leaves no key behind.
        assert await client.keys(f"{prefix}user:*") == []
    finally:
        await reader.aclose()
        await writer.aclose()
        await delete_namespace(client, prefix)
        await client.aclose()


@pytest.mark.redis
async def test_listeners_forget_everything_when_the_mirror_comes_back_from_a_gap(redis_url: str) -> None:
    prefix = f"parley-test:{uuid.uuid4().hex}:revoked:"
    client = Redis.from_url(redis_url)
    address = client.connection_pool.connection_kwargs
    proxy = TcpProxy(address.get("host", "127.0.0.1"), address.get("port", 6379))
    await proxy.start()
    mirror = RevocationFeedMirror(f"redis://127.0.0.1:{proxy.port}/{address.get('db', 0)}", key_prefix=prefix)
    reader = RedisRevocationList(MultiplexedRedis.from_url(UNREACHABLE), key_prefix=prefix, mirror=mirror)
    writer = RedisRevocationList(MultiplexedRedis.from_url(redis_url), key_prefix=prefix)
    heard = Heard()
    hub = reader.credential_changes()
    hub.subscribe(heard)
    try:
        await eventually(lambda: hub.confirmed_age_s() is not None, what="the mirror follows", timeout_s=5)
        assert heard.everything == 1

        await proxy.cut()
        await eventually(lambda: hub.confirmed_age_s() is None, what="the gap is known", timeout_s=5)
        await writer.credentials_changed("missed")
        await proxy.restore()

        await eventually(lambda: hub.confirmed_age_s() is not None, what="the mirror is back", timeout_s=10)
        # The change written in the gap is not in the feed after the point the mirror resumed from.
        assert heard.everything == 2
        assert "missed" not in heard.users
    finally:
        await reader.aclose()
        await writer.aclose()
        await proxy.close()
        await delete_namespace(client, prefix)
        await client.aclose()


@pytest.mark.redis
async def test_a_list_without_a_mirror_hears_nothing_and_is_never_current(redis_url: str) -> None:
    prefix = f"parley-test:{uuid.uuid4().hex}:revoked:"
    client = Redis.from_url(redis_url)
    revocations = RedisRevocationList(MultiplexedRedis.from_url(redis_url), key_prefix=prefix)
    heard = Heard()
    revocations.credential_changes().subscribe(heard)
    try:
        await revocations.credentials_changed("u1")
        assert heard.users == []
        assert revocations.credential_changes().confirmed_age_s() is None
        assert await client.xlen(f"{prefix}feed") == 1  # written for the mirrors of others
    finally:
        await revocations.aclose()
        await delete_namespace(client, prefix)
        await client.aclose()


@pytest.mark.redis
async def test_a_check_for_a_sensitive_call_asks_redis_not_the_mirror(redis_url: str) -> None:
    prefix = f"parley-test:{uuid.uuid4().hex}:revoked:"
    client = Redis.from_url(redis_url)
    mirror = RevocationFeedMirror(redis_url, key_prefix=prefix)
    sensitive = False
    # Its own connection leads nowhere: an answer that needs Redis fails closed.
    reader = RedisRevocationList(
        MultiplexedRedis.from_url(UNREACHABLE),
        key_prefix=prefix,
        mirror=mirror,
        authoritative=lambda: sensitive,
    )
    try:
        mirror.start()
        await eventually(lambda: mirror.fresh, what="the mirror follows the feed", timeout_s=5)
        assert not await reader.is_revoked("s1", "u1", utc_now())

        sensitive = True
        with pytest.raises(Unavailable):
            await reader.is_revoked("s1", "u1", utc_now())
    finally:
        await reader.aclose()
        await delete_namespace(client, prefix)
        await client.aclose()
