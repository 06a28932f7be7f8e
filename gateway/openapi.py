"""Builds the OpenAPI 3.1 document of Parley's public JSON API from the compiled descriptor set.

The document describes what Envoy's gRPC-JSON transcoder actually serves for each `google.api.http`
rule: proto field names in JSON (the gateway sets `preserve_proto_field_names`), 64-bit integers as
strings, proto3 JSON for the well-known types, SSE for server-streaming RPCs, and a `google.rpc.Status`
body for every error. Request schemas carry the rules the services enforce (`required`, `minLength`,
`minItems`, `minimum`, ...), read from the very modules that enforce them
(`services/common/required_fields.py`, `services/common/validation.py`). Only public services are
documented (the rule and the descriptor walk are `gateway/descriptors.py`, shared with the Envoy config
renderer), because internal services are never routable through the gateway.

Run it as `python -m gateway.openapi --descriptor-set gen/parley/descriptor_set.binpb --out X.json`;
`scripts/gen` does that for `gen/parley/openapi.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

from google.api import field_behavior_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FieldDescriptor

from gateway.descriptors import (
    ENUM_VALUE,
    HTTP_BODY_TYPE,
    MESSAGE_ONEOF,
    SERVICE_METHOD,
    DescriptorIndex,
    EnumInfo,
    MessageInfo,
    ServiceInfo,
    binding_verb_and_path,
    http_bindings,
    read_descriptor_set,
    type_full_name,
)
from services.common.required_fields import RequiredField, RequiredFields, Requirement
from services.common.validation import floors_of

if TYPE_CHECKING:
    from google.protobuf.internal.extension_dict import _ExtensionFieldDescriptor

logger = logging.getLogger(__name__)

Schema = dict[str, Any]
FieldProto = descriptor_pb2.FieldDescriptorProto

OPENAPI_VERSION: Final = "3.1.0"
SCHEMA_REF_PREFIX: Final = "#/components/schemas/"

# mypy sees google.api as untyped; typing the extension handle keeps `Extensions[...]` lookups typed
# as the option message they carry.
_FIELD_BEHAVIOR_EXTENSION: Final = cast(
    "_ExtensionFieldDescriptor[descriptor_pb2.FieldOptions, Any]", field_behavior_pb2.field_behavior
)

_INT64_SCHEMA: Final[Schema] = {"type": "string", "format": "int64"}
_SCALAR_SCHEMAS: Final[Mapping[int, Schema]] = {
    FieldProto.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldProto.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldProto.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldProto.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldProto.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldProto.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    FieldProto.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    # proto3 JSON prints every 64-bit integer as a string so JavaScript clients do not lose precision.
    FieldProto.TYPE_INT64: _INT64_SCHEMA,
    FieldProto.TYPE_SINT64: _INT64_SCHEMA,
    FieldProto.TYPE_SFIXED64: _INT64_SCHEMA,
    FieldProto.TYPE_UINT64: _INT64_SCHEMA,
    FieldProto.TYPE_FIXED64: _INT64_SCHEMA,
    FieldProto.TYPE_BOOL: {"type": "boolean"},
    FieldProto.TYPE_STRING: {"type": "string"},
    FieldProto.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}

# Well-known types have a special proto3 JSON form instead of an object of their fields.
_WELL_KNOWN_SCHEMAS: Final[Mapping[str, Schema]] = {
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": "An RFC 3339 timestamp in UTC, e.g. `2024-05-01T12:00:00Z`.",
    },
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?\d+(\.\d+)?s$",
        "description": "A duration in seconds with up to nine fractional digits and an `s` suffix, "
        "e.g. `1.5s`.",
    },
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": "Comma-separated field paths in lowerCamelCase (proto3 JSON FieldMask), "
        "e.g. `displayName,email`.",
    },
    "google.protobuf.Struct": {
        "type": "object",
        "additionalProperties": True,
        "description": "An arbitrary JSON object.",
    },
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "items": {}, "description": "A JSON array."},
    "google.protobuf.NullValue": {"type": "null"},
    "google.protobuf.Any": {
        "type": "object",
        "required": ["@type"],
        "properties": {
            "@type": {"type": "string", "description": "The type URL, e.g. `type.googleapis.com/pkg.Msg`."}
        },
        "additionalProperties": True,
        "description": "A message of any type: its JSON fields plus `@type` naming the type.",
    },
    "google.protobuf.Empty": {"type": "object", "description": "An empty JSON object."},
    "google.protobuf.DoubleValue": {"type": "number", "format": "double"},
    "google.protobuf.FloatValue": {"type": "number", "format": "float"},
    "google.protobuf.Int64Value": _INT64_SCHEMA,
    "google.protobuf.UInt64Value": _INT64_SCHEMA,
    "google.protobuf.Int32Value": {"type": "integer", "format": "int32"},
    "google.protobuf.UInt32Value": {
        "type": "integer",
        "format": "int64",
        "minimum": 0,
        "maximum": 4294967295,
    },
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BytesValue": {"type": "string", "format": "byte", "contentEncoding": "base64"},
}

# Well-known types whose JSON form is a scalar, so they can travel in a query parameter.
_QUERY_SAFE_WELL_KNOWN: Final = frozenset(
    name
    for name, schema in _WELL_KNOWN_SCHEMAS.items()
    if schema.get("type") in {"string", "number", "integer", "boolean"}
)

_OPENAPI_METHODS: Final = frozenset({"get", "put", "post", "delete", "patch", "head", "options", "trace"})


def _detail_item_schema() -> Schema:
    return {
        "type": "object",
        "required": ["@type"],
        "properties": {
            "@type": {
                "type": "string",
                "description": "The detail's type URL, e.g. `type.googleapis.com/google.rpc.ErrorInfo`.",
            }
        },
        "additionalProperties": True,
        "description": "One error detail: the fields of the message named by `@type` (see ErrorInfo, "
        "BadRequest, QuotaFailure and RequestInfo).",
    }


def _string(description: str) -> Schema:
    return {"type": "string", "description": description}


def _string_map(description: str) -> Schema:
    return {"type": "object", "additionalProperties": {"type": "string"}, "description": description}


def error_model_schemas() -> dict[str, Schema]:
    """The google.rpc error model in proto3 JSON with proto field names, as the gateway renders it."""
    ref = SCHEMA_REF_PREFIX
    return {
        "Status": {
            "type": "object",
            "required": ["code", "message"],
            "description": "The body of every error response: a google.rpc.Status. The HTTP status "
            "corresponds to `code`.",
            "properties": {
                "code": {
                    "type": "integer",
                    "format": "int32",
                    "description": "The gRPC status code (google.rpc.Code), e.g. 5 for NOT_FOUND.",
                },
                "message": _string("A developer-facing error message in English."),
                "details": {
                    "type": "array",
                    "items": _detail_item_schema(),
                    "description": "Machine-readable details; every error carries an ErrorInfo.",
                },
            },
        },
        "ErrorInfo": {
            "type": "object",
            "description": "Why the call failed, as a stable UPPER_SNAKE `reason` within `domain`.",
            "properties": {
                "reason": _string("The stable reason code, e.g. `ROUTE_NOT_FOUND`."),
                "domain": _string("The domain that defines `reason`: `parley.dev`."),
                "metadata": _string_map("Extra structured context about the error."),
            },
        },
        "BadRequest": {
            "type": "object",
            "description": "The request fields that failed validation.",
            "properties": {
                "field_violations": {
                    "type": "array",
                    "description": "One entry per invalid field.",
                    "items": {
                        "type": "object",
                        "properties": {
                            "field": _string("The path of the invalid field, e.g. `messages[0].content`."),
                            "description": _string("Why the field is invalid."),
                            "reason": _string("A stable UPPER_SNAKE reason for the violation."),
                            "localized_message": {"$ref": f"{ref}LocalizedMessage"},
                        },
                    },
                }
            },
        },
        "QuotaFailure": {
            "type": "object",
            "description": "The quota or rate limit that the call exceeded.",
            "properties": {
                "violations": {
                    "type": "array",
                    "description": "One entry per exceeded quota.",
                    "items": {
                        "type": "object",
                        "properties": {
                            "subject": _string("What the quota applies to, e.g. `user:<id>`."),
                            "description": _string("How the quota was exceeded."),
                            "api_service": _string("The API service the quota belongs to."),
                            "quota_metric": _string("The metric the quota counts."),
                            "quota_id": _string("The id of the exceeded quota."),
                            "quota_dimensions": _string_map("The dimensions of the exceeded quota."),
                            "quota_value": {**_INT64_SCHEMA, "description": "The enforced limit."},
                            "future_quota_value": {
                                **_INT64_SCHEMA,
                                "description": "The new limit while a change is rolling out.",
                            },
                        },
                    },
                }
            },
        },
        "RequestInfo": {
            "type": "object",
            "description": "Identifies the request, for support and log correlation.",
            "properties": {
                "request_id": _string("The id of the request, also sent as the `x-request-id` header."),
                "serving_data": _string("Opaque data about the server that handled the request."),
            },
        },
        "LocalizedMessage": {
            "type": "object",
            "description": "An error message localized for the end user.",
            "properties": {
                "locale": _string("The BCP-47 locale of `message`, e.g. `en-US`."),
                "message": _string("The localized message."),
            },
        },
    }


# Proto messages that map onto the hand-written error model above instead of a generated schema.
_ERROR_MODEL_MESSAGES: Final[Mapping[str, str]] = {
    f"google.rpc.{name}": name
    for name in ("Status", "ErrorInfo", "BadRequest", "QuotaFailure", "RequestInfo", "LocalizedMessage")
}


def _error_response() -> Schema:
    return {
        "description": "The call failed; the body is a google.rpc.Status.",
        "content": {"application/json": {"schema": {"$ref": f"{SCHEMA_REF_PREFIX}Status"}}},
    }


def _raw_body_content() -> Schema:
    """Content of a google.api.HttpBody: the bytes pass through unchanged with their own content type."""
    return {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        # The RPC chooses the content type; JSON documents such as a JWKS come back unchanged.
        "application/json": {"schema": {}},
    }


# --- Descriptors ----------------------------------------------------------------------------------


def first_sentence(text: str) -> str:
    """The first sentence of a comment, without its full stop, for an operation summary."""
    paragraph = " ".join(text.split("\n\n", 1)[0].split())
    # A sentence ends at . ! or ? followed by an upper-case word or the end, so "e.g. x" does not end it.
    match = re.match(r"(.*?[.!?])(?=\s+[A-Z]|$)", paragraph)
    sentence = match.group(1) if match else paragraph
    return sentence.removesuffix(".")


def service_label(service: ServiceInfo) -> str:
    """The service's tag and operation-id prefix: its name, plus the package version after v1
    (`ChatServiceV2`), so versions side by side never collide and v1's ids never change."""
    version = service.version
    if version == "v1" or not re.fullmatch(r"v\d+\w*", version):
        return service.name
    return f"{service.name}{version.capitalize()}"


