"""The committed OpenAPI document states exactly the rules the services enforce on each request.

The expectation is computed here from the enforcement modules themselves (`RequiredFields`, the
validation floors) over the generated message types the services run with, independently of how
gateway/openapi.py renders them; every request parameter, request body and message schema is compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor

import parley.analytics.v1.analytics_pb2
import parley.auth.v1.auth_pb2
import parley.billing.v1.billing_pb2
import parley.chat.v1.chat_pb2
import parley.chat.v2.chat_pb2  # noqa: F401 - imported so the default pool holds every contract
from gateway.descriptors import DescriptorIndex, binding_verb_and_path, http_bindings, type_full_name
from gateway.openapi import convert_path_template
from services.common.required_fields import RequiredField, RequiredFields, Requirement
from services.common.validation import floors_of

REPO_ROOT = Path(__file__).resolve().parents[2]
DESCRIPTOR_SET = REPO_ROOT / "gen" / "parley" / "descriptor_set.binpb"
OPENAPI = REPO_ROOT / "gen" / "parley" / "openapi.json"
REF = "#/components/schemas/"
# The JSON Schema keywords through which the document states a rule on a value.
CONSTRAINT_KEYWORDS = frozenset({"minLength", "minItems", "minProperties", "minimum", "not"})
# Types whose JSON schema bounds them below anyway (0 to 2^32-1), whatever the services check.
UNSIGNED_32 = frozenset({FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32})

Schema = dict[str, Any]


@pytest.fixture(scope="module")
def document() -> Schema:
    loaded: Schema = json.loads(OPENAPI.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def index() -> DescriptorIndex:
    return DescriptorIndex.from_bytes(DESCRIPTOR_SET.read_bytes())


@pytest.fixture(scope="module")
def required() -> RequiredFields:
    return RequiredFields()


def runtime_type(full_name: str) -> Descriptor:
    """The message type as the services' generated code knows it."""
    return descriptor_pool.Default().FindMessageTypeByName(full_name)


def request_type_names(index: DescriptorIndex) -> set[str]:
    return {
        type_full_name(method.proto.input_type)
        for service in index.public_services()
        for method in service.methods
    }


def is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def expected_keywords(field: FieldDescriptor, rule: RequiredField | None, minimum: int | None) -> Schema:
    keywords: Schema = {}
    if field.type in UNSIGNED_32 and not field.is_repeated:
        keywords["minimum"] = 0
    if rule is not None:
        match rule.requirement:
            case Requirement.NOT_EMPTY:
                keywords["minLength"] = 1
            case Requirement.HAS_ELEMENTS:
                keywords["minProperties" if is_map(field) else "minItems"] = 1
            case Requirement.NOT_UNSPECIFIED:
                assert field.enum_type is not None
                keywords["not"] = {"const": field.enum_type.values_by_number[0].name}
            case Requirement.SET:
                pass
    if minimum is not None:
        keywords["minimum"] = minimum
    return keywords


def published(schema: Schema) -> Schema:
    return {key: value for key, value in schema.items() if key in CONSTRAINT_KEYWORDS}


def resolved(document: Schema, schema: Schema) -> Schema:
    if "$ref" in schema and schema["$ref"].startswith(REF):
        target: Schema = document["components"]["schemas"][schema["$ref"].removeprefix(REF)]
        return target
    return schema


class Expectation:
    """What the enforcement modules say about the fields of one message type."""

    def __init__(self, message_type: Descriptor, required: RequiredFields, *, is_request: bool) -> None:
        self.message_type = message_type
        self.required = {field.name: field for field in required.rules_for(message_type).required}
        self.minimums = (
            {name: floor.minimum for name, floor in floors_of(message_type).items()} if is_request else {}
        )

    def keywords(self, field_name: str) -> Schema:
        field = self.message_type.fields_by_name[field_name]
        return expected_keywords(field, self.required.get(field_name), self.minimums.get(field_name))


def operations(index: DescriptorIndex, document: Schema) -> list[tuple[str, Any, Schema, Descriptor]]:
    found = []
    for service in index.public_services():
        for method in service.methods:
            if method.rule is None:
                continue
            for binding in http_bindings(method.rule):
                verb, template = binding_verb_and_path(binding)
                path, _ = convert_path_template(template)
                operation = document["paths"][path][verb]
                request = runtime_type(type_full_name(method.proto.input_type))
                found.append((f"{verb.upper()} {path}", binding, operation, request))
    return found


