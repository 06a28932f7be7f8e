"""Access-token revocation: the short list every verifier checks before it trusts a signed token.

Access tokens are stateless and live for minutes, so revoking a session or a user in the database
is not enough: tokens already handed out stay valid until they expire. The auth service records
each revocation here, and every service's verifier refuses the matching tokens. An entry only has
to outlive the tokens it refuses, so each carries an `until` (the last moment such a token can
expire) and disappears afterwards.

Two adapters: `InMemoryRevocationList` for embedded mode (one process hosts every verifier) and
`RedisRevocationList` for microservices mode (shared by every replica).

Every authenticated call is checked, so in microservices mode each process keeps a mirror of the
list (`RevocationFeedMirror`) and checks that, not Redis: every revocation is also appended to a
feed stream in Redis, in the same script that stores it, and the mirror follows the feed (a blocking
read that Redis answers as soon as an entry arrives, so a revocation reaches every replica within
milliseconds). The mirror vouches for itself only while its reads keep returning; when it has
heard nothing for `staleness_s` (Redis or the connection is down), checks go to Redis again, and
fail closed with UNAVAILABLE if Redis cannot answer, as without a mirror. A check made for a
sensitive method (`authoritative`, wired by the composition root) always asks Redis: an action on
the caller's own credentials never rests on a copy.

The list also carries credential changes (`credentials_changed`): "this user's credential decisions
changed", which refuses no token but makes every cache of such decisions forget the user's (see
`services.common.credential_changes`). Each list has a `CredentialChangeHub` for this process's
listeners: fed directly by the in-memory list, and from the feed (kind `credentials`) by a mirror.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol

from redis import RedisError

from services.common.clock import utc_now
from services.common.credential_changes import CredentialChangeHub
from services.common.errors import Unavailable
from services.common.redis_multiplex import MultiplexedRedis, Script, reply_text

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

    async def credentials_changed(self, user_id: str) -> None:
        """Tell every cache of credential decisions, in every process, to forget `user_id`'s (a key
        revoked, the user disabled, roles or password changed, a session ended). Refuses no token."""
        ...

    def credential_changes(self) -> CredentialChangeHub:
        """This process's listeners of credential changes, and how current the list is known to be."""
        ...

    async def aclose(self) -> None:
        """Release the connection, if the list holds one."""
        ...


def _is_before(issued_at: datetime, moment_timestamp: float) -> bool:
    # `iat` is truncated to whole seconds, so a token signed within the cutoff's second counts as
    # issued before it. The issuer never signs one there (it waits for the next second, see
    # `user_cutoff`), so only tokens that really may predate the cutoff fall in that second.
    return issued_at.timestamp() < moment_timestamp


# Expired entries of an in-memory list are dropped at most this often (a check only reads its own).
_SWEEP_INTERVAL: Final = timedelta(seconds=1)


class InMemoryRevocationList:
    """Revocations in this process's memory: right for embedded mode, where every verifier is here
    (and the local copy a `RevocationFeedMirror` keeps)."""

    def __init__(self, *, clock: Callable[[], datetime] = utc_now) -> None:
        self._clock = clock
        # session id -> until
        self._sessions: dict[str, datetime] = {}
        # user id -> (moment as a Unix timestamp, until)
        self._users: dict[str, tuple[float, datetime]] = {}
        self._swept_at: datetime | None = None
        # This list is where changes happen, so it always holds every one of them.
        self._changes = CredentialChangeHub(lambda: 0.0)

    async def is_revoked(self, session_id: str, user_id: str, issued_at: datetime) -> bool:
        now = self._clock()
        self._sweep(now)
        session_until = self._sessions.get(session_id) if session_id else None
        if session_until is not None and session_until > now:
            return True
        user_entry = self._users.get(user_id) if user_id else None
        return user_entry is not None and user_entry[1] > now and _is_before(issued_at, user_entry[0])

    async def user_cutoff(self, user_id: str) -> datetime | None:
        now = self._clock()
        entry = self._users.get(user_id)
        if entry is None or entry[1] <= now:
            return None
        return datetime.fromtimestamp(entry[0], UTC)

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

    async def credentials_changed(self, user_id: str) -> None:
        self._changes.changed(user_id)

    def credential_changes(self) -> CredentialChangeHub:
        return self._changes

    async def aclose(self) -> None:
        """Nothing to release: the entries live in this process."""

    def _sweep(self, now: datetime) -> None:
        if self._swept_at is not None and self._swept_at <= now < self._swept_at + _SWEEP_INTERVAL:
            return
        self._swept_at = now
        for session_id in [key for key, until in self._sessions.items() if until <= now]:
            del self._sessions[session_id]
        for user_id in [key for key, (_, until) in self._users.items() if until <= now]:
            del self._users[user_id]