def _type_name(field: FieldProto) -> str:
    return type_full_name(field.type_name)


# --- Schemas ------------------------------------------------------------------------------------------


def _is_map(index: DescriptorIndex, field: FieldProto) -> bool:
    return (
        field.label == FieldProto.LABEL_REPEATED
        and field.type == FieldProto.TYPE_MESSAGE
        and index.message(_type_name(field)).proto.options.map_entry
    )


def _with_description(schema: Schema, description: str) -> Schema:
    if description:
        schema["description"] = description
    return schema


class EnforcedRules:
    """What the services enforce on each message's own fields, from the modules that enforce it.

    REQUIRED fields hold in every message (when it is present at all); field floors only in the
    request message of an RPC, as the validation step applies them.
    """

    def __init__(self, descriptor_set: bytes, request_types: frozenset[str]) -> None:
        self._pool = descriptor_pool.DescriptorPool()
        for file in read_descriptor_set(descriptor_set).file:
            self._pool.Add(file)
        self._required = RequiredFields()
        self._request_types = request_types

    def required(self, message: str) -> dict[str, RequiredField]:
        """The REQUIRED fields of a message type, by name."""
        rules = self._required.rules_for(self._pool.FindMessageTypeByName(message))
        return {field.name: field for field in rules.required}

    def minimums(self, message: str) -> dict[str, int]:
        """The smallest value of each integer field a floor covers, by name; only in request types."""
        if message not in self._request_types:
            return {}
        return {
            name: floor.minimum
            for name, floor in floors_of(self._pool.FindMessageTypeByName(message)).items()
        }

    def keywords(self, message: str, field_name: str, schema: Schema) -> Schema:
        """The JSON Schema keywords that state the field's enforced rules, for its `schema`."""
        keywords: Schema = {}
        required = self.required(message).get(field_name)
        if required is not None:
            keywords.update(_requirement_keywords(required, schema))
        minimum = self.minimums(message).get(field_name)
        if minimum is not None:
            if schema.get("type") != "integer":
                raise ValueError(f"{message}.{field_name}: a floor can only be published on a JSON integer")
            keywords["minimum"] = minimum
        return keywords


