"""An open-loop HTTP/1.1 load generator: requests start on a fixed schedule, whatever the server does.

A closed loop (wrk: N connections, each sending its next request when the previous one answered)
slows down with the server, so a stall delays the requests that would have arrived during it and
they are never measured: coordinated omission. Here request i is due at `start + i / rate`. When it
is due it goes out on an idle keep-alive connection, on a new one while fewer than
`--max-connections` are open, or else it waits for the next connection that frees up. Its latency
runs from when it was due to when its response was complete, so time spent waiting for a connection,
in the server's queue or behind a stall all counts (the correction wrk2 makes).

Debian ships no wrk2, vegeta or k6, hence this. It is bounded by count (rate x seconds) and time
(seconds + `--grace-seconds`), and refuses any target that is not on loopback.

Run it in its own process (it measures best with a core to itself):
    python -m benchmarks.openloop --url http://127.0.0.1:8080/v1/models --rate 521 --seconds 60
It prints one line of JSON: counts, errors by kind, latency percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, cast
from urllib.parse import urlsplit

import uvloop

LOOPBACK_HOSTS: Final = ("127.0.0.1", "::1", "localhost")
PERCENTILES: Final = (50.0, 90.0, 99.0, 99.9)


@dataclass
class Outcome:
    """What became of one scheduled request."""

    due: float
    finished: float = 0.0
    status: int = 0
    # "" when a response arrived; else why none did: "connect", "timeout", "closed", "protocol".
    failure: str = ""


class _ResponseParser:
    """Reads HTTP/1.1 responses off a byte stream: Content-Length and chunked bodies."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._status = 0
        self._body_left: int | None = None
        self._chunked = False
        self._in_headers = True

    def feed(self, data: bytes) -> list[int]:
        """The statuses of the responses `data` completed, in order."""
        self._buffer += data
        done: list[int] = []
        while True:
            if self._in_headers:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    return done
                head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
                del self._buffer[: end + 4]
                self._status = int(head[0].split(" ", 2)[1])
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in head[1:])
                }
                self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
                self._body_left = None if self._chunked else int(headers.get("content-length", "0"))
                self._in_headers = False
            if self._chunked:
                if not self._skip_chunks():
                    return done
            else:
                assert self._body_left is not None
                if len(self._buffer) < self._body_left:
                    return done
                del self._buffer[: self._body_left]
            done.append(self._status)
            self._in_headers = True

    def _skip_chunks(self) -> bool:
        """Consume whole chunks; True once the last chunk and its trailer are read."""
        while True:
            line_end = self._buffer.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(bytes(self._buffer[:line_end]).split(b";", 1)[0], 16)
            if size == 0:
                trailer_end = self._buffer.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    return False
                del self._buffer[: trailer_end + 4]
                return True
            if len(self._buffer) < line_end + 2 + size + 2:
                return False
            del self._buffer[: line_end + 2 + size + 2]


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, generator: OpenLoop) -> None:
        self._generator = generator
        self._parser = _ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.current: Outcome | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport does not subclass asyncio.Transport, but it is one.
        self.transport = cast("asyncio.Transport", transport)

    def send(self, outcome: Outcome) -> None:
        assert self.transport is not None
        self.current = outcome
        self.transport.write(self._generator.request_bytes)

    def data_received(self, data: bytes) -> None:
        try:
            statuses = self._parser.feed(data)
        except (ValueError, IndexError):
            self._finish("protocol")
            self.abort()
            return
        for status in statuses:
            outcome = self.current
            if outcome is None:
                continue
            outcome.status = status
            self.current = None
            self._generator.completed(self, outcome)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish("closed")
        self._generator.lost(self)

    def _finish(self, failure: str) -> None:
        outcome, self.current = self.current, None
        if outcome is not None:
            outcome.failure = failure
            self._generator.completed(self, outcome, reuse=False)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


