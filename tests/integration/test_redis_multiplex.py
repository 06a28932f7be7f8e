"""MultiplexedRedis against the real Redis: order under concurrency, errors, scripts, outages, login."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.redis_multiplex import MultiplexedRedis, RedisAddress, Script
from tests.support.redis_keys import delete_namespace
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.redis


@pytest.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    namespace = f"parley-test:{uuid.uuid4().hex}:"
    yield namespace
    await delete_namespace(redis, namespace)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[MultiplexedRedis]:
    multiplexed = MultiplexedRedis.from_url(redis_url)
    yield multiplexed
    await multiplexed.aclose()


async def test_concurrent_commands_each_get_their_own_reply(client: MultiplexedRedis, prefix: str) -> None:
    await asyncio.gather(*(client.execute("SET", f"{prefix}{index}", index) for index in range(500)))
    replies = await asyncio.gather(*(client.execute("GET", f"{prefix}{index}") for index in range(500)))
    assert replies == [str(index).encode() for index in range(500)]


async def test_an_error_reply_fails_only_its_own_command(client: MultiplexedRedis, prefix: str) -> None:
    await client.execute("SET", f"{prefix}text", "not a number")
    outcomes = await asyncio.gather(
        client.execute("INCR", f"{prefix}text"),
        client.execute("INCR", f"{prefix}counter"),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], ResponseError)
    assert outcomes[1] == 1


async def test_replies_keep_their_types(client: MultiplexedRedis, prefix: str) -> None:
    await client.execute("RPUSH", f"{prefix}list", "a", "b")
    assert await client.execute("LRANGE", f"{prefix}list", 0, -1) == [b"a", b"b"]
    assert await client.execute("MGET", f"{prefix}list-absent", f"{prefix}other-absent") == [None, None]
    assert await client.execute("PING") == b"PONG"


async def test_a_script_the_server_lost_is_sent_again(
    client: MultiplexedRedis, redis: Redis, prefix: str
) -> None:
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await client.evalsha(script, [f"{prefix}scripted"], [2]) == 2
    await redis.script_flush()
    assert await client.evalsha(script, [f"{prefix}scripted"], [3]) == 5
    assert await client.evalsha(script, [f"{prefix}scripted"], [1]) == 6


async def test_it_selects_the_database_of_its_url(redis_url: str, prefix: str) -> None:
    address = RedisAddress.from_url(redis_url)
    other_db = 13 if address.db != 13 else 12
    base = redis_url.rsplit("/", 1)[0]
    in_other = MultiplexedRedis.from_url(f"{base}/{other_db}")
    in_tests = MultiplexedRedis.from_url(redis_url)
    try:
        await in_other.execute("SET", f"{prefix}where", "other", "PX", 60_000)
        assert await in_tests.execute("GET", f"{prefix}where") is None
        assert await in_other.execute("GET", f"{prefix}where") == b"other"
    finally:
        await in_other.execute("DEL", f"{prefix}where")
        await in_other.aclose()
        await in_tests.aclose()


async def test_it_logs_in_with_the_credentials_of_its_url(redis: Redis, redis_url: str, prefix: str) -> None:
    user, password = f"parley-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await redis.execute_command("ACL", "SETUSER", user, "on", f">{password}", f"~{prefix}*", "+@all")
    address = RedisAddress.from_url(redis_url)
    logged_in = MultiplexedRedis(RedisAddress(address.host, address.port, address.db, user, password))
    wrong = MultiplexedRedis(RedisAddress(address.host, address.port, address.db, user, "not-it"))
    try:
        await logged_in.execute("SET", f"{prefix}acl", "yes")
        assert await logged_in.execute("GET", f"{prefix}acl") == b"yes"
        with pytest.raises(RedisConnectionError):
            await wrong.execute("GET", f"{prefix}acl")
    finally:
        await logged_in.aclose()
        await wrong.aclose()
        await redis.execute_command("ACL", "DELUSER", user)


async def test_an_unreachable_server_is_a_connection_error() -> None:
    # Port 1 on loopback refuses connections at once.
    unreachable = MultiplexedRedis.from_url("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(RedisConnectionError):
            await unreachable.execute("PING")
    finally:
        await unreachable.aclose()


async def test_a_cut_connection_fails_its_commands_then_the_next_command_reconnects(redis_url: str) -> None:
    address = RedisAddress.from_url(redis_url)
    proxy = TcpProxy(address.host, address.port)
    await proxy.start()
    client = MultiplexedRedis.from_url(f"redis://127.0.0.1:{proxy.port}/{address.db}")
    try:
        assert await client.execute("PING") == b"PONG"
        blocked = asyncio.ensure_future(client.execute("BLPOP", f"parley-test:{uuid.uuid4().hex}", 5))
        await asyncio.sleep(0)  # one turn: the command is written
        await proxy.cut()
        with pytest.raises(RedisConnectionError):
            await blocked
        with pytest.raises(RedisConnectionError):
            await client.execute("PING")
        await proxy.restore()
        assert await client.execute("PING") == b"PONG"
    finally:
        await client.aclose()
        await proxy.close()


async def test_a_silent_server_times_out_and_the_connection_is_replaced() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = MultiplexedRedis.from_url(f"redis://127.0.0.1:{port}/0", command_timeout_s=0.2)
    try:
        first = [asyncio.ensure_future(client.execute("PING")) for _ in range(3)]
        for outcome in await asyncio.gather(*first, return_exceptions=True):
            assert isinstance(outcome, RedisTimeoutError)
        with pytest.raises(RedisTimeoutError):
            await client.execute("PING")
        assert len(accepted) == 2, "the timed-out connection was dropped and a new one made"
    finally:
        await client.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_closed_client_refuses_commands(redis_url: str) -> None:
    client = MultiplexedRedis.from_url(redis_url)
    assert await client.execute("PING") == b"PONG"
    await client.aclose()
    with pytest.raises(RedisConnectionError):
        await client.execute("PING")


def test_urls_are_parsed_and_checked() -> None:
    assert RedisAddress.from_url("redis://u%40x:p%3Aw@redis.internal:6380/3") == RedisAddress(
        "redis.internal", 6380, 3, "u@x", "p:w"
    )
    assert RedisAddress.from_url("redis://127.0.0.1") == RedisAddress("127.0.0.1", 6379, 0)
    with pytest.raises(ValueError, match="redis://"):
        RedisAddress.from_url("rediss://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="number"):
        RedisAddress.from_url("redis://127.0.0.1:6379/zero")
