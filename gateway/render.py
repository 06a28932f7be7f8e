"""Turn a gateway topology into Envoy bootstrap YAML.

The template (`envoy/envoy.yaml.j2`) holds the shape of the config and `envoy/gateway.yaml` holds the
limits, timeouts and error mappings; this module only decides what varies per deployment: where the
upstreams live, which ports to bind, and which services the descriptor set makes public. The parts
live by concern: `gateway/settings.py` (the YAML data), `gateway/topology.py` (where things are),
`gateway/descriptors.py` (the public services and their HTTP bindings), `gateway/routes.py` (one
route per method), `gateway/local_replies.py` (Envoy's own errors in the Parley shape).
"""

from __future__ import annotations

import html
import ipaddress
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jinja2
import yaml

from gateway.descriptors import DescriptorIndex, ServiceInfo, public_services
from gateway.local_replies import MEDIA_TYPE_ERROR_HEADER, VERSION_ERROR_HEADER, local_reply_mappers
from gateway.routes import (
    EXT_AUTHZ_DISABLED,
    EXT_AUTHZ_FILTER,
    RATE_LIMIT_FILTERS,
    RouteTarget,
    ServedPath,
    edge_routes,
    grpc_served_paths,
    json_served_paths,
    method_not_allowed_routes,
    method_routes,
    route_not_found,
    served_methods,
)
from gateway.settings import ENVOY_DIR, GatewayConfigError, GatewaySettings
from gateway.topology import OTLP_CLUSTER, Topology, Upstream
from services.common.identity import (
    AUTH_METHOD_HEADER,
    GATEWAY_HEADER_PREFIX,
    JWT_CLAIM_HEADERS,
    USER_ID_HEADER,
)
from services.common.pki import server_name, workload_uri
from services.common.ratelimit import RateLimitConfigError, load_rate_limit_config
from services.common.reflection import REFLECTION_SERVICES
from services.common.settings import SERVICE_NAMES
from services.common.token_rules import CLOCK_SKEW_S, MAX_LIFETIME_S

TEMPLATE_NAME: Final = "envoy.yaml.j2"
LUA_TEMPLATE_NAME: Final = "api_edge.lua.j2"

# Operator tooling the edge gRPC server answers for every client (grpcurl, k8s probes), besides
# reflection (REFLECTION_SERVICES).
HEALTH_SERVICE: Final = "grpc.health.v1.Health"

MIB: Final = 1024 * 1024
SELF_CLUSTER: Final = "gateway_self"
DOCS_STYLE: Final = "body{font-family:sans-serif;margin:2em}td{padding:.2em 1em;border-bottom:1px solid #ddd}"
JWKS_PATH: Final = "/.well-known/jwks.json"
LIVEZ_PATH: Final = "/livez"
TRANSCODER_FILTER: Final = "envoy.filters.http.grpc_json_transcoder"
# Envoy's own JSON and OpenAPI documents are served from memory; the OpenAPI document is ~200 KiB.
MAX_DIRECT_RESPONSE_BYTES: Final = 4 * MIB
# The SDS resources Envoy reads its certificate and its trust bundle from (files in `SdsFiles`).
CERTIFICATE_SDS_NAME: Final = "parley_workload_certificate"
TRUST_BUNDLE_SDS_NAME: Final = "parley_service_ca"
SDS_RESOURCE_TYPE: Final = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


@dataclass(frozen=True)
class SdsFiles:
    """The two SDS files of a rendered config, in a folder of their own beside it.

    They name the PEM files, never their content: Envoy reads the certificate and key from those
    paths and rereads them when a file is moved into their folder (a rotation). Its admin
    `/config_dump` shows what it loaded: the certificate and the CA (public), the key as `[redacted]`.
    """

    directory: Path

    @classmethod
    def beside(cls, config_path: Path) -> SdsFiles:
        return cls(config_path.with_name(f"{config_path.stem}-sds"))

    @property
    def certificate(self) -> Path:
        return self.directory / "certificate.yaml"

    @property
    def validation(self) -> Path:
        return self.directory / "validation.yaml"