def test_every_request_field_is_published_with_the_rules_the_services_enforce(
    document: Schema, index: DescriptorIndex, required: RequiredFields
) -> None:
    checked = 0
    for name, binding, operation, request in operations(index, document):
        expected = Expectation(request, required, is_request=True)
        parameters = {(p["in"], p["name"]): p for p in operation.get("parameters", [])}
        body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
        for field in request.fields:
            where = f"{name}: {field.name}"
            is_required = field.name in expected.required
            if ("path", field.name) in parameters:
                parameter = parameters["path", field.name]
                assert parameter["required"] is True, where
                assert published(parameter["schema"]) == expected.keywords(field.name), where
            elif ("query", field.name) in parameters:
                parameter = parameters["query", field.name]
                assert parameter.get("required", False) == is_required, where
                assert published(parameter["schema"]) == expected.keywords(field.name), where
            elif binding.body == field.name and body is not None:
                # The transcoder sets a body field from an empty body too, so it is never missing.
                assert "required" not in operation["requestBody"], where
                assert published(body) == expected.keywords(field.name), where
            elif binding.body == "*" and body is not None:
                object_schema = resolved(document, body)
                assert (field.name in object_schema.get("required", [])) == is_required, where
                assert published(object_schema["properties"][field.name]) == expected.keywords(field.name), (
                    where
                )
            else:
                # Bound to a path variable inside it, flattened into `field.x` query parameters, or a
                # raw HttpBody: none of the contract's REQUIRED fields is one of these.
                assert not is_required, f"{where} is required but the document does not carry it"
                continue
            checked += 1
        if binding.body == "*" and body is not None:
            bound = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert operation["requestBody"].get("required", False) == bool(set(expected.required) - bound), (
                name
            )
        # Nested query parameters (`filter.plan`): their owner's rules hold whenever they are sent, but
        # a parent that is not sent requires nothing.
        for (location, parameter_name), parameter in parameters.items():
            if location != "query" or "." not in parameter_name:
                continue
            parent, leaf = parameter_name.split(".", 1)
            owner = request.fields_by_name[parent].message_type
            assert owner is not None
            assert "required" not in parameter, f"{name}: {parameter_name}"
            nested = Expectation(owner, required, is_request=False)
            assert published(parameter["schema"]) == nested.keywords(leaf), f"{name}: {parameter_name}"
    assert checked > 100


def test_every_message_schema_publishes_its_required_fields(
    document: Schema, index: DescriptorIndex, required: RequiredFields
) -> None:
    requests = request_type_names(index)
    checked = 0
    for name, schema in document["components"]["schemas"].items():
        if not name.startswith("parley.") or schema.get("type") != "object" or name in index.enums:
            continue
        message_type = runtime_type(name)
        expected = Expectation(message_type, required, is_request=name in requests)
        assert schema.get("required", []) == list(expected.required), name
        for field in message_type.fields:
            assert published(schema["properties"][field.name]) == expected.keywords(field.name), (
                f"{name}.{field.name}"
            )
        checked += 1
    assert checked > 50


def test_the_finding_forgot_password_publishes_its_required_email(document: Schema) -> None:
    schema = document["components"]["schemas"]["parley.auth.v1.ForgotPasswordRequest"]
    assert schema["required"] == ["email"]
    assert schema["properties"]["email"]["minLength"] == 1
    operation = document["paths"]["/v1/auth/forgot-password"]["post"]
    assert operation["requestBody"]["required"] is True


def test_page_sizes_publish_their_floor(document: Schema) -> None:
    parameters = document["paths"]["/v1/billing/plans"]["get"]["parameters"]
    page_size = next(p for p in parameters if p["name"] == "page_size")
    assert page_size["schema"] == {"type": "integer", "format": "int32", "minimum": 0}


def admits_null(schema: Schema) -> bool:
    kind = schema.get("type")
    if "$ref" in schema:
        return False
    if "type" not in schema and "anyOf" not in schema:
        return True  # google.protobuf.Value: any JSON value
    return (
        kind == "null"
        or (isinstance(kind, list) and "null" in kind)
        or {"type": "null"} in schema.get("anyOf", [])
    )


def test_exactly_the_fields_that_are_not_required_admit_null(
    document: Schema, index: DescriptorIndex, required: RequiredFields
) -> None:
    """proto3 JSON reads `null` as "not set", so the gateway takes it in any field; a REQUIRED field
    is then refused as missing. The fuzz run's negative_data_rejection check sent `null` where the
    document said it was invalid and got a 200 (PATCH /v1/users/me `{"display_name": null}`)."""
    checked = 0
    for name, schema in document["components"]["schemas"].items():
        if not name.startswith("parley.") or schema.get("type") != "object" or name in index.enums:
            continue
        enforced = {rule.name for rule in required.rules_for(runtime_type(name)).required}
        for field_name, field_schema in schema["properties"].items():
            assert admits_null(field_schema) == (field_name not in enforced), f"{name}.{field_name}"
            checked += 1
    assert checked > 200
    user = document["components"]["schemas"]["parley.auth.v1.User"]["properties"]
    assert user["display_name"]["type"] == ["string", "null"]
