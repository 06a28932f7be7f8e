"""The token rule set (`services.common.token_rules`) on decoded headers and claims, with an injected
time: every rule, its boundaries, and the same verdict whether a verifier checks a whole token
(`TokenRules.apply`) or a service checks the claims the gateway forwards (`apply_to_vouched_claims`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.common.errors import Unauthenticated
from services.common.revocation import InMemoryRevocationList
from services.common.settings import SettingsError, load_settings
from services.common.token_rules import (
    CLOCK_SKEW_S,
    MAX_LIFETIME_S,
    VOUCHED_CLAIMS,
    AcceptedToken,
    TokenRules,
    apply_to_vouched_claims,
)

RULES = TokenRules(issuer="parley-test", audience="parley-api")
NOW = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
T = int(NOW.timestamp())
HEADER = {"alg": "EdDSA", "kid": "k1", "typ": "JWT"}


def claims(**changes: Any) -> dict[str, Any]:
    """A valid token's claims at NOW, with `changes` (a None value drops the claim)."""
    base: dict[str, Any] = {
        "sub": "user-1",
        "sid": "session-1",
        "plan": "pro",
        "roles": ["user"],
        "iss": "parley-test",
        "aud": "parley-api",
        "iat": T,
        "nbf": T,
        "exp": T + 900,
        "jti": "j1",
    }
    base.update(changes)
    return {name: value for name, value in base.items() if value is not None}


def vouched(full: dict[str, Any]) -> dict[str, Any]:
    """What the gateway forwards of a token: the time claims, `sub` and `sid`."""
    return {name: value for name, value in full.items() if name in (*VOUCHED_CLAIMS, "sid")}


def verdict(error: pytest.ExceptionInfo[Unauthenticated]) -> tuple[str, dict[str, str]]:
    return error.value.reason, dict(error.value.metadata)


async def test_a_valid_token_is_accepted_with_its_claims() -> None:
    accepted = await RULES.apply(HEADER, claims(), now=NOW, revocations=InMemoryRevocationList())
    assert accepted == AcceptedToken(
        subject="user-1",
        session_id="session-1",
        plan="pro",
        roles=frozenset({"user"}),
        issued_at=T,
        not_before=T,
        expires_at=T + 900,
    )
    assert await apply_to_vouched_claims(vouched(claims()), now=NOW, revocations=None) == AcceptedToken(
        subject="user-1",
        session_id="session-1",
        plan="",
        roles=frozenset(),
        issued_at=T,
        not_before=T,
        expires_at=T + 900,
    )


INVALID = "TOKEN_INVALID"
CLAIM_RULES = [
    pytest.param({"exp": None}, INVALID, {"cause": "missing_claim", "claim": "exp"}, id="no-exp"),
    pytest.param({"iat": None}, INVALID, {"cause": "missing_claim", "claim": "iat"}, id="no-iat"),
    pytest.param({"nbf": None}, INVALID, {"cause": "missing_claim", "claim": "nbf"}, id="no-nbf"),
    pytest.param({"sub": None}, INVALID, {"cause": "missing_claim", "claim": "sub"}, id="no-sub"),
    pytest.param({"exp": "soon"}, INVALID, {"cause": "claims", "claim": "exp"}, id="exp-text"),
    pytest.param({"iat": T + 0.5}, INVALID, {"cause": "claims", "claim": "iat"}, id="iat-fraction"),
    pytest.param({"nbf": True}, INVALID, {"cause": "claims", "claim": "nbf"}, id="nbf-boolean"),
    pytest.param({"exp": T - 100}, "TOKEN_EXPIRED", {}, id="expired"),
    pytest.param({"exp": T}, "TOKEN_EXPIRED", {}, id="expiring-this-second"),
    pytest.param({"iat": T + CLOCK_SKEW_S + 1}, INVALID, {"cause": "issued_in_future"}, id="iat-ahead"),
    pytest.param({"nbf": T + CLOCK_SKEW_S + 1}, INVALID, {"cause": "not_yet_valid"}, id="nbf-ahead"),
    pytest.param({"exp": T + 48 * 3600}, INVALID, {"cause": "lifetime"}, id="48h-from-now"),
    pytest.param(
        {"iat": T - 47 * 3600, "nbf": T - 47 * 3600, "exp": T + 3600},
        INVALID,
        {"cause": "lifetime"},
        id="48h-nearly-over",
    ),
    pytest.param({"exp": T + MAX_LIFETIME_S + 1}, INVALID, {"cause": "lifetime"}, id="one-second-over"),
    pytest.param({"sub": ""}, INVALID, {"cause": "claims", "claim": "sub"}, id="empty-sub"),
    pytest.param({"sub": 42}, INVALID, {"cause": "claims", "claim": "sub"}, id="sub-a-number"),
    pytest.param({"sid": ["s"]}, INVALID, {"cause": "claims", "claim": "sid"}, id="sid-a-list"),
]


@pytest.mark.parametrize(("changes", "reason", "metadata"), CLAIM_RULES)
async def test_each_claim_rule_gives_the_same_verdict_on_a_whole_token_and_on_vouched_claims(
    changes: dict[str, Any], reason: str, metadata: dict[str, str]
) -> None:
    with pytest.raises(Unauthenticated) as whole:
        await RULES.apply(HEADER, claims(**changes), now=NOW, revocations=None)
    with pytest.raises(Unauthenticated) as forwarded:
        await apply_to_vouched_claims(vouched(claims(**changes)), now=NOW, revocations=None)
    assert verdict(whole) == verdict(forwarded) == (reason, metadata)


