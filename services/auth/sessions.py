"""Sessions and their refresh tokens: sign-in, rotation with reuse detection, listing and revocation.

A session is one sign-in on one device. Its refresh tokens form a family: each refresh spends the
presented token (sets `rotated_at`) and issues its successor. Presenting a spent token again means
two parties hold the family, one of them a thief, so the whole session is revoked at once.

Two refreshes racing with the same token are settled by the database, not by a read-then-write in
Python: the token is spent with `UPDATE … WHERE id = … AND rotated_at IS NULL`, and only the
statement that changed a row wins. SQLite serializes writers (`BEGIN IMMEDIATE`); on PostgreSQL the
loser's UPDATE waits for the winner's row lock and, under READ COMMITTED, re-evaluates its WHERE
against the committed row, matches nothing and takes the reuse path. Either way exactly one refresh
succeeds and the family is revoked.

Lifetimes: a session lives `refresh_ttl` (30 days by default) past its last refresh — every refresh
slides `expires_at` forward, and the new refresh token expires with it. Access tokens live
`access_ttl`; revoking a session also puts its id on the revocation list until the last access token
it could have minted has expired, and tells every cache of the user's credential decisions (the
gateway edge's) to forget them.

No SQL or gRPC here: storage is the auth unit of work's `sessions` repository (`services.auth.ports`).
Each operation is one unit of work; `start_within` and `revoke_all_within` join the caller's, so a
sign-in or a password change commits its sessions and its events together.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final, Protocol

from parley.events.v1 import events_pb2
from services.auth.opaque import matches, new_secret, secret_hash
from services.auth.ports import AuthUnitOfWork, AuthUnitsOfWork
from services.common.clock import utc_now
from services.common.errors import (
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from services.common.pagination import BY_TIME, Page, keyset_page

logger = logging.getLogger(__name__)

DEFAULT_REFRESH_TTL: Final = timedelta(days=30)
DEFAULT_ACCESS_TTL: Final = timedelta(minutes=15)

# Column widths in services/auth/models.py; longer client-supplied values are cut, never refused.
DEVICE_MAX: Final = 200
USER_AGENT_MAX: Final = 1000
IP_ADDRESS_MAX: Final = 64

# A refresh token is `opaque.new_secret()` output; anything far longer is not one of ours and is
# refused before it is hashed.
_REFRESH_TOKEN_MAX: Final = 256


class AuthMethod(StrEnum):
    """How a session's tokens travel: in the response body, or in `__Host-` cookies with a CSRF token."""

    JWT = "jwt"
    COOKIE = "cookie"


class RevokeReason(StrEnum):
    """Why a session ended; stored in `sessions.revoke_reason` and sent in `session.revoked`."""

    LOGOUT = "logout"
    USER_REVOKED = "revoked"
    PASSWORD_CHANGED = "password_changed"  # noqa: S105 - a reason name, not a password
    PASSWORD_RESET = "password_reset"  # noqa: S105 - a reason name, not a password
    USER_DISABLED = "user_disabled"
    REUSE_DETECTED = "reuse_detected"


_EVENT_REASONS: Final[dict[RevokeReason, events_pb2.SessionRevokeReason.ValueType]] = {
    RevokeReason.LOGOUT: events_pb2.SESSION_REVOKE_REASON_LOGOUT,
    RevokeReason.USER_REVOKED: events_pb2.SESSION_REVOKE_REASON_USER_REVOKED,
    RevokeReason.PASSWORD_CHANGED: events_pb2.SESSION_REVOKE_REASON_PASSWORD_CHANGED,
    RevokeReason.PASSWORD_RESET: events_pb2.SESSION_REVOKE_REASON_PASSWORD_RESET,
    RevokeReason.USER_DISABLED: events_pb2.SESSION_REVOKE_REASON_USER_DISABLED,
    RevokeReason.REUSE_DETECTED: events_pb2.SESSION_REVOKE_REASON_REUSE_DETECTED,
}


@dataclass(frozen=True)
class Session:
    """A sign-in as its owner sees it in the session list."""

    id: str
    user_id: str
    auth_method: AuthMethod
    device: str
    user_agent: str
    ip_address: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    revoke_reason: str | None
    # Whether this is the session making the current request (set by `list_sessions` only).
    current: bool = False

    def is_active(self, now: datetime) -> bool:
        return self.revoked_at is None and self.expires_at > now


