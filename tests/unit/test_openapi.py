"""The OpenAPI generator: precise output for a purpose-built proto, and coverage of the real API."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from openapi_spec_validator import validate

from gateway.descriptors import DescriptorIndex
from gateway.openapi import (
    build_openapi,
    check_one_template_per_path,
    convert_path_template,
    error_model_schemas,
    first_sentence,
    main,
    path_shape,
    render,
    service_label,
)
from tests.support.protos import compile_descriptor_set

REPO_ROOT = Path(__file__).resolve().parents[2]
REAL_DESCRIPTOR_SET = REPO_ROOT / "gen" / "parley" / "descriptor_set.binpb"
REAL_OPENAPI = REPO_ROOT / "gen" / "parley" / "openapi.json"
REF = "#/components/schemas/"
NS = "parley.testing.v1"

WIDGETS_PROTO = """
syntax = "proto3";

package parley.testing.v1;

import "google/api/annotations.proto";
import "google/api/field_behavior.proto";
import "google/api/httpbody.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/empty.proto";
import "google/protobuf/field_mask.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

// Manages widgets on shelves.
//
// A second paragraph with details.
service WidgetService {
  // Returns one widget. Fails with NOT_FOUND when it is missing.
  rpc GetWidget(GetWidgetRequest) returns (Widget) {
    option (google.api.http) = {
      get: "/v1/{name=shelves/*/widgets/*}"
      additional_bindings {get: "/v1/widgets/{widget_id}"}
    };
  }

  // Lists the widgets on a shelf, e.g. for the shelf page.
  rpc ListWidgets(ListWidgetsRequest) returns (ListWidgetsResponse) {
    option (google.api.http) = {get: "/v1/shelves/{shelf_id}/widgets"};
  }

  // Creates a widget.
  rpc CreateWidget(CreateWidgetRequest) returns (Widget) {
    option (google.api.http) = {
      post: "/v1/shelves/{shelf_id}/widgets"
      body: "widget"
    };
  }

  // Updates a widget.
  rpc UpdateWidget(UpdateWidgetRequest) returns (Widget) {
    option (google.api.http) = {
      patch: "/v1/shelves/{shelf_id}/widgets/{widget.id}"
      body: "widget"
    };
  }

  // Streams changes to the widgets of a shelf.
  rpc WatchWidgets(WatchWidgetsRequest) returns (stream WidgetEvent) {
    option (google.api.http) = {
      post: "/v1/widgets:watch"
      body: "*"
    };
  }

  // Stores raw bytes.
  rpc Upload(google.api.HttpBody) returns (google.api.HttpBody) {
    option (google.api.http) = {
      post: "/v1/uploads"
      body: "*"
    };
  }

  // Deletes a widget.
  rpc DeleteWidget(DeleteWidgetRequest) returns (google.protobuf.Empty) {
    option (google.api.http) = {delete: "/v1/widgets/{widget_id}"};
  }

  // Reachable over gRPC only.
  rpc Ping(PingRequest) returns (PingResponse);
}

// Only for the mesh; never routable through the gateway.
service WidgetInternalService {
  // Rebuilds the index.
  rpc Reindex(PingRequest) returns (PingResponse) {
    option (google.api.http) = {
      post: "/v1/internal/reindex"
      body: "*"
    };
  }
}

