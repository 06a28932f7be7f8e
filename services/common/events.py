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
        "user_email_verified": "user.email_verified",
        "user_login_succeeded": "user.login_succeeded",
        "user_login_failed": "user.login_failed",
        "user_locked": "user.locked",
        "session_revoked": "session.revoked",
        "session_reuse_detected": "session.reuse_detected",
        "user_password_changed": "user.password_changed",
        "user_password_reset": "user.password_reset",
        "api_key_created": "api_key.created",
        "api_key_revoked": "api_key.revoked",
        "user_role_changed": "user.role_changed",
        "user_disabled": "user.disabled",
        "user_enabled": "user.enabled",
        "email_requested": "email.requested",
        "email_sent": "email.sent",
        "email_failed": "email.failed",
        "conversation_created": "conversation.created",
        "message_created": "message.created",
        "generation_completed": "generation.completed",
        "generation_failed": "generation.failed",
        "subscription_changed": "subscription.changed",
        "subscription_period_ended": "subscription.period_ended",
        "invoice_payment_due": "invoice.payment_due",
        "invoice_created": "invoice.created",
        "invoice_paid": "invoice.paid",
        "invoice_uncollectible": "invoice.uncollectible",
        "payment_succeeded": "payment.succeeded",
        "payment_failed": "payment.failed",
        "payment_refunded": "payment.refunded",
        "credits_granted": "credits.granted",
        "credits_reserved": "credits.reserved",
        "credits_settled": "credits.settled",
        "credits_released": "credits.released",
        "credits_topped_up": "credits.topped_up",
        "usage_recorded": "usage.recorded",
        "usage_threshold_crossed": "usage.threshold_crossed",
    }
)

# The event type string → the payload field name.
PAYLOAD_FIELDS: Final[Mapping[str, str]] = MappingProxyType(
    {value: key for key, value in EVENT_TYPES.items()}
)


class UnknownEventPayload(ValueError):  # noqa: N818 - named for the condition, like KeyError.
    """The message is not one of the payloads `parley.events.v1.Event` can carry."""


def _payload_fields_by_message() -> Mapping[str, str]:
    """Full message name → oneof field name, read from the descriptor (one field per message type)."""
    by_message: dict[str, str] = {}
    for field in events_pb2.Event.DESCRIPTOR.oneofs_by_name[PAYLOAD_ONEOF].fields:
        if field.message_type is None:
            raise RuntimeError(f"Event.payload field {field.name} is not a message")
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
        raise UnknownEventPayload(
            f"Event.payload field {field!r} has no type string in EVENT_TYPES"
        ) from None


def payload_of(event: events_pb2.Event) -> Message:
    """The payload message set on an event; raises `UnknownEventPayload` when none is set."""
    field = event.WhichOneof(PAYLOAD_ONEOF)
    if field is None:
        raise UnknownEventPayload(f"event {event.id or '<no id>'} carries no payload")
    payload: Message = getattr(event, field)
    return payload
