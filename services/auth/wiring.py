"""What the auth service hosts; the auth issue replaces these contract-only registrations."""

from __future__ import annotations

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from services.common.context import ServiceBundle, ServiceContext
from services.common.server import contract_only_services


def build(context: ServiceContext) -> ServiceBundle:
    return ServiceBundle(registrations=contract_only_services(auth_pb2, auth_pb2_grpc))