@pytest.mark.parametrize(
    ("changes", "metadata"),
    [
        pytest.param({"iss": None}, {"cause": "missing_claim", "claim": "iss"}, id="no-iss"),
        pytest.param({"aud": None}, {"cause": "missing_claim", "claim": "aud"}, id="no-aud"),
        pytest.param({"iss": "https://evil.example"}, {"cause": "issuer"}, id="wrong-iss"),
        pytest.param({"aud": "another-api"}, {"cause": "audience"}, id="wrong-aud"),
        pytest.param({"aud": ["another-api"]}, {"cause": "audience"}, id="wrong-aud-list"),
        pytest.param({"aud": 7}, {"cause": "audience"}, id="aud-a-number"),
        pytest.param({"roles": "admin"}, {"cause": "claims", "claim": "roles"}, id="roles-a-string"),
        pytest.param({"plan": 3}, {"cause": "claims", "claim": "plan"}, id="plan-a-number"),
    ],
)
def test_issuer_audience_and_the_identity_claims_are_checked_on_a_whole_token(
    changes: dict[str, Any], metadata: dict[str, str]
) -> None:
    with pytest.raises(Unauthenticated) as refused:
        RULES.check_claims(claims(**changes), now=NOW)
    assert verdict(refused) == ("TOKEN_INVALID", metadata)


def test_an_audience_list_naming_ours_is_accepted() -> None:
    assert RULES.check_claims(claims(aud=["billing", "parley-api"]), now=NOW).subject == "user-1"


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"exp": T + 1}, id="expiring-next-second"),
        pytest.param({"iat": T + CLOCK_SKEW_S, "exp": T + CLOCK_SKEW_S + 900}, id="iat-at-the-skew"),
        pytest.param({"nbf": T + CLOCK_SKEW_S}, id="nbf-at-the-skew"),
        pytest.param({"exp": T + MAX_LIFETIME_S}, id="exactly-the-cap"),
        pytest.param({"sid": None, "plan": None, "roles": None, "jti": None}, id="only-the-required-claims"),
    ],
)
def test_the_boundaries_of_the_rules_are_accepted(changes: dict[str, Any]) -> None:
    assert RULES.check_claims(claims(**changes), now=NOW).subject == "user-1"


@pytest.mark.parametrize(
    ("header", "cause"),
    [
        pytest.param({"alg": "none", "kid": "k1"}, "algorithm", id="alg-none"),
        pytest.param({"alg": "HS256", "kid": "k1"}, "algorithm", id="hs256"),
        pytest.param({"kid": "k1"}, "algorithm", id="no-alg"),
        pytest.param({"alg": "EdDSA"}, "missing_kid", id="no-kid"),
        pytest.param({"alg": "EdDSA", "kid": ""}, "missing_kid", id="empty-kid"),
        pytest.param({"alg": "EdDSA", "kid": 7}, "missing_kid", id="kid-a-number"),
    ],
)
async def test_only_asymmetric_algorithms_and_named_keys_pass_the_header_rule(
    header: dict[str, Any], cause: str
) -> None:
    with pytest.raises(Unauthenticated) as refused:
        await RULES.apply(header, claims(), now=NOW, revocations=None)
    assert verdict(refused) == ("TOKEN_INVALID", {"cause": cause})
    assert RULES.check_header({"alg": "ES256", "kid": "k2"}) == "k2"


async def test_revocation_is_checked_by_session_and_by_the_users_cutoff() -> None:
    revocations = InMemoryRevocationList(clock=lambda: NOW)
    until = NOW + timedelta(minutes=15)
    await revocations.revoke_session("session-1", until)

    for check in (
        RULES.apply(HEADER, claims(), now=NOW, revocations=revocations),
        apply_to_vouched_claims(vouched(claims()), now=NOW, revocations=revocations),
    ):
        with pytest.raises(Unauthenticated) as revoked:
            await check
        assert verdict(revoked) == ("SESSION_REVOKED", {})

    await revocations.revoke_user_tokens_before("user-1", NOW + timedelta(seconds=1), until)
    # A token without a session is still checked against its user's cutoff.
    for changes in ({"sid": "session-2"}, {"sid": None}):
        with pytest.raises(Unauthenticated) as cut_off:
            await apply_to_vouched_claims(vouched(claims(**changes)), now=NOW, revocations=revocations)
        assert verdict(cut_off) == ("SESSION_REVOKED", {})
    later = claims(sid="session-3", iat=T + 2, nbf=T + 2, exp=T + 902)
    assert (await RULES.apply(HEADER, later, now=NOW, revocations=revocations)).issued_at == T + 2


def test_the_access_token_lifetime_setting_cannot_exceed_the_cap() -> None:
    assert load_settings(access_token_ttl_s=MAX_LIFETIME_S).access_token_ttl_s == MAX_LIFETIME_S
    with pytest.raises(SettingsError, match="PARLEY_ACCESS_TOKEN_TTL_S"):
        load_settings(access_token_ttl_s=MAX_LIFETIME_S + 1)


def test_the_rules_of_a_deployment_come_from_its_settings() -> None:
    settings = load_settings(jwt_issuer="https://id.example", jwt_audience="api.example")
    assert TokenRules.of(settings) == TokenRules(issuer="https://id.example", audience="api.example")
