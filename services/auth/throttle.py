"""Sign-in throttling: exponential backoff, then a temporary lockout, per account and per client IP.

Failed sign-ins are counted under two keys: the account (`email:<normalized address>`) and the
client (`ip:<address>`). The account key is counted whether or not an account has that address, so
a lockout reply never tells an attacker which emails exist. After a policy's free failures, each
further failure locks its key for `backoff_base * 2**k` (capped at `backoff_max`); at
`lockout_after` failures the key is locked for `lockout_duration` instead. Counts are forgotten
after `forget_after` without a failure, and a successful sign-in clears the account's count (never
the client's: its history covers other accounts too).

The counters live in the database (`login_throttles`), shared by every replica: a limit kept in
process memory would multiply by the number of replicas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from services.common.clock import Clock, utc_now
from services.common.errors import QuotaViolation, ResourceExhausted

if TYPE_CHECKING:
    from services.auth.ports import ThrottleRepository

ACCOUNT_KEY_PREFIX: Final = "email:"
CLIENT_IP_KEY_PREFIX: Final = "ip:"
# `login_throttles.key` holds 328 characters: the prefix plus a 320-character address.
MAX_KEY_SUBJECT_CHARS: Final = 320

# The one message of every lockout reply, whatever locked and whether or not the account exists.
LOCKED_MESSAGE: Final = "Too many failed sign-in attempts; try again later."


class LockScope(StrEnum):
    """What a lock applies to."""

    ACCOUNT = "account"
    CLIENT_IP = "client_ip"


@dataclass(frozen=True)
class ThrottlePolicy:
    """How one kind of key (account or client IP) backs off and locks.

    With the account defaults: failures 1-3 are free; the 4th locks for 1 s, the 5th for 2 s, then
    4, 8, 16, 32 s; the 10th locks for 15 minutes, and so does every failure after it until the
    count is forgotten (an hour after the last failure) or cleared by a successful sign-in.
    """

    # Failures allowed before any delay.
    free_failures: int = 3
    # The lock after the first failure beyond the free ones; it doubles with each further failure.
    backoff_base: timedelta = timedelta(seconds=1)
    # The longest backoff lock.
    backoff_max: timedelta = timedelta(minutes=5)
    # The failure count at which the temporary lockout starts (and is renewed by each later failure).
    lockout_after: int = 10
    # How long a lockout lasts.
    lockout_duration: timedelta = timedelta(minutes=15)
    # A count is forgotten when this long passed since its last failure.
    forget_after: timedelta = timedelta(hours=1)

    def __post_init__(self) -> None:
        if self.free_failures < 0:
            raise ValueError("free_failures must not be negative")
        if self.lockout_after <= self.free_failures:
            raise ValueError("lockout_after must be greater than free_failures")
        if self.backoff_base <= timedelta(0) or self.backoff_max < self.backoff_base:
            raise ValueError("backoff_base must be positive and no greater than backoff_max")
        if self.lockout_duration <= timedelta(0):
            raise ValueError("lockout_duration must be positive")
        if self.forget_after <= self.lockout_duration:
            # Otherwise a count could be forgotten while its lockout runs, and every lockout would
            # hand the attacker a fresh set of free attempts.
            raise ValueError("forget_after must be longer than lockout_duration")

    def lock_after(self, failures: int) -> tuple[timedelta, bool] | None:
        """How long a key is locked after its `failures`-th consecutive failure, and whether that is
        the lockout (True) or a backoff step (False); None when that failure is still free."""
        if failures >= self.lockout_after:
            return self.lockout_duration, True
        if failures <= self.free_failures:
            return None
        steps = failures - self.free_failures - 1
        # Capping the exponent keeps the multiplication small; the cap below is what applies.
        delay = self.backoff_base * (2 ** min(steps, 40))
        return min(delay, self.backoff_max), False


def _client_ip_policy() -> ThrottlePolicy:
    # One address may be a NAT or an office full of people, so a client gets far more room than an
    # account before it is slowed; it still stops a single machine from spraying passwords.
    return ThrottlePolicy(
        free_failures=20,
        backoff_base=timedelta(seconds=1),
        backoff_max=timedelta(minutes=5),
        lockout_after=100,
        lockout_duration=timedelta(minutes=15),
        forget_after=timedelta(hours=1),
    )


@dataclass(frozen=True)
class LoginThrottleSettings:
    """The policies for accounts and for client IPs."""

    account: ThrottlePolicy = field(default_factory=ThrottlePolicy)
    client_ip: ThrottlePolicy = field(default_factory=_client_ip_policy)

    def policy_for(self, scope: LockScope) -> ThrottlePolicy:
        return self.account if scope is LockScope.ACCOUNT else self.client_ip


@dataclass(frozen=True)
class ThrottleState:
    """One key's row: its consecutive failures and any lock."""

    key: str
    failures: int
    last_failure_at: datetime
    locked_until: datetime | None


