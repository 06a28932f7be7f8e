"""Edge authorization for Envoy's ext_authz filter: API keys, cookie sessions, and bearer JWTs that
Envoy's jwt_authn could not verify.

Envoy calls `Check` on protected routes for every request without an Envoy-verified JWT. The
credential is read by `services.common.credentials.presented_credential`, the parser the services
use too (its docstring has the order; the first credential present decides, and a refused one is
never replaced by another the request also carries). The edge accepts every kind:

1. An API key (`Authorization: Bearer pk_…` or `X-API-Key`) → `AuthInternalService.CheckApiKey`.
2. Another bearer token → the token verifier (Envoy's JWKS cache may be stale right after a key
   rotation; the verifier refetches on an unknown kid).
3. The `__Host-parley-access` cookie → `AuthInternalService.CheckSession`, with the CSRF cookie,
   the `x-csrf-token` header and the HTTP method.
4. Nothing → 401 UNAUTHENTICATED.

An allowed request reaches the services with the identity headers in the format Envoy's jwt_authn
`claim_to_headers` produces (roles as base64 of a JSON array), whichever credential it carried, and
with any API key removed; the same identity goes to Envoy's dynamic metadata for RBAC. A denial
carries the `google.rpc.Status` of the refusal as the JSON error body (or as
`grpc-status-details-bin` for gRPC clients). When auth cannot be asked, the request is denied with
503: the edge never fails open.

Answers from auth are cached in process for the `cache_ttl` auth returns (keyed by a SHA-256 of the
secret, never the secret itself), in a `WatchedCache` that `gateway.credential_feed` keeps current:
auth streams which users' credential decisions changed (a key revoked, a user disabled, roles,
password or sessions changed) and the cache forgets theirs within milliseconds. While that stream
is not confirmed current (`MAX_CONFIRMED_AGE_S`), no cached answer is used: every check goes to
auth. Methods whose contract marks them sensitive (`MethodAccess.sensitive`: creating a key,
changing the password or the profile) are always checked afresh, by auth from its database too.
Denials are cached for at most one second, in a cache of their own so a flood of bad keys cannot
evict the good ones. The CSRF double-submit check is never cached.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import grpc
import jwt
from cachetools import TLRUCache
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import any_pb2, struct_pb2
from google.protobuf.json_format import MessageToDict
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry, Counter, Histogram

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from services.common.credential_changes import MAX_CONFIRMED_AGE_S, Ticket, WatchedCache
from services.common.credentials import (
    API_KEY_HEADER,
    AUTHORIZATION_HEADER,
    Credential,
    CredentialKind,
    check_csrf,
    double_submitted_csrf,
    presented_credential,
)
from services.common.errors import (
    ERROR_DOMAIN,
    Internal,
    ParleyError,
    Unauthenticated,
    Unavailable,
    to_status,
)
from services.common.identity import (
    AUTH_METHOD_HEADER,
    IDENTITY_HEADERS,
    PLAN_HEADER,
    ROLES_HEADER,
    SESSION_ID_HEADER,
    TOKEN_TIME_HEADERS,
    USER_ID_HEADER,
    TokenVerifier,
    encode_roles_header,
)
from services.common.metrics import RPC_LATENCY_BUCKETS
from services.common.roles import ordered_roles, role_names
from services.common.safe_methods import is_safe_http_method

logger = logging.getLogger(__name__)

DEFAULT_CACHE_ENTRIES: Final = 10_000
DEFAULT_DENIAL_CACHE_ENTRIES: Final = 1_000
# Long enough to absorb a burst of retries with one bad key, short enough that a fixed key (or a
# restored session) works again at once.
MAX_DENIAL_CACHE_TTL_S: Final = 1.0
DEFAULT_AUTH_TIMEOUT_S: Final = 1.0
# An answer about a user who changed this recently is not cached: the auth replica that gave it may
# have answered from its own cache, which can be up to MAX_CONFIRMED_AGE_S behind the change feed.
SETTLE_AFTER_CHANGE_S: Final = 2 * MAX_CONFIRMED_AGE_S
REALM: Final = "parley"
ACCEPTED_CREDENTIALS: Final = (
    "This route needs a credential: an access token (Authorization: Bearer <token>), "
    "an API key (Authorization: Bearer pk_… or X-API-Key: pk_…), or a signed-in browser session."
)

# The metrics label: a credential kind, "malformed" (unparseable credential headers) or "none".
CredentialLabel = Literal["api_key", "cookie", "jwt", "malformed", "none"]

_HTTP_STATUS_BY_GRPC_CODE: Final = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# The answers of auth that are its verdict on the credential; anything else means auth could not
# decide, and the edge refuses with 503 instead of passing an internal fault on.
_VERDICT_CODES: Final = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


# ---- pure parts: headers, credentials, encodings ------------------------------------------------


def request_headers(http: Any) -> dict[str, str]:
    """The request headers of an `AttributeContext.HttpRequest`, by lower-case name.

    Envoy fills `header_map` instead of `headers` when `encode_raw_headers` is on; repeated headers
    are joined as Envoy joins them in `headers` (`; ` for cookies, `,` otherwise).
    """
    raw_headers = list(http.header_map.headers)
    if not raw_headers:
        return {str(name).lower(): str(value) for name, value in http.headers.items()}
    merged: dict[str, list[str]] = {}
    for header in raw_headers:
        value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
        merged.setdefault(str(header.key).lower(), []).append(value)
    return {name: ("; " if name == "cookie" else ",").join(values) for name, values in merged.items()}


def is_grpc_request(headers: Mapping[str, str]) -> bool:
    """A gRPC client's own call. ext_authz runs after the transcoder, so a JSON request arrives
    rewritten to gRPC too; the transcoder marks those with x-envoy-original-path."""
    grpc_content = headers.get("content-type", "").lower().startswith("application/grpc")
    return grpc_content and "x-envoy-original-path" not in headers


def token_time_headers(token: str) -> dict[str, str]:
    """The time-claim identity headers of a JWT (`TOKEN_TIME_HEADERS`), as jwt_authn's
    claim_to_headers writes them; read without verification, so call only once the token is verified.
    A claim that is absent or not whole seconds gets no header (and the services refuse the identity)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}
    headers = {}
    for header, claim in TOKEN_TIME_HEADERS:
        value = claims.get(claim)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            headers[header] = str(value)
    return headers


