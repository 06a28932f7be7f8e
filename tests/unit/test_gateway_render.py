"""The rendered Envoy config: what it routes, what it hides, and that Envoy itself accepts it."""

from __future__ import annotations

import copy
import dataclasses
import re
import stat
import subprocess
from collections import Counter
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.descriptors import (
    DescriptorIndex,
    MethodInfo,
    ServiceInfo,
    binding_verb_and_path,
    http_bindings,
    public_services,
)
from gateway.envoy_process import envoy_binary_path
from gateway.render import SdsFiles, render_envoy_config, write_envoy_config
from gateway.routes import ServedPath, method_not_allowed_routes
from gateway.settings import ENVOY_DIR, GatewayConfigError, RoleRequirement, load_gateway_settings
from gateway.topology import (
    TlsListener,
    Topology,
    Upstream,
    embedded_topology,
    k8s_topology,
    local_topology,
)
from services.common.identity import JWT_CLAIM_HEADERS
from services.common.pki import TlsFiles
from services.common.ratelimit import load_rate_limit_config
from services.common.token_rules import CLOCK_SKEW_S, MAX_LIFETIME_S
from tests.support.gateway import DESCRIPTOR_SET_PATH, internal_service_names, public_service_names
from tests.support.pki import ServicePki
from tests.support.tls import self_signed_certificate

# Rendering only names these files; tests that write or run a config use the session's PKI.
GATEWAY_TLS = TlsFiles.in_directory(Path("/etc/parley/pki"), "gateway")
SDS = SdsFiles(Path("/etc/parley/envoy/envoy-sds"))
HTTP_LISTENER = "parley_http"
HTTPS_LISTENER = "parley_https"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
RBAC = "envoy.filters.http.rbac"
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"
EXT_AUTHZ_OFF = {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
    "disabled": True,
}
FILTER_OFF = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
EDGE_SERVICES = (
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.health.v1.Health",
)
ALLOWED_ORIGINS = ("https://app.parley.example", "http://localhost:5173")


def all_topologies() -> list[Topology]:
    return [
        embedded_topology(
            50051, 50052, 8080, 9901, gateway_tls=GATEWAY_TLS, descriptor_set_path=DESCRIPTOR_SET_PATH
        ),
        local_topology(gateway_tls=GATEWAY_TLS, descriptor_set_path=DESCRIPTOR_SET_PATH),
        k8s_topology(gateway_tls=GATEWAY_TLS, descriptor_set_path=DESCRIPTOR_SET_PATH),
    ]


@pytest.fixture(params=all_topologies(), ids=lambda topology: topology.name)
def topology(request: pytest.FixtureRequest) -> Topology:
    chosen: Topology = request.param
    return chosen


def rendered(topology: Topology) -> dict[str, Any]:
    """The parsed config; rendering and parsing take ~1 s, so each topology is done once (a copy is
    returned, so a test may not change what another sees)."""
    return copy.deepcopy(_parsed_config(repr(topology), topology))


_PARSED: dict[str, dict[str, Any]] = {}


def _parsed_config(key: str, topology: Topology) -> dict[str, Any]:
    if key not in _PARSED:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        _PARSED[key] = yaml.load(render_envoy_config(topology, sds=SDS), Loader=loader)
    return _PARSED[key]