@dataclass(frozen=True)
class ThrottleKeys:
    """The keys one sign-in attempt is counted under; `client_ip` is None when the address is unknown."""

    account: str
    client_ip: str | None

    def scoped(self) -> list[tuple[LockScope, str]]:
        found = [(LockScope.ACCOUNT, self.account)]
        if self.client_ip is not None:
            found.append((LockScope.CLIENT_IP, self.client_ip))
        return found


@dataclass(frozen=True)
class ActiveLock:
    """A lock in force, or one that a failure just started."""

    scope: LockScope
    key: str
    until: datetime
    failures: int
    # True for the temporary lockout, False for a backoff step.
    lockout: bool

    def retry_after_s(self, now: datetime) -> int:
        return max(1, math.ceil((self.until - now).total_seconds()))


@dataclass(frozen=True)
class FailureRecord:
    """What counting one failed attempt did."""

    account_failures: int
    client_ip_failures: int
    locks_started: tuple[ActiveLock, ...]


def account_key(normalized_email: str) -> str:
    return ACCOUNT_KEY_PREFIX + normalized_email[:MAX_KEY_SUBJECT_CHARS]


def client_ip_key(client_ip: str) -> str | None:
    address = client_ip.strip()[:MAX_KEY_SUBJECT_CHARS]
    return CLIENT_IP_KEY_PREFIX + address if address else None


class LoginThrottle:
    """Decides, from the stored counters, whether an attempt may proceed and what a failure locks."""

    def __init__(self, settings: LoginThrottleSettings | None = None, *, clock: Clock = utc_now) -> None:
        self.settings = settings or LoginThrottleSettings()
        self._clock = clock

    @staticmethod
    def keys(normalized_email: str, client_ip: str) -> ThrottleKeys:
        """The keys of an attempt; without a client address only the account is counted."""
        return ThrottleKeys(account=account_key(normalized_email), client_ip=client_ip_key(client_ip))

    async def active_lock(self, store: ThrottleRepository, keys: ThrottleKeys) -> ActiveLock | None:
        """The lock that refuses this attempt now (the one lasting longest), or None."""
        now = self._clock()
        states = await store.states([key for _, key in keys.scoped()])
        found: ActiveLock | None = None
        for scope, key in keys.scoped():
            state = states.get(key)
            if state is None or state.locked_until is None or state.locked_until <= now:
                continue
            lockout = state.failures >= self.settings.policy_for(scope).lockout_after
            lock = ActiveLock(scope, key, state.locked_until, state.failures, lockout)
            if found is None or lock.until > found.until:
                found = lock
        return found

    async def failures(self, store: ThrottleRepository, keys: ThrottleKeys) -> dict[LockScope, int]:
        """The current consecutive-failure count per scope (0 when none or forgotten)."""
        now = self._clock()
        states = await store.states([key for _, key in keys.scoped()])
        counts: dict[LockScope, int] = {}
        for scope, key in keys.scoped():
            state = states.get(key)
            forgotten = (
                state is None or state.last_failure_at < now - self.settings.policy_for(scope).forget_after
            )
            counts[scope] = 0 if forgotten or state is None else state.failures
        return counts

    async def record_failure(
        self, store: ThrottleRepository, keys: ThrottleKeys, *, scopes: Sequence[LockScope] | None = None
    ) -> FailureRecord:
        """Count a failed attempt under its keys (or only `scopes`) and lock those that reached a step."""
        now = self._clock()
        counts = {LockScope.ACCOUNT: 0, LockScope.CLIENT_IP: 0}
        started: list[ActiveLock] = []
        for scope, key in keys.scoped():
            if scopes is not None and scope not in scopes:
                continue
            policy = self.settings.policy_for(scope)
            failures = await store.add_failure(key, now=now, forget_before=now - policy.forget_after)
            counts[scope] = failures
            step = policy.lock_after(failures)
            if step is None:
                continue
            duration, lockout = step
            until = now + duration
            await store.lock(key, until)
            started.append(ActiveLock(scope, key, until, failures, lockout))
        return FailureRecord(
            account_failures=counts[LockScope.ACCOUNT],
            client_ip_failures=counts[LockScope.CLIENT_IP],
            locks_started=tuple(started),
        )

    async def clear_account(self, store: ThrottleRepository, keys: ThrottleKeys) -> None:
        """Forget the account's failures after a successful sign-in; the client's count stays."""
        await store.clear(keys.account)

    def locked_error(self, lock: ActiveLock) -> ResourceExhausted:
        """The reply to an attempt refused by `lock`: 429 with Retry-After through the gateway.

        Identical for existing and unknown accounts; the quota subject says only whether the
        account or the client is throttled, which the caller already knows.
        """
        retry_after = lock.retry_after_s(self._clock())
        return ResourceExhausted(
            LOCKED_MESSAGE,
            reason="ACCOUNT_LOCKED",
            metadata={"retry_after_s": str(retry_after), "scope": lock.scope.value},
            quota_violations=[
                QuotaViolation(
                    subject=lock.scope.value,
                    description=f"Failed sign-ins locked this {_scope_noun(lock.scope)}; "
                    f"retry in {retry_after} s.",
                )
            ],
        )


def _scope_noun(scope: LockScope) -> str:
    return "account" if scope is LockScope.ACCOUNT else "client address"
