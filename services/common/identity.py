"""Who is calling: identity from gateway-set headers, or from an access JWT verified on a direct call
(as a bearer token or in the browser's access cookie, with a CSRF check on state-changing calls).

The credential itself is read by `services.common.credentials`, the same parser the gateway's check
uses; this module decides what a service accepts and verifies it."""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import jwt
from jwt import PyJWK

from services.common.clock import utc_now
from services.common.credentials import (
    check_csrf,
    double_submitted_csrf,
    invalid_token,
    presented_credential,
)
from services.common.errors import ParleyError, PermissionDenied, Unauthenticated, Unavailable
from services.common.safe_methods import SafeMethods

if TYPE_CHECKING:
    from services.common.revocation import RevocationList

logger = logging.getLogger(__name__)

# The header family only the gateway may set: Envoy removes every client-sent header with this prefix
# before any filter runs, and the gateway's own request headers (identity, the route's required
# role, version negotiation) all carry it. Services believe them only from the gateway's workload.
GATEWAY_HEADER_PREFIX: Final = "x-parley-"
USER_ID_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}user-id"
SESSION_ID_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}session-id"
PLAN_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}plan"
ROLES_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}roles"
AUTH_METHOD_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}auth-method"
# The `iat` of the token behind the identity, so services can still refuse revoked sessions.
TOKEN_ISSUED_AT_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}token-issued-at"
IDENTITY_HEADERS: Final = (
    USER_ID_HEADER,
    SESSION_ID_HEADER,
    PLAN_HEADER,
    ROLES_HEADER,
    AUTH_METHOD_HEADER,
    TOKEN_ISSUED_AT_HEADER,
)
# Envoy's jwt_authn copies these claims of a verified token into the identity headers (the array
# claim `roles` arrives as base64 of its JSON, which `decode_roles_header` reads); the gateway's
# ext_authz check sets the same headers for the other credentials.
JWT_CLAIM_HEADERS: Final = (
    (USER_ID_HEADER, "sub"),
    (SESSION_ID_HEADER, "sid"),
    (PLAN_HEADER, "plan"),
    (ROLES_HEADER, "roles"),
    (TOKEN_ISSUED_AT_HEADER, "iat"),
)

# Asymmetric algorithms only: a verifier that accepted HS* could be fed a token signed with the public key.
ALLOWED_JWT_ALGORITHMS = ("EdDSA", "ES256", "RS256")
REQUIRED_CLAIMS = ("exp", "iat", "sub", "iss", "aud")
# How far a token's `iat` may lie in the future: clocks of different hosts drift a little.
DEFAULT_MAX_CLOCK_SKEW_S: Final = 60.0


@dataclass(frozen=True)
class Identity:
    """The authenticated principal of one call; `user_id` is empty for anonymous callers.

    `auth_method` is "anonymous", "jwt" (bearer token), "cookie" (browser session), or whatever the
    gateway asserted (e.g. "api_key").
    """

    user_id: str = ""
    session_id: str = ""
    plan: str = ""
    roles: frozenset[str] = field(default_factory=frozenset)
    auth_method: str = "anonymous"
    # Why the token or cookie the caller presented was refused. Such a caller is anonymous, so open
    # RPCs (sign-in with a stale cookie still in the browser) work; any RPC that needs a user
    # answers with this error instead of a generic UNAUTHENTICATED.
    credential_error: ParleyError | None = field(default=None, compare=False)

    @property
    def is_authenticated(self) -> bool:
        return bool(self.user_id)

    def require_user(self) -> Identity:
        if self.credential_error is not None:
            raise self.credential_error
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
    """Turns an access token into an identity, or raises `Unauthenticated`."""

    async def verify(self, token: str) -> Identity: ...


class NoTokenVerifier:
    """Used when no keys are configured: every token is refused, honestly."""

    async def verify(self, token: str) -> Identity:
        raise Unauthenticated(
            "Bearer tokens cannot be verified on this server: no JWKS is configured.",
            reason="TOKEN_INVALID",
            metadata={"cause": "no_verification_keys"},
        )