def _requirement_keywords(required: RequiredField, schema: Schema) -> Schema:
    match required.requirement:
        case Requirement.NOT_EMPTY:
            return {"minLength": 1}
        case Requirement.HAS_ELEMENTS:
            return {"minProperties": 1} if schema.get("type") == "object" else {"minItems": 1}
        case Requirement.NOT_UNSPECIFIED:
            return {"not": {"const": _zero_name(required.field)}}
        case Requirement.SET:
            return {}


def _zero_name(field: FieldDescriptor) -> str:
    assert field.enum_type is not None
    return field.enum_type.values_by_number[0].name


class SchemaRegistry:
    """Builds field schemas and collects a component schema for every message and enum they reach."""

    def __init__(self, index: DescriptorIndex, rules: EnforcedRules) -> None:
        self._index = index
        self.rules = rules
        self._components: dict[str, Schema] = error_model_schemas()
        self._pending: list[str] = []
        self._queued: set[str] = set()

    # -- references --

    def message_schema(self, full_name: str) -> Schema:
        """A `$ref` to the message's component, or the inline JSON form of a well-known type."""
        if full_name in _WELL_KNOWN_SCHEMAS:
            return copy.deepcopy(dict(_WELL_KNOWN_SCHEMAS[full_name]))
        if full_name in _ERROR_MODEL_MESSAGES:
            return {"$ref": SCHEMA_REF_PREFIX + _ERROR_MODEL_MESSAGES[full_name]}
        self._index.message(full_name)  # fail early on a dangling reference
        return self._reference(full_name)

    def enum_schema(self, full_name: str) -> Schema:
        if full_name in _WELL_KNOWN_SCHEMAS:
            return copy.deepcopy(dict(_WELL_KNOWN_SCHEMAS[full_name]))
        self._index.enum(full_name)
        return self._reference(full_name)

    def _reference(self, full_name: str) -> Schema:
        if full_name not in self._queued:
            self._queued.add(full_name)
            self._pending.append(full_name)
        return {"$ref": SCHEMA_REF_PREFIX + full_name}

    # -- fields --

    def value_schema(self, field: FieldProto) -> Schema:
        """The schema of one value of the field (an element, for repeated fields)."""
        if field.type == FieldProto.TYPE_MESSAGE:
            return self.message_schema(_type_name(field))
        if field.type == FieldProto.TYPE_ENUM:
            return self.enum_schema(_type_name(field))
        if field.type == FieldProto.TYPE_GROUP:
            raise ValueError(f"field {field.name}: groups have no JSON mapping")
        return copy.deepcopy(dict(_SCALAR_SCHEMAS[field.type]))

    def field_schema(self, message: MessageInfo, field_index: int) -> Schema:
        field = message.proto.field[field_index]
        if _is_map(self._index, field):
            entry = self._index.message(_type_name(field)).proto
            value_field = next(f for f in entry.field if f.number == 2)
            schema: Schema = {"type": "object", "additionalProperties": self.value_schema(value_field)}
        elif field.label == FieldProto.LABEL_REPEATED:
            schema = {"type": "array", "items": self.value_schema(field)}
        else:
            schema = self.value_schema(field)
        description = message.field_comment(field_index)
        oneof_name = _real_oneof_name(message.proto, field)
        if oneof_name:
            note = f"Member of oneof `{oneof_name}`: at most one of its fields is set."
            description = f"{description}\n\n{note}" if description else note
        behaviors = _field_behaviors(field)
        if field_behavior_pb2.OUTPUT_ONLY in behaviors:
            schema["readOnly"] = True
        if field_behavior_pb2.INPUT_ONLY in behaviors:
            schema["writeOnly"] = True
        if field.options.deprecated:
            schema["deprecated"] = True
        schema.update(self.rules.keywords(message.full_name, field.name, schema))
        return _with_description(schema, description)

    # -- objects --

    def object_schema(self, message: MessageInfo, excluded_paths: frozenset[str] = frozenset()) -> Schema:
        """The JSON object form of a message, leaving out the dotted field paths in `excluded_paths`."""
        properties: dict[str, Schema] = {}
        required: list[str] = []
        enforced = self.rules.required(message.full_name)
        for field_index, field in enumerate(message.proto.field):
            if field.name in excluded_paths:
                continue
            nested_excluded = frozenset(
                path.removeprefix(f"{field.name}.")
                for path in excluded_paths
                if path.startswith(f"{field.name}.")
            )
            if nested_excluded:
                nested = self._index.message(_type_name(field))
                properties[field.name] = _with_description(
                    self.object_schema(nested, nested_excluded), message.field_comment(field_index)
                )
            else:
                properties[field.name] = self.field_schema(message, field_index)
            if field.name in enforced:
                required.append(field.name)
            else:
                properties[field.name] = _admitting_null(properties[field.name])
        schema: Schema = {"type": "object", "properties": properties}
        if required:
            schema["required"] = required
        return _with_description(schema, _message_description(message))

    def message_or_subset_schema(self, message: MessageInfo, excluded_paths: frozenset[str]) -> Schema:
        """A `$ref` to the message, or an inline copy without the excluded fields when there are any."""
        if not excluded_paths:
            return self.message_schema(message.full_name)
        return self.object_schema(message, excluded_paths)

    def components(self) -> dict[str, Schema]:
        """Component schemas for everything referenced so far, including what those reference in turn."""
        while self._pending:
            full_name = self._pending.pop()
            if full_name in self._index.enums:
                self._components[full_name] = _enum_schema(self._index.enum(full_name))
            else:
                self._components[full_name] = self.object_schema(self._index.message(full_name))
        return self._components


