"""What a request presents as its credential: read one way by the gateway's ext_authz check
(`gateway/authz.py`) and by the services' identity interceptor (`services/common/identity.py`).

A request counts at most one credential, looked for in this order; the first one present decides,
and a refused credential is never replaced by another one the request also carries:

1. `Authorization: Bearer <token>`: an API key when the token starts with `pk_`, else an access JWT.
   Any other `Authorization` value is refused (TOKEN_INVALID, cause `malformed`).
2. `X-API-Key: <key>`: an API key.
3. The `__Host-parley-access` cookie: an access JWT (a browser session). An empty value, or two
   different values, is refused (TOKEN_INVALID, cause `malformed` / `duplicate_cookie`).

A cookie session's state-changing calls must also double-submit the CSRF token: the
`__Host-parley-csrf` cookie repeated in the `X-CSRF-Token` header (`check_csrf`); which calls are
state-changing is `services.common.safe_methods`' one definition.

This module only reads what was presented; what each caller accepts is its own policy. The gateway
accepts all three kinds and asks the auth service about API keys and cookie sessions; a service
verifies access JWTs itself and refuses API keys, which only the gateway resolves.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from services.common.errors import PermissionDenied, Unauthenticated

AUTHORIZATION_HEADER: Final = "authorization"
API_KEY_HEADER: Final = "x-api-key"
COOKIE_HEADER: Final = "cookie"
API_KEY_PREFIX: Final = "pk_"
# Browser sessions (login with TOKEN_DELIVERY_COOKIE). `__Host-` makes the browser insist on Secure,
# Path=/ and no Domain, so no sibling host can plant them. The auth servicer sets them at login.
ACCESS_TOKEN_COOKIE: Final = "__Host-parley-access"  # noqa: S105 - a cookie name
REFRESH_TOKEN_COOKIE: Final = "__Host-parley-refresh"  # noqa: S105 - a cookie name
CSRF_COOKIE: Final = "__Host-parley-csrf"
# Double-submit: a state-changing call authenticated by cookie repeats the CSRF cookie in this header,
# which another site's page can neither read nor set.
CSRF_HEADER: Final = "x-csrf-token"

CredentialKind = Literal["api_key", "cookie", "jwt"]


@dataclass(frozen=True)
class Credential:
    """What the request presented, and where: `header` is `authorization`, `x-api-key` or `cookie`."""

    kind: CredentialKind
    secret: str = field(repr=False)
    header: str


def invalid_token(message: str, cause: str, **extra: str) -> Unauthenticated:
    """A refused access token or credential header: TOKEN_INVALID with its `cause`."""
    return Unauthenticated(message, reason="TOKEN_INVALID", metadata={"cause": cause, **extra})


def presented_credential(headers: Mapping[str, str]) -> Credential | None:
    """The credential that decides the request (see the module docstring for the order), or None.

    `headers` are the request headers (or gRPC metadata) by lower-case name, repeated cookie headers
    joined with `; `. Raises `Unauthenticated` TOKEN_INVALID for an `Authorization` header that is not
    `Bearer <token>`, an empty access cookie, or conflicting access cookies.
    """
    authorization = headers.get(AUTHORIZATION_HEADER, "").strip()
    if authorization:
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise invalid_token("The authorization header must be 'Bearer <token>'.", "malformed")
        kind: CredentialKind = "api_key" if token.startswith(API_KEY_PREFIX) else "jwt"
        return Credential(kind, token, AUTHORIZATION_HEADER)
    api_key = headers.get(API_KEY_HEADER)
    if api_key is not None:
        return Credential("api_key", api_key.strip(), API_KEY_HEADER)
    access_token = single_cookie(parse_cookies(headers.get(COOKIE_HEADER, "")), ACCESS_TOKEN_COOKIE)
    if access_token is None:
        return None
    if not access_token:
        raise invalid_token("The access cookie is empty.", "malformed")
    return Credential("cookie", access_token, COOKIE_HEADER)


def parse_cookies(header: str) -> dict[str, list[str]]:
    """Cookie header values (RFC 6265 `name=value; name2=value2`) by name, in order of appearance."""
    cookies: dict[str, list[str]] = {}
    for pair in header.split(";"):
        name, separator, value = pair.partition("=")
        name = name.strip()
        if not separator or not name:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        cookies.setdefault(name, []).append(value)
    return cookies


def single_cookie(cookies: Mapping[str, list[str]], name: str) -> str | None:
    """The cookie's value; several different values are refused, since which one counts is ambiguous."""
    values = cookies.get(name)
    if not values:
        return None
    if len(set(values)) > 1:
        if name == CSRF_COOKIE:
            raise PermissionDenied(
                "The request carries conflicting CSRF cookies.",
                reason="CSRF_TOKEN_MISMATCH",
                metadata={"cause": "duplicate_cookie"},
            )
        raise invalid_token(f"The request carries conflicting {name} cookies.", "duplicate_cookie")
    return values[0]


def double_submitted_csrf(headers: Mapping[str, str]) -> tuple[str, str]:
    """The CSRF token of the `X-CSRF-Token` header and that of the CSRF cookie ("" when absent)."""
    cookie = single_cookie(parse_cookies(headers.get(COOKIE_HEADER, "")), CSRF_COOKIE)
    return headers.get(CSRF_HEADER, ""), cookie or ""


def check_csrf(header_token: str | None, cookie_token: str | None) -> None:
    """The double-submit check: both present and equal (constant-time), else PERMISSION_DENIED."""
    if not header_token:
        raise PermissionDenied(
            f"A state-changing request signed in by cookie needs the {CSRF_HEADER} header.",
            reason="CSRF_TOKEN_MISSING",
            metadata={"cause": "header"},
        )
    if not cookie_token:
        raise PermissionDenied(
            f"A state-changing request signed in by cookie needs the {CSRF_COOKIE} cookie.",
            reason="CSRF_TOKEN_MISSING",
            metadata={"cause": "cookie"},
        )
    if not hmac.compare_digest(header_token.encode(), cookie_token.encode()):
        raise PermissionDenied(
            f"The {CSRF_HEADER} header does not match the CSRF cookie.", reason="CSRF_TOKEN_MISMATCH"
        )
