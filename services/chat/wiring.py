"""What the chat service hosts; the chat issue replaces these contract-only registrations."""

from __future__ import annotations

from parley.chat.v1 import chat_pb2, chat_pb2_grpc
from services.common.context import ServiceBundle, ServiceContext
from services.common.server import contract_only_services


def build(context: ServiceContext) -> ServiceBundle:
    return ServiceBundle(registrations=contract_only_services(chat_pb2, chat_pb2_grpc))
