"""Access tokens: short-lived EdDSA JWTs that every service verifies against the auth JWKS."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import jwt

from services.auth.signing_keys import SIGNING_ALGORITHM, SigningKey
from services.common.models import utc_now


class SigningKeySource(Protocol):
    """Where the issuer gets the key to sign with (`SigningKeyStore` in production)."""

    async def active_signing_key(self) -> SigningKey: ...


@dataclass(frozen=True)
class IssuedAccessToken:
    """A freshly signed access token; `token` is a credential, so it stays out of reprs and logs."""

    token: str = field(repr=False)
    expires_at: datetime
    jti: str


class AccessTokenIssuer:
    """Signs access JWTs with the active key.

    Header: `alg` EdDSA, `kid`, `typ` JWT. Claims, exactly: `sub` (user id), `sid` (session id),
    `plan`, `roles` (a list), `iss`, `aud`, `iat`, `exp` (whole seconds) and a unique `jti`.
    """

    def __init__(
        self,
        keys: SigningKeySource,
        *,
        issuer: str,
        audience: str,
        ttl: timedelta,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        if ttl <= timedelta(0):
            raise ValueError("an access token needs a positive lifetime")
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._ttl_s = int(ttl.total_seconds())
        self._clock = clock

    async def issue(
        self, user_id: str, session_id: str, plan: str, roles: Iterable[str]
    ) -> IssuedAccessToken:
        key = await self._keys.active_signing_key()
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
            "exp": expires_at,
            "jti": jti,
        }
        token = jwt.encode(
            claims, key.private_key, algorithm=SIGNING_ALGORITHM, headers={"kid": key.kid, "typ": "JWT"}
        )
        return IssuedAccessToken(token=token, expires_at=datetime.fromtimestamp(expires_at, UTC), jti=jti)
