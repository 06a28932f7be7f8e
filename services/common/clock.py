"""The wall clock every service reads through (and tests replace by injecting their own)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


Clock = Callable[[], datetime]
"""What services take to read the time: `utc_now` in production, a controllable clock in tests."""