def _admitting_null(schema: Schema) -> Schema:
    """`schema` with JSON `null` allowed as well. proto3 JSON reads `null` as "not set" for a field
    of any type, so the gateway accepts it in every field that is not REQUIRED (a REQUIRED one is then
    refused as missing); a document that said otherwise would call accepted requests invalid."""
    if "$ref" in schema:
        siblings = {key: value for key, value in schema.items() if key != "$ref"}
        return {"anyOf": [{"$ref": schema["$ref"]}, {"type": "null"}], **siblings}
    kind = schema.get("type")
    if isinstance(kind, str) and kind != "null":
        return {**schema, "type": [kind, "null"]}
    return schema  # no type (google.protobuf.Value) or already a null: `null` fits as it is


def _field_behaviors(field: FieldProto) -> set[int]:
    # A repeated extension has no presence to test; an unset one reads as empty.
    return set(field.options.Extensions[_FIELD_BEHAVIOR_EXTENSION])


def _real_oneof_name(message: descriptor_pb2.DescriptorProto, field: FieldProto) -> str:
    """The oneof a field belongs to; proto3 `optional` fields sit in a synthetic oneof that is not real."""
    if not field.HasField("oneof_index") or field.proto3_optional:
        return ""
    return message.oneof_decl[field.oneof_index].name