@dataclass(frozen=True)
class SessionOwner:
    """What the access token and the gateway's identity headers need to know about the session's user."""

    user_id: str
    plan_id: str
    roles: tuple[str, ...]
    email_verified: bool
    disabled: bool


@dataclass(frozen=True)
class StartedSession:
    """A new session with its first refresh token and, for cookie sessions, its CSRF token.

    The plaintext tokens exist only here; the database holds their hashes. The refresh token
    expires with the session (`session.expires_at`).
    """

    session: Session
    refresh_token: str
    csrf_token: str | None


@dataclass(frozen=True)
class RefreshedSession:
    """The outcome of a successful refresh: the successor token, a new CSRF token for cookie
    sessions, and the owner's current plan and roles for the new access token."""

    session: Session
    refresh_token: str
    csrf_token: str | None
    owner: SessionOwner


@dataclass(frozen=True)
class SessionCheck:
    """A valid session presented by cookie, in the shape the gateway's identity headers need."""

    user_id: str
    session_id: str
    auth_method: AuthMethod
    plan_id: str
    roles: tuple[str, ...]
    email_verified: bool
    expires_at: datetime


@dataclass(frozen=True)
class RevokedSessions:
    """Sessions ended by one `revoke_all`, to be pushed to the revocation list once committed."""

    user_id: str
    session_ids: tuple[str, ...]
    # True when every session of the user ended (no exception), so every earlier token goes too.
    all_sessions: bool
    revoked_at: datetime

    @property
    def count(self) -> int:
        return len(self.session_ids)


@dataclass(frozen=True)
class StoredRefreshToken:
    """A refresh token row with the session it belongs to and that session's owner."""

    id: str
    session: Session
    owner: SessionOwner
    expires_at: datetime
    rotated_at: datetime | None


@dataclass(frozen=True)
class StoredSession:
    """A session row with the hash of its CSRF token and its owner."""

    session: Session
    csrf_token_hash: str | None
    owner: SessionOwner


class SessionRevocations(Protocol):
    """The part of `services.common.revocation.RevocationList` sessions call.

    Access JWTs are verified without a database round trip, so ending a session must also reach the
    verifiers: their session id (or, for "all of a user's sessions", every token issued before a
    moment) is listed `until` the last token that could carry it has expired. And every cache of
    the user's credential decisions (the gateway's, in every replica) is told to forget them.
    """

    async def revoke_session(self, session_id: str, until: datetime) -> None: ...

    async def revoke_user_tokens_before(self, user_id: str, moment: datetime, until: datetime) -> None: ...

    async def credentials_changed(self, user_id: str) -> None: ...


