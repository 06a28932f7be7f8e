"""A Redis client for commands on the request path: one connection shared by every concurrent caller.

Redis answers the commands of a connection in the order it received them, so many callers can
write to one connection at once and each take the next reply in turn (pipelining without batching).
On the request path that is all a command needs: no pool checkout, no task per timeout, no lock;
the command is packed and parsed in C (hiredis), and a reply costs one future. redis-py's asyncio
client spends several times the CPU on the same round trip, which for the rate-limit service and
the revocation check was a large share of what a request costs.

Failure semantics match redis-py's, and raise its exception types, so callers treat both alike:
- the connection cannot be made, or breaks: `redis.exceptions.ConnectionError` for every command in
  flight; the next command connects again (callers arriving while a connect is under way share it);
- a command gets no reply within `command_timeout_s`: `redis.exceptions.TimeoutError`, and the
  connection is dropped (a reply that came late could no longer be matched to its command);
- an error reply: `redis.exceptions.ResponseError` (or its NoScriptError) for that command only.

For anything else (scans, streams, blocking reads, transactions) use redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

DEFAULT_COMMAND_TIMEOUT_S: Final = 1.0
DEFAULT_CONNECT_TIMEOUT_S: Final = 1.0

Argument = bytes | str | int | float


@dataclass(frozen=True)
class RedisAddress:
    """Where to connect and how to log in, from a `redis://[user:password@]host[:port][/db]` URL."""

    host: str
    port: int
    db: int
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"only redis:// URLs are supported here, not {parts.scheme}://")
        path = parts.path.lstrip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database in a Redis URL is a number, not {path!r}")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(path or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


@dataclass(frozen=True)
class Script:
    """A Lua script run by its SHA-1 (EVALSHA), loaded again when the server lost it."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest())


class _Protocol(asyncio.Protocol):
    """One connection: replies, in order, to the futures of the commands written on it."""

    def __init__(self, on_lost: Callable[[_Protocol], None]) -> None:
        self._reader = hiredis.Reader(replyError=ResponseError)
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self._on_lost = on_lost
        # Commands packed since the last write; written together once per event-loop turn, so a
        # burst of concurrent commands costs one send() instead of one each.
        self._unsent: list[bytes] = []

    def send(self, command: bytes, future: asyncio.Future[Any]) -> None:
        """Queue `command` for this turn's write; its reply will resolve `future`."""
        self.pending.append(future)
        if not self._unsent:
            asyncio.get_running_loop().call_soon(self._write_unsent)
        self._unsent.append(command)

    def _write_unsent(self) -> None:
        unsent, self._unsent = self._unsent, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(unsent))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport does not subclass asyncio.Transport, but it is one.
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as error:
                self.fail(RedisConnectionError(f"Redis sent what is not RESP: {error}"))
                return
            if reply is False:
                return
            future = self.pending.popleft()
            if future.done():  # its caller was cancelled; the reply is still this one's
                continue
            if isinstance(reply, ResponseError):
                future.set_exception(_specific(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_pending(RedisConnectionError(f"the connection to Redis was lost: {exc or 'closed'}"))
        self._on_lost(self)

    def fail(self, error: Exception) -> None:
        """Fail every command in flight and drop the connection."""
        self._fail_pending(error)
        if self.transport is not None:
            self.transport.abort()

    def _fail_pending(self, error: Exception) -> None:
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(error)


def reply_text(value: bytes | str) -> str:
    """A Redis reply item as text, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else value


def _specific(error: ResponseError) -> ResponseError:
    message = str(error)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return error


class MultiplexedRedis:
    """A single shared connection to Redis for request-path commands (see the module docstring)."""

    def __init__(
        self,
        address: RedisAddress,
        *,
        command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        if command_timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        self.address = address
        self._command_timeout_s = command_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: float) -> MultiplexedRedis:
        return cls(RedisAddress.from_url(url), **options)

    async def execute(self, *arguments: Argument) -> Any:
        """Run one command; its reply as hiredis returns it (bytes, int, list, None)."""
        protocol = self._protocol if self._protocol is not None else await self._connect()
        transport = protocol.transport
        if transport is None or transport.is_closing():
            protocol = await self._connect()
            transport = protocol.transport
            assert transport is not None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        # hiredis' stub types the argument as a 1-tuple; it takes any number of arguments.
        protocol.send(hiredis.pack_command(arguments), future)  # type: ignore[arg-type]
        timer = loop.call_later(self._command_timeout_s, self._timed_out, protocol, future)
        try:
            return await future
        finally:
            timer.cancel()

    async def evalsha(self, script: Script, keys: Sequence[Argument], args: Sequence[Argument]) -> Any:
        """Run `script`; a server that does not know it (restarted, flushed) gets its source once."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.execute("EVAL", script.source, len(keys), *keys, *args)

    async def aclose(self) -> None:
        """Drop the connection for good: commands after this fail with ConnectionError."""
        self._closed = True
        if self._protocol is not None:
            self._protocol.fail(RedisConnectionError("the Redis client was closed"))
            self._protocol = None

    def _timed_out(self, protocol: _Protocol, future: asyncio.Future[Any]) -> None:
        if future.done():
            return
        logger.warning(
            "Redis at %s:%s did not answer in %gs",
            self.address.host,
            self.address.port,
            self._command_timeout_s,
        )
        protocol.fail(RedisTimeoutError(f"Redis did not answer within {self._command_timeout_s:g}s"))

    def _lost(self, protocol: _Protocol) -> None:
        if self._protocol is protocol:
            self._protocol = None

    async def _connect(self) -> _Protocol:
        if self._closed:
            raise RedisConnectionError("the Redis client was closed")
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        self._connecting = asyncio.get_running_loop().create_future()
        try:
            protocol = await self._open()
        except Exception as error:  # any failure to connect or log in is the same outage to callers
            failure = (
                error
                if isinstance(error, RedisConnectionError)
                else RedisConnectionError(
                    f"cannot connect to Redis at {self.address.host}:{self.address.port}: "
                    f"{type(error).__name__}: {error}"
                )
            )
            self._connecting.set_exception(failure)
            # Retrieved here, so a connect nobody else awaited does not log "exception never retrieved".
            self._connecting.exception()
            self._connecting = None
            raise failure from error
        self._protocol = protocol
        self._connecting.set_result(protocol)
        self._connecting = None
        return protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout_s):
            _, protocol = await loop.create_connection(
                lambda: _Protocol(self._lost), self.address.host, self.address.port
            )
        setup: list[tuple[Argument, ...]] = []
        if self.address.password is not None:
            credentials = (
                (self.address.username, self.address.password)
                if self.address.username
                else (self.address.password,)
            )
            setup.append(("AUTH", *credentials))
        if self.address.db:
            setup.append(("SELECT", self.address.db))
        self._protocol = protocol
        try:
            for command in setup:
                await self.execute(*command)
        except BaseException:
            protocol.fail(RedisConnectionError("Redis refused the connection's setup"))
            self._protocol = None
            raise
        return protocol
