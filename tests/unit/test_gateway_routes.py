"""The gateway's routes refuse http rules the transcoder cannot tell apart, for any descriptor set."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.descriptors import DescriptorIndex, ServiceInfo, public_services
from gateway.render import SdsFiles, render_envoy_config
from gateway.routes import check_http_rules_unambiguous, url_pattern
from gateway.settings import GatewayConfigError
from gateway.topology import embedded_topology
from services.common.pki import TlsFiles
from tests.support.gateway import DESCRIPTOR_SET_PATH
from tests.support.protos import compile_descriptor_set

# In chat's package, so the embedded topology has an upstream (a cluster) for it.
THINGS_PROTO = """
syntax = "proto3";

package parley.chat.v9;

import "google/api/annotations.proto";

// Things.
service ThingService {
  // Returns a thing.
  rpc GetThing(GetThingRequest) returns (Thing) {
    option (google.api.http) = {get: "/v1/things/{thing_id}"};
  }

  // Updates a thing.
  rpc UpdateThing(UpdateThingRequest) returns (Thing) {
    option (google.api.http) = {
      patch: "/v1/things/{thing.id}"
      body: "thing"
    };
  }

  // Archives a thing.
  rpc ArchiveThing(GetThingRequest) returns (Thing) {
    option (google.api.http) = {
      post: "/v1/things/{thing_id}:archive"
      body: "*"
    };
  }

  // SECOND_RULE
}

// A thing.
message Thing {
  // Its id.
  string id = 1;
}

// Names a thing.
message GetThingRequest {
  // The thing's id.
  string thing_id = 1;
  // The thing's resource name.
  string name = 2;
}

// A thing's new state.
message UpdateThingRequest {
  // The thing.
  Thing thing = 1;
}
"""


def things_services(tmp_path: Path, second_rule: str = "") -> tuple[Path, list[ServiceInfo]]:
    """The descriptor set of THINGS_PROTO with `second_rule` (an rpc) added, and its public services."""
    proto = THINGS_PROTO.replace("// SECOND_RULE", second_rule)
    descriptor_set = compile_descriptor_set(tmp_path, {"parley/chat/v9/things.proto": proto})
    path = tmp_path / "things.binpb"
    path.write_bytes(descriptor_set)
    return path, public_services(DescriptorIndex.from_bytes(descriptor_set))


def rpc(verb: str, template: str) -> str:
    return f"""// Reads a thing another way.
  rpc FindThing(GetThingRequest) returns (Thing) {{
    option (google.api.http) = {{{verb}: "{template}"}};
  }}"""


@pytest.mark.parametrize(
    ("template", "pattern"),
    [
        ("/v1/things/{thing_id}", "/v1/things/*"),
        ("/v1/things/{thing.id}", "/v1/things/*"),
        ("/v1/{name=things/*}", "/v1/things/*"),
        ("/v1/{name=files/**}:download", "/v1/files/**:download"),
        ("/v1/{id=*}/{child.id}", "/v1/*/*"),
        ("/v1/static", "/v1/static"),
    ],
)
def test_url_pattern_leaves_out_the_variable_names(template: str, pattern: str) -> None:
    assert url_pattern(template) == pattern


def test_distinct_methods_or_paths_are_accepted(tmp_path: Path) -> None:
    # GET and PATCH of one URL with different field names: the transcoder tells them apart by method
    # (the OpenAPI generator refuses the names; that is its own check).
    _, services = things_services(tmp_path, rpc("get", "/v1/things/{thing_id}/parts"))
    check_http_rules_unambiguous(services)


@pytest.mark.parametrize(
    "second_rule",
    [
        pytest.param(rpc("get", "/v1/things/{name}"), id="names-differ"),
        pytest.param(rpc("get", "/v1/{name=things/*}"), id="segments-in-a-pattern"),
        pytest.param(rpc("get", "/v1/things/{thing_id}"), id="same-template"),
    ],
)
def test_two_rules_matching_the_same_urls_are_refused(tmp_path: Path, second_rule: str) -> None:
    _, services = things_services(tmp_path, second_rule)
    with pytest.raises(GatewayConfigError, match="match the same URLs") as raised:
        check_http_rules_unambiguous(services)
    message = str(raised.value)
    assert "parley.chat.v9.ThingService/GetThing (GET /v1/things/{thing_id})" in message
    assert "parley.chat.v9.ThingService/FindThing (GET " in message


def test_rendering_the_envoy_config_refuses_them(tmp_path: Path) -> None:
    descriptor_set, _ = things_services(tmp_path, rpc("get", "/v1/things/{name}"))
    topology = embedded_topology(
        50051,
        50052,
        8080,
        9901,
        gateway_tls=TlsFiles.in_directory(tmp_path / "pki", "gateway"),
        descriptor_set_path=descriptor_set,
    )
    with pytest.raises(GatewayConfigError, match="match the same URLs"):
        render_envoy_config(topology, sds=SdsFiles(tmp_path / "sds"))


def test_the_real_contract_has_no_ambiguous_rules() -> None:
    services = public_services(DescriptorIndex.from_bytes(DESCRIPTOR_SET_PATH.read_bytes()))
    check_http_rules_unambiguous(services)
