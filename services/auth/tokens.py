"""Access tokens: short-lived EdDSA JWTs that every service verifies against the auth JWKS."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import jwt

from services.auth.signing_keys import SIGNING_ALGORITHM, SigningKey
from services.common.clock import utc_now
from services.common.token_rules import MAX_LIFETIME_S

# Sleeps while waiting out a revocation cutoff's second: the first, and re-checks of an early wake.
_CUTOFF_WAIT_ROUNDS = 3
# Added to each of those sleeps: more than the event loop's timer resolution (1 ms).
_TIMER_SLACK_S = 0.005


class SigningKeySource(Protocol):
    """Where the issuer gets the key to sign with (`SigningKeyStore` in production)."""

    async def active_signing_key(self) -> SigningKey: ...


class RevocationCutoffs(Protocol):
    """The part of `services.common.revocation.RevocationList` the issuer reads."""

    async def user_cutoff(self, user_id: str) -> datetime | None:
        """The moment before which the user's tokens are refused, if any."""
        ...


@dataclass(frozen=True)
class IssuedAccessToken:
    """A freshly signed access token; `token` is a credential, so it stays out of reprs and logs."""

    token: str = field(repr=False)
    expires_at: datetime
    jti: str


class AccessTokenIssuer:
    """Signs access JWTs with the active key.

    Header: `alg` EdDSA, `kid`, `typ` JWT. Claims, exactly: `sub` (user id), `sid` (session id),
    `plan`, `roles` (a list), `iss`, `aud`, `iat`, `nbf` (= `iat`), `exp` (whole seconds) and a unique
    `jti`: everything `services.common.token_rules` requires, within its lifetime cap.
    """

    def __init__(
        self,
        keys: SigningKeySource,
        *,
        issuer: str,
        audience: str,
        ttl: timedelta,
        revocations: RevocationCutoffs | None = None,
        clock: Callable[[], datetime] = utc_now,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not timedelta(0) < ttl <= timedelta(seconds=MAX_LIFETIME_S):
            raise ValueError(f"an access token lives more than 0 and at most {MAX_LIFETIME_S} seconds")
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._ttl_s = int(ttl.total_seconds())
        self._revocations = revocations
        self._clock = clock
        self._sleep = sleep

    async def issue(
        self, user_id: str, session_id: str, plan: str, roles: Iterable[str]
    ) -> IssuedAccessToken:
        key = await self._keys.active_signing_key()
        await self._clear_of_cutoff(user_id)
        issued_at = int(self._clock().timestamp())
        expires_at = issued_at + self._ttl_s
        jti = uuid.uuid4().hex
        claims = {
            "sub": user_id,
            "sid": session_id,
            "plan": plan,
            "roles": list(roles),
            "iss": self._issuer,
            "aud": self._audience,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": expires_at,
            "jti": jti,
        }
        token = jwt.encode(
            claims, key.private_key, algorithm=SIGNING_ALGORITHM, headers={"kid": key.kid, "typ": "JWT"}
        )
        return IssuedAccessToken(token=token, expires_at=datetime.fromtimestamp(expires_at, UTC), jti=jti)

    async def _clear_of_cutoff(self, user_id: str) -> None:
        """Wait out the rest of a revocation cutoff's second before signing.

        `iat` is whole seconds and verifiers refuse a token stamped with a cutoff's own second (it
        may predate the cutoff). A sign-in right after a password reset, an enable or a role change
        therefore waits, at most a second, so its token is stamped after the cutoff and works.
        """
        if self._revocations is None:
            return
        cutoff = await self._revocations.user_cutoff(user_id)
        if cutoff is None:
            return
        first_clear_second = math.floor(cutoff.timestamp()) + 1
        remaining = first_clear_second - self._clock().timestamp()
        # The event loop's timers are monotonic with millisecond resolution: by the wall clock one
        # can fire up to a millisecond early, and a sub-millisecond sleep returns at once. So sleep a
        # little past the second, and look again (a bounded number of times).
        for _ in range(_CUTOFF_WAIT_ROUNDS):
            if not 0 < remaining <= 1:
                return
            await self._sleep(remaining + _TIMER_SLACK_S)
            remaining = first_clear_second - self._clock().timestamp()
