"""Envoy's global rate-limit service (`envoy.service.ratelimit.v3.RateLimitService`) on grpc.aio.

Envoy's rate-limit filter sends the descriptors of each request; every descriptor that a rule of
`envoy/ratelimits.yaml` matches becomes one limit of a single atomic decision
(`services.common.ratelimit`). The answer carries the IETF draft headers
(draft-ietf-httpapi-ratelimit-headers) on every decision with an enforced limit and, when the
request is refused, `Retry-After`, a `grpc-status-details-bin` for gRPC clients, and a JSON body
fragment that the gateway's local-reply template wraps into Parley's error shape.

When the limiter's store cannot answer, the call fails with UNAVAILABLE, and Envoy applies the
route's failure mode (`on_failure` in the data file).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import any_pb2, duration_pb2, json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.common.errors import to_status
from services.common.ratelimit import (
    LimitDecision,
    LimitRequest,
    RateLimitConfig,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitRule,
    binding_refusal,
    rate_limited_error,
    retry_after_seconds,
)

logger = logging.getLogger(__name__)

SERVICE_NAME: Final = "envoy.service.ratelimit.v3.RateLimitService"
TYPE_URL_PREFIX: Final = "type.googleapis.com/"

# The gateway's rate-limit filter gives up after its timeout (20 ms by default), so the interesting
# range is well below the RPC buckets of services.common.metrics.
DECISION_LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25)

_UNIT_SECONDS: Final = (
    (1.0, rls_pb2.RateLimitResponse.RateLimit.SECOND),
    (60.0, rls_pb2.RateLimitResponse.RateLimit.MINUTE),
    (3600.0, rls_pb2.RateLimitResponse.RateLimit.HOUR),
    (86400.0, rls_pb2.RateLimitResponse.RateLimit.DAY),
)


class RateLimitMetrics:
    """Decisions by limit and result, unmatched descriptors, store failures, decision latency."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "parley_ratelimit_decisions_total",
            "Limit verdicts, by limit and result (allowed, limited, shadow_limited).",
            ("limit", "result"),
            registry=registry,
        )
        self.unmatched = Counter(
            "parley_ratelimit_unmatched_total",
            "Descriptors no rate-limit rule matched; they are allowed.",
            registry=registry,
        )
        self.backend_errors = Counter(
            "parley_ratelimit_backend_errors_total",
            "Decisions that failed because the limiter's store did not answer.",
            registry=registry,
        )
        self.latency = Histogram(
            "parley_ratelimit_decision_seconds",
            "Time to answer one ShouldRateLimit call.",
            buckets=DECISION_LATENCY_BUCKETS,
            registry=registry,
        )