class SessionManager:
    """Starts, refreshes, lists, checks and ends sessions."""

    def __init__(
        self,
        units: AuthUnitsOfWork,
        revocations: SessionRevocations,
        *,
        refresh_ttl: timedelta = DEFAULT_REFRESH_TTL,
        access_ttl: timedelta = DEFAULT_ACCESS_TTL,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        if refresh_ttl <= timedelta(0) or access_ttl <= timedelta(0):
            raise ValueError("refresh_ttl and access_ttl must be positive")
        self._units = units
        self._revocations = revocations
        self._refresh_ttl = refresh_ttl
        self._access_ttl = access_ttl
        self._clock = clock

    @property
    def refresh_ttl(self) -> timedelta:
        return self._refresh_ttl

    async def start(
        self,
        user_id: str,
        *,
        auth_method: AuthMethod | str,
        device_name: str = "",
        user_agent: str = "",
        ip_address: str = "",
    ) -> StartedSession:
        """`start_within` in a unit of work of its own."""
        async with self._units.write() as uow:
            return await self.start_within(
                uow,
                user_id,
                auth_method=auth_method,
                device_name=device_name,
                user_agent=user_agent,
                ip_address=ip_address,
            )

    async def start_within(
        self,
        uow: AuthUnitOfWork,
        user_id: str,
        *,
        auth_method: AuthMethod | str,
        device_name: str = "",
        user_agent: str = "",
        ip_address: str = "",
    ) -> StartedSession:
        """Open a session for a user whose credentials were just checked, with its first refresh
        token and, for cookie sessions, a CSRF token, inside the caller's unit of work. Writes no
        event: the sign-in event is the caller's, in the same unit of work."""
        method = AuthMethod(auth_method)
        now = self._clock()
        refresh_token = new_secret()
        csrf_token = new_secret() if method is AuthMethod.COOKIE else None
        device = _clean(device_name, DEVICE_MAX) or describe_device(user_agent)
        session = await uow.sessions.add_session(
            user_id=user_id,
            auth_method=method,
            device=device,
            user_agent=_clean(user_agent, USER_AGENT_MAX),
            ip_address=_clean(ip_address, IP_ADDRESS_MAX),
            now=now,
            expires_at=now + self._refresh_ttl,
            csrf_token_hash=None if csrf_token is None else secret_hash(csrf_token),
        )
        await uow.sessions.add_refresh_token(
            session_id=session.id, token_hash=secret_hash(refresh_token), expires_at=session.expires_at
        )
        return StartedSession(session=session, refresh_token=refresh_token, csrf_token=csrf_token)

    async def refresh(
        self, refresh_token: str, *, ip_address: str = "", user_agent: str = ""
    ) -> RefreshedSession:
        """Spend `refresh_token` and issue its successor, in one unit of work.

        Raises `Unauthenticated` with REFRESH_TOKEN_INVALID (unknown token, or expired with its
        session), SESSION_REVOKED (the session was revoked) or REFRESH_TOKEN_REUSED (the token
        was already spent: the session is revoked, `session.reuse_detected` and `session.revoked`
        are written); `PermissionDenied` ACCOUNT_DISABLED when the user is disabled.
        `user_agent` is accepted for the audit log only: the session keeps the one seen at sign-in.
        """
        if not refresh_token or len(refresh_token) > _REFRESH_TOKEN_MAX:
            raise _invalid_refresh_token()
        now = self._clock()
        token_hash = secret_hash(refresh_token)
        successor = new_secret()
        ip = _clean(ip_address, IP_ADDRESS_MAX)
        reused: Session | None = None
        refreshed: RefreshedSession | None = None
        async with self._units.write() as uow:
            stored = await uow.sessions.find_refresh_token(token_hash)
            if stored is None:
                raise _invalid_refresh_token()
            session = stored.session
            if session.revoked_at is not None:
                raise _session_revoked(session)
            if session.expires_at <= now:
                # Every token of an expired session has expired too: nothing left to protect.
                raise _invalid_refresh_token()
            if stored.rotated_at is not None or not await uow.sessions.spend_refresh_token(
                stored.id, now=now
            ):
                # Spent before, or by a concurrent refresh that got there first: either way the token
                # is in two hands. The revocation commits with this unit of work; the error follows.
                reused = session
                await self._revoke_for_reuse(uow, session, ip_address=ip, now=now)
            else:
                if stored.expires_at <= now:
                    raise _invalid_refresh_token()
                if stored.owner.disabled:
                    raise _account_disabled()
                csrf_token = new_secret() if session.auth_method is AuthMethod.COOKIE else None
                extended = await uow.sessions.extend_session(
                    session.id,
                    now=now,
                    ip_address=ip or session.ip_address,
                    expires_at=now + self._refresh_ttl,
                    csrf_token_hash=None if csrf_token is None else secret_hash(csrf_token),
                )
                if extended is None:  # revoked between our read and our write
                    raise _session_revoked(replace(session, revoked_at=now))
                await uow.sessions.add_refresh_token(
                    session_id=session.id, token_hash=secret_hash(successor), expires_at=extended.expires_at
                )
                refreshed = RefreshedSession(
                    session=extended, refresh_token=successor, csrf_token=csrf_token, owner=stored.owner
                )
        if refreshed is not None:
            return refreshed
        assert reused is not None
        logger.warning(
            "refresh token reuse: revoked session %s of user %s",
            reused.id,
            reused.user_id,
            extra={
                "session_id": reused.id,
                "user_id": reused.user_id,
                "ip_address": ip,
                "user_agent": _clean(user_agent, DEVICE_MAX),
            },
        )
        await self._revocations.revoke_session(reused.id, now + self._access_ttl)
        await self._revocations.credentials_changed(reused.user_id)
        raise Unauthenticated(
            "This refresh token was already used; the session has been ended for safety. Sign in again.",
            reason="REFRESH_TOKEN_REUSED",
        )

    async def _revoke_for_reuse(
        self, uow: AuthUnitOfWork, session: Session, *, ip_address: str, now: datetime
    ) -> None:
        # Only the call that actually revokes writes the events: two thieves racing revoke it once.
        if not await uow.sessions.revoke_session(session.id, now=now, reason=RevokeReason.REUSE_DETECTED):
            return
        uow.outbox.record(
            subject=session.user_id,
            payload=events_pb2.SessionReuseDetected(
                user_id=session.user_id, session_id=session.id, ip_address=ip_address
            ),
        )
        uow.outbox.record(
            subject=session.user_id,
            payload=_revoked_event(
                session.user_id, session.id, RevokeReason.REUSE_DETECTED, actor_user_id=""
            ),
        )

    async def list_sessions(
        self, user_id: str, *, current_session_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> Page[Session]:
        """The user's active sessions, most recently used first, the caller's own flagged `current`."""
        now = self._clock()

        async def fetch(after: tuple[datetime, str] | None, limit: int) -> Sequence[Session]:
            async with self._units.read() as uow:
                found = await uow.sessions.list_active_sessions(user_id, now=now, after=after, limit=limit)
            return [
                replace(s, current=bool(current_session_id) and s.id == current_session_id) for s in found
            ]

        return await keyset_page(
            page_size=page_size,
            page_token=page_token,
            query=("sessions", user_id),
            sort_key=BY_TIME,
            position=lambda session: (session.last_seen_at, session.id),
            fetch=fetch,
        )

    async def revoke(
        self,
        user_id: str,
        session_id: str,
        *,
        reason: RevokeReason = RevokeReason.USER_REVOKED,
        actor_user_id: str | None = None,
    ) -> Session:
        """End one of the user's sessions; another user's (or an unknown) id is NOT_FOUND.

        Revoking an already revoked session changes nothing and writes no second event.
        `actor_user_id` defaults to the user (self-service); pass an administrator's id otherwise.
        """
        now = self._clock()
        async with self._units.write() as uow:
            stored = await uow.sessions.find_session(session_id)
            if stored is None or stored.session.user_id != user_id:
                raise _no_such_session(session_id)
            session, revoked_now = await self._revoke_within(
                uow, stored.session, reason=reason, actor_user_id=actor_user_id, now=now
            )
        if revoked_now:
            await self._revocations.revoke_session(session_id, now + self._access_ttl)
            await self._revocations.credentials_changed(user_id)
        return session

    async def logout(self, session_id: str) -> Session:
        """End the caller's own session (reason "logout"); already ended is fine, unknown is NOT_FOUND."""
        now = self._clock()
        async with self._units.write() as uow:
            stored = await uow.sessions.find_session(session_id)
            if stored is None:
                raise _no_such_session(session_id)
            session, revoked_now = await self._revoke_within(
                uow, stored.session, reason=RevokeReason.LOGOUT, actor_user_id=None, now=now
            )
        if revoked_now:
            await self._revocations.revoke_session(session.id, now + self._access_ttl)
            await self._revocations.credentials_changed(session.user_id)
        return session

    async def logout_with_refresh_token(self, refresh_token: str) -> Session:
        """End the session a refresh token belongs to (spent or not): LogoutRequest.refresh_token.

        An unknown token is REFRESH_TOKEN_INVALID, so logging out reveals nothing about other tokens.
        """
        if not refresh_token or len(refresh_token) > _REFRESH_TOKEN_MAX:
            raise _invalid_refresh_token()
        now = self._clock()
        async with self._units.write() as uow:
            stored = await uow.sessions.find_refresh_token(secret_hash(refresh_token))
            if stored is None:
                raise _invalid_refresh_token()
            session, revoked_now = await self._revoke_within(
                uow, stored.session, reason=RevokeReason.LOGOUT, actor_user_id=None, now=now
            )
        if revoked_now:
            await self._revocations.revoke_session(session.id, now + self._access_ttl)
            await self._revocations.credentials_changed(session.user_id)
        return session

    async def _revoke_within(
        self,
        uow: AuthUnitOfWork,
        session: Session,
        *,
        reason: RevokeReason,
        actor_user_id: str | None,
        now: datetime,
    ) -> tuple[Session, bool]:
        """Revoke `session` with its `session.revoked` event; the session as it now is, and whether
        this call revoked it (the caller then lists it on the revocation list, once committed)."""
        if not await uow.sessions.revoke_session(session.id, now=now, reason=reason):
            return session, False
        uow.outbox.record(
            subject=session.user_id,
            payload=_revoked_event(
                session.user_id,
                session.id,
                reason,
                actor_user_id=session.user_id if actor_user_id is None else actor_user_id,
            ),
        )
        return replace(session, revoked_at=now, revoke_reason=reason.value), True

    async def revoke_all(
        self,
        user_id: str,
        *,
        reason: RevokeReason,
        except_session_id: str | None = None,
        actor_user_id: str = "",
    ) -> RevokedSessions:
        """End every session of the user except `except_session_id`, in a unit of work of its own.

        For password change (keep the current session), reset and disable (end them all). Writes one
        `session.revoked` per session; then lists each on the revocation list and, when none is
        kept, every access token of the user issued until now.
        """
        async with self._units.write() as uow:
            revoked = await self.revoke_all_within(
                uow,
                user_id,
                reason=reason,
                except_session_id=except_session_id,
                actor_user_id=actor_user_id,
            )
        await self.propagate(revoked)
        return revoked

    async def revoke_all_within(
        self,
        uow: AuthUnitOfWork,
        user_id: str,
        *,
        reason: RevokeReason,
        except_session_id: str | None = None,
        actor_user_id: str = "",
    ) -> RevokedSessions:
        """`revoke_all` inside the caller's unit of work (e.g. with the password change itself).

        The caller must `await propagate(result)` after its unit of work commits.
        """
        now = self._clock()
        ids = tuple(
            await uow.sessions.revoke_user_sessions(
                user_id, except_session_id=except_session_id, now=now, reason=reason
            )
        )
        for session_id in ids:
            uow.outbox.record(
                subject=user_id,
                payload=_revoked_event(user_id, session_id, reason, actor_user_id=actor_user_id),
            )
        return RevokedSessions(
            user_id=user_id, session_ids=ids, all_sessions=except_session_id is None, revoked_at=now
        )

    async def propagate(self, revoked: RevokedSessions) -> None:
        """Tell the access-token verifiers and the caches of credential decisions about committed
        revocations (see `SessionRevocations`)."""
        until = revoked.revoked_at + self._access_ttl
        for session_id in revoked.session_ids:
            await self._revocations.revoke_session(session_id, until)
        if revoked.all_sessions:
            await self._revocations.revoke_user_tokens_before(revoked.user_id, revoked.revoked_at, until)
        await self._revocations.credentials_changed(revoked.user_id)

    async def credentials_changed(self, user_id: str) -> None:
        """Tell the caches of the user's credential decisions that what they carry changed (e.g. the
        plan), after the change committed; no session ends and no token is refused."""
        await self._revocations.credentials_changed(user_id)

    async def check_session(self, session_id: str, csrf_token: str | None = None) -> SessionCheck:
        """Whether a cookie session may act now; when `csrf_token` is given, it must match the
        session's (compared in constant time).

        Raises `Unauthenticated` UNAUTHENTICATED (no such session) or SESSION_REVOKED (revoked or
        expired), `PermissionDenied` CSRF_TOKEN_MISMATCH or ACCOUNT_DISABLED. Deciding that a
        request needs a CSRF token at all (unsafe methods; CSRF_TOKEN_MISSING) is the caller's.
        """
        stored: StoredSession | None = None
        if session_id:
            async with self._units.read() as uow:
                stored = await uow.sessions.find_session(session_id)
        if stored is None:
            raise Unauthenticated("The session is not valid; sign in again.", reason="UNAUTHENTICATED")
        session, owner = stored.session, stored.owner
        now = self._clock()
        if not session.is_active(now):
            raise _session_revoked(session)
        if owner.disabled:
            raise _account_disabled()
        if csrf_token is not None and (
            stored.csrf_token_hash is None or not matches(csrf_token, stored.csrf_token_hash)
        ):
            raise PermissionDenied(
                "The CSRF token does not match this session.", reason="CSRF_TOKEN_MISMATCH"
            )
        return SessionCheck(
            user_id=session.user_id,
            session_id=session.id,
            auth_method=session.auth_method,
            plan_id=owner.plan_id,
            roles=owner.roles,
            email_verified=owner.email_verified,
            expires_at=session.expires_at,
        )


def _no_such_session(session_id: str) -> NotFound:
    return NotFound(
        "No such session.", reason="NOT_FOUND", metadata={"resource": "session", "id": session_id}
    )


def _revoked_event(
    user_id: str, session_id: str, reason: RevokeReason, *, actor_user_id: str
) -> events_pb2.SessionRevoked:
    return events_pb2.SessionRevoked(
        user_id=user_id, session_id=session_id, reason=_EVENT_REASONS[reason], actor_user_id=actor_user_id
    )


def _invalid_refresh_token() -> Unauthenticated:
    return Unauthenticated(
        "The refresh token is not valid or has expired; sign in again.", reason="REFRESH_TOKEN_INVALID"
    )


def _session_revoked(session: Session) -> Unauthenticated:
    cause = "revoked" if session.revoked_at is not None else "expired"
    return Unauthenticated(
        "This session has ended; sign in again.", reason="SESSION_REVOKED", metadata={"cause": cause}
    )


def _account_disabled() -> PermissionDenied:
    return PermissionDenied("This account has been disabled.", reason="ACCOUNT_DISABLED")


_CONTROL_CHARACTERS: Final = re.compile(r"[\x00-\x1f\x7f]+")


def _clean(value: str, limit: int) -> str:
    """Client-supplied text fit for a column and a log line: no control characters, trimmed, capped."""
    return _CONTROL_CHARACTERS.sub(" ", value).strip()[:limit]


# --- Device descriptions --------------------------------------------------------------------------

# Non-browser clients, matched on the product token the User-Agent starts with (case-insensitive).
_TOOLS: Final[tuple[tuple[str, str], ...]] = (
    ("curl/", "curl"),
    ("wget/", "Wget"),
    ("httpie/", "HTTPie"),
    ("python-requests/", "Python requests"),
    ("python-httpx/", "Python httpx"),
    ("python-urllib/", "Python urllib"),
    ("python/", "Python"),
    ("aiohttp/", "Python aiohttp"),
    ("openai/python", "OpenAI Python SDK"),
    ("go-http-client/", "Go HTTP client"),
    ("okhttp/", "OkHttp"),
    ("postmanruntime/", "Postman"),
    ("insomnia/", "Insomnia"),
    ("node-fetch", "Node.js"),
    ("axios/", "Node.js"),
    ("undici", "Node.js"),
    ("node", "Node.js"),
    ("grpc-", "gRPC client"),
    ("dart/", "Dart"),
    ("java/", "Java"),
)

# Browsers, in the order their tokens must be tested: Edge and Opera also say "Chrome", Chrome also
# says "Safari", and mobile Chrome and Firefox on iOS use their own tokens.
_BROWSERS: Final[tuple[tuple[str, str], ...]] = (
    ("edg/", "Edge"),
    ("edga/", "Edge"),
    ("edgios/", "Edge"),
    ("opr/", "Opera"),
    ("opera", "Opera"),
    ("samsungbrowser/", "Samsung Internet"),
    ("yabrowser/", "Yandex Browser"),
    ("vivaldi/", "Vivaldi"),
    ("firefox/", "Firefox"),
    ("fxios/", "Firefox"),
    ("crios/", "Chrome"),
    ("chromium/", "Chromium"),
    ("chrome/", "Chrome"),
    ("msie ", "Internet Explorer"),
    ("trident/", "Internet Explorer"),
    ("safari/", "Safari"),
)

# Operating systems, in test order: iOS and Android UAs also mention "Mac OS X" and "Linux".
_SYSTEMS: Final[tuple[tuple[str, str], ...]] = (
    ("windows", "Windows"),
    ("ipad", "iPadOS"),
    ("iphone", "iOS"),
    ("ipod", "iOS"),
    ("android", "Android"),
    ("cros", "ChromeOS"),
    ("macintosh", "macOS"),
    ("mac os x", "macOS"),
    ("linux", "Linux"),
    ("x11", "Linux"),
    ("freebsd", "FreeBSD"),
)

UNKNOWN_DEVICE: Final = "Unknown device"
_PRODUCT_TOKEN: Final = re.compile(r"[A-Za-z][A-Za-z0-9._+-]{0,39}")


def describe_device(user_agent: str) -> str:
    """A short human description of a User-Agent for the session list: "Firefox on Linux",
    "Chrome on macOS", "curl", "Python requests", … ("Unknown device" when there is nothing to go on).

    Deliberately small: it names what people recognise and never claims more than the header says.
    """
    agent = _clean(user_agent, USER_AGENT_MAX)
    if not agent:
        return UNKNOWN_DEVICE
    lowered = agent.lower()
    for token, tool in _TOOLS:
        if lowered.startswith(token):
            return tool
    browser = next((name for token, name in _BROWSERS if token in lowered), None)
    system = next((name for token, name in _SYSTEMS if token in lowered), None)
    if browser is not None and system is not None:
        return f"{browser} on {system}"
    if browser is not None:
        return browser
    if system is not None:
        return f"Browser on {system}" if lowered.startswith("mozilla/") else f"App on {system}"
    product = _PRODUCT_TOKEN.match(agent)
    return product.group(0) if product else UNKNOWN_DEVICE
