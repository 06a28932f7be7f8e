"""Every auth flow end to end: the real `parley up` (Envoy, servicers, SQLite), a plain HTTP client
through the gateway, the generated gRPC stubs, and the outbox in the embedded database.

One `parley up` serves the whole module; every test signs up its own users with fresh addresses, so
the tests neither see nor disturb each other's accounts. Emails are not sent yet: the verification
and reset tokens are read from the `email.requested` jobs in the outbox (tests/support/outbox.py).

Failed sign-ins all come from one client address (the gateway's), which the throttle allows 20 free
failures: keep the module's total of deliberate wrong passwords well below that.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from parley.common.v1 import common_pb2
from parley.events.v1 import events_pb2
from services.common.events import payload_of
from tests.support.outbox import email_requests, emailed_token, read_events
from tests.support.parley_process import PARLEY, EmbeddedPorts, ParleyProcess
from tests.support.pki import embedded_pki

pytestmark = pytest.mark.envoy

PASSWORD = "violet-harbour-lantern-42"
NEW_PASSWORD = "copper-meadow-falcon-77"
NEWEST_PASSWORD = "amber-glacier-thistle-19"
ADMIN_PASSWORD = "saffron-quarry-beacon-63"
# Not the defaults, so the claims prove the settings reach the token issuer.
ISSUER = "https://auth.parley.test"
AUDIENCE = "parley-e2e"
ACCESS_TTL_S = 900
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
CURL = "curl/8.5.0"
GRPC_USER_AGENT = "parley-e2e-grpc/1.0"
ACCESS_COOKIE = "__Host-parley-access"
REFRESH_COOKIE = "__Host-parley-refresh"
CSRF_COOKIE = "__Host-parley-csrf"
SESSION_COOKIES = (ACCESS_COOKIE, REFRESH_COOKIE, CSRF_COOKIE)
CLAIMS = {"sub", "sid", "plan", "roles", "iss", "aud", "iat", "nbf", "exp", "jti"}
# A new user's fields: the verify, last-login and disable times stay unset (absent) until they happen.
USER_FIELDS = {"id", "email", "display_name", "email_verified", "roles", "plan_id", "disabled"}
USER_FIELDS |= {"create_time", "update_time"}


@dataclass(frozen=True)
class Parley:
    """The running `parley up`: an HTTP client on its gateway, its ports and its database."""

    http: httpx.Client
    ports: EmbeddedPorts
    data_dir: Path

    @property
    def database(self) -> Path:
        return self.data_dir / "parley.db"

    def events(self, event_type: str | None = None, subject: str | None = None) -> list[events_pb2.Event]:
        return read_events(self.database, event_type, subject)

    def auth_events(self, subject: str) -> list[events_pb2.Event]:
        """Auth's own events about `subject`, without the email worker's (`email.sent`), which land
        whenever the worker gets to them."""
        return [event for event in self.events(subject=subject) if event.source == "auth"]

    def payloads(self, event_type: str, subject: str) -> list[Any]:
        return [payload_of(event) for event in self.events(event_type, subject)]

    def channel(self, port: int, *, as_: str = "operator") -> grpc.Channel:
        """A channel to the gateway (plaintext, as any client) or to the services' port, presenting
        workload `as_`'s certificate from the PKI `parley up` made."""
        options = [("grpc.primary_user_agent", GRPC_USER_AGENT)]
        if port == self.ports.http:
            return grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        return embedded_pki(self.data_dir).sync_channel(f"127.0.0.1:{port}", as_=as_, options=options)


@pytest.fixture(scope="module")
def parley(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parley]:
    data_dir = tmp_path_factory.mktemp("parley-auth")
    ports = EmbeddedPorts()
    process = ParleyProcess(
        ["up"],
        env={
            **ports.env(),
            "PARLEY_DATA_DIR": str(data_dir),
            "PARLEY_JWT_ISSUER": ISSUER,
            "PARLEY_JWT_AUDIENCE": AUDIENCE,
        },
        log_path=data_dir / "parley.log",
    )
    process.start()
    try:
        process.wait_until_http_ok(f"http://127.0.0.1:{ports.http}/healthz")
        with httpx.Client(base_url=f"http://127.0.0.1:{ports.http}", timeout=15.0) as client:
            yield Parley(client, ports, data_dir)
    finally:
        process.terminate()


# ---- helpers ------------------------------------------------------------------------------------


def unique_email(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}@example.com"


