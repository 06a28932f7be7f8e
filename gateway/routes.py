"""The gateway's per-method routes: where each RPC goes and what the edge does on the way.

One route per public gRPC method (`/pkg.Service/Method`), because methods differ in what the edge
must do: open or authenticated, which role, which rate limits and what happens when the limiter is
down, how long it may run, whether it may be retried, and which API version (and deprecation) it
answers for. JSON requests reach these routes too: the transcoder rewrites them to the gRPC path
before any of those filters run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.utils import format_datetime
from typing import Any, Final

from gateway.descriptors import MethodInfo, ServiceInfo, binding_verb_and_path, http_bindings
from gateway.settings import Deprecation, GatewayConfigError, GatewaySettings
from services.common.identity import GATEWAY_HEADER_PREFIX, PLAN_HEADER, USER_ID_HEADER
from services.common.ratelimit import RateLimitConfig, RouteDescriptor, RouteLimits

API_VERSION_RESPONSE_HEADER = "Parley-API-Version"
RBAC_FILTER = "envoy.filters.http.rbac"
ROUTE_HEADERS_FILTER = "parley.route_request_headers"
HEADER_MUTATION_PER_ROUTE = (
    "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute"
)
# Names the role a route needs, for the 403 (gateway/local_replies.py); gateway-only, like every
# header with the prefix.
REQUIRED_ROLE_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}required-role"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
# Turns ext_authz off for a route anyone may call.
EXT_AUTHZ_DISABLED = {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
    "disabled": True,
}
JWT_FILTER = "envoy.filters.http.jwt_authn"
# Where jwt_authn puts the verified payload, and the key ext_authz's answer uses for roles.
JWT_PAYLOAD_METADATA_KEY = "jwt_payload"

# What every request a service receives looks like: gRPC, gRPC-Web and the JSON requests the
# transcoder rewrote are all POSTs with a gRPC content type (gRPC-Web's `application/grpc-web…` too).
# Anything else on a method's path is answered by the gateway (405 or 404), never forwarded.
GRPC_METHOD: Final = "POST"
GRPC_REQUEST_HEADERS: Final = (
    {"name": ":method", "string_match": {"exact": GRPC_METHOD}},
    {"name": "content-type", "string_match": {"prefix": "application/grpc"}},
)

# Rate-limit stages: one ratelimit filter per failure mode, so a route picks its mode by stage.
FAIL_OPEN_STAGE = 0
FAIL_CLOSED_STAGE = 1


@dataclass(frozen=True)
class RateLimitFilter:
    """One `envoy.filters.http.ratelimit` instance of the chain."""

    name: str
    stage: int
    stat_prefix: str
    failure_mode_deny: bool
    description: str


RATE_LIMIT_FILTERS = (
    RateLimitFilter(
        name="parley.rate_limit_fail_open",
        stage=FAIL_OPEN_STAGE,
        stat_prefix="fail_open",
        failure_mode_deny=False,
        description="limits whose routes keep serving when the limiter is down.",
    ),
    RateLimitFilter(
        name="parley.rate_limit_fail_closed",
        stage=FAIL_CLOSED_STAGE,
        stat_prefix="fail_closed",
        failure_mode_deny=True,
        description="limits whose routes refuse (503) when the limiter is down, e.g. login.",
    ),
)


@dataclass(frozen=True)
class RouteTarget:
    """Where a service's calls go: its upstream cluster."""

    service: ServiceInfo
    cluster: str


def method_key(service: ServiceInfo, method: MethodInfo) -> str:
    """`parley.auth.v1.AuthService/Login`: how the settings and rate-limit files name a method."""
    return f"{service.full_name}/{method.name}"


def _descriptor_actions(descriptor: RouteDescriptor) -> list[dict[str, Any]]:
    actions: list[dict[str, Any]] = [
        {"generic_key": {"descriptor_key": "limit", "descriptor_value": descriptor.limit}}
    ]
    if descriptor.only_anonymous:
        # Present only when no identity header was set: Envoy drops the whole descriptor otherwise.
        actions.append(
            {
                "header_value_match": {
                    "descriptor_key": "caller",
                    "descriptor_value": "anonymous",
                    "expect_match": False,
                    "headers": [{"name": USER_ID_HEADER, "present_match": True}],
                }
            }
        )
    for entry in descriptor.entries:
        if entry == "remote_address":
            actions.append({"remote_address": {}})
        elif entry == "user":
            actions.append({"request_headers": {"header_name": USER_ID_HEADER, "descriptor_key": "user"}})
        elif entry == "plan":
            # An identity without a plan still gets a per-user limit (the file's fallback for plans).
            actions.append(
                {
                    "request_headers": {
                        "header_name": PLAN_HEADER,
                        "descriptor_key": "plan",
                        "skip_if_absent": True,
                    }
                }
            )
        else:  # pragma: no cover - the rate-limit config loader refuses unknown sources
            raise ValueError(f"unknown rate-limit descriptor source {entry!r}")
    return actions


