"""Envoy's own replies in the Parley shape (gateway/local_replies.py): the 405, and the replies to
requests Envoy refuses before it gives them an id."""

from __future__ import annotations

from typing import Any

import yaml

from gateway.local_replies import local_reply_mappers
from gateway.settings import load_gateway_settings

SETTINGS = load_gateway_settings()
MAPPERS = local_reply_mappers(SETTINGS, max_request_bytes=1024)


def json_body(mapper: dict[str, Any]) -> dict[str, Any] | None:
    found: dict[str, Any] | None = mapper["body_format_override"].get("json_format")
    return found


def is_refusal_before_routing(mapper: dict[str, Any]) -> bool:
    """The mapper applies only to requests without an x-request-id (Envoy gives every other one)."""
    return "name: x-request-id" in yaml.safe_dump(mapper["filter"])


def index_of_reason(reason: str) -> int:
    return next(
        index
        for index, mapper in enumerate(MAPPERS)
        if not is_refusal_before_routing(mapper)
        and (body := json_body(mapper)) is not None
        and body.get("details", [{}])[0].get("reason") == reason
    )


def test_a_405_names_the_method_and_the_allowed_ones_from_the_allow_header() -> None:
    body = json_body(MAPPERS[index_of_reason("METHOD_NOT_ALLOWED")])

    assert body == {
        "code": 12,
        "message": "This path does not serve the %REQ(:METHOD)% method; it serves %RESP(ALLOW)%.",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "METHOD_NOT_ALLOWED",
                "domain": "parley.dev",
                "metadata": {"method": "%REQ(:METHOD)%", "allow": "%RESP(ALLOW)%"},
            },
            {"@type": "type.googleapis.com/google.rpc.RequestInfo", "request_id": "%REQ(X-REQUEST-ID)%"},
        ],
    }
    # Before the catch-all for other 4xx answers, which would call it REQUEST_REJECTED.
    assert index_of_reason("METHOD_NOT_ALLOWED") < index_of_reason("REQUEST_REJECTED")


def test_every_class_of_reply_has_a_twin_for_requests_refused_before_routing_that_comes_first() -> None:
    refusals = [mapper for mapper in MAPPERS if is_refusal_before_routing(mapper)]
    unflagged = [reply for reply in SETTINGS.local_replies if not reply.response_flag]

    assert len(refusals) == len(unflagged)
    assert MAPPERS[: len(refusals)] == refusals
    for mapper, reply in zip(refusals, unflagged, strict=True):
        # A fresh id in the header, set before the body is written, which repeats it.
        assert mapper["headers_to_add"] == [
            {
                "header": {"key": "x-request-id", "value": "%UNIQUE_ID%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ]
        body = json_body(mapper)
        assert body is not None
        error_info, request_info = body["details"]
        assert request_info["request_id"] == "%RESP(X-REQUEST-ID)%"
        assert (body["code"], error_info["reason"]) == (reply.grpc_code, reply.reason)
        assert error_info["metadata"]["cause"] == "%RESPONSE_CODE_DETAILS%"
        # Envoy's own body for these is often empty or "Bad Request": the message never relies on it.
        assert "%LOCAL_REPLY_BODY%" not in body["message"]
        assert body["message"]


def test_replies_to_requests_that_have_an_id_name_it() -> None:
    for mapper in MAPPERS:
        body = json_body(mapper)
        if is_refusal_before_routing(mapper) or body is None or "details" not in body:
            continue
        assert "headers_to_add" not in mapper
        assert body["details"][-1]["request_id"] == "%REQ(X-REQUEST-ID)%"