def parse_jwks(jwks: Mapping[str, Any], *, strict: bool) -> dict[str, PyJWK]:
    """The verification keys of a JWK Set by kid.

    Only signature keys for `ALLOWED_JWT_ALGORITHMS` with a `kid` are kept. `strict` (a configured
    file) raises on any other key; otherwise (a fetched set) such keys are skipped with a warning,
    so one odd key cannot take verification down.
    """
    raw_keys = jwks.get("keys")
    if not isinstance(raw_keys, list):
        raise TypeError("a JWKS needs a 'keys' list")
    keys: dict[str, PyJWK] = {}
    for raw in raw_keys:
        problem: str | None = None
        key: PyJWK | None = None
        try:
            key = PyJWK.from_dict(raw)
        except (jwt.PyJWTError, TypeError, ValueError, KeyError, AttributeError) as error:
            problem = f"unusable key ({type(error).__name__})"
        if key is not None:
            if not key.key_id:
                problem = "every JWKS key needs a 'kid'"
            elif key.algorithm_name not in ALLOWED_JWT_ALGORITHMS:
                problem = f"key {key.key_id!r} is for {key.algorithm_name}, not an accepted algorithm"
            elif isinstance(raw, Mapping) and raw.get("use", "sig") != "sig":
                problem = f"key {key.key_id!r} is not a signature key"
        if problem is not None or key is None:
            if strict:
                raise ValueError(problem)
            logger.warning("skipping a JWKS key: %s", problem)
            continue
        keys[str(key.key_id)] = key
    return keys


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_token(f"The token's {name!r} claim is not a time.", "claims", claim=name)
    return float(value)


