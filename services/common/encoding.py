"""Conversions between domain values and the shared protobuf types, used by every servicer."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from parley.common.v1 import common_pb2
from services.common.money import Money


def money_to_proto(money: Money) -> common_pb2.Money:
    return common_pb2.Money(currency_code=money.currency_code, amount_minor=money.amount_minor)


def money_from_proto(message: common_pb2.Money) -> Money:
    return Money(currency_code=message.currency_code, amount_minor=message.amount_minor)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp_to_proto(moment: datetime) -> Timestamp:
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    # Arithmetic on the timedelta rather than Timestamp.FromDatetime, which is several times slower
    # and runs for every time field of every reply.
    since_epoch = moment - _EPOCH
    return Timestamp(
        seconds=since_epoch.days * 86_400 + since_epoch.seconds, nanos=since_epoch.microseconds * 1000
    )
