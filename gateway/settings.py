"""The gateway's tunables: `envoy/gateway.yaml` (limits, timeouts, error mappings), as pydantic
models shaped like the file. Every section forbids unknown keys, so a typo is an error that names
the file, the key and the keys allowed there, before Envoy ever sees the config."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Final

from pydantic import AfterValidator, Field, field_validator, model_validator

from services.common.config_files import (
    ConfigFileError,
    ConfigSection,
    MethodKey,
    NonEmptyText,
    NonNegativeInt,
    Number,
    PositiveInt,
    load_yaml_model,
)

ENVOY_DIR: Final = Path(__file__).resolve().parent.parent / "envoy"
SETTINGS_FILE: Final = ENVOY_DIR / "gateway.yaml"

_UPPER_SNAKE: Final = re.compile(r"^[A-Z][A-Z0-9_]*$")

HeaderName = Annotated[NonEmptyText, AfterValidator(str.lower)]
Percent = Annotated[Number, Field(ge=0, le=100)]
UrlPath = Annotated[NonEmptyText, Field(pattern=r"^/")]
HttpErrorStatus = Annotated[PositiveInt, Field(ge=400, le=599)]


class GatewayConfigError(ConfigFileError):
    """The topology, settings or descriptor set cannot produce a valid gateway config."""


class Timeouts(ConfigSection):
    connect_ms: PositiveInt
    unary_s: PositiveInt
    stream_s: PositiveInt
    stream_idle_s: PositiveInt
    request_headers_s: PositiveInt
    downstream_idle_s: PositiveInt


class HealthCheck(ConfigSection):
    interval_ms: PositiveInt
    unhealthy_interval_ms: PositiveInt
    timeout_ms: PositiveInt
    unhealthy_threshold: PositiveInt
    healthy_threshold: PositiveInt
    healthy_panic_threshold_percent: Percent


class Healthz(ConfigSection):
    path: UrlPath
    not_serving_message: NonEmptyText


class Limits(ConfigSection):
    max_downstream_connections: PositiveInt
    max_request_headers_kb: PositiveInt
    max_concurrent_streams: PositiveInt
    upstream_max_connections: PositiveInt
    upstream_max_pending_requests: PositiveInt
    upstream_max_requests: PositiveInt
    upstream_max_retries: NonNegativeInt


class Retries(ConfigSection):
    # Envoy retry_on conditions, comma separated: for reads, and for writes.
    retry_on: NonEmptyText
    write_retry_on: NonEmptyText
    num_retries: NonNegativeInt


class OutlierDetection(ConfigSection):
    consecutive_gateway_failure: PositiveInt
    interval_ms: PositiveInt
    base_ejection_time_ms: PositiveInt
    max_ejection_percent: Annotated[NonNegativeInt, Field(le=100)]


class RoleRequirement(ConfigSection):
    """Every method of a service whose name ends with `service_suffix` needs `role`."""

    service_suffix: NonEmptyText
    role: NonEmptyText


class Authentication(ConfigSection):
    # The methods anyone may call.
    open_methods: frozenset[MethodKey]
    role_required: tuple[RoleRequirement, ...] = ()
    jwks_cache_duration_s: PositiveInt
    ext_authz_timeout_ms: PositiveInt
    ext_authz_headers: tuple[HeaderName, ...]


class RateLimiting(ConfigSection):
    timeout_ms: PositiveInt


class Cors(ConfigSection):
    allow_methods: NonEmptyText
    allow_headers: NonEmptyText
    expose_headers: NonEmptyText
    max_age_s: NonNegativeInt


def _utc(moment: datetime) -> datetime:
    """A timestamp from the file; one without a zone is UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


UtcDateTime = Annotated[datetime, AfterValidator(_utc)]


class Deprecation(ConfigSection):
    """A deprecated API package: when it was deprecated, when it goes away, and what replaces it."""

    successor: NonEmptyText
    deprecated_at: UtcDateTime
    sunset: UtcDateTime

    @model_validator(mode="after")
    def _sunset_after_deprecation(self) -> Deprecation:
        if self.sunset <= self.deprecated_at:
            raise ValueError("the sunset must come after the deprecation")
        return self


class ApiVersions(ConfigSection):
    header: NonEmptyText
    unversioned_prefix: UrlPath
    stable: tuple[NonEmptyText, ...]
    # Deprecated packages (`parley.chat.v1`) by name.
    deprecated: Mapping[str, Deprecation] = Field(default_factory=dict)


class Docs(ConfigSection):
    openapi_path: UrlPath
    page_path: UrlPath


class LocalReply(ConfigSection):
    """How one class of Envoy-generated error is rewritten into the Parley error shape: it matches one
    `status` or a `status_range` [low, high], and with `response_flag` only replies Envoy marked so."""

    status: HttpErrorStatus | None = None
    status_range: tuple[HttpErrorStatus, HttpErrorStatus] | None = None
    grpc_code: Annotated[NonNegativeInt, Field(le=16)]
    reason: NonEmptyText
    message: NonEmptyText
    # e.g. RLSE: the rate-limit service failed.
    response_flag: str = ""
    # ErrorInfo metadata; values may use Envoy substitutions such as %REQ(...)%.
    metadata: Mapping[str, str] = Field(default_factory=dict)

    @field_validator("reason")
    @classmethod
    def _upper_snake(cls, reason: str) -> str:
        if not _UPPER_SNAKE.match(reason):
            raise ValueError(f"{reason!r} is not an UPPER_SNAKE reason")
        return reason

    @model_validator(mode="after")
    def _one_status(self) -> LocalReply:
        if (self.status is None) == (self.status_range is None):
            raise ValueError("give either status or status_range")
        if self.status_range is not None and self.status_range[0] > self.status_range[1]:
            raise ValueError("status_range must be [low, high]")
        return self

    @property
    def status_low(self) -> int:
        return self.status if self.status is not None else self._range[0]

    @property
    def status_high(self) -> int:
        return self.status if self.status is not None else self._range[1]

    @property
    def _range(self) -> tuple[int, int]:
        assert self.status_range is not None
        return self.status_range


class GatewaySettings(ConfigSection):
    """The tunables from `envoy/gateway.yaml`; every value is data, not code."""

    timeouts: Timeouts
    health_check: HealthCheck
    healthz: Healthz
    limits: Limits
    retries: Retries
    outlier_detection: OutlierDetection
    # Proxies in front of Envoy whose X-Forwarded-For entry is trusted.
    xff_num_trusted_hops: NonNegativeInt
    # gRPC transport headers that must not leak to HTTP/1 and JSON clients.
    grpc_only_response_headers: tuple[HeaderName, ...]
    authentication: Authentication
    rate_limiting: RateLimiting
    # Response headers on every answer, in the file's order.
    security_headers: Mapping[NonEmptyText, NonEmptyText]
    strict_transport_security: NonEmptyText
    docs_content_security_policy: NonEmptyText
    cors: Cors
    api_versions: ApiVersions
    docs: Docs
    error_domain: NonEmptyText
    local_replies: tuple[LocalReply, ...]


def load_gateway_settings(path: Path | None = None) -> GatewaySettings:
    """Read the gateway tunables (None: the shipped `envoy/gateway.yaml`); a missing, mistyped or
    unknown key fails here, in one line, rather than inside Envoy."""
    return load_yaml_model(path or SETTINGS_FILE, GatewaySettings, GatewayConfigError)
