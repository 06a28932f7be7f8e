"""What the analytics service hosts; the analytics issue replaces these contract-only registrations."""

from __future__ import annotations

from parley.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.common.context import ServiceBundle, ServiceContext
from services.common.server import contract_only_services


def build(context: ServiceContext) -> ServiceBundle:
    return ServiceBundle(registrations=contract_only_services(analytics_pb2, analytics_pb2_grpc))
