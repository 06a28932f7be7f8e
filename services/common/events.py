"""Event type strings: the one table that names each payload of `parley.events.v1.Event`.

The `type` of an event is a dotted lowercase string, `<entity>.<what happened>`. It is part of the
contract (consumers filter and route on it), so the mapping is written out here rather than derived
from field names: "api_key_created" must become "api_key.created", not "api.key_created".
`tests/unit/test_event_types.py` fails when a payload is added to the proto without a row here.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from google.protobuf.message import Message
from parley.events.v1 import events_pb2

PAYLOAD_ONEOF: Final = "payload"

# Field name of the payload in `Event.payload` → the event type string.
EVENT_TYPES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "user_registered": "user.registered",
    }
)

# The event type string → the payload field name.
PAYLOAD_FIELDS: Final[Mapping[str, str]] = MappingProxyType({value: key for key, value in EVENT_TYPES.items()})


class UnknownEventPayload(ValueError):  # noqa: N818 - named for the condition, like KeyError.
    """The message is not one of the payloads `parley.events.v1.Event` can carry."""


def _payload_fields_by_message() -> Mapping[str, str]:
    """Full message name → oneof field name, read from the descriptor (one field per message type)."""
    by_message: dict[str, str] = {}
    for field in events_pb2.Event.DESCRIPTOR.oneofs_by_name[PAYLOAD_ONEOF].fields:
        message_name = field.message_type.full_name
        if message_name in by_message:
            raise RuntimeError(f"{message_name} appears twice in Event.payload; the type would be ambiguous")
        by_message[message_name] = field.name
    return MappingProxyType(by_message)


_FIELD_BY_MESSAGE: Final = _payload_fields_by_message()


def payload_field_for(payload: Message) -> str:
    """The name of the `Event.payload` field that carries this message."""
    try:
        return _FIELD_BY_MESSAGE[payload.DESCRIPTOR.full_name]
    except KeyError:
        raise UnknownEventPayload(
            f"{payload.DESCRIPTOR.full_name} is not a payload of parley.events.v1.Event"
        ) from None


def event_type_for(payload: Message) -> str:
    """The event type string for a payload message, e.g. `UserRegistered` → "user.registered"."""
    field = payload_field_for(payload)
    try:
        return EVENT_TYPES[field]
    except KeyError:
        raise UnknownEventPayload(f"Event.payload field {field!r} has no type string in EVENT_TYPES") from None


def payload_of(event: events_pb2.Event) -> Message:
    """The payload message set on an event; raises `UnknownEventPayload` when none is set."""
    field = event.WhichOneof(PAYLOAD_ONEOF)
    if field is None:
        raise UnknownEventPayload(f"event {event.id or '<no id>'} carries no payload")
    payload: Message = getattr(event, field)
    return payload