// A widget on a shelf.
message Widget {
  // The widget id.
  string id = 1;
  // Its size in bytes.
  int64 size_bytes = 2;
  // The factory serial number.
  uint64 serial = 3;
  // A checksum of the contents.
  fixed64 checksum = 4;
  // How many are in stock.
  int32 count = 5;
  // Weight in kilograms.
  double weight = 6;
  // Whether it is on sale.
  bool active = 7;
  // Opaque payload.
  bytes blob = 8;
  // Its colour.
  Color color = 9;
  // Free-form tags.
  repeated string tags = 10;
  // Named counters.
  map<string, int64> counters = 11;
  // When it was created.
  google.protobuf.Timestamp create_time = 12;
  // How long it lives.
  google.protobuf.Duration ttl = 13;
  // Arbitrary attributes.
  google.protobuf.Struct attributes = 14;
  // An optional limit.
  google.protobuf.Int32Value limit = 15;
  // Who owns the widget.
  oneof owner {
    // Owned by a user.
    string user_id = 16;
    // Owned by a team.
    string team_id = 17;
  }
  // Its parts.
  repeated Part parts = 18;
  // Set by the server.
  string etag = 19 [(google.api.field_behavior) = OUTPUT_ONLY];
  // Do not use.
  string legacy = 20 [deprecated = true];
  // A nickname, when set.
  optional string nickname = 21;
  // Which fields to show.
  google.protobuf.FieldMask view_mask = 22;

  // One part of a widget.
  message Part {
    // The part's label.
    string label = 1;
  }
}

// The colour of a widget.
enum Color {
  // Not set.
  COLOR_UNSPECIFIED = 0;
  // Red.
  COLOR_RED = 1;
}

// Request for GetWidget.
message GetWidgetRequest {
  // The resource name.
  string name = 1;
  // The widget id.
  string widget_id = 2;
}

// Request for ListWidgets.
message ListWidgetsRequest {
  // The shelf.
  string shelf_id = 1 [(google.api.field_behavior) = REQUIRED];
  // The page size.
  int32 page_size = 2;
  // Only these colours.
  repeated Color colors = 3 [(google.api.field_behavior) = REQUIRED];
  // A filter.
  Filter filter = 4;
  // Only changed since.
  google.protobuf.Timestamp since = 5 [(google.api.field_behavior) = REQUIRED];
  // Not expressible as a query parameter.
  google.protobuf.Struct extra = 6;
  // Repeated messages cannot be query parameters.
  repeated Filter filters = 7;
  // Neither can maps.
  map<string, string> labels = 8;
}

// A filter on widgets.
message Filter {
  // Only this plan.
  string plan = 1 [(google.api.field_behavior) = REQUIRED];
  // At least this size.
  int64 min_size = 2;
  // Deeper than one level is not flattened.
  Filter nested = 3;
}

// Response for ListWidgets.
message ListWidgetsResponse {
  // The widgets.
  repeated Widget widgets = 1;
  // The next page.
  string next_page_token = 2;
}

// Request for CreateWidget.
message CreateWidgetRequest {
  // The shelf.
  string shelf_id = 1;
  // The widget to create.
  Widget widget = 2 [(google.api.field_behavior) = REQUIRED];
  // Idempotency key.
  string request_id = 3;
}

// Request for UpdateWidget.
message UpdateWidgetRequest {
  // The new state.
  Widget widget = 1;
  // Fields to update.
  google.protobuf.FieldMask update_mask = 2;
  // The shelf the widget is on.
  string shelf_id = 3;
}

// Request for WatchWidgets.
message WatchWidgetsRequest {
  // The shelf to watch.
  string shelf_id = 1 [(google.api.field_behavior) = REQUIRED];
  // Only widgets of this colour.
  Color color = 2 [(google.api.field_behavior) = REQUIRED];
  // Only widgets with these labels.
  map<string, string> labels = 3 [(google.api.field_behavior) = REQUIRED];
  // Where the last watch stopped.
  bytes cursor = 4 [(google.api.field_behavior) = REQUIRED];
  // At most this many events.
  optional int32 limit = 5 [(google.api.field_behavior) = REQUIRED];
  // Events per batch; not a page size, so no floor.
  int32 batch_size = 6;
  // Events per page.
  int32 page_size = 7;
}

// One change.
message WidgetEvent {
  // The widget after the change.
  Widget widget = 1;
}

// Request for DeleteWidget.
message DeleteWidgetRequest {
  // The widget id.
  string widget_id = 1;
}

// Empty request.
message PingRequest {}

// Empty response.
message PingResponse {}
"""

FOREIGN_PROTO = """
syntax = "proto3";

package acme.v1;

import "google/api/annotations.proto";