@dataclass(frozen=True)
class _Matched:
    index: int
    request: LimitRequest


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    """Answers Envoy's `ShouldRateLimit` from the rules in `config`, with decisions by `limiter`."""

    def __init__(self, config: RateLimitConfig, limiter: RateLimiter, metrics: RateLimitMetrics) -> None:
        self._config = config
        self._limiter = limiter
        self._metrics = metrics
        self._store_down = False

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        started = time.perf_counter()
        try:
            return await self._decide(request, context)
        finally:
            self._metrics.latency.observe(time.perf_counter() - started)

    async def _decide(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        matched = self._match(request)
        try:
            decisions = await self._limiter.acquire([item.request for item in matched])
        except RateLimiterUnavailable as error:
            self._metrics.backend_errors.inc()
            if not self._store_down:
                logger.warning("rate limits cannot be decided: %s", error.detail)
                self._store_down = True
            await context.abort(grpc.StatusCode.UNAVAILABLE, error.message)
            raise  # abort raises; this line only tells type checkers so.
        if self._store_down:
            logger.info("rate limits are decided again")
            self._store_down = False
        self._count(decisions)
        return build_response(len(request.descriptors), [item.index for item in matched], decisions)

    def _match(self, request: rls_pb2.RateLimitRequest) -> list[_Matched]:
        matched: list[_Matched] = []
        request_hits = request.hits_addend or 1
        for index, descriptor in enumerate(request.descriptors):
            found = self._config.match([(entry.key, entry.value) for entry in descriptor.entries])
            if found is None:
                self._metrics.unmatched.inc()
                continue
            rule, counter = found
            hits = descriptor.hits_addend.value if descriptor.HasField("hits_addend") else request_hits
            # More than the burst is refused whatever the count; clamping keeps a huge uint64 from
            # the wire out of the store's arithmetic.
            hits = min(hits or 1, rule.burst + 1)
            matched.append(_Matched(index, LimitRequest(counter, rule, hits=hits)))
        return matched

    def _count(self, decisions: Sequence[LimitDecision]) -> None:
        for decision in decisions:
            if decision.allowed:
                result = "allowed"
            elif decision.rule.shadow:
                result = "shadow_limited"
                logger.info(
                    "shadow limit %s would refuse a request",
                    decision.rule.name,
                    extra={"limit": decision.rule.name, "retry_after_s": decision.retry_after_s},
                )
            else:
                result = "limited"
            self._metrics.decisions.labels(limit=decision.rule.name, result=result).inc()


def add_rate_limit_service(
    server: grpc.aio.Server,
    config: RateLimitConfig,
    limiter: RateLimiter,
    *,
    registry: CollectorRegistry,
) -> RateLimitServicer:
    """Register the rate-limit service on `server`, with its metrics in `registry`."""
    servicer = RateLimitServicer(config, limiter, RateLimitMetrics(registry))
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(servicer, server)
    return servicer


# --- the answer ---------------------------------------------------------------------------------


def build_response(
    descriptor_count: int, matched_indexes: Sequence[int], decisions: Sequence[LimitDecision]
) -> rls_pb2.RateLimitResponse:
    """The response for `descriptor_count` descriptors, of which those at `matched_indexes` got
    `decisions` (in the same order); the others are allowed without a limit."""
    code = rls_pb2.RateLimitResponse
    statuses = [code.DescriptorStatus(code=code.OK) for _ in range(descriptor_count)]
    for index, decision in zip(matched_indexes, decisions, strict=True):
        statuses[index] = code.DescriptorStatus(
            code=code.OVER_LIMIT if decision.refuses else code.OK,
            current_limit=current_limit(decision.rule),
            limit_remaining=decision.remaining,
            duration_until_reset=_duration(decision.reset_after_s),
        )
    refusal = binding_refusal(decisions)
    response = code(overall_code=code.OK if refusal is None else code.OVER_LIMIT, statuses=statuses)
    response.response_headers_to_add.extend(
        base_pb2.HeaderValue(key=name, value=value) for name, value in rate_limit_headers(decisions)
    )
    if refusal is not None:
        status = refusal_status(decisions)
        # gRPC clients read the message from grpc-message, which Envoy's local reply sets to the
        # gateway's fixed sentence; the Status in the details must say the same (clients check).
        grpc_status = status_pb2.Status(
            code=status.code, message=RATE_LIMITED_GRPC_MESSAGE, details=status.details
        )
        response.response_headers_to_add.extend(
            [
                base_pb2.HeaderValue(key="retry-after", value=str(retry_after_seconds(refusal))),
                base_pb2.HeaderValue(
                    key="grpc-status-details-bin",
                    # gRPC readers accept padded and unpadded base64 and writers should send unpadded.
                    value=base64.b64encode(grpc_status.SerializeToString()).decode().rstrip("="),
                ),
            ]
        )
        response.raw_body = error_body_fragment(status)
    return response


def current_limit(rule: RateLimitRule) -> rls_pb2.RateLimitResponse.RateLimit:
    """The rule's sustained rate in Envoy's terms: requests per the shortest unit that counts whole
    requests (60 per 60 s is 60 per MINUTE; 3 per 900 s is 12 per HOUR)."""
    exact = [unit for seconds, unit in _UNIT_SECONDS if seconds == rule.per_s]
    if exact:
        return rls_pb2.RateLimitResponse.RateLimit(
            name=rule.name, requests_per_unit=rule.requests, unit=exact[0]
        )
    for seconds, unit in _UNIT_SECONDS:
        per_unit = rule.requests * seconds / rule.per_s
        if per_unit >= 1 and per_unit.is_integer():
            return rls_pb2.RateLimitResponse.RateLimit(
                name=rule.name, requests_per_unit=int(per_unit), unit=unit
            )
    seconds, unit = _UNIT_SECONDS[-1]
    return rls_pb2.RateLimitResponse.RateLimit(
        name=rule.name, requests_per_unit=max(1, int(rule.requests * seconds / rule.per_s)), unit=unit
    )


def rate_limit_headers(decisions: Sequence[LimitDecision]) -> list[tuple[str, str]]:
    """`RateLimit-Policy` and `RateLimit` (structured fields) for the most restrictive enforced
    limit: the refusing one to wait out longest, else the one with the fewest requests left."""
    enforced = [decision for decision in decisions if not decision.rule.shadow]
    if not enforced:
        return []
    shown = binding_refusal(enforced) or min(
        enforced, key=lambda decision: (decision.remaining, -decision.reset_after_s)
    )
    name = _sf_string(shown.rule.name)
    window = max(1, math.ceil(shown.rule.burst_window_s))
    return [
        ("ratelimit-policy", f"{name};q={shown.limit};w={window}"),
        ("ratelimit", f"{name};r={shown.remaining};t={math.ceil(shown.reset_after_s)}"),
    ]


# The grpc-message of every rate-limited gRPC call; the details name the limit and the retry time.
RATE_LIMITED_GRPC_MESSAGE = "Too many requests; the details say which limit and when to retry."


def refusal_status(decisions: Sequence[LimitDecision]) -> status_pb2.Status:
    """RESOURCE_EXHAUSTED with ErrorInfo (RATE_LIMITED), QuotaFailure and RetryInfo."""
    refusal = binding_refusal(decisions)
    assert refusal is not None, "only refused requests have a refusal status"
    status = to_status(rate_limited_error(decisions))
    status.details.add().Pack(
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=retry_after_seconds(refusal)))
    )
    return status


def error_body_fragment(status: status_pb2.Status) -> bytes:
    """`"message":…,"details":[…` — the middle of Parley's JSON error; the gateway's local-reply
    template adds `{"code":8,` before it and its RequestInfo and `]}` after it.

    Details use proto field names, as the transcoder renders the services' errors.
    """
    details = [_detail_json(detail) for detail in status.details]
    message = json.dumps(status.message, ensure_ascii=False)
    rendered = ",".join(json.dumps(detail, separators=(",", ":"), ensure_ascii=False) for detail in details)
    return f'"message":{message},"details":[{rendered}'.encode()


def _detail_json(packed: any_pb2.Any) -> dict[str, object]:
    for message_type in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.QuotaFailure,
        error_details_pb2.RetryInfo,
    ):
        if packed.Is(message_type.DESCRIPTOR):
            detail: Message = message_type()
            packed.Unpack(detail)
            body = json_format.MessageToDict(detail, preserving_proto_field_name=True)
            return {"@type": TYPE_URL_PREFIX + message_type.DESCRIPTOR.full_name, **body}
    raise ValueError(f"unexpected error detail {packed.type_url}")


def _sf_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMicroseconds(round(seconds * 1_000_000))
    return duration