def secret_digest(kind: CredentialKind, secret: str) -> str:
    """The cache key of a credential: a SHA-256, so no secret is ever held as a key."""
    return hashlib.sha256(f"{kind}\0{secret}".encode()).hexdigest()


# ---- decisions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EdgeIdentity:
    """Who an allowed request acts for, as the identity headers will say."""

    user_id: str
    session_id: str
    plan: str
    roles: tuple[str, ...]
    auth_method: CredentialKind
    # The token's time claims (`token_time_headers`) when a JWT (bearer or cookie) is involved: the
    # services check them by the token rules, as for an identity Envoy's jwt_authn vouches for.
    token_times: Mapping[str, str] = field(default_factory=dict, hash=False)

    def upstream_headers(self) -> dict[str, str]:
        """The identity headers to set; a header whose value is empty is left out (and removed)."""
        values = {
            USER_ID_HEADER: self.user_id,
            SESSION_ID_HEADER: self.session_id,
            PLAN_HEADER: self.plan,
            # Encoded by the one function services decode with (`decode_roles_header`).
            ROLES_HEADER: encode_roles_header(self.roles),
            AUTH_METHOD_HEADER: self.auth_method,
            **self.token_times,
        }
        return {name: value for name, value in values.items() if value}

    def dynamic_metadata(self) -> struct_pb2.Struct:
        """What Envoy stores under `envoy.filters.http.ext_authz` for RBAC and rate limits."""
        metadata = struct_pb2.Struct()
        metadata.update({"roles": list(self.roles), "user_id": self.user_id, "auth_method": self.auth_method})
        return metadata


