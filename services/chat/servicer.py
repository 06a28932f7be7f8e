"""ChatService v1 and v2 over gRPC: decode, call the domain, encode.

Both versions serve the same model catalog; v2's Model also lists the content part kinds a model
accepts. RPCs not overridden here answer UNIMPLEMENTED (NOT_IMPLEMENTED) until the chat issue.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import grpc

from parley.chat.v1 import chat_pb2, chat_pb2_grpc
from parley.chat.v2 import chat_pb2 as chat_v2_pb2
from parley.chat.v2 import chat_pb2_grpc as chat_v2_pb2_grpc
from parley.common.v1 import common_pb2
from services.common.http_cache import CATALOG_CACHE, send_cache_headers
from services.common.model_catalog import CONTENT_PART_KINDS, ChatModel, ModelCatalog, UnitPrice

# The catalog's part kind names and their v2 enum values: "image_url" -> CONTENT_PART_KIND_IMAGE_URL.
PART_KINDS_V2: Final[Mapping[str, chat_v2_pb2.ContentPartKind.ValueType]] = {
    kind: chat_v2_pb2.ContentPartKind.Value(f"CONTENT_PART_KIND_{kind.upper()}")
    for kind in CONTENT_PART_KINDS
}


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """The chat API v1, with plain-text messages."""

    def __init__(self, catalog: ModelCatalog) -> None:
        self._catalog = catalog

    async def ListModels(
        self, request: chat_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ListModelsResponse:
        page = await self._catalog.list_models(
            page_size=request.page_size, page_token=request.page_token, api_version="v1"
        )
        reply = chat_pb2.ListModelsResponse(
            models=[model_to_proto(model) for model in page.items], next_page_token=page.next_page_token
        )
        return await send_cache_headers(context, reply, CATALOG_CACHE)


class ChatServicerV2(chat_v2_pb2_grpc.ChatServiceServicer):
    """The chat API v2, whose messages are lists of typed content parts."""

    def __init__(self, catalog: ModelCatalog) -> None:
        self._catalog = catalog

    async def ListModels(
        self, request: chat_v2_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> chat_v2_pb2.ListModelsResponse:
        page = await self._catalog.list_models(
            page_size=request.page_size, page_token=request.page_token, api_version="v2"
        )
        reply = chat_v2_pb2.ListModelsResponse(
            models=[model_to_proto_v2(model) for model in page.items], next_page_token=page.next_page_token
        )
        return await send_cache_headers(context, reply, CATALOG_CACHE)


def unit_price_to_proto(price: UnitPrice) -> common_pb2.Money:
    return common_pb2.Money(
        currency_code=price.currency_code, amount_minor=price.amount_minor, minor_nanos=price.minor_nanos
    )


def model_to_proto(model: ChatModel) -> chat_pb2.Model:
    return chat_pb2.Model(
        id=model.id,
        display_name=model.display_name,
        provider=model.provider,
        context_window=model.context_window,
        max_output_tokens=model.max_output_tokens,
        input_price_per_1k_tokens=unit_price_to_proto(model.input_price_per_1k_tokens),
        output_price_per_1k_tokens=unit_price_to_proto(model.output_price_per_1k_tokens),
        allowed_plans=model.allowed_plans,
    )


def model_to_proto_v2(model: ChatModel) -> chat_v2_pb2.Model:
    return chat_v2_pb2.Model(
        id=model.id,
        display_name=model.display_name,
        provider=model.provider,
        context_window=model.context_window,
        max_output_tokens=model.max_output_tokens,
        input_price_per_1k_tokens=unit_price_to_proto(model.input_price_per_1k_tokens),
        output_price_per_1k_tokens=unit_price_to_proto(model.output_price_per_1k_tokens),
        allowed_plans=model.allowed_plans,
        accepted_part_kinds=[PART_KINDS_V2[kind] for kind in model.accepted_part_kinds],
    )
