"""The open-loop load generator: its HTTP parsing, its schedule, and what it measures from."""

from __future__ import annotations

import asyncio
import time

import pytest

from benchmarks.openloop import OpenLoop, _ResponseParser, percentile, summarize


def test_responses_with_a_length_and_chunked_ones_are_told_apart() -> None:
    parser = _ResponseParser()
    stream = (
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
        b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n\r\n"
    )
    statuses: list[int] = []
    # Byte by byte: a response may arrive split anywhere.
    for index in range(len(stream)):
        statuses += parser.feed(stream[index : index + 1])
    assert statuses == [200, 503, 204]


def test_percentiles_are_nearest_rank() -> None:
    values = sorted(float(value) for value in range(1, 101))
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([], 0.99) == 0.0


def test_only_loopback_is_a_target() -> None:
    with pytest.raises(ValueError, match="loopback"):
        OpenLoop(url="http://example.com/", rate=1, total=1, max_connections=1, timeout_s=1)


async def test_latency_runs_from_when_each_request_was_due() -> None:
    """A server that answers slowly, with one connection allowed: requests queue behind each other,
    and that queueing is in their latency (coordinated omission corrected)."""

    async def slow_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                await asyncio.sleep(0.05)  # the server under test is slow: that is the scenario
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(slow_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    generator = OpenLoop(url=f"http://127.0.0.1:{port}/x", rate=100, total=10, max_connections=1, timeout_s=5)
    started = time.monotonic()
    try:
        await generator.run(grace_s=5)
    finally:
        server.close()
        await server.wait_closed()
    result = summarize(generator, time.monotonic() - started, 0.0)
    assert (result["answered"], result["errors"]) == (10, 0)
    latency = result["latency_ms"]
    assert isinstance(latency, dict)
    # Ten requests due 10 ms apart, served 50 ms each on one connection: the last waited ~400 ms.
    assert latency["max"] >= 400, latency
    assert latency["p50"] >= 150, latency
