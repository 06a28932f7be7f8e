"""What the chat service hosts; the chat issue replaces these contract-only registrations."""

from __future__ import annotations

from parley.chat.v1 import chat_pb2, chat_pb2_grpc
from services.common.db import Database
from services.common.server import ServiceRegistration, contract_only_services


def registrations(database: Database) -> list[ServiceRegistration]:
    return contract_only_services(chat_pb2, chat_pb2_grpc)