def _message_description(message: MessageInfo) -> str:
    parts = [message.comment()] if message.comment() else []
    for oneof_index, oneof in enumerate(message.proto.oneof_decl):
        members = [
            f"`{field.name}`"
            for field in message.proto.field
            if field.HasField("oneof_index")
            and field.oneof_index == oneof_index
            and not field.proto3_optional
        ]
        if not members:
            continue  # the synthetic oneof of a proto3 `optional` field
        line = f"Oneof `{oneof.name}`: at most one of {', '.join(members)} is set."
        oneof_comment = message.comment(MESSAGE_ONEOF, oneof_index)
        parts.append(f"{line} {oneof_comment}" if oneof_comment else line)
    return "\n\n".join(parts)


def _enum_schema(enum: EnumInfo) -> Schema:
    names = [value.name for value in enum.proto.value]
    value_lines = []
    for value_index, value in enumerate(enum.proto.value):
        comment = " ".join(enum.comment(ENUM_VALUE, value_index).split())
        value_lines.append(f"- `{value.name}`: {comment}" if comment else f"- `{value.name}`")
    description = "\n".join(value_lines)
    if enum.comment():
        description = f"{enum.comment()}\n\n{description}"
    numbers = [value.number for value in enum.proto.value]
    # The JSON mapping of protobuf takes an enum's number as well as its name (and the transcoder does).
    return {
        "anyOf": [
            {"type": "string", "enum": list(dict.fromkeys(names))},
            {"type": "integer", "enum": list(dict.fromkeys(numbers))},
        ],
        "description": description,
    }


