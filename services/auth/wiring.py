"""What the auth service hosts; the auth issue replaces these contract-only registrations."""

from __future__ import annotations

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from services.common.db import Database
from services.common.server import ServiceRegistration, contract_only_services


def registrations(database: Database) -> list[ServiceRegistration]:
    return contract_only_services(auth_pb2, auth_pb2_grpc)
