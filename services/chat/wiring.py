"""What the chat service hosts: ChatService v1 and v2 side by side, over one model catalog."""

from __future__ import annotations

from parley.chat.v1 import chat_pb2, chat_pb2_grpc
from parley.chat.v2 import chat_pb2 as chat_v2_pb2
from parley.chat.v2 import chat_pb2_grpc as chat_v2_pb2_grpc
from services.chat.servicer import ChatServicer, ChatServicerV2
from services.common.context import ServiceBundle, ServiceContext
from services.common.model_catalog import ModelCatalog, load_model_catalog
from services.common.server import ServiceRegistration


def build(context: ServiceContext) -> ServiceBundle:
    """The chat services as every Parley process hosts them, over the shipped model catalog."""
    return build_bundle(context, catalog=load_model_catalog())


def build_bundle(context: ServiceContext, *, catalog: ModelCatalog) -> ServiceBundle:
    """`build` over any model catalog (tests serve a changed one)."""
    # The RPCs the servicers do not override yet answer UNIMPLEMENTED (see contract_only).
    v1 = ServiceRegistration(
        full_name=chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name,
        servicer=ChatServicer(catalog),  # type: ignore[abstract]
        add_to_server=chat_pb2_grpc.add_ChatServiceServicer_to_server,
    )
    v2 = ServiceRegistration(
        full_name=chat_v2_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name,
        servicer=ChatServicerV2(catalog),  # type: ignore[abstract]
        add_to_server=chat_v2_pb2_grpc.add_ChatServiceServicer_to_server,
    )
    return ServiceBundle(registrations=[v1, v2])
