"""Identity resolution: gateway headers, direct-call JWTs and every way a credential can be wrong."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.common.errors import PermissionDenied, Unauthenticated
from services.common.identity import (
    ANONYMOUS,
    IdentityResolver,
    JwksTokenVerifier,
    NoTokenVerifier,
)

ISSUER = "parley-test"
AUDIENCE = "parley-api"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@pytest.fixture(scope="module")
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def verifier(signing_key: Ed25519PrivateKey) -> JwksTokenVerifier:
    public = signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    jwks = {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": _b64(public), "kid": "k1", "alg": "EdDSA"}]}
    return JwksTokenVerifier(jwks, issuer=ISSUER, audience=AUDIENCE)


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "user-1",
        "sid": "session-1",
        "plan": "pro",
        "roles": ["user", "admin"],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "jti": "j1",
    }
    claims.update(overrides)
    return claims


def _token(key: Ed25519PrivateKey, claims: dict[str, Any], kid: str = "k1") -> str:
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})


def _reason(error: pytest.ExceptionInfo[Unauthenticated]) -> str:
    """The stable reason, plus the cause for TOKEN_INVALID, e.g. 'TOKEN_INVALID/algorithm'."""
    cause = error.value.metadata.get("cause")
    return f"{error.value.reason}/{cause}" if cause else error.value.reason


def test_valid_token_gives_its_identity(verifier: JwksTokenVerifier, signing_key: Ed25519PrivateKey) -> None:
    identity = verifier.verify(_token(signing_key, _claims()))
    assert identity.user_id == "user-1"
    assert identity.session_id == "session-1"
    assert identity.plan == "pro"
    assert identity.roles == frozenset({"user", "admin"})
    assert identity.auth_method == "jwt"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        (_claims(exp=int(time.time()) - 10), "TOKEN_EXPIRED"),
        (_claims(iss="someone-else"), "TOKEN_INVALID/signature_or_claims"),
        (_claims(aud="other-api"), "TOKEN_INVALID/signature_or_claims"),
    ],
)
def test_wrong_claims_are_refused(
    verifier: JwksTokenVerifier, signing_key: Ed25519PrivateKey, claims: dict[str, Any], reason: str
) -> None:
    with pytest.raises(Unauthenticated) as error:
        verifier.verify(_token(signing_key, claims))
    assert _reason(error) == reason


def test_unknown_kid_is_refused(verifier: JwksTokenVerifier, signing_key: Ed25519PrivateKey) -> None:
    with pytest.raises(Unauthenticated) as error:
        verifier.verify(_token(signing_key, _claims(), kid="k-unknown"))
    assert _reason(error) == "TOKEN_INVALID/unknown_kid"


def test_other_key_signature_is_refused(verifier: JwksTokenVerifier) -> None:
    with pytest.raises(Unauthenticated) as error:
        verifier.verify(_token(Ed25519PrivateKey.generate(), _claims()))
    assert _reason(error) == "TOKEN_INVALID/signature_or_claims"


def test_alg_none_is_refused(verifier: JwksTokenVerifier) -> None:
    header = _b64(json.dumps({"alg": "none", "kid": "k1", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims()).encode())
    with pytest.raises(Unauthenticated) as error:
        verifier.verify(f"{header}.{payload}.")
    assert _reason(error) == "TOKEN_INVALID/algorithm"


def test_hmac_confusion_is_refused(verifier: JwksTokenVerifier, signing_key: Ed25519PrivateKey) -> None:
    # The classic confusion attack: sign HS256 with the public key bytes as the shared secret.
    public = signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    header = _b64(json.dumps({"alg": "HS256", "kid": "k1", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims()).encode())
    signature = _b64(hmac.new(public, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    with pytest.raises(Unauthenticated) as error:
        verifier.verify(f"{header}.{payload}.{signature}")
    assert _reason(error) == "TOKEN_INVALID/algorithm"


def test_garbage_token_is_malformed(verifier: JwksTokenVerifier) -> None:
    with pytest.raises(Unauthenticated) as error:
        verifier.verify("not-a-jwt")
    assert _reason(error) == "TOKEN_INVALID/malformed"


def test_gateway_headers_need_the_gateway_secret() -> None:
    resolver = IdentityResolver(gateway_secret="s3cret", token_verifier=NoTokenVerifier())
    identity = resolver.resolve(
        {
            "x-parley-gateway-secret": "s3cret",
            "x-parley-user-id": "u1",
            "x-parley-roles": "user,admin",
            "x-parley-plan": "team",
            "x-parley-auth-method": "api_key",
        }
    )
    assert identity.user_id == "u1"
    assert identity.roles == frozenset({"user", "admin"})
    assert identity.auth_method == "api_key"

    with pytest.raises(Unauthenticated) as wrong_secret:
        resolver.resolve({"x-parley-gateway-secret": "guess", "x-parley-user-id": "u1"})
    assert _reason(wrong_secret) == "UNTRUSTED_IDENTITY/gateway_secret"

    with pytest.raises(Unauthenticated) as spoofed:
        resolver.resolve({"x-parley-user-id": "u1"})
    assert _reason(spoofed) == "UNTRUSTED_IDENTITY/identity_headers"


def test_no_credentials_is_anonymous_and_bearer_without_jwks_is_refused() -> None:
    resolver = IdentityResolver(gateway_secret=None, token_verifier=NoTokenVerifier())
    assert resolver.resolve({}) is ANONYMOUS
    with pytest.raises(Unauthenticated) as error:
        resolver.resolve({"authorization": "Bearer abc"})
    assert _reason(error) == "TOKEN_INVALID/no_verification_keys"
    with pytest.raises(Unauthenticated) as basic:
        resolver.resolve({"authorization": "Basic abc"})
    assert _reason(basic) == "TOKEN_INVALID/malformed"


def test_role_requirements() -> None:
    with pytest.raises(Unauthenticated):
        ANONYMOUS.require_user()
    resolver = IdentityResolver(gateway_secret="s", token_verifier=NoTokenVerifier())
    user = resolver.resolve(
        {"x-parley-gateway-secret": "s", "x-parley-user-id": "u", "x-parley-roles": "user"}
    )
    with pytest.raises(PermissionDenied) as error:
        user.require_role("admin")
    assert error.value.reason == "PERMISSION_DENIED"
