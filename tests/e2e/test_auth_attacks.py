"""Every attack on auth that issue 3 names, end to end: a plain HTTP client against a real `parley up`,
through the real Envoy gateway, each refusal checked for its exact status, code, reason and cause.

- forged, tampered and foreign access tokens;
- refresh-token reuse (theft) and the concurrent-refresh race;
- brute force: account backoff, client-IP throttling, no account enumeration (replies and timing);
- CSRF on cookie sessions;
- a disabled user's access token, refresh token, password and API key;
- a non-admin (or nobody) calling the admin RPCs;
- password-policy violations on register, reset and change;
- identity headers spoofed through the gateway and straight to the gRPC port.

Sign-in throttling counts failures per client IP, and every test runs on this one machine. Tests that
fail logins therefore connect from their own loopback address (127.0.0.x, x > 1): Envoy sees that
address as the peer and appends it to X-Forwarded-For, so each test has its own client-IP counter.
(For a peer of exactly 127.0.0.1 Envoy appends the host's own address instead.)

The deployment under test is given its token-signing key as a file (`PARLEY_AUTH_SIGNING_KEY_FILE`),
as an operator would from a k8s Secret. The test holds that key too, so besides the forgeries any
outsider can make, it can build tokens whose signature is right and exactly one claim is wrong.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import secrets
import statistics
import string
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from parley.events.v1 import events_pb2
from services.common.events import payload_of
from tests.support.outbox import emailed_token, read_events
from tests.support.parley_process import PARLEY, REPO_ROOT, EmbeddedPorts, ParleyProcess
from tests.support.pki import ServicePki, embedded_pki

pytestmark = pytest.mark.envoy

PASSWORD = "violet-harbour-lantern-42"
OTHER_PASSWORD = "copper-meadow-falcon-77"
WRONG_PASSWORD = "quartz-orchard-ember-19"

# One loopback source address per test that fails logins (see the module docstring).
ENUMERATION_IP = "127.0.0.21"
LOCKOUT_IP = "127.0.0.22"
SPRAY_IP = "127.0.0.23"
SPRAY_OTHER_IP = "127.0.0.24"
TIMING_IP = "127.0.0.25"
REUSE_IP = "127.0.0.26"
DISABLED_IP = "127.0.0.27"

# Failed sign-ins allowed before backoff (services/auth/throttle.py defaults).
ACCOUNT_FREE_FAILURES = 3
CLIENT_IP_FREE_FAILURES = 20

GRPC_UNAUTHENTICATED = 16
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_INVALID_ARGUMENT = 3


# ---- the deployments -----------------------------------------------------------------------------


@dataclass
class Deployment:
    """One running `parley up`: where it listens and where it keeps its data."""

    process: ParleyProcess
    ports: EmbeddedPorts
    data_dir: Path
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def database(self) -> Path:
        return self.data_dir / "parley.db"

    @property
    def pki(self) -> ServicePki:
        """The certificates `parley up` made: its edge's (which asks auth about keys), the operator's."""
        return embedded_pki(self.data_dir)

    def client(self, source_ip: str = "127.0.0.1") -> httpx.Client:
        """An HTTP client of the gateway whose connections come from `source_ip` (any 127.0.0.0/8)."""
        return httpx.Client(
            base_url=self.url, timeout=15.0, transport=httpx.HTTPTransport(local_address=source_ip)
        )


@contextmanager
def running_parley(data_dir: Path, env: Mapping[str, str] | None = None) -> Iterator[Deployment]:
    ports = EmbeddedPorts()
    full_env = {**ports.env(), "PARLEY_DATA_DIR": str(data_dir), **(env or {})}
    process = ParleyProcess(["up"], env=full_env, log_path=data_dir / "parley.log")
    process.start()
    try:
        process.wait_until_http_ok(f"http://127.0.0.1:{ports.http}/healthz")
        yield Deployment(process, ports, data_dir, full_env)
    finally:
        process.terminate()


@dataclass(frozen=True)
class Operated:
    """The deployment under test and the token-signing key its operator gave it."""

    deployment: Deployment
    signing_key: Ed25519PrivateKey


@pytest.fixture(scope="module")
def operated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operated]:
    secrets_dir = tmp_path_factory.mktemp("operator-secrets")
    signing_key = Ed25519PrivateKey.generate()
    key_file = secrets_dir / "signing-key.pem"
    key_file.write_bytes(signing_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    key_file.chmod(0o600)
    data_dir = tmp_path_factory.mktemp("parley-under-attack")
    with running_parley(data_dir, {"PARLEY_AUTH_SIGNING_KEY_FILE": str(key_file)}) as deployment:
        yield Operated(deployment, signing_key)


@pytest.fixture(scope="module")
def parley(operated: Operated) -> Deployment:
    return operated.deployment


@pytest.fixture(scope="module")
def other_parley(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A second, unrelated deployment: its own data dir, so its own generated signing key."""
    with running_parley(tmp_path_factory.mktemp("other-parley")) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def gateway(parley: Deployment) -> Iterator[httpx.Client]:
    with parley.client() as client:
        yield client


# ---- accounts ------------------------------------------------------------------------------------


def unique_email(tag: str) -> str:
    """A fresh address; the random part is letters only, so no password here can contain it."""
    suffix = "".join(secrets.choice(string.ascii_lowercase) for _ in range(12))
    return f"{tag}.{suffix}@example.com"


def register(client: httpx.Client, email: str, password: str = PASSWORD, name: str = "Mallory") -> str:
    response = client.post(
        "/v1/auth/register", json={"email": email, "password": password, "display_name": name}
    )
    assert response.status_code == 200, response.text
    user_id: str = response.json()["user"]["id"]
    return user_id


@dataclass(frozen=True)
class SignedIn:
    user_id: str
    session_id: str
    access_token: str
    refresh_token: str

    @property
    def bearer(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.access_token}"}