# --- HTTP rules ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathVariable:
    """A `{field.path}` or `{field.path=segments}` variable of an http rule path template."""

    field_path: str
    pattern: str | None  # anchored regex for variables that capture more than one plain segment


_VARIABLE = re.compile(r"\{([^{}=]+)(?:=([^{}]*))?\}")


def _segments_regex(segments: str) -> str:
    parts = []
    for segment in segments.split("/"):
        if segment == "**":
            parts.append(".+")
        elif segment == "*":
            parts.append("[^/]+")
        else:
            parts.append(re.escape(segment))
    return "^" + "/".join(parts) + "$"


def convert_path_template(template: str) -> tuple[str, list[PathVariable]]:
    """An http rule path template as an OpenAPI path, plus the variables it binds, in order.

    `{name=projects/*}` becomes `{name}` whose value must match `^projects/[^/]+$`.
    """
    variables: list[PathVariable] = []

    def replace(match: re.Match[str]) -> str:
        field_path, segments = match.group(1), match.group(2)
        pattern = _segments_regex(segments) if segments and segments != "*" else None
        variables.append(PathVariable(field_path, pattern))
        return "{" + field_path + "}"

    path = _VARIABLE.sub(replace, template)
    if "*" in _VARIABLE.sub("", template):
        raise ValueError(f"path template {template!r} has an unnamed wildcard; bind it to a field")
    if not path.startswith("/"):
        raise ValueError(f"path template {template!r} must start with '/'")
    return path, variables


_TEMPLATE: Final = re.compile(r"\{[^{}]*\}")


def path_shape(path: str) -> str:
    """An OpenAPI path with its template names blanked: `/v1/a/{x}` and `/v1/a/{y}` are both `/v1/a/{}`."""
    return _TEMPLATE.sub("{}", path)


def check_one_template_per_path(paths: Mapping[str, Mapping[str, Schema]]) -> None:
    """Refuse paths that differ only in their template names.

    OpenAPI 3.1 calls such paths identical and forbids them (validators such as schemathesis stop on
    them), and a client generator would see two resources where there is one. The fix is in the
    contract: every http rule of that path binds the same field name.
    """
    by_shape: dict[str, list[str]] = {}
    for path in paths:
        by_shape.setdefault(path_shape(path), []).append(path)
    clashes = [sorted(same_shape) for same_shape in by_shape.values() if len(same_shape) > 1]
    if not clashes:
        return

    def described(path: str) -> str:
        operation_ids = ", ".join(operation["operationId"] for operation in paths[path].values())
        return f"{path} ({operation_ids})"

    listed = "; ".join(" and ".join(map(described, same_shape)) for same_shape in sorted(clashes))
    raise ValueError(
        f"paths that differ only in template names (OpenAPI 3.1 forbids them; bind one field name "
        f"in every http rule of the path): {listed}"
    )


def _verb_and_template(rule: http_pb2.HttpRule) -> tuple[str, str]:
    verb, template = binding_verb_and_path(rule)
    if not verb:
        raise ValueError(f"http rule {rule.selector!r} has no method and path")
    if verb not in _OPENAPI_METHODS:
        raise ValueError(f"http method {verb!r} cannot be described in OpenAPI")
    return verb, template


# --- Operations ---------------------------------------------------------------------------------------


