"""Record ids: time-ordered UUIDs, made in Python by domain code and repositories alike (no SQL here)."""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Final

UUID_LENGTH: Final = 36


def uuid7() -> uuid.UUID:
    """A version-7 UUID (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits.

    Ids made this way sort by creation time, so new rows land at the right edge of the primary-key
    index instead of at random pages. Python gains `uuid.uuid7` only in 3.14.
    """
    unix_ms = time.time_ns() // 1_000_000
    value = (unix_ms & ((1 << 48) - 1)) << 80 | secrets.randbits(80)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 9562 variant
    return uuid.UUID(int=value)


def new_id() -> str:
    """A new primary-key value: a time-ordered UUID in its canonical 36-character text form."""
    return str(uuid7())