# KEYS[1]: the entry; KEYS[2]: the feed. ARGV[1]: value; ARGV[2]: milliseconds to live; ARGV[3]:
# "max" to keep the larger numeric value; ARGV[4]: the entry's kind ("session" or "user"); ARGV[5]: its
# id; ARGV[6]: until, Unix milliseconds; ARGV[7]: the feed's approximate length cap. Keeps the longer of
# the old and new lifetimes, and appends the revocation to the feed, atomically.
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
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'kind', ARGV[4], 'id', ARGV[5], 'value', value,
  'until_ms', ARGV[6])
return 1
"""

SESSION_KIND: Final = "session"
USER_KIND: Final = "user"
# A credential change: in the feed only (no key), since it refuses nothing and is news only once.
CREDENTIALS_KIND: Final = "credentials"
# Revocations live minutes; the feed only has to cover what a mirror may still be catching up on.
FEED_MAX_LENGTH: Final = 100_000
DEFAULT_STALENESS_S: Final = 2.0
DEFAULT_FEED_BLOCK_MS: Final = 500


def feed_key(key_prefix: str) -> str:
    return f"{key_prefix}feed"


class RevocationFeedMirror:
    """This process's copy of the revocation list in Redis, kept current by following its feed.

    `start()` begins following: it notes the feed's end, copies every entry stored under the prefix
    (a revocation written meanwhile is in the feed after that point, and applying it twice changes
    nothing), then reads the feed with a blocking read that returns at least every `block_ms`. The
    copy is `fresh` while those reads keep returning; after `staleness_s` without one it is not,
    and it copies everything again once the connection is back.

    Credential changes in the feed go to `changes`, the hub of this process's listeners. Whenever
    following (re)starts, the listeners forget everything first: changes written while nobody
    followed are not in the feed after the point it starts from. Following starts when a listener
    first asks how current the hub is, as it does when a check first needs the copy.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        key_prefix: str,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        staleness_s: float = DEFAULT_STALENESS_S,
        block_ms: int = DEFAULT_FEED_BLOCK_MS,
    ) -> None:
        if block_ms / 1000 >= staleness_s:
            raise ValueError("block_ms must be shorter than staleness_s, or the copy is never fresh")
        self._redis_url = redis_url
        self._prefix = key_prefix
        self._feed = feed_key(key_prefix)
        self._clock = clock
        self._monotonic = monotonic
        self._staleness_s = staleness_s
        self._block_ms = block_ms
        self.local = InMemoryRevocationList(clock=clock)
        self.changes = CredentialChangeHub(self._confirmed_age_for_listeners)
        self._confirmed_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def fresh(self) -> bool:
        """Whether the copy was known current within the last `staleness_s`."""
        return self.confirmed_age_s() is not None

    def confirmed_age_s(self) -> float | None:
        """How long ago a read of the feed last returned, while the copy is `fresh`; else None."""
        confirmed = self._confirmed_at
        if confirmed is None:
            return None
        age = self._monotonic() - confirmed
        return age if age < self._staleness_s else None

    def _confirmed_age_for_listeners(self) -> float | None:
        with contextlib.suppress(RuntimeError):  # no running loop: nothing can follow yet
            self.start()
        return self.confirmed_age_s()

    def start(self) -> None:
        """Start following the feed, on the running event loop (again after `stop()`)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._follow(), name="revocation-feed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._confirmed_at = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self) -> None:
        failing = False
        while True:
            # A connection of its own: a blocking read must not hold up anyone else's command.
            client = MultiplexedRedis.from_url(
                self._redis_url, command_timeout_s=self._block_ms / 1000 + 5.0, connect_timeout_s=2.0
            )
            try:
                position = await self._end_of_feed(client)
                await self._copy_everything(client)
                # Before the copy counts as current: listeners must not trust what they cached
                # while nobody followed.
                self.changes.lost_track()
                self._confirmed_at = self._monotonic()
                while True:
                    replies = await client.execute(
                        "XREAD", "COUNT", 1000, "BLOCK", self._block_ms, "STREAMS", self._feed, position
                    )
                    self._confirmed_at = self._monotonic()
                    if failing:
                        logger.info("following the revocation feed again")
                        failing = False
                    for _stream, entries in replies or ():
                        for entry_id, flat_fields in entries:
                            await self._apply(dict(zip(flat_fields[::2], flat_fields[1::2], strict=True)))
                            position = reply_text(entry_id)
            except (RedisError, OSError) as error:
                self._confirmed_at = None
                if not failing:
                    logger.warning("the revocation feed is unavailable: %s", error or type(error).__name__)
                    failing = True
                await asyncio.sleep(self._block_ms / 1000)
            finally:
                await client.aclose()

    async def _end_of_feed(self, client: MultiplexedRedis) -> str:
        last = await client.execute("XREVRANGE", self._feed, "+", "-", "COUNT", 1)
        return reply_text(last[0][0]) if last else "0-0"

    async def _copy_everything(self, client: MultiplexedRedis) -> None:
        for kind in (SESSION_KIND, USER_KIND):
            prefix = f"{self._prefix}{kind}:"
            cursor = "0"
            while True:
                cursor_reply, keys = await client.execute(
                    "SCAN", cursor, "MATCH", f"{prefix}*", "COUNT", 1000
                )
                for key in keys:
                    value, ttl_ms = await asyncio.gather(
                        client.execute("GET", key), client.execute("PTTL", key)
                    )
                    if value is None or ttl_ms <= 0:
                        continue
                    until = self._clock() + timedelta(milliseconds=ttl_ms)
                    await self._remember(kind, reply_text(key).removeprefix(prefix), reply_text(value), until)
                cursor = reply_text(cursor_reply)
                if cursor == "0":
                    break

    async def _apply(self, fields: Mapping[bytes, bytes]) -> None:
        until = datetime.fromtimestamp(int(fields[b"until_ms"]) / 1000, UTC)
        await self._remember(
            reply_text(fields[b"kind"]), reply_text(fields[b"id"]), reply_text(fields[b"value"]), until
        )

    async def _remember(self, kind: str, entry_id: str, value: str, until: datetime) -> None:
        if kind == CREDENTIALS_KIND:
            self.changes.changed(entry_id)
        elif kind == SESSION_KIND:
            await self.local.revoke_session(entry_id, until)
        elif kind == USER_KIND:
            moment = datetime.fromtimestamp(float(value), UTC)
            await self.local.revoke_user_tokens_before(entry_id, moment, until)


class RedisRevocationList:
    """Revocations in Redis, shared by every replica; each key expires when its tokens would.

    Keys: `<prefix>session:<session id>` (value "1") and `<prefix>user:<user id>` (the cutoff as a
    Unix timestamp), and the feed `<prefix>feed` that every change is appended to (credential
    changes only there). With a `mirror`, checks read this process's copy while it is fresh (see the
    module docstring), unless `authoritative()` says the current call needs Redis's own answer;
    otherwise, and whenever the copy is not fresh, they read Redis, over one multiplexed connection
    (`services.common.redis_multiplex`). When Redis cannot answer, checks fail closed with
    UNAVAILABLE. Without a mirror, credential changes are written but nobody here hears them, and
    `credential_changes()` is never confirmed current.
    """

    def __init__(
        self,
        client: MultiplexedRedis,
        *,
        key_prefix: str = "parley:revoked:",
        clock: Callable[[], datetime] = utc_now,
        mirror: RevocationFeedMirror | None = None,
        authoritative: Callable[[], bool] = lambda: False,
    ) -> None:
        self._client = client
        self._prefix = key_prefix
        self._feed = feed_key(key_prefix)
        self._clock = clock
        self._merge = Script(_MERGE_ENTRY)
        self._mirror = mirror
        self._authoritative = authoritative
        self._unheard = CredentialChangeHub(lambda: None)

    def _session_key(self, session_id: str) -> str:
        return f"{self._prefix}{SESSION_KIND}:{session_id}"

    def _user_key(self, user_id: str) -> str:
        return f"{self._prefix}{USER_KIND}:{user_id}"

    async def is_revoked(self, session_id: str, user_id: str, issued_at: datetime) -> bool:
        mirror = self._mirror
        if mirror is not None and not self._authoritative():
            if mirror.fresh:
                return await mirror.local.is_revoked(session_id, user_id, issued_at)
            mirror.start()
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
        await self._store(SESSION_KIND, session_id, "1", until, keep_max=False)
        if self._mirror is not None:
            # This process sees its own revocation at once, not only when the feed brings it back.
            await self._mirror.local.revoke_session(session_id, until)

    async def revoke_user_tokens_before(self, user_id: str, moment: datetime, until: datetime) -> None:
        await self._store(USER_KIND, user_id, repr(moment.timestamp()), until, keep_max=True)
        if self._mirror is not None:
            await self._mirror.local.revoke_user_tokens_before(user_id, moment, until)

    async def credentials_changed(self, user_id: str) -> None:
        now = self._clock()
        fields = {"kind": CREDENTIALS_KIND, "id": user_id, "value": repr(now.timestamp())}
        fields["until_ms"] = str(int(now.timestamp() * 1000))
        entry = [part for pair in fields.items() for part in pair]
        try:
            await self._client.execute("XADD", self._feed, "MAXLEN", "~", FEED_MAX_LENGTH, "*", *entry)
        except RedisError as error:
            raise _unavailable(error) from error
        if self._mirror is not None:
            # This process's listeners hear it at once, not only when the feed brings it back.
            self._mirror.changes.changed(user_id)

    def credential_changes(self) -> CredentialChangeHub:
        return self._mirror.changes if self._mirror is not None else self._unheard

    async def aclose(self) -> None:
        """Stop following the feed; close the client and its connection."""
        if self._mirror is not None:
            await self._mirror.stop()
        await self._client.aclose()

    async def _store(self, kind: str, entry_id: str, value: str, until: datetime, *, keep_max: bool) -> None:
        ttl_ms = int((until - self._clock()).total_seconds() * 1000)
        if ttl_ms <= 0:
            return
        key = self._session_key(entry_id) if kind == SESSION_KIND else self._user_key(entry_id)
        arguments: list[str | int] = [
            value,
            ttl_ms,
            "max" if keep_max else "set",
            kind,
            entry_id,
            int(until.timestamp() * 1000),
            FEED_MAX_LENGTH,
        ]
        try:
            await self._client.evalsha(self._merge, [key, self._feed], arguments)
        except RedisError as error:
            raise _unavailable(error) from error


def _unavailable(error: RedisError) -> Unavailable:
    logger.warning("the revocation list in Redis is unavailable: %s", error or type(error).__name__)
    return Unavailable(
        "Credentials cannot be checked right now; try again shortly.",
        reason="SERVICE_UNAVAILABLE",
        metadata={"dependency": "redis"},
    )