class _OperationBuilder:
    """Turns one http binding of one method into an OpenAPI operation."""

    def __init__(self, index: DescriptorIndex, schemas: SchemaRegistry) -> None:
        self._index = index
        self._schemas = schemas

    def build(
        self,
        service: ServiceInfo,
        method_index: int,
        binding: http_pb2.HttpRule,
        operation_id: str,
    ) -> tuple[str, str, Schema]:
        method = service.proto.method[method_index]
        request = self._index.message(type_full_name(method.input_type))
        verb, template = _verb_and_template(binding)
        path, variables = convert_path_template(template)

        parameters = [self._path_parameter(request, variable) for variable in variables]
        bound = {variable.field_path for variable in variables}
        if binding.body != "*":
            body_fields = {binding.body} if binding.body else set()
            parameters.extend(self._query_parameters(request, frozenset(bound | body_fields)))

        operation: Schema = {"operationId": operation_id, "tags": [service_label(service)]}
        comment = service.comment(SERVICE_METHOD, method_index)
        if comment:
            operation["summary"] = first_sentence(comment)
            operation["description"] = comment
        if method.client_streaming:
            note = "Client streaming: over HTTP the request body carries the stream's messages."
            operation["description"] = f"{operation.get('description', '')}\n\n{note}".strip()
        if parameters:
            operation["parameters"] = parameters
        if binding.body:
            operation["requestBody"] = self._request_body(request, binding.body, frozenset(bound))
        operation["responses"] = {
            "200": self._success_response(method, binding.response_body),
            "default": _error_response(),
        }
        if method.options.deprecated or service.proto.options.deprecated:
            operation["deprecated"] = True
        return path, verb, operation

    def _path_parameter(self, request: MessageInfo, variable: PathVariable) -> Schema:
        owner, field_index = self._index.resolve_field(request, variable.field_path)
        field = owner.proto.field[field_index]
        if field.label == FieldProto.LABEL_REPEATED:
            raise ValueError(f"path variable {variable.field_path!r} of {request.full_name} is repeated")
        schema = self._schemas.value_schema(field)
        schema.update(self._schemas.rules.keywords(owner.full_name, field.name, schema))
        if variable.pattern is not None:
            schema["pattern"] = variable.pattern
        return _with_description(
            {"name": variable.field_path, "in": "path", "required": True, "schema": schema},
            owner.field_comment(field_index),
        )

    def _query_parameters(self, request: MessageInfo, excluded: frozenset[str]) -> list[Schema]:
        """Request fields not bound to the path or body; nested messages flatten one level (`a.b`)."""
        parameters: list[Schema] = []
        for field_index, field in enumerate(request.proto.field):
            if field.name in excluded:
                continue
            if self._query_safe(field):
                parameter = self._query_parameter(field.name, request, field_index)
                # Only top-level fields: a required field of an unset nested message is not required
                # (its other rules, published by _query_parameter, hold whenever it is sent).
                if field.name in self._schemas.rules.required(request.full_name):
                    parameter["required"] = True
                parameters.append(parameter)
            elif field.type == FieldProto.TYPE_MESSAGE and field.label != FieldProto.LABEL_REPEATED:
                nested = self._index.message(_type_name(field))
                for nested_index, nested_field in enumerate(nested.proto.field):
                    name = f"{field.name}.{nested_field.name}"
                    if name not in excluded and self._query_safe(nested_field):
                        parameters.append(self._query_parameter(name, nested, nested_index))
        return parameters

    def _query_safe(self, field: FieldProto) -> bool:
        """Whether the field's JSON form is a scalar (or a list of scalars) that fits in a query string."""
        if field.type != FieldProto.TYPE_MESSAGE:
            return True
        return not _is_map(self._index, field) and _type_name(field) in _QUERY_SAFE_WELL_KNOWN

    def _query_parameter(self, name: str, owner: MessageInfo, field_index: int) -> Schema:
        field = owner.proto.field[field_index]
        schema = self._schemas.value_schema(field)
        if field.label == FieldProto.LABEL_REPEATED:
            schema = {"type": "array", "items": schema}
        schema.update(self._schemas.rules.keywords(owner.full_name, field.name, schema))
        parameter: Schema = {"name": name, "in": "query", "schema": schema}
        if field.options.deprecated:
            parameter["deprecated"] = True
        return _with_description(parameter, owner.field_comment(field_index))

    def _request_body(self, request: MessageInfo, body: str, path_bound: frozenset[str]) -> Schema:
        if body == "*":
            if request.full_name == HTTP_BODY_TYPE:
                return {"content": _raw_body_content()}
            schema = self._schemas.message_or_subset_schema(request, path_bound)
            content: Schema = {"content": {"application/json": {"schema": schema}}}
            if set(self._schemas.rules.required(request.full_name)) - path_bound:
                content["required"] = True
            return content
        owner, field_index = self._index.resolve_field(request, body)
        field = owner.proto.field[field_index]
        description = owner.field_comment(field_index)
        if _type_name(field) == HTTP_BODY_TYPE and field.label != FieldProto.LABEL_REPEATED:
            return _with_description({"content": _raw_body_content()}, description)
        # A path variable inside the body field (`{widget.id}` with body "widget") is taken from the
        # path, so the body schema leaves it out.
        inside_body = frozenset(
            path.removeprefix(f"{body}.") for path in path_bound if path.startswith(f"{body}.")
        )
        if inside_body:
            schema = self._schemas.object_schema(self._index.message(_type_name(field)), inside_body)
        else:
            schema = self._schemas.field_schema(owner, field_index)
        schema.pop("description", None)
        # Never a required body, even for a REQUIRED field: the transcoder sets the body field from an
        # empty body too, so the services cannot tell (and do not refuse) a request without one.
        content = {"content": {"application/json": {"schema": schema}}}
        return _with_description(content, description)

    def _success_response(self, method: descriptor_pb2.MethodDescriptorProto, response_body: str) -> Schema:
        response = self._index.message(type_full_name(method.output_type))
        if response.full_name == HTTP_BODY_TYPE:
            return {"description": "The raw response body.", "content": _raw_body_content()}
        if response_body:
            owner, field_index = self._index.resolve_field(response, response_body)
            schema = self._schemas.field_schema(owner, field_index)
            schema.pop("description", None)
        else:
            schema = self._schemas.message_schema(response.full_name)
        if method.server_streaming:
            return _event_stream_response(schema, response.full_name)
        return {"description": "OK", "content": {"application/json": {"schema": schema}}}


def _event_stream_response(event_schema: Schema, message_name: str) -> Schema:
    """A server-streaming RPC as Server-Sent Events, which the gateway frames as `data: <json>`."""
    framing = (
        f"A stream of Server-Sent Events. Each event is one `data: <JSON>` line followed by a blank "
        f"line, where the JSON is a `{message_name}` message (schema in `x-sse-data-schema`)."
    )
    return {
        "description": f"OK: a text/event-stream of `{message_name}` messages.",
        "content": {
            "text/event-stream": {
                "schema": {"type": "string", "description": framing},
                # OpenAPI 3.1 cannot type the items of a stream; this extension names their schema.
                "x-sse-data-schema": event_schema,
            }
        },
    }


# --- Document -----------------------------------------------------------------------------------------


def build_openapi(descriptor_set: bytes, *, title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document for every http rule of the public services in a FileDescriptorSet."""
    index = DescriptorIndex.from_bytes(descriptor_set)
    request_types = frozenset(
        type_full_name(method.proto.input_type)
        for service in index.public_services()
        for method in service.methods
    )
    schemas = SchemaRegistry(index, EnforcedRules(descriptor_set, request_types))
    operations = _OperationBuilder(index, schemas)
    paths: dict[str, dict[str, Schema]] = {}
    tags: list[Schema] = []
    for service in index.public_services():
        tags.append(_with_description({"name": service_label(service)}, service.comment()))
        for method in service.methods:
            if method.rule is None:
                continue  # gRPC-only method: the transcoder does not route it
            for binding_number, binding in enumerate(http_bindings(method.rule), start=1):
                operation_id = f"{service_label(service)}_{method.name}"
                if binding_number > 1:
                    operation_id = f"{operation_id}_{binding_number}"
                path, verb, operation = operations.build(service, method.index, binding, operation_id)
                path_item = paths.setdefault(path, {})
                if verb in path_item:
                    clash = path_item[verb]["operationId"]
                    raise ValueError(f"{verb.upper()} {path} is bound by both {clash} and {operation_id}")
                path_item[verb] = operation
    check_one_template_per_path(paths)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": (
                "The public JSON API of Parley, transcoded by the gateway from the gRPC services. "
                "JSON field names are the proto field names (snake_case); 64-bit integers are strings; "
                "server-streaming calls answer with Server-Sent Events; every error body is a "
                "google.rpc.Status."
            ),
        },
        "servers": [{"url": "/"}],
        "tags": tags,
        "paths": paths,
        "components": {"schemas": schemas.components()},
    }


def render(document: Mapping[str, Any]) -> str:
    """Deterministic JSON text, so regenerating an unchanged API yields identical bytes."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--descriptor-set", type=Path, required=True, help="FileDescriptorSet (.binpb)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the OpenAPI JSON")
    parser.add_argument("--title", default="Parley API", help="info.title")
    parser.add_argument("--version", default="v1", help="info.version")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        document = build_openapi(args.descriptor_set.read_bytes(), title=args.title, version=args.version)
    except ValueError as error:
        # A contract the document cannot describe: one line that names it, for scripts/gen's output.
        logger.error("%s: %s", args.descriptor_set, error)  # noqa: TRY400 - one line, not a traceback
        return 2
    args.out.write_text(render(document), encoding="utf-8")
    logger.info(
        "wrote %s: %d paths, %d schemas",
        args.out,
        len(document["paths"]),
        len(document["components"]["schemas"]),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