def bearer(access_token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {access_token}"}


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, f"{response.request.method} {response.request.url}: {response.text}"
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    return body


def assert_error(response: httpx.Response, *, status: int, code: int, reason: str) -> dict[str, Any]:
    """The Parley error shape with this status, gRPC code and ErrorInfo reason; returns the body."""
    assert response.status_code == status, (
        f"{response.request.method} {response.request.url}: {response.text}"
    )
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    assert body["message"]
    info = error_info(body)
    assert (info["reason"], info["domain"]) == (reason, "parley.dev"), body
    request_info = next(d for d in body["details"] if d["@type"].endswith("google.rpc.RequestInfo"))
    assert request_info["request_id"] == response.headers["x-request-id"]
    assert not any(name.startswith("grpc-") for name in response.headers)
    return body


def error_info(body: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = next(d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo"))
    return info


def grpc_error_reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason carried in the rich status (`grpc-status-details-bin`)."""
    status = rpc_status.from_call(error)
    assert status is not None, f"{error.code()} without status details: {error.details()}"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "parley.dev"
            reason: str = info.reason
            return reason
    raise AssertionError(f"no ErrorInfo in {status}")


def parse_time(value: str) -> datetime:
    """An RFC 3339 timestamp as the transcoder prints it (UTC, `Z`)."""
    assert value.endswith("Z"), value
    return datetime.fromisoformat(value)


def assert_recent(value: str, *, within: timedelta = timedelta(minutes=1)) -> datetime:
    moment = parse_time(value)
    assert abs(datetime.now(UTC) - moment) < within, value
    return moment


def register(
    parley: Parley, email: str, *, name: str = "Ada Lovelace", password: str = PASSWORD
) -> dict[str, Any]:
    user: dict[str, Any] = ok(
        parley.http.post(
            "/v1/auth/register", json={"email": email, "password": password, "display_name": name}
        )
    )["user"]
    return user


def login(
    parley: Parley,
    email: str,
    *,
    password: str = PASSWORD,
    user_agent: str = FIREFOX,
    cookies: bool = False,
) -> dict[str, Any]:
    body = {"email": email, "password": password}
    if cookies:
        body["token_delivery"] = "TOKEN_DELIVERY_COOKIE"
    return ok(parley.http.post("/v1/auth/login", json=body, headers={"user-agent": user_agent}))


def refresh(parley: Parley, refresh_token: str) -> httpx.Response:
    return parley.http.post("/v1/auth/refresh", json={"refresh_token": refresh_token})


def me(parley: Parley, access_token: str) -> httpx.Response:
    return parley.http.get("/v1/users/me", headers=bearer(access_token))


def rename_me(parley: Parley, display_name: str, headers: dict[str, str]) -> httpx.Response:
    return parley.http.patch(
        "/v1/users/me",
        params={"update_mask": "display_name"},
        json={"display_name": display_name},
        headers=headers,
    )


def unverified_claims(access_token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(access_token, options={"verify_signature": False})
    return claims


def wait_for_next_second() -> None:
    """Sleep into the next wall-clock second.

    Revoking "every token of a user issued before now" (password reset, disabling, taking a role)
    compares with the whole-second `iat`, so a token issued within the cutoff's second is refused
    too; see test_a_sign_in_in_the_same_second_as_a_password_reset_gets_a_working_token.
    """
    # Real time: the server under test is another process on the wall clock, which no test can move.
    time.sleep(1.02 - time.time() % 1)


def set_cookies(response: httpx.Response) -> dict[str, tuple[str, dict[str, str]]]:
    """name → (value, attributes with lower-cased names) for every Set-Cookie of the response."""
    cookies = {}
    for header in response.headers.get_list("set-cookie"):
        first, *attributes = (part.strip() for part in header.split(";"))
        name, _, value = first.partition("=")
        parsed = {}
        for attribute in attributes:
            key, _, attribute_value = attribute.partition("=")
            parsed[key.lower()] = attribute_value
        assert name not in cookies, f"{name} set twice"
        cookies[name] = (value, parsed)
    return cookies


def cookie_header(values: dict[str, str]) -> str:
    return "; ".join(f"{name}={value}" for name, value in values.items())


# ---- 1. registration and email verification -----------------------------------------------------


def test_register_then_verify_the_email_with_the_token_from_the_outbox(parley: Parley) -> None:
    email = unique_email("Verify.Me")
    user = register(parley, f"  {email.upper()} ", name="Ada Lovelace")
    assert set(user) == USER_FIELDS
    assert user["email"] == email.lower()
    assert (user["display_name"], user["email_verified"], user["disabled"]) == ("Ada Lovelace", False, False)
    assert (user["roles"], user["plan_id"]) == (["ROLE_USER"], "free")
    assert_recent(user["create_time"])

    registered = parley.payloads("user.registered", user["id"])
    assert registered == [
        events_pb2.UserRegistered(user_id=user["id"], email=email.lower(), display_name="Ada Lovelace")
    ]
    [mail] = email_requests(parley.database, user_id=user["id"])
    assert (mail.template, mail.recipient, mail.user_id) == ("verify_email", email.lower(), user["id"])
    token = mail.params["token"]
    assert set(mail.params) == {"token", "link_path", "display_name", "expire_time"}
    assert mail.params["link_path"] == f"/verify-email?token={token}"
    assert mail.params["display_name"] == "Ada Lovelace"
    expires = datetime.fromisoformat(mail.params["expire_time"])
    assert timedelta(hours=23) < expires - datetime.now(UTC) <= timedelta(hours=24)
    [event] = parley.events("email.requested", user["id"])
    assert (event.source, event.subject) == ("auth", user["id"])

    # The same address again (in another case) is refused, naming the field.
    taken = parley.http.post(
        "/v1/auth/register", json={"email": email, "password": PASSWORD, "display_name": "Someone Else"}
    )
    body = assert_error(taken, status=409, code=6, reason="EMAIL_ALREADY_REGISTERED")
    violations = next(d for d in body["details"] if d["@type"].endswith("google.rpc.BadRequest"))
    assert [v["field"] for v in violations["field_violations"]] == ["email"]
    weak = parley.http.post(
        "/v1/auth/register",
        json={"email": unique_email("weak"), "password": "password1234", "display_name": "Weak"},
    )
    assert_error(weak, status=400, code=3, reason="PASSWORD_POLICY_VIOLATION")

    verified = ok(parley.http.post("/v1/auth/verify-email", json={"token": token}))["user"]
    assert (verified["id"], verified["email_verified"]) == (user["id"], True)
    assert_recent(verified["email_verify_time"])
    assert parley.payloads("user.email_verified", user["id"]) == [
        events_pb2.UserEmailVerified(user_id=user["id"], email=email.lower())
    ]

    again = parley.http.post("/v1/auth/verify-email", json={"token": token})
    body = assert_error(again, status=400, code=3, reason="VERIFICATION_TOKEN_INVALID")
    violations = next(d for d in body["details"] if d["@type"].endswith("google.rpc.BadRequest"))
    assert [v["field"] for v in violations["field_violations"]] == ["token"]
    assert len(parley.events("user.email_verified", user["id"])) == 1

    signed_in = login(parley, email)
    assert signed_in["user"]["email_verified"] is True


# ---- 2. sign-in with body tokens, the profile ---------------------------------------------------


def test_login_returns_an_eddsa_access_jwt_and_an_opaque_refresh_token(parley: Parley) -> None:
    email = unique_email("login")
    user = register(parley, email, name="Grace Hopper")
    before = int(time.time())
    signed_in = login(parley, email, user_agent=FIREFOX)
    assert set(signed_in) == {"tokens", "user", "session", "csrf_token"}
    assert signed_in["csrf_token"] == ""

    # An unverified account signs in, and says so.
    assert signed_in["user"]["id"] == user["id"]
    assert signed_in["user"]["email_verified"] is False
    assert "email_verify_time" not in signed_in["user"]
    assert_recent(signed_in["user"]["last_login_time"])

    tokens = signed_in["tokens"]
    assert set(tokens) == {
        "access_token",
        "access_token_expire_time",
        "refresh_token",
        "refresh_token_expire_time",
    }
    access = tokens["access_token"]
    header = jwt.get_unverified_header(access)
    assert header["alg"] == "EdDSA"
    assert header["typ"] == "JWT"
    assert header["kid"]
    claims = unverified_claims(access)
    assert set(claims) == CLAIMS
    session = signed_in["session"]
    assert claims["sub"] == user["id"]
    assert claims["sid"] == session["id"]
    assert (claims["plan"], claims["roles"]) == ("free", ["user"])
    assert (claims["iss"], claims["aud"]) == (ISSUER, AUDIENCE)
    assert before <= claims["iat"] == claims["nbf"] <= time.time()
    assert claims["exp"] - claims["iat"] == ACCESS_TTL_S
    assert len(claims["jti"]) >= 16
    assert parse_time(tokens["access_token_expire_time"]) == datetime.fromtimestamp(claims["exp"], UTC)

    refresh_token = tokens["refresh_token"]
    assert refresh_token.count(".") == 0
    assert len(refresh_token) == 43
    assert set(refresh_token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    refresh_expires = parse_time(tokens["refresh_token_expire_time"])
    assert timedelta(days=29, hours=23) < refresh_expires - datetime.now(UTC) <= timedelta(days=30)

    assert session["user_id"] == user["id"]
    assert (session["device"], session["user_agent"]) == ("Firefox on Linux", FIREFOX)
    assert session["auth_method"] == "AUTH_METHOD_JWT"
    ipaddress.ip_address(session["ip_address"])
    assert parse_time(session["expire_time"]) == refresh_expires
    [succeeded] = parley.payloads("user.login_succeeded", user["id"])
    assert (succeeded.session_id, succeeded.device, succeeded.new_device) == (
        session["id"],
        "Firefox on Linux",
        True,
    )
    assert succeeded.ip_address == session["ip_address"]

    profile = ok(me(parley, access))["user"]
    assert (profile["id"], profile["email"], profile["display_name"]) == (user["id"], email, "Grace Hopper")
    anonymous = parley.http.get("/v1/users/me")
    assert_error(anonymous, status=401, code=16, reason="UNAUTHENTICATED")
    tampered = access[:-4] + ("AAAA" if not access.endswith("AAAA") else "BBBB")
    assert_error(me(parley, tampered), status=401, code=16, reason="TOKEN_INVALID")

    renamed = ok(rename_me(parley, "  Rear Admiral Hopper ", bearer(access)))["user"]
    assert renamed["display_name"] == "Rear Admiral Hopper"
    assert parse_time(renamed["update_time"]) > parse_time(profile["update_time"])
    assert ok(me(parley, access))["user"]["display_name"] == "Rear Admiral Hopper"

    read_only = parley.http.patch(
        "/v1/users/me",
        params={"update_mask": "email"},
        json={"email": "x@example.com"},
        headers=bearer(access),
    )
    body = assert_error(read_only, status=400, code=3, reason="INVALID_UPDATE_MASK")
    violations = next(d for d in body["details"] if d["@type"].endswith("google.rpc.BadRequest"))
    assert [v["field"] for v in violations["field_violations"]] == ["update_mask"]
    unknown = parley.http.patch(
        "/v1/users/me", params={"update_mask": "nickname"}, json={"display_name": "X"}, headers=bearer(access)
    )
    assert_error(unknown, status=400, code=3, reason="INVALID_UPDATE_MASK")
    assert ok(me(parley, access))["user"]["display_name"] == "Rear Admiral Hopper"


def test_wrong_password_and_unknown_email_get_the_same_answer(parley: Parley) -> None:
    email = unique_email("wrong")
    user = register(parley, email)
    wrong = parley.http.post("/v1/auth/login", json={"email": email, "password": NEW_PASSWORD})
    unknown = parley.http.post("/v1/auth/login", json={"email": unique_email("nobody"), "password": PASSWORD})
    wrong_body = assert_error(wrong, status=401, code=16, reason="INVALID_CREDENTIALS")
    unknown_body = assert_error(unknown, status=401, code=16, reason="INVALID_CREDENTIALS")
    assert (wrong_body["message"], error_info(wrong_body)) == (
        unknown_body["message"],
        error_info(unknown_body),
    )
    [failed] = parley.payloads("user.login_failed", user["id"])
    assert (failed.reason, failed.failed_attempts) == (events_pb2.LOGIN_FAILURE_REASON_INVALID_CREDENTIALS, 1)
    assert "password" not in str(failed).lower()


# ---- 3. refresh rotation and reuse detection ----------------------------------------------------


def test_refresh_rotates_and_a_reused_token_revokes_the_session(parley: Parley) -> None:
    email = unique_email("rotate")
    user = register(parley, email)
    signed_in = login(parley, email)
    first = signed_in["tokens"]
    session_id = signed_in["session"]["id"]

    rotated = ok(refresh(parley, first["refresh_token"]))
    assert set(rotated) == {"tokens", "csrf_token"}
    assert rotated["csrf_token"] == ""
    second = rotated["tokens"]
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    claims = unverified_claims(second["access_token"])
    assert (claims["sub"], claims["sid"]) == (user["id"], session_id)
    assert claims["jti"] != unverified_claims(first["access_token"])["jti"]
    assert ok(me(parley, second["access_token"]))["user"]["id"] == user["id"]

    third = ok(refresh(parley, second["refresh_token"]))["tokens"]
    assert ok(me(parley, third["access_token"]))["user"]["id"] == user["id"]

    # A spent token comes back: someone else holds the family. The session ends for everyone.
    reused = refresh(parley, first["refresh_token"])
    assert_error(reused, status=401, code=16, reason="REFRESH_TOKEN_REUSED")
    newest = refresh(parley, third["refresh_token"])
    body = assert_error(newest, status=401, code=16, reason="SESSION_REVOKED")
    assert error_info(body)["metadata"] == {"cause": "revoked"}
    for access in (first["access_token"], second["access_token"], third["access_token"]):
        assert_error(me(parley, access), status=401, code=16, reason="SESSION_REVOKED")

    [detected] = parley.payloads("session.reuse_detected", user["id"])
    assert (detected.user_id, detected.session_id) == (user["id"], session_id)
    ipaddress.ip_address(detected.ip_address)
    [revoked] = parley.payloads("session.revoked", user["id"])
    assert (revoked.session_id, revoked.reason) == (
        session_id,
        events_pb2.SESSION_REVOKE_REASON_REUSE_DETECTED,
    )

    unknown = refresh(parley, "x" * 43)
    assert_error(unknown, status=401, code=16, reason="REFRESH_TOKEN_INVALID")
    missing = parley.http.post("/v1/auth/refresh", json={})
    assert_error(missing, status=401, code=16, reason="REFRESH_TOKEN_INVALID")


# ---- 4. sessions --------------------------------------------------------------------------------


def test_sessions_are_listed_revoked_one_by_one_and_ended_by_logout(parley: Parley) -> None:
    email = unique_email("sessions")
    user = register(parley, email)
    laptop = login(parley, email, user_agent=FIREFOX)
    terminal = login(parley, email, user_agent=CURL)
    laptop_token = laptop["tokens"]["access_token"]
    terminal_token = terminal["tokens"]["access_token"]

    listed = ok(parley.http.get("/v1/users/me/sessions", headers=bearer(laptop_token)))
    assert listed["next_page_token"] == ""
    sessions = listed["sessions"]
    # Most recently used first.
    assert [s["id"] for s in sessions] == [terminal["session"]["id"], laptop["session"]["id"]]
    by_device = {s["device"]: s for s in sessions}
    assert set(by_device) == {"Firefox on Linux", "curl"}
    assert (by_device["Firefox on Linux"]["current"], by_device["curl"]["current"]) == (True, False)
    assert (by_device["Firefox on Linux"]["user_agent"], by_device["curl"]["user_agent"]) == (FIREFOX, CURL)
    for session in sessions:
        assert session["user_id"] == user["id"]
        assert session["auth_method"] == "AUTH_METHOD_JWT"
        ipaddress.ip_address(session["ip_address"])
        assert_recent(session["last_seen_time"])
        assert parse_time(session["create_time"]) <= parse_time(session["last_seen_time"])
    from_terminal = ok(parley.http.get("/v1/users/me/sessions", headers=bearer(terminal_token)))["sessions"]
    assert {s["device"]: s["current"] for s in from_terminal} == {"Firefox on Linux": False, "curl": True}
    paged = ok(
        parley.http.get("/v1/users/me/sessions", params={"page_size": 1}, headers=bearer(laptop_token))
    )
    assert [s["id"] for s in paged["sessions"]] == [terminal["session"]["id"]]
    assert paged["next_page_token"]

    # Someone else's session id is not found, never revoked.
    stranger_email = unique_email("stranger")
    register(parley, stranger_email)
    stranger = login(parley, stranger_email)["tokens"]["access_token"]
    foreign = parley.http.delete(f"/v1/users/me/sessions/{laptop['session']['id']}", headers=bearer(stranger))
    assert_error(foreign, status=404, code=5, reason="NOT_FOUND")

    revoked = ok(
        parley.http.delete(f"/v1/users/me/sessions/{terminal['session']['id']}", headers=bearer(laptop_token))
    )["session"]
    assert (revoked["id"], revoked["device"]) == (terminal["session"]["id"], "curl")
    assert_error(me(parley, terminal_token), status=401, code=16, reason="SESSION_REVOKED")
    assert_error(
        refresh(parley, terminal["tokens"]["refresh_token"]), status=401, code=16, reason="SESSION_REVOKED"
    )
    remaining = ok(parley.http.get("/v1/users/me/sessions", headers=bearer(laptop_token)))["sessions"]
    assert [s["id"] for s in remaining] == [laptop["session"]["id"]]
    assert ok(me(parley, laptop_token))["user"]["id"] == user["id"]

    ended = ok(parley.http.post("/v1/auth/logout", json={"refresh_token": laptop["tokens"]["refresh_token"]}))
    assert ended == {"session_id": laptop["session"]["id"]}
    assert_error(me(parley, laptop_token), status=401, code=16, reason="SESSION_REVOKED")
    assert_error(
        refresh(parley, laptop["tokens"]["refresh_token"]), status=401, code=16, reason="SESSION_REVOKED"
    )

    reasons = {
        p.session_id: (p.reason, p.actor_user_id) for p in parley.payloads("session.revoked", user["id"])
    }
    assert reasons == {
        terminal["session"]["id"]: (events_pb2.SESSION_REVOKE_REASON_USER_REVOKED, user["id"]),
        laptop["session"]["id"]: (events_pb2.SESSION_REVOKE_REASON_LOGOUT, user["id"]),
    }
    # The second login from the same kind of device is not a new device.
    assert [p.new_device for p in parley.payloads("user.login_succeeded", user["id"])] == [True, True]


def test_logout_with_only_the_access_token_ends_the_current_session(parley: Parley) -> None:
    email = unique_email("logout")
    register(parley, email)
    first = login(parley, email)
    again = login(parley, email)
    assert [p.new_device for p in parley.payloads("user.login_succeeded", first["user"]["id"])] == [
        True,
        False,
    ]
    ended = ok(parley.http.post("/v1/auth/logout", json={}, headers=bearer(first["tokens"]["access_token"])))
    assert ended == {"session_id": first["session"]["id"]}
    assert_error(me(parley, first["tokens"]["access_token"]), status=401, code=16, reason="SESSION_REVOKED")
    assert ok(me(parley, again["tokens"]["access_token"]))["user"]["id"] == first["user"]["id"]


# ---- 5. forgotten and changed passwords ---------------------------------------------------------


def test_forgot_and_reset_password_revokes_every_session(parley: Parley) -> None:
    email = unique_email("reset")
    user = register(parley, email, name="Reset Me")
    laptop = login(parley, email, user_agent=FIREFOX)
    terminal = login(parley, email, user_agent=CURL)

    unknown = parley.http.post("/v1/auth/forgot-password", json={"email": unique_email("ghost")})
    known = parley.http.post("/v1/auth/forgot-password", json={"email": email})
    assert ok(unknown) == ok(known) == {"accepted": True}
    assert known.headers.keys() == unknown.headers.keys()
    recipients = {event.email_requested.recipient for event in parley.events("email.requested")}
    assert email in recipients
    assert not any(recipient.startswith("ghost-") for recipient in recipients)

    [mail] = email_requests(parley.database, user_id=user["id"], template="password_reset")
    assert mail.recipient == email
    token = mail.params["token"]
    assert mail.params["link_path"] == f"/reset-password?token={token}"
    assert mail.params["display_name"] == "Reset Me"
    expires = datetime.fromisoformat(mail.params["expire_time"])
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)

    too_weak = parley.http.post("/v1/auth/reset-password", json={"token": token, "new_password": "short"})
    assert_error(too_weak, status=400, code=3, reason="PASSWORD_POLICY_VIOLATION")
    # A refused password does not spend the token.
    reset = ok(
        parley.http.post("/v1/auth/reset-password", json={"token": token, "new_password": NEW_PASSWORD})
    )
    assert reset == {"revoked_session_count": 2}

    for signed_in in (laptop, terminal):
        assert_error(
            me(parley, signed_in["tokens"]["access_token"]), status=401, code=16, reason="SESSION_REVOKED"
        )
        refused = refresh(parley, signed_in["tokens"]["refresh_token"])
        assert_error(refused, status=401, code=16, reason="SESSION_REVOKED")
    reused = parley.http.post(
        "/v1/auth/reset-password", json={"token": token, "new_password": NEWEST_PASSWORD}
    )
    assert_error(reused, status=400, code=3, reason="RESET_TOKEN_INVALID")

    assert parley.payloads("user.password_reset", user["id"]) == [
        events_pb2.UserPasswordReset(user_id=user["id"], revoked_session_count=2)
    ]
    revoked = parley.payloads("session.revoked", user["id"])
    assert {(p.session_id, p.reason) for p in revoked} == {
        (laptop["session"]["id"], events_pb2.SESSION_REVOKE_REASON_PASSWORD_RESET),
        (terminal["session"]["id"], events_pb2.SESSION_REVOKE_REASON_PASSWORD_RESET),
    }
    # The token reached the mailbox, so the address counts as verified now.
    assert parley.payloads("user.email_verified", user["id"]) == [
        events_pb2.UserEmailVerified(user_id=user["id"], email=email)
    ]

    old_password = parley.http.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert_error(old_password, status=401, code=16, reason="INVALID_CREDENTIALS")
    wait_for_next_second()
    signed_in = login(parley, email, password=NEW_PASSWORD)
    assert signed_in["user"]["email_verified"] is True
    assert ok(me(parley, signed_in["tokens"]["access_token"]))["user"]["id"] == user["id"]


def test_a_sign_in_right_after_a_password_reset_gets_a_working_token(parley: Parley) -> None:
    """The reset refuses every token issued before it; `iat` is whole seconds, so the issuer waits
    out the reset's second rather than stamp a token the cutoff would refuse for its whole life."""
    email = unique_email("same-second")
    user = register(parley, email)
    ok(parley.http.post("/v1/auth/forgot-password", json={"email": email}))
    token = emailed_token(parley.database, user_id=user["id"], template="password_reset")
    # The start of a second, so reset and sign-in fit in it: the server is on the real wall clock.
    time.sleep(1.0 - time.time() % 1)
    ok(parley.http.post("/v1/auth/reset-password", json={"token": token, "new_password": NEW_PASSWORD}))
    access = login(parley, email, password=NEW_PASSWORD)["tokens"]["access_token"]
    [reset_event] = parley.events("user.password_reset", user["id"])
    # The cutoff is taken before the reset commits (its event's time), so on a slow machine the two
    # can straddle a second: the token is then stamped in the event's second, after the cutoff's.
    assert unverified_claims(access)["iat"] >= reset_event.time.seconds
    # The proof: a token stamped in the cutoff's second would be refused here for its whole life.
    assert ok(me(parley, access))["user"]["id"] == user["id"]


def test_change_password_needs_the_current_one_and_keeps_only_the_callers_session(parley: Parley) -> None:
    email = unique_email("change")
    user = register(parley, email)
    laptop = login(parley, email, user_agent=FIREFOX)
    terminal = login(parley, email, user_agent=CURL)
    laptop_token = laptop["tokens"]["access_token"]

    wrong = parley.http.post(
        "/v1/users/me/password:change",
        json={"current_password": NEWEST_PASSWORD, "new_password": NEW_PASSWORD},
        headers=bearer(laptop_token),
    )
    body = assert_error(wrong, status=400, code=3, reason="CURRENT_PASSWORD_INCORRECT")
    violations = next(d for d in body["details"] if d["@type"].endswith("google.rpc.BadRequest"))
    assert [v["field"] for v in violations["field_violations"]] == ["current_password"]
    anonymous = parley.http.post(
        "/v1/users/me/password:change", json={"current_password": PASSWORD, "new_password": NEW_PASSWORD}
    )
    assert_error(anonymous, status=401, code=16, reason="UNAUTHENTICATED")
    assert ok(me(parley, terminal["tokens"]["access_token"]))["user"]["id"] == user["id"]

    changed = ok(
        parley.http.post(
            "/v1/users/me/password:change",
            json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
            headers=bearer(laptop_token),
        )
    )
    assert changed == {"revoked_session_count": 1}
    assert ok(me(parley, laptop_token))["user"]["id"] == user["id"]
    assert ok(refresh(parley, laptop["tokens"]["refresh_token"]))["tokens"]["refresh_token"]
    assert_error(
        me(parley, terminal["tokens"]["access_token"]), status=401, code=16, reason="SESSION_REVOKED"
    )
    remaining = ok(parley.http.get("/v1/users/me/sessions", headers=bearer(laptop_token)))["sessions"]
    assert [s["id"] for s in remaining] == [laptop["session"]["id"]]

    assert parley.payloads("user.password_changed", user["id"]) == [
        events_pb2.UserPasswordChanged(user_id=user["id"], revoked_session_count=1)
    ]
    assert parley.payloads("session.revoked", user["id"]) == [
        events_pb2.SessionRevoked(
            user_id=user["id"],
            session_id=terminal["session"]["id"],
            reason=events_pb2.SESSION_REVOKE_REASON_PASSWORD_CHANGED,
            actor_user_id=user["id"],
        )
    ]
    old = parley.http.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert_error(old, status=401, code=16, reason="INVALID_CREDENTIALS")
    assert login(parley, email, password=NEW_PASSWORD)["user"]["id"] == user["id"]


# ---- 6. API keys --------------------------------------------------------------------------------


def test_api_keys_are_created_listed_checked_over_internal_grpc_and_revoked(parley: Parley) -> None:
    email = unique_email("keys")
    user = register(parley, email)
    access = login(parley, email)["tokens"]["access_token"]

    created = ok(
        parley.http.post(
            "/v1/users/me/api-keys",
            json={"name": " CI runner ", "scopes": ["chat", "billing:read"]},
            headers=bearer(access),
        )
    )
    secret = created["secret"]
    key = created["api_key"]
    assert secret.startswith("pk_")
    assert len(secret) == 59
    assert secret.startswith(key["prefix"] + "_")
    assert len(key["prefix"]) == len("pk_") + 12
    assert key["last_four"] == secret[-4:]
    assert (key["name"], key["scopes"]) == ("CI runner", ["billing:read", "chat"])
    assert set(key) == {"id", "name", "prefix", "last_four", "scopes", "create_time"}
    [created_event] = parley.events("api_key.created", user["id"])
    assert payload_of(created_event) == events_pb2.ApiKeyCreated(
        user_id=user["id"],
        api_key_id=key["id"],
        name="CI runner",
        prefix=key["prefix"],
        scopes=["billing:read", "chat"],
    )
    assert secret.encode() not in created_event.SerializeToString()
    assert secret[len(key["prefix"]) + 1 :].encode() not in created_event.SerializeToString()

    listing = parley.http.get("/v1/users/me/api-keys", headers=bearer(access))
    assert ok(listing) == {"api_keys": [key], "next_page_token": ""}
    assert secret not in listing.text
    assert secret[len(key["prefix"]) + 1 :] not in listing.text

    # As the gateway's edge asks auth about keys and sessions.
    with parley.channel(parley.ports.grpc, as_="edge") as channel:
        internal = auth_pb2_grpc.AuthInternalServiceStub(channel)
        checked = internal.CheckApiKey(auth_pb2.CheckApiKeyRequest(api_key=secret), timeout=10)
        assert checked.identity == auth_pb2.Identity(
            user_id=user["id"],
            plan_id="free",
            roles=[common_pb2.ROLE_USER],
            auth_method=common_pb2.AUTH_METHOD_API_KEY,
            scopes=["billing:read", "chat"],
            api_key_id=key["id"],
            email_verified=False,
        )
        assert checked.cache_ttl.ToTimedelta() == timedelta(seconds=30)
        with pytest.raises(grpc.RpcError) as wrong_secret:
            internal.CheckApiKey(auth_pb2.CheckApiKeyRequest(api_key=secret[:-4] + "AAAA"), timeout=10)
        assert wrong_secret.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_error_reason(wrong_secret.value) == "API_KEY_INVALID"

        used = ok(parley.http.get("/v1/users/me/api-keys", headers=bearer(access)))["api_keys"]
        assert [k["id"] for k in used] == [key["id"]]
        assert_recent(used[0]["last_used_time"])

        revoked = ok(parley.http.delete(f"/v1/users/me/api-keys/{key['id']}", headers=bearer(access)))[
            "api_key"
        ]
        assert revoked["id"] == key["id"]
        assert_recent(revoked["revoke_time"])
        with pytest.raises(grpc.RpcError) as refused:
            internal.CheckApiKey(auth_pb2.CheckApiKeyRequest(api_key=secret), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_error_reason(refused.value) == "API_KEY_REVOKED"

    assert ok(parley.http.get("/v1/users/me/api-keys", headers=bearer(access))) == {
        "api_keys": [],
        "next_page_token": "",
    }
    with_revoked = ok(
        parley.http.get("/v1/users/me/api-keys", params={"show_revoked": "true"}, headers=bearer(access))
    )["api_keys"]
    assert [(k["id"], k["revoke_time"]) for k in with_revoked] == [(key["id"], revoked["revoke_time"])]
    assert parley.payloads("api_key.revoked", user["id"]) == [
        events_pb2.ApiKeyRevoked(user_id=user["id"], api_key_id=key["id"], actor_user_id=user["id"])
    ]


def test_the_internal_auth_service_is_not_routable_through_the_gateway(parley: Parley) -> None:
    for method in ("CheckApiKey", "CheckSession"):
        response = parley.http.post(
            f"/parley.auth.v1.AuthInternalService/{method}", json={"api_key": "pk_x", "session_cookie": "x"}
        )
        body = assert_error(response, status=404, code=5, reason="ROUTE_NOT_FOUND")
        assert "Traceback" not in json.dumps(body)
    with parley.channel(parley.ports.http) as channel:
        internal = auth_pb2_grpc.AuthInternalServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            internal.CheckApiKey(auth_pb2.CheckApiKeyRequest(api_key="pk_x"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ---- 7. JWKS ------------------------------------------------------------------------------------


def test_jwks_is_a_plain_rfc7517_document_that_verifies_the_access_tokens(parley: Parley) -> None:
    email = unique_email("jwks")
    register(parley, email)
    access = login(parley, email)["tokens"]["access_token"]

    well_known = parley.http.get("/.well-known/jwks.json")
    under_v1 = parley.http.get("/v1/auth/jwks")
    document = ok(well_known)
    assert ok(under_v1) == document
    assert set(document) == {"keys"}
    assert document["keys"]
    for key in document["keys"]:
        assert set(key) == {"kty", "crv", "x", "kid", "alg", "use"}
        assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
        assert len(base64.urlsafe_b64decode(key["x"] + "=" * (-len(key["x"]) % 4))) == 32
        # The kid is the RFC 7638 thumbprint of the public key.
        canonical = json.dumps({"crv": key["crv"], "kty": key["kty"], "x": key["x"]}, separators=(",", ":"))
        thumbprint = (
            base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()
        )
        assert key["kid"] == thumbprint

    kid = jwt.get_unverified_header(access)["kid"]
    assert kid in {key["kid"] for key in document["keys"]}
    key_set = jwt.PyJWKSet.from_dict(document)
    claims = jwt.decode(access, key_set[kid].key, algorithms=["EdDSA"], audience=AUDIENCE, issuer=ISSUER)
    assert set(claims) == CLAIMS
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(access, key_set[kid].key, algorithms=["EdDSA"], audience="someone-else", issuer=ISSUER)
    with pytest.raises(jwt.InvalidSignatureError):
        forged = access.rsplit(".", 1)[0] + "." + base64.urlsafe_b64encode(bytes(64)).rstrip(b"=").decode()
        jwt.decode(forged, key_set[kid].key, algorithms=["EdDSA"], audience=AUDIENCE, issuer=ISSUER)


# ---- 8. cookie sessions -------------------------------------------------------------------------


def assert_session_cookies(response: httpx.Response) -> dict[str, str]:
    """The three __Host- session cookies, each locked down as a browser requires; returns the values."""
    cookies = set_cookies(response)
    assert set(cookies) == set(SESSION_COOKIES)
    for name, (value, attributes) in cookies.items():
        assert value, name
        assert "httponly" in attributes, name
        assert "secure" in attributes, name
        assert attributes.get("samesite") == "Strict", name
        assert attributes.get("path") == "/", name
        assert "domain" not in attributes, name
        assert parsedate_to_datetime(attributes["expires"]) > datetime.now(UTC), name
    access_expires = parsedate_to_datetime(cookies[ACCESS_COOKIE][1]["expires"])
    assert timedelta(minutes=14) < access_expires - datetime.now(UTC) <= timedelta(minutes=15)
    refresh_expires = parsedate_to_datetime(cookies[REFRESH_COOKIE][1]["expires"])
    assert timedelta(days=29) < refresh_expires - datetime.now(UTC) <= timedelta(days=30)
    return {name: value for name, (value, _) in cookies.items()}


def test_cookie_sessions_use_host_cookies_and_a_csrf_token(parley: Parley) -> None:
    email = unique_email("cookies")
    user = register(parley, email)
    response = parley.http.post(
        "/v1/auth/login",
        json={"email": email, "password": PASSWORD, "token_delivery": "TOKEN_DELIVERY_COOKIE"},
        headers={"user-agent": FIREFOX},
    )
    body = ok(response)
    cookies = assert_session_cookies(response)
    assert "tokens" not in body
    assert body["csrf_token"] == cookies[CSRF_COOKIE]
    assert body["session"]["auth_method"] == "AUTH_METHOD_COOKIE"
    claims = unverified_claims(cookies[ACCESS_COOKIE])
    assert (claims["sub"], claims["sid"]) == (user["id"], body["session"]["id"])
    for value in cookies.values():
        assert value not in response.text or value == body["csrf_token"]

    browser = {"cookie": cookie_header(cookies)}
    assert ok(parley.http.get("/v1/users/me", headers=browser))["user"]["id"] == user["id"]
    listed = ok(parley.http.get("/v1/users/me/sessions", headers=browser))["sessions"]
    assert [(s["id"], s["current"], s["auth_method"]) for s in listed] == [
        (body["session"]["id"], True, "AUTH_METHOD_COOKIE")
    ]

    no_header = rename_me(parley, "Cookie Monster", browser)
    assert error_info(assert_error(no_header, status=403, code=7, reason="CSRF_TOKEN_MISSING"))[
        "metadata"
    ] == {"cause": "header"}
    wrong_header = rename_me(parley, "Cookie Monster", {**browser, "x-csrf-token": "not-the-token"})
    assert_error(wrong_header, status=403, code=7, reason="CSRF_TOKEN_MISMATCH")
    renamed = rename_me(parley, "Cookie Monster", {**browser, "x-csrf-token": body["csrf_token"]})
    assert ok(renamed)["user"]["display_name"] == "Cookie Monster"

    # The refresh cookie alone, and an empty body: new cookies, a new CSRF token, no tokens in the body.
    refreshed = parley.http.post(
        "/v1/auth/refresh",
        content=b"",
        headers={
            "cookie": cookie_header({REFRESH_COOKIE: cookies[REFRESH_COOKIE]}),
            "content-type": "application/json",
        },
    )
    refreshed_body = ok(refreshed)
    new_cookies = assert_session_cookies(refreshed)
    assert refreshed_body == {"csrf_token": new_cookies[CSRF_COOKIE]}
    for name in SESSION_COOKIES:
        assert new_cookies[name] != cookies[name], name
    assert unverified_claims(new_cookies[ACCESS_COOKIE])["sid"] == body["session"]["id"]

    new_browser = {"cookie": cookie_header(new_cookies)}
    stale_csrf = rename_me(parley, "Cookie Monster II", {**new_browser, "x-csrf-token": body["csrf_token"]})
    assert_error(stale_csrf, status=403, code=7, reason="CSRF_TOKEN_MISMATCH")
    renamed = rename_me(
        parley, "Cookie Monster II", {**new_browser, "x-csrf-token": new_cookies[CSRF_COOKIE]}
    )
    assert ok(renamed)["user"]["display_name"] == "Cookie Monster II"
    # The spent refresh cookie is reuse, as with body tokens.
    spent = parley.http.post(
        "/v1/auth/refresh", json={}, headers={"cookie": f"{REFRESH_COOKIE}={cookies[REFRESH_COOKIE]}"}
    )
    assert_error(spent, status=401, code=16, reason="REFRESH_TOKEN_REUSED")
    assert_error(
        parley.http.get("/v1/users/me", headers=new_browser), status=401, code=16, reason="SESSION_REVOKED"
    )


def test_the_gateway_check_of_a_cookie_session(parley: Parley) -> None:
    """AuthInternalService.CheckSession, as the gateway will call it for browsers (gRPC, direct)."""
    email = unique_email("check-session")
    user = register(parley, email)
    response = parley.http.post(
        "/v1/auth/login",
        json={"email": email, "password": PASSWORD, "token_delivery": "TOKEN_DELIVERY_COOKIE"},
    )
    session_id = ok(response)["session"]["id"]
    cookies = assert_session_cookies(response)
    access, csrf = cookies[ACCESS_COOKIE], cookies[CSRF_COOKIE]

    # As the gateway's edge asks auth about keys and sessions.
    with parley.channel(parley.ports.grpc, as_="edge") as channel:
        internal = auth_pb2_grpc.AuthInternalServiceStub(channel)

        def check(method: str, header: str = "", cookie: str = csrf) -> auth_pb2.CheckSessionResponse:
            request = auth_pb2.CheckSessionRequest(
                session_cookie=access, csrf_cookie=cookie, csrf_header=header, http_method=method
            )
            reply: auth_pb2.CheckSessionResponse = internal.CheckSession(request, timeout=10)
            return reply

        safe = check("GET")
        assert (safe.identity.user_id, safe.identity.session_id) == (user["id"], session_id)
        assert safe.identity.auth_method == common_pb2.AUTH_METHOD_COOKIE
        assert safe.cache_ttl.seconds == 0
        assert check("POST", header=csrf).identity.user_id == user["id"]
        for method, header, cookie, reason in (
            ("POST", "", csrf, "CSRF_TOKEN_MISSING"),
            ("DELETE", "forged", csrf, "CSRF_TOKEN_MISMATCH"),
            ("PATCH", "forged", "forged", "CSRF_TOKEN_MISMATCH"),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                check(method, header=header, cookie=cookie)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert grpc_error_reason(refused.value) == reason

        ok(parley.http.post("/v1/auth/logout", json={}, headers={"cookie": cookie_header(cookies)}))
        with pytest.raises(grpc.RpcError) as ended:
            check("GET")
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_error_reason(ended.value) == "SESSION_REVOKED"


def test_cookie_logout_clears_the_cookies(parley: Parley) -> None:
    email = unique_email("cookie-logout")
    register(parley, email)
    response = parley.http.post(
        "/v1/auth/login",
        json={"email": email, "password": PASSWORD, "token_delivery": "TOKEN_DELIVERY_COOKIE"},
    )
    body = ok(response)
    browser = {"cookie": cookie_header(assert_session_cookies(response)), "x-csrf-token": body["csrf_token"]}
    logged_out = parley.http.post("/v1/auth/logout", json={}, headers=browser)
    assert ok(logged_out) == {"session_id": body["session"]["id"]}
    cleared = set_cookies(logged_out)
    assert set(cleared) == set(SESSION_COOKIES)
    for name, (value, attributes) in cleared.items():
        assert value == "", name
        assert attributes.get("max-age") == "0", name
        assert ("secure" in attributes, attributes.get("path"), "domain" in attributes) == (
            True,
            "/",
            False,
        ), name
    assert_error(
        parley.http.get("/v1/users/me", headers=browser), status=401, code=16, reason="SESSION_REVOKED"
    )


def test_a_browser_whose_session_was_revoked_elsewhere_can_sign_in_again(parley: Parley) -> None:
    email = unique_email("stale-cookie")
    register(parley, email)
    response = parley.http.post(
        "/v1/auth/login",
        json={"email": email, "password": PASSWORD, "token_delivery": "TOKEN_DELIVERY_COOKIE"},
    )
    browser_session = ok(response)["session"]["id"]
    browser_cookies = assert_session_cookies(response)
    phone = login(parley, email)["tokens"]["access_token"]
    ok(parley.http.delete(f"/v1/users/me/sessions/{browser_session}", headers=bearer(phone)))

    # The browser still sends its (now revoked) access cookie with the sign-in form.
    again = parley.http.post(
        "/v1/auth/login",
        json={"email": email, "password": PASSWORD, "token_delivery": "TOKEN_DELIVERY_COOKIE"},
        headers={"cookie": cookie_header(browser_cookies)},
    )
    assert again.status_code == 200, again.text


# ---- 9. administration --------------------------------------------------------------------------


@dataclass(frozen=True)
class Admin:
    user_id: str
    headers: dict[str, str]


@pytest.fixture(scope="module")
def admin(parley: Parley) -> Admin:
    """The first admin, bootstrapped with `parley admin create-admin` against the running instance's
    data dir, then signed in through the gateway."""
    email = unique_email("root")
    command = subprocess.run(
        [str(PARLEY), "admin", "create-admin", "--email", email, "--display-name", "Ops Admin"],
        env={**os.environ, "PARLEY_DATA_DIR": str(parley.data_dir), "PARLEY_ADMIN_PASSWORD": ADMIN_PASSWORD},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert command.returncode == 0, command.stdout + command.stderr
    assert f"created admin {email}" in command.stdout
    assert ADMIN_PASSWORD not in command.stdout + command.stderr
    signed_in = login(parley, email, password=ADMIN_PASSWORD)
    user = signed_in["user"]
    assert (user["roles"], user["email_verified"]) == (["ROLE_USER", "ROLE_ADMIN"], True)
    assert unverified_claims(signed_in["tokens"]["access_token"])["roles"] == ["user", "admin"]
    assert [e.type for e in parley.auth_events(user["id"])][:3] == [
        "user.registered",
        "user.email_verified",
        "user.role_changed",
    ]
    assert not email_requests(parley.database, user_id=user["id"])
    return Admin(user["id"], bearer(signed_in["tokens"]["access_token"]))


def test_admins_list_find_disable_enable_and_set_roles(parley: Parley, admin: Admin) -> None:
    marker = uuid.uuid4().hex[:10]
    emails = [f"member-{marker}-{n}@example.com" for n in range(3)]
    oldest, middle, newest = (register(parley, email, name=f"Member {n}") for n, email in enumerate(emails))
    ok(
        parley.http.post(
            "/v1/auth/verify-email",
            json={"token": emailed_token(parley.database, user_id=middle["id"], template="verify_email")},
        )
    )

    # Newest first, one per page; the token carries the filters.
    pages: list[list[str]] = []
    page_token = ""
    while True:
        params: dict[str, str | int] = {"page_size": 1, "query": marker.upper()}
        if page_token:
            params["page_token"] = page_token
        page = ok(parley.http.get("/v1/admin/users", params=params, headers=admin.headers))
        pages.append([user["id"] for user in page["users"]])
        page_token = page["next_page_token"]
        if not page_token:
            break
        assert len(pages) < 5
    # The last page knows it is the last: no empty page after it.
    assert pages == [[newest["id"]], [middle["id"]], [oldest["id"]]]
    first_page = ok(
        parley.http.get("/v1/admin/users", params={"page_size": 1, "query": marker}, headers=admin.headers)
    )
    other_filters = parley.http.get(
        "/v1/admin/users",
        params={"page_size": 1, "query": "member", "page_token": first_page["next_page_token"]},
        headers=admin.headers,
    )
    assert_error(other_filters, status=400, code=3, reason="INVALID_PAGE_TOKEN")
    verified = ok(
        parley.http.get(
            "/v1/admin/users", params={"query": marker, "email_verified": "true"}, headers=admin.headers
        )
    )
    assert [user["id"] for user in verified["users"]] == [middle["id"]]
    unverified = ok(
        parley.http.get(
            "/v1/admin/users", params={"query": marker, "email_verified": "false"}, headers=admin.headers
        )
    )
    assert [user["id"] for user in unverified["users"]] == [newest["id"], oldest["id"]]

    found = ok(parley.http.get(f"/v1/admin/users/{oldest['id']}", headers=admin.headers))["user"]
    assert (found["id"], found["email"], found["display_name"]) == (oldest["id"], emails[0], "Member 0")
    missing = parley.http.get(f"/v1/admin/users/{uuid.uuid4()}", headers=admin.headers)
    assert_error(missing, status=404, code=5, reason="NOT_FOUND")

    member = login(parley, emails[0])
    member_token = member["tokens"]["access_token"]
    forbidden = parley.http.get("/v1/admin/users", headers=bearer(member_token))
    assert error_info(assert_error(forbidden, status=403, code=7, reason="PERMISSION_DENIED"))[
        "metadata"
    ] == {"role": "admin"}
    key_secret = ok(
        parley.http.post("/v1/users/me/api-keys", json={"name": "bot"}, headers=bearer(member_token))
    )["secret"]

    disabled = ok(
        parley.http.post(
            f"/v1/admin/users/{oldest['id']}:disable", json={"reason": "spam"}, headers=admin.headers
        )
    )
    assert disabled["user"]["disabled"] is True
    assert_recent(disabled["user"]["disable_time"])
    assert isinstance(disabled["revoked_session_count"], int)
    assert_error(me(parley, member_token), status=401, code=16, reason="SESSION_REVOKED")
    assert_error(
        refresh(parley, member["tokens"]["refresh_token"]), status=401, code=16, reason="SESSION_REVOKED"
    )
    refused_login = parley.http.post("/v1/auth/login", json={"email": emails[0], "password": PASSWORD})
    assert_error(refused_login, status=403, code=7, reason="ACCOUNT_DISABLED")
    # As the gateway's edge asks auth about keys and sessions.
    with parley.channel(parley.ports.grpc, as_="edge") as channel:
        internal = auth_pb2_grpc.AuthInternalServiceStub(channel)
        with pytest.raises(grpc.RpcError) as key_refused:
            internal.CheckApiKey(auth_pb2.CheckApiKeyRequest(api_key=key_secret), timeout=10)
        assert key_refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert grpc_error_reason(key_refused.value) == "ACCOUNT_DISABLED"

        assert parley.payloads("user.disabled", oldest["id"]) == [
            events_pb2.UserDisabled(user_id=oldest["id"], actor_user_id=admin.user_id, reason="spam")
        ]
        assert parley.payloads("session.revoked", oldest["id"]) == [
            events_pb2.SessionRevoked(
                user_id=oldest["id"],
                session_id=member["session"]["id"],
                reason=events_pb2.SESSION_REVOKE_REASON_USER_DISABLED,
                actor_user_id=admin.user_id,
            )
        ]
        assert [p.reason for p in parley.payloads("user.login_failed", oldest["id"])] == [
            events_pb2.LOGIN_FAILURE_REASON_DISABLED
        ]

        enabled = ok(
            parley.http.post(f"/v1/admin/users/{oldest['id']}:enable", json={}, headers=admin.headers)
        )
        assert enabled["user"]["disabled"] is False
        assert "disable_time" not in enabled["user"]
        assert parley.payloads("user.enabled", oldest["id"]) == [
            events_pb2.UserEnabled(user_id=oldest["id"], actor_user_id=admin.user_id)
        ]
        # Sessions stay ended; API keys work again.
        assert_error(me(parley, member_token), status=401, code=16, reason="SESSION_REVOKED")
        checked = internal.CheckApiKey(auth_pb2.CheckApiKeyRequest(api_key=key_secret), timeout=10)
        assert checked.identity.user_id == oldest["id"]

    wait_for_next_second()
    member = login(parley, emails[0])
    assert ok(me(parley, member["tokens"]["access_token"]))["user"]["disabled"] is False

    promoted = ok(
        parley.http.put(
            f"/v1/admin/users/{oldest['id']}/roles", json={"roles": ["ROLE_ADMIN"]}, headers=admin.headers
        )
    )["user"]
    assert promoted["roles"] == ["ROLE_USER", "ROLE_ADMIN"]
    assert parley.payloads("user.role_changed", oldest["id"]) == [
        events_pb2.UserRoleChanged(
            user_id=oldest["id"],
            previous_roles=[common_pb2.ROLE_USER],
            roles=[common_pb2.ROLE_USER, common_pb2.ROLE_ADMIN],
            actor_user_id=admin.user_id,
        )
    ]
    # The new role arrives with the next token.
    refreshed = ok(refresh(parley, member["tokens"]["refresh_token"]))["tokens"]
    assert unverified_claims(refreshed["access_token"])["roles"] == ["user", "admin"]
    as_admin = ok(
        parley.http.get(f"/v1/admin/users/{middle['id']}", headers=bearer(refreshed["access_token"]))
    )
    assert as_admin["user"]["id"] == middle["id"]

    demoted = ok(
        parley.http.put(f"/v1/admin/users/{oldest['id']}/roles", json={"roles": []}, headers=admin.headers)
    )
    assert demoted["user"]["roles"] == ["ROLE_USER"]
    # Tokens that still say "admin" stop working at once; the session itself stays.
    assert_error(me(parley, refreshed["access_token"]), status=401, code=16, reason="SESSION_REVOKED")
    wait_for_next_second()
    after = ok(refresh(parley, refreshed["refresh_token"]))["tokens"]
    assert unverified_claims(after["access_token"])["roles"] == ["user"]
    no_longer = parley.http.get("/v1/admin/users", headers=bearer(after["access_token"]))
    assert_error(no_longer, status=403, code=7, reason="PERMISSION_DENIED")


def test_the_last_admin_cannot_disable_themself(parley: Parley, admin: Admin) -> None:
    response = parley.http.post(f"/v1/admin/users/{admin.user_id}:disable", json={}, headers=admin.headers)
    assert_error(response, status=400, code=9, reason="LAST_ADMIN")
    assert ok(parley.http.get("/v1/users/me", headers=admin.headers))["user"]["disabled"] is False


def test_disabling_reports_how_many_sessions_ended(parley: Parley, admin: Admin) -> None:
    email = unique_email("count")
    user = register(parley, email)
    login(parley, email, user_agent=FIREFOX)
    login(parley, email, user_agent=CURL)
    disabled = ok(parley.http.post(f"/v1/admin/users/{user['id']}:disable", json={}, headers=admin.headers))
    assert len(parley.payloads("session.revoked", user["id"])) == 2
    assert disabled["revoked_session_count"] == 2


# ---- 10. the same core flow over gRPC -----------------------------------------------------------


@pytest.mark.parametrize("route", ["direct", "gateway"])
def test_the_core_flow_over_grpc(parley: Parley, route: str) -> None:
    port = parley.ports.grpc if route == "direct" else parley.ports.http
    email = unique_email(f"grpc-{route}")
    with parley.channel(port) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        registered = auth.Register(
            auth_pb2.RegisterRequest(email=email, password=PASSWORD, display_name="Over gRPC"), timeout=10
        ).user
        assert (registered.email, registered.email_verified, list(registered.roles)) == (
            email,
            False,
            [common_pb2.ROLE_USER],
        )

        signed_in = auth.Login(
            auth_pb2.LoginRequest(email=email, password=PASSWORD, device_name="  build server  "), timeout=10
        )
        assert signed_in.user.id == registered.id
        assert not signed_in.csrf_token
        session = signed_in.session
        assert (session.device, session.user_agent) == ("build server", GRPC_USER_AGENT)
        assert session.auth_method == common_pb2.AUTH_METHOD_JWT
        if route == "direct":
            assert session.ip_address == "127.0.0.1"
        else:
            ipaddress.ip_address(session.ip_address)
        tokens = signed_in.tokens
        claims = unverified_claims(tokens.access_token)
        assert (claims["sub"], claims["sid"]) == (registered.id, session.id)
        assert tokens.access_token_expire_time.ToSeconds() == claims["exp"]

        with pytest.raises(grpc.RpcError) as anonymous:
            auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), timeout=10)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_error_reason(anonymous.value) == "UNAUTHENTICATED"

        metadata = (("authorization", f"Bearer {tokens.access_token}"),)
        current = auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=metadata, timeout=10).user
        assert (current.id, current.display_name) == (registered.id, "Over gRPC")
        current.display_name = "Renamed over gRPC"
        updated = auth.UpdateCurrentUser(
            auth_pb2.UpdateCurrentUserRequest(
                user=current, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])
            ),
            metadata=metadata,
            timeout=10,
        ).user
        assert updated.display_name == "Renamed over gRPC"

        rotated = auth.RefreshSession(
            auth_pb2.RefreshSessionRequest(refresh_token=tokens.refresh_token), timeout=10
        ).tokens
        assert rotated.refresh_token != tokens.refresh_token
        assert unverified_claims(rotated.access_token)["sid"] == session.id
        fresh = (("authorization", f"Bearer {rotated.access_token}"),)
        assert (
            auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=fresh, timeout=10).user.id
            == registered.id
        )
        with pytest.raises(grpc.RpcError) as reused:
            auth.RefreshSession(
                auth_pb2.RefreshSessionRequest(refresh_token=tokens.refresh_token), timeout=10
            )
        assert reused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_error_reason(reused.value) == "REFRESH_TOKEN_REUSED"
        with pytest.raises(grpc.RpcError) as revoked:
            auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=fresh, timeout=10)
        assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_error_reason(revoked.value) == "SESSION_REVOKED"
    assert [e.type for e in parley.auth_events(registered.id)] == [
        "user.registered",
        "email.requested",
        "user.login_succeeded",
        "session.reuse_detected",
        "session.revoked",
    ]