class _JwtVerifier(abc.ABC):
    """The checks every access-token verifier makes; subclasses say where keys come from.

    In order: a parseable header; an accepted asymmetric `alg`; a `kid` naming a known key whose own
    algorithm is the header's; a valid signature; `iss`, `aud`, `exp`, `iat` and `sub` present and
    right; not expired, not issued in the future; and not revoked. Each failure has its own `cause`.
    """

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        revocations: RevocationList | None,
        clock: Callable[[], datetime],
        max_clock_skew_s: float,
    ) -> None:
        self._issuer = issuer
        self._audience = audience
        self._revocations = revocations
        self._clock = clock
        self._max_clock_skew_s = max_clock_skew_s

    @abc.abstractmethod
    async def _key_for(self, kid: str) -> PyJWK | None:
        """The verification key named `kid`, or None if there is none."""

    async def verify(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise invalid_token("The token is malformed.", "malformed") from None
        algorithm = header.get("alg")
        if algorithm not in ALLOWED_JWT_ALGORITHMS:
            raise invalid_token("The token's algorithm is not accepted.", "algorithm")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise invalid_token("The token does not name its signing key.", "missing_kid")
        key = await self._key_for(kid)
        if key is None:
            raise invalid_token("The token's signing key is unknown.", "unknown_kid")
        if algorithm != key.algorithm_name:
            raise invalid_token("The token's algorithm is not accepted.", "algorithm")
        claims = self._verified_claims(token, key)
        identity = self._identity_from(claims)
        await self._refuse_if_revoked(identity, claims)
        return identity

    def _verified_claims(self, token: str, key: PyJWK) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key.key,
                algorithms=[key.algorithm_name],
                issuer=self._issuer,
                audience=self._audience,
                # Times are checked below against the injectable clock.
                options={
                    "require": list(REQUIRED_CLAIMS),
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise invalid_token("The token's signature is not valid.", "signature") from None
        except jwt.MissingRequiredClaimError as error:
            raise invalid_token(
                f"The token lacks the {error.claim!r} claim.", "missing_claim", claim=error.claim
            ) from None
        except jwt.InvalidIssuerError:
            raise invalid_token("The token was issued by someone else.", "issuer") from None
        except jwt.InvalidAudienceError:
            raise invalid_token("The token is meant for another audience.", "audience") from None
        except jwt.DecodeError:
            raise invalid_token("The token is malformed.", "malformed") from None
        except jwt.PyJWTError:
            raise invalid_token("The token's claims are not valid.", "claims") from None
        now = self._clock().timestamp()
        if _numeric_date(claims, "exp") <= now:
            raise Unauthenticated("The token has expired.", reason="TOKEN_EXPIRED")
        if _numeric_date(claims, "iat") > now + self._max_clock_skew_s:
            raise invalid_token("The token claims to be issued in the future.", "issued_in_future")
        if "nbf" in claims and _numeric_date(claims, "nbf") > now + self._max_clock_skew_s:
            raise invalid_token("The token is not valid yet.", "not_yet_valid")
        if not isinstance(claims["sub"], str) or not claims["sub"]:
            raise invalid_token("The token's subject is empty.", "claims", claim="sub")
        return claims

    @staticmethod
    def _identity_from(claims: Mapping[str, Any]) -> Identity:
        roles = claims.get("roles", [])
        return Identity(
            user_id=str(claims["sub"]),
            session_id=str(claims.get("sid", "")),
            plan=str(claims.get("plan", "")),
            roles=frozenset(str(role) for role in roles) if isinstance(roles, list) else frozenset(),
            auth_method="jwt",
        )

    async def _refuse_if_revoked(self, identity: Identity, claims: Mapping[str, Any]) -> None:
        if self._revocations is None:
            return
        issued_at = datetime.fromtimestamp(_numeric_date(claims, "iat"), UTC)
        if await self._revocations.is_revoked(identity.session_id, identity.user_id, issued_at):
            raise Unauthenticated(
                "This session has been signed out; sign in again.", reason="SESSION_REVOKED"
            )


class JwksTokenVerifier(_JwtVerifier):
    """Verifies access JWTs against a fixed JWKS (RFC 7517), e.g. a file, with pinned issuer and audience."""

    def __init__(
        self,
        jwks: Mapping[str, Any],
        *,
        issuer: str,
        audience: str,
        revocations: RevocationList | None = None,
        clock: Callable[[], datetime] = utc_now,
        max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S,
    ) -> None:
        super().__init__(
            issuer=issuer,
            audience=audience,
            revocations=revocations,
            clock=clock,
            max_clock_skew_s=max_clock_skew_s,
        )
        self._keys = parse_jwks(jwks, strict=True)

    @classmethod
    def from_file(cls, path: Path, *, issuer: str, audience: str) -> JwksTokenVerifier:
        return cls(json.loads(path.read_text()), issuer=issuer, audience=audience)

    async def _key_for(self, kid: str) -> PyJWK | None:
        return self._keys.get(kid)


JwksFetcher = Callable[[], Awaitable[Mapping[str, Any]]]


class CachedJwksVerifier(_JwtVerifier):
    """Verifies access JWTs against the auth service's JWKS, fetched on demand and cached.

    The set is refetched when older than `cache_ttl_s`, and when a token names an unknown kid (how a
    rotation is noticed) - but never more than once per `min_refetch_interval_s`, so tokens with
    made-up kids cannot hammer the auth service. A failed fetch keeps the previous keys in use;
    with no keys at all, verification answers UNAVAILABLE rather than blaming the token.
    """

    def __init__(
        self,
        fetch_jwks: JwksFetcher,
        *,
        issuer: str,
        audience: str,
        cache_ttl_s: float = 300,
        min_refetch_interval_s: float = 5,
        revocations: RevocationList | None = None,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S,
    ) -> None:
        super().__init__(
            issuer=issuer,
            audience=audience,
            revocations=revocations,
            clock=clock,
            max_clock_skew_s=max_clock_skew_s,
        )
        self._fetch_jwks = fetch_jwks
        self._cache_ttl_s = cache_ttl_s
        self._min_refetch_interval_s = min_refetch_interval_s
        self._monotonic = monotonic
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._fetching = asyncio.Lock()

    def _may_fetch(self) -> bool:
        """Whether the refetch budget allows a fetch now."""
        return (
            self._attempted_at is None
            or self._monotonic() - self._attempted_at >= self._min_refetch_interval_s
        )

    async def _key_for(self, kid: str) -> PyJWK | None:
        stale = self._fetched_at is None or self._monotonic() - self._fetched_at >= self._cache_ttl_s
        if stale and self._may_fetch():
            await self._refetch()
        if self._fetched_at is None:
            raise Unavailable(
                "Tokens cannot be verified right now: the signing keys are unavailable.",
                reason="SERVICE_UNAVAILABLE",
                metadata={"dependency": "jwks"},
            )
        key = self._keys.get(kid)
        if key is None and self._may_fetch():
            await self._refetch()
            key = self._keys.get(kid)
        return key

    async def _refetch(self) -> None:
        wanted_at = self._monotonic()
        async with self._fetching:
            if self._attempted_at is not None and self._attempted_at >= wanted_at:
                return  # someone fetched while this call waited for the lock
            self._attempted_at = self._monotonic()
            try:
                keys = parse_jwks(await self._fetch_jwks(), strict=False)
            # Whatever the fetch raises (transport, JSON, shape), the keys already cached stay in use.
            except Exception as error:  # noqa: BLE001
                logger.warning("fetching the JWKS failed: %s: %s", type(error).__name__, error)
                return
            self._keys = keys
            self._fetched_at = self._attempted_at


class IdentityResolver:
    """Decides which identity a call carries, from its invocation metadata and method.

    In order: the identity headers of a call from the gateway's workload (its client certificate
    says so, see `services.common.service_tls`); identity headers from any other caller (refused);
    otherwise the credential the request presents (`presented_credential`): a bearer JWT, or the
    access cookie with the CSRF double-submit check on methods that are not safe; an API key is
    refused here (the gateway resolves those); nothing presented is anonymous.
    """

    def __init__(
        self,
        *,
        token_verifier: TokenVerifier,
        is_safe_method: Callable[[str], bool] | None = None,
        revocations: RevocationList | None = None,
        clock: Callable[[], datetime] = utc_now,
        max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S,
    ) -> None:
        self._clock = clock
        self._max_clock_skew_s = max_clock_skew_s
        self._token_verifier = token_verifier
        self._is_safe_method = is_safe_method or SafeMethods()
        self._revocations = revocations

    async def resolve(
        self, metadata: Mapping[str, str], method: str = "", *, from_gateway: bool = False
    ) -> Identity:
        """The caller of `method` (`/pkg.Service/Method`; empty counts as not safe); `from_gateway`:
        the call's peer proved to be the gateway's workload."""
        if from_gateway:
            if metadata.get(USER_ID_HEADER):
                return await self._from_gateway_headers(metadata)
            # The gateway vouched for no one (an open route, or a credential it leaves to the
            # services): the request's own token or cookie decides, exactly as on a direct call.
        elif any(name in metadata for name in IDENTITY_HEADERS):
            # Only the gateway may assert an identity by header; a direct caller must present a token.
            raise Unauthenticated(
                "Identity headers are accepted only from the gateway.",
                reason="UNTRUSTED_IDENTITY",
                metadata={"cause": "identity_headers"},
            )
        try:
            return await self._from_credential(metadata, method)
        except (Unauthenticated, PermissionDenied) as error:
            return Identity(credential_error=error)

    async def _from_credential(self, metadata: Mapping[str, str], method: str) -> Identity:
        """The identity the request's own bearer token or access cookie proves, or anonymous."""
        credential = presented_credential(metadata)
        if credential is None:
            return ANONYMOUS
        if credential.kind == "api_key":
            # Keys are checked with the auth service, per request and cached, by the gateway only.
            raise invalid_token(
                "API keys are accepted through the gateway only; call a service with an access token.",
                "malformed",
            )
        identity = await self._token_verifier.verify(credential.secret)
        if credential.kind == "jwt":
            return identity
        if not self._is_safe_method(method):
            check_csrf(*double_submitted_csrf(metadata))
        return replace(identity, auth_method="cookie")

    async def _from_gateway_headers(self, metadata: Mapping[str, str]) -> Identity:
        identity = Identity(
            user_id=metadata[USER_ID_HEADER],
            session_id=metadata.get(SESSION_ID_HEADER, ""),
            plan=metadata.get(PLAN_HEADER, ""),
            roles=decode_roles_header(metadata.get(ROLES_HEADER, "")),
            auth_method=metadata.get(AUTH_METHOD_HEADER, "jwt") or "jwt",
        )
        issued_at = metadata.get(TOKEN_ISSUED_AT_HEADER, "")
        if not issued_at:
            return identity
        if not issued_at.isdigit():
            raise Unauthenticated(
                "The gateway's token time is not a number.",
                reason="UNTRUSTED_IDENTITY",
                metadata={"cause": "identity_headers"},
            )
        moment = datetime.fromtimestamp(int(issued_at), UTC)
        # Envoy's jwt_authn checks signature, issuer, audience and expiry, but not `iat`, nor
        # whether the session was revoked since: both are checked here, as for a direct call.
        if moment.timestamp() > self._clock().timestamp() + self._max_clock_skew_s:
            return Identity(
                credential_error=invalid_token(
                    "The token claims to be issued in the future.", "issued_in_future"
                )
            )
        if self._revocations is not None and await self._revocations.is_revoked(
            identity.session_id, identity.user_id, moment
        ):
            return Identity(
                credential_error=Unauthenticated(
                    "This session has been signed out; sign in again.", reason="SESSION_REVOKED"
                )
            )
        return identity


def encode_roles_header(roles: Iterable[str]) -> str:
    """The identity header's roles: base64 of their JSON array, which is how Envoy's jwt_authn
    copies the token's `roles` claim, so every credential yields the same format."""
    return base64.b64encode(json.dumps(list(roles), separators=(",", ":")).encode()).decode()


def decode_roles_header(value: str) -> frozenset[str]:
    """Roles from `encode_roles_header`'s format; anything else is a gateway fault, refused loudly."""
    if not value:
        return frozenset()
    try:
        roles = json.loads(base64.b64decode(value, validate=True))
    except (ValueError, binascii.Error) as error:
        raise Unauthenticated(
            "The gateway's roles header is not base64 JSON.",
            reason="UNTRUSTED_IDENTITY",
            metadata={"cause": "identity_headers"},
        ) from error
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise Unauthenticated(
            "The gateway's roles header is not a list of names.",
            reason="UNTRUSTED_IDENTITY",
            metadata={"cause": "identity_headers"},
        )
    return frozenset(roles)
