"""REQUIRED fields: derived from `google.api.field_behavior` over real generated descriptors (the
contracts, and purpose-built protos for the cases they do not have yet), and checked on messages."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from google.api import field_behavior_pb2
from google.protobuf import descriptor_pb2, message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from parley.analytics.v1 import analytics_pb2
from parley.auth.v1 import auth_pb2
from parley.billing.v1 import billing_pb2
from parley.chat.v1 import chat_pb2
from parley.chat.v2 import chat_pb2 as chat_v2_pb2
from services.common.errors import InvalidArgument
from services.common.required_fields import REQUIRED_FIELD_REASON, RequiredFields, Requirement, descriptor_of
from services.common.validation import RequestValidator
from tests.support.protos import compile_descriptor_set, pool_of

CONTRACTS: tuple[ModuleType, ...] = (auth_pb2, chat_pb2, chat_v2_pb2, billing_pb2, analytics_pb2)

SHAPES_PROTO = """
syntax = "proto3";

package parley.testing.v1;

import "google/api/field_behavior.proto";
import "google/protobuf/field_mask.proto";

enum Colour {
  COLOUR_UNSPECIFIED = 0;
  COLOUR_RED = 1;
}

message Part {
  string label = 1 [(google.api.field_behavior) = REQUIRED];
  Colour colour = 2 [(google.api.field_behavior) = REQUIRED];
  optional int32 weight = 3 [(google.api.field_behavior) = REQUIRED];
  bytes blob = 4;
}

message Box {
  string id = 1 [(google.api.field_behavior) = IDENTIFIER];
  string title = 2 [(google.api.field_behavior) = REQUIRED];
  Part lid = 3;
  repeated Part parts = 4;
  map<string, string> labels = 5 [(google.api.field_behavior) = REQUIRED];
}

message PackRequest {
  Box box = 1 [(google.api.field_behavior) = REQUIRED];
  Part spare = 2;
  repeated string tags = 3 [(google.api.field_behavior) = REQUIRED];
}

message UpdateBoxRequest {
  Box box = 1 [(google.api.field_behavior) = REQUIRED];
  google.protobuf.FieldMask update_mask = 2;
}

message Node {
  string name = 1 [(google.api.field_behavior) = REQUIRED];
  repeated Node children = 2;
}

message Wrapper {
  Node root = 1;
}