def listeners(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {listener["name"]: listener for listener in config["static_resources"]["listeners"]}


def connection_manager(config: dict[str, Any], listener: str = HTTP_LISTENER) -> dict[str, Any]:
    (chain,) = listeners(config)[listener]["filter_chains"]
    (hcm,) = chain["filters"]
    typed: dict[str, Any] = hcm["typed_config"]
    return typed


def http_filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [f for f in connection_manager(config)["http_filters"] if f["name"] == name]
    typed: dict[str, Any] = found["typed_config"]
    return typed


def virtual_host(config: dict[str, Any]) -> dict[str, Any]:
    (host,) = connection_manager(config)["route_config"]["virtual_hosts"]
    found: dict[str, Any] = host
    return found


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = virtual_host(config)["routes"]
    return found


def routes_by_name(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    all_routes = routes(config)
    names = [route["name"] for route in all_routes]
    assert [name for name, count in Counter(names).items() if count > 1] == []
    return {route["name"]: route for route in all_routes}


def public_methods() -> list[tuple[ServiceInfo, MethodInfo]]:
    """Every method of every public service in the descriptor set, as (service, method)."""
    services = public_services(DescriptorIndex.from_bytes(DESCRIPTOR_SET_PATH.read_bytes()))
    return [(service, method) for service in services for method in service.methods]


def method_key(service: ServiceInfo, method: MethodInfo) -> str:
    return f"{service.full_name}/{method.name}"


def per_filter(route: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = route.get("typed_per_filter_config", {})
    return found


def clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}


def endpoint(cluster: dict[str, Any]) -> tuple[str, int]:
    (locality,) = cluster["load_assignment"]["endpoints"]
    (lb_endpoint,) = locality["lb_endpoints"]
    address = lb_endpoint["endpoint"]["address"]["socket_address"]
    return address["address"], address["port_value"]


def added_response_headers(config: dict[str, Any], listener: str) -> dict[str, str]:
    """The headers the first filter of `listener` adds to every response."""
    (first, *_) = connection_manager(config, listener)["http_filters"]
    assert first["name"] == "parley.response_headers"
    mutations = first["typed_config"]["mutations"]["response_mutations"]
    return {
        mutation["append"]["header"]["key"]: mutation["append"]["header"]["value"]
        for mutation in mutations
        if "append" in mutation
    }


def principal_matcher(principal: dict[str, Any]) -> dict[str, Any]:
    """The metadata matcher of an RBAC principal, in either of Envoy's spellings."""
    matcher: dict[str, Any] = (
        principal["sourced_metadata"]["metadata_matcher"]
        if "sourced_metadata" in principal
        else principal["metadata"]
    )
    return matcher


def lua_table(source: str, name: str) -> dict[str, list[str]]:
    """`local NAME = { ["key"] = "v" | {"v", ...}, ... }` from the rendered Lua, as key -> values."""
    block = re.search(rf"^local {name} = \{{\n(.*?)^\}}", source, re.MULTILINE | re.DOTALL)
    assert block is not None, f"no table {name} in the Lua source"
    entries = re.findall(r'^\s*\["([^"]+)"\] = (.*),$', block.group(1), re.MULTILINE)
    return {key: re.findall(r'"([^"]+)"', value) for key, value in entries}


def with_tls(topology: Topology, directory: Path, port: int = 8443) -> Topology:
    cert_path, key_path = self_signed_certificate(directory)
    return dataclasses.replace(topology, tls=TlsListener(port, cert_path, key_path))


def test_the_descriptor_set_has_public_and_internal_services() -> None:
    # Guards the tests below against passing vacuously on an empty or partial descriptor set.
    assert len(public_service_names()) >= 4
    assert internal_service_names()
    assert [service for service, _ in public_methods() if service.full_name.endswith("AdminService")]
    assert [method for _, method in public_methods() if method.streaming]


def test_transcoder_serves_exactly_the_public_services(topology: Topology) -> None:
    transcoder = http_filter(rendered(topology), TRANSCODER)

    assert transcoder["services"] == public_service_names()
    assert not [name for name in transcoder["services"] if name.endswith("InternalService")]
    assert transcoder["proto_descriptor"] == str(DESCRIPTOR_SET_PATH.resolve())
    assert transcoder["convert_grpc_status"] is True
    # Requests no HTTP rule maps go on to the routes, which answer 405 or 404 (not the transcoder).
    assert transcoder["request_validation_options"] == {
        "reject_unknown_method": False,
        "reject_unknown_query_parameters": True,
    }
    assert transcoder["print_options"]["always_print_primitive_fields"] is True
    assert transcoder["print_options"]["preserve_proto_field_names"] is True
    assert transcoder["print_options"]["stream_sse_style_delimited"] is True
    assert transcoder["max_request_body_size"] == topology.max_request_bytes


def test_every_public_method_has_exactly_one_route_to_its_area(topology: Topology) -> None:
    all_routes = routes(rendered(topology))
    by_path: dict[str, list[dict[str, Any]]] = {}
    for route in all_routes:
        path = route["match"].get("path", "")
        if path.startswith("/parley.") and "route" in route:
            by_path.setdefault(path, []).append(route)

    expected = {f"/{method_key(service, method)}": service.area for service, method in public_methods()}
    assert sorted(by_path) == sorted(expected)
    for path, area in expected.items():
        (route,) = by_path[path]
        assert route["name"] == path.removeprefix("/")
        # Only gRPC requests (gRPC, gRPC-Web, JSON the transcoder rewrote) reach a service.
        assert route["match"] == {
            "path": path,
            "headers": [
                {"name": ":method", "string_match": {"exact": "POST"}},
                {"name": "content-type", "string_match": {"prefix": "application/grpc"}},
            ],
        }
        assert route["route"]["cluster"] == area


def test_internal_services_have_no_route_and_nothing_forwards_every_path(topology: Topology) -> None:
    all_routes = routes(rendered(topology))

    for service in internal_service_names():
        assert not [route for route in all_routes if service in yaml.safe_dump(route)]
    assert not [route for route in all_routes if "InternalService" in yaml.safe_dump(route)]
    prefix_routes = {route["name"]: route["match"] for route in all_routes if "prefix" in route["match"]}
    # The one forwarding prefix route that could match any path only takes browser preflights (the
    # CORS filter answers them); the others are the edge's own gRPC services, and the last route,
    # which answers everything else with a 404 and forwards nothing.
    assert prefix_routes == {
        "cors_preflight": {
            "prefix": "/",
            "headers": [
                {"name": ":method", "string_match": {"exact": "OPTIONS"}},
                {"name": "origin", "present_match": True},
                {"name": "access-control-request-method", "present_match": True},
            ],
        },
        **{service: {"prefix": f"/{service}/", "grpc": {}} for service in EDGE_SERVICES},
        "route_not_found": {"prefix": "/"},
    }
    assert all_routes[0]["name"] == "cors_preflight"
    assert all_routes[0]["route"]["cluster"] == "edge"
    assert all_routes[-1] == {
        "name": "route_not_found",
        "match": {"prefix": "/"},
        "direct_response": {"status": 404},
        "typed_per_filter_config": {EXT_AUTHZ: EXT_AUTHZ_OFF},
    }


# ---- methods a path does not serve ---------------------------------------------------------------

# Methods a test asks every path about: the usual ones, a WebDAV one and the new QUERY.
PROBED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND", "QUERY")
HTTP_TEMPLATE_VARIABLE = re.compile(r"\{[^}]+\}")


def _string_matches(matcher: dict[str, Any], value: str) -> bool:
    if "exact" in matcher:
        return bool(value == matcher["exact"])
    if "prefix" in matcher:
        return value.startswith(matcher["prefix"])
    return re.fullmatch(matcher["safe_regex"]["regex"], value) is not None


def first_route(config: dict[str, Any], method: str, path: str, **headers: str) -> dict[str, Any]:
    """The route Envoy picks for a request the transcoder did not map (first match wins), as far as
    these routes' matchers go: exact path, prefix or whole-path regex, `grpc`, and header matchers
    (string_match, present_match, invert_match)."""
    request = {":method": method, ":path": path, **{name.replace("_", "-"): v for name, v in headers.items()}}
    for route in routes(config):
        match = route["match"]
        if "path" in match and path != match["path"]:
            continue
        if "prefix" in match and not path.startswith(match["prefix"]):
            continue
        if "safe_regex" in match and re.fullmatch(match["safe_regex"]["regex"], path) is None:
            continue
        if "grpc" in match and not request.get("content-type", "").startswith("application/grpc"):
            continue
        header_results = []
        for header in match.get("headers", []):
            value = request.get(header["name"])
            if "present_match" in header:
                matched = value is not None
            else:
                matched = value is not None and _string_matches(header["string_match"], value)
            header_results.append(matched != header.get("invert_match", False))
        if all(header_results):
            return route
    raise AssertionError(f"no route for {method} {path}")


def allow_of(route: dict[str, Any]) -> str | None:
    """The Allow header a 405 route sets; None for any other route."""
    if route.get("direct_response", {}).get("status") != 405:
        return None
    (header,) = [h["header"] for h in route["response_headers_to_add"] if h["header"]["key"] == "Allow"]
    value: str = header["value"]
    return value


def bound_methods_by_template() -> dict[str, set[str]]:
    """Each HTTP rule template, variables written as `*`, with the methods bound to it (HEAD with GET)."""
    found: dict[str, set[str]] = {}
    for _, method in public_methods():
        if method.rule is None:
            continue
        for binding in http_bindings(method.rule):
            verb, template = binding_verb_and_path(binding)
            if template:
                found.setdefault(HTTP_TEMPLATE_VARIABLE.sub("*", template), set()).add(verb.upper())
    for methods in found.values():
        if "GET" in methods:
            methods.add("HEAD")
    return found


def test_every_json_path_answers_the_methods_it_does_not_serve_with_a_405_naming_those_it_does(
    topology: Topology,
) -> None:
    config = rendered(topology)
    order = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    for template, served in bound_methods_by_template().items():
        path = template.replace("*", "some-id")
        for method in PROBED_METHODS:
            route = first_route(config, method, path)
            if method in served:
                # The transcoder maps it; were it ever to pass it on, no 405 would stand in the way.
                assert allow_of(route) is None, (method, path)
            else:
                assert allow_of(route) == ", ".join(m for m in order if m in served), (method, path)
                # Like a 404: no credential is asked for the answer.
                assert per_filter(route) == {EXT_AUTHZ: EXT_AUTHZ_OFF}


def test_a_custom_verb_is_part_of_the_path_it_names(topology: Topology) -> None:
    config = rendered(topology)

    # `:disable` is the POST-only DisableUser, not GetUser's `{user_id}` (the transcoder reads it so).
    assert allow_of(first_route(config, "GET", "/v1/admin/users/u1:disable")) == "POST"
    assert allow_of(first_route(config, "POST", "/v1/admin/users/u1")) == "GET, HEAD"
    # A known verb on a path that has no such method is no path at all.
    assert first_route(config, "GET", "/v1/billing/plans/p1:disable")["name"] == "route_not_found"


def test_grpc_paths_and_the_gateways_own_pages_answer_other_methods_with_a_405(topology: Topology) -> None:
    config = rendered(topology)
    settings = topology.settings

    for service, method in public_methods():
        grpc_path = f"/{method_key(service, method)}"
        assert allow_of(first_route(config, "GET", grpc_path)) == "POST"
        assert allow_of(first_route(config, "OPTIONS", grpc_path, content_type="application/grpc")) == "POST"
        # A POST that is not gRPC is not for any route: 404, never a service.
        assert first_route(config, "POST", grpc_path, content_type="application/json")["name"] == (
            "route_not_found"
        )
    for page in (settings.docs.page_path, settings.docs.openapi_path, "/livez", settings.healthz.path):
        assert allow_of(first_route(config, "POST", page)) == "GET, HEAD", page
        assert allow_of(first_route(config, "GET", page)) is None, page


def test_only_a_preflight_takes_the_cors_route_and_unknown_paths_stay_404(topology: Topology) -> None:
    config = rendered(topology)
    preflight = {"origin": "https://app.parley.example", "access_control_request_method": "GET"}

    assert first_route(config, "OPTIONS", "/v1/users/me", **preflight)["name"] == "cors_preflight"
    assert first_route(config, "OPTIONS", "/no/such/path", **preflight)["name"] == "cors_preflight"
    assert allow_of(first_route(config, "OPTIONS", "/v1/users/me")) == "GET, HEAD, PATCH"
    assert first_route(config, "OPTIONS", "/no/such/path")["name"] == "route_not_found"
    assert first_route(config, "GET", "/parley.auth.v1.AuthInternalService/CheckApiKey")["name"] == (
        "route_not_found"
    )


def test_health_check_answers_only_get_and_head(topology: Topology) -> None:
    health = http_filter(rendered(topology), "envoy.filters.http.health_check")

    assert health["headers"] == [
        {"name": ":path", "string_match": {"exact": topology.settings.healthz.path}},
        {"name": ":method", "string_match": {"safe_regex": {"regex": "^(?:GET|HEAD)$"}}},
    ]


def test_a_path_that_fits_several_templates_allows_the_methods_of_all_of_them() -> None:
    served = [
        ServedPath("/v1/users/me", frozenset({"GET", "HEAD", "PATCH"})),
        ServedPath("/v1/users/{user_id}", frozenset({"DELETE"})),
        ServedPath("/v1/users/{user.id}:archive", frozenset({"POST"})),
    ]

    rendered_routes = method_not_allowed_routes(served)

    assert [(route["name"], allow_of(route)) for route in rendered_routes] == [
        # Exact paths first, then verbs, then the most literal segments: the narrowest shape wins,
        # and ends the search for the methods it serves, which a wider shape's 405 would refuse.
        ("method_not_allowed /v1/users/me", "GET, HEAD, PATCH, DELETE"),
        ("not_mapped /v1/users/me", None),
        ("method_not_allowed /v1/users/*:archive", "POST"),
        ("not_mapped /v1/users/*:archive", None),
        ("method_not_allowed /v1/users/*", "DELETE"),
    ]
    assert rendered_routes[1]["match"] == {"path": "/v1/users/me"}
    assert rendered_routes[1]["direct_response"] == {"status": 404}
    assert rendered_routes[2]["match"]["safe_regex"] == {"regex": "/v1/users/[^/]+:archive"}
    assert rendered_routes[4]["match"]["headers"] == [
        {"name": ":method", "string_match": {"safe_regex": {"regex": "^(?:DELETE)$"}}, "invert_match": True}
    ]


def test_reflection_and_health_route_to_the_edge_server_for_any_client(topology: Topology) -> None:
    by_name = routes_by_name(rendered(topology))

    for service in EDGE_SERVICES:
        route = by_name[service]
        assert route["route"]["cluster"] == "edge"
        assert per_filter(route) == {EXT_AUTHZ: EXT_AUTHZ_OFF}


def test_docs_and_liveness_are_answered_by_envoy_without_credentials(topology: Topology) -> None:
    by_name = routes_by_name(rendered(topology))
    settings = topology.settings

    get_or_head = [{"name": ":method", "string_match": {"safe_regex": {"regex": "^(?:GET|HEAD)$"}}}]
    assert by_name["docs_page"]["match"] == {"path": settings.docs.page_path, "headers": get_or_head}
    assert by_name["openapi"]["match"] == {"path": settings.docs.openapi_path, "headers": get_or_head}
    assert by_name["livez"]["match"] == {"path": "/livez", "headers": get_or_head}
    assert by_name["livez"]["direct_response"]["body"]["inline_string"] == '{"status":"ALIVE"}'
    openapi_file = Path(by_name["openapi"]["direct_response"]["body"]["filename"])
    assert openapi_file == DESCRIPTOR_SET_PATH.resolve().parent / "openapi.json"
    assert "Parley API" in by_name["docs_page"]["direct_response"]["body"]["inline_string"]
    for name in ("docs_page", "openapi", "livez", "cors_preflight"):
        # No credential, and no transcoder that would refuse a path no RPC has.
        assert per_filter(by_name[name]) == {EXT_AUTHZ: EXT_AUTHZ_OFF, TRANSCODER: FILTER_OFF}


def test_streaming_methods_get_the_stream_timeout(topology: Topology) -> None:
    by_name = routes_by_name(rendered(topology))
    settings = topology.settings

    streaming = [method_key(s, m) for s, m in public_methods() if m.streaming]
    assert "parley.chat.v1.ChatService/StreamMessage" in streaming
    assert "parley.chat.v2.ChatService/StreamMessage" in streaming
    for service, method in public_methods():
        route = by_name[method_key(service, method)]["route"]
        if method.streaming:
            assert route["timeout"] == f"{settings.timeouts.stream_s}s"
            assert route["idle_timeout"] == f"{settings.timeouts.stream_idle_s}s"
        else:
            assert route["timeout"] == f"{settings.timeouts.unary_s}s"
            assert "idle_timeout" not in route


def test_reads_retry_on_transport_failures_and_writes_only_when_never_sent(topology: Topology) -> None:
    by_name = routes_by_name(rendered(topology))
    settings = topology.settings

    # A write retried after it may have reached the service could run twice.
    assert not {"reset", "unavailable", "5xx", "gateway-error"} & set(
        settings.retries.write_retry_on.split(",")
    )
    verbs = {method.http_verb for _, method in public_methods()}
    assert {"get", "post"} <= verbs
    for service, method in public_methods():
        retry = by_name[method_key(service, method)]["route"]["retry_policy"]
        expected = settings.retries.retry_on if method.http_verb == "get" else settings.retries.write_retry_on
        assert retry == {"retry_on": expected, "num_retries": settings.retries.num_retries}


def test_open_methods_skip_ext_authz_and_every_other_method_needs_a_credential(topology: Topology) -> None:
    by_name = routes_by_name(rendered(topology))
    open_methods = topology.settings.authentication.open_methods
    keys = {method_key(service, method) for service, method in public_methods()}

    # A misspelt entry in gateway.yaml would silently leave its method closed.
    assert open_methods <= keys
    assert "parley.auth.v1.AuthService/Login" in open_methods
    assert "parley.auth.v1.AuthService/GetCurrentUser" not in open_methods
    for key in keys:
        if key in open_methods:
            assert per_filter(by_name[key]) == {EXT_AUTHZ: EXT_AUTHZ_OFF}
        else:
            assert EXT_AUTHZ not in per_filter(by_name[key])


def test_admin_methods_need_the_admin_role(topology: Topology) -> None:
    by_name = routes_by_name(rendered(topology))
    assert topology.settings.authentication.role_required == (
        RoleRequirement(service_suffix="AdminService", role="admin"),
    )

    admin_keys = [method_key(s, m) for s, m in public_methods() if s.full_name.endswith("AdminService")]
    assert "parley.auth.v1.AuthAdminService/SetUserRoles" in admin_keys
    assert "parley.billing.v1.BillingAdminService/CreatePlan" in admin_keys
    for service, method in public_methods():
        key = method_key(service, method)
        filters = per_filter(by_name[key])
        if key not in admin_keys:
            assert RBAC not in filters
            continue
        assert EXT_AUTHZ not in filters  # an admin must be signed in
        rules = filters[RBAC]["rbac"]["rules"]
        assert rules["action"] == "ALLOW"
        (policy,) = rules["policies"].values()
        assert policy["permissions"] == [{"any": True}]
        matchers = [principal_matcher(principal) for principal in policy["principals"]]
        # The role comes from a verified JWT's payload or from ext_authz's answer, nowhere else.
        assert sorted(matcher["filter"] for matcher in matchers) == [
            "envoy.filters.http.ext_authz",
            "envoy.filters.http.jwt_authn",
        ]
        for matcher in matchers:
            assert matcher["path"][-1] == {"key": "roles"}
            assert matcher["value"] == {"list_match": {"one_of": {"string_match": {"exact": "admin"}}}}
        # The 403's ErrorInfo names the role, read back from this request header.
        assert filters["parley.route_request_headers"]["mutations"]["request_mutations"] == [
            {
                "append": {
                    "header": {"key": "x-parley-required-role", "value": "admin"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            }
        ]


def test_every_method_route_carries_its_rate_limits(topology: Topology) -> None:
    by_name = routes_by_name(rendered(topology))
    limits = load_rate_limit_config(topology.rate_limits_path)
    stage = {"allow": 0, "deny": 1}

    keys = [method_key(service, method) for service, method in public_methods()]
    assert set(limits.routes.exempt) <= set(keys)
    assert set(limits.routes.methods) <= set(keys)
    for key in keys:
        rendered_limits = by_name[key]["route"]["rate_limits"]
        if key in limits.routes.exempt:
            assert rendered_limits == []
            continue
        governing = [
            limits.routes.default,
            *([limits.routes.methods[key]] if key in limits.routes.methods else []),
        ]
        expected = sorted(
            (stage[route_limits.on_failure], descriptor.limit)
            for route_limits in governing
            for descriptor in route_limits.descriptors
        )
        found = sorted(
            (entry["stage"], entry["actions"][0]["generic_key"]["descriptor_value"])
            for entry in rendered_limits
        )
        assert found == expected, key
        for entry in rendered_limits:
            assert entry["actions"][0]["generic_key"]["descriptor_key"] == "limit"

    # Login fails closed (stage 1) on its own per-address limit, on top of the default ones.
    login = by_name["parley.auth.v1.AuthService/Login"]["route"]["rate_limits"]
    assert {
        "stage": 1,
        "actions": [
            {"generic_key": {"descriptor_key": "limit", "descriptor_value": "login"}},
            {"remote_address": {}},
        ],
    } in login
    # The anonymous budget applies only to requests without an identity.
    (anonymous,) = [e for e in login if e["actions"][0]["generic_key"]["descriptor_value"] == "anonymous"]
    assert anonymous["actions"][1] == {
        "header_value_match": {
            "descriptor_key": "caller",
            "descriptor_value": "anonymous",
            "expect_match": False,
            "headers": [{"name": "x-parley-user-id", "present_match": True}],
        }
    }


def test_rate_limit_filters_fail_open_or_closed_by_stage(topology: Topology) -> None:
    config = rendered(topology)
    domain = load_rate_limit_config(topology.rate_limits_path).domain

    fail_open = http_filter(config, "parley.rate_limit_fail_open")
    fail_closed = http_filter(config, "parley.rate_limit_fail_closed")
    assert (fail_open["stage"], fail_open["failure_mode_deny"]) == (0, False)
    assert (fail_closed["stage"], fail_closed["failure_mode_deny"]) == (1, True)
    for limiter in (fail_open, fail_closed):
        assert limiter["domain"] == domain
        assert limiter["rate_limit_service"]["grpc_service"]["envoy_grpc"] == {"cluster_name": "edge"}
        assert limiter["rate_limited_as_resource_exhausted"] is True
        assert limiter["timeout"] == f"{topology.settings.rate_limiting.timeout_ms / 1000:g}s"


def test_the_filter_chain_authenticates_after_transcoding_and_limits_after_authenticating(
    topology: Topology,
) -> None:
    names = [f["name"] for f in connection_manager(rendered(topology))["http_filters"]]

    assert names[0] == "parley.response_headers"  # sees every reply, errors included
    assert names[-1] == "envoy.filters.http.router"
    # CORS after the transcoder: a JSON request must have found its per-method route first.
    order = [
        TRANSCODER,
        "envoy.filters.http.cors",
        "envoy.filters.http.jwt_authn",
        EXT_AUTHZ,
        RBAC,
        "parley.rate_limit_fail_open",
        "parley.rate_limit_fail_closed",
    ]
    assert [names.index(name) for name in order] == sorted(names.index(name) for name in order)
    ext_authz = http_filter(rendered(topology), EXT_AUTHZ)["extension_config"]["typed_config"]
    # Authentication fails closed.
    assert ext_authz["failure_mode_allow"] is False
    assert ext_authz["grpc_service"]["envoy_grpc"] == {"cluster_name": "edge"}


def test_deprecated_versions_announce_their_sunset_and_successor(topology: Topology) -> None:
    by_name = routes_by_name(rendered(topology))
    deprecation = topology.settings.api_versions.deprecated["parley.chat.v1"]
    assert deprecation.successor == "parley.chat.v2"

    deprecated_routes = 0
    for service, method in public_methods():
        route = by_name[method_key(service, method)]
        headers = {
            entry["header"]["key"]: entry["header"]["value"] for entry in route["response_headers_to_add"]
        }
        assert headers["Parley-API-Version"] == service.version
        if service.package != "parley.chat.v1":
            assert set(headers) == {"Parley-API-Version"}
            continue
        deprecated_routes += 1
        # RFC 9745 Deprecation: "@" + epoch seconds; RFC 8594 Sunset: an IMF-fixdate.
        assert re.fullmatch(r"@\d+", headers["Deprecation"])
        assert datetime.fromtimestamp(int(headers["Deprecation"][1:]), UTC) == deprecation.deprecated_at
        assert headers["Sunset"].endswith(" GMT")
        assert parsedate_to_datetime(headers["Sunset"]) == deprecation.sunset
        assert re.fullmatch(r'</v2/[^>]+>; rel="successor-version"', headers["Link"])
    assert deprecated_routes >= 5
    conversations = by_name["parley.chat.v1.ChatService/ListConversations"]["response_headers_to_add"]
    assert {
        "header": {"key": "Link", "value": '</v2/conversations>; rel="successor-version"'},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    } in conversations


def test_unversioned_paths_negotiate_from_a_table_of_versions(topology: Topology) -> None:
    edge = http_filter(rendered(topology), "parley.api_edge")
    source: str = edge["default_source_code"]["inline_string"]
    settings = topology.settings

    assert (
        f"local UNVERSIONED_PREFIX = {settings.api_versions.unversioned_prefix!r}".replace("'", '"') in source
    )
    assert 'local VERSION_HEADER = "parley-api-version"' in source
    offered = lua_table(source, "OFFERED")
    newest_stable = lua_table(source, "NEWEST_STABLE")
    assert offered["conversations"] == ["v1", "v2"]
    assert newest_stable["conversations"] == ["v2"]
    assert offered["models"] == ["v1", "v2"]
    assert offered["auth"] == ["v1"]
    assert newest_stable["auth"] == ["v1"]
    # Every /vN/<segment>/... binding of a public method is in the table, under its version.
    unversioned = []
    for service, method in public_methods():
        for path in method.http_paths:
            version, segment = path.strip("/").split("/")[:2]
            if version != service.version:
                unversioned.append(path)
                continue
            assert version in offered[segment.split(":")[0]], path
    # Fixed by RFC 8615 (well-known URIs), so outside the versioned API.
    assert unversioned == ["/.well-known/jwks.json"]
    assert set(newest_stable) == set(offered)
    for segment, (newest,) in newest_stable.items():
        assert newest == max(v for v in offered[segment] if v in settings.api_versions.stable)


def test_upstream_clusters_speak_http2_and_health_check_their_service(topology: Topology) -> None:
    by_name = clusters(rendered(topology))

    assert set(by_name) == {"auth", "chat", "billing", "analytics", "edge", "gateway_self"}
    for area in ("auth", "chat", "billing", "analytics"):
        cluster = by_name[area]
        protocol = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]
        assert "http2_protocol_options" in protocol["explicit_http_config"]
        (health_check,) = cluster["health_checks"]
        assert (
            health_check["grpc_health_check"]["service_name"]
            == f"parley.{area}.v1.{area.capitalize()}Service"
        )
        # Panic routing would send traffic to a NOT_SERVING host; it is off.
        assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0.0}
    edge_protocol = by_name["edge"]["typed_extension_protocol_options"]
    assert (
        "http2_protocol_options"
        in edge_protocol["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
    )


def test_jwks_is_fetched_through_the_gateways_own_open_route(topology: Topology) -> None:
    config = rendered(topology)
    jwks = http_filter(config, "envoy.filters.http.jwt_authn")["providers"]["parley"]["remote_jwks"]

    assert jwks["http_uri"]["uri"] == f"http://127.0.0.1:{topology.http_port}/.well-known/jwks.json"
    assert jwks["http_uri"]["cluster"] == "gateway_self"
    assert endpoint(clusters(config)["gateway_self"]) == ("127.0.0.1", topology.http_port)
    get_jwks = routes_by_name(config)["parley.auth.v1.AuthService/GetJwks"]
    assert per_filter(get_jwks) == {EXT_AUTHZ: EXT_AUTHZ_OFF}
    assert get_jwks["route"]["rate_limits"] == []


def test_jwt_authn_applies_the_token_rules_it_can_and_forwards_the_claims_for_the_rest(
    topology: Topology,
) -> None:
    """One rule set: Envoy's lifetime cap, clock skew, issuer and audience are the token rules' and the
    settings' values, not a copy; the time claims reach the services, which check the rest."""
    pinned = dataclasses.replace(topology, jwt_issuer="https://id.parley.test", jwt_audience="parley-edge")
    provider = http_filter(rendered(pinned), "envoy.filters.http.jwt_authn")["providers"]["parley"]

    assert (provider["issuer"], provider["audiences"]) == ("https://id.parley.test", ["parley-edge"])
    assert provider["max_lifetime"] == f"{MAX_LIFETIME_S}s"
    assert provider["clock_skew_seconds"] == CLOCK_SKEW_S
    assert provider["require_expiration"] is True
    assert [(c["header_name"], c["claim_name"]) for c in provider["claim_to_headers"]] == list(
        JWT_CLAIM_HEADERS
    )
    assert {"iat", "nbf", "exp", "sub", "sid"} <= {claim for _, claim in JWT_CLAIM_HEADERS}
    assert "jwt_max_lifetime_s" not in (ENVOY_DIR / "gateway.yaml").read_text()


def test_spans_go_to_the_otlp_upstream_or_else_to_the_edge(topology: Topology) -> None:
    def trace_cluster(config: dict[str, Any]) -> str:
        provider = connection_manager(config)["tracing"]["provider"]
        assert provider["name"] == "envoy.tracers.opentelemetry"
        name: str = provider["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
        return name

    assert trace_cluster(rendered(topology)) == "edge"
    with_collector = rendered(dataclasses.replace(topology, otlp=Upstream("otlp", "collector.local", 4317)))
    assert trace_cluster(with_collector) == "otlp"
    otlp = clusters(with_collector)["otlp"]
    assert endpoint(otlp) == ("collector.local", 4317)
    assert otlp["type"] == "STRICT_DNS"
    by_address = clusters(rendered(dataclasses.replace(topology, otlp=Upstream("otlp", "10.0.0.7", 4317))))
    assert by_address["otlp"]["type"] == "STATIC"


def test_client_identity_headers_are_stripped_and_no_credential_is_added(topology: Topology) -> None:
    hcm = connection_manager(rendered(topology))

    (early,) = hcm["early_header_mutation_extensions"]
    assert early["typed_config"]["mutations"] == [
        {"remove_on_match": {"key_matcher": {"prefix": "x-parley-"}}}
    ]
    # The gateway proves itself with its certificate; no request carries a bearer secret.
    assert "request_headers_to_add" not in hcm["route_config"]


def test_envoy_reaches_every_service_and_the_edge_over_mtls_with_its_workload_checked(
    topology: Topology,
) -> None:
    by_name = clusters(rendered(topology))

    for name in ("auth", "chat", "billing", "analytics", "edge"):
        socket = by_name[name]["transport_socket"]
        assert socket["name"] == "envoy.transport_sockets.tls"
        context = socket["typed_config"]
        assert context["@type"].endswith("tls.v3.UpstreamTlsContext")
        assert context["sni"] == f"{name}.parley.local"
        common = context["common_tls_context"]
        assert common["alpn_protocols"] == ["h2"]
        sds_source = {"path_config_source": {"path": str(SDS.certificate)}, "resource_api_version": "V3"}
        assert common["tls_certificate_sds_secret_configs"] == [
            {"name": "parley_workload_certificate", "sds_config": sds_source}
        ]
        validation = common["combined_validation_context"]
        assert validation["default_validation_context"] == {
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": f"spiffe://parley.local/{name}"}}
            ]
        }
        assert validation["validation_context_sds_secret_config"] == {
            "name": "parley_service_ca",
            "sds_config": {"path_config_source": {"path": str(SDS.validation)}, "resource_api_version": "V3"},
        }
    # The JWKS fetch goes to the gateway's own listener: no service, no certificate.
    assert "transport_socket" not in by_name["gateway_self"]


def test_request_ids_are_generated_and_envoy_is_not_named(topology: Topology) -> None:
    hcm = connection_manager(rendered(topology))

    assert hcm["server_header_transformation"] == "PASS_THROUGH"
    assert hcm["generate_request_id"] is True
    assert hcm["preserve_external_request_id"] is False
    assert hcm["always_set_request_id_in_response"] is True
    assert hcm["use_remote_address"] is True
    (access_log,) = hcm["access_log"]
    log_fields = access_log["typed_config"]["log_format"]["json_format"]
    assert log_fields["request_id"] == "%REQ(X-REQUEST-ID)%"
    assert log_fields["traceparent"] == "%REQ(TRACEPARENT)%"


def test_admin_listens_on_loopback_only(topology: Topology) -> None:
    config = rendered(topology)

    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": topology.admin_port,
    }


def test_local_replies_map_every_gateway_error_to_the_parley_shape(topology: Topology) -> None:
    mappers = connection_manager(rendered(topology))["local_reply_config"]["mappers"]
    json_bodies = [mapper["body_format_override"].get("json_format") for mapper in mappers]
    reasons = {
        body["details"][0]["reason"]: body["code"]
        for body in json_bodies
        if body is not None and "details" in body
    }

    assert reasons == {
        "METHOD_NOT_ALLOWED": 12,
        "UPSTREAM_UNAVAILABLE": 14,
        "ROUTE_NOT_FOUND": 5,
        "MALFORMED_REQUEST": 3,
        "REQUEST_TOO_LARGE": 8,
        "UNSUPPORTED_MEDIA_TYPE": 3,
        "UNSUPPORTED_API_VERSION": 3,
        "UNAUTHENTICATED": 16,
        "PERMISSION_DENIED": 7,
        "RATE_LIMITED": 8,
        "RATE_LIMITER_UNAVAILABLE": 14,
        "SERVICE_UNAVAILABLE": 14,
        "UPSTREAM_TIMEOUT": 4,
        "REQUEST_REJECTED": 3,
        "GATEWAY_ERROR": 13,
    }
    infos = {}
    for mapper, body in zip(mappers, json_bodies, strict=True):
        if body is not None and "details" in body:
            error_info, request_info = body["details"]
            assert error_info["domain"] == "parley.dev"
            # A request refused before it had an id gets one in the reply header, which the body
            # repeats; every other reply names the request's own id.
            refused_before_routing = "x-request-id" in yaml.safe_dump(mapper["filter"])
            assert request_info == {
                "@type": "type.googleapis.com/google.rpc.RequestInfo",
                "request_id": "%RESP(X-REQUEST-ID)%" if refused_before_routing else "%REQ(X-REQUEST-ID)%",
            }
            if not refused_before_routing:
                infos[error_info["reason"]] = error_info
    assert infos["PERMISSION_DENIED"]["metadata"] == {"role": "%REQ(X-PARLEY-REQUIRED-ROLE)%"}
    assert infos["REQUEST_TOO_LARGE"]["metadata"] == {"max_request_bytes": str(topology.max_request_bytes)}


def test_refusals_that_carry_their_own_details_pass_through(topology: Topology) -> None:
    mappers = connection_manager(rendered(topology))["local_reply_config"]["mappers"]

    def flags(mapper: dict[str, Any]) -> set[str]:
        return set(re.findall(r"flags: \[(\w+)\]", yaml.safe_dump(mapper["filter"], default_flow_style=True)))

    # ext_authz (UAEX) writes the auth service's status for 401/403; for JSON clients it stays JSON.
    (authz_json,) = [
        m for m in mappers if flags(m) == {"UAEX"} and "content_type" in m["body_format_override"]
    ]
    assert authz_json["body_format_override"] == {
        "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
        "content_type": "application/json",
    }
    # The rate-limit service (RL) writes the details; the gateway closes the JSON around the request id.
    (limited_json,) = [
        m for m in mappers if flags(m) == {"RL"} and "content_type" in m["body_format_override"]
    ]
    body = limited_json["body_format_override"]["text_format_source"]["inline_string"]
    assert body.startswith('{"code":8,%LOCAL_REPLY_BODY%,')
    assert '"request_id":"%REQ(X-REQUEST-ID)%"' in body


def test_tls_listener_is_rendered_only_with_tls_and_carries_hsts(tmp_path: Path) -> None:
    plain = embedded_topology(
        50051, 50052, 8080, 9901, gateway_tls=GATEWAY_TLS, descriptor_set_path=DESCRIPTOR_SET_PATH
    )
    settings = plain.settings

    plain_config = rendered(plain)
    assert set(listeners(plain_config)) == {HTTP_LISTENER}
    (plain_chain,) = listeners(plain_config)[HTTP_LISTENER]["filter_chains"]
    assert "transport_socket" not in plain_chain
    assert "Strict-Transport-Security" not in added_response_headers(plain_config, HTTP_LISTENER)
    assert added_response_headers(plain_config, HTTP_LISTENER)["X-Content-Type-Options"] == "nosniff"

    secure = with_tls(plain, tmp_path, port=8443)
    assert secure.tls is not None
    config = rendered(secure)
    assert set(listeners(config)) == {HTTP_LISTENER, HTTPS_LISTENER}
    https = listeners(config)[HTTPS_LISTENER]
    assert https["address"]["socket_address"]["port_value"] == 8443
    (chain,) = https["filter_chains"]
    tls_context = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls_context["alpn_protocols"] == ["h2", "http/1.1"]
    assert tls_context["tls_params"] == {"tls_minimum_protocol_version": "TLSv1_2"}
    assert tls_context["tls_certificates"] == [
        {
            "certificate_chain": {"filename": str(secure.tls.cert_path.resolve())},
            "private_key": {"filename": str(secure.tls.key_path.resolve())},
        }
    ]
    https_headers = added_response_headers(config, HTTPS_LISTENER)
    assert https_headers["Strict-Transport-Security"] == settings.strict_transport_security
    assert "max-age=" in settings.strict_transport_security
    assert "Strict-Transport-Security" not in added_response_headers(config, HTTP_LISTENER)
    # Both listeners serve the same API.
    assert (
        connection_manager(config, HTTPS_LISTENER)["route_config"]
        == connection_manager(config, HTTP_LISTENER)["route_config"]
    )

    with pytest.raises(GatewayConfigError, match="TLS file"):
        dataclasses.replace(plain, tls=TlsListener(8443, tmp_path / "missing.pem", secure.tls.key_path))


def test_cors_policy_lists_the_allowed_origins_and_refuses_a_wildcard(topology: Topology) -> None:
    closed = virtual_host(rendered(topology))["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert closed["allow_origin_string_match"] == []

    policy = virtual_host(rendered(dataclasses.replace(topology, cors_allowed_origins=ALLOWED_ORIGINS)))[
        "typed_per_filter_config"
    ]["envoy.filters.http.cors"]
    assert policy["allow_origin_string_match"] == [{"exact": origin} for origin in ALLOWED_ORIGINS]
    assert policy["allow_credentials"] is True
    # An off-list preflight gets no CORS headers and goes no further.
    assert policy["forward_not_matching_preflights"] is False
    assert "x-api-key" in policy["allow_headers"]
    assert "x-request-id" in policy["expose_headers"]

    with pytest.raises(GatewayConfigError, match=r"'\*' is refused"):
        dataclasses.replace(topology, cors_allowed_origins=("*",))
    with pytest.raises(GatewayConfigError, match=r"'\*' is refused"):
        dataclasses.replace(topology, cors_allowed_origins=(ALLOWED_ORIGINS[0], "*"))
    with pytest.raises(GatewayConfigError, match="must be http"):
        dataclasses.replace(topology, cors_allowed_origins=("app.parley.example",))


def test_embedded_topology_points_every_area_at_the_one_grpc_port() -> None:
    by_name = clusters(
        rendered(
            embedded_topology(
                50051, 50052, 8080, 9901, gateway_tls=GATEWAY_TLS, descriptor_set_path=DESCRIPTOR_SET_PATH
            )
        )
    )

    for area in ("auth", "chat", "billing", "analytics"):
        assert endpoint(by_name[area]) == ("127.0.0.1", 50051)
        assert by_name[area]["type"] == "STATIC"
    assert endpoint(by_name["edge"]) == ("127.0.0.1", 50052)


def test_local_topology_uses_one_port_per_service() -> None:
    by_name = clusters(
        rendered(local_topology(gateway_tls=GATEWAY_TLS, descriptor_set_path=DESCRIPTOR_SET_PATH))
    )

    assert {area: endpoint(by_name[area]) for area in ("auth", "chat", "billing", "analytics")} == {
        "auth": ("127.0.0.1", 50061),
        "chat": ("127.0.0.1", 50062),
        "billing": ("127.0.0.1", 50063),
        "analytics": ("127.0.0.1", 50064),
    }


def test_k8s_topology_resolves_service_names_with_strict_dns() -> None:
    config = rendered(k8s_topology(gateway_tls=GATEWAY_TLS, descriptor_set_path=DESCRIPTOR_SET_PATH))
    by_name = clusters(config)

    for area in ("auth", "chat", "billing", "analytics"):
        assert endpoint(by_name[area]) == (f"{area}.parley.svc.cluster.local", 50051)
        assert "type" not in by_name[area]
        assert by_name[area]["cluster_type"]["name"] == "envoy.clusters.dns"
        assert by_name[area]["cluster_type"]["typed_config"]["all_addresses_in_single_endpoint"] is False
    listener_address = listeners(config)[HTTP_LISTENER]["address"]["socket_address"]
    assert listener_address["address"] == "0.0.0.0"


def test_written_config_and_its_sds_files_are_owner_only_and_name_the_pem_files(
    tmp_path: Path, service_pki: ServicePki
) -> None:
    gateway = service_pki.files("gateway")
    topology = embedded_topology(
        50051, 50052, 8080, 9901, gateway_tls=gateway, descriptor_set_path=DESCRIPTOR_SET_PATH
    )

    written = write_envoy_config(topology, tmp_path / "nested" / "envoy.yaml")

    sds = SdsFiles.beside(written)
    assert sds.directory == tmp_path / "nested" / "envoy-sds"
    assert stat.S_IMODE(sds.directory.stat().st_mode) == 0o700
    for path in (written, sds.certificate, sds.validation):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert written.read_text() == render_envoy_config(topology, sds=sds)
    (certificate,) = yaml.safe_load(sds.certificate.read_text())["resources"]
    assert certificate["name"] == "parley_workload_certificate"
    assert certificate["tls_certificate"] == {
        "certificate_chain": {"filename": str(gateway.cert_file)},
        "private_key": {"filename": str(gateway.key_file)},
        "watched_directory": {"path": str(service_pki.directory)},
    }
    (validation,) = yaml.safe_load(sds.validation.read_text())["resources"]
    assert validation["validation_context"] == {
        "trusted_ca": {"filename": str(gateway.ca_file)},
        "watched_directory": {"path": str(service_pki.directory)},
    }
    # Paths only: no PEM of any kind is copied into what Envoy's admin could show.
    for path in (written, sds.certificate, sds.validation):
        assert "-----BEGIN" not in path.read_text()


def test_a_config_is_not_written_without_the_gateways_certificate(tmp_path: Path) -> None:
    topology = embedded_topology(
        50051, 50052, 8080, 9901, gateway_tls=GATEWAY_TLS, descriptor_set_path=DESCRIPTOR_SET_PATH
    )

    with pytest.raises(GatewayConfigError, match=r"certificate files are missing: /etc/parley/pki/ca\.pem"):
        write_envoy_config(topology, tmp_path / "envoy.yaml")
    assert list(tmp_path.iterdir()) == []


def test_topologies_reject_bad_input() -> None:
    topology = embedded_topology(
        50051, 50052, 8080, 9901, gateway_tls=GATEWAY_TLS, descriptor_set_path=DESCRIPTOR_SET_PATH
    )

    with pytest.raises(GatewayConfigError, match="no upstream for billing"):
        dataclasses.replace(
            topology, upstreams={k: v for k, v in topology.upstreams.items() if k != "billing"}
        )
    with pytest.raises(GatewayConfigError, match="cannot read descriptor set"):
        render_envoy_config(
            dataclasses.replace(topology, descriptor_set_path=Path("/nonexistent.binpb")), sds=SDS
        )


def test_settings_file_loads() -> None:
    settings = load_gateway_settings()

    assert settings.grpc_only_response_headers == (
        "grpc-status",
        "grpc-message",
        "grpc-accept-encoding",
        "grpc-status-details-bin",
    )
    assert "parley.billing.v1.BillingService/HandleWebhook" in settings.authentication.open_methods
    assert settings.api_versions.stable == ("v1", "v2")
    assert settings.api_versions.unversioned_prefix == "/api/"


def envoy_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(envoy_binary_path()), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_envoy_accepts(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    assert "OK" in result.stdout
    # Deprecated fields would break on the next Envoy upgrade; the config uses none.
    deprecated = sorted(set(re.findall(r"Using deprecated option '([^']+)'", result.stderr)))
    assert deprecated == [], deprecated
    assert "Deprecated" not in result.stderr, result.stderr[-4000:]


@pytest.mark.envoy
def test_envoy_validates_the_rendered_config(
    topology: Topology, tmp_path: Path, service_pki: ServicePki
) -> None:
    topology = dataclasses.replace(topology, gateway_tls=service_pki.files("gateway"))
    path = write_envoy_config(topology, tmp_path / f"{topology.name}.yaml")

    assert_envoy_accepts(envoy_validate(path))


@pytest.mark.envoy
def test_envoy_validates_the_config_with_tls_cors_and_an_otlp_upstream(
    topology: Topology, tmp_path: Path, service_pki: ServicePki
) -> None:
    collector = "otel-collector.observability.svc.cluster.local" if topology.name == "k8s" else "127.0.0.1"
    hardened = dataclasses.replace(
        with_tls(dataclasses.replace(topology, gateway_tls=service_pki.files("gateway")), tmp_path),
        cors_allowed_origins=ALLOWED_ORIGINS,
        otlp=Upstream("otlp", collector, 4317),
    )
    path = write_envoy_config(hardened, tmp_path / f"{topology.name}-hardened.yaml")
    config = yaml.safe_load(path.read_text())
    assert set(listeners(config)) == {HTTP_LISTENER, HTTPS_LISTENER}
    assert "otlp" in clusters(config)

    assert_envoy_accepts(envoy_validate(path))
