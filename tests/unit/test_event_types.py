"""The event type table names every payload of `parley.events.v1.Event`, once, in the house format."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from parley.events.v1 import events_pb2
from services.common.events import (
    EVENT_TYPES,
    PAYLOAD_FIELDS,
    PAYLOAD_ONEOF,
    UnknownEventPayload,
    event_type_for,
    payload_of,
)

DOTTED_LOWERCASE = re.compile(r"[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*")
DESCRIPTOR_SET = Path(__file__).resolve().parents[2] / "gen" / "parley" / "descriptor_set.binpb"
EVENT_PAYLOAD_FIELDS = list(events_pb2.Event.DESCRIPTOR.oneofs_by_name[PAYLOAD_ONEOF].fields)


def test_the_table_covers_every_payload_field_exactly() -> None:
    assert set(EVENT_TYPES) == {field.name for field in EVENT_PAYLOAD_FIELDS}


def test_type_strings_are_unique_dotted_lowercase() -> None:
    types = list(EVENT_TYPES.values())
    assert len(types) == len(set(types))
    assert [value for value in types if not DOTTED_LOWERCASE.fullmatch(value)] == []
    assert {value: key for key, value in EVENT_TYPES.items()} == dict(PAYLOAD_FIELDS)


def test_type_strings_agree_with_the_proto_comments() -> None:
    # The proto documents each payload's type as the first word of its comment ("user.registered: ...").
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    events_file = next(file for file in descriptors.file if file.name == "parley/events/v1/events.proto")
    message_index = next(
        index for index, message in enumerate(events_file.message_type) if message.name == "Event"
    )
    event_message = events_file.message_type[message_index]
    comments: dict[str, str] = {}
    for location in events_file.source_code_info.location:
        # Path [4, message, 2, field] is a field of a top-level message (descriptor.proto numbering).
        if list(location.path[:3]) == [4, message_index, 2] and len(location.path) == 4:
            comments[event_message.field[location.path[3]].name] = location.leading_comments.strip()
    documented = {
        field.name: match.group(1)
        for field in EVENT_PAYLOAD_FIELDS
        if (match := re.match(r"([a-z0-9_.]+):", comments.get(field.name, "")))
    }
    assert documented, "no payload comment starts with its type; did the descriptor lose source info?"
    assert {name: EVENT_TYPES[name] for name in documented} == documented


@pytest.mark.parametrize("field", EVENT_PAYLOAD_FIELDS, ids=lambda field: field.name)
def test_every_payload_type_maps_back_and_forth(field: FieldDescriptor) -> None:
    name = field.name
    event = events_pb2.Event()
    payload: Message = getattr(event, name)
    payload.SetInParent()
    assert event_type_for(payload) == EVENT_TYPES[name]
    assert payload_of(event) is not None
    assert event.WhichOneof(PAYLOAD_ONEOF) == name


def test_unknown_payloads_and_empty_events_are_refused() -> None:
    with pytest.raises(UnknownEventPayload):
        event_type_for(events_pb2.TraceContext())
    with pytest.raises(UnknownEventPayload):
        payload_of(events_pb2.Event(id="e1"))