def _discovery_type(host: str) -> str:
    """IP literals are STATIC; names are STRICT_DNS, re-resolved so k8s headless services yield every pod."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "STRICT_DNS"
    return "STATIC"


def _duration_ms(milliseconds: int) -> str:
    return f"{milliseconds / 1000:g}s"


def _cluster_for(service: ServiceInfo, upstreams: Mapping[str, Upstream]) -> str:
    if service.area not in upstreams:
        raise GatewayConfigError(
            f"{service.full_name} belongs to area {service.area!r}, which has no upstream"
        )
    return service.area


def _health_service_by_area(services: Sequence[ServiceInfo]) -> dict[str, str]:
    """The service each cluster's gRPC health check names: `parley.billing.v1.BillingService` for
    billing, i.e. the area's conventionally named service, else its first public service."""
    names_by_area: dict[str, list[str]] = {}
    for service in services:
        names_by_area.setdefault(service.area, []).append(service.full_name)
    return {
        area: next((name for name in names if name.endswith(f".{area.capitalize()}Service")), names[0])
        for area, names in names_by_area.items()
    }


class _PlainDumper(yaml.SafeDumper):
    """Writes shared sub-structures out in full instead of as YAML anchors and aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _template_environment(template_dir: Path) -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - the output is YAML or Lua, never HTML.
        keep_trailing_newline=True,
    )
    # JSON is valid YAML (and a valid Lua string literal for plain text) and escapes every string
    # safely; structured values go through it.
    environment.filters["tojson"] = lambda value: json.dumps(value, sort_keys=False)
    # Block YAML for larger structures, so the rendered file stays readable when debugging it.
    environment.filters["toyaml"] = lambda value: yaml.dump(
        value, Dumper=_PlainDumper, default_flow_style=False, sort_keys=False, width=1000
    ).rstrip("\n")
    environment.filters["duration_ms"] = _duration_ms
    return environment


def _versions_by_segment(
    services: Sequence[ServiceInfo], settings: GatewaySettings
) -> tuple[list[tuple[str, list[str]]], list[tuple[str, str]]]:
    """For the Lua negotiation: each first path segment under /vN/, the versions serving it, and the
    newest stable one of those."""
    offered: dict[str, set[str]] = {}
    for service in services:
        for method in service.methods:
            for path in method.http_paths:
                parts = path.strip("/").split("/")
                if len(parts) >= 2 and parts[0] == service.version:
                    segment = parts[1].split(":")[0]
                    offered.setdefault(segment, set()).add(service.version)

    def version_number(version: str) -> int:
        return int(version.removeprefix("v")) if version.removeprefix("v").isdigit() else 0

    offered_sorted = [
        (segment, sorted(versions, key=version_number)) for segment, versions in sorted(offered.items())
    ]
    newest_stable = [
        (segment, stable[-1])
        for segment, versions in offered_sorted
        if (stable := [version for version in versions if version in settings.api_versions.stable])
    ]
    return offered_sorted, newest_stable


def _docs_page(services: Sequence[ServiceInfo], settings: GatewaySettings) -> str:
    """A dependency-free HTML index of the public API: every method with its HTTP binding."""
    rows = []
    for service in services:
        for method in service.methods:
            binding = html.escape(
                " | ".join(f"{method.http_verb.upper()} {path}" for path in method.http_paths) or "gRPC only"
            )
            rows.append(
                f"<tr><td>{html.escape(service.full_name)}/{html.escape(method.name)}</td><td>{binding}</td></tr>"
            )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Parley API</title>"
        f"<style>{DOCS_STYLE}</style></head><body><h1>Parley API</h1>"
        f'<p>OpenAPI 3.1: <a href="{settings.docs.openapi_path}">{settings.docs.openapi_path}</a>. '
        f"Unversioned paths under <code>{settings.api_versions.unversioned_prefix}</code> follow the "
        f"<code>{settings.api_versions.header}</code> header.</p>"
        f"<table>{''.join(rows)}</table></body></html>"
    )


# The gateway's own pages (and /healthz, answered by the health-check filter) serve GET and HEAD.
PAGE_METHODS: Final = served_methods(["GET"])


def _page_match(path: str) -> dict[str, Any]:
    method_regex = "|".join(sorted(PAGE_METHODS))
    return {
        "path": path,
        "headers": [{"name": ":method", "string_match": {"safe_regex": {"regex": f"^(?:{method_regex})$"}}}],
    }


def _docs_routes(topology: Topology, services: Sequence[ServiceInfo]) -> list[dict[str, Any]]:
    settings = topology.settings
    # Answered by Envoy itself: no credentials, and no transcoder (it would refuse a path no RPC has).
    open_route = {
        EXT_AUTHZ_FILTER: EXT_AUTHZ_DISABLED,
        TRANSCODER_FILTER: {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
            "disabled": True,
        },
    }
    openapi_path = topology.descriptor_set_path.resolve().parent / "openapi.json"
    routes: list[dict[str, Any]] = [
        {
            "name": "docs_page",
            "match": _page_match(settings.docs.page_path),
            "direct_response": {"status": 200, "body": {"inline_string": _docs_page(services, settings)}},
            "response_headers_to_add": [
                {"header": {"key": "content-type", "value": "text/html; charset=utf-8"}},
                {
                    "header": {
                        "key": "content-security-policy",
                        "value": settings.docs_content_security_policy,
                    }
                },
                {"header": {"key": "cache-control", "value": "public, max-age=300"}},
            ],
            "typed_per_filter_config": open_route,
        },
    ]
    if openapi_path.is_file():
        routes.append(
            {
                "name": "openapi",
                "match": _page_match(settings.docs.openapi_path),
                "direct_response": {"status": 200, "body": {"filename": str(openapi_path)}},
                "response_headers_to_add": [
                    {"header": {"key": "content-type", "value": "application/json"}},
                    {"header": {"key": "cache-control", "value": "public, max-age=300"}},
                ],
                "typed_per_filter_config": open_route,
            }
        )
    # Browser preflights: the CORS filter answers them (off-list origins without CORS headers) once
    # a forwarding route matches - it ignores direct responses. Only a preflight (OPTIONS with Origin
    # and Access-Control-Request-Method) takes this route, so none reaches its cluster; any other
    # OPTIONS is a method the path does not serve (405) or a path with no route (404).
    routes.insert(
        0,
        {
            "name": "cors_preflight",
            "match": {
                "prefix": "/",
                "headers": [
                    {"name": ":method", "string_match": {"exact": "OPTIONS"}},
                    {"name": "origin", "present_match": True},
                    {"name": "access-control-request-method", "present_match": True},
                ],
            },
            "route": {"cluster": topology.edge.name, "timeout": "5s"},
            "typed_per_filter_config": open_route,
        },
    )
    # Envoy's own liveness: answered without touching any upstream (also the benchmark's ceiling).
    routes.append(
        {
            "name": "livez",
            "match": _page_match(LIVEZ_PATH),
            "direct_response": {"status": 200, "body": {"inline_string": '{"status":"ALIVE"}'}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
            "typed_per_filter_config": open_route,
        }
    )
    return routes


def _cors_policy(topology: Topology) -> dict[str, Any]:
    settings = topology.settings
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": [{"exact": origin} for origin in topology.cors_allowed_origins],
        "allow_methods": settings.cors.allow_methods,
        "allow_headers": settings.cors.allow_headers,
        "expose_headers": settings.cors.expose_headers,
        "max_age": str(settings.cors.max_age_s),
        "allow_credentials": True,
        # A browser preflight from an origin off the list gets no CORS headers and stops there.
        "forward_not_matching_preflights": False,
    }


def render_sds_resources(topology: Topology) -> dict[str, str]:
    """The SDS files' content by `SdsFiles` property: Envoy's certificate, and the CA it checks the
    services and the edge with (each watched in its folder, so a replaced file is picked up)."""
    tls = topology.gateway_tls
    certificate = {
        "@type": SDS_RESOURCE_TYPE,
        "name": CERTIFICATE_SDS_NAME,
        "tls_certificate": {
            "certificate_chain": {"filename": str(tls.cert_file.resolve())},
            "private_key": {"filename": str(tls.key_file.resolve())},
            "watched_directory": {"path": str(tls.cert_file.resolve().parent)},
        },
    }
    validation = {
        "@type": SDS_RESOURCE_TYPE,
        "name": TRUST_BUNDLE_SDS_NAME,
        "validation_context": {
            "trusted_ca": {"filename": str(tls.ca_file.resolve())},
            "watched_directory": {"path": str(tls.ca_file.resolve().parent)},
        },
    }
    return {
        "certificate": json.dumps({"resources": [certificate]}, indent=2),
        "validation": json.dumps({"resources": [validation]}, indent=2),
    }


def _upstream_tls(name: str, sds: SdsFiles) -> dict[str, Any]:
    """The transport socket of a cluster to Parley workload `name`: mTLS with the gateway's certificate,
    accepting only `name`'s certificate from the Parley CA."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": server_name(name),
            "common_tls_context": {
                # gRPC servers insist on h2 by ALPN.
                "alpn_protocols": ["h2"],
                "tls_params": {
                    "tls_minimum_protocol_version": "TLSv1_2",
                    "tls_maximum_protocol_version": "TLSv1_3",
                },
                "tls_certificate_sds_secret_configs": [
                    {"name": CERTIFICATE_SDS_NAME, "sds_config": _file_source(sds.certificate)}
                ],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"exact": workload_uri(name)}}
                        ]
                    },
                    "validation_context_sds_secret_config": {
                        "name": TRUST_BUNDLE_SDS_NAME,
                        "sds_config": _file_source(sds.validation),
                    },
                },
            },
        },
    }


