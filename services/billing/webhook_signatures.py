"""Signing and verifying payment webhooks with Stripe's `Stripe-Signature` scheme.

The header reads `t=<unix seconds>,v1=<hex>[,v1=<hex>...]`, each v1 being
hex(HMAC-SHA256(secret, b"<t>." + raw body)). Other schemes (v0, or ones not invented yet) are
skipped, so a header carrying only them is refused for want of a v1. Several secrets are accepted
while one is rotated out: any v1 that matches any secret passes.

The signature is checked before the timestamp, so WEBHOOK_SIGNATURE_EXPIRED only ever describes a
delivery the provider really signed (a replay, or a clock far off); anything forged is
WEBHOOK_SIGNATURE_INVALID. Refusals carry a `cause` in their metadata and never echo a secret, an
expected signature or the header itself.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from services.common.errors import InvalidArgument

# gRPC metadata keys are lower case; the gateway forwards the HTTP header under this name.
SIGNATURE_HEADER: Final = "stripe-signature"
DEFAULT_TOLERANCE: Final = timedelta(minutes=5)
# Bounds on what a caller can make us parse and compare; real headers are about 150 characters.
MAX_HEADER_LENGTH: Final = 8 * 1024
MAX_SIGNATURES: Final = 10

# Eleven digits reach the year 5138, far beyond any real delivery yet short of datetime's year 9999.
_TIMESTAMP = re.compile(r"[0-9]{1,11}")
_V1_SIGNATURE = re.compile(r"[0-9a-fA-F]{64}")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class VerifiedSignature:
    """A webhook whose signature verified: when the provider signed it, and with which secret."""

    timestamp: datetime
    secret_index: int


@dataclass(frozen=True)
class _ParsedHeader:
    timestamp: str
    signatures: tuple[bytes, ...]


def sign(body: bytes, secret: str, *, at: datetime) -> str:
    """The `Stripe-Signature` value for `body` signed with `secret` at `at` (an aware datetime)."""
    _require_secrets([secret])
    timestamp = str(_unix_seconds(at))
    return f"t={timestamp},v1={_mac(secret, timestamp, body).hex()}"


def verify(
    body: bytes,
    header: str | None,
    secrets: Sequence[str],
    *,
    now: datetime,
    tolerance: timedelta = DEFAULT_TOLERANCE,
) -> VerifiedSignature:
    """Checks `header` against `body` and every one of `secrets`, and the timestamp against `now`.

    Raises InvalidArgument WEBHOOK_SIGNATURE_INVALID for a missing, malformed or oversized header or
    one with no matching v1, and WEBHOOK_SIGNATURE_EXPIRED for a genuine signature made more than
    `tolerance` before or after `now`. Raises ValueError when the caller is misconfigured: no secrets,
    an empty secret, a naive `now` or a negative tolerance (TypeError for one bare string of secrets).
    """
    _require_secrets(secrets)
    _require_aware(now)
    if tolerance < timedelta(0):
        raise ValueError("The webhook signature tolerance cannot be negative.")
    parsed = _parse(header)
    for index, secret in enumerate(secrets):
        expected = _mac(secret, parsed.timestamp, body)
        if any(hmac.compare_digest(expected, candidate) for candidate in parsed.signatures):
            signed_at = _EPOCH + timedelta(seconds=int(parsed.timestamp))
            if abs(now - signed_at) > tolerance:
                raise _expired(too_old=signed_at < now, tolerance=tolerance)
            return VerifiedSignature(timestamp=signed_at, secret_index=index)
    raise _invalid("No v1 signature in the Stripe-Signature header matches this body.", "no_match")


def _parse(header: str | None) -> _ParsedHeader:
    if not header:
        raise _invalid("The Stripe-Signature header is missing.", "missing")
    if len(header) > MAX_HEADER_LENGTH:
        raise _invalid(f"The Stripe-Signature header exceeds {MAX_HEADER_LENGTH} characters.", "too_long")
    timestamp: str | None = None
    signatures: list[bytes] = []
    for item in header.split(","):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not key or not value:
            raise _invalid("The Stripe-Signature header is not a list of key=value pairs.", "malformed")
        if key == "t":
            if timestamp is not None:
                raise _invalid("The Stripe-Signature header repeats its timestamp.", "duplicate_timestamp")
            if not _TIMESTAMP.fullmatch(value):
                raise _invalid("The Stripe-Signature timestamp is not a Unix time in seconds.", "malformed")
            timestamp = value
        elif key == "v1":
            if not _V1_SIGNATURE.fullmatch(value):
                raise _invalid("A Stripe-Signature v1 signature is not 64 hex digits.", "malformed")
            if len(signatures) == MAX_SIGNATURES:
                raise _invalid(
                    f"The Stripe-Signature header has more than {MAX_SIGNATURES} v1 signatures.",
                    "too_many_signatures",
                )
            signatures.append(bytes.fromhex(value))
    if timestamp is None:
        raise _invalid("The Stripe-Signature header has no timestamp (t=).", "no_timestamp")
    if not signatures:
        raise _invalid("The Stripe-Signature header has no v1 signature.", "no_signature")
    return _ParsedHeader(timestamp=timestamp, signatures=tuple(signatures))


def _mac(secret: str, timestamp: str, body: bytes) -> bytes:
    # The provider signs the timestamp exactly as it wrote it in the header, so it is never reformatted.
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).digest()


def _unix_seconds(moment: datetime) -> int:
    _require_aware(moment)
    seconds = (moment - _EPOCH) // timedelta(seconds=1)
    if seconds < 0:
        raise ValueError("Webhook signature times cannot precede the Unix epoch.")
    return seconds


def _require_aware(moment: datetime) -> None:
    if moment.utcoffset() is None:
        raise ValueError("Webhook signature times must be timezone-aware (UTC).")


def _require_secrets(secrets: Sequence[str]) -> None:
    # A bare string is a Sequence[str] too: its characters would each become a one-letter secret.
    if isinstance(secrets, str):
        raise TypeError("Webhook secrets are a sequence of strings, not one string.")
    if not secrets:
        raise ValueError("No webhook signing secret is configured.")
    if not all(secrets):
        raise ValueError("A webhook signing secret is empty.")


def _invalid(message: str, cause: str) -> InvalidArgument:
    return InvalidArgument(message, reason="WEBHOOK_SIGNATURE_INVALID", metadata={"cause": cause})


def _expired(*, too_old: bool, tolerance: timedelta) -> InvalidArgument:
    tolerance_s = int(tolerance.total_seconds())
    where = "older than" if too_old else "further in the future than"
    return InvalidArgument(
        f"The Stripe-Signature timestamp is {where} the {tolerance_s}-second tolerance.",
        reason="WEBHOOK_SIGNATURE_EXPIRED",
        metadata={"cause": "too_old" if too_old else "too_new", "tolerance_s": str(tolerance_s)},
    )
