"""Request validation: the contract's rules on each request message, compiled once per message type.

The rules, in order:
1. REQUIRED fields (`google.api.field_behavior`; services/common/required_fields.py);
2. field floors, which every request message obeys by field name (`FIELD_FLOORS`): a negative
   `page_size` is a client bug (HOUSE-STYLE: an oversize one is capped by the server instead);
3. the rules a service registers for one message type.

The gateway's OpenAPI generator publishes rules 1 and 2 from these same definitions, so what the
document promises and what the services enforce cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.common.errors import FieldViolation, InvalidArgument
from services.common.required_fields import RequiredFields, descriptor_of

MessageRule = Callable[[Message], Iterable[FieldViolation]]
RequestCheck = Callable[[Message], None]


@dataclass(frozen=True)
class FieldFloor:
    """The smallest value an integer field of this name may take in any request message."""

    field: str
    minimum: int
    description: str
    reason: str


FIELD_FLOORS: Final = (
    FieldFloor("page_size", 0, "must be zero (server default) or positive", "INVALID_PAGE_SIZE"),
)

_INTEGER_TYPES: Final = frozenset(
    {
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
    }
)


def floors_of(message_type: Descriptor) -> dict[str, FieldFloor]:
    """The floors that apply to a request message's own fields, by field name."""
    floors = {}
    for floor in FIELD_FLOORS:
        field = message_type.fields_by_name.get(floor.field)
        if field is not None and field.cpp_type in _INTEGER_TYPES and not field.is_repeated:
            floors[floor.field] = floor
    return floors


def _floor_rule(floor: FieldFloor) -> MessageRule:
    def check(request: Message) -> Iterable[FieldViolation]:
        if getattr(request, floor.field) < floor.minimum:
            yield FieldViolation(floor.field, floor.description, floor.reason)

    return check


def _refusal(violations: Sequence[FieldViolation]) -> InvalidArgument:
    """The error for a request whose fields break the contract's rules."""
    return InvalidArgument(
        "The request has invalid fields: " + ", ".join(v.field for v in violations) + ".",
        field_violations=violations,
    )


class RequestValidator:
    """Runs the rules above on requests; each message type's rules are put together once."""

    def __init__(
        self,
        rules: Mapping[str, Sequence[MessageRule]] | None = None,
        *,
        required_fields: RequiredFields | None = None,
    ) -> None:
        self._registered: dict[str, list[MessageRule]] = {name: list(r) for name, r in (rules or {}).items()}
        self._required = required_fields or RequiredFields()
        self._compiled: dict[str, tuple[MessageRule, ...]] = {}

    def register(self, message_full_name: str, *rules: MessageRule) -> None:
        self._registered.setdefault(message_full_name, []).extend(rules)
        self._compiled.pop(message_full_name, None)

    def check_for(self, message_type: Descriptor) -> RequestCheck | None:
        """The check of one request type, or None when the contract puts no rule on it.

        Built once per call site (the pipeline asks once per method), so register rules first.
        """
        rules = self._rules_of(message_type)
        if not rules:
            return None

        def check(request: Message) -> None:
            found = [violation for rule in rules for violation in rule(request)]
            if found:
                raise _refusal(found)

        return check

    def violations(self, request: Message) -> list[FieldViolation]:
        return [violation for rule in self._rules_of(descriptor_of(request)) for violation in rule(request)]

    def check(self, request: Message) -> None:
        found = self.violations(request)
        if found:
            raise _refusal(found)

    def _rules_of(self, message_type: Descriptor) -> tuple[MessageRule, ...]:
        rules = self._compiled.get(message_type.full_name)
        if rules is None:
            rules = self._compiled[message_type.full_name] = self._compile(message_type)
        return rules

    def _compile(self, message_type: Descriptor) -> tuple[MessageRule, ...]:
        rules: list[MessageRule] = []
        if not self._required.rules_for(message_type).empty:
            rules.append(self._required.violations)
        rules.extend(_floor_rule(floor) for floor in floors_of(message_type).values())
        rules.extend(self._registered.get(message_type.full_name, ()))
        return tuple(rules)
