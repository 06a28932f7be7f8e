"""Accounts: registration, email verification, the sign-in credential check, passwords and profile.

The application service of auth's account side. It owns the rules (email and display-name shape,
single-use tokens, throttling, who may sign in) and runs each operation over the auth unit of work
(`services.auth.ports`): a state change and its events commit in one writing unit of work; gRPC
stays in the servicer and SQL in the repositories. Hashing (argon2, tens of milliseconds) never
happens inside a writing unit of work: on SQLite that would hold the database's only write turn for
the whole hash. So a sign-in reads, hashes, then writes once.

Existence of accounts: `sign_in`/`authenticate` and `forgot_password` answer the same, in the same
time, for unknown and known emails; `register` says EMAIL_ALREADY_REGISTERED (see docs/auth.md,
"Accounts", for why).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Final
from urllib.parse import urlencode

from google.protobuf.timestamp_pb2 import Timestamp

from parley.events.v1 import events_pb2
from services.auth.email_limits import FORGOT_PASSWORD_EMAIL_LIMIT, LOGIN_EMAIL_LIMIT, EmailRateLimits
from services.auth.emails import EMAIL_MAX, email_violations, normalize_email
from services.auth.opaque import new_secret, secret_hash
from services.auth.passwords import PasswordHasher, PasswordPolicy
from services.auth.ports import USER_CACHE, AuthUnitOfWork, AuthUnitsOfWork, EmailTaken
from services.auth.sessions import (
    AuthMethod,
    RevokedSessions,
    RevokeReason,
    SessionManager,
    StartedSession,
)
from services.auth.throttle import (
    ActiveLock,
    LockScope,
    LoginThrottle,
    LoginThrottleSettings,
    ThrottleKeys,
)
from services.common.cache import InMemoryReadCache, ReadCache
from services.common.clock import Clock, utc_now
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
    Unauthenticated,
)
from services.common.roles import ROLE_ADMIN, ROLE_USER

logger = logging.getLogger(__name__)

DEFAULT_PLAN_ID: Final = "free"
# The length of `users.plan_id`, as of billing's plan ids.
PLAN_ID_MAX: Final = 32

# `one_time_tokens.purpose` values.
VERIFY_EMAIL_PURPOSE: Final = "verify_email"
RESET_PASSWORD_PURPOSE: Final = "reset_password"  # noqa: S105 - a purpose name, not a password
# `EmailRequested.template` values (names from the contract's list in events.proto).
VERIFY_EMAIL_TEMPLATE: Final = "verify_email"
PASSWORD_RESET_TEMPLATE: Final = "password_reset"  # noqa: S105 - a template name, not a password

DISPLAY_NAME_MAX: Final = 100
# Far longer than any `opaque.new_secret()`; longer input is refused before it is hashed.
_TOKEN_MAX: Final = 256

# The fields of `parley.auth.v1.User`; only these may be updated by their owner.
USER_FIELDS: Final = frozenset(
    {
        "id",
        "email",
        "display_name",
        "email_verified",
        "roles",
        "plan_id",
        "disabled",
        "create_time",
        "update_time",
        "email_verify_time",
        "last_login_time",
        "disable_time",
    }
)
MUTABLE_PROFILE_FIELDS: Final = frozenset({"display_name"})

# How long a user read by `get_user` (GetCurrentUser) may be served from the read cache. Every write
# to a user invalidates it after commit; the TTL only bounds staleness when an invalidation is lost
# (the cache was unreachable at that moment, or a process without the shared cache wrote).
USER_CACHE_TTL_S: Final = 60.0

# One message for every sign-in refused for its credentials, known email or not.
INVALID_CREDENTIALS_MESSAGE: Final = "The email address or password is incorrect."


# --------------------------------------------------------------------------------------------------
# Users and their fields
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    """An account as the rest of the service sees it; the password hash never leaves the repository."""

    id: str
    email: str
    display_name: str
    roles: tuple[str, ...]
    plan_id: str
    # The effective time of the newest subscription change applied to `plan_id`, and when billing
    # recorded that change (`apply_plan_within`).
    plan_changed_at: datetime | None
    plan_change_recorded_at: datetime | None
    email_verified_at: datetime | None
    last_login_at: datetime | None
    disabled_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @property
    def email_verified(self) -> bool:
        return self.email_verified_at is not None

    @property
    def disabled(self) -> bool:
        return self.disabled_at is not None

    @property
    def is_admin(self) -> bool:
        return ROLE_ADMIN in self.roles


def encode_user(user: User) -> bytes:
    """The user as the read cache stores it (JSON; times in ISO 8601 with their UTC offset)."""
    return json.dumps(
        {
            "id": user.id,
            "email": user.email,
            "display_name": user.display_name,
            "roles": list(user.roles),
            "plan_id": user.plan_id,
            "plan_changed_at": _iso_or_none(user.plan_changed_at),
            "plan_change_recorded_at": _iso_or_none(user.plan_change_recorded_at),
            "email_verified_at": _iso_or_none(user.email_verified_at),
            "last_login_at": _iso_or_none(user.last_login_at),
            "disabled_at": _iso_or_none(user.disabled_at),
            "created_at": user.created_at.isoformat(),
            "updated_at": user.updated_at.isoformat(),
        },
        separators=(",", ":"),
    ).encode()


def decode_user(data: bytes) -> User:
    fields = json.loads(data)
    return User(
        id=fields["id"],
        email=fields["email"],
        display_name=fields["display_name"],
        roles=tuple(fields["roles"]),
        plan_id=fields["plan_id"],
        # Absent from entries cached before the fields existed (they live at most USER_CACHE_TTL_S).
        plan_changed_at=_datetime_or_none(fields.get("plan_changed_at")),
        plan_change_recorded_at=_datetime_or_none(fields.get("plan_change_recorded_at")),
        email_verified_at=_datetime_or_none(fields["email_verified_at"]),
        last_login_at=_datetime_or_none(fields["last_login_at"]),
        disabled_at=_datetime_or_none(fields["disabled_at"]),
        created_at=datetime.fromisoformat(fields["created_at"]),
        updated_at=datetime.fromisoformat(fields["updated_at"]),
    )


def _iso_or_none(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _datetime_or_none(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _violation(field_name: str, description: str) -> list[FieldViolation]:
    """The one violation a field check reports (checks stop at the first problem they find)."""
    return [FieldViolation(field=field_name, description=description, reason="INVALID_ARGUMENT")]


# Bidirectional overrides and isolates can make a name render as something else ("spoofing").
_BIDI_CONTROLS: Final = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def clean_display_name(value: str) -> str:
    return unicodedata.normalize("NFC", value.strip())


def display_name_violations(cleaned: str, *, field_name: str = "display_name") -> list[FieldViolation]:
    """Why a cleaned display name (see `clean_display_name`) is not acceptable; empty when it is."""

    if not cleaned:
        return _violation(field_name, "A display name is required.")
    if len(cleaned) > DISPLAY_NAME_MAX:
        return _violation(field_name, f"The display name must be at most {DISPLAY_NAME_MAX} characters.")
    for character in cleaned:
        category = unicodedata.category(character)
        # Cc: control characters (newlines, tabs, NUL); Zl/Zp: line and paragraph separators.
        if category in ("Cc", "Zl", "Zp") or character in _BIDI_CONTROLS:
            return _violation(field_name, "The display name must not contain control characters.")
    return []


def invalid_fields(violations: Sequence[FieldViolation]) -> InvalidArgument:
    """INVALID_ARGUMENT for bad input fields; PASSWORD_POLICY_VIOLATION when only passwords are bad."""
    only_passwords = all(violation.reason.startswith("PASSWORD_") for violation in violations)
    if only_passwords:
        return InvalidArgument(
            "The password does not meet the password policy: "
            + " ".join(violation.description for violation in violations),
            reason="PASSWORD_POLICY_VIOLATION",
            field_violations=violations,
        )
    fields = sorted({violation.field for violation in violations})
    return InvalidArgument(
        "The request has invalid fields: " + ", ".join(fields) + ".",
        reason="INVALID_ARGUMENT",
        field_violations=violations,
    )


def user_not_found(user_id: str) -> NotFound:
    return NotFound("No such user.", reason="NOT_FOUND", metadata={"resource": "user", "id": user_id})


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


# --------------------------------------------------------------------------------------------------
# Settings and results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountSettings:
    """Tunables of the account flows; the defaults are what the product ships with."""

    # How long an email-verification link works.
    verification_token_ttl: timedelta = timedelta(hours=24)
    # How long a password-reset link works.
    reset_token_ttl: timedelta = timedelta(hours=1)
    # The least time between two verification (or two reset) emails to one user.
    email_cooldown: timedelta = timedelta(seconds=60)
    # Paths of the web pages the emailed links open; the email worker puts its base URL in front.
    verify_email_link_path: str = "/verify-email"
    reset_password_link_path: str = "/reset-password"  # noqa: S105 - a path, not a password
    # `forgot_password` never replies sooner than this after it started, so the database write
    # made for a real account does not show in the reply's timing. Keep it above that write's
    # worst time; 0 turns the floor off (tests).
    forgot_password_min_duration: timedelta = timedelta(milliseconds=250)
    # Backoff and lockout of failed sign-ins.
    throttle: LoginThrottleSettings = field(default_factory=LoginThrottleSettings)

    def __post_init__(self) -> None:
        for name in ("verification_token_ttl", "reset_token_ttl"):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name} must be positive")
        if self.email_cooldown < timedelta(0) or self.forgot_password_min_duration < timedelta(0):
            raise ValueError("email_cooldown and forgot_password_min_duration must not be negative")


@dataclass(frozen=True)
class SignedIn:
    """A successful sign-in: the user and the session started for them (tokens in plaintext, once)."""

    user: User
    started: StartedSession


@dataclass(frozen=True)
class PlanChange:
    """A subscription change applied to a user (`apply_plan_within`), to be announced once committed."""

    user: User
    previous_plan_id: str

    @property
    def plan_changed(self) -> bool:
        """False for a change that left the plan as it was (a renewal): only its time moved."""
        return self.user.plan_id != self.previous_plan_id


@dataclass(frozen=True)
class PasswordChanged:
    """A changed password; `revoked` lists the user's other sessions, already ended and propagated."""

    user: User
    revoked: RevokedSessions