def rate_limits_for(limits: Sequence[RouteLimits]) -> list[dict[str, Any]]:
    """Envoy `rate_limits` for a route governed by `limits` (the default, then the method's own)."""
    rendered: list[dict[str, Any]] = []
    for route_limits in limits:
        stage = FAIL_CLOSED_STAGE if route_limits.on_failure == "deny" else FAIL_OPEN_STAGE
        rendered.extend(
            {"stage": stage, "actions": _descriptor_actions(descriptor)}
            for descriptor in route_limits.descriptors
        )
    return rendered


def _role_policy(role: str) -> dict[str, Any]:
    """RBAC allowing callers that hold `role`, from the verified JWT or from ext_authz's answer."""
    has_role = {"list_match": {"one_of": {"string_match": {"exact": role}}}}
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
        "rbac": {
            "rules": {
                "action": "ALLOW",
                "policies": {
                    f"has_role_{role}": {
                        "permissions": [{"any": True}],
                        "principals": [
                            {
                                "sourced_metadata": {
                                    "metadata_matcher": {
                                        "filter": JWT_FILTER,
                                        "path": [{"key": JWT_PAYLOAD_METADATA_KEY}, {"key": "roles"}],
                                        "value": has_role,
                                    }
                                }
                            },
                            {
                                "sourced_metadata": {
                                    "metadata_matcher": {
                                        "filter": EXT_AUTHZ_FILTER,
                                        "path": [{"key": "roles"}],
                                        "value": has_role,
                                    }
                                }
                            },
                        ],
                    }
                },
            }
        },
    }


