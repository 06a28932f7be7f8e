"""The rendered Envoy config: what it routes, what it hides, and that Envoy itself accepts it."""

from __future__ import annotations

import dataclasses
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.envoy_process import envoy_binary_path
from gateway.render import (
    GatewayConfigError,
    Topology,
    embedded_topology,
    k8s_topology,
    load_gateway_settings,
    local_topology,
    render_envoy_config,
    write_envoy_config,
)
from tests.support.gateway import DESCRIPTOR_SET_PATH, internal_service_names, public_service_names

SECRET = "unit-test-secret"


def all_topologies() -> list[Topology]:
    return [
        embedded_topology(50051, 50052, 8080, 9901, SECRET, descriptor_set_path=DESCRIPTOR_SET_PATH),
        local_topology(SECRET, descriptor_set_path=DESCRIPTOR_SET_PATH),
        k8s_topology(SECRET, descriptor_set_path=DESCRIPTOR_SET_PATH),
    ]


@pytest.fixture(params=all_topologies(), ids=lambda topology: topology.name)
def topology(request: pytest.FixtureRequest) -> Topology:
    chosen: Topology = request.param
    return chosen


def rendered(topology: Topology) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(render_envoy_config(topology))
    return config


def connection_manager(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    typed: dict[str, Any] = hcm["typed_config"]
    return typed


def http_filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [f for f in connection_manager(config)["http_filters"] if f["name"] == name]
    typed: dict[str, Any] = found["typed_config"]
    return typed


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    (virtual_host,) = connection_manager(config)["route_config"]["virtual_hosts"]
    found: list[dict[str, Any]] = virtual_host["routes"]
    return found


def route_paths(config: dict[str, Any]) -> dict[str, str]:
    """Route match (prefix or exact path) -> cluster."""
    return {
        route["match"].get("prefix") or route["match"]["path"]: route["route"]["cluster"]
        for route in routes(config)
    }


def clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}


def endpoint(cluster: dict[str, Any]) -> tuple[str, int]:
    (locality,) = cluster["load_assignment"]["endpoints"]
    (lb_endpoint,) = locality["lb_endpoints"]
    address = lb_endpoint["endpoint"]["address"]["socket_address"]
    return address["address"], address["port_value"]


def test_the_descriptor_set_has_public_and_internal_services() -> None:
    # Guards the tests below against passing vacuously on an empty or partial descriptor set.
    assert len(public_service_names()) >= 4
    assert internal_service_names()


def test_transcoder_serves_exactly_the_public_services(topology: Topology) -> None:
    transcoder = http_filter(rendered(topology), "envoy.filters.http.grpc_json_transcoder")

    assert transcoder["services"] == public_service_names()
    assert not [name for name in transcoder["services"] if name.endswith("InternalService")]
    assert transcoder["proto_descriptor"] == str(DESCRIPTOR_SET_PATH.resolve())
    assert transcoder["convert_grpc_status"] is True
    assert transcoder["request_validation_options"] == {
        "reject_unknown_method": True,
        "reject_unknown_query_parameters": True,
    }
    assert transcoder["print_options"]["always_print_primitive_fields"] is True
    assert transcoder["print_options"]["preserve_proto_field_names"] is True
    assert transcoder["print_options"]["stream_sse_style_delimited"] is True
    assert transcoder["max_request_body_size"] == topology.max_request_bytes


def test_every_public_service_routes_to_its_area_and_no_internal_service_routes(topology: Topology) -> None:
    paths = route_paths(rendered(topology))

    for service in public_service_names():
        area = service.split(".")[1]
        assert paths[f"/{service}/"] == area
    for service in internal_service_names():
        assert not [path for path in paths if service in path]
    assert not [path for path in paths if "InternalService" in path]
    # Nothing but gRPC paths: no catch-all that could reach an internal method.
    assert all(path.startswith(("/parley.", "/grpc.")) for path in paths)


def test_reflection_and_health_route_to_the_edge_server(topology: Topology) -> None:
    paths = route_paths(rendered(topology))

    assert paths["/grpc.reflection.v1.ServerReflection/"] == "edge"
    assert paths["/grpc.reflection.v1alpha.ServerReflection/"] == "edge"
    assert paths["/grpc.health.v1.Health/"] == "edge"


def test_streaming_methods_get_the_stream_timeout(topology: Topology) -> None:
    config = rendered(topology)
    settings = topology.settings

    streaming = [route for route in routes(config) if "path" in route["match"]]
    assert "/parley.chat.v1.ChatService/StreamMessage" in [route["match"]["path"] for route in streaming]
    for route in streaming:
        assert route["route"]["timeout"] == f"{settings.stream_timeout_s}s"
    unary = [route for route in routes(config) if route["match"].get("prefix", "").startswith("/parley.")]
    assert {route["route"]["timeout"] for route in unary} == {f"{settings.unary_timeout_s}s"}


def test_upstream_clusters_speak_http2_and_health_check_their_service(topology: Topology) -> None:
    by_name = clusters(rendered(topology))

    assert set(by_name) == {"auth", "chat", "billing", "analytics", "edge"}
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


def test_client_identity_headers_are_stripped_and_the_gateway_secret_added(topology: Topology) -> None:
    hcm = connection_manager(rendered(topology))

    (early,) = hcm["early_header_mutation_extensions"]
    assert early["typed_config"]["mutations"] == [
        {"remove_on_match": {"key_matcher": {"prefix": "x-parley-"}}}
    ]
    assert hcm["route_config"]["request_headers_to_add"] == [
        {
            "header": {"key": "x-parley-gateway-secret", "value": SECRET},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]


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
        "UPSTREAM_UNAVAILABLE": 14,
        "ROUTE_NOT_FOUND": 5,
        "MALFORMED_REQUEST": 3,
        "REQUEST_TOO_LARGE": 8,
        "UNSUPPORTED_MEDIA_TYPE": 3,
        "UNAUTHENTICATED": 16,
        "PERMISSION_DENIED": 7,
        "RATE_LIMITED": 8,
        "UPSTREAM_TIMEOUT": 4,
        "REQUEST_REJECTED": 3,
        "GATEWAY_ERROR": 13,
    }
    for body in json_bodies:
        if body is not None and "details" in body:
            error_info, request_info = body["details"]
            assert error_info["domain"] == "parley.dev"
            assert request_info == {
                "@type": "type.googleapis.com/google.rpc.RequestInfo",
                "request_id": "%REQ(X-REQUEST-ID)%",
            }


def test_embedded_topology_points_every_area_at_the_one_grpc_port() -> None:
    by_name = clusters(
        rendered(embedded_topology(50051, 50052, 8080, 9901, SECRET, descriptor_set_path=DESCRIPTOR_SET_PATH))
    )

    for area in ("auth", "chat", "billing", "analytics"):
        assert endpoint(by_name[area]) == ("127.0.0.1", 50051)
        assert by_name[area]["type"] == "STATIC"
    assert endpoint(by_name["edge"]) == ("127.0.0.1", 50052)


def test_local_topology_uses_one_port_per_service() -> None:
    by_name = clusters(rendered(local_topology(SECRET, descriptor_set_path=DESCRIPTOR_SET_PATH)))

    assert {area: endpoint(by_name[area]) for area in ("auth", "chat", "billing", "analytics")} == {
        "auth": ("127.0.0.1", 50061),
        "chat": ("127.0.0.1", 50062),
        "billing": ("127.0.0.1", 50063),
        "analytics": ("127.0.0.1", 50064),
    }


def test_k8s_topology_resolves_service_names_with_strict_dns() -> None:
    config = rendered(k8s_topology(SECRET, descriptor_set_path=DESCRIPTOR_SET_PATH))
    by_name = clusters(config)

    for area in ("auth", "chat", "billing", "analytics"):
        assert endpoint(by_name[area]) == (f"{area}.parley.svc.cluster.local", 50051)
        assert "type" not in by_name[area]
        assert by_name[area]["cluster_type"]["name"] == "envoy.clusters.dns"
        assert by_name[area]["cluster_type"]["typed_config"]["all_addresses_in_single_endpoint"] is False
    listener_address = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener_address["address"] == "0.0.0.0"


def test_written_config_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    topology = embedded_topology(50051, 50052, 8080, 9901, SECRET, descriptor_set_path=DESCRIPTOR_SET_PATH)

    written = write_envoy_config(topology, tmp_path / "nested" / "envoy.yaml")

    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert written.read_text() == render_envoy_config(topology)


def test_the_secret_stays_out_of_the_topology_repr() -> None:
    topology = embedded_topology(50051, 50052, 8080, 9901, SECRET, descriptor_set_path=DESCRIPTOR_SET_PATH)

    assert SECRET not in repr(topology)


def test_topologies_reject_bad_input() -> None:
    topology = embedded_topology(50051, 50052, 8080, 9901, SECRET, descriptor_set_path=DESCRIPTOR_SET_PATH)

    with pytest.raises(GatewayConfigError, match="no upstream for billing"):
        dataclasses.replace(
            topology, upstreams={k: v for k, v in topology.upstreams.items() if k != "billing"}
        )
    with pytest.raises(GatewayConfigError, match="secret"):
        dataclasses.replace(topology, gateway_secret="line\r\nbreak")
    with pytest.raises(GatewayConfigError, match="cannot read descriptor set"):
        render_envoy_config(dataclasses.replace(topology, descriptor_set_path=Path("/nonexistent.binpb")))


def test_settings_file_loads() -> None:
    settings = load_gateway_settings()

    assert settings.grpc_only_response_headers == ("grpc-status", "grpc-message", "grpc-accept-encoding")
    assert settings.identity_header_prefix == "x-parley-"


@pytest.mark.envoy
def test_envoy_validates_the_rendered_config(topology: Topology, tmp_path: Path) -> None:
    path = write_envoy_config(topology, tmp_path / f"{topology.name}.yaml")

    result = subprocess.run(
        [str(envoy_binary_path()), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-4000:]
    assert "OK" in result.stdout
    # Deprecated fields would break on the next Envoy upgrade; the config uses none.
    assert "Deprecated" not in result.stderr, result.stderr[-4000:]