// Not ours: another package in the same descriptor set.
service AcmeService {
  // Does acme things.
  rpc Run(RunRequest) returns (RunResponse) {
    option (google.api.http) = {get: "/v1/acme"};
  }
}

// Request.
message RunRequest {}

// Response.
message RunResponse {}
"""


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    tmp_path = tmp_path_factory.mktemp("protos")
    return compile_descriptor_set(
        tmp_path,
        {"parley/testing/v1/widgets.proto": WIDGETS_PROTO, "acme/v1/acme.proto": FOREIGN_PROTO},
    )


@pytest.fixture(scope="module")
def doc(descriptor_set: bytes) -> dict[str, Any]:
    return build_openapi(descriptor_set, title="Widgets", version="v9")


def _operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(verb, path): op for path, item in document["paths"].items() for verb, op in item.items()}


def _schemas(document: dict[str, Any]) -> dict[str, Any]:
    schemas: dict[str, Any] = document["components"]["schemas"]
    return schemas


def test_document_is_valid_openapi_31(doc: dict[str, Any]) -> None:
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] == "Widgets"
    assert doc["info"]["version"] == "v9"
    assert doc["servers"] == [{"url": "/"}]


def test_only_public_parley_rules_become_operations(doc: dict[str, Any]) -> None:
    assert {key: op["operationId"] for key, op in _operations(doc).items()} == {
        ("get", "/v1/{name}"): "WidgetService_GetWidget",
        ("get", "/v1/widgets/{widget_id}"): "WidgetService_GetWidget_2",
        ("get", "/v1/shelves/{shelf_id}/widgets"): "WidgetService_ListWidgets",
        ("post", "/v1/shelves/{shelf_id}/widgets"): "WidgetService_CreateWidget",
        ("patch", "/v1/shelves/{shelf_id}/widgets/{widget.id}"): "WidgetService_UpdateWidget",
        ("post", "/v1/widgets:watch"): "WidgetService_WatchWidgets",
        ("post", "/v1/uploads"): "WidgetService_Upload",
        ("delete", "/v1/widgets/{widget_id}"): "WidgetService_DeleteWidget",
    }
    assert all(op["tags"] == ["WidgetService"] for op in _operations(doc).values())


def test_service_comment_becomes_tag(doc: dict[str, Any]) -> None:
    assert doc["tags"] == [
        {
            "name": "WidgetService",
            "description": "Manages widgets on shelves.\n\nA second paragraph with details.",
        }
    ]


def test_method_comment_becomes_summary_and_description(doc: dict[str, Any]) -> None:
    get = doc["paths"]["/v1/{name}"]["get"]
    assert get["summary"] == "Returns one widget"
    assert get["description"] == "Returns one widget. Fails with NOT_FOUND when it is missing."
    listing = doc["paths"]["/v1/shelves/{shelf_id}/widgets"]["get"]
    assert listing["summary"] == "Lists the widgets on a shelf, e.g. for the shelf page"


def test_resource_name_template_becomes_patterned_path_parameter(doc: dict[str, Any]) -> None:
    assert doc["paths"]["/v1/{name}"]["get"]["parameters"] == [
        {
            "name": "name",
            "in": "path",
            "required": True,
            "description": "The resource name.",
            "schema": {"type": "string", "pattern": "^shelves/[^/]+/widgets/[^/]+$"},
        },
        {"name": "widget_id", "in": "query", "description": "The widget id.", "schema": {"type": "string"}},
    ]
    assert doc["paths"]["/v1/widgets/{widget_id}"]["get"]["parameters"] == [
        {
            "name": "widget_id",
            "in": "path",
            "required": True,
            "description": "The widget id.",
            "schema": {"type": "string"},
        },
        {"name": "name", "in": "query", "description": "The resource name.", "schema": {"type": "string"}},
    ]


def test_get_query_parameters_flatten_one_level(doc: dict[str, Any]) -> None:
    parameters = doc["paths"]["/v1/shelves/{shelf_id}/widgets"]["get"]["parameters"]
    assert [(p["name"], p["in"]) for p in parameters] == [
        ("shelf_id", "path"),
        ("page_size", "query"),
        ("colors", "query"),
        ("filter.plan", "query"),
        ("filter.min_size", "query"),
        ("since", "query"),
    ]
    by_name = {p["name"]: p for p in parameters}
    assert by_name["page_size"] == {
        "name": "page_size",
        "in": "query",
        "description": "The page size.",
        "schema": {"type": "integer", "format": "int32", "minimum": 0},
    }
    assert by_name["colors"] == {
        "name": "colors",
        "in": "query",
        "required": True,
        "description": "Only these colours.",
        "schema": {"type": "array", "items": {"$ref": f"{REF}{NS}.Color"}, "minItems": 1},
    }
    # Required inside `filter` only when a filter is sent: never required, but never empty.
    assert by_name["filter.plan"] == {
        "name": "filter.plan",
        "in": "query",
        "description": "Only this plan.",
        "schema": {"type": "string", "minLength": 1},
    }
    assert by_name["filter.min_size"]["schema"] == {"type": "string", "format": "int64"}
    assert by_name["since"]["required"] is True
    assert by_name["since"]["schema"]["format"] == "date-time"
    assert by_name["shelf_id"]["schema"] == {"type": "string", "minLength": 1}
    assert "requestBody" not in doc["paths"]["/v1/shelves/{shelf_id}/widgets"]["get"]


def test_body_field_binding(doc: dict[str, Any]) -> None:
    create = doc["paths"]["/v1/shelves/{shelf_id}/widgets"]["post"]
    # `widget` is REQUIRED, but the transcoder sets it from an empty body too: the body is optional.
    assert create["requestBody"] == {
        "description": "The widget to create.",
        "content": {"application/json": {"schema": {"$ref": f"{REF}{NS}.Widget"}}},
    }
    # Fields outside the path and the body field still travel in the query string.
    assert [(p["name"], p["in"]) for p in create["parameters"]] == [
        ("shelf_id", "path"),
        ("request_id", "query"),
    ]


def test_path_variable_inside_body_field_is_left_out_of_the_body(doc: dict[str, Any]) -> None:
    update = doc["paths"]["/v1/shelves/{shelf_id}/widgets/{widget.id}"]["patch"]
    assert [(p["name"], p["in"]) for p in update["parameters"]] == [
        ("shelf_id", "path"),
        ("widget.id", "path"),
        ("update_mask", "query"),
    ]
    assert update["parameters"][1]["description"] == "The widget id."
    body_schema = update["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema["type"] == "object"
    assert "id" not in body_schema["properties"]
    assert set(body_schema["properties"]) == set(_schemas(doc)[f"{NS}.Widget"]["properties"]) - {"id"}


def test_body_star_without_path_fields_references_the_request(doc: dict[str, Any]) -> None:
    watch = doc["paths"]["/v1/widgets:watch"]["post"]
    assert "parameters" not in watch
    assert watch["requestBody"] == {
        "content": {"application/json": {"schema": {"$ref": f"{REF}{NS}.WatchWidgetsRequest"}}},
        "required": True,
    }


def test_request_schemas_publish_the_rules_the_services_enforce(doc: dict[str, Any]) -> None:
    request = _schemas(doc)[f"{NS}.WatchWidgetsRequest"]
    assert request["required"] == ["shelf_id", "color", "labels", "cursor", "limit"]
    props = request["properties"]
    assert props["shelf_id"]["minLength"] == 1
    assert props["color"] == {
        "$ref": f"{REF}{NS}.Color",
        "not": {"const": "COLOR_UNSPECIFIED"},
        "description": "Only widgets of this colour.",
    }
    assert props["labels"]["minProperties"] == 1
    assert props["cursor"]["minLength"] == 1
    assert props["limit"] == {
        "type": "integer",
        "format": "int32",
        "description": "At most this many events.",
    }
    assert "minimum" not in props["batch_size"]
    assert props["page_size"]["minimum"] == 0


def test_a_required_field_the_services_cannot_enforce_stops_the_generator(tmp_path: Path) -> None:
    proto = WIDGETS_PROTO.replace(
        "int32 page_size = 7;", "int32 page_size = 7 [(google.api.field_behavior) = REQUIRED];"
    )
    unenforceable = compile_descriptor_set(tmp_path, {"parley/testing/v1/widgets.proto": proto})
    with pytest.raises(
        ValueError, match="page_size is REQUIRED but a zero value cannot be told from an unset one"
    ):
        build_openapi(unenforceable, title="Widgets", version="v9")


# The finding of issue 11: UpdateConversation bound `{conversation.id}` where Get and Delete bound
# `{conversation_id}`, so one URL became two OpenAPI paths.
RENAMED_TEMPLATE_PROTO = WIDGETS_PROTO.replace(
    'patch: "/v1/shelves/{shelf_id}/widgets/{widget.id}"', 'patch: "/v1/widgets/{widget.id}"'
)


def test_paths_that_differ_only_in_template_names_stop_the_generator(tmp_path: Path) -> None:
    clashing = compile_descriptor_set(tmp_path, {"parley/testing/v1/widgets.proto": RENAMED_TEMPLATE_PROTO})
    with pytest.raises(ValueError, match="differ only in template names") as raised:
        build_openapi(clashing, title="Widgets", version="v9")
    assert str(raised.value).endswith(
        "/v1/widgets/{widget.id} (WidgetService_UpdateWidget) and "
        "/v1/widgets/{widget_id} (WidgetService_GetWidget_2, WidgetService_DeleteWidget)"
    )


def test_the_generator_command_names_the_clash_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    descriptor_set = tmp_path / "set.binpb"
    descriptor_set.write_bytes(
        compile_descriptor_set(tmp_path, {"parley/testing/v1/widgets.proto": RENAMED_TEMPLATE_PROTO})
    )
    out = tmp_path / "openapi.json"
    assert main(["--descriptor-set", str(descriptor_set), "--out", str(out)]) == 2
    assert not out.exists()
    (record,) = caplog.records
    assert "differ only in template names" in record.getMessage()
    assert record.exc_info is None


@pytest.mark.parametrize(
    ("paths", "clashes"),
    [
        (["/v1/a/{x}", "/v1/a/{y}"], True),
        (["/v1/a/{x}/b", "/v1/a/{x.y}/b"], True),
        (["/v1/{name}:cancel", "/v1/{id}:cancel"], True),
        (["/v1/a/{x}", "/v1/a/{x}/b", "/v1/b/{y}"], False),
        (["/v1/a/{x}", "/v1/a/{x}:cancel"], False),
        (["/v1/a/{x}", "/v2/a/{y}"], False),
        (["/v1/a", "/v1/{a}"], False),
    ],
)
def test_one_template_per_path_for_any_route_set(paths: list[str], clashes: bool) -> None:
    route_set = {path: {"get": {"operationId": f"Op{number}"}} for number, path in enumerate(paths, start=1)}
    if clashes:
        with pytest.raises(ValueError, match="differ only in template names"):
            check_one_template_per_path(route_set)
    else:
        check_one_template_per_path(route_set)


def test_server_streaming_is_an_event_stream_of_the_message(doc: dict[str, Any]) -> None:
    ok = doc["paths"]["/v1/widgets:watch"]["post"]["responses"]["200"]
    assert list(ok["content"]) == ["text/event-stream"]
    stream = ok["content"]["text/event-stream"]
    assert stream["schema"]["type"] == "string"
    assert f"`{NS}.WidgetEvent`" in stream["schema"]["description"]
    assert stream["x-sse-data-schema"] == {"$ref": f"{REF}{NS}.WidgetEvent"}
    assert f"{NS}.WidgetEvent" in _schemas(doc)


def test_http_body_is_raw_content(doc: dict[str, Any]) -> None:
    upload = doc["paths"]["/v1/uploads"]["post"]
    raw = {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": {}},
    }
    assert upload["requestBody"] == {"content": raw}
    assert upload["responses"]["200"]["content"] == raw
    assert "google.api.HttpBody" not in _schemas(doc)


def test_empty_response_is_an_empty_object(doc: dict[str, Any]) -> None:
    delete = doc["paths"]["/v1/widgets/{widget_id}"]["delete"]
    assert delete["responses"]["200"]["content"]["application/json"]["schema"]["type"] == "object"


def test_every_operation_documents_the_error_model(doc: dict[str, Any]) -> None:
    for operation in _operations(doc).values():
        default = operation["responses"]["default"]
        assert default["content"] == {"application/json": {"schema": {"$ref": f"{REF}Status"}}}


def test_status_schema(doc: dict[str, Any]) -> None:
    status = _schemas(doc)["Status"]
    assert status["properties"]["code"]["type"] == "integer"
    assert status["properties"]["code"]["format"] == "int32"
    assert status["properties"]["message"]["type"] == "string"
    detail = status["properties"]["details"]["items"]
    assert detail["type"] == "object"
    assert detail["required"] == ["@type"]
    assert detail["properties"]["@type"]["type"] == "string"
    assert {"ErrorInfo", "BadRequest", "QuotaFailure", "RequestInfo"} <= set(_schemas(doc))


def test_error_model_uses_the_proto_field_names(descriptor_set: bytes) -> None:
    index = DescriptorIndex(descriptor_pb2.FileDescriptorSet.FromString(descriptor_set))
    schemas = error_model_schemas()

    def proto_fields(full_name: str) -> set[str]:
        return {field.name for field in index.message(full_name).proto.field}

    for name in ("Status", "ErrorInfo", "BadRequest", "QuotaFailure", "RequestInfo", "LocalizedMessage"):
        assert set(schemas[name]["properties"]) == proto_fields(f"google.rpc.{name}"), name
    violation = schemas["BadRequest"]["properties"]["field_violations"]["items"]
    assert set(violation["properties"]) == proto_fields("google.rpc.BadRequest.FieldViolation")
    quota_violation = schemas["QuotaFailure"]["properties"]["violations"]["items"]
    assert set(quota_violation["properties"]) == proto_fields("google.rpc.QuotaFailure.Violation")


def test_message_schema_fields(doc: dict[str, Any]) -> None:
    widget = _schemas(doc)[f"{NS}.Widget"]
    assert widget["type"] == "object"
    assert widget["description"] == (
        "A widget on a shelf.\n\n"
        "Oneof `owner`: at most one of `user_id`, `team_id` is set. Who owns the widget."
    )
    props = widget["properties"]
    # No Widget field is REQUIRED, so each admits `null`, which proto3 JSON reads as "not set".
    assert props["id"] == {"type": ["string", "null"], "description": "The widget id."}
    assert props["size_bytes"] == {
        "type": ["string", "null"],
        "format": "int64",
        "description": "Its size in bytes.",
    }
    assert props["serial"] == {
        "type": ["string", "null"],
        "format": "int64",
        "description": "The factory serial number.",
    }
    assert props["checksum"] == {
        "type": ["string", "null"],
        "format": "int64",
        "description": "A checksum of the contents.",
    }
    assert props["count"] == {
        "type": ["integer", "null"],
        "format": "int32",
        "description": "How many are in stock.",
    }
    assert props["weight"] == {
        "type": ["number", "null"],
        "format": "double",
        "description": "Weight in kilograms.",
    }
    assert props["active"] == {"type": ["boolean", "null"], "description": "Whether it is on sale."}
    assert props["blob"]["format"] == "byte"
    assert props["color"] == {
        "anyOf": [{"$ref": f"{REF}{NS}.Color"}, {"type": "null"}],
        "description": "Its colour.",
    }
    assert props["tags"] == {
        "type": ["array", "null"],
        "items": {"type": "string"},
        "description": "Free-form tags.",
    }
    assert props["counters"] == {
        "type": ["object", "null"],
        "additionalProperties": {"type": "string", "format": "int64"},
        "description": "Named counters.",
    }
    assert props["create_time"] == {
        "type": ["string", "null"],
        "format": "date-time",
        "description": "When it was created.",
    }
    assert props["ttl"] == {
        "type": ["string", "null"],
        "pattern": r"^-?\d+(\.\d+)?s$",
        "description": "How long it lives.",
    }
    assert props["attributes"] == {
        "type": ["object", "null"],
        "additionalProperties": True,
        "description": "Arbitrary attributes.",
    }
    assert props["limit"] == {
        "type": ["integer", "null"],
        "format": "int32",
        "description": "An optional limit.",
    }
    assert props["view_mask"] == {"type": ["string", "null"], "description": "Which fields to show."}
    assert props["user_id"]["description"] == (
        "Owned by a user.\n\nMember of oneof `owner`: at most one of its fields is set."
    )
    assert props["parts"] == {
        "type": ["array", "null"],
        "items": {"$ref": f"{REF}{NS}.Widget.Part"},
        "description": "Its parts.",
    }
    assert props["etag"]["readOnly"] is True
    assert props["legacy"]["deprecated"] is True
    # proto3 `optional` is a synthetic oneof, not one to document.
    assert props["nickname"] == {"type": ["string", "null"], "description": "A nickname, when set."}
    assert "required" not in widget


def test_enum_schema(doc: dict[str, Any]) -> None:
    # Names or numbers, as protobuf's JSON mapping (and the transcoder) take either.
    assert _schemas(doc)[f"{NS}.Color"] == {
        "anyOf": [
            {"type": "string", "enum": ["COLOR_UNSPECIFIED", "COLOR_RED"]},
            {"type": "integer", "enum": [0, 1]},
        ],
        "description": "The colour of a widget.\n\n- `COLOR_UNSPECIFIED`: Not set.\n- `COLOR_RED`: Red.",
    }


def test_components_hold_only_reachable_types(doc: dict[str, Any]) -> None:
    generated = {name for name in _schemas(doc) if name.startswith(f"{NS}.")}
    assert generated == {
        f"{NS}.Widget",
        f"{NS}.Widget.Part",
        f"{NS}.Color",
        f"{NS}.ListWidgetsResponse",
        f"{NS}.WatchWidgetsRequest",
        f"{NS}.WidgetEvent",
    }
    assert not any(name.startswith("acme.") for name in _schemas(doc))


def test_output_is_deterministic(descriptor_set: bytes) -> None:
    first = render(build_openapi(descriptor_set, title="Widgets", version="v9"))
    second = render(build_openapi(descriptor_set, title="Widgets", version="v9"))
    assert first == second
    assert json.loads(first) == build_openapi(descriptor_set, title="Widgets", version="v9")


@pytest.mark.parametrize(
    ("template", "path", "patterns"),
    [
        ("/v1/conversations/{conversation_id}", "/v1/conversations/{conversation_id}", [None]),
        ("/v1/{name=projects/*}", "/v1/{name}", ["^projects/[^/]+$"]),
        ("/v1/{name=files/**}:download", "/v1/{name}:download", ["^files/.+$"]),
        ("/v1/{id=*}/{child.id}", "/v1/{id}/{child.id}", [None, None]),
        ("/v1/static", "/v1/static", []),
    ],
)
def test_convert_path_template(template: str, path: str, patterns: list[str | None]) -> None:
    converted, variables = convert_path_template(template)
    assert converted == path
    assert [variable.pattern for variable in variables] == patterns


def test_unnamed_wildcard_is_rejected() -> None:
    with pytest.raises(ValueError, match="unnamed wildcard"):
        convert_path_template("/v1/*/things")


@pytest.mark.parametrize(
    ("comment", "summary"),
    [
        ("Creates a thing.", "Creates a thing"),
        ("Creates a thing. Then more.", "Creates a thing"),
        ("Lists things, e.g. widgets. More.", "Lists things, e.g. widgets"),
        ("Wraps\nlines here.\n\nSecond paragraph.", "Wraps lines here"),
        ("No full stop", "No full stop"),
    ],
)
def test_first_sentence(comment: str, summary: str) -> None:
    assert first_sentence(comment) == summary


# --- the real, generated API ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_doc() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(REAL_OPENAPI.read_text(encoding="utf-8"))
    return document


def test_real_document_validates(real_doc: dict[str, Any]) -> None:
    validate(real_doc)


def test_real_document_matches_the_descriptor_set(real_doc: dict[str, Any]) -> None:
    rebuilt = build_openapi(
        REAL_DESCRIPTOR_SET.read_bytes(), title=real_doc["info"]["title"], version=real_doc["info"]["version"]
    )
    assert render(rebuilt) == REAL_OPENAPI.read_text(encoding="utf-8"), "run scripts/gen"


def test_real_document_has_one_template_per_path(real_doc: dict[str, Any]) -> None:
    shapes = Counter(path_shape(path) for path in real_doc["paths"])
    assert [shape for shape, count in shapes.items() if count > 1] == []
    # Every conversation route of both versions names the conversation the same way.
    for version in ("v1", "v2"):
        conversation = [path for path in real_doc["paths"] if path.startswith(f"/{version}/conversations/")]
        assert conversation
        assert all(path.startswith(f"/{version}/conversations/{{conversation_id}}") for path in conversation)
        assert set(real_doc["paths"][f"/{version}/conversations/{{conversation_id}}"]) == {
            "get",
            "patch",
            "delete",
        }


def test_real_document_covers_every_public_http_rule(real_doc: dict[str, Any]) -> None:
    index = DescriptorIndex(descriptor_pb2.FileDescriptorSet.FromString(REAL_DESCRIPTOR_SET.read_bytes()))
    expected: dict[tuple[str, str], str] = {}
    without_rule: list[str] = []
    for service in index.public_services():
        for method in service.methods:
            rule = method.rule
            if rule is None:
                without_rule.append(f"{service.full_name}.{method.name}")
                continue
            bindings = [rule, *rule.additional_bindings]
            for number, binding in enumerate(bindings, start=1):
                verb = binding.WhichOneof("pattern")
                template = binding.custom.path if verb == "custom" else getattr(binding, verb)
                verb = binding.custom.kind.lower() if verb == "custom" else verb
                operation_id = f"{service_label(service)}_{method.name}" + (
                    f"_{number}" if number > 1 else ""
                )
                expected[(verb, convert_path_template(template)[0])] = operation_id
    assert without_rule == [], "every public method must be routable through the gateway"
    assert expected, "the real descriptor set has no public http rules"
    actual = {key: op["operationId"] for key, op in _operations(real_doc).items()}
    assert actual == expected
    assert not any("InternalService" in operation_id for operation_id in actual.values())


def test_versions_side_by_side_keep_distinct_tags_and_v1_is_marked_deprecated(
    real_doc: dict[str, Any],
) -> None:
    operations = _operations(real_doc).values()
    tags = [tag["name"] for tag in real_doc["tags"]]
    assert len(tags) == len(set(tags))
    # v1 keeps its historical tag and operation ids; v2 gets a suffix, so generated clients never collide.
    assert {"ChatService", "ChatServiceV2"} <= set(tags)
    v1 = [op for op in operations if op["tags"] == ["ChatService"]]
    v2 = [op for op in operations if op["tags"] == ["ChatServiceV2"]]
    assert {op["operationId"].removeprefix("ChatService_") for op in v1} == {
        op["operationId"].removeprefix("ChatServiceV2_") for op in v2
    }
    # parley.chat.v1 is deprecated in its proto (the gateway adds the Sunset); its successor is not.
    assert all(op.get("deprecated") is True for op in v1)
    assert not [op for op in v2 if op.get("deprecated")]
    assert not [op for op in operations if op["tags"] != ["ChatService"] and op.get("deprecated")]
