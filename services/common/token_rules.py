"""The one rule set for access tokens, and the functions that apply it.

Every place that accepts an access JWT applies these rules through this module: the services' own
check of a bearer token or access cookie (`services.common.identity`'s verifiers, which the auth
service's `CheckSession` uses too), the gateway edge's ext_authz fallback (the same verifier), and
the services' check of an identity the gateway vouches for (`apply_to_vouched_claims`, on the claims
the gateway forwards). Envoy's `jwt_authn` is rendered from the same values (`gateway/render.py`:
issuer, audience, `max_lifetime`, `clock_skew_seconds`); what Envoy cannot check (that `iat` and
`nbf` are present, `exp - iat`, an `iat` in the future, an empty `sub`, revocation) the services
check on the claims it forwards.

The rules, in the order they are checked (each failure has its own reason and `cause`):

1. header: `alg` one of ALLOWED_ALGORITHMS (asymmetric only: a verifier that accepted HS* could be
   fed a token signed with the public key), and a `kid`;
2. (the verifier: a known key for that kid, of that algorithm, and a valid signature;)
3. `exp`, `iat`, `nbf`, `sub`, `iss` and `aud` present; `iss` and `aud` the deployment's;
4. `exp`, `iat` and `nbf` whole seconds; `sub` a non-empty string; `sid` and `plan` strings and
   `roles` a list of strings, when present;
5. `exp` in the future (no grace: TOKEN_EXPIRED); `iat` and `nbf` no more than CLOCK_SKEW_S in the
   future; `exp - iat` at most MAX_LIFETIME_S;
6. not revoked: the session (`sid`) and the user's cutoff (`iat` before it) are looked up whenever
   the token got this far, and every token that gets this far has its `iat`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from services.common.credentials import invalid_token
from services.common.errors import Unauthenticated

if TYPE_CHECKING:
    from services.common.revocation import RevocationList
    from services.common.settings import Settings

ALLOWED_ALGORITHMS: Final = ("EdDSA", "ES256", "RS256")
# The longest an access token may live, `exp - iat`; the issuer's TTL setting may not exceed it.
MAX_LIFETIME_S: Final = 24 * 3600
# How far a token's `iat` and `nbf` may lie in the future: clocks of different hosts drift a little.
# Envoy applies the same value to `exp` as well; the services then refuse what it let through late.
CLOCK_SKEW_S: Final = 60
# The claims the deployment pins, unless PARLEY_JWT_ISSUER / PARLEY_JWT_AUDIENCE say otherwise.
DEFAULT_ISSUER: Final = "parley"
DEFAULT_AUDIENCE: Final = "parley-api"

# What the gateway forwards of a token it verified (iss and aud it checked itself).
VOUCHED_CLAIMS: Final = ("exp", "iat", "nbf", "sub")
REQUIRED_CLAIMS: Final = (*VOUCHED_CLAIMS, "iss", "aud")
TIME_CLAIMS: Final = ("exp", "iat", "nbf")


@dataclass(frozen=True)
class AcceptedToken:
    """The claims of a token that passed every rule."""

    subject: str
    session_id: str
    plan: str
    roles: frozenset[str]
    issued_at: int
    not_before: int
    expires_at: int


@dataclass(frozen=True)
class TokenRules:
    """The rule set with the deployment's pinned issuer and audience; the rest are this module's constants."""

    issuer: str
    audience: str

    @classmethod
    def of(cls, settings: Settings) -> TokenRules:
        """The rules of a deployment: PARLEY_JWT_ISSUER and PARLEY_JWT_AUDIENCE."""
        return cls(issuer=settings.jwt_issuer, audience=settings.jwt_audience)

    def check_header(self, header: Mapping[str, Any]) -> str:
        """The `kid` of a header whose algorithm is accepted; refuses any other header."""
        if header.get("alg") not in ALLOWED_ALGORITHMS:
            raise invalid_token("The token's algorithm is not accepted.", "algorithm")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise invalid_token("The token does not name its signing key.", "missing_kid")
        return kid

    def check_claims(self, claims: Mapping[str, Any], *, now: datetime) -> AcceptedToken:
        """The claims of a signature-checked token, if every claim rule holds at `now`."""
        _require(claims, REQUIRED_CLAIMS)
        if claims["iss"] != self.issuer:
            raise invalid_token("The token was issued by someone else.", "issuer")
        audience = claims["aud"]
        audiences = audience if isinstance(audience, list) else [audience]
        if self.audience not in audiences or not all(isinstance(item, str) for item in audiences):
            raise invalid_token("The token is meant for another audience.", "audience")
        return _checked_times_and_subject(claims, now)

    async def apply(
        self,
        header: Mapping[str, Any],
        claims: Mapping[str, Any],
        *,
        now: datetime,
        revocations: RevocationList | None,
    ) -> AcceptedToken:
        """Every rule, on the header and claims of a token whose signature the caller has checked."""
        self.check_header(header)
        accepted = self.check_claims(claims, now=now)
        await refuse_if_revoked(accepted, revocations)
        return accepted


async def apply_to_vouched_claims(
    claims: Mapping[str, Any], *, now: datetime, revocations: RevocationList | None
) -> AcceptedToken:
    """The rules for a token the gateway verified and forwarded as claims (VOUCHED_CLAIMS, `sid`):
    the gateway checked the header, the signature, `iss` and `aud`; everything else is checked here,
    exactly as for a token verified in full."""
    _require(claims, VOUCHED_CLAIMS)
    accepted = _checked_times_and_subject(claims, now)
    await refuse_if_revoked(accepted, revocations)
    return accepted


async def refuse_if_revoked(token: AcceptedToken, revocations: RevocationList | None) -> None:
    """SESSION_REVOKED if the token's session, or its user's tokens issued before its `iat`, are revoked."""
    if revocations is None:
        return
    issued_at = datetime.fromtimestamp(token.issued_at, UTC)
    if await revocations.is_revoked(token.session_id, token.subject, issued_at):
        raise Unauthenticated("This session has been signed out; sign in again.", reason="SESSION_REVOKED")


def _require(claims: Mapping[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if name not in claims:
            raise invalid_token(f"The token lacks the {name!r} claim.", "missing_claim", claim=name)


def _whole_seconds(claims: Mapping[str, Any], name: str) -> int:
    value = claims[name]
    # bool is an int to Python, not to JSON.
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_token(
            f"The token's {name!r} claim is not a time in whole seconds.", "claims", claim=name
        )
    return value


def _optional_text(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name, "")
    if not isinstance(value, str):
        raise invalid_token(f"The token's {name!r} claim is not a string.", "claims", claim=name)
    return value


def _checked_times_and_subject(claims: Mapping[str, Any], now: datetime) -> AcceptedToken:
    expires_at, issued_at, not_before = (_whole_seconds(claims, name) for name in TIME_CLAIMS)
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject:
        raise invalid_token("The token's subject is empty.", "claims", claim="sub")
    session_id, plan = _optional_text(claims, "sid"), _optional_text(claims, "plan")
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise invalid_token("The token's roles are not a list of names.", "claims", claim="roles")
    moment = now.timestamp()
    if expires_at <= moment:
        raise Unauthenticated("The token has expired.", reason="TOKEN_EXPIRED")
    if issued_at > moment + CLOCK_SKEW_S:
        raise invalid_token("The token claims to be issued in the future.", "issued_in_future")
    if not_before > moment + CLOCK_SKEW_S:
        raise invalid_token("The token is not valid yet.", "not_yet_valid")
    if expires_at - issued_at > MAX_LIFETIME_S:
        raise invalid_token(
            f"The token lives longer than the {MAX_LIFETIME_S // 3600} hours a token may.", "lifetime"
        )
    return AcceptedToken(
        subject=subject,
        session_id=session_id,
        plan=plan,
        roles=frozenset(roles),
        issued_at=issued_at,
        not_before=not_before,
        expires_at=expires_at,
    )