@dataclass(frozen=True)
class Denial:
    """A refusal: its `google.rpc.Status` without the per-request `RequestInfo`."""

    status: status_pb2.Status
    # Whether the refusal is about a credential the request presented (RFC 6750 `invalid_token`).
    credential_refused: bool

    @classmethod
    def of(cls, error: ParleyError, *, credential_refused: bool) -> Denial:
        return cls(to_status(error), credential_refused)

    @property
    def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = rpc_status.to_status(self.status).code
        return code

    @property
    def reason(self) -> str:
        info = _error_info(self.status)
        return info.reason if info is not None else ""

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS_BY_GRPC_CODE.get(self.code, 500)

    def with_request_id(self, request_id: str) -> status_pb2.Status:
        status = status_pb2.Status()
        status.CopyFrom(self.status)
        if request_id:
            detail = status.details.add()
            detail.Pack(error_details_pb2.RequestInfo(request_id=request_id))
        return status


Decision = EdgeIdentity | Denial


def _error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def _without_request_info(details: Iterable[any_pb2.Any]) -> list[any_pb2.Any]:
    return [detail for detail in details if not detail.Is(error_details_pb2.RequestInfo.DESCRIPTOR)]


def _overwrite(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def allowed_response(identity: EdgeIdentity, credential: Credential) -> Any:
    """The `CheckResponse` that lets the request through with `identity`'s headers and metadata."""
    headers = identity.upstream_headers()
    # An identity header this credential cannot fill is removed, so no stale value rides along.
    to_remove = [name for name in IDENTITY_HEADERS if name not in headers]
    # Services never see key secrets: an API key leaves the request here, in either header.
    to_remove.append(API_KEY_HEADER)
    if credential.kind == "api_key" and credential.header == AUTHORIZATION_HEADER:
        to_remove.append(AUTHORIZATION_HEADER)
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=grpc.StatusCode.OK.value[0]),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[_overwrite(name, value) for name, value in headers.items()],
            headers_to_remove=to_remove,
        ),
        dynamic_metadata=identity.dynamic_metadata(),
    )


def denied_response(denial: Denial, *, request_id: str, grpc_client: bool) -> Any:
    """The `CheckResponse` that refuses the request, shaped for a JSON or a gRPC client."""
    status = denial.with_request_id(request_id)
    headers: list[base_pb2.HeaderValueOption] = []
    if denial.http_status == 401:
        challenge = f'Bearer realm="{REALM}"'
        if denial.credential_refused:
            challenge += ', error="invalid_token"'
        headers.append(_overwrite("www-authenticate", challenge))
    if grpc_client:
        # Envoy turns the body into grpc-message; the details travel as they do from a service.
        details = base64.b64encode(status.SerializeToString()).decode("ascii")
        headers.append(_overwrite("grpc-status-details-bin", details))
        body = status.message
    else:
        headers.append(_overwrite("content-type", "application/json"))
        body = json.dumps(MessageToDict(status, preserving_proto_field_name=True), separators=(",", ":"))
    return external_auth_pb2.CheckResponse(
        status=status,
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=denial.http_status), headers=headers, body=body
        ),
    )


# ---- cache and metrics --------------------------------------------------------------------------


def _expires_after_its_ttl(_key: str, entry: tuple[object, float], now: float) -> float:
    """cachetools' time-to-use of a cached answer stored as (answer, TTL in seconds)."""
    return now + entry[1]


def _answer_cache(max_entries: int, monotonic: Callable[[], float]) -> TLRUCache[str, Any]:
    """A bounded LRU of answers by credential digest, each expiring after its own TTL; an answer
    whose TTL is not positive is not kept (and removes an older one for the same credential)."""
    if max_entries < 1:
        raise ValueError("a cache needs room for at least one entry")
    return TLRUCache(max_entries, ttu=_expires_after_its_ttl, timer=monotonic)


