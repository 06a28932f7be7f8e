"""The one declarative base every service's tables hang off, and the column types and mixins they share.

Conventions: table names are plural (`outbox_events`), every column is `Mapped[...]` with its
nullability in the type, ids are strings (time-ordered UUIDs), and times are timezone-aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar, Final

from sqlalchemy import DateTime, Dialect, MetaData, String, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# The default of the timestamp columns below.
from services.common.clock import utc_now
from services.common.ids import UUID_LENGTH, new_id

# Names for indexes and constraints, so migrations can refer to them by a name that is the same on
# every database (PostgreSQL and SQLite name unnamed constraints differently, or not at all).
NAMING_CONVENTION: Final[dict[str, str]] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


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
