"""Access-token revocation: the short list every verifier checks before it trusts a signed token.

Access tokens are stateless and live for minutes, so revoking a session or a user in the database
is not enough: tokens already handed out stay valid until they expire. The auth service records
each revocation here, and every service's verifier refuses the matching tokens. An entry only has
to outlive the tokens it refuses, so each carries an `until` (the last moment such a token can
expire) and disappears afterwards.

Two adapters: `InMemoryRevocationList` for embedded mode (one process hosts every verifier) and
`RedisRevocationList` for microservices mode (shared by every replica).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, Protocol

from redis import RedisError

from services.common.clock import utc_now
from services.common.errors import Unavailable
from services.common.redis_multiplex import MultiplexedRedis, Script

logger = logging.getLogger(__name__)


class RevocationList(Protocol):
    """Which access tokens must be refused although their signature and expiry are fine."""

    async def is_revoked(self, session_id: str, user_id: str, issued_at: datetime) -> bool:
        """True if the token's session is revoked, or its user's tokens issued before `issued_at`'s
        time are. `issued_at` is the token's `iat` (whole seconds)."""
        ...

    async def revoke_session(self, session_id: str, until: datetime) -> None:
        """Refuse every token of `session_id` until `until` (when its last access token expires)."""
        ...

    async def revoke_user_tokens_before(self, user_id: str, moment: datetime, until: datetime) -> None:
        """Refuse `user_id`'s tokens issued before `moment` (disabled user, password reset),
        until `until`. A later moment replaces an earlier one; the longer `until` wins."""
        ...

    async def user_cutoff(self, user_id: str) -> datetime | None:
        """The moment before which `user_id`'s tokens are refused, if one is in force."""
        ...

    async def aclose(self) -> None:
        """Release the connection, if the list holds one."""
        ...


def _is_before(issued_at: datetime, moment_timestamp: float) -> bool:
    # `iat` is truncated to whole seconds, so a token signed within the cutoff's second counts as
    # issued before it. The issuer never signs one there (it waits for the next second, see
    # `user_cutoff`), so only tokens that really may predate the cutoff fall in that second.
    return issued_at.timestamp() < moment_timestamp


class InMemoryRevocationList:
    """Revocations in this process's memory: right for embedded mode, where every verifier is here."""

    def __init__(self, *, clock: Callable[[], datetime] = utc_now) -> None:
        self._clock = clock
        # session id -> until
        self._sessions: dict[str, datetime] = {}
        # user id -> (moment as a Unix timestamp, until)
        self._users: dict[str, tuple[float, datetime]] = {}

    async def is_revoked(self, session_id: str, user_id: str, issued_at: datetime) -> bool:
        now = self._clock()
        self._forget_expired(now)
        if session_id and session_id in self._sessions:
            return True
        user_entry = self._users.get(user_id) if user_id else None
        return user_entry is not None and _is_before(issued_at, user_entry[0])

    async def user_cutoff(self, user_id: str) -> datetime | None:
        self._forget_expired(self._clock())
        entry = self._users.get(user_id)
        return None if entry is None else datetime.fromtimestamp(entry[0], UTC)

    async def revoke_session(self, session_id: str, until: datetime) -> None:
        if until <= self._clock():
            return
        previous = self._sessions.get(session_id)
        self._sessions[session_id] = until if previous is None else max(previous, until)

    async def revoke_user_tokens_before(self, user_id: str, moment: datetime, until: datetime) -> None:
        if until <= self._clock():
            return
        previous = self._users.get(user_id)
        if previous is None:
            self._users[user_id] = (moment.timestamp(), until)
        else:
            self._users[user_id] = (max(previous[0], moment.timestamp()), max(previous[1], until))

    async def aclose(self) -> None:
        """Nothing to release: the entries live in this process."""

    def _forget_expired(self, now: datetime) -> None:
        for session_id in [key for key, until in self._sessions.items() if until <= now]:
            del self._sessions[session_id]
        for user_id in [key for key, (_, until) in self._users.items() if until <= now]:
            del self._users[user_id]


# KEYS[1]: the entry; ARGV[1]: value; ARGV[2]: milliseconds to live; ARGV[3]: "max" to keep the larger
# numeric value. Keeps the longer of the old and new lifetimes, atomically.
_MERGE_ENTRY: Final = """
local remaining = redis.call('PTTL', KEYS[1])
local ttl = tonumber(ARGV[2])
if remaining > ttl then ttl = remaining end
local value = ARGV[1]
if ARGV[3] == 'max' then
  local current = redis.call('GET', KEYS[1])
  if current and tonumber(current) > tonumber(value) then value = current end
end
redis.call('SET', KEYS[1], value, 'PX', ttl)
return 1
"""


class RedisRevocationList:
    """Revocations in Redis, shared by every replica; each key expires when its tokens would.

    Keys: `<prefix>session:<session id>` (value "1") and `<prefix>user:<user id>` (the cutoff as a
    Unix timestamp). When Redis cannot answer, checks fail closed with UNAVAILABLE. Every
    authenticated call checks here, so it goes over one multiplexed connection
    (`services.common.redis_multiplex`).
    """

    def __init__(
        self,
        client: MultiplexedRedis,
        *,
        key_prefix: str = "parley:revoked:",
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._client = client
        self._prefix = key_prefix
        self._clock = clock
        self._merge = Script(_MERGE_ENTRY)

    def _session_key(self, session_id: str) -> str:
        return f"{self._prefix}session:{session_id}"

    def _user_key(self, user_id: str) -> str:
        return f"{self._prefix}user:{user_id}"

    async def is_revoked(self, session_id: str, user_id: str, issued_at: datetime) -> bool:
        try:
            session_entry, user_entry = await self._client.execute(
                "MGET", self._session_key(session_id), self._user_key(user_id)
            )
        except RedisError as error:
            raise _unavailable(error) from error
        if session_id and session_entry is not None:
            return True
        return bool(user_id) and user_entry is not None and _is_before(issued_at, float(user_entry))

    async def user_cutoff(self, user_id: str) -> datetime | None:
        try:
            entry = await self._client.execute("GET", self._user_key(user_id))
        except RedisError as error:
            raise _unavailable(error) from error
        return None if entry is None else datetime.fromtimestamp(float(entry), UTC)

    async def revoke_session(self, session_id: str, until: datetime) -> None:
        await self._store(self._session_key(session_id), "1", until, keep_max=False)

    async def revoke_user_tokens_before(self, user_id: str, moment: datetime, until: datetime) -> None:
        await self._store(self._user_key(user_id), repr(moment.timestamp()), until, keep_max=True)

    async def aclose(self) -> None:
        """Close the client and its connection."""
        await self._client.aclose()

    async def _store(self, key: str, value: str, until: datetime, *, keep_max: bool) -> None:
        ttl_ms = int((until - self._clock()).total_seconds() * 1000)
        if ttl_ms <= 0:
            return
        try:
            await self._client.evalsha(self._merge, [key], [value, ttl_ms, "max" if keep_max else "set"])
        except RedisError as error:
            raise _unavailable(error) from error


def _unavailable(error: RedisError) -> Unavailable:
    logger.warning("the revocation list in Redis is unavailable: %s", error or type(error).__name__)
    return Unavailable(
        "Credentials cannot be checked right now; try again shortly.",
        reason="SERVICE_UNAVAILABLE",
        metadata={"dependency": "redis"},
    )
