"""The one declarative base every service's tables hang off, and the column types and mixins they share.

Conventions: table names are plural (`outbox_events`), every column is `Mapped[...]` with its
nullability in the type, ids are strings (time-ordered UUIDs), and times are timezone-aware UTC.
"""

from __future__ import annotations

import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Final

from sqlalchemy import DateTime, Dialect, MetaData, String, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# The default of the timestamp columns below.
from services.common.clock import utc_now

# Names for indexes and constraints, so migrations can refer to them by a name that is the same on
# every database (PostgreSQL and SQLite name unnamed constraints differently, or not at all).
NAMING_CONVENTION: Final[dict[str, str]] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

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


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, on every database.

    PostgreSQL keeps `timestamptz` natively. SQLite has no time type: the value is stored as naive
    UTC text (which sorts correctly) and the UTC zone is put back on the way out. Naive datetimes
    are refused, because guessing their zone is how times silently shift by hours.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r} given; use a timezone-aware one (e.g. utc_now())")
        in_utc = value.astimezone(UTC)
        return in_utc.replace(tzinfo=None) if dialect.name == "sqlite" else in_utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """The declarative base of every Parley table, in every service."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # A bare `Mapped[datetime]` gets the UTC-preserving type, so no model can forget it.
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class UuidPrimaryKey:
    """An `id` primary key holding a time-ordered UUID string, generated in Python at insert."""

    id: Mapped[str] = mapped_column(String(UUID_LENGTH), primary_key=True, default=new_id)


class Timestamps:
    """`created_at` and `updated_at`, set in Python (so they are readable right after a flush without
    another query, which async sessions cannot do lazily) and defaulted by the database as well, so
    rows written by plain SQL get them too."""

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utc_now, onupdate=utc_now, server_default=func.now()
    )
