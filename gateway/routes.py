"""The gateway's per-method routes: where each RPC goes and what the edge does on the way.

One route per public gRPC method (`/pkg.Service/Method`), because methods differ in what the edge
must do: open or authenticated, which role, which rate limits and what happens when the limiter is
down, how long it may run, whether it may be retried, and which API version (and deprecation) it
answers for. JSON requests reach these routes too: the transcoder rewrites them to the gRPC path
before any of those filters run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
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


def check_http_rules_unambiguous(services: Sequence[ServiceInfo]) -> None:
    """Refuse two http bindings with the same method and URL pattern, e.g. `GET /v1/x/{a}` and
    `GET /v1/x/{b}`: Envoy 1.40 accepts such a descriptor set (even `--mode validate`) and then
    transcodes neither, so those URLs would reach the service as plain HTTP and fail."""
    bound: dict[tuple[str, str], str] = {}
    for service in services:
        for method in service.methods:
            if method.rule is None:
                continue
            for binding in http_bindings(method.rule):
                verb, template = binding_verb_and_path(binding)
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
    """One Envoy route per public method, in the order of `targets`."""
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
                "match": {"path": f"/{key}"},
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