def _file_source(path: Path) -> dict[str, Any]:
    return {"path_config_source": {"path": str(path.resolve())}, "resource_api_version": "V3"}


def render_envoy_config(topology: Topology, *, sds: SdsFiles, template_dir: Path = ENVOY_DIR) -> str:
    """The complete Envoy bootstrap for `topology`, as YAML; its certificates come from `sds`."""
    try:
        descriptor_bytes = topology.descriptor_set_path.read_bytes()
    except OSError as error:
        raise GatewayConfigError(
            f"cannot read descriptor set {topology.descriptor_set_path}: {error}"
        ) from error
    services = public_services(DescriptorIndex.from_bytes(descriptor_bytes))
    if not services:
        raise GatewayConfigError(f"{topology.descriptor_set_path} holds no public Parley service")
    try:
        rate_limits = load_rate_limit_config(topology.rate_limits_path)
    except RateLimitConfigError as error:
        raise GatewayConfigError(str(error)) from error
    health_services = _health_service_by_area(services)
    settings = topology.settings

    clusters = [
        {
            "name": area,
            "host": upstream.host,
            "port": upstream.port,
            "discovery": _discovery_type(upstream.host),
            # An area with no public service yet is still checked, via the server's overall health.
            "health_service": health_services.get(area, ""),
            # The service's workload is the area's name.
            "transport_socket": _upstream_tls(area, sds),
        }
        for area, upstream in sorted(topology.upstreams.items())
        if area in SERVICE_NAMES
    ]
    targets = [RouteTarget(service, _cluster_for(service, topology.upstreams)) for service in services]
    edge_services = [*REFLECTION_SERVICES, HEALTH_SERVICE]
    docs_routes = _docs_routes(topology, services)
    # What each path serves, from the same sources as the routes that serve it: the HTTP rules, the
    # gRPC methods, the gateway's own pages (matched by path and method) and /healthz.
    served = [
        *json_served_paths(services),
        *grpc_served_paths(services, edge_services),
        *(
            ServedPath(route["match"]["path"], PAGE_METHODS)
            for route in docs_routes
            if "direct_response" in route
        ),
        ServedPath(settings.healthz.path, PAGE_METHODS),
    ]
    routes = [
        *docs_routes,
        *method_routes(targets, settings, rate_limits),
        *edge_routes(edge_services, topology.edge.name, settings),
        *method_not_allowed_routes(served),
        route_not_found(),
    ]

    api_headers = list(settings.security_headers.items())
    listeners: list[dict[str, Any]] = [
        {"name": "parley_http", "port": topology.http_port, "tls": None, "security_headers": api_headers}
    ]
    if topology.tls is not None:
        listeners.append(
            {
                "name": "parley_https",
                "port": topology.tls.port,
                "tls": {
                    "cert_path": str(topology.tls.cert_path.resolve()),
                    "key_path": str(topology.tls.key_path.resolve()),
                },
                "security_headers": [
                    *api_headers,
                    ("Strict-Transport-Security", settings.strict_transport_security),
                ],
            }
        )

    environment = _template_environment(template_dir)
    offered_versions, newest_stable = _versions_by_segment(services, settings)
    lua_source = environment.get_template(LUA_TEMPLATE_NAME).render(
        unversioned_prefix=settings.api_versions.unversioned_prefix,
        version_header=settings.api_versions.header,
        version_error_header=VERSION_ERROR_HEADER,
        media_type_error_header=MEDIA_TYPE_ERROR_HEADER,
        raw_body_prefixes=sorted(
            {
                path.split("{", 1)[0]
                for service in services
                for method in service.methods
                if method.raw_body
                for path in method.http_paths
            }
        ),
        offered_versions=offered_versions,
        newest_stable=newest_stable,
    )
    otlp = (
        {
            "host": topology.otlp.host,
            "port": topology.otlp.port,
            "discovery": _discovery_type(topology.otlp.host),
        }
        if topology.otlp
        else None
    )
    template = environment.get_template(TEMPLATE_NAME)
    return template.render(
        topology=topology,
        settings=settings,
        services=services,
        routes=routes,
        listeners=listeners,
        clusters=clusters,
        edge=topology.edge,
        edge_discovery=_discovery_type(topology.edge.host),
        edge_transport_socket=_upstream_tls(topology.edge.name, sds),
        descriptor_set_path=str(topology.descriptor_set_path.resolve()),
        local_reply_mappers=local_reply_mappers(settings, max_request_bytes=topology.max_request_bytes),
        access_log_path=str(topology.access_log_path) if topology.access_log_path else None,
        lua_source=lua_source,
        cors_policy=_cors_policy(topology),
        identity_claims=JWT_CLAIM_HEADERS,
        token_rules={"clock_skew_s": CLOCK_SKEW_S, "max_lifetime_s": MAX_LIFETIME_S},
        gateway_header_prefix=GATEWAY_HEADER_PREFIX,
        auth_method_header=AUTH_METHOD_HEADER,
        user_id_header=USER_ID_HEADER,
        jwks_uri=f"http://127.0.0.1:{topology.http_port}{JWKS_PATH}",
        page_methods=sorted(PAGE_METHODS),
        self_cluster=SELF_CLUSTER,
        trace_cluster=OTLP_CLUSTER if otlp else topology.edge.name,
        otlp=otlp,
        rate_limit_filters=RATE_LIMIT_FILTERS,
        rate_limit_domain=rate_limits.domain,
        max_direct_response_bytes=MAX_DIRECT_RESPONSE_BYTES,
    )


def write_envoy_config(topology: Topology, path: Path) -> Path:
    """Render and write the config, and its SDS files beside it (`SdsFiles.beside`), owner-only.

    They hold no secret (the certificate files are only named), but they say where the keys are.
    """
    missing = topology.gateway_tls.missing()
    if missing:
        raise GatewayConfigError(
            f"the gateway's certificate files are missing: {', '.join(map(str, missing))}"
        )
    sds = SdsFiles.beside(path)
    rendered = render_envoy_config(topology, sds=sds)
    sds.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    resources = render_sds_resources(topology)
    _write_owner_only(sds.certificate, resources["certificate"])
    _write_owner_only(sds.validation, resources["validation"])
    _write_owner_only(path, rendered)
    return path


def _write_owner_only(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(content)
    path.chmod(0o600)