class EdgeAuthzMetrics:
    """Decisions by credential kind and result, cache lookups, and the latency of calls to auth."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.checks = Counter(
            "parley_edge_authz_checks_total",
            "ext_authz decisions, by credential kind and result (allow, deny, unavailable).",
            ("credential", "result"),
            registry=registry,
        )
        self.cache_lookups = Counter(
            "parley_edge_authz_cache_lookups_total",
            "Lookups of cached auth answers, by credential kind and outcome (hit, miss; unconfirmed: "
            "the credential-change feed is not current, sensitive: the method is checked afresh).",
            ("credential", "outcome"),
            registry=registry,
        )
        self.auth_latency = Histogram(
            "parley_edge_authz_auth_call_seconds",
            "Time the edge waited for auth's CheckApiKey / CheckSession, by outcome.",
            ("rpc", "outcome"),
            buckets=RPC_LATENCY_BUCKETS,
            registry=registry,
        )


# ---- the authorizer -----------------------------------------------------------------------------


class EdgeAuthorizer:
    """Decides Envoy's ext_authz checks; see the module docstring."""

    def __init__(
        self,
        auth: auth_pb2_grpc.AuthInternalServiceAsyncStub,
        token_verifier: TokenVerifier,
        *,
        confirmed_age_s: Callable[[], float | None],
        sensitive_paths: frozenset[str] = frozenset(),
        registry: CollectorRegistry | None = None,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
        denial_cache_entries: int = DEFAULT_DENIAL_CACHE_ENTRIES,
        denial_cache_ttl_s: float = MAX_DENIAL_CACHE_TTL_S,
        auth_timeout_s: float = DEFAULT_AUTH_TIMEOUT_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`confirmed_age_s`: how long ago the credential-change feed was last confirmed current
        (`gateway.credential_feed`); None, or `MAX_CONFIRMED_AGE_S` and more, and nothing cached is
        used. `sensitive_paths`: the gRPC paths (`/pkg.Service/Method`) always checked afresh."""
        self._auth = auth
        self._verifier = token_verifier
        self._sensitive_paths = sensitive_paths
        self._metrics = EdgeAuthzMetrics(registry if registry is not None else CollectorRegistry())
        # Identities by `secret_digest`, each about its user; (denial, TTL) by `secret_digest`.
        self._allowed: WatchedCache[EdgeIdentity] = WatchedCache(
            max_entries=cache_entries,
            confirmed_age_s=confirmed_age_s,
            timer=monotonic,
            settle_s=SETTLE_AFTER_CHANGE_S,
        )
        self._denied = _answer_cache(denial_cache_entries, monotonic)
        self._denial_ttl_s = min(max(denial_cache_ttl_s, 0.0), MAX_DENIAL_CACHE_TTL_S)
        self._auth_timeout_s = auth_timeout_s
        self._monotonic = monotonic

    @property
    def metrics(self) -> EdgeAuthzMetrics:
        return self._metrics

    @property
    def decisions(self) -> WatchedCache[EdgeIdentity]:
        """The cache of allowed answers, for the credential-change feed to keep current."""
        return self._allowed

    async def check(self, request: Any) -> Any:
        """The `CheckResponse` for Envoy's `CheckRequest`."""
        http = request.attributes.request.http
        headers = request_headers(http)
        request_id = headers.get("x-request-id") or str(http.id)
        label: CredentialLabel = "none"
        credential: Credential | None = None
        decision: Decision
        try:
            credential = presented_credential(headers)
            label = credential.kind if credential is not None else "none"
            # After transcoding every JSON call is a POST; CSRF is about the method the client used.
            method = headers.get("x-envoy-original-method") or str(http.method)
            # After transcoding the path is the gRPC one, `/pkg.Service/Method`, for every client.
            sensitive = str(http.path).split("?", 1)[0] in self._sensitive_paths
            decision = await self._decide(credential, headers, method, request_id, sensitive=sensitive)
        except ParleyError as error:
            if label == "none":
                label = "malformed"
            decision = Denial.of(error, credential_refused=True)
        # Whatever goes wrong here, the request is refused: the edge never fails open.
        except Exception:
            logger.exception("the edge authorization check failed", extra={"request_id": request_id})
            decision = Denial.of(
                Internal("The gateway failed while checking the credential.", reason="GATEWAY_ERROR"),
                credential_refused=False,
            )
        if isinstance(decision, EdgeIdentity):
            assert credential is not None
            self._metrics.checks.labels(label, "allow").inc()
            return allowed_response(decision, credential)
        result = "unavailable" if decision.http_status >= 500 else "deny"
        self._metrics.checks.labels(label, result).inc()
        return denied_response(decision, request_id=request_id, grpc_client=is_grpc_request(headers))

    async def _decide(
        self,
        credential: Credential | None,
        headers: Mapping[str, str],
        method: str,
        request_id: str,
        *,
        sensitive: bool,
    ) -> Decision:
        if credential is None:
            return Denial.of(Unauthenticated(ACCEPTED_CREDENTIALS), credential_refused=False)
        if credential.kind == "api_key":
            return await self._check_api_key(credential.secret, request_id, sensitive=sensitive)
        if credential.kind == "cookie":
            return await self._check_session(
                credential.secret, headers, method, request_id, sensitive=sensitive
            )
        return await self._verify_token(credential.secret)

    async def _verify_token(self, token: str) -> Decision:
        try:
            verified = await self._verifier.verify(token)
        except ParleyError as error:
            return Denial.of(error, credential_refused=True)
        return EdgeIdentity(
            user_id=verified.user_id,
            session_id=verified.session_id,
            plan=verified.plan,
            roles=ordered_roles(verified.roles),
            auth_method="jwt",
            token_times=token_time_headers(token),
        )

    async def _check_api_key(self, api_key: str, request_id: str, *, sensitive: bool) -> Decision:
        if not api_key:
            return Denial.of(
                Unauthenticated(
                    "The API key is not valid.", reason="API_KEY_INVALID", metadata={"cause": "malformed"}
                ),
                credential_refused=True,
            )
        key = secret_digest("api_key", api_key)
        cached = self._cached("api_key", key, sensitive=sensitive)
        if cached is not None:
            return cached
        ticket = self._allowed.ticket()
        started = self._monotonic()
        try:
            reply = await self._auth.CheckApiKey(
                auth_pb2.CheckApiKeyRequest(api_key=api_key, skip_cache=sensitive),
                timeout=self._auth_timeout_s,
                metadata=_forwarded(request_id),
            )
        except grpc.aio.AioRpcError as error:
            return self._refused_by_auth("CheckApiKey", error, started, key)
        self._observe("CheckApiKey", "ok", started)
        identity = EdgeIdentity(
            user_id=reply.identity.user_id,
            session_id=reply.identity.session_id,
            plan=reply.identity.plan_id,
            roles=role_names(reply.identity.roles),
            auth_method="api_key",
        )
        self._remember(key, identity, reply.cache_ttl.ToTimedelta().total_seconds(), ticket)
        return identity

    async def _check_session(
        self, access_token: str, headers: Mapping[str, str], method: str, request_id: str, *, sensitive: bool
    ) -> Decision:
        safe = is_safe_http_method(method)
        key = secret_digest("cookie", access_token)
        cached = self._cached("cookie", key, sensitive=sensitive)
        if cached is not None:
            if isinstance(cached, EdgeIdentity) and not safe:
                # A cached session says who; whether this request is forged is decided afresh, always.
                check_csrf(*double_submitted_csrf(headers))
            return cached
        # Auth checks the tokens along with the session; a safe call needs none.
        csrf_header, csrf_cookie = ("", "") if safe else double_submitted_csrf(headers)
        ticket = self._allowed.ticket()
        started = self._monotonic()
        try:
            reply = await self._auth.CheckSession(
                auth_pb2.CheckSessionRequest(
                    session_cookie=access_token,
                    csrf_cookie=csrf_cookie,
                    csrf_header=csrf_header,
                    http_method=method.upper(),
                ),
                timeout=self._auth_timeout_s,
                metadata=_forwarded(request_id),
            )
        except grpc.aio.AioRpcError as error:
            return self._refused_by_auth("CheckSession", error, started, key)
        self._observe("CheckSession", "ok", started)
        identity = EdgeIdentity(
            user_id=reply.identity.user_id,
            session_id=reply.identity.session_id,
            plan=reply.identity.plan_id,
            roles=role_names(reply.identity.roles),
            auth_method="cookie",
            token_times=token_time_headers(access_token),
        )
        self._remember(key, identity, reply.cache_ttl.ToTimedelta().total_seconds(), ticket)
        return identity

    def _cached(self, kind: CredentialKind, key: str, *, sensitive: bool) -> Decision | None:
        """A cached answer for the credential: an allowed one only while the cache is trusted and the
        method is not sensitive; a denial always (refusing is never unsafe)."""
        found: Decision | None = None
        if sensitive:
            outcome = "sensitive"
        elif not self._allowed.trusted:
            outcome = "unconfirmed"
        else:
            found = self._allowed.get(key)
            outcome = "miss" if found is None else "hit"
        if found is None:
            denied: tuple[Denial, float] | None = self._denied.get(key)
            if denied is not None:
                found, outcome = denied[0], "hit"
        self._metrics.cache_lookups.labels(kind, outcome).inc()
        return found

    def _remember(self, key: str, identity: EdgeIdentity, ttl_s: float, ticket: Ticket) -> None:
        self._allowed.put(key, identity.user_id, identity, ttl_s=ttl_s, ticket=ticket)

    def _refused_by_auth(self, rpc: str, error: grpc.aio.AioRpcError, started: float, key: str) -> Denial:
        code = error.code()
        if code not in _VERDICT_CODES:
            self._observe(rpc, "unavailable", started)
            logger.warning(
                "auth could not check a credential; refusing the request",
                extra={"rpc": rpc, "grpc_code": code.name, "details": error.details()},
            )
            return Denial.of(
                Unavailable(
                    "Credentials cannot be checked right now; retry shortly.",
                    reason="SERVICE_UNAVAILABLE",
                    metadata={"dependency": "auth"},
                ),
                credential_refused=False,
            )
        self._observe(rpc, "refused", started)
        denial = Denial(_status_from(error), credential_refused=True)
        # A CSRF refusal belongs to this request, not to the session: the next GET must still pass.
        if not denial.reason.startswith("CSRF_"):
            self._denied[key] = (denial, self._denial_ttl_s)
        return denial

    def _observe(self, rpc: str, outcome: str, started: float) -> None:
        self._metrics.auth_latency.labels(rpc, outcome).observe(self._monotonic() - started)


def _forwarded(request_id: str) -> tuple[tuple[str, str], ...]:
    """Metadata for calls to auth: the request id, so auth's logs and errors join the request's."""
    return (("x-request-id", request_id),) if request_id else ()


def _status_from(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The `google.rpc.Status` auth sent in `grpc-status-details-bin`, minus its RequestInfo (the
    edge adds its own); a bare status gets an ErrorInfo for its code's generic reason."""
    code = error.code()
    try:
        sent = rpc_status.from_call(error)
    except ValueError:
        sent = None  # details that contradict the call's own status are not passed on
    if sent is not None:
        status = status_pb2.Status(code=sent.code, message=sent.message)
        status.details.extend(_without_request_info(sent.details))
        if _error_info(status) is not None:
            return status
    status = status_pb2.Status(code=code.value[0], message=error.details() or "The credential was refused.")
    info = status.details.add()
    reason = "UNAUTHENTICATED" if code == grpc.StatusCode.UNAUTHENTICATED else "PERMISSION_DENIED"
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    return status


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    """`envoy.service.auth.v3.Authorization` on grpc.aio: decodes nothing itself, asks the authorizer."""

    def __init__(self, authorizer: EdgeAuthorizer) -> None:
        self._authorizer = authorizer

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._authorizer.check(request)


def add_authorization_service(server: grpc.aio.Server, authorizer: EdgeAuthorizer) -> None:
    """Serve Envoy's ext_authz API from `server` (call before the server starts)."""
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AuthorizationServicer(authorizer), server)