def login(client: httpx.Client, email: str, password: str = PASSWORD) -> SignedIn:
    response = client.post("/v1/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    body = response.json()
    return SignedIn(
        user_id=body["user"]["id"],
        session_id=body["session"]["id"],
        access_token=body["tokens"]["access_token"],
        refresh_token=body["tokens"]["refresh_token"],
    )


def new_user(client: httpx.Client, tag: str) -> tuple[str, SignedIn]:
    email = unique_email(tag)
    register(client, email)
    return email, login(client, email)


@pytest.fixture(scope="module")
def admin(parley: Deployment, gateway: httpx.Client) -> SignedIn:
    """The first admin, bootstrapped with `parley admin create-admin` as an operator would."""
    email = unique_email("admin")
    created = subprocess.run(
        [str(PARLEY), "admin", "create-admin", "--email", email, "--display-name", "Root"],
        env={**os.environ, **parley.env, "PARLEY_ADMIN_PASSWORD": PASSWORD},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    return login(gateway, email)


# ---- replies -------------------------------------------------------------------------------------


def detail(body: Mapping[str, Any], type_name: str) -> dict[str, Any]:
    found = [d for d in body["details"] if d["@type"] == f"type.googleapis.com/google.rpc.{type_name}"]
    assert len(found) == 1, body
    return dict(found[0])


def refused(
    response: httpx.Response,
    *,
    status: int,
    code: int,
    reason: str,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Check an error reply (status, JSON code, ErrorInfo reason, and, when given, its exact
    metadata); returns the body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    assert body["message"], body
    info = detail(body, "ErrorInfo")
    assert (info["reason"], info["domain"]) == (reason, "parley.dev"), body
    if metadata is not None:
        assert info.get("metadata", {}) == dict(metadata), body
    return body


def token_refused(
    response: httpx.Response, reason: str = "TOKEN_INVALID", metadata: Mapping[str, str] | None = None
) -> dict[str, Any]:
    return refused(response, status=401, code=GRPC_UNAUTHENTICATED, reason=reason, metadata=metadata)


def client_visible(body: Mapping[str, Any]) -> tuple[object, ...]:
    """Everything of an error reply but its per-request id, for comparing two replies."""
    details = [d for d in body["details"] if not d["@type"].endswith("google.rpc.RequestInfo")]
    return body["code"], body["message"], json.dumps(details, sort_keys=True)


def field_violations(body: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(v["field"], v["reason"]) for v in detail(body, "BadRequest")["field_violations"]]


@dataclass(frozen=True)
class GrpcRefusal:
    code: grpc.StatusCode
    reason: str
    metadata: dict[str, str]


def grpc_refusal(call: Callable[[], object]) -> GrpcRefusal:
    """The error a gRPC call ends with, read from its google.rpc.Status trailer."""
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error: Any = raised.value
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert isinstance(raw, bytes), f"no rich status on {error.code()}: {error.details()}"
    status = status_pb2.Status.FromString(raw)
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, status
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.domain == "parley.dev"
    return GrpcRefusal(error.code(), info.reason, dict(info.metadata))


# ---- the outbox ----------------------------------------------------------------------------------


def payloads(database: Path, event_type: str, subject: str) -> list[Message]:
    """The payloads of the outbox events of `event_type` about `subject`, oldest first."""
    return [payload_of(event) for event in read_events(database, event_type, subject=subject)]


def event_count(database: Path) -> int:
    """Auth's events in the outbox. Other services' consumers write theirs on their own schedule (billing
    starting the subscriptions of users signed up earlier), so only auth's say what a refused call did."""
    return len([event for event in read_events(database) if event.source == "auth"])


# ---- 1. forged tokens ----------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: Mapping[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwk_thumbprint(key: Ed25519PrivateKey) -> str:
    """RFC 7638 thumbprint of the public key: the kid Parley gives it."""
    x = b64url(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


@dataclass(frozen=True)
class ForgeKit:
    """A real access token and what an attacker (or, for `operator_signed`, the key holder) builds
    from it."""

    token: str
    operator_key: Ed25519PrivateKey
    other_user_id: str

    @property
    def segments(self) -> list[str]:
        return self.token.split(".")

    @property
    def header(self) -> dict[str, Any]:
        header: dict[str, Any] = json.loads(unb64url(self.segments[0]))
        return header

    @property
    def claims(self) -> dict[str, Any]:
        claims: dict[str, Any] = json.loads(unb64url(self.segments[1]))
        return claims

    @property
    def kid(self) -> str:
        return str(self.header["kid"])

    @staticmethod
    def _changed(original: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
        # A change to None drops the field.
        merged = {**original, **changes}
        return {name: value for name, value in merged.items() if value is not None}

    def tampered_claims(self, **changes: Any) -> str:
        """The real header and signature over edited claims."""
        header, _, signature = self.segments
        return f"{header}.{b64url_json(self._changed(self.claims, changes))}.{signature}"

    def tampered_header(self, **changes: Any) -> str:
        """An edited header over the real claims and signature."""
        _, claims, signature = self.segments
        return f"{b64url_json(self._changed(self.header, changes))}.{claims}.{signature}"

    def with_signature(self, signature: bytes) -> str:
        header, claims, _ = self.segments
        return f"{header}.{claims}.{b64url(signature)}"

    def unsigned(self, header: Mapping[str, Any]) -> str:
        return f"{b64url_json(header)}.{b64url_json(self.claims)}."

    def hs256(self, secret: bytes) -> str:
        """Algorithm confusion: HMAC-SHA256 keyed with public key material, under the real kid."""
        signing_input = f"{b64url_json({**self.header, 'alg': 'HS256'})}.{b64url_json(self.claims)}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64url(mac)}"

    def signed(
        self, key: Ed25519PrivateKey, *, header: Mapping[str, Any] | None = None, **changes: Any
    ) -> str:
        signing_input = (
            f"{b64url_json(self._changed(self.header, header or {}))}."
            f"{b64url_json(self._changed(self.claims, changes))}"
        )
        return f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"

    def operator_signed(self, **changes: Any) -> str:
        """A correctly signed token (the deployment's own key) with the given claim changes."""
        return self.signed(self.operator_key, **changes)

    @property
    def public_key_raw(self) -> bytes:
        return self.operator_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def public_key_pem(self) -> bytes:
        return self.operator_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def forge(operated: Operated, gateway: httpx.Client) -> ForgeKit:
    _, victim = new_user(gateway, "victim")
    _, other = new_user(gateway, "bystander")
    return ForgeKit(victim.access_token, operated.signing_key, other.user_id)


def _flipped_signature(kit: ForgeKit) -> str:
    signature = bytearray(unb64url(kit.segments[2]))
    signature[len(signature) // 2] ^= 0x01
    return kit.with_signature(bytes(signature))


Forgery = Callable[[ForgeKit], str]
NOW = int(time.time())

FORGERIES = [
    # Unsigned tokens, whatever spelling of "none".
    pytest.param(
        lambda k: k.unsigned({"alg": "none", "typ": "JWT", "kid": k.kid}), "algorithm", id="alg-none"
    ),
    pytest.param(lambda k: k.unsigned({"alg": "None", "kid": k.kid}), "algorithm", id="alg-None"),
    pytest.param(lambda k: k.unsigned({"alg": "NONE"}), "algorithm", id="alg-NONE-without-kid"),
    # Algorithm confusion: HS256 keyed with the public key, as published or as PEM.
    pytest.param(lambda k: k.hs256(k.public_key_raw), "algorithm", id="hs256-keyed-with-public-key-bytes"),
    pytest.param(lambda k: k.hs256(k.public_key_pem), "algorithm", id="hs256-keyed-with-public-key-pem"),
    pytest.param(
        lambda k: k.hs256(b64url(k.public_key_raw).encode()), "algorithm", id="hs256-keyed-with-jwk-x"
    ),
    # The real token with its header's algorithm swapped for another accepted asymmetric one.
    pytest.param(lambda k: k.tampered_header(alg="RS256"), "algorithm", id="rs256-header-on-ed25519-kid"),
    pytest.param(lambda k: k.tampered_header(alg="ES256"), "algorithm", id="es256-header-on-ed25519-kid"),
    pytest.param(lambda k: k.tampered_header(kid=None), "missing_kid", id="kid-removed"),
    pytest.param(lambda k: k.tampered_header(kid="no-such-key"), "unknown_kid", id="unknown-kid"),
    pytest.param(
        lambda k: k.signed(Ed25519PrivateKey.generate(), header={"kid": "attacker-key"}),
        "unknown_kid",
        id="attacker-key-under-its-own-kid",
    ),
    # Tampering: any change to the signed header or claims, or to the signature.
    pytest.param(lambda k: k.tampered_header(typ="at+jwt"), "signature", id="header-edited"),
    pytest.param(lambda k: k.tampered_claims(sub=k.other_user_id), "signature", id="sub-swapped"),
    pytest.param(lambda k: k.tampered_claims(roles=["user", "admin"]), "signature", id="admin-role-added"),
    pytest.param(lambda k: k.tampered_claims(plan="team"), "signature", id="plan-upgraded"),
    pytest.param(lambda k: k.tampered_claims(exp=k.claims["exp"] + 86400), "signature", id="exp-extended"),
    pytest.param(_flipped_signature, "signature", id="signature-bit-flipped"),
    pytest.param(lambda k: k.with_signature(b""), "signature", id="signature-stripped"),
    pytest.param(
        lambda k: k.signed(Ed25519PrivateKey.generate()), "signature", id="attacker-key-under-the-real-kid"
    ),
    # Not a JWT at all.
    pytest.param(lambda k: "garbage", "malformed", id="garbage"),
    pytest.param(lambda k: ".".join(k.segments[:2]), "malformed", id="two-segments"),
    pytest.param(lambda k: f"!!.{k.segments[1]}.{k.segments[2]}", "malformed", id="header-not-base64url"),
    pytest.param(lambda k: f"bm90IGpzb24.{k.segments[1]}.{k.segments[2]}", "malformed", id="header-not-json"),
]


def test_a_real_token_and_one_signed_with_the_operators_key_are_accepted(
    gateway: httpx.Client, forge: ForgeKit
) -> None:
    """The controls: the refusals below are about the forgery alone, not a broken route or key."""
    jwks = gateway.get("/.well-known/jwks.json")
    assert jwks.status_code == 200, jwks.text
    assert forge.kid == jwk_thumbprint(forge.operator_key)
    assert forge.kid in [key["kid"] for key in jwks.json()["keys"]]
    for token in (forge.token, forge.operator_signed()):
        me = gateway.get("/v1/users/me", headers={"authorization": f"Bearer {token}"})
        assert me.status_code == 200, me.text
        assert me.json()["user"]["id"] == forge.claims["sub"]


@pytest.mark.parametrize(("forgery", "cause"), FORGERIES)
def test_a_forged_access_token_is_refused(
    gateway: httpx.Client, forge: ForgeKit, forgery: Forgery, cause: str
) -> None:
    response = gateway.get("/v1/users/me", headers={"authorization": f"Bearer {forgery(forge)}"})
    token_refused(response, metadata={"cause": cause})


@pytest.mark.parametrize(
    ("claims", "reason", "metadata"),
    [
        pytest.param({"iat": NOW - 1000, "exp": NOW - 100}, "TOKEN_EXPIRED", {}, id="expired"),
        pytest.param({"iss": "https://evil.example"}, "TOKEN_INVALID", {"cause": "issuer"}, id="wrong-iss"),
        pytest.param({"aud": "another-api"}, "TOKEN_INVALID", {"cause": "audience"}, id="wrong-aud"),
        pytest.param({"exp": None}, "TOKEN_INVALID", {"cause": "missing_claim", "claim": "exp"}, id="no-exp"),
        pytest.param({"aud": None}, "TOKEN_INVALID", {"cause": "missing_claim", "claim": "aud"}, id="no-aud"),
        pytest.param(
            {"iat": NOW + 3600, "exp": NOW + 4500},
            "TOKEN_INVALID",
            {"cause": "issued_in_future"},
            id="issued-in-the-future",
        ),
        pytest.param({"nbf": NOW + 3600}, "TOKEN_INVALID", {"cause": "not_yet_valid"}, id="not-yet-valid"),
        pytest.param({"sub": ""}, "TOKEN_INVALID", {"cause": "claims", "claim": "sub"}, id="empty-sub"),
    ],
)
def test_a_correctly_signed_token_with_one_wrong_claim_is_refused(
    gateway: httpx.Client, forge: ForgeKit, claims: dict[str, Any], reason: str, metadata: dict[str, str]
) -> None:
    response = gateway.get(
        "/v1/users/me", headers={"authorization": f"Bearer {forge.operator_signed(**claims)}"}
    )
    token_refused(response, reason, metadata)


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("Bearer", id="empty-bearer"),
        pytest.param("Basic bWFsbG9yeTpodW50ZXIy", id="basic-scheme"),
        pytest.param("Token abc.def.ghi", id="other-scheme"),
    ],
)
def test_a_malformed_authorization_header_is_refused(gateway: httpx.Client, authorization: str) -> None:
    response = gateway.get("/v1/users/me", headers={"authorization": authorization})
    token_refused(response, metadata={"cause": "malformed"})


def test_a_bare_token_without_a_scheme_is_refused(gateway: httpx.Client, forge: ForgeKit) -> None:
    response = gateway.get("/v1/users/me", headers={"authorization": forge.token})
    token_refused(response, metadata={"cause": "malformed"})


def test_a_forged_token_in_the_access_cookie_is_refused_too(gateway: httpx.Client, forge: ForgeKit) -> None:
    tampered = forge.tampered_claims(sub=forge.other_user_id)
    response = gateway.get("/v1/users/me", headers={"cookie": f"__Host-parley-access={tampered}"})
    token_refused(response, metadata={"cause": "signature"})
    unsigned = forge.unsigned({"alg": "none", "kid": forge.kid})
    response = gateway.get("/v1/users/me", headers={"cookie": f"__Host-parley-access={unsigned}"})
    token_refused(response, metadata={"cause": "algorithm"})


def test_a_token_from_another_parley_deployment_is_refused(
    gateway: httpx.Client, other_parley: Deployment
) -> None:
    """Same issuer and audience settings, but another deployment's own signing key."""
    with other_parley.client() as elsewhere:
        _, foreign = new_user(elsewhere, "foreigner")
        assert elsewhere.get("/v1/users/me", headers=foreign.bearer).status_code == 200
        _, local = new_user(gateway, "local")
        token_refused(gateway.get("/v1/users/me", headers=foreign.bearer), metadata={"cause": "unknown_kid"})
        token_refused(elsewhere.get("/v1/users/me", headers=local.bearer), metadata={"cause": "unknown_kid"})


# ---- 2. refresh-token reuse ----------------------------------------------------------------------


def refresh(client: httpx.Client, refresh_token: str) -> httpx.Response:
    return client.post("/v1/auth/refresh", json={"refresh_token": refresh_token})


def test_reusing_a_rotated_refresh_token_revokes_the_whole_family(parley: Deployment) -> None:
    with parley.client(REUSE_IP) as client:
        email, first = new_user(client, "reuse")
        elsewhere = login(client, email)  # another session of the same user, on another device
        rotated = refresh(client, first.refresh_token)
        assert rotated.status_code == 200, rotated.text
        second = rotated.json()["tokens"]
        assert second["refresh_token"] != first.refresh_token
        current = {"authorization": f"Bearer {second['access_token']}"}
        assert client.get("/v1/users/me", headers=current).status_code == 200

        # The thief (or the victim, after the thief) presents the spent token.
        refused(
            refresh(client, first.refresh_token),
            status=401,
            code=GRPC_UNAUTHENTICATED,
            reason="REFRESH_TOKEN_REUSED",
        )

        # Every credential of that session is dead now: both access tokens and the newest refresh token.
        token_refused(client.get("/v1/users/me", headers=current), "SESSION_REVOKED", {})
        token_refused(client.get("/v1/users/me", headers=first.bearer), "SESSION_REVOKED", {})
        refused(
            refresh(client, second["refresh_token"]),
            status=401,
            code=GRPC_UNAUTHENTICATED,
            reason="SESSION_REVOKED",
        )
        # ... and only that session: the user's other sign-in is untouched.
        assert client.get("/v1/users/me", headers=elsewhere.bearer).status_code == 200
        assert refresh(client, elsewhere.refresh_token).status_code == 200

    assert payloads(parley.database, "session.reuse_detected", first.user_id) == [
        events_pb2.SessionReuseDetected(
            user_id=first.user_id, session_id=first.session_id, ip_address=REUSE_IP
        )
    ]
    assert payloads(parley.database, "session.revoked", first.user_id) == [
        events_pb2.SessionRevoked(
            user_id=first.user_id,
            session_id=first.session_id,
            reason=events_pb2.SESSION_REVOKE_REASON_REUSE_DETECTED,
        )
    ]


def test_two_refreshes_of_one_token_at_once_let_exactly_one_win_and_revoke_the_family(
    parley: Deployment,
) -> None:
    with parley.client() as client:
        _, signed_in = new_user(client, "race")

        def attempt(_: int) -> httpx.Response:
            with parley.client() as racer:
                return refresh(racer, signed_in.refresh_token)

        with ThreadPoolExecutor(max_workers=2) as pool:
            replies = list(pool.map(attempt, range(2)))
        winners = [reply for reply in replies if reply.status_code == 200]
        losers = [reply for reply in replies if reply.status_code != 200]
        assert len(winners) == 1, [reply.text for reply in replies]
        refused(losers[0], status=401, code=GRPC_UNAUTHENTICATED, reason="REFRESH_TOKEN_REUSED")
        won = winners[0].json()["tokens"]
        refused(
            refresh(client, won["refresh_token"]),
            status=401,
            code=GRPC_UNAUTHENTICATED,
            reason="SESSION_REVOKED",
        )
        winner_access = {"authorization": f"Bearer {won['access_token']}"}
        token_refused(client.get("/v1/users/me", headers=winner_access), "SESSION_REVOKED", {})


# ---- 3. brute force: backoff, lockout, client-IP throttling, enumeration -------------------------


def attempt_login(client: httpx.Client, email: str, password: str) -> httpx.Response:
    return client.post("/v1/auth/login", json={"email": email, "password": password})


def invalid_credentials(response: httpx.Response) -> dict[str, Any]:
    return refused(response, status=401, code=GRPC_UNAUTHENTICATED, reason="INVALID_CREDENTIALS", metadata={})


def locked(response: httpx.Response, scope: str) -> dict[str, Any]:
    body = refused(response, status=429, code=GRPC_RESOURCE_EXHAUSTED, reason="ACCOUNT_LOCKED")
    metadata = detail(body, "ErrorInfo")["metadata"]
    assert metadata["scope"] == scope, body
    assert int(metadata["retry_after_s"]) >= 1, body
    assert [v["subject"] for v in detail(body, "QuotaFailure")["violations"]] == [scope], body
    return body


def test_failed_logins_back_off_and_lock_the_account_even_for_the_right_password(
    parley: Deployment,
) -> None:
    """Unknown emails are locked exactly like real ones, step for step, with identical replies."""
    with parley.client(LOCKOUT_IP) as client:
        known = unique_email("lockout")
        user_id = register(client, known)
        unknown = unique_email("lockout-nobody")

        for _ in range(ACCOUNT_FREE_FAILURES + 1):  # the free failures, then the first that backs off
            known_reply = invalid_credentials(attempt_login(client, known, WRONG_PASSWORD))
            unknown_reply = invalid_credentials(attempt_login(client, unknown, WRONG_PASSWORD))
            assert client_visible(known_reply) == client_visible(unknown_reply)

        # Locked for a second now: the right password is not even checked.
        known_locked = locked(attempt_login(client, known, PASSWORD), "account")
        unknown_locked = locked(attempt_login(client, unknown, PASSWORD), "account")
        assert client_visible(known_locked) == client_visible(unknown_locked)
        retry_after_s = int(detail(known_locked, "ErrorInfo")["metadata"]["retry_after_s"])
        assert retry_after_s == 1

        # It is a backoff step, not a verdict: once it lifts, the right password works. Real time: the
        # server is another process on the real clock, and the wait is the retry-after it announced.
        time.sleep(retry_after_s + 0.2)
        assert attempt_login(client, known, PASSWORD).status_code == 200

    failed = [
        event
        for event in payloads(parley.database, "user.login_failed", user_id)
        if isinstance(event, events_pb2.UserLoginFailed)
    ]
    assert [(event.reason, event.failed_attempts) for event in failed] == [
        *[
            (events_pb2.LOGIN_FAILURE_REASON_INVALID_CREDENTIALS, n)
            for n in range(1, ACCOUNT_FREE_FAILURES + 2)
        ],
        (events_pb2.LOGIN_FAILURE_REASON_LOCKED, ACCOUNT_FREE_FAILURES + 1),
    ]
    assert {event.ip_address for event in failed} == {LOCKOUT_IP}


def test_one_client_spraying_passwords_across_accounts_is_throttled_by_its_ip(parley: Deployment) -> None:
    with parley.client() as setup:
        real = [unique_email("spray") for _ in range(3)]
        real_ids = [register(setup, email) for email in real]
    victim = real[0]
    targets = [*real, *(unique_email("spray-nobody") for _ in range(CLIENT_IP_FREE_FAILURES - 2))]
    assert len(targets) == CLIENT_IP_FREE_FAILURES + 1
    with parley.client(SPRAY_IP) as sprayer:
        # One wrong guess per account: no account gets near its own limit, the client does.
        for email in targets:
            invalid_credentials(attempt_login(sprayer, email, WRONG_PASSWORD))
        locked(attempt_login(sprayer, victim, PASSWORD), "client_ip")
        # A forged X-Forwarded-For does not make the client someone else: Envoy appends the real peer.
        locked(
            sprayer.post(
                "/v1/auth/login",
                json={"email": victim, "password": PASSWORD},
                headers={"x-forwarded-for": "203.0.113.9"},
            ),
            "client_ip",
        )
    # The account itself is not locked: the victim, from their own address, signs in.
    with parley.client(SPRAY_OTHER_IP) as victim_client:
        assert attempt_login(victim_client, victim, PASSWORD).status_code == 200

    refused_attempts = [
        event
        for event in payloads(parley.database, "user.login_failed", real_ids[0])
        if isinstance(event, events_pb2.UserLoginFailed)
        and event.reason == events_pb2.LOGIN_FAILURE_REASON_LOCKED
    ]
    assert [event.ip_address for event in refused_attempts] == [SPRAY_IP, SPRAY_IP]


def test_login_and_forgot_password_do_not_reveal_whether_an_email_is_registered(parley: Deployment) -> None:
    with parley.client(ENUMERATION_IP) as client:
        known = unique_email("enum")
        register(client, known)
        unknown = unique_email("enum-nobody")
        wrong_password = invalid_credentials(attempt_login(client, known, WRONG_PASSWORD))
        no_account = invalid_credentials(attempt_login(client, unknown, WRONG_PASSWORD))
        assert client_visible(wrong_password) == client_visible(no_account)
        malformed = invalid_credentials(attempt_login(client, "not-an-address", WRONG_PASSWORD))
        assert client_visible(malformed) == client_visible(no_account)

        for email in (known, unknown):
            forgot = client.post("/v1/auth/forgot-password", json={"email": email})
            assert forgot.status_code == 200, forgot.text
            assert forgot.json() == {"accepted": True}


def test_unknown_emails_and_wrong_passwords_take_the_same_time(parley: Deployment) -> None:
    rounds = 6
    with parley.client(TIMING_IP) as client:
        # Each account stays within its free failures, and the client within its own.
        accounts = [unique_email("timing") for _ in range(2)]
        for email in accounts:
            register(client, email)
        invalid_credentials(attempt_login(client, unique_email("warm-up"), WRONG_PASSWORD))

        def timed(email: str) -> float:
            started = time.perf_counter()
            invalid_credentials(attempt_login(client, email, WRONG_PASSWORD))
            return time.perf_counter() - started

        unknown_times, wrong_password_times = [], []
        for round_number in range(rounds):
            unknown_times.append(timed(unique_email("timing-nobody")))
            wrong_password_times.append(timed(accounts[round_number % 2]))
    unknown_median = statistics.median(unknown_times)
    wrong_median = statistics.median(wrong_password_times)
    ratio = unknown_median / wrong_median
    assert 0.5 <= ratio <= 2, (
        f"unknown email median {unknown_median * 1000:.1f} ms, wrong password {wrong_median * 1000:.1f} ms"
    )


# ---- 4. CSRF -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CookieSession:
    access: str
    csrf: str

    def cookie(self, csrf: str | None = None, *, extra: str = "") -> dict[str, str]:
        pairs = [f"__Host-parley-access={self.access}"]
        if csrf is not None:
            pairs.append(f"__Host-parley-csrf={csrf}")
        header = "; ".join(pairs) + extra
        return {"cookie": header}


def cookie_login(client: httpx.Client, email: str) -> CookieSession:
    response = client.post(
        "/v1/auth/login",
        json={"email": email, "password": PASSWORD, "token_delivery": "TOKEN_DELIVERY_COOKIE"},
    )
    assert response.status_code == 200, response.text
    assert "tokens" not in response.json() or not response.json()["tokens"]
    set_cookies = response.headers.get_list("set-cookie")
    values = {}
    for line in set_cookies:
        name, _, rest = line.partition("=")
        values[name] = rest.split(";", 1)[0]
        assert "HttpOnly" in line and "Secure" in line and "SameSite=Strict" in line and "Path=/" in line
    assert set(values) == {"__Host-parley-access", "__Host-parley-refresh", "__Host-parley-csrf"}
    assert values["__Host-parley-csrf"] == response.json()["csrf_token"]
    return CookieSession(values["__Host-parley-access"], values["__Host-parley-csrf"])


def test_cookie_sessions_need_the_double_submitted_csrf_token_to_change_state(gateway: httpx.Client) -> None:
    email = unique_email("csrf")
    register(gateway, email, name="Original")
    session = cookie_login(gateway, email)
    rename = {"display_name": "Renamed by a forged request"}
    mask = {"update_mask": "displayName"}

    # A read needs no CSRF token.
    me = gateway.get("/v1/users/me", headers=session.cookie(session.csrf))
    assert me.status_code == 200, me.text

    def patch(headers: dict[str, str]) -> httpx.Response:
        return gateway.patch("/v1/users/me", params=mask, json=rename, headers=headers)

    def create_key(headers: dict[str, str]) -> httpx.Response:
        return gateway.post("/v1/users/me/api-keys", json={"name": "forged"}, headers=headers)

    wrong = secrets.token_urlsafe(32)
    for state_change in (patch, create_key):
        refused(
            state_change(session.cookie(session.csrf)),
            status=403,
            code=GRPC_PERMISSION_DENIED,
            reason="CSRF_TOKEN_MISSING",
            metadata={"cause": "header"},
        )
        refused(
            state_change({**session.cookie(session.csrf), "x-csrf-token": wrong}),
            status=403,
            code=GRPC_PERMISSION_DENIED,
            reason="CSRF_TOKEN_MISMATCH",
            metadata={},
        )
        refused(
            state_change({**session.cookie(None), "x-csrf-token": session.csrf}),
            status=403,
            code=GRPC_PERMISSION_DENIED,
            reason="CSRF_TOKEN_MISSING",
            metadata={"cause": "cookie"},
        )
        # A second, planted CSRF cookie next to the real one.
        refused(
            state_change(
                {**session.cookie(session.csrf, extra=f"; __Host-parley-csrf={wrong}"), "x-csrf-token": wrong}
            ),
            status=403,
            code=GRPC_PERMISSION_DENIED,
            reason="CSRF_TOKEN_MISMATCH",
            metadata={"cause": "duplicate_cookie"},
        )

    # Nothing changed; with the token the same requests go through.
    assert gateway.get("/v1/users/me", headers=session.cookie()).json()["user"]["display_name"] == "Original"
    listed = gateway.get("/v1/users/me/api-keys", headers=session.cookie())
    assert listed.status_code == 200, listed.text
    assert listed.json()["api_keys"] == []
    proper = {**session.cookie(session.csrf), "x-csrf-token": session.csrf}
    renamed = patch(proper)
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["user"]["display_name"] == rename["display_name"]
    assert create_key(proper).status_code == 200


# ---- 5. a disabled user --------------------------------------------------------------------------


def check_api_key(deployment: Deployment, api_key: str) -> auth_pb2.CheckApiKeyResponse:
    """AuthInternalService.CheckApiKey, straight to the gRPC port as the gateway's edge calls it."""
    with deployment.pki.sync_channel(deployment.grpc_target, as_="edge") as channel:
        stub = auth_pb2_grpc.AuthInternalServiceStub(channel)
        response: auth_pb2.CheckApiKeyResponse = stub.CheckApiKey(
            auth_pb2.CheckApiKeyRequest(api_key=api_key), timeout=10
        )
        return response


def check_api_key_refusal(deployment: Deployment, api_key: str) -> GrpcRefusal:
    return grpc_refusal(lambda: check_api_key(deployment, api_key))


def test_a_disabled_users_tokens_keys_and_password_are_refused(
    parley: Deployment, gateway: httpx.Client, admin: SignedIn
) -> None:
    with parley.client(DISABLED_IP) as client:
        email, target = new_user(client, "disabled")
        created = client.post("/v1/users/me/api-keys", json={"name": "ci"}, headers=target.bearer)
        assert created.status_code == 200, created.text
        api_key = created.json()["secret"]
        # Checked once while enabled, so a cached answer would be there to (wrongly) reuse.
        assert check_api_key(parley, api_key).identity.user_id == target.user_id

        disabled = client.post(
            f"/v1/admin/users/{target.user_id}:disable", json={"reason": "abuse"}, headers=admin.bearer
        )
        assert disabled.status_code == 200, disabled.text
        assert disabled.json()["user"]["disabled"] is True
        disabled_by = time.time()

        token_refused(client.get("/v1/users/me", headers=target.bearer), "SESSION_REVOKED", {})
        refused(
            refresh(client, target.refresh_token),
            status=401,
            code=GRPC_UNAUTHENTICATED,
            reason="SESSION_REVOKED",
        )
        refused(
            attempt_login(client, email, PASSWORD),
            status=403,
            code=GRPC_PERMISSION_DENIED,
            reason="ACCOUNT_DISABLED",
            metadata={},
        )
        # Without the right password, a disabled account looks like any other.
        invalid_credentials(attempt_login(client, email, WRONG_PASSWORD))
        assert check_api_key_refusal(parley, api_key) == GrpcRefusal(
            grpc.StatusCode.PERMISSION_DENIED, "ACCOUNT_DISABLED", {}
        )

        # The audit trail names the admin; every session ended with the reason.
        assert payloads(parley.database, "user.disabled", target.user_id) == [
            events_pb2.UserDisabled(user_id=target.user_id, actor_user_id=admin.user_id, reason="abuse")
        ]
        assert payloads(parley.database, "session.revoked", target.user_id) == [
            events_pb2.SessionRevoked(
                user_id=target.user_id,
                session_id=target.session_id,
                reason=events_pb2.SESSION_REVOKE_REASON_USER_DISABLED,
                actor_user_id=admin.user_id,
            )
        ]

        # Enabling restores the key and sign-in, not the ended session.
        enabled = client.post(f"/v1/admin/users/{target.user_id}:enable", json={}, headers=admin.bearer)
        assert enabled.status_code == 200, enabled.text
        assert check_api_key(parley, api_key).identity.user_id == target.user_id
        refused(
            refresh(client, target.refresh_token),
            status=401,
            code=GRPC_UNAUTHENTICATED,
            reason="SESSION_REVOKED",
        )
        # Disabling refused every token of the user issued before it, by `iat` in whole seconds: a
        # token issued within the second of the cutoff counts as before it (docs/auth.md). Real time:
        # the server is another process on the wall clock; this waits into the cutoff's next second.
        time.sleep(max(0.0, math.ceil(disabled_by) - time.time() + 0.05))
        assert client.get("/v1/users/me", headers=login(client, email).bearer).status_code == 200


def test_guessed_altered_and_revoked_api_keys_are_refused(parley: Deployment, gateway: httpx.Client) -> None:
    _, owner = new_user(gateway, "keys")
    created = gateway.post("/v1/users/me/api-keys", json={"name": "ci"}, headers=owner.bearer)
    assert created.status_code == 200, created.text
    api_key: str = created.json()["secret"]
    key_id: str = created.json()["api_key"]["id"]
    assert check_api_key(parley, api_key).identity.user_id == owner.user_id

    middle = len(api_key) - 20
    altered_secret = api_key[:middle] + ("A" if api_key[middle] != "A" else "B") + api_key[middle + 1 :]
    guessed_prefix = "pk_" + "a" * 12 + api_key[15:]
    for key, cause in [
        ("pk_not-a-key", "malformed"),
        (api_key + "x", "malformed"),
        (altered_secret, "unknown"),
        (guessed_prefix, "unknown"),
    ]:
        assert check_api_key_refusal(parley, key) == GrpcRefusal(
            grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID", {"cause": cause}
        ), key

    revoked = gateway.delete(f"/v1/users/me/api-keys/{key_id}", headers=owner.bearer)
    assert revoked.status_code == 200, revoked.text
    assert check_api_key_refusal(parley, api_key) == GrpcRefusal(
        grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED", {}
    )


# ---- 6. admin RPCs -------------------------------------------------------------------------------


def admin_calls(user_id: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [
        ("GET", "/v1/admin/users", None),
        ("GET", f"/v1/admin/users/{user_id}", None),
        ("POST", f"/v1/admin/users/{user_id}:disable", {"reason": "because"}),
        ("POST", f"/v1/admin/users/{user_id}:enable", {}),
        ("PUT", f"/v1/admin/users/{user_id}/roles", {"roles": ["ROLE_USER", "ROLE_ADMIN"]}),
    ]


def test_admin_rpcs_refuse_non_admins_and_anonymous_callers(
    parley: Deployment, gateway: httpx.Client, admin: SignedIn, forge: ForgeKit
) -> None:
    _, user = new_user(gateway, "not-admin")
    escalated = forge.tampered_claims(sub=user.user_id, roles=["user", "admin"])
    before = event_count(parley.database)
    for method, path, body in admin_calls(user.user_id):
        as_user = gateway.request(method, path, json=body, headers=user.bearer)
        refused(
            as_user,
            status=403,
            code=GRPC_PERMISSION_DENIED,
            reason="PERMISSION_DENIED",
            metadata={"role": "admin"},
        )
        anonymous = gateway.request(method, path, json=body)
        refused(anonymous, status=401, code=GRPC_UNAUTHENTICATED, reason="UNAUTHENTICATED", metadata={})
        # A token edited to claim the role fails its signature.
        forged = gateway.request(method, path, json=body, headers={"authorization": f"Bearer {escalated}"})
        token_refused(forged, metadata={"cause": "signature"})
        # Identity headers a client sends never reach a service.
        spoofed = gateway.request(
            method,
            path,
            json=body,
            headers={"x-parley-user-id": admin.user_id, "x-parley-roles": "user,admin"},
        )
        refused(spoofed, status=401, code=GRPC_UNAUTHENTICATED, reason="UNAUTHENTICATED", metadata={})

    me = gateway.get("/v1/users/me", headers=user.bearer).json()["user"]
    assert me["roles"] == ["ROLE_USER"]
    assert me["disabled"] is False
    assert event_count(parley.database) == before
    # The control: an admin's token gets through the same routes.
    listed = gateway.get("/v1/admin/users", headers=admin.bearer)
    assert listed.status_code == 200, listed.text


# ---- 7. password policy --------------------------------------------------------------------------

TOO_LONG = (
    "Seventeen lanterns drifted past the granary while a heron counted reeds beneath a copper sky,"
    " and nobody minded the slow tide.!!!"
)
assert len(TOO_LONG) == 129


def policy_cases(email: str) -> list[tuple[str, list[str]]]:
    """Bad passwords for `email`, each with the violations expected, in the policy's order."""
    local_part = email.split("@", 1)[0]
    return [
        ("Zq8#mW2!vR", ["PASSWORD_TOO_SHORT"]),
        (TOO_LONG, ["PASSWORD_TOO_LONG"]),
        ("password1234", ["PASSWORD_TOO_COMMON"]),
        ("P@ssw0rd2024!", ["PASSWORD_TOO_COMMON"]),
        (f"my-{local_part}-secret-phrase", ["PASSWORD_CONTAINS_EMAIL"]),
        ("pa55w0rd", ["PASSWORD_TOO_SHORT", "PASSWORD_TOO_COMMON"]),
        ("x" * 129, ["PASSWORD_TOO_LONG", "PASSWORD_TOO_COMMON"]),
    ]


def policy_refused(response: httpx.Response, field: str, expected: Sequence[str]) -> None:
    body = refused(response, status=400, code=GRPC_INVALID_ARGUMENT, reason="PASSWORD_POLICY_VIOLATION")
    assert field_violations(body) == [(field, reason) for reason in expected], body
    assert all(v["description"] for v in detail(body, "BadRequest")["field_violations"])


def test_registration_refuses_each_policy_violation_and_writes_nothing(parley: Deployment) -> None:
    with parley.client() as client:
        email = unique_email("policy")
        before = event_count(parley.database)
        for password, expected in policy_cases(email):
            response = client.post(
                "/v1/auth/register", json={"email": email, "password": password, "display_name": "Pat"}
            )
            policy_refused(response, "password", expected)
        assert event_count(parley.database) == before
        # No account was created: the address is still free.
        register(client, email)


def test_password_reset_refuses_each_policy_violation_without_spending_the_token(parley: Deployment) -> None:
    with parley.client() as client:
        email = unique_email("reset")
        user_id = register(client, email)
        forgot = client.post("/v1/auth/forgot-password", json={"email": email})
        assert forgot.status_code == 200, forgot.text
        token = emailed_token(parley.database, user_id=user_id, template="password_reset")
        before = event_count(parley.database)
        for password, expected in policy_cases(email):
            response = client.post("/v1/auth/reset-password", json={"token": token, "new_password": password})
            policy_refused(response, "new_password", expected)
        assert event_count(parley.database) == before
        assert attempt_login(client, email, PASSWORD).status_code == 200
        # The token was not spent by the refusals.
        reset = client.post("/v1/auth/reset-password", json={"token": token, "new_password": OTHER_PASSWORD})
        assert reset.status_code == 200, reset.text


def test_password_change_refuses_each_policy_violation_and_changes_nothing(parley: Deployment) -> None:
    with parley.client() as client:
        email, signed_in = new_user(client, "change")
        before = event_count(parley.database)
        for password, expected in policy_cases(email):
            response = client.post(
                "/v1/users/me/password:change",
                json={"current_password": PASSWORD, "new_password": password},
                headers=signed_in.bearer,
            )
            policy_refused(response, "new_password", expected)
        assert event_count(parley.database) == before
        assert client.get("/v1/users/me", headers=signed_in.bearer).status_code == 200
        assert attempt_login(client, email, PASSWORD).status_code == 200


# ---- 8. spoofed identity headers -----------------------------------------------------------------

SPOOFED_IDENTITY = {
    "x-parley-session-id": "00000000-0000-0000-0000-000000000000",
    "x-parley-plan": "team",
    "x-parley-roles": "user,admin",
    "x-parley-auth-method": "jwt",
}


def test_identity_headers_sent_through_the_gateway_are_stripped(gateway: httpx.Client) -> None:
    _, victim = new_user(gateway, "impersonated")
    _, caller = new_user(gateway, "impersonator")
    for user_header in ("x-parley-user-id", "X-PARLEY-USER-ID", "x_parley_user_id"):
        spoofed = gateway.get("/v1/users/me", headers={user_header: victim.user_id, **SPOOFED_IDENTITY})
        refused(spoofed, status=401, code=GRPC_UNAUTHENTICATED, reason="UNAUTHENTICATED", metadata={})
    # With a real token, the token decides who the caller is, not the headers.
    me = gateway.get(
        "/v1/users/me", headers={"x-parley-user-id": victim.user_id, **SPOOFED_IDENTITY, **caller.bearer}
    )
    assert me.status_code == 200, me.text
    assert me.json()["user"]["id"] == caller.user_id


def test_identity_headers_over_grpc_are_stripped_by_the_gateway_and_refused_from_anyone_else(
    parley: Deployment, gateway: httpx.Client
) -> None:
    _, victim = new_user(gateway, "grpc-impersonated")
    claimed = (("x-parley-user-id", victim.user_id), ("x-parley-roles", "user,admin"))

    def get_me(channel: grpc.Channel) -> GrpcRefusal:
        with channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            return grpc_refusal(
                lambda: stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=claimed, timeout=10)
            )

    through_gateway = get_me(grpc.insecure_channel(f"127.0.0.1:{parley.ports.http}"))
    assert through_gateway == GrpcRefusal(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", {})

    # Straight to the services' port, with the certificates `parley up` keeps: the operator's may call
    # GetCurrentUser but never as someone else; the edge's may not call it at all.
    as_operator = get_me(parley.pki.sync_channel(parley.grpc_target, as_="operator"))
    assert as_operator == GrpcRefusal(
        grpc.StatusCode.UNAUTHENTICATED, "UNTRUSTED_IDENTITY", {"cause": "identity_headers"}
    )
    as_edge = get_me(parley.pki.sync_channel(parley.grpc_target, as_="edge"))
    assert as_edge == GrpcRefusal(
        grpc.StatusCode.PERMISSION_DENIED,
        "CALLER_NOT_ALLOWED",
        {"caller": "edge", "method": "parley.auth.v1.AuthService/GetCurrentUser"},
    )
    # Without a certificate there is no call at all.
    with grpc.insecure_channel(parley.grpc_target) as channel, pytest.raises(grpc.RpcError) as refused:
        auth_pb2_grpc.AuthServiceStub(channel).GetCurrentUser(
            auth_pb2.GetCurrentUserRequest(), metadata=claimed, timeout=10
        )
    error: Any = refused.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