def _required_role_header(role: str) -> dict[str, Any]:
    """Names the role on the request, so a 403 can say which one was missing."""
    return {
        "@type": HEADER_MUTATION_PER_ROUTE,
        "mutations": {
            "request_mutations": [
                {
                    "append": {
                        "header": {"key": REQUIRED_ROLE_HEADER, "value": role},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                }
            ]
        },
    }


def _successor_link(method: MethodInfo, successor: ServiceInfo | None) -> str | None:
    """The same method's path in the successor version (its collection when the path is templated)."""
    if successor is None:
        return None
    match = next((candidate for candidate in successor.methods if candidate.name == method.name), None)
    if match is None or not match.http_paths:
        return f"</{successor.version}/>"
    path = match.http_paths[0]
    if "{" in path:
        path = path[: path.index("{")].rstrip("/")
    return f"<{path}>"


def _version_headers(
    service: ServiceInfo,
    method: MethodInfo,
    deprecation: Deprecation | None,
    successor: ServiceInfo | None,
) -> list[dict[str, Any]]:
    headers = [(API_VERSION_RESPONSE_HEADER, service.version)]
    if deprecation is not None:
        # RFC 9745: an sf-date; RFC 8594: an IMF-fixdate.
        headers.append(("Deprecation", f"@{int(deprecation.deprecated_at.timestamp())}"))
        headers.append(("Sunset", format_datetime(deprecation.sunset, usegmt=True)))
        link = _successor_link(method, successor)
        if link is not None:
            headers.append(("Link", f'{link}; rel="successor-version"'))
    return [
        {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for key, value in headers
    ]


def _required_role(service: ServiceInfo, settings: GatewaySettings) -> str | None:
    for requirement in settings.authentication.role_required:
        if service.full_name.endswith(requirement.service_suffix):
            return requirement.role
    return None


_TEMPLATE_VARIABLE: Final = re.compile(r"\{[^{}=]+(?:=([^{}]*))?\}")


def url_pattern(template: str) -> str:
    """The URLs an http rule path template matches, with its variable names left out: `{id}` is `*`
    and `{name=shelves/*}` is `shelves/*`, which is all the transcoder's path matcher sees."""
    return _TEMPLATE_VARIABLE.sub(lambda variable: variable.group(1) or "*", template)


def http_rule_bindings(
    services: Sequence[ServiceInfo],
) -> Iterator[tuple[ServiceInfo, MethodInfo, str, str]]:
    """Each http binding of `services` (additional bindings included) as (service, method, verb,
    path template); verb and template are empty for a binding without a pattern."""
    for service in services:
        for method in service.methods:
            if method.rule is None:
                continue
            for binding in http_bindings(method.rule):
                verb, template = binding_verb_and_path(binding)
                yield service, method, verb, template


def check_http_rules_unambiguous(services: Sequence[ServiceInfo]) -> None:
    """Refuse two http bindings with the same method and URL pattern, e.g. `GET /v1/x/{a}` and
    `GET /v1/x/{b}`: Envoy 1.40 accepts such a descriptor set (even `--mode validate`) and then
    transcodes neither, so those URLs would reach the service as plain HTTP and fail."""
    bound: dict[tuple[str, str], str] = {}
    for service, method, verb, template in http_rule_bindings(services):
        if not verb:
            continue
        key = (verb, url_pattern(template))
        name = f"{method_key(service, method)} ({verb.upper()} {template})"
        if key in bound:
            raise GatewayConfigError(
                f"http rules {bound[key]} and {name} match the same URLs; the transcoder "
                "cannot tell them apart, so give them different paths or methods"
            )
        bound[key] = name


def method_routes(
    targets: Sequence[RouteTarget],
    settings: GatewaySettings,
    rate_limits: RateLimitConfig,
) -> list[dict[str, Any]]:
    """One Envoy route per public method, in the order of `targets`; each takes only gRPC requests
    (`GRPC_REQUEST_HEADERS`), so nothing else ever reaches a service."""
    check_http_rules_unambiguous([target.service for target in targets])
    services_by_package: Mapping[str, ServiceInfo] = {
        target.service.package: target.service for target in targets
    }
    deprecations = settings.api_versions.deprecated
    routes: list[dict[str, Any]] = []
    for target in targets:
        service = target.service
        deprecation = deprecations.get(service.package)
        successor = services_by_package.get(deprecation.successor) if deprecation else None
        if (
            successor is not None
            and successor.full_name.rsplit(".", 1)[1] != service.full_name.rsplit(".", 1)[1]
        ):
            successor = None
        role = _required_role(service, settings)
        for method in service.methods:
            key = method_key(service, method)
            route: dict[str, Any] = {"cluster": target.cluster}
            if method.streaming:
                route["timeout"] = f"{settings.timeouts.stream_s}s"
                route["idle_timeout"] = f"{settings.timeouts.stream_idle_s}s"
            else:
                route["timeout"] = f"{settings.timeouts.unary_s}s"
            # Reads may be retried on any transport failure; writes only when the request provably
            # never reached the service (connect failure, refused stream), so nothing runs twice.
            route["retry_policy"] = {
                "retry_on": settings.retries.retry_on if method.is_read else settings.retries.write_retry_on,
                "num_retries": settings.retries.num_retries,
            }
            governing = [] if key in rate_limits.routes.exempt else [rate_limits.routes.default]
            if key in rate_limits.routes.methods:
                governing.append(rate_limits.routes.methods[key])
            route["rate_limits"] = rate_limits_for(governing)

            per_filter: dict[str, Any] = {}
            if key in settings.authentication.open_methods:
                per_filter[EXT_AUTHZ_FILTER] = EXT_AUTHZ_DISABLED
            elif role is not None:
                per_filter[RBAC_FILTER] = _role_policy(role)
                per_filter[ROUTE_HEADERS_FILTER] = _required_role_header(role)
            entry: dict[str, Any] = {
                "name": key,
                "match": {"path": f"/{key}", "headers": [*GRPC_REQUEST_HEADERS]},
                "route": route,
                "response_headers_to_add": _version_headers(service, method, deprecation, successor),
            }
            if per_filter:
                entry["typed_per_filter_config"] = per_filter
            routes.append(entry)
    return routes


def edge_routes(services: Sequence[str], cluster: str, settings: GatewaySettings) -> list[dict[str, Any]]:
    """Reflection and health, answered by the edge server for any client (grpcurl, probes)."""
    return [
        {
            "name": service,
            "match": {"prefix": f"/{service}/", "grpc": {}},
            "route": {"cluster": cluster, "timeout": f"{settings.timeouts.unary_s}s"},
            "typed_per_filter_config": {EXT_AUTHZ_FILTER: EXT_AUTHZ_DISABLED},
        }
        for service in services
    ]


# --- methods a path does not serve --------------------------------------------------------------
#
# The transcoder answers every JSON request whose method and path match an HTTP rule, and passes the
# rest on unchanged (`reject_unknown_method: false`). Those reach the routes below: a path the gateway
# serves with another method gets a 405 naming the methods it does serve (`Allow`), and any other
# request the last route, a 404. Both are Envoy's own replies, shaped by gateway/local_replies.py.

ALLOW_HEADER: Final = "Allow"
# The order an Allow header lists methods in; others (custom verbs) follow alphabetically.
_METHOD_ORDER: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
# One path segment of a template variable (`{id}`, `*`), and any number of them (`**`).
_SEGMENT_REGEX: Final = "[^/]+"
_SEGMENTS_REGEX: Final = ".*"


@dataclass(frozen=True)
class ServedPath:
    """A path the gateway answers, and the methods it answers there: an HTTP rule template
    (`/v1/admin/users/{user_id}:disable`, matched like the transcoder matches it) or an exact path
    (`/docs`, `/parley.billing.v1.BillingService/ListPlans`)."""

    template: str
    methods: frozenset[str]


def served_methods(methods: Iterable[str]) -> frozenset[str]:
    """The methods upper-cased, plus HEAD wherever GET is: the gateway answers HEAD like GET
    (envoy/api_edge.lua.j2 turns it into a GET, and Envoy leaves the body out of the answer)."""
    upper = {method.upper() for method in methods}
    if "GET" in upper:
        upper.add("HEAD")
    return frozenset(upper)


def allow_header_value(methods: Iterable[str]) -> str:
    """`GET, HEAD, PATCH`: the methods in the usual order, for an Allow header."""
    wanted = set(methods)
    ordered = [method for method in _METHOD_ORDER if method in wanted]
    return ", ".join([*ordered, *sorted(wanted.difference(_METHOD_ORDER))])


def json_served_paths(services: Sequence[ServiceInfo]) -> list[ServedPath]:
    """Every HTTP rule template of `services` (additional bindings included), with the methods bound
    to it: what the transcoder maps."""
    methods_by_template: dict[str, set[str]] = {}
    for _, _, verb, path in http_rule_bindings(services):
        if path:
            methods_by_template.setdefault(path, set()).add(verb)
    return [
        ServedPath(template, served_methods(verbs)) for template, verbs in sorted(methods_by_template.items())
    ]


def grpc_served_paths(services: Sequence[ServiceInfo], edge_services: Sequence[str]) -> list[ServedPath]:
    """The gRPC path of every public method, and every method of the edge's services (reflection,
    health): POST only."""
    only_post = frozenset({GRPC_METHOD})
    return [
        *(
            ServedPath(f"/{method_key(service, method)}", only_post)
            for service in services
            for method in service.methods
        ),
        *(ServedPath(f"/{service}/*", only_post) for service in edge_services),
    ]


@dataclass(frozen=True)
class _PathShape:
    """A template as the transcoder matches it: literal segments, `*` (one segment) or `**` (any
    number), then an optional custom verb (`:disable`)."""

    segments: tuple[str, ...]
    verb: str

    @classmethod
    def of(cls, template: str) -> _PathShape:
        expanded = url_pattern(template)
        path, verb = expanded, ""
        if expanded.rfind(":") > expanded.rfind("/"):
            path, verb = expanded.rsplit(":", 1)
        return cls(tuple(path.strip("/").split("/")), verb)

    @property
    def literal_segments(self) -> int:
        return sum(segment not in ("*", "**") for segment in self.segments)

    @property
    def is_exact(self) -> bool:
        return self.literal_segments == len(self.segments)

    def path(self) -> str:
        """The shape written out, `*` for a variable: the path itself when it is exact."""
        return "/" + "/".join(self.segments) + (f":{self.verb}" if self.verb else "")

    def regex(self) -> str:
        """The RE2 pattern of the whole path (Envoy matches a route's regex against all of it)."""
        parts = [
            _SEGMENT_REGEX if segment == "*" else _SEGMENTS_REGEX if segment == "**" else re.escape(segment)
            for segment in self.segments
        ]
        verb = f":{re.escape(self.verb)}" if self.verb else ""
        return "/" + "/".join(parts) + verb

    def overlaps(self, other: _PathShape) -> bool:
        """Some path fits both regexes (a `*` also takes a last segment with a verb, `x:disable`)."""
        if "**" in self.segments or "**" in other.segments:
            return True
        if len(self.segments) != len(other.segments):
            return False
        # If any path fits both, one of these does: each shape with its variables filled in from the
        # other's literals (else any word).
        both = (self.regex(), other.regex())
        return any(
            all(re.fullmatch(pattern, witness) for pattern in both)
            for witness in (self._example(other), other._example(self))
        )

    def _example(self, other: _PathShape) -> str:
        """A path of this shape: each variable as `other`'s literal segment there, or `x`."""
        segments = [
            ours if ours != "*" else theirs if theirs not in ("*", "**") else "x"
            for ours, theirs in zip(self.segments, other.segments, strict=True)
        ]
        return "/" + "/".join(segments) + (f":{self.verb}" if self.verb else "")

    def within(self, other: _PathShape) -> bool:
        """Every path of this shape is also one of `other`'s (same verb, each segment as or less general)."""
        if self.verb != other.verb or len(self.segments) != len(other.segments):
            return False
        return all(
            (theirs == "*" and ours != "**") or theirs == ours
            for ours, theirs in zip(self.segments, other.segments, strict=True)
        )


def method_not_allowed_routes(served: Sequence[ServedPath]) -> list[dict[str, Any]]:
    """405 routes: for each served path, a request with a method it does not serve, and `Allow`
    listing the ones it does.

    A path can fit several templates (`/v1/users/me` and a `/v1/users/{id}` would both fit it); its
    methods are then those of every template that covers it, and the narrower template comes first,
    so the first route that matches a request names them all. A custom verb is part of the shape, as
    for the transcoder: `/v1/admin/users/x:disable` is not the path `/v1/admin/users/{user_id}`.
    """
    methods_by_shape: dict[_PathShape, set[str]] = {}
    for path in served:
        methods_by_shape.setdefault(_PathShape.of(path.template), set()).update(path.methods)
    allowed = {
        shape: frozenset().union(
            *(methods for other, methods in methods_by_shape.items() if shape.within(other))
        )
        for shape in methods_by_shape
    }
    ordered = sorted(
        allowed,
        key=lambda shape: (not shape.is_exact, not shape.verb, -shape.literal_segments, shape.regex()),
    )
    routes: list[dict[str, Any]] = []
    for position, shape in enumerate(ordered):
        routes.append(_method_not_allowed_route(shape, allowed[shape]))
        if any(shape.overlaps(later) for later in ordered[position + 1 :]):
            # A method this path serves must not meet a wider template's 405 further down: had the
            # transcoder not mapped the request, it is no route (404).
            routes.append(_not_mapped_route(shape))
    return routes


def _path_match(shape: _PathShape) -> dict[str, Any]:
    # Exact paths are matched as such: Envoy's RE2 refuses long patterns (program size over 100).
    return {"path": shape.path()} if shape.is_exact else {"safe_regex": {"regex": shape.regex()}}


def _not_mapped_route(shape: _PathShape) -> dict[str, Any]:
    return {
        "name": f"not_mapped {shape.path()}",
        "match": _path_match(shape),
        "direct_response": {"status": 404},
        "typed_per_filter_config": {EXT_AUTHZ_FILTER: EXT_AUTHZ_DISABLED},
    }


def _method_not_allowed_route(shape: _PathShape, methods: frozenset[str]) -> dict[str, Any]:
    method_regex = "|".join(re.escape(method) for method in sorted(methods))
    return {
        "name": f"method_not_allowed {shape.path()}",
        "match": {
            **_path_match(shape),
            "headers": [
                {
                    "name": ":method",
                    "string_match": {"safe_regex": {"regex": f"^(?:{method_regex})$"}},
                    "invert_match": True,
                }
            ],
        },
        "direct_response": {"status": 405},
        "response_headers_to_add": [
            {
                "header": {"key": ALLOW_HEADER, "value": allow_header_value(methods)},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
        # Answered before any credential is asked for, like a 404: the methods of a path are public
        # (the OpenAPI document lists them).
        "typed_per_filter_config": {EXT_AUTHZ_FILTER: EXT_AUTHZ_DISABLED},
    }


def route_not_found() -> dict[str, Any]:
    """The last route: whatever no other route took is a 404 (ROUTE_NOT_FOUND)."""
    return {
        "name": "route_not_found",
        "match": {"prefix": "/"},
        "direct_response": {"status": 404},
        "typed_per_filter_config": {EXT_AUTHZ_FILTER: EXT_AUTHZ_DISABLED},
    }