@dataclass(frozen=True)
class PasswordReset:
    """A password set with a reset token; every session of the user was ended and propagated."""

    user: User
    revoked: RevokedSessions


# --------------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------------


class AccountService:
    """Registration, verification, sign-in credential checks, password changes and the profile."""

    def __init__(
        self,
        units: AuthUnitsOfWork,
        *,
        hasher: PasswordHasher,
        policy: PasswordPolicy,
        sessions: SessionManager,
        settings: AccountSettings | None = None,
        clock: Clock = utc_now,
        read_cache: ReadCache | None = None,
        email_limits: EmailRateLimits | None = None,
    ) -> None:
        """`read_cache` serves `get_user` (its entries are dropped by the units' after-commit hook);
        without one every read goes to the database. `email_limits` spends the per-email budgets of
        sign-in and password-reset mail; without it they are unlimited (tests)."""
        self._units = units
        self._hasher = hasher
        self._policy = policy
        self._sessions = sessions
        self.settings = settings or AccountSettings()
        self._clock = clock
        self._throttle = LoginThrottle(self.settings.throttle, clock=clock)
        cache = read_cache if read_cache is not None else InMemoryReadCache(max_entries=0)
        self._users_cache = cache.named(USER_CACHE)
        self._email_limits = email_limits

    # ---- registration and verification ---------------------------------------------------------

    async def register(self, email: str, password: str, display_name: str) -> User:
        """Create an unverified user with roles ["user"] on the free plan; write `user.registered`
        and an `email.requested` (verify_email) carrying a single-use verification token.

        Raises INVALID_ARGUMENT (field violations on email / display_name, or
        PASSWORD_POLICY_VIOLATION when only the password is bad) before touching the database, and
        ALREADY_EXISTS / EMAIL_ALREADY_REGISTERED when the address is taken, also when a concurrent
        registration of the same address won the race.
        """
        address = normalize_email(email)
        name = clean_display_name(display_name)
        violations = [
            *email_violations(address),
            *display_name_violations(name),
            *self._policy.violations(password, email=address, field="password"),
        ]
        if violations:
            raise invalid_fields(violations)
        password_hash = await self._hasher.hash_async(password)
        now = self._clock()
        async with self._units.write() as uow:
            try:
                user = await uow.users.add(
                    email=address,
                    display_name=name,
                    password_hash=password_hash,
                    roles=[ROLE_USER],
                    plan_id=DEFAULT_PLAN_ID,
                    email_verified_at=None,
                    now=now,
                )
            except EmailTaken:
                raise email_already_registered() from None
            uow.outbox.record(
                subject=user.id,
                payload=events_pb2.UserRegistered(
                    user_id=user.id, email=user.email, display_name=user.display_name
                ),
            )
            await self._send_verification(uow, user, now=now)
        return user

    async def verify_email(self, token: str) -> User:
        """Mark the token's user verified and write `user.email_verified` (once per user).

        An unknown, used or expired token is INVALID_ARGUMENT / VERIFICATION_TOKEN_INVALID: one
        answer for all three, so tokens cannot be probed.
        """
        if not token or len(token) > _TOKEN_MAX:
            raise _verification_token_invalid()
        now = self._clock()
        async with self._units.write() as uow:
            found = await uow.tokens.find(secret_hash(token), VERIFY_EMAIL_PURPOSE)
            if found is None or not await uow.tokens.consume(found.id, now=now):
                raise _verification_token_invalid()
            user = await uow.users.by_id(found.user_id, for_update=True)
            if user is None:  # the row cascades with its user; kept for type narrowing
                raise _verification_token_invalid()
            if user.email_verified_at is None:
                user = await uow.users.save(replace(user, email_verified_at=now), now=now)
                uow.outbox.record(
                    subject=user.id,
                    payload=events_pb2.UserEmailVerified(user_id=user.id, email=user.email),
                )
            return user

    async def resend_verification(self, user_id: str) -> datetime:
        """Send the (signed-in) user a fresh verification email, invalidating earlier links; returns
        when the new link expires.

        Raises NOT_FOUND for an unknown user, FAILED_PRECONDITION / EMAIL_ALREADY_VERIFIED, and
        RESOURCE_EXHAUSTED / RATE_LIMITED (metadata retry_after_s) within `email_cooldown` of the
        previous verification email.
        """
        now = self._clock()
        async with self._units.write() as uow:
            user = await uow.users.by_id(user_id, for_update=True)
            if user is None:
                raise user_not_found(user_id)
            if user.email_verified_at is not None:
                raise FailedPrecondition(
                    "This email address is already verified.", reason="EMAIL_ALREADY_VERIFIED"
                )
            retry_after = await self._cooldown_left(uow, user.id, VERIFY_EMAIL_PURPOSE, now)
            if retry_after is not None:
                raise _email_rate_limited(retry_after)
            return await self._send_verification(uow, user, now=now)

    async def _send_verification(self, uow: AuthUnitOfWork, user: User, *, now: datetime) -> datetime:
        return await self._send_token(
            uow,
            user,
            purpose=VERIFY_EMAIL_PURPOSE,
            template=VERIFY_EMAIL_TEMPLATE,
            ttl=self.settings.verification_token_ttl,
            link_path=self.settings.verify_email_link_path,
            now=now,
        )

    async def _send_token(
        self,
        uow: AuthUnitOfWork,
        user: User,
        *,
        purpose: str,
        template: str,
        ttl: timedelta,
        link_path: str,
        now: datetime,
    ) -> datetime:
        """Replace the user's unused tokens of `purpose` with a new one and queue the email for it.

        The token exists in plaintext only inside the `email.requested` event, which only the email
        worker reads; the table keeps its SHA-256.
        """
        await uow.tokens.discard_unused(user.id, purpose)
        secret = new_secret()
        expires_at = now + ttl
        await uow.tokens.add(
            user_id=user.id, purpose=purpose, token_hash=secret_hash(secret), expires_at=expires_at, now=now
        )
        uow.outbox.record(
            subject=user.id,
            payload=events_pb2.EmailRequested(
                template=template,
                recipient=user.email,
                user_id=user.id,
                params={
                    "token": secret,
                    "link_path": f"{link_path}?{urlencode({'token': secret})}",
                    "display_name": user.display_name,
                    "expire_time": expires_at.isoformat(),
                },
            ),
        )
        return expires_at

    async def _cooldown_left(
        self, uow: AuthUnitOfWork, user_id: str, purpose: str, now: datetime
    ) -> timedelta | None:
        latest = await uow.tokens.latest_issued_at(user_id, purpose)
        if latest is None:
            return None
        left = latest + self.settings.email_cooldown - now
        return left if left > timedelta(0) else None

    # ---- sign-in --------------------------------------------------------------------------------

    async def sign_in(
        self,
        email: str,
        password: str,
        *,
        client_ip: str,
        auth_method: AuthMethod | str = AuthMethod.JWT,
        device_name: str = "",
        user_agent: str = "",
    ) -> SignedIn:
        """Spend the email's sign-in budget, check the credentials (see `authenticate`), and in one
        unit of work record the sign-in, start a session with its first refresh token and write
        `user.login_succeeded` with the session's id. Issuing the access token is the caller's."""
        address = normalize_email(email)
        if self._email_limits is not None:
            await self._email_limits.spend(LOGIN_EMAIL_LIMIT, address)
        method = AuthMethod(auth_method)
        checked = await self._check_credentials(address, password, client_ip=client_ip)
        async with self._units.write() as uow:
            user = await self._record_success(uow, checked)
            started = await self._sessions.start_within(
                uow,
                user.id,
                auth_method=method,
                device_name=device_name,
                user_agent=user_agent,
                ip_address=client_ip,
            )
            session = started.session
            new_device = not await uow.sessions.has_other_session_on(
                user.id, device=session.device, except_session_id=session.id
            )
            uow.outbox.record(
                subject=user.id,
                payload=events_pb2.UserLoginSucceeded(
                    user_id=user.id,
                    session_id=session.id,
                    ip_address=session.ip_address,
                    device=session.device,
                    new_device=new_device,
                ),
            )
        return SignedIn(user=user, started=started)

    async def authenticate(self, email: str, password: str, *, client_ip: str) -> User:
        """Check a sign-in's credentials without starting a session; writes `user.login_succeeded`
        with no session id, in the unit of work that records the sign-in. `sign_in` is the Login
        RPC's entry point.

        Refusals, in the order they are decided:

        - RESOURCE_EXHAUSTED / ACCOUNT_LOCKED (metadata retry_after_s, a QuotaFailure) while the
          account key or the client IP is locked, for unknown emails exactly as for known ones;
          no password is checked then.
        - UNAUTHENTICATED / INVALID_CREDENTIALS, one message, for an unknown email (after a dummy
          hash of the same cost) and for a wrong password: counted, backed off, locked.
        - PERMISSION_DENIED / ACCOUNT_DISABLED for a disabled user, only after the right password.
        """
        checked = await self._check_credentials(normalize_email(email), password, client_ip=client_ip)
        async with self._units.write() as uow:
            user = await self._record_success(uow, checked)
            uow.outbox.record(
                subject=user.id,
                payload=events_pb2.UserLoginSucceeded(user_id=user.id, ip_address=_clean_ip(client_ip)),
            )
        return user

    async def _check_credentials(self, address: str, password: str, *, client_ip: str) -> _CheckedCredentials:
        """The read and the hashing of a sign-in for the canonical `address`, outside any writing
        unit of work; each refusal is counted and its events written in one unit of work of its own.
        A malformed address is looked up like any other and found by no one: it gets the answer of
        an unknown one."""
        ip = _clean_ip(client_ip)
        keys = self._throttle.keys(address, ip)
        async with self._units.read() as uow:
            lock = await self._throttle.active_lock(uow.throttle, keys)
            # Looked up even when locked, so a locked reply costs the same for every email.
            stored = await uow.users.credentials_by_email(address) if len(address) <= EMAIL_MAX else None
        user = stored.user if stored is not None else None
        if lock is not None:
            await self._record_locked_attempt(user, keys, lock, ip)
            raise self._throttle.locked_error(lock)

        if stored is None:
            await self._hasher.verify_dummy_async(password)
            await self._record_failed_attempt(None, keys, ip)
            raise invalid_credentials()
        if not await self._hasher.verify_async(stored.password_hash, password):
            await self._record_failed_attempt(stored.user, keys, ip)
            raise invalid_credentials()
        if stored.user.disabled:
            await self._record_disabled_attempt(stored.user, ip)
            raise account_disabled()
        upgraded_hash = None
        if self._hasher.needs_rehash(stored.password_hash):
            upgraded_hash = await self._hasher.hash_async(password)
        return _CheckedCredentials(stored.user.id, stored.password_hash, keys, upgraded_hash)

    async def _record_success(self, uow: AuthUnitOfWork, checked: _CheckedCredentials) -> User:
        """Stamp the sign-in on the user (and the upgraded hash) and clear the account's failures."""
        now = self._clock()
        current = await uow.users.credentials_by_id(checked.user_id, for_update=True)
        # Changed while we hashed: the password just checked is no longer the account's, or
        # the account was disabled meanwhile. Nothing is counted; the client simply retries.
        if current is None or current.password_hash != checked.password_hash:
            raise invalid_credentials()
        if current.user.disabled:
            raise account_disabled()
        user = await uow.users.save(
            replace(current.user, last_login_at=now), now=now, password_hash=checked.upgraded_hash
        )
        await self._throttle.clear_account(uow.throttle, checked.keys)
        return user

    async def _record_locked_attempt(
        self, user: User | None, keys: ThrottleKeys, lock: ActiveLock, ip: str
    ) -> None:
        async with self._units.write() as uow:
            uow.outbox.record(
                subject=_attempt_subject(user, keys),
                payload=events_pb2.UserLoginFailed(
                    user_id=user.id if user else "",
                    ip_address=ip,
                    reason=events_pb2.LOGIN_FAILURE_REASON_LOCKED,
                    failed_attempts=lock.failures,
                ),
            )

    async def _record_failed_attempt(self, user: User | None, keys: ThrottleKeys, ip: str) -> None:
        async with self._units.write() as uow:
            outcome = await self._throttle.record_failure(uow.throttle, keys)
            # The proto counts the account's failures, or the client's for unknown emails.
            failures = outcome.account_failures
            if user is None and keys.client_ip is not None:
                failures = outcome.client_ip_failures
            uow.outbox.record(
                subject=_attempt_subject(user, keys),
                payload=events_pb2.UserLoginFailed(
                    user_id=user.id if user else "",
                    ip_address=ip,
                    reason=events_pb2.LOGIN_FAILURE_REASON_INVALID_CREDENTIALS,
                    failed_attempts=failures,
                ),
            )
            _record_lockouts(uow, outcome.locks_started, user=user, keys=keys, ip=ip)

    async def _record_disabled_attempt(self, user: User, ip: str) -> None:
        async with self._units.write() as uow:
            uow.outbox.record(
                subject=user.id,
                payload=events_pb2.UserLoginFailed(
                    user_id=user.id, ip_address=ip, reason=events_pb2.LOGIN_FAILURE_REASON_DISABLED
                ),
            )

    # ---- passwords ------------------------------------------------------------------------------

    async def forgot_password(self, email: str) -> None:
        """Email a single-use reset token (`reset_token_ttl`, 1 h) if an enabled account has this
        address; always returns the same (nothing), no sooner than `forgot_password_min_duration`.

        The email's reset-mail budget is spent first, for every address alike. Within
        `email_cooldown` of the previous reset email nothing is sent, also silently.
        """
        address = normalize_email(email)
        if self._email_limits is not None:
            await self._email_limits.spend(FORGOT_PASSWORD_EMAIL_LIMIT, address)
        started = time.monotonic()
        now = self._clock()
        async with self._units.write() as uow:
            user = await uow.users.by_email(address) if len(address) <= EMAIL_MAX else None
            if user is not None and not user.disabled:
                retry_after = await self._cooldown_left(uow, user.id, RESET_PASSWORD_PURPOSE, now)
                if retry_after is None:
                    await self._send_token(
                        uow,
                        user,
                        purpose=RESET_PASSWORD_PURPOSE,
                        template=PASSWORD_RESET_TEMPLATE,
                        ttl=self.settings.reset_token_ttl,
                        link_path=self.settings.reset_password_link_path,
                        now=now,
                    )
            else:
                # What making the token costs, so both paths do the same work before replying.
                secret_hash(new_secret())
        remaining = self.settings.forgot_password_min_duration.total_seconds() - (time.monotonic() - started)
        if remaining > 0:
            await asyncio.sleep(remaining)

    async def reset_password(self, token: str, new_password: str) -> PasswordReset:
        """Set a new password with a reset token: the token is spent, other reset links die, every
        session of the user ends (reason password_reset; access tokens are listed as revoked), the
        account's failed sign-ins are forgotten, and `user.password_reset` is written, all in one
        unit of work. The email is marked verified too: the token arrived there.

        Raises INVALID_ARGUMENT / RESET_TOKEN_INVALID for an unknown, used or expired token (one
        answer for all three) and PASSWORD_POLICY_VIOLATION (field `new_password`) before any write.
        """
        if not token or len(token) > _TOKEN_MAX:
            raise _reset_token_invalid()
        token_hash = secret_hash(token)
        async with self._units.read() as uow:
            found = await uow.tokens.find(token_hash, RESET_PASSWORD_PURPOSE)
            if found is None or found.used_at is not None or found.expires_at <= self._clock():
                raise _reset_token_invalid()
            owner = await uow.users.by_id(found.user_id)
            if owner is None:
                raise _reset_token_invalid()
        self._policy.check(new_password, email=owner.email, field="new_password")
        password_hash = await self._hasher.hash_async(new_password)

        now = self._clock()
        async with self._units.write() as uow:
            if not await uow.tokens.consume(found.id, now=now):
                raise _reset_token_invalid()
            user = await uow.users.by_id(found.user_id, for_update=True)
            if user is None:
                raise _reset_token_invalid()
            newly_verified = user.email_verified_at is None
            if newly_verified:
                user = replace(user, email_verified_at=now)
            user = await uow.users.save(user, now=now, password_hash=password_hash)
            await uow.tokens.discard_unused(user.id, RESET_PASSWORD_PURPOSE)
            await uow.throttle.clear(self._throttle.keys(user.email, "").account)
            revoked = await self._sessions.revoke_all_within(uow, user.id, reason=RevokeReason.PASSWORD_RESET)
            if newly_verified:
                uow.outbox.record(
                    subject=user.id,
                    payload=events_pb2.UserEmailVerified(user_id=user.id, email=user.email),
                )
            uow.outbox.record(
                subject=user.id,
                payload=events_pb2.UserPasswordReset(user_id=user.id, revoked_session_count=revoked.count),
            )
        await self._sessions.propagate(revoked)
        return PasswordReset(user=user, revoked=revoked)

    async def change_password(
        self,
        user_id: str,
        current_password: str,
        new_password: str,
        *,
        current_session_id: str | None = None,
    ) -> PasswordChanged:
        """Change the password given the current one; every other session of the user ends (reason
        password_changed), `current_session_id` stays, and `user.password_changed` is written, all
        in one unit of work.

        A wrong current password is INVALID_ARGUMENT / CURRENT_PASSWORD_INCORRECT (field
        `current_password`) and counts as a failed sign-in for the account, so a stolen session
        cannot be used to guess the password faster than the login form allows; while the account
        is locked the answer is ACCOUNT_LOCKED. Then the policy (field `new_password`).
        """
        async with self._units.read() as uow:
            stored = await uow.users.credentials_by_id(user_id)
            if stored is None:
                raise user_not_found(user_id)
            keys = ThrottleKeys(account=self._throttle.keys(stored.user.email, "").account, client_ip=None)
            lock = await self._throttle.active_lock(uow.throttle, keys)
        if lock is not None:
            raise self._throttle.locked_error(lock)
        if not await self._hasher.verify_async(stored.password_hash, current_password):
            async with self._units.write() as uow:
                outcome = await self._throttle.record_failure(uow.throttle, keys, scopes=[LockScope.ACCOUNT])
                _record_lockouts(uow, outcome.locks_started, user=stored.user, keys=keys, ip="")
            raise _current_password_incorrect()
        self._policy.check(new_password, email=stored.user.email, field="new_password")
        password_hash = await self._hasher.hash_async(new_password)

        now = self._clock()
        async with self._units.write() as uow:
            current = await uow.users.credentials_by_id(user_id, for_update=True)
            if current is None:
                raise user_not_found(user_id)
            if current.password_hash != stored.password_hash:
                # Changed by someone else while we hashed: what was given is no longer current.
                raise _current_password_incorrect()
            user = await uow.users.save(current.user, now=now, password_hash=password_hash)
            await uow.tokens.discard_unused(user.id, RESET_PASSWORD_PURPOSE)
            await self._throttle.clear_account(uow.throttle, keys)
            revoked = await self._sessions.revoke_all_within(
                uow,
                user.id,
                reason=RevokeReason.PASSWORD_CHANGED,
                except_session_id=current_session_id or None,
                actor_user_id=user.id,
            )
            uow.outbox.record(
                subject=user.id,
                payload=events_pb2.UserPasswordChanged(user_id=user.id, revoked_session_count=revoked.count),
            )
        await self._sessions.propagate(revoked)
        return PasswordChanged(user=user, revoked=revoked)

    # ---- profile --------------------------------------------------------------------------------

    async def get_user(self, user_id: str) -> User:
        """The user, from the read cache when it has them; NOT_FOUND when there is none."""
        return await self._users_cache.get_or_load(
            user_id,
            lambda: self._load_user(user_id),
            ttl_s=USER_CACHE_TTL_S,
            encode=encode_user,
            decode=decode_user,
        )

    async def _load_user(self, user_id: str) -> User:
        async with self._units.read() as uow:
            user = await uow.users.by_id(user_id)
        if user is None:
            raise user_not_found(user_id)
        return user

    async def update_profile(self, user_id: str, *, display_name: str, update_mask: Sequence[str]) -> User:
        """Update the owner-editable fields named in `update_mask` (AIP-134).

        Only `display_name` is editable. An empty mask means "every editable field the request
        sets" (an empty display_name is then "not set" and nothing changes); `*` means every
        editable field, so display_name must then be valid. Any other path, known but read-only
        (email, roles, ...) or unknown, is INVALID_ARGUMENT / INVALID_UPDATE_MASK.
        """
        paths = _mask_paths(update_mask)
        if not paths:
            paths = {"display_name"} if display_name.strip() else set()
        if "display_name" not in paths:
            async with self._units.read() as uow:
                found = await uow.users.by_id(user_id)
            if found is None:
                raise user_not_found(user_id)
            return found
        name = clean_display_name(display_name)
        violations = display_name_violations(name, field_name="user.display_name")
        if violations:
            raise invalid_fields(violations)
        now = self._clock()
        async with self._units.write() as uow:
            user = await uow.users.by_id(user_id, for_update=True)
            if user is None:
                raise user_not_found(user_id)
            if user.display_name != name:
                user = await uow.users.save(replace(user, display_name=name), now=now)
            return user

    # ---- plan ------------------------------------------------------------------------------------

    async def apply_plan_within(
        self,
        uow: AuthUnitOfWork,
        user_id: str,
        plan_id: str,
        *,
        effective_time: datetime,
        recorded_at: datetime,
    ) -> PlanChange | None:
        """Put the user on `plan_id`, as billing's subscription change effective at `effective_time`
        (and recorded by billing at `recorded_at`) says, inside the caller's unit of work (the event
        consumer's, which records the event in it too). The next access token a refresh mints
        carries the plan; tokens already issued keep theirs until they expire. The caller must
        `await announce_plan_change(result)` after its unit of work commits.

        None, and nothing written, for an unknown user (billing may have ids auth never had) and
        for a change older than the newest one applied: billing's events may arrive out of order.
        Changes are ordered by effective time, then by when billing recorded them: billing records
        several changes effective at one moment in one transaction (a period's roll-over and an
        upgrade paid right after it), and the later-recorded one is the plan in effect. A change to
        the plan the user is already on is applied all the same (only the times move), so that an
        older change arriving after it is recognised as older.
        """
        user = await uow.users.by_id(user_id, for_update=True)
        if user is None:
            logger.info("no user %s to put on plan %s; the subscription change is ignored", user_id, plan_id)
            return None
        if _plan_change_order(user) > (effective_time, recorded_at):
            logger.info(
                "user %s: a subscription change effective at %s predates the one applied; ignored",
                user_id,
                effective_time.isoformat(),
            )
            return None
        changed = replace(
            user, plan_id=plan_id, plan_changed_at=effective_time, plan_change_recorded_at=recorded_at
        )
        saved = await uow.users.save(changed, now=self._clock())
        return PlanChange(user=saved, previous_plan_id=user.plan_id)

    async def announce_plan_change(self, change: PlanChange) -> None:
        """Tell every cache of the user's credential decisions (API-key and cookie-session checks,
        in every auth replica and gateway edge) that the plan they carry changed."""
        if change.plan_changed:
            await self._sessions.credentials_changed(change.user.id)


