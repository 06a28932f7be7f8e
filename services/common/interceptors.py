"""The call pipeline every Parley server runs around each RPC, outermost step first:

1. Tracing: the OpenTelemetry gRPC instrumentation (added by `create_server`) when spans are
   recorded; otherwise the caller's W3C trace context is simply continued, so logs and outbox events
   keep the trace id without the cost of a span nobody reads.
2. Metrics: request id, RED metrics.
3. Caller and identity: the workload the peer's client certificate names must be allowed to call
   the method (`services.common.callers`, CALLER_NOT_ALLOWED); then the user: identity headers from
   the gateway's workload only, or a verified JWT (bearer or cookie, with CSRF).
4. Validation: the request bytes are decoded here, not by grpc (a malformed body is INVALID_ARGUMENT
   / MALFORMED_REQUEST like any other bad input, instead of grpc's UNKNOWN and an ERROR traceback),
   then checked against the contract's rules (services/common/validation.py).
5. Error mapping: domain errors become `google.rpc.Status` with `ErrorInfo`.

Steps 1 (when spans are not recorded) to 5 are one interceptor, `CallPipeline`, that wraps each
method's handler once and reuses the wrapper: a chain of one interceptor per step cost a handler
rebuild and an async context manager per step on every call, a large share of a small RPC's CPU.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import time
import uuid
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common.call_context import (
    current_identity,
    current_method,
    current_request_id,
    current_via_gateway,
)
from services.common.callers import CallerPolicy
from services.common.errors import (
    Internal,
    InvalidArgument,
    ParleyError,
    Unimplemented,
    to_status,
    trailing_metadata_for,
)
from services.common.identity import Identity, IdentityResolver
from services.common.metrics import RpcMetrics
from services.common.pki import GATEWAY
from services.common.required_fields import descriptor_of
from services.common.service_tls import peer_workloads
from services.common.validation import RequestValidator

logger = logging.getLogger(__name__)

Behavior = Callable[..., Any]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]

_TRACE_PROPAGATOR = TraceContextTextMapPropagator()


async def abort_with(context: grpc.aio.ServicerContext, error: ParleyError) -> None:
    """End the call with `error` as a rich status; raises grpc's AbortError."""
    status = to_status(error, request_id=current_request_id.get())
    await context.abort(error.code, error.message, trailing_metadata_for(status))


def split_method(full_method: str) -> tuple[str, str]:
    """'/pkg.Service/Method' -> ('pkg.Service', 'Method')."""
    _, service, method = full_method.split("/", 2) if full_method.count("/") >= 2 else ("", full_method, "")
    return service, method


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


def _code_name(code: object) -> str:
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        for candidate in grpc.StatusCode:
            if candidate.value[0] == code:
                return str(candidate.name)
    return "UNKNOWN"


