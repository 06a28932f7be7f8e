"""Idempotency of billing's mutating RPCs on their client-chosen `request_id`.

A retry with the same request id and the same parameters returns what the first call produced
instead of acting twice; the same id with other parameters is REQUEST_ID_REUSED. The first call
claims the id inside its own unit of work, naming what it produces, so the claim commits with the
change or not at all: a call that was refused leaves its id free for the corrected retry.

Request ids are scoped to their caller (`IdempotencyKey.scope`), so two callers that happen to pick
the same id never see each other's outcome.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

from services.common.errors import AlreadyExists, FieldViolation

if TYPE_CHECKING:
    from services.billing.ports import BillingUnitOfWork

# The widths of `billing_idempotency_keys`; longer values are refused, not truncated.
REQUEST_ID_MAX_LENGTH: Final = 128
SCOPE_MAX_LENGTH: Final = 64
RESULT_KEY_MAX_LENGTH: Final = 64


@dataclass(frozen=True)
class IdempotencyKey:
    """A request id claimed by one call: which RPC, with which parameters, and what it produced."""

    scope: str
    request_id: str
    # The RPC, e.g. "CreatePlan": one id used for two different RPCs is a reuse too.
    operation: str
    # `fingerprint` of the request's parameters.
    fingerprint: str
    # What the first call produced (a plan id, a subscription id), for a retry to read back.
    result_key: str
    create_time: datetime

    def __post_init__(self) -> None:
        # PostgreSQL refuses an over-long value and SQLite stores it: refuse it on both alike.
        for name, value, limit in (
            ("scope", self.scope, SCOPE_MAX_LENGTH),
            ("request_id", self.request_id, REQUEST_ID_MAX_LENGTH),
            ("result_key", self.result_key, RESULT_KEY_MAX_LENGTH),
        ):
            if not 0 < len(value) <= limit:
                raise ValueError(f"an idempotency {name} is 1 to {limit} characters, not {len(value)}")


def fingerprint(*parameters: object) -> str:
    """A digest of a request's parameters (JSON-encodable values), equal for equal requests."""
    encoded = json.dumps(parameters, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode()).hexdigest()


def request_id_violations(request_id: str) -> list[FieldViolation]:
    """Why a request id cannot be stored; empty when it can (REQUIRED is checked before the RPC)."""
    if len(request_id) > REQUEST_ID_MAX_LENGTH:
        return [
            FieldViolation(
                "request_id", f"must be at most {REQUEST_ID_MAX_LENGTH} characters", "INVALID_ARGUMENT"
            )
        ]
    return []


async def claim_request_id(uow: BillingUnitOfWork, key: IdempotencyKey) -> str | None:
    """Claim the key's request id in `uow`: None when this call is the first (go on and act; the
    claim commits with the change), else the result key of the earlier call with the same
    parameters (replay it). REQUEST_ID_REUSED when the earlier call had other parameters."""
    earlier = await uow.idempotency_keys.claim(key)
    return None if earlier is None else _replay(earlier, key)


async def replayed_result(uow: BillingUnitOfWork, key: IdempotencyKey) -> str | None:
    """The result key of an earlier call that claimed the key's request id with the same parameters,
    without claiming it; None when no call has. For a call that must act outside its unit of work
    before it claims (a refund at the payment provider), so a retry of a finished call or a reused
    id stops here. REQUEST_ID_REUSED when the earlier call had other parameters."""
    earlier = await uow.idempotency_keys.find(key.scope, key.request_id)
    return None if earlier is None else _replay(earlier, key)


def _replay(earlier: IdempotencyKey, key: IdempotencyKey) -> str:
    if (earlier.operation, earlier.fingerprint) != (key.operation, key.fingerprint):
        raise AlreadyExists(
            "This request_id was used for another request; use a new one for a new request.",
            reason="REQUEST_ID_REUSED",
            field_violations=[
                FieldViolation("request_id", "already used with other parameters", "REQUEST_ID_REUSED")
            ],
        )
    return earlier.result_key