@dataclass(frozen=True)
class _CheckedCredentials:
    """A sign-in whose password was just verified, to be recorded if nothing changed meanwhile."""

    user_id: str
    password_hash: str
    keys: ThrottleKeys
    upgraded_hash: str | None


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _mask_paths(update_mask: Sequence[str]) -> set[str]:
    paths: set[str] = set()
    bad: list[str] = []
    for raw in update_mask:
        path = raw.strip()
        if path == "*":
            paths |= MUTABLE_PROFILE_FIELDS
        elif path in MUTABLE_PROFILE_FIELDS:
            paths.add(path)
        else:
            bad.append(path)
    if bad:
        described = ", ".join(sorted(repr(path) for path in bad))
        known_read_only = all(path in USER_FIELDS for path in bad)
        why = "read-only" if known_read_only else "not fields of User"
        message = (
            f"update_mask may name only display_name; {described} {'is' if len(bad) == 1 else 'are'} {why}."
        )
        raise InvalidArgument(
            message,
            reason="INVALID_UPDATE_MASK",
            field_violations=[
                FieldViolation(field="update_mask", description=message, reason="INVALID_UPDATE_MASK")
            ],
        )
    return paths


_NO_PLAN_CHANGE: Final = (datetime.min.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC))


def _plan_change_order(user: User) -> tuple[datetime, datetime]:
    """Where the user's last applied subscription change sits in billing's order of changes."""
    if user.plan_changed_at is None or user.plan_change_recorded_at is None:
        return _NO_PLAN_CHANGE
    return user.plan_changed_at, user.plan_change_recorded_at


