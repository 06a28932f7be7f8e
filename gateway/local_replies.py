"""Errors Envoy produces itself (no route, a method the path does not serve, bad JSON, body too large,
upstream down, refused credentials, rate limited, /healthz, requests refused before routing),
rewritten into the Parley error shape: Envoy's `local_reply_config.mappers`.

JSON clients get a `google.rpc.Status` body with an `ErrorInfo` and the request's `RequestInfo`, like
the services' own errors; gRPC clients get Envoy's gRPC-shaped reply (grpc-status from the HTTP
status) with the message as grpc-message. The classes of error and their reasons are data
(`local_replies` in `envoy/gateway.yaml`); what the edge server already shaped (ext_authz refusals,
rate limiting) passes through.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

from gateway.rls import RATE_LIMITED_GRPC_MESSAGE
from gateway.routes import ALLOW_HEADER, REQUIRED_ROLE_HEADER
from gateway.settings import GatewaySettings, LocalReply
from services.common.identity import GATEWAY_HEADER_PREFIX

# Request headers the Lua filter sets for a refusal of its own, read back here. Gateway-only headers:
# no client can send them (Envoy strips the prefix first).
VERSION_ERROR_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}api-version-error"
MEDIA_TYPE_ERROR_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}media-type-error"

# Envoy's own explanation of a reply (the transcoder's parser message, "Bad Request", or nothing).
_LOCAL_REPLY_BODY: Final = "%LOCAL_REPLY_BODY%"
REQUEST_ID_HEADER: Final = "x-request-id"
# The request's id, as every reply carries it in the x-request-id header.
REQUEST_ID: Final = f"%REQ({REQUEST_ID_HEADER.upper()})%"
# A request Envoy refuses before it has one (a malformed request line or header, a missing Host,
# request headers too large or too slow) gets a fresh id in the reply header, and the body names it.
_FRESH_REQUEST_ID: Final = "%UNIQUE_ID%"
_REPLY_REQUEST_ID: Final = f"%RESP({REQUEST_ID_HEADER.upper()})%"
# Why Envoy refused such a request (http1.codec_error, missing_host_header, ...): its own word for
# it, since its body is often empty or just "Bad Request".
_REFUSAL_CAUSE: Final = "%RESPONSE_CODE_DETAILS%"
REFUSED_BEFORE_ROUTING_MESSAGE: Final = (
    f"The gateway refused this request before routing it: it is not valid HTTP or breaks a protocol "
    f"limit ({_REFUSAL_CAUSE})."
)

# A method the path does not serve (the 405 routes of gateway/routes.py, which set Allow).
METHOD_NOT_ALLOWED_STATUS: Final = 405
METHOD_NOT_ALLOWED_GRPC_CODE: Final = 12  # UNIMPLEMENTED: this operation is not supported here.
_ALLOWED_METHODS: Final = f"%RESP({ALLOW_HEADER.upper()})%"
METHOD_NOT_ALLOWED_MESSAGE: Final = (
    f"This path does not serve the %REQ(:METHOD)% method; it serves {_ALLOWED_METHODS}."
)


def _status_filter(op: Literal["EQ", "GE", "LE"], status: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {
                "op": op,
                "value": {
                    "default_value": status,
                    "runtime_key": f"parley.local_reply.{op.lower()}_{status}",
                },
            }
        }
    }


def _status_range_filter(low: int, high: int) -> dict[str, Any]:
    if low == high:
        return _status_filter("EQ", low)
    return {"and_filter": {"filters": [_status_filter("GE", low), _status_filter("LE", high)]}}


# A request from a gRPC client: gRPC content type, and not a JSON request the transcoder rewrote
# into gRPC (the transcoder records the original path in x-envoy-original-path). Envoy itself
# decides from the client's original headers that a local reply must be gRPC-shaped.
_GRPC_CLIENT_FILTER: dict[str, Any] = {
    "and_filter": {
        "filters": [
            {
                "header_filter": {
                    "header": {"name": "content-type", "string_match": {"prefix": "application/grpc"}}
                }
            },
            {
                "header_filter": {
                    "header": {"name": "x-envoy-original-path", "present_match": True, "invert_match": True}
                }
            },
        ]
    }
}


def _response_flag_filter(flag: str) -> dict[str, Any]:
    return {"response_flag_filter": {"flags": [flag]}}


def _and(*filters: dict[str, Any]) -> dict[str, Any]:
    return {"and_filter": {"filters": list(filters)}}


def _passthrough(content_type: str | None = None) -> dict[str, Any]:
    """Keep the body the producing filter chose (ext_authz and the rate-limit service write their own)."""
    override: dict[str, Any] = {"text_format_source": {"inline_string": _LOCAL_REPLY_BODY}}
    if content_type:
        override["content_type"] = content_type
    return override


# Envoy gives a request its id right after it has read and checked the request headers; a reply
# to a request without one is a refusal before that (it never reached a filter or a route).
_REFUSED_BEFORE_ROUTING: dict[str, Any] = {
    "header_filter": {"header": {"name": REQUEST_ID_HEADER, "present_match": True, "invert_match": True}}
}


def local_reply_mappers(settings: GatewaySettings, *, max_request_bytes: int) -> list[dict[str, Any]]:
    """`local_reply_config.mappers`, first match wins: refusals before routing, /healthz, then the
    replies whose producer wrote the details (ext_authz refusals, rate limiting), then gRPC clients,
    then JSON clients.

    gRPC clients get Envoy's gRPC-shaped reply (grpc-status from the HTTP status, e.g. 404 becomes
    UNIMPLEMENTED) with our message as grpc-message; everyone else gets the JSON error shape. Every
    JSON body names the request id the reply's x-request-id header carries.
    """

    def error_body(
        code: int,
        message: str,
        reason: str,
        metadata: Mapping[str, str],
        *,
        request_id: str = REQUEST_ID,
    ) -> dict[str, Any]:
        error_info: dict[str, Any] = {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": reason,
            "domain": settings.error_domain,
        }
        if metadata:
            error_info["metadata"] = dict(metadata)
        request_info = {"@type": "type.googleapis.com/google.rpc.RequestInfo", "request_id": request_id}
        return {"code": code, "message": message, "details": [error_info, request_info]}

    def reply_metadata(reply: LocalReply) -> dict[str, str]:
        metadata = dict(reply.metadata)
        if reply.status_low == 413:
            metadata["max_request_bytes"] = str(max_request_bytes)
        elif reply.status_low == 403:
            # Which role was missing: RBAC-guarded routes name it in a request header.
            metadata["role"] = f"%REQ({REQUIRED_ROLE_HEADER.upper()})%"
        return metadata

    # Refusals before routing, one per class of reply (the flagged ones come from filters, which such
    # a request never reached): the class's reason and code, a message that is never empty, the
    # cause, and a fresh request id, set in the header first so the body can repeat it.
    refused_before_routing = [
        {
            "filter": _and(_REFUSED_BEFORE_ROUTING, _reply_filter(reply)),
            "headers_to_add": [
                {
                    "header": {"key": REQUEST_ID_HEADER, "value": _FRESH_REQUEST_ID},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
            "body_format_override": {
                "json_format": error_body(
                    reply.grpc_code,
                    REFUSED_BEFORE_ROUTING_MESSAGE if _LOCAL_REPLY_BODY in reply.message else reply.message,
                    reply.reason,
                    {**reply_metadata(reply), "cause": _REFUSAL_CAUSE},
                    request_id=_REPLY_REQUEST_ID,
                )
            },
        }
        for reply in settings.local_replies
        if not reply.response_flag
    ]

    healthz_request = {
        "header_filter": {"header": {"name": ":path", "string_match": {"exact": settings.healthz.path}}}
    }
    media_type_error_request = {
        "header_filter": {"header": {"name": MEDIA_TYPE_ERROR_HEADER, "present_match": True}}
    }
    version_error_request = {
        "header_filter": {"header": {"name": VERSION_ERROR_HEADER, "present_match": True}}
    }
    # The rate-limit service's raw body is a JSON fragment: `"message":"…","details":[{…},{…}` — the
    # request id is only known here, so the gateway closes the object around it.
    rate_limited_json = (
        '{"code":8,%LOCAL_REPLY_BODY%,{"@type":"type.googleapis.com/google.rpc.RequestInfo",'
        f'"request_id":"{REQUEST_ID}"}}]}}'
    )
    method_not_allowed = _status_filter("EQ", METHOD_NOT_ALLOWED_STATUS)
    mappers: list[dict[str, Any]] = [
        *refused_before_routing,
        {
            "filter": _and(_status_filter("EQ", 200), healthz_request),
            "body_format_override": {"json_format": {"status": "SERVING"}},
        },
        {
            "filter": _and(_status_filter("EQ", 503), healthz_request),
            "body_format_override": {
                "json_format": error_body(
                    14, settings.healthz.not_serving_message, "UPSTREAM_UNAVAILABLE", {}
                )
            },
        },
        {
            "filter": _and(_status_filter("EQ", 400), version_error_request),
            "body_format_override": {
                "json_format": error_body(
                    3,
                    f"The {settings.api_versions.header} header names a version that does not serve "
                    "this path.",
                    "UNSUPPORTED_API_VERSION",
                    {"requested_version": f"%REQ({VERSION_ERROR_HEADER})%"},
                )
            },
        },
        {
            "filter": _and(_status_filter("EQ", 415), media_type_error_request),
            "body_format_override": {
                "json_format": error_body(
                    3,
                    "Request bodies are JSON: send them with Content-Type: application/json.",
                    "UNSUPPORTED_MEDIA_TYPE",
                    {"content_type": f"%REQ({MEDIA_TYPE_ERROR_HEADER})%"},
                )
            },
        },
        {
            "filter": _and(method_not_allowed, _GRPC_CLIENT_FILTER),
            "body_format_override": {"text_format_source": {"inline_string": METHOD_NOT_ALLOWED_MESSAGE}},
        },
        {
            "filter": method_not_allowed,
            "body_format_override": {
                "json_format": error_body(
                    METHOD_NOT_ALLOWED_GRPC_CODE,
                    METHOD_NOT_ALLOWED_MESSAGE,
                    "METHOD_NOT_ALLOWED",
                    {"method": "%REQ(:METHOD)%", "allow": _ALLOWED_METHODS},
                )
            },
        },
        # ext_authz refusals (401/403) carry the auth service's own reason and details, shaped by the
        # edge server for the client kind (JSON body, or a message plus grpc-status-details-bin).
        {
            "filter": _and(
                _response_flag_filter("UAEX"), _status_range_filter(401, 403), _GRPC_CLIENT_FILTER
            ),
            "body_format_override": _passthrough(),
        },
        {
            "filter": _and(_response_flag_filter("UAEX"), _status_range_filter(401, 403)),
            "body_format_override": _passthrough("application/json"),
        },
        {
            "filter": _and(_response_flag_filter("RL"), _GRPC_CLIENT_FILTER),
            "body_format_override": {"text_format_source": {"inline_string": RATE_LIMITED_GRPC_MESSAGE}},
        },
        {
            "filter": _response_flag_filter("RL"),
            "body_format_override": {
                "text_format_source": {"inline_string": rate_limited_json},
                "content_type": "application/json",
            },
        },
    ]
    for reply in settings.local_replies:
        mappers.append(
            {
                "filter": _and(_reply_filter(reply), _GRPC_CLIENT_FILTER),
                "body_format_override": {"text_format_source": {"inline_string": reply.message}},
            }
        )
    mappers.extend(
        {
            "filter": _reply_filter(reply),
            "body_format_override": {
                "json_format": error_body(reply.grpc_code, reply.message, reply.reason, reply_metadata(reply))
            },
        }
        for reply in settings.local_replies
    )
    return mappers


def _reply_filter(reply: LocalReply) -> dict[str, Any]:
    status = _status_range_filter(reply.status_low, reply.status_high)
    return _and(status, _response_flag_filter(reply.response_flag)) if reply.response_flag else status
