"""The stream entry format every publisher and consumer shares: key naming, encode and decode."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection

from parley.events.v1 import events_pb2
from services.common.streams import (
    MalformedStreamEntry,
    RedisStreamPublisher,
    decode_entry,
    encode_entry,
    entry_for_group,
    stream_key,
)


def sample_event() -> events_pb2.Event:
    event = events_pb2.Event(id="0b7c6f1e-1d2a-4f55-9d8e-3c1b2a4d5e6f", type="user.registered", source="auth")
    event.subject = "user-1"
    event.time.FromSeconds(1_700_000_000)
    event.trace_context.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    event.user_registered.CopyFrom(
        events_pb2.UserRegistered(user_id="user-1", email="ada@example.com", display_name="Ada")
    )
    return event


def test_the_stream_key_is_per_source() -> None:
    assert stream_key("auth") == "parley:events:auth"
    with pytest.raises(ValueError, match="empty"):
        stream_key("")


def test_an_entry_carries_id_type_and_the_whole_envelope() -> None:
    event = sample_event()
    fields = encode_entry(event)
    assert list(fields) == ["event_id", "type", "event"]
    assert fields["event_id"] == event.id.encode()
    assert fields["type"] == b"user.registered"
    assert events_pb2.Event.FromString(fields["event"]) == event


def test_decoding_round_trips_with_field_names_as_redis_returns_them() -> None:
    event = sample_event()
    as_sent = encode_entry(event)
    as_read = {name.encode(): value for name, value in as_sent.items()}  # redis-py returns bytes keys
    assert decode_entry(as_read) == event
    assert decode_entry(as_sent) == event
    assert decode_entry(as_read).trace_context.traceparent == event.trace_context.traceparent


@pytest.mark.parametrize("missing", ["event_id", "type", "event"])
def test_an_entry_missing_a_field_is_malformed(missing: str) -> None:
    fields = encode_entry(sample_event())
    del fields[missing]
    with pytest.raises(MalformedStreamEntry, match=missing):
        decode_entry(fields)


@pytest.mark.parametrize(("field", "value"), [("event_id", b"another-id"), ("type", b"user.locked")])
def test_fields_that_disagree_with_the_envelope_are_malformed(field: str, value: bytes) -> None:
    fields = encode_entry(sample_event())
    fields[field] = value
    with pytest.raises(MalformedStreamEntry, match="disagree"):
        decode_entry(fields)


def test_an_event_field_that_is_not_an_event_is_malformed() -> None:
    fields = encode_entry(sample_event())
    fields["event"] = b"\xff\xff\xff"
    with pytest.raises(MalformedStreamEntry, match=r"not a parley\.events\.v1\.Event"):
        decode_entry(fields)


def test_an_event_field_decoded_as_text_is_rejected() -> None:
    event = sample_event()
    fields = {"event_id": event.id, "type": event.type, "event": "text, as decode_responses=True gives"}
    with pytest.raises(MalformedStreamEntry, match="decode_responses"):
        decode_entry(fields)


def test_a_replay_entry_names_the_one_group_it_is_for() -> None:
    event = sample_event()
    fields = encode_entry(event, for_group="email")
    assert fields["for_group"] == b"email"
    assert entry_for_group(fields) == "email"
    assert decode_entry(fields) == event
    assert entry_for_group(encode_entry(event)) is None


def test_a_replay_entry_needs_a_group_name() -> None:
    with pytest.raises(ValueError, match="for_group"):
        encode_entry(sample_event(), for_group="")


def test_the_publisher_encodes_xadd_as_redis_py_would() -> None:
    publisher = RedisStreamPublisher(Redis(), max_len=12_345)
    event = sample_event()
    expected = Connection().pack_command(
        "XADD", stream_key(event.source), "MAXLEN", "~", 12_345, "*", *_flattened(encode_entry(event))
    )
    assert publisher.packed_xadd(event) == b"".join(expected)


def _flattened(fields: dict[str, bytes]) -> list[str | bytes]:
    return [part for name, value in fields.items() for part in (name, value)]