def _clean_ip(client_ip: str) -> str:
    # sessions.ip_address holds 64 characters; an address never needs more.
    return client_ip.strip()[:64]


def _attempt_subject(user: User | None, keys: ThrottleKeys) -> str:
    if user is not None:
        return user.id
    return keys.client_ip or keys.account


def _record_lockouts(
    uow: AuthUnitOfWork,
    locks: Sequence[ActiveLock],
    *,
    user: User | None,
    keys: ThrottleKeys,
    ip: str,
) -> None:
    """`user.locked` for each lockout a failure started; short backoff steps write no event."""
    for lock in locks:
        if not lock.lockout:
            continue
        account = lock.scope is LockScope.ACCOUNT
        uow.outbox.record(
            subject=(user.id if user is not None and account else lock.key),
            payload=events_pb2.UserLocked(
                user_id=user.id if user is not None and account else "",
                ip_address=ip,
                scope=events_pb2.LOCK_SCOPE_ACCOUNT if account else events_pb2.LOCK_SCOPE_CLIENT_IP,
                locked_until_time=_timestamp(lock.until),
                failed_attempts=lock.failures,
            ),
        )


def invalid_credentials() -> Unauthenticated:
    return Unauthenticated(INVALID_CREDENTIALS_MESSAGE, reason="INVALID_CREDENTIALS")


