"""Test keys in the shared Redis test database: each test namespaces its keys, and removes them."""

from __future__ import annotations

from redis.asyncio import Redis


async def delete_namespace(client: Redis, prefix: str, *also: str) -> None:
    """Delete every key under `prefix`, and the keys `also` names."""
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    if keys or also:
        await client.delete(*also, *keys)
