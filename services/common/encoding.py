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


def timestamp_to_proto(moment: datetime) -> Timestamp:
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    stamp = Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp
