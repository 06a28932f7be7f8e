"""The REQUIRED fields of the contract (`google.api.field_behavior`), derived once per message type.

The validation step (services/common/validation.py) checks every request against them, and the
OpenAPI generator (gateway/openapi.py) publishes the same derivation, so the document and the check
cannot disagree. The rules, in the terms of AIP-203 (docs/errors.md says the same for API users):

- A REQUIRED string or bytes field is not empty; a message field is set; a repeated or map field has
  at least one element; an enum is not its zero value (`X_UNSPECIFIED`). A number or bool can only be
  REQUIRED with explicit presence (`optional`), and must then be set: without presence its zero
  cannot be told from "unset", so the derivation refuses such a field.
- Nested messages: the REQUIRED fields of a message field apply when that field is set (in each
  element, for a repeated field); nothing below an unset optional field is required.
- Updates: in a message with a `google.protobuf.FieldMask update_mask`, the REQUIRED fields inside
  the resource (its one other singular message field) apply only where the mask names them, one of
  their ancestors, or `*`. An empty mask means "the fields the request sets" (AIP-134), so it requires
  none of them.

A violation is a `BadRequest.FieldViolation` whose field is the path in proto names
(`user.display_name`, `parts[2].text`) and whose reason is REQUIRED_FIELD.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.common.errors import FieldViolation

if TYPE_CHECKING:
    from google.protobuf import descriptor_pb2
    from google.protobuf.internal.extension_dict import _ExtensionFieldDescriptor

REQUIRED_FIELD_REASON: Final = "REQUIRED_FIELD"
UPDATE_MASK_FIELD: Final = "update_mask"
FIELD_MASK_TYPE: Final = "google.protobuf.FieldMask"

# mypy sees google.api as untyped; typing the extension handle keeps `Extensions[...]` typed.
_FIELD_BEHAVIOR: Final = cast(
    "_ExtensionFieldDescriptor[descriptor_pb2.FieldOptions, Any]", field_behavior_pb2.field_behavior
)
_TEXT_TYPES: Final = frozenset({FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES})


def descriptor_of(message: Message | type[Message]) -> Descriptor:
    """A message's (or message class's) descriptor, typed as the public class it is at run time."""
    # The stubs also name upb's own class, which `google.protobuf.descriptor.Descriptor` is under upb.
    return cast(Descriptor, message.DESCRIPTOR)


class Requirement(enum.Enum):
    """What a REQUIRED field must hold, by its kind."""

    NOT_EMPTY = "not_empty"  # string, bytes
    SET = "set"  # message, or a number or bool with explicit presence
    HAS_ELEMENTS = "has_elements"  # repeated, map
    NOT_UNSPECIFIED = "not_unspecified"  # enum


@dataclass(frozen=True, slots=True)
class RequiredField:
    """One REQUIRED field of a message and the rule it must pass."""

    field: FieldDescriptor
    requirement: Requirement
    description: str

    @property
    def name(self) -> str:
        return self.field.name

    def missing(self, message: Message) -> bool:
        requirement = self.requirement
        if requirement is Requirement.SET:
            return not message.HasField(self.field.name)
        if requirement is Requirement.NOT_UNSPECIFIED:
            return bool(getattr(message, self.field.name) == 0)
        # Empty strings, bytes, repeated fields and maps are all falsy.
        return not getattr(message, self.field.name)


@dataclass(frozen=True, slots=True)
class _Nested:
    """A message field whose type has REQUIRED fields somewhere below it."""

    name: str
    type_name: str
    repeated: bool


@dataclass(frozen=True, slots=True)
class MessageRules:
    """The required-field rules of one message type."""

    full_name: str
    required: tuple[RequiredField, ...]
    nested: tuple[_Nested, ...]
    # The resource field whose nested REQUIRED fields only apply where `update_mask` names them.
    masked_resource: str | None

    @property
    def empty(self) -> bool:
        return not self.required and not self.nested


# A field mask narrowed to one subtree: None covers the whole subtree, an empty set none of it.
_Mask = frozenset[str] | None
_EVERYTHING: Final[_Mask] = None


class RequiredFields:
    """Derives, once per message type, the rules above, and checks messages against them."""

    def __init__(self) -> None:
        self._rules: dict[str, MessageRules] = {}

    def rules_for(self, message_type: Descriptor) -> MessageRules:
        """The rules of `message_type`, derived with every type it reaches on first use.

        Raises ValueError for a REQUIRED field the rules cannot enforce (see the module docstring).
        """
        rules = self._rules.get(message_type.full_name)
        if rules is None:
            self._derive(message_type)
            rules = self._rules[message_type.full_name]
        return rules

    def violations(self, message: Message) -> list[FieldViolation]:
        rules = self.rules_for(descriptor_of(message))
        found: list[FieldViolation] = []
        if not rules.empty:
            self._collect(message, rules, "", _EVERYTHING, found)
        return found

    def _collect(
        self, message: Message, rules: MessageRules, prefix: str, mask: _Mask, found: list[FieldViolation]
    ) -> None:
        for required in rules.required:
            if (mask is None or required.name in mask) and required.missing(message):
                found.append(
                    FieldViolation(prefix + required.name, required.description, REQUIRED_FIELD_REASON)
                )
        for nested in rules.nested:
            if nested.name == rules.masked_resource:
                inner = _update_mask(message)
            else:
                inner = _narrowed(mask, nested.name)
            if inner is not None and not inner:
                continue
            nested_rules = self._rules[nested.type_name]
            if nested.repeated:
                for index, element in enumerate(getattr(message, nested.name)):
                    self._collect(element, nested_rules, f"{prefix}{nested.name}[{index}].", inner, found)
            elif message.HasField(nested.name):
                value = getattr(message, nested.name)
                self._collect(value, nested_rules, f"{prefix}{nested.name}.", inner, found)

    def _derive(self, root: Descriptor) -> None:
        reachable = _reachable_types(root)
        own = {name: _own_required(message_type) for name, message_type in reachable.items()}
        # A type requires something if it has REQUIRED fields or a message field of a type that does;
        # iterated to a fixed point, since message types may refer to each other in cycles.
        requiring = {name for name, fields in own.items() if fields}
        grew = True
        while grew:
            grew = False
            for name, message_type in reachable.items():
                if name not in requiring and any(
                    _message_type_name(field) in requiring for field in message_type.fields
                ):
                    requiring.add(name)
                    grew = True
        for name, message_type in reachable.items():
            if name not in self._rules:
                self._rules[name] = _message_rules(message_type, own[name], requiring)


def _message_rules(
    message_type: Descriptor, required: tuple[RequiredField, ...], requiring: set[str]
) -> MessageRules:
    nested = []
    for field in message_type.fields:
        type_name = _message_type_name(field)
        if type_name not in requiring:
            continue
        if _is_map(field):
            raise ValueError(
                f"{field.full_name}: a map whose values have REQUIRED fields is not supported; "
                "use a repeated message field"
            )
        nested.append(_Nested(field.name, type_name, field.is_repeated))
    return MessageRules(
        full_name=message_type.full_name,
        required=required,
        nested=tuple(nested),
        masked_resource=_masked_resource(message_type, requiring),
    )


def _masked_resource(message_type: Descriptor, requiring: set[str]) -> str | None:
    mask = message_type.fields_by_name.get(UPDATE_MASK_FIELD)
    if mask is None or _message_type_name(mask) != FIELD_MASK_TYPE or mask.is_repeated:
        return None
    resources = [
        field
        for field in message_type.fields
        if field is not mask and field.message_type is not None and not field.is_repeated
    ]
    if len(resources) == 1:
        return resources[0].name
    if any(_message_type_name(field) in requiring for field in resources):
        names = ", ".join(field.name for field in resources)
        raise ValueError(
            f"{message_type.full_name}: update_mask could govern any of {names}; an update request "
            "has one resource field"
        )
    return None


def _own_required(message_type: Descriptor) -> tuple[RequiredField, ...]:
    return tuple(
        _required_field(field)
        for field in message_type.fields
        if field_behavior_pb2.REQUIRED in _behaviors(field)
    )


def _required_field(field: FieldDescriptor) -> RequiredField:
    if field.is_repeated:
        return RequiredField(field, Requirement.HAS_ELEMENTS, "required: give at least one element")
    if field.type in _TEXT_TYPES:
        return RequiredField(field, Requirement.NOT_EMPTY, "required: must not be empty")
    if field.type == FieldDescriptor.TYPE_ENUM:
        zero_value = field.enum_type.values_by_number.get(0) if field.enum_type is not None else None
        zero = zero_value.name if zero_value is not None else "0"
        return RequiredField(
            field, Requirement.NOT_UNSPECIFIED, f"required: must be set to a value other than {zero}"
        )
    if field.message_type is not None or field.has_presence:
        return RequiredField(field, Requirement.SET, "required: must be set")
    raise ValueError(
        f"{field.full_name} is REQUIRED but a zero value cannot be told from an unset one; "
        "declare it `optional` or drop REQUIRED"
    )


def _behaviors(field: FieldDescriptor) -> frozenset[int]:
    """The field's `google.api.field_behavior` values."""
    return frozenset(field.GetOptions().Extensions[_FIELD_BEHAVIOR])


def _reachable_types(root: Descriptor) -> dict[str, Descriptor]:
    found = {root.full_name: root}
    pending = [root]
    while pending:
        for field in pending.pop().fields:
            message_type = field.message_type
            if message_type is not None and message_type.full_name not in found:
                found[message_type.full_name] = message_type
                pending.append(message_type)
    return found


def _message_type_name(field: FieldDescriptor) -> str | None:
    return field.message_type.full_name if field.message_type is not None else None


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _update_mask(message: Message) -> _Mask:
    """The resource paths an update request's mask names: everything for `*`."""
    paths = [path.strip() for path in getattr(message, UPDATE_MASK_FIELD).paths]
    return _EVERYTHING if "*" in paths else frozenset(paths)


def _narrowed(mask: _Mask, name: str) -> _Mask:
    """The part of `mask` below the field `name`."""
    if mask is None or name in mask:
        return _EVERYTHING
    return frozenset(path.removeprefix(f"{name}.") for path in mask if path.startswith(f"{name}."))
