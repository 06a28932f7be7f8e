"""The one interceptor chain every Parley server runs, outermost first:

1. OpenTelemetry (opentelemetry-instrumentation-grpc), added by `create_server`.
2. `MetricsInterceptor`: request id, RED metrics.
3. `IdentityInterceptor`: gateway headers, or a verified JWT (bearer or cookie, with CSRF).
4. `ValidationInterceptor`: contract rules on the request message.
5. `ErrorMappingInterceptor`: domain errors become `google.rpc.Status` with `ErrorInfo`.

Each interceptor wraps the handler's behaviour; the four handler kinds share one wrapping helper.
"""

from __future__ import annotations

import abc
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
from google.protobuf.message import Message

from services.common.call_context import (
    current_identity,
    current_method,
    current_request_id,
    current_via_gateway,
)
from services.common.errors import Internal, ParleyError, Unimplemented, to_status, trailing_metadata_for
from services.common.identity import GATEWAY_SECRET_HEADER, IdentityResolver
from services.common.metrics import RpcMetrics
from services.common.validation import RequestValidator

logger = logging.getLogger(__name__)

Behavior = Callable[..., Any]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


async def abort_with(context: grpc.aio.ServicerContext, error: ParleyError) -> None:
    """End the call with `error` as a rich status; raises grpc's AbortError."""
    status = to_status(error, request_id=current_request_id.get())
    await context.abort(error.code, error.message, trailing_metadata_for(status))


def split_method(full_method: str) -> tuple[str, str]:
    """'/pkg.Service/Method' -> ('pkg.Service', 'Method')."""
    _, service, method = full_method.split("/", 2) if full_method.count("/") >= 2 else ("", full_method, "")
    return service, method


async def _drive(result: object) -> AsyncIterator[Any]:
    """Normalise a streaming behaviour's result: an async generator, or a coroutine using context.write."""
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result


def _rebuild(
    handler: grpc.RpcMethodHandler,
    wrap_unary_response: Callable[[Behavior], Behavior],
    wrap_streaming_response: Callable[[Behavior], Behavior],
) -> grpc.RpcMethodHandler:
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary_response(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_streaming_response(handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_unary_response(handler.stream_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap_streaming_response(handler.stream_stream),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ScopeInterceptor(grpc.aio.ServerInterceptor, abc.ABC):
    """Base for interceptors that run code around every call, whatever its kind.

    A subclass implements `scope` as an async context manager: code before its `yield` runs before
    the rest of the chain, an exception from the chain is raised at the `yield`, and for
    streaming responses the scope stays open until the stream ends.
    """

    @abc.abstractmethod
    def scope(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> AbstractAsyncContextManager[None]:
        """The context that wraps one call."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        request_streaming = bool(handler.request_streaming)

        def wrap_unary(behavior: Behavior) -> Behavior:
            async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with self.scope(method, None if request_streaming else request, context):
                    result = behavior(request, context)
                    return await result if inspect.isawaitable(result) else result

            return wrapped

        def wrap_streaming(behavior: Behavior) -> Behavior:
            async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with self.scope(method, None if request_streaming else request, context):
                    async for item in _drive(behavior(request, context)):
                        yield item

            return wrapped

        return _rebuild(handler, wrap_unary, wrap_streaming)


class _MethodMetrics:
    """One method's metric children, so a call does no label lookups (they take a lock each)."""

    __slots__ = ("_handled", "_name", "_requests", "_service", "in_flight", "latency")

    def __init__(self, metrics: RpcMetrics, method: str) -> None:
        self._service, self._name = split_method(method)
        self.in_flight = metrics.in_flight.labels(self._service, self._name)
        self.latency = metrics.latency.labels(self._service, self._name)
        self._requests = metrics.requests
        self._handled: dict[str, Any] = {}

    def handled(self, code_name: str) -> Any:
        child = self._handled.get(code_name)
        if child is None:
            child = self._handled[code_name] = self._requests.labels(self._service, self._name, code_name)
        return child


class MetricsInterceptor(ScopeInterceptor):
    """Assigns the request id and records rate, errors by code and latency per RPC."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics
        self._by_method: dict[str, _MethodMetrics] = {}

    def _for(self, method: str) -> _MethodMetrics:
        found = self._by_method.get(method)
        if found is None:
            found = self._by_method[method] = _MethodMetrics(self._metrics, method)
        return found

    @asynccontextmanager
    async def scope(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        metadata = dict(context.invocation_metadata() or ())
        current_request_id.set(str(metadata.get("x-request-id") or uuid.uuid4()))
        current_method.set(method)
        method_metrics = self._for(method)
        in_flight = method_metrics.in_flight
        in_flight.inc()
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
            code = context.code() or grpc.StatusCode.OK
        except BaseException:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            in_flight.dec()
            method_metrics.latency.observe(time.perf_counter() - started)
            method_metrics.handled(_code_name(code)).inc()


def _code_name(code: object) -> str:
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        for candidate in grpc.StatusCode:
            if candidate.value[0] == code:
                return str(candidate.name)
    return "UNKNOWN"


class IdentityInterceptor(ScopeInterceptor):
    """Establishes who is calling; a bad credential ends the call as UNAUTHENTICATED."""

    def __init__(self, resolver: IdentityResolver) -> None:
        self._resolver = resolver

    @asynccontextmanager
    async def scope(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        metadata: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            if not isinstance(value, str):
                continue
            if key == "cookie" and key in metadata:
                # HTTP/2 lets a client split its cookies over several headers (RFC 9113 8.2.3).
                metadata[key] = f"{metadata[key]}; {value}"
            else:
                metadata[key] = value
        try:
            identity = await self._resolver.resolve(metadata, method)
        except ParleyError as error:
            await abort_with(context, error)
            return
        current_identity.set(identity)
        # resolve() refuses a wrong secret, so a secret header still here is the gateway's.
        current_via_gateway.set(GATEWAY_SECRET_HEADER in metadata)
        yield


class ValidationInterceptor(ScopeInterceptor):
    """Refuses a request that breaks its contract before any domain code runs."""

    def __init__(self, validator: RequestValidator) -> None:
        self._validator = validator

    @asynccontextmanager
    async def scope(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        if isinstance(request, Message):
            try:
                self._validator.check(request)
            except ParleyError as error:
                await abort_with(context, error)
                return
        yield


class ErrorMappingInterceptor(ScopeInterceptor):
    """Turns domain errors, unimplemented methods and crashes into typed statuses, never tracebacks."""

    @asynccontextmanager
    async def scope(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        try:
            yield
        except ParleyError as error:
            await abort_with(context, error)
        except NotImplementedError:
            await abort_with(
                context,
                Unimplemented(
                    f"{method.lstrip('/')} is part of the contract but not implemented yet.",
                    metadata={"method": method.lstrip("/")},
                ),
            )
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception:
            logger.exception("unhandled error in %s", method)
            await abort_with(context, Internal("An internal error occurred; it has been logged."))
