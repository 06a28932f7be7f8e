"""Opaque secrets (refresh tokens, one-time email tokens, API key secrets): made random, stored hashed.

These secrets carry 256 bits of entropy, so a single SHA-256 is the right storage hash: unlike
passwords they cannot be guessed, and a fast hash keeps every lookup an indexed equality match.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SECRET_BYTES = 32


def new_secret(nbytes: int = SECRET_BYTES) -> str:
    """A URL-safe random secret (43 characters for the default 32 bytes)."""
    return secrets.token_urlsafe(nbytes)


def secret_hash(secret: str) -> str:
    """The hex SHA-256 stored in place of `secret`."""
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_hash: str) -> bool:
    """Whether `secret` hashes to `stored_hash`, compared in constant time."""
    return hmac.compare_digest(secret_hash(secret), stored_hash)
