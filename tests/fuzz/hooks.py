"""Parley's own schemathesis checks for the gateway fuzz run (loaded through SCHEMATHESIS_HOOKS).

The OpenAPI document declares every error as `default: google.rpc.Status`, which
response_schema_conformance can only check loosely (every Status field is optional in proto3 JSON).
These checks hold the gateway to what docs/errors.md promises for every error, whoever made it
(a service, the transcoder, Envoy itself, the edge): one shape with a stable reason, and nothing of
the machinery showing through.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis import CheckContext, Response
from schemathesis.generation.case import Case

ERROR_DOMAIN = "parley.dev"
ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
# What an RPC that is specified but not built answers (services/common/server.py, contract_only).
NOT_IMPLEMENTED_REASON = "NOT_IMPLEMENTED"
GRPC_UNIMPLEMENTED = 12


def _json_body(response: Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_info(body: Any) -> dict[str, Any] | None:
    details = body.get("details") if isinstance(body, dict) else None
    if not isinstance(details, list):
        return None
    return next(
        (detail for detail in details if isinstance(detail, dict) and detail.get("@type") == ERROR_INFO_TYPE),
        None,
    )


@schemathesis.check
def parley_error_shape(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx and 5xx is a JSON google.rpc.Status with an ErrorInfo of domain parley.dev."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    if not content_type.startswith("application/json"):
        raise AssertionError(f"A {response.status_code} error came as {content_type!r}, not a JSON Status")
    body = _json_body(response)
    if not isinstance(body, dict) or not isinstance(body.get("code"), int) or not body.get("message"):
        raise AssertionError(f"A {response.status_code} error body is not a google.rpc.Status with a message")
    info = _error_info(body)
    if info is None or info.get("domain") != ERROR_DOMAIN or not info.get("reason"):
        raise AssertionError(
            f"A {response.status_code} error carries no ErrorInfo with a reason in domain {ERROR_DOMAIN}"
        )
    return True


@schemathesis.check
def no_internals_leak(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """No answer shows the gRPC plumbing behind the gateway: `grpc-*` headers or a stack trace."""
    leaked = sorted(name for name in response.headers if name.lower().startswith("grpc-"))
    if leaked:
        raise AssertionError(f"The answer leaks gRPC headers: {', '.join(leaked)}")
    if b"Traceback (most recent call last)" in response.content:
        raise AssertionError("The answer carries a Python stack trace")
    return True


@schemathesis.check
def not_implemented_is_declared(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """A 501 is only ever the honest answer of an RPC not built yet: UNIMPLEMENTED, NOT_IMPLEMENTED.

    Which operations may answer it at all is the not_a_server_error check's per-operation config
    (tests/fuzz/gateway.py writes it from tests/fuzz/not_built.py).
    """
    if response.status_code != 501:
        return None
    body = _json_body(response)
    info = _error_info(body)
    code = body.get("code") if isinstance(body, dict) else None
    if code != GRPC_UNIMPLEMENTED or info is None or info.get("reason") != NOT_IMPLEMENTED_REASON:
        raise AssertionError(f"A 501 that is not UNIMPLEMENTED with reason {NOT_IMPLEMENTED_REASON}")
    return True