@dataclass
class OpenLoop:
    """Sends `total` requests at `rate` per second to one URL and records each outcome."""

    url: str
    rate: float
    total: int
    max_connections: int
    timeout_s: float
    headers: Sequence[tuple[str, str]] = ()
    outcomes: list[Outcome] = field(default_factory=list)
    request_bytes: bytes = b""

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
            raise ValueError(f"the load generator only targets http:// on loopback, not {self.url}")
        self._host = parts.hostname
        self._port = parts.port or 80
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [
            f"GET {target or '/'} HTTP/1.1",
            f"Host: {parts.netloc}",
            *(f"{k}: {v}" for k, v in self.headers),
        ]
        self.request_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._idle: list[_Connection] = []
        self._opening = 0
        self._open: set[_Connection] = set()
        self._waiting: collections.deque[Outcome] = collections.deque()
        self._finished = 0
        self._all_done = asyncio.Event()
        self.peak_connections = 0
        self.peak_waiting = 0

    async def run(self, *, grace_s: float) -> None:
        # time.monotonic, not loop.time(): uvloop's clock ticks in whole milliseconds.
        start = time.monotonic() + 0.05
        interval = 1.0 / self.rate
        for index in range(self.total):
            due = start + index * interval
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif index % 32 == 0:
                # Behind schedule: still let connections open and answers arrive between sends.
                await asyncio.sleep(0)
            outcome = Outcome(due=due)
            self.outcomes.append(outcome)
            self._dispatch(outcome)
        try:
            async with asyncio.timeout(self.timeout_s + grace_s):
                await self._all_done.wait()
        except TimeoutError:
            pass
        now = time.monotonic()
        for outcome in self.outcomes:
            if not outcome.finished:
                outcome.failure = outcome.failure or "timeout"
                outcome.finished = now
        for connection in list(self._open):
            connection.abort()

    def _dispatch(self, outcome: Outcome) -> None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                self._send(connection, outcome)
                return
        self._waiting.append(outcome)
        self.peak_waiting = max(self.peak_waiting, len(self._waiting))
        if len(self._open) + self._opening < self.max_connections:
            asyncio.get_running_loop().create_task(self._connect())

    def _send(self, connection: _Connection, outcome: Outcome) -> None:
        connection.send(outcome)
        delay = outcome.due + self.timeout_s - time.monotonic()
        asyncio.get_running_loop().call_later(delay, self._check_timeout, connection, outcome)

    def _check_timeout(self, connection: _Connection, outcome: Outcome) -> None:
        if not outcome.finished and connection.current is outcome:
            connection.current = None
            outcome.failure = "timeout"
            self.completed(connection, outcome, reuse=False)
            connection.abort()

    async def _connect(self) -> None:
        self._opening += 1
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(lambda: _Connection(self), self._host, self._port)
        except OSError:
            self._opening -= 1
            if self._waiting:
                outcome = self._waiting.popleft()
                outcome.failure = "connect"
                self._record(outcome)
            return
        self._opening -= 1
        self._open.add(connection)
        self.peak_connections = max(self.peak_connections, len(self._open))
        self._next_for(connection)

    def _next_for(self, connection: _Connection) -> None:
        if self._waiting:
            self._send(connection, self._waiting.popleft())
        else:
            self._idle.append(connection)

    def completed(self, connection: _Connection, outcome: Outcome, *, reuse: bool = True) -> None:
        if outcome.finished:
            return
        self._record(outcome)
        if reuse and not connection.closed:
            self._next_for(connection)

    def lost(self, connection: _Connection) -> None:
        self._open.discard(connection)
        if self._waiting and len(self._open) + self._opening < self.max_connections:
            asyncio.get_running_loop().create_task(self._connect())

    def _record(self, outcome: Outcome) -> None:
        outcome.finished = time.monotonic()
        self._finished += 1
        if self._finished == self.total:
            self._all_done.set()


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(generator: OpenLoop, seconds: float, cpu_s: float) -> dict[str, object]:
    outcomes = generator.outcomes
    latencies = sorted((o.finished - o.due) * 1000 for o in outcomes if not o.failure)
    failures = collections.Counter(o.failure for o in outcomes if o.failure)
    non_2xx = collections.Counter(
        str(o.status) for o in outcomes if not o.failure and not 200 <= o.status < 300
    )
    answered = len(latencies)
    errors = sum(failures.values()) + sum(non_2xx.values())
    return {
        "tool": "benchmarks.openloop (open loop, latency from each request's scheduled start)",
        "url": generator.url,
        "offered_per_second": generator.rate,
        "scheduled": generator.total,
        "seconds": seconds,
        "answered": answered,
        "errors": errors,
        "failures": dict(failures),
        "non_2xx": dict(non_2xx),
        "achieved_per_second": round(answered / seconds, 1) if seconds else 0.0,
        "latency_ms": {
            "mean": round(sum(latencies) / answered, 3) if answered else 0.0,
            **{f"p{p:g}": round(percentile(latencies, p / 100), 3) for p in PERCENTILES},
            "max": round(latencies[-1], 3) if latencies else 0.0,
        },
        "peak_connections": generator.peak_connections,
        "peak_waiting_for_a_connection": generator.peak_waiting,
        "generator_cpu_share_of_one_core": round(cpu_s / seconds, 3) if seconds else 0.0,
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _main(arguments: argparse.Namespace) -> dict[str, object]:
    headers = [tuple(header.split(":", 1)) for header in arguments.header]
    generator = OpenLoop(
        url=arguments.url,
        rate=arguments.rate,
        total=math.ceil(arguments.rate * arguments.seconds),
        max_connections=arguments.max_connections,
        timeout_s=arguments.timeout_seconds,
        headers=[(name.strip(), value.strip()) for name, value in headers],
    )
    cpu_before, started = _cpu_seconds(), time.monotonic()
    await generator.run(grace_s=arguments.grace_seconds)
    elapsed = time.monotonic() - started
    return summarize(generator, round(elapsed, 3), _cpu_seconds() - cpu_before)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.openloop", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--url", required=True, help="a loopback http:// URL to GET")
    parser.add_argument("--rate", type=float, required=True, help="requests per second, scheduled")
    parser.add_argument("--seconds", type=float, required=True, help="how long to offer the load")
    parser.add_argument("--header", action="append", default=[], help="'Name: value' (repeatable)")
    parser.add_argument("--max-connections", type=int, default=256, help="open at most (default 256)")
    parser.add_argument("--timeout-seconds", type=float, default=5.0, help="per request (default 5)")
    parser.add_argument("--grace-seconds", type=float, default=5.0, help="to drain after the last send")
    arguments = parser.parse_args(argv)
    if arguments.rate <= 0 or arguments.seconds <= 0 or arguments.max_connections < 1:
        parser.error("--rate and --seconds must be positive and --max-connections at least 1")
    if arguments.rate * arguments.seconds > 1_000_000:
        parser.error("at most 1,000,000 requests per run")
    result = uvloop.run(_main(arguments))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