message Loose {
  string note = 1;
  Node optional_root = 2;
}
"""

UNENFORCEABLE = {
    "number": "message Bad { int32 count = 1 [(google.api.field_behavior) = REQUIRED]; }",
    "bool": "message Bad { bool on = 1 [(google.api.field_behavior) = REQUIRED]; }",
    "map of messages": (
        "message Item { string name = 1 [(google.api.field_behavior) = REQUIRED]; }\n"
        "message Bad { map<string, Item> items = 1; }"
    ),
    "two resources": (
        "message Item { string name = 1 [(google.api.field_behavior) = REQUIRED]; }\n"
        "message Bad { Item a = 1; Item b = 2; google.protobuf.FieldMask update_mask = 3; }"
    ),
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, type[Message]]:
    data = compile_descriptor_set(
        tmp_path_factory.mktemp("shapes"), {"parley/testing/v1/shapes.proto": SHAPES_PROTO}
    )
    pool = pool_of(*descriptor_pb2.FileDescriptorSet.FromString(data).file)
    names = ("Part", "Box", "PackRequest", "UpdateBoxRequest", "Node", "Wrapper", "Loose")
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"parley.testing.v1.{name}"))
        for name in names
    }


def violated(required: RequiredFields, message: Message) -> list[tuple[str, str]]:
    found = required.violations(message)
    assert {violation.reason for violation in found} <= {REQUIRED_FIELD_REASON}
    return [(violation.field, violation.description) for violation in found]


def request_types() -> list[Descriptor]:
    return [
        method.input_type
        for module in CONTRACTS
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


# --- derivation -------------------------------------------------------------------------------------


def test_every_request_of_every_contract_has_enforceable_rules() -> None:
    required = RequiredFields()
    derived = {message_type.full_name: required.rules_for(message_type) for message_type in request_types()}
    assert len(derived) > 40
    # Every REQUIRED field a contract declares on a request is one the check enforces.
    for message_type in request_types():
        declared = {
            field.name
            for field in message_type.fields
            if field_behavior_pb2.REQUIRED in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
        }
        assert {field.name for field in derived[message_type.full_name].required} == declared


def test_rules_of_real_requests() -> None:
    required = RequiredFields()

    def kinds(message_type: Descriptor) -> list[tuple[str, Requirement]]:
        return [(field.name, field.requirement) for field in required.rules_for(message_type).required]

    assert kinds(auth_pb2.ForgotPasswordRequest.DESCRIPTOR) == [("email", Requirement.NOT_EMPTY)]
    assert kinds(auth_pb2.LoginRequest.DESCRIPTOR) == [
        ("email", Requirement.NOT_EMPTY),
        ("password", Requirement.NOT_EMPTY),
    ]
    # AIP-134: update_mask is optional, the resource is not; what the mask names inside it is governed.
    update = required.rules_for(auth_pb2.UpdateCurrentUserRequest.DESCRIPTOR)
    assert [(field.name, field.requirement) for field in update.required] == [("user", Requirement.SET)]
    assert update.masked_resource == "user"
    assert kinds(chat_v2_pb2.SendMessageRequest.DESCRIPTOR) == [
        ("conversation_id", Requirement.NOT_EMPTY),
        ("parts", Requirement.HAS_ELEMENTS),
    ]
    assert kinds(analytics_pb2.GetUserMetricsRequest.DESCRIPTOR) == [
        ("start_time", Requirement.SET),
        ("end_time", Requirement.SET),
    ]
    assert required.rules_for(auth_pb2.GetCurrentUserRequest.DESCRIPTOR).empty
    assert required.rules_for(billing_pb2.ListPlansRequest.DESCRIPTOR).empty


@pytest.mark.parametrize("case", sorted(UNENFORCEABLE))
def test_a_required_field_the_check_cannot_enforce_is_refused_when_derived(tmp_path: Path, case: str) -> None:
    proto = (
        'syntax = "proto3";\npackage parley.testing.v1;\n'
        'import "google/api/field_behavior.proto";\nimport "google/protobuf/field_mask.proto";\n'
        f"{UNENFORCEABLE[case]}\n"
    )
    data = compile_descriptor_set(tmp_path, {"parley/testing/v1/bad.proto": proto})
    pool = pool_of(*descriptor_pb2.FileDescriptorSet.FromString(data).file)
    with pytest.raises(ValueError, match=r"parley\.testing\.v1\.Bad"):
        RequiredFields().rules_for(pool.FindMessageTypeByName("parley.testing.v1.Bad"))


# --- checks on real contract messages ---------------------------------------------------------------


def test_forgot_password_needs_an_email() -> None:
    required = RequiredFields()
    assert violated(required, auth_pb2.ForgotPasswordRequest()) == [("email", "required: must not be empty")]
    assert violated(required, auth_pb2.ForgotPasswordRequest(email="ada@example.com")) == []


def test_each_kind_of_field_on_real_requests() -> None:
    required = RequiredFields()
    assert violated(required, chat_v2_pb2.SendMessageRequest(conversation_id="c1")) == [
        ("parts", "required: give at least one element")
    ]
    assert violated(required, analytics_pb2.GetUserMetricsRequest(start_time=Timestamp(seconds=1))) == [
        ("end_time", "required: must be set")
    ]
    # A message set to its empty value is still set.
    assert (
        violated(required, analytics_pb2.GetUserMetricsRequest(start_time=Timestamp(), end_time=Timestamp()))
        == []
    )
    assert violated(required, auth_pb2.UpdateCurrentUserRequest()) == [("user", "required: must be set")]
    assert violated(required, auth_pb2.UpdateCurrentUserRequest(user=auth_pb2.User())) == []


# --- nested messages, updates and recursion ---------------------------------------------------------


def test_required_fields_of_a_nested_message_apply_when_it_is_set(shapes: dict[str, type[Message]]) -> None:
    required = RequiredFields()
    part, box, pack = shapes["Part"], shapes["Box"], shapes["PackRequest"]
    full_box = box(title="t", labels={"k": "v"})
    assert violated(required, pack(box=full_box, tags=["a"])) == []
    assert [field for field, _ in violated(required, pack())] == ["box", "tags"]
    # The optional `spare` and the box's optional `lid`, once set, must be complete.
    complete_part = part(label="l", colour=1, weight=0)
    assert (
        violated(required, pack(box=box(title="t", labels={"k": "v"}, lid=complete_part), tags=["a"])) == []
    )
    assert violated(required, pack(box=full_box, tags=["a"], spare=part())) == [
        ("spare.label", "required: must not be empty"),
        ("spare.colour", "required: must be set to a value other than COLOUR_UNSPECIFIED"),
        ("spare.weight", "required: must be set"),
    ]
    parts = [complete_part, part(colour=1, weight=3)]
    assert violated(required, pack(box=box(title="t", labels={"k": "v"}, parts=parts), tags=["a"])) == [
        ("box.parts[1].label", "required: must not be empty")
    ]
    assert violated(required, pack(box=box(), tags=["a"])) == [
        ("box.title", "required: must not be empty"),
        ("box.labels", "required: give at least one element"),
    ]


def test_an_update_requires_inside_its_resource_only_what_the_mask_names(
    shapes: dict[str, type[Message]],
) -> None:
    required = RequiredFields()
    update, box, part = shapes["UpdateBoxRequest"], shapes["Box"], shapes["Part"]
    empty_box = box(lid=part(), parts=[part()])

    def fields(mask: list[str] | None) -> list[str]:
        request = update(box=empty_box)
        if mask is not None:
            # The test pool has its own FieldMask class: fill the field rather than assign one.
            update_mask = getattr(request, "update_mask")  # noqa: B009 - a class built at run time
            update_mask.SetInParent()
            update_mask.paths.extend(mask)
        return [field for field, _ in violated(required, request)]

    # No mask, or an empty one: the fields the request sets (AIP-134), so nothing inside is required.
    assert fields(None) == []
    assert fields([]) == []
    assert fields(["title"]) == ["box.title"]
    assert fields(["labels", "id"]) == ["box.labels"]
    assert fields(["lid"]) == ["box.lid.label", "box.lid.colour", "box.lid.weight"]
    assert fields(["lid.colour"]) == ["box.lid.colour"]
    assert fields(["parts"]) == ["box.parts[0].label", "box.parts[0].colour", "box.parts[0].weight"]
    assert fields(["*"]) == [
        "box.title",
        "box.labels",
        "box.lid.label",
        "box.lid.colour",
        "box.lid.weight",
        "box.parts[0].label",
        "box.parts[0].colour",
        "box.parts[0].weight",
    ]
    # The resource itself stays required whatever the mask.
    unset = update()
    getattr(unset, "update_mask").paths.append("title")  # noqa: B009 - a class built at run time
    assert [field for field, _ in violated(required, unset)] == ["box"]


def test_recursive_messages_are_checked_at_every_depth(shapes: dict[str, type[Message]]) -> None:
    required = RequiredFields()
    node, wrapper, loose = shapes["Node"], shapes["Wrapper"], shapes["Loose"]
    tree = node(name="root", children=[node(name="a"), node(name="b", children=[node(name="")])])
    assert violated(required, wrapper(root=tree)) == [
        ("root.children[1].children[0].name", "required: must not be empty")
    ]
    assert violated(required, wrapper()) == []
    # Nothing of its own is required, but its optional root is checked once it is set.
    loose_rules = required.rules_for(descriptor_of(loose))
    assert not loose_rules.required
    assert [nested.name for nested in loose_rules.nested] == ["optional_root"]
    assert violated(required, loose(optional_root=node())) == [
        ("optional_root.name", "required: must not be empty")
    ]
    assert violated(required, loose(note="x")) == []


# --- the validation step ----------------------------------------------------------------------------


def test_the_validator_puts_required_fields_and_floors_together_once_per_type() -> None:
    validator = RequestValidator()
    assert validator.check_for(auth_pb2.GetCurrentUserRequest.DESCRIPTOR) is None
    check = validator.check_for(auth_pb2.ForgotPasswordRequest.DESCRIPTOR)
    assert check is not None
    with pytest.raises(InvalidArgument) as refused:
        check(auth_pb2.ForgotPasswordRequest())
    assert refused.value.reason == "INVALID_ARGUMENT"
    assert [(v.field, v.reason) for v in refused.value.field_violations] == [("email", "REQUIRED_FIELD")]
    check(auth_pb2.ForgotPasswordRequest(email="ada@example.com"))

    list_messages = validator.check_for(chat_pb2.ListMessagesRequest.DESCRIPTOR)
    assert list_messages is not None
    with pytest.raises(InvalidArgument) as both:
        list_messages(chat_pb2.ListMessagesRequest(page_size=-1))
    assert [(v.field, v.reason) for v in both.value.field_violations] == [
        ("conversation_id", "REQUIRED_FIELD"),
        ("page_size", "INVALID_PAGE_SIZE"),
    ]
    assert both.value.message == "The request has invalid fields: conversation_id, page_size."
