"""Who is calling: identity from gateway-set headers or from a JWT verified on a direct call."""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import jwt
from jwt import PyJWK

from services.common.errors import PermissionDenied, Unauthenticated

# The header family only the gateway may set; Envoy strips any client-sent copy before routing.
GATEWAY_SECRET_HEADER = "x-parley-gateway-secret"  # noqa: S105 - a header name, not a secret
USER_ID_HEADER = "x-parley-user-id"
SESSION_ID_HEADER = "x-parley-session-id"
PLAN_HEADER = "x-parley-plan"
ROLES_HEADER = "x-parley-roles"
AUTH_METHOD_HEADER = "x-parley-auth-method"
IDENTITY_HEADERS = (USER_ID_HEADER, SESSION_ID_HEADER, PLAN_HEADER, ROLES_HEADER, AUTH_METHOD_HEADER)

# Asymmetric algorithms only: a verifier that accepted HS* could be fed a token signed with the public key.
ALLOWED_JWT_ALGORITHMS = ("EdDSA", "ES256", "RS256")


@dataclass(frozen=True)
class Identity:
    """The authenticated principal of one call; `user_id` is empty for anonymous callers."""

    user_id: str = ""
    session_id: str = ""
    plan: str = ""
    roles: frozenset[str] = field(default_factory=frozenset)
    auth_method: str = "anonymous"

    @property
    def is_authenticated(self) -> bool:
        return bool(self.user_id)

    def require_user(self) -> Identity:
        if not self.is_authenticated:
            raise Unauthenticated("This call needs a signed-in user.", reason="UNAUTHENTICATED")
        return self

    def require_role(self, role: str) -> Identity:
        self.require_user()
        if role not in self.roles:
            raise PermissionDenied(
                f"This call needs the {role!r} role.", reason="PERMISSION_DENIED", metadata={"role": role}
            )
        return self


ANONYMOUS = Identity()


class TokenVerifier(Protocol):
    """Turns a bearer token into an identity, or raises `Unauthenticated`."""

    def verify(self, token: str) -> Identity: ...


class NoTokenVerifier:
    """Used until a JWKS is configured: every bearer token is refused, honestly."""

    def verify(self, token: str) -> Identity:
        raise Unauthenticated(
            "Bearer tokens cannot be verified on this server: no JWKS is configured.",
            reason="TOKEN_INVALID",
            metadata={"cause": "no_verification_keys"},
        )


class JwksTokenVerifier:
    """Verifies access JWTs against a JWKS (RFC 7517) with a pinned issuer and audience."""

    def __init__(self, jwks: Mapping[str, object], *, issuer: str, audience: str) -> None:
        keys = jwks.get("keys")
        if not isinstance(keys, list):
            raise TypeError("a JWKS needs a 'keys' list")
        self._keys: dict[str, PyJWK] = {}
        for raw in keys:
            key = PyJWK.from_dict(raw)
            if not key.key_id:
                raise ValueError("every JWKS key needs a 'kid'")
            self._keys[key.key_id] = key
        self._issuer = issuer
        self._audience = audience

    @classmethod
    def from_file(cls, path: Path, *, issuer: str, audience: str) -> JwksTokenVerifier:
        return cls(json.loads(path.read_text()), issuer=issuer, audience=audience)

    def verify(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated(
                "The bearer token is malformed.", reason="TOKEN_INVALID", metadata={"cause": "malformed"}
            ) from None
        key = self._keys.get(str(header.get("kid", "")))
        if key is None:
            raise Unauthenticated(
                "The bearer token's signing key is unknown.",
                reason="TOKEN_INVALID",
                metadata={"cause": "unknown_kid"},
            )
        algorithm = header.get("alg")
        if algorithm not in ALLOWED_JWT_ALGORITHMS or algorithm != key.algorithm_name:
            raise Unauthenticated(
                "The bearer token's algorithm is not accepted.",
                reason="TOKEN_INVALID",
                metadata={"cause": "algorithm"},
            )
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[key.algorithm_name],
                issuer=self._issuer,
                audience=self._audience,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("The bearer token has expired.", reason="TOKEN_EXPIRED") from None
        except jwt.PyJWTError:
            raise Unauthenticated(
                "The bearer token is not valid.",
                reason="TOKEN_INVALID",
                metadata={"cause": "signature_or_claims"},
            ) from None
        roles = claims.get("roles", [])
        return Identity(
            user_id=str(claims["sub"]),
            session_id=str(claims.get("sid", "")),
            plan=str(claims.get("plan", "")),
            roles=frozenset(str(role) for role in roles) if isinstance(roles, list) else frozenset(),
            auth_method="jwt",
        )


class IdentityResolver:
    """Decides which identity a call carries, from its invocation metadata."""

    def __init__(self, *, gateway_secret: str | None, token_verifier: TokenVerifier) -> None:
        self._gateway_secret = gateway_secret.encode() if gateway_secret else None
        self._token_verifier = token_verifier

    def resolve(self, metadata: Mapping[str, str]) -> Identity:
        presented_secret = metadata.get(GATEWAY_SECRET_HEADER)
        if presented_secret is not None:
            if self._gateway_secret is None or not hmac.compare_digest(
                presented_secret.encode(), self._gateway_secret
            ):
                raise Unauthenticated(
                    "The gateway credential is not valid.",
                    reason="UNTRUSTED_IDENTITY",
                    metadata={"cause": "gateway_secret"},
                )
            return self._from_gateway_headers(metadata)
        if any(name in metadata for name in IDENTITY_HEADERS):
            # Only the gateway may assert an identity by header; a direct caller must present a token.
            raise Unauthenticated(
                "Identity headers are accepted only from the gateway.",
                reason="UNTRUSTED_IDENTITY",
                metadata={"cause": "identity_headers"},
            )
        authorization = metadata.get("authorization", "")
        if not authorization:
            return ANONYMOUS
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "The authorization header must be 'Bearer <token>'.",
                reason="TOKEN_INVALID",
                metadata={"cause": "malformed"},
            )
        return self._token_verifier.verify(token.strip())

    @staticmethod
    def _from_gateway_headers(metadata: Mapping[str, str]) -> Identity:
        user_id = metadata.get(USER_ID_HEADER, "")
        if not user_id:
            return ANONYMOUS
        roles = frozenset(role for role in metadata.get(ROLES_HEADER, "").split(",") if role)
        return Identity(
            user_id=user_id,
            session_id=metadata.get(SESSION_ID_HEADER, ""),
            plan=metadata.get(PLAN_HEADER, ""),
            roles=roles,
            auth_method=metadata.get(AUTH_METHOD_HEADER, "jwt") or "jwt",
        )
