"""Domain errors and their one mapping onto `google.rpc.Status`.

Domain code raises a `ParleyError` subclass with a stable UPPER_SNAKE reason. The error-mapping
interceptor turns it into a gRPC status whose `grpc-status-details-bin` trailer carries a
`google.rpc.Status` with `ErrorInfo`, optional `BadRequest` / `QuotaFailure`, and `RequestInfo`;
Envoy's transcoder renders the same Status as the JSON error body.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "parley.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One bad input field, in the shape of `google.rpc.BadRequest.FieldViolation`."""

    field: str
    description: str
    reason: str = "INVALID_FIELD"


@dataclass(frozen=True)
class QuotaViolation:
    """One exhausted quota, in the shape of `google.rpc.QuotaFailure.Violation`."""

    subject: str
    description: str


class ParleyError(Exception):
    """A failure the caller can act on; never carries a stack trace to the client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # None: every raise site must name a specific reason (no catch-all exists for that code).
    default_reason: str | None = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
        quota_violations: Iterable[QuotaViolation] = (),
    ) -> None:
        super().__init__(message)
        chosen = reason or self.default_reason
        if chosen is None:
            kind = type(self).__name__
            raise TypeError(f"{kind} needs an explicit reason from parley.common.v1.ErrorReason")
        self.message = message
        self.reason = chosen
        self.metadata = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        self.quota_violations = tuple(quota_violations)


class InvalidArgument(ParleyError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(ParleyError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(ParleyError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = None


class FailedPrecondition(ParleyError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = None


class Unauthenticated(ParleyError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(ParleyError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(ParleyError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = None


class Unavailable(ParleyError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "SERVICE_UNAVAILABLE"


class Unimplemented(ParleyError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "NOT_IMPLEMENTED"


class Internal(ParleyError):
    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(error: ParleyError, *, request_id: str | None = None) -> status_pb2.Status:
    """The `google.rpc.Status` a client receives for `error`."""
    status = status_pb2.Status(code=_numeric_code(error.code), message=error.message)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    status.details.append(_packed(info))
    if error.field_violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=violation.field, description=violation.description, reason=violation.reason
                )
                for violation in error.field_violations
            ]
        )
        status.details.append(_packed(bad_request))
    if error.quota_violations:
        quota = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
                for v in error.quota_violations
            ]
        )
        status.details.append(_packed(quota))
    if request_id:
        status.details.append(_packed(error_details_pb2.RequestInfo(request_id=request_id)))
    return status


def _numeric_code(code: grpc.StatusCode) -> int:
    numeric: int = code.value[0]
    return numeric


def trailing_metadata_for(status: status_pb2.Status) -> tuple[tuple[str, bytes | str], ...]:
    """Trailers that carry `status` the way grpc-status and Envoy's transcoder expect.

    An error that says when to retry (ErrorInfo metadata `retry_after_s`, e.g. ACCOUNT_LOCKED) also
    sends `retry-after`, which reaches JSON clients as the HTTP Retry-After header.
    """
    # grpcio-status' own encoding of the details trailer (`grpc-status-details-bin`).
    trailers: list[tuple[str, bytes | str]] = list(rpc_status.to_status(status).trailing_metadata)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            retry_after = info.metadata.get("retry_after_s", "")
            if retry_after.isdigit():
                trailers.append(("retry-after", retry_after))
    return tuple(trailers)


def details_of(status: status_pb2.Status) -> dict[str, object]:
    """Unpack a Status' details by type name; used by clients and tests to read errors."""
    found: dict[str, object] = {}
    for detail in status.details:
        for message_type in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.QuotaFailure,
            error_details_pb2.RequestInfo,
        ):
            if detail.Is(message_type.DESCRIPTOR):
                message = message_type()
                detail.Unpack(message)
                found[message_type.DESCRIPTOR.name] = message
    return found