def _metadata_of(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's text metadata by name; binary (`-bin`) values are skipped."""
    metadata: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if not isinstance(value, str):
            continue
        if key == "cookie" and key in metadata:
            # HTTP/2 lets a client split its cookies over several headers (RFC 9113 8.2.3).
            metadata[key] = f"{metadata[key]}; {value}"
        else:
            metadata[key] = value
    return metadata


class _Call:
    """What the pipeline does before and after one call's handler, whatever the handler's kind."""

    __slots__ = ("_code", "_context", "_metrics", "_started", "_trace_token")

    def __init__(self, metrics: _MethodMetrics, context: grpc.aio.ServicerContext) -> None:
        self._metrics = metrics
        self._context = context
        self._started = 0.0
        self._trace_token: contextvars.Token[Context] | None = None
        self._code: object = grpc.StatusCode.OK

    def begin(self, method: str, metadata: Mapping[str, str], *, continue_trace: bool) -> None:
        current_request_id.set(metadata.get("x-request-id") or str(uuid.uuid4()))
        current_method.set(method)
        if continue_trace and "traceparent" in metadata:
            self._trace_token = otel_context.attach(_TRACE_PROPAGATOR.extract(metadata))
        self._metrics.in_flight.inc()
        self._started = time.perf_counter()

    def succeeded(self) -> None:
        self._code = self._context.code() or grpc.StatusCode.OK

    def failed(self) -> None:
        self._code = self._context.code() or grpc.StatusCode.UNKNOWN

    def end(self) -> None:
        self._metrics.in_flight.dec()
        self._metrics.latency.observe(time.perf_counter() - self._started)
        self._metrics.handled(_code_name(self._code)).inc()
        if self._trace_token is not None:
            otel_context.detach(self._trace_token)


class _WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's handler once (`_wrap`) and reuses the wrapper for every later call."""

    def __init__(self) -> None:
        # method -> (the handler grpc gave us, our wrapper of it)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    @abstractmethod
    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler for `method` with this interceptor's steps around it (called once per method)."""


def authorized_caller(
    callers: CallerPolicy, context: grpc.aio.ServicerContext, method: str
) -> frozenset[str]:
    """The workloads of the call's peer, once `callers` allows them `method`; else CALLER_NOT_ALLOWED."""
    caller = peer_workloads(context)
    callers.check(caller, method)
    return caller


class CallPipeline(_WrappingInterceptor):
    """Metrics, caller and identity, validation and error mapping for every call (see the module
    docstring).

    `continue_trace`: attach the caller's `traceparent` as the current trace context; for servers
    that do not run the OpenTelemetry instrumentation, which does that itself.
    """

    def __init__(
        self,
        metrics: RpcMetrics,
        callers: CallerPolicy,
        resolver: IdentityResolver,
        validator: RequestValidator,
        *,
        continue_trace: bool,
    ) -> None:
        super().__init__()
        self._metrics = metrics
        self._callers = callers
        self._resolver = resolver
        self._validator = validator
        self._continue_trace = continue_trace

    async def _caller_and_identity(
        self, context: grpc.aio.ServicerContext, metadata: Mapping[str, str], method: str
    ) -> tuple[bool, Identity]:
        """Step 3: the peer's workload must be allowed `method`; then the user the call acts for
        (whether the peer is the gateway, whose identity headers alone are believed, and who)."""
        from_gateway = GATEWAY in authorized_caller(self._callers, context, method)
        return from_gateway, await self._resolver.resolve(metadata, method, from_gateway=from_gateway)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        metrics = _MethodMetrics(self._metrics, method)
        accept = self._acceptor(handler, method)

        async def prepare(context: grpc.aio.ServicerContext, call: _Call) -> None:
            metadata = _metadata_of(context)
            call.begin(method, metadata, continue_trace=self._continue_trace)
            try:
                from_gateway, identity = await self._caller_and_identity(context, metadata, method)
            except ParleyError as error:
                await abort_with(context, error)
                return
            current_identity.set(identity)
            current_via_gateway.set(from_gateway)

        def wrap_unary(behavior: Behavior) -> Behavior:
            async def wrapped(raw: Any, context: grpc.aio.ServicerContext) -> Any:
                call = _Call(metrics, context)
                try:
                    try:
                        await prepare(context, call)
                        request = accept(raw)
                        result = behavior(request, context)
                        response = await result if inspect.isawaitable(result) else result
                    except BaseException as error:
                        await self._map_error(error, method, context)
                        raise
                except BaseException:
                    call.failed()
                    raise
                else:
                    call.succeeded()
                    return response
                finally:
                    call.end()

            return wrapped

        def wrap_streaming(behavior: Behavior) -> Behavior:
            async def wrapped(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                call = _Call(metrics, context)
                try:
                    try:
                        await prepare(context, call)
                        async for item in _drive(behavior(accept(raw), context)):
                            yield item
                    except BaseException as error:
                        await self._map_error(error, method, context)
                        raise
                except BaseException:
                    call.failed()
                    raise
                else:
                    call.succeeded()
                finally:
                    call.end()

            return wrapped

        return _rebuild(handler, wrap_unary, wrap_streaming)

    def _acceptor(self, handler: grpc.RpcMethodHandler, method: str) -> Callable[[Any], Any]:
        """What the validation step does to the method's raw request (or request stream), built once.

        A request stream is decoded message by message as the servicer reads it (every servicer here
        iterates it; `context.read()` would see the raw bytes); only single requests are validated.
        """
        deserialize = handler.request_deserializer
        if deserialize is None or handler.request_streaming:
            return request_decoder(handler, method)
        message_class = _message_class(deserialize)
        decode = request_decoder(handler, method)
        if message_class is None:
            # Not a generated `FromString`: what it returns is checked by its type on each call.
            validator = self._validator

            def decode_and_check(raw: bytes) -> Any:
                request = decode(raw)
                if isinstance(request, Message):
                    validator.check(request)
                return request

            return decode_and_check
        validate = self._validator.check_for(descriptor_of(message_class))
        if validate is None:
            return decode

        def decode_and_validate(raw: bytes) -> Any:
            request = decode(raw)
            validate(request)
            return request

        return decode_and_validate

    @staticmethod
    async def _map_error(error: BaseException, method: str, context: grpc.aio.ServicerContext) -> None:
        """Turn domain errors, unimplemented methods and crashes into typed statuses, never
        tracebacks; returns (for the caller to re-raise) only what must travel as it is."""
        if isinstance(error, grpc.aio.AbortError | grpc.aio.UsageError) or not isinstance(error, Exception):
            return
        if isinstance(error, ParleyError):
            await abort_with(context, error)
        elif isinstance(error, NotImplementedError):
            await abort_with(
                context,
                Unimplemented(
                    f"{method.lstrip('/')} is part of the contract but not implemented yet.",
                    metadata={"method": method.lstrip("/")},
                ),
            )
        else:
            logger.exception("unhandled error in %s", method, exc_info=error)
            await abort_with(context, Internal("An internal error occurred; it has been logged."))


class CallerCheck(_WrappingInterceptor):
    """Step 3's caller check alone, for a server that hosts no Parley service: the edge, whose
    callers are Envoy (ext_authz, rate limits, spans) and, for health and reflection, any workload.
    It decodes the request itself too, so a malformed body is INVALID_ARGUMENT here as well."""

    def __init__(self, callers: CallerPolicy) -> None:
        super().__init__()
        self._callers = callers

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        callers = self._callers
        decode = request_decoder(handler, method)

        async def admitted(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            """The decoded request of an allowed caller; anyone else's call ends here."""
            try:
                authorized_caller(callers, context, method)
                return decode(raw)
            except ParleyError as error:
                await abort_with(context, error)  # raises grpc's AbortError
                raise

        def wrap_unary(behavior: Behavior) -> Behavior:
            async def wrapped(raw: Any, context: grpc.aio.ServicerContext) -> Any:
                result = behavior(await admitted(raw, context), context)
                return await result if inspect.isawaitable(result) else result

            return wrapped

        def wrap_streaming(behavior: Behavior) -> Behavior:
            async def wrapped(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for item in _drive(behavior(await admitted(raw, context), context)):
                    yield item

            return wrapped

        return _rebuild(handler, wrap_unary, wrap_streaming)


def request_decoder(handler: grpc.RpcMethodHandler, method: str) -> Callable[[Any], Any]:
    """What turns the method's raw request (or request stream) into messages, built once.

    A request stream is decoded message by message as the servicer reads it (every servicer here
    iterates it; `context.read()` would see the raw bytes).
    """
    deserialize = handler.request_deserializer
    if deserialize is None:
        return _unchanged
    message_class = _message_class(deserialize)
    message_name = descriptor_of(message_class).full_name if message_class is not None else "request"
    decode = _decoder(deserialize, message_name, method)
    if handler.request_streaming:
        return lambda requests: _decoded_stream(requests, decode)
    return decode


def _unchanged(request: Any) -> Any:
    return request


def _message_class(deserialize: Callable[[bytes], Any]) -> type[Message] | None:
    """The generated message class whose `FromString` `deserialize` is, if it is one."""
    owner = getattr(deserialize, "__self__", None)
    return owner if isinstance(owner, type) and issubclass(owner, Message) else None


def _decoder(deserialize: Callable[[bytes], Any], message_name: str, method: str) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError:
            # The client's fault, answered precisely: no traceback, nothing above DEBUG.
            logger.debug("malformed %s body (%d bytes) for %s", message_name, len(raw), method)
            raise InvalidArgument(
                f"The request body is not a valid {message_name} protobuf message.",
                reason="MALFORMED_REQUEST",
                metadata={"message_type": message_name},
            ) from None

    return decode


async def _decoded_stream(
    requests: AsyncIterator[bytes], decode: Callable[[bytes], Any]
) -> AsyncIterator[Any]:
    async for raw in requests:
        yield decode(raw)


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
    """The handler with wrapped behaviours; grpc hands them the raw request bytes, which the
    pipeline decodes itself (see `CallPipeline._acceptor`), and serializes responses as before."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary_response(handler.unary_unary),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_streaming_response(handler.unary_stream),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_unary_response(handler.stream_unary),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap_streaming_response(handler.stream_stream),
        request_deserializer=None,
        response_serializer=handler.response_serializer,
    )
