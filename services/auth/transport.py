"""What the auth servicers read from and write to the HTTP/gRPC envelope: client address, user
agent, cookies. The domain never sees metadata; the servicers use these helpers to translate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc

from services.common.call_context import current_via_gateway
from services.common.credentials import (
    ACCESS_TOKEN_COOKIE,
    CSRF_COOKIE,
    REFRESH_TOKEN_COOKIE,
    parse_cookies,
)

# Browsers only accept a __Host- cookie that is Secure, has Path=/ and no Domain.
_COOKIE_ATTRIBUTES = "Path=/; Secure; SameSite=Strict"


@dataclass(frozen=True)
class Caller:
    """Where a request came from, as far as the envelope tells."""

    ip_address: str
    user_agent: str
    cookies: Mapping[str, list[str]]

    def cookie(self, name: str) -> str:
        values = self.cookies.get(name) or [""]
        return values[0]


def caller_of(context: grpc.aio.ServicerContext) -> Caller:
    """The client IP (the last X-Forwarded-For hop, which the gateway appends; else the peer), the
    user agent, and the cookies."""
    metadata: dict[str, list[str]] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            metadata.setdefault(key, []).append(value)
    # X-Forwarded-For is believed only from the gateway, which appends the peer it saw; a direct
    # caller could otherwise pick a new address per attempt and walk past the per-IP throttle.
    forwarded = ",".join(metadata.get("x-forwarded-for", [])) if current_via_gateway.get() else ""
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    ip_address = hops[-1] if hops else _peer_ip(context.peer() or "")
    user_agent = (metadata.get("user-agent") or [""])[0]
    # grpc appends its own product token to the user agent of gRPC clients; keep the caller's part.
    user_agent = user_agent.split(" grpc-python", 1)[0][:1000]
    cookies = parse_cookies("; ".join(metadata.get("cookie", [])))
    return Caller(ip_address=ip_address[:64], user_agent=user_agent, cookies=cookies)


def _peer_ip(peer: str) -> str:
    # grpc peers look like "ipv4:127.0.0.1:5555" or "ipv6:[::1]:5555".
    kind, _, address = peer.partition(":")
    if kind == "ipv4":
        return address.rsplit(":", 1)[0]
    if kind == "ipv6":
        return address.rsplit(":", 1)[0].strip("[]")
    return ""


def session_cookies(
    *,
    access_token: str,
    access_expires: datetime,
    refresh_token: str,
    refresh_expires: datetime,
    csrf_token: str,
) -> list[str]:
    """Set-Cookie values for a cookie session: HttpOnly access and refresh tokens, and the CSRF token
    (also HttpOnly: the page reads it from the login response body and echoes it in X-CSRF-Token)."""
    return [
        _set_cookie(ACCESS_TOKEN_COOKIE, access_token, access_expires),
        _set_cookie(REFRESH_TOKEN_COOKIE, refresh_token, refresh_expires),
        _set_cookie(CSRF_COOKIE, csrf_token, refresh_expires),
    ]


def cleared_cookies() -> list[str]:
    """Set-Cookie values that delete the session cookies (logout)."""
    return [
        f"{name}=; {_COOKIE_ATTRIBUTES}; HttpOnly; Max-Age=0"
        for name in (ACCESS_TOKEN_COOKIE, REFRESH_TOKEN_COOKIE, CSRF_COOKIE)
    ]


def _set_cookie(name: str, value: str, expires: datetime) -> str:
    stamp = expires.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    return f"{name}={value}; {_COOKIE_ATTRIBUTES}; HttpOnly; Expires={stamp}"


async def send_cookies(context: grpc.aio.ServicerContext, cookies: Sequence[str]) -> None:
    """Send Set-Cookie headers; Envoy's transcoder passes initial metadata on as response headers."""
    await context.send_initial_metadata(tuple(("set-cookie", cookie) for cookie in cookies))