def account_disabled() -> PermissionDenied:
    return PermissionDenied("This account has been disabled.", reason="ACCOUNT_DISABLED")


def email_already_registered() -> AlreadyExists:
    return AlreadyExists(
        "An account with this email address already exists.",
        reason="EMAIL_ALREADY_REGISTERED",
        field_violations=[
            FieldViolation(
                field="email",
                description="An account with this email address already exists.",
                reason="EMAIL_ALREADY_REGISTERED",
            )
        ],
    )


def _verification_token_invalid() -> InvalidArgument:
    message = "The verification link is invalid, already used or expired; request a new one."
    return InvalidArgument(
        message,
        reason="VERIFICATION_TOKEN_INVALID",
        field_violations=[
            FieldViolation(field="token", description=message, reason="VERIFICATION_TOKEN_INVALID")
        ],
    )


def _reset_token_invalid() -> InvalidArgument:
    message = "The password-reset link is invalid, already used or expired; request a new one."
    return InvalidArgument(
        message,
        reason="RESET_TOKEN_INVALID",
        field_violations=[FieldViolation(field="token", description=message, reason="RESET_TOKEN_INVALID")],
    )


def _current_password_incorrect() -> InvalidArgument:
    message = "The current password is incorrect."
    return InvalidArgument(
        message,
        reason="CURRENT_PASSWORD_INCORRECT",
        field_violations=[
            FieldViolation(field="current_password", description=message, reason="CURRENT_PASSWORD_INCORRECT")
        ],
    )


def _email_rate_limited(retry_after: timedelta) -> ResourceExhausted:
    seconds = max(1, int(retry_after.total_seconds() + 0.999))
    return ResourceExhausted(
        "A verification email was sent moments ago; wait before asking for another.",
        reason="RATE_LIMITED",
        metadata={"retry_after_s": str(seconds)},
        quota_violations=[
            QuotaViolation(subject="verification_email", description=f"Try again in {seconds} seconds.")
        ],
    )
