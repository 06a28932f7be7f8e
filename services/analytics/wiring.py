"""What the analytics service hosts; the analytics issue replaces these contract-only registrations."""

from __future__ import annotations

from parley.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.common.db import Database
from services.common.server import ServiceRegistration, contract_only_services


def registrations(database: Database) -> list[ServiceRegistration]:
    return contract_only_services(analytics_pb2, analytics_pb2_grpc)
