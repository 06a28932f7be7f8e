"""The rendered Envoy config, type-checked against Envoy's own API messages (envoy-data-plane):
every topology, plain and with TLS, CORS and an OTLP collector, parses strictly into
`envoy.config.bootstrap.v3.Bootstrap`; and the check itself refuses a misspelled field, a wrong type,
an unknown enum value, a oneof set twice and an unknown `@type`. `envoy --mode validate` runs on the
same configs in test_gateway_render.py; this check needs no binary and names the key path that is
wrong (docs/adr/0011-typed-envoy-config-check.md)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.render import SdsFiles, render_envoy_config, render_sds_resources
from gateway.topology import (
    OTLP_CLUSTER,
    TlsListener,
    Topology,
    Upstream,
    embedded_topology,
    k8s_topology,
    local_topology,
)
from services.common.pki import TlsFiles
from tests.support.envoy_types import EnvoyConfigTypeError, bootstrap_from, discovery_resources_from
from tests.support.gateway import DESCRIPTOR_SET_PATH
from tests.support.tls import self_signed_certificate

# Rendering only names the certificate files.
GATEWAY_TLS = TlsFiles.in_directory(Path("/etc/parley/pki"), "gateway")
Config = dict[str, Any]


def topologies() -> list[Topology]:
    return [
        embedded_topology(
            50051, 50052, 8080, 9901, gateway_tls=GATEWAY_TLS, descriptor_set_path=DESCRIPTOR_SET_PATH
        ),
        local_topology(gateway_tls=GATEWAY_TLS, descriptor_set_path=DESCRIPTOR_SET_PATH),
        k8s_topology(gateway_tls=GATEWAY_TLS, descriptor_set_path=DESCRIPTOR_SET_PATH),
    ]


def rendered(topology: Topology) -> Config:
    config: Config = yaml.safe_load(
        render_envoy_config(topology, sds=SdsFiles(Path("/etc/parley/envoy/envoy-sds")))
    )
    return config


@pytest.fixture(scope="module")
def local_config() -> Config:
    config = rendered(local_topology(gateway_tls=GATEWAY_TLS, descriptor_set_path=DESCRIPTOR_SET_PATH))
    bootstrap_from(config)  # the baseline the mistakes are made in type-checks
    return config


@pytest.mark.parametrize("topology", topologies(), ids=lambda topology: topology.name)
@pytest.mark.parametrize("hardened", [False, True], ids=["plain", "tls-cors-otlp"])
def test_every_rendered_config_type_checks(topology: Topology, hardened: bool, tmp_path: Path) -> None:
    if hardened:
        cert_path, key_path = self_signed_certificate(tmp_path)
        collector = (
            "otel-collector.observability.svc.cluster.local" if topology.name == "k8s" else "127.0.0.1"
        )
        topology = dataclasses.replace(
            topology,
            tls=TlsListener(8443, cert_path, key_path),
            cors_allowed_origins=("https://app.parley.example",),
            otlp=Upstream(OTLP_CLUSTER, collector, 4317),
        )
    config = rendered(topology)

    bootstrap: Any = bootstrap_from(config)

    # The typed message holds what the YAML says (nothing was dropped on the way).
    resources = bootstrap.static_resources
    assert [cluster.name for cluster in resources.clusters] == [
        cluster["name"] for cluster in config["static_resources"]["clusters"]
    ]
    assert [listener.address.socket_address.port_value for listener in resources.listeners] == [
        topology.http_port,
        *([8443] if hardened else []),
    ]
    assert bootstrap.admin.address.socket_address.port_value == topology.admin_port


def test_the_sds_files_type_check_as_secrets() -> None:
    resources = render_sds_resources(topologies()[0])

    assert set(resources) == {"certificate", "validation"}
    for content in resources.values():
        (secret,) = discovery_resources_from(yaml.safe_load(content))
        assert secret.type_url == "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def _cluster(config: Config, name: str) -> Config:
    (found,) = [cluster for cluster in config["static_resources"]["clusters"] if cluster["name"] == name]
    cluster: Config = found
    return cluster


def _socket_address(cluster: Config) -> Config:
    (locality,) = cluster["load_assignment"]["endpoints"]
    address: Config = locality["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    return address


def _connection_manager(config: Config) -> Config:
    (chain,) = config["static_resources"]["listeners"][0]["filter_chains"]
    typed: Config = chain["filters"][0]["typed_config"]
    return typed


def _router(config: Config) -> Config:
    typed: Config = _connection_manager(config)["http_filters"][-1]["typed_config"]
    return typed


def _rename(key: str, to: str) -> Callable[[Config], None]:
    def mutate(section: Config) -> None:
        section[to] = section.pop(key)

    return mutate


MISSPELT_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Routr"
MISTAKES = [
    pytest.param(
        lambda config: _rename("connect_timeout", "connect_timout")(_cluster(config, "auth")),
        "static_resources.clusters[1].connect_timout: Cluster has no field 'connect_timout'",
        id="misspelled-field",
    ),
    pytest.param(
        lambda config: _router(config).update(suppress_envoy_header=True),
        "Router has no field 'suppress_envoy_header'",
        id="misspelled-field-in-a-typed-config",
    ),
    pytest.param(
        lambda config: _socket_address(_cluster(config, "auth")).update(port_value="50061"),
        "socket_address.port_value: '50061' is not an integer (uint32)",
        id="number-as-text",
    ),
    pytest.param(
        lambda config: _cluster(config, "auth")["outlier_detection"].update(enforcing_consecutive_5xx=0.5),
        "outlier_detection.enforcing_consecutive_5xx.value: 0.5 is not an integer (uint32)",
        id="fraction-for-an-integer",
    ),
    pytest.param(
        lambda config: _connection_manager(config).update(generate_request_id="yes"),
        "generate_request_id.value: 'yes' is not true or false",
        id="text-for-a-bool",
    ),
    pytest.param(
        lambda config: _cluster(config, "auth").update(lb_policy="LEAST_REQUESTS"),
        "lb_policy: 'LEAST_REQUESTS' is not one of",
        id="unknown-enum-value",
    ),
    pytest.param(
        lambda config: _cluster(config, "auth").update(connect_timeout="soon"),
        "connect_timeout: not a Duration",
        id="not-a-duration",
    ),
    pytest.param(
        lambda config: _cluster(config, "auth").update(cluster_type={"name": "envoy.clusters.dns"}),
        "cluster_type: oneof 'cluster_discovery_type' is already set by 'type'",
        id="oneof-set-twice",
    ),
    pytest.param(
        lambda config: _router(config).update({"@type": MISSPELT_ROUTER}),
        f"no Envoy API message {MISSPELT_ROUTER}",
        id="unknown-type-url",
    ),
]


@pytest.mark.parametrize(("mutate", "problem"), MISTAKES)
def test_the_check_refuses_what_envoy_would(
    local_config: Config, mutate: Callable[[Config], None], problem: str
) -> None:
    config = copy.deepcopy(local_config)
    mutate(config)
    with pytest.raises(EnvoyConfigTypeError) as refused:
        bootstrap_from(config)
    assert problem in str(refused.value)
