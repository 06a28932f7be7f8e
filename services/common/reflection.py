"""gRPC server reflection that resolves every symbol a client asks about, over v1 and v1alpha.

grpcio-reflection's servicer cannot resolve a method (`pkg.Service.Method`), so `grpcurl describe`
fails on methods (grpc/grpc#34743), and it serves only `grpc.reflection.v1alpha`, while newer
grpcurl, `buf curl` and grpcui ask for `grpc.reflection.v1` first. This one indexes, once per
server, every fully-qualified name of the files it describes: services, methods, messages (nested
too), fields, oneofs, enums, enum values and extensions.

Enum values are named as protobuf scopes them, as siblings of their enum (`pkg.PLAN_TIER_PRO`,
`pkg.Msg.VALUE` for a nested enum), and also under their enum (`pkg.PlanTier.PLAN_TIER_PRO`), the
name that clients built on jhump/protoreflect ask for.

Each stream sends a file's imports once, as grpc-go does: a client keeps what it received.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
REFLECTION_SERVICES: tuple[str, ...] = (REFLECTION_V1, REFLECTION_V1ALPHA)
REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"

# v1 is v1alpha under another package: same messages, same field numbers, so the same bytes on the
# wire. grpcio-reflection generates v1alpha's classes only; they encode and decode both versions.
Request: TypeAlias = reflection_pb2.ServerReflectionRequest
Response: TypeAlias = reflection_pb2.ServerReflectionResponse


class MissingDescriptorError(LookupError):
    """A service to describe, or a file one imports, is in neither the given files nor the pool."""


@dataclass(frozen=True)
class SymbolIndex:
    """Where every fully-qualified name, file and extension of a set of files is defined."""

    serialized_files: Mapping[str, bytes]
    imports: Mapping[str, tuple[str, ...]]
    file_of_symbol: Mapping[str, str]
    # extended message's full name -> extension field number -> the file declaring the extension
    file_of_extension: Mapping[str, Mapping[int, str]]
    message_names: frozenset[str]

    def file_with_imports(self, file_name: str, already_sent: set[str]) -> list[bytes]:
        """The file, then each of its transitive imports that this stream has not sent yet.

        The file asked for is always sent, even when sent before: it is the answer.
        """
        answer = [self.serialized_files[file_name]]
        already_sent.add(file_name)
        pending = deque(self.imports[file_name])
        while pending:
            name = pending.popleft()
            if name in already_sent:
                continue
            already_sent.add(name)
            answer.append(self.serialized_files[name])
            pending.extend(self.imports[name])
        return answer

    def extension_numbers(self, message_name: str) -> list[int] | None:
        """The extension numbers declared for a message (none: []), or None for an unknown message."""
        if message_name not in self.message_names:
            return None
        return sorted(self.file_of_extension.get(message_name, {}))


def index_files(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> SymbolIndex:
    """Index `files`, which must hold every file any of them imports; a name given twice keeps the first."""
    serialized: dict[str, bytes] = {}
    imports: dict[str, tuple[str, ...]] = {}
    symbols: dict[str, str] = {}
    extensions: dict[str, dict[int, str]] = {}
    messages: set[str] = set()
    for file in files:
        if file.name in serialized:
            continue
        serialized[file.name] = file.SerializeToString()
        imports[file.name] = tuple(file.dependency)
        for name in _symbols_of(file, messages):
            symbols.setdefault(name, file.name)
        for extension in _all_extensions(file):
            extensions.setdefault(extension.extendee.lstrip("."), {}).setdefault(extension.number, file.name)
    missing = sorted({name for deps in imports.values() for name in deps} - serialized.keys())
    if missing:
        raise MissingDescriptorError(
            f"reflection files import files that were not given: {', '.join(missing)}"
        )
    return SymbolIndex(
        serialized_files=serialized,
        imports=imports,
        file_of_symbol=symbols,
        file_of_extension=extensions,
        message_names=frozenset(messages),
    )


def _symbols_of(file: descriptor_pb2.FileDescriptorProto, messages: set[str]) -> Iterable[str]:
    scope = file.package
    for message in file.message_type:
        yield from _message_symbols(_qualify(scope, message.name), message, messages)
    for enum in file.enum_type:
        yield from _enum_symbols(scope, enum)
    for extension in file.extension:
        yield _qualify(scope, extension.name)
    for service in file.service:
        service_name = _qualify(scope, service.name)
        yield service_name
        for method in service.method:
            yield f"{service_name}.{method.name}"


def _message_symbols(
    full_name: str, message: descriptor_pb2.DescriptorProto, messages: set[str]
) -> Iterable[str]:
    messages.add(full_name)
    yield full_name
    for field in message.field:
        yield f"{full_name}.{field.name}"
    for oneof in message.oneof_decl:
        yield f"{full_name}.{oneof.name}"
    for extension in message.extension:
        yield f"{full_name}.{extension.name}"
    for nested in message.nested_type:
        yield from _message_symbols(f"{full_name}.{nested.name}", nested, messages)
    for enum in message.enum_type:
        yield from _enum_symbols(full_name, enum)


def _enum_symbols(scope: str, enum: descriptor_pb2.EnumDescriptorProto) -> Iterable[str]:
    enum_name = _qualify(scope, enum.name)
    yield enum_name
    for value in enum.value:
        yield _qualify(scope, value.name)
        yield f"{enum_name}.{value.name}"


def _all_extensions(
    file: descriptor_pb2.FileDescriptorProto,
) -> Iterable[descriptor_pb2.FieldDescriptorProto]:
    yield from file.extension
    pending = list(file.message_type)
    while pending:
        message = pending.pop()
        yield from message.extension
        pending.extend(message.nested_type)


def _qualify(scope: str, name: str) -> str:
    return f"{scope}.{name}" if scope else name


def reflection_v1_file() -> descriptor_pb2.FileDescriptorProto:
    """The schema of grpc.reflection.v1, derived from v1alpha's (grpcio-reflection ships v1alpha's only)."""
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    v1alpha_scope, v1_scope = f".{file.package}.", ".grpc.reflection.v1."
    file.name = REFLECTION_V1_FILE
    file.package = "grpc.reflection.v1"
    # Its language options name v1alpha's packages; v1's own are of no use to a reflection client.
    file.ClearField("options")
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(v1alpha_scope, v1_scope)
    for service in file.service:
        for method in service.method:
            method.input_type = method.input_type.replace(v1alpha_scope, v1_scope)
            method.output_type = method.output_type.replace(v1alpha_scope, v1_scope)
    return file


def described_files(
    service_names: Iterable[str],
    files: Iterable[descriptor_pb2.FileDescriptorProto] = (),
    pool: descriptor_pool.DescriptorPool | None = None,
) -> list[descriptor_pb2.FileDescriptorProto]:
    """`files`, v1's reflection schema, and what they lack: the file of each service they do not
    define and every file imported but not given, from `pool` (default: every generated module imported).

    A file named in `files` is never replaced by the pool's, so the gateway's public files, stripped
    of internal services, stay stripped.
    """
    if pool is None:
        pool = descriptor_pool.Default()
    described: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for file in (*files, reflection_v1_file()):
        described.setdefault(file.name, file)
    defined_services = {
        _qualify(file.package, service.name) for file in described.values() for service in file.service
    }
    wanted = [_pool_file_of_service(pool, name) for name in service_names if name not in defined_services]
    wanted.extend(name for file in described.values() for name in file.dependency)
    while wanted:
        name = wanted.pop()
        if name in described:
            continue
        described[name] = _pool_file(pool, name)
        wanted.extend(described[name].dependency)
    return list(described.values())


def _pool_file_of_service(pool: descriptor_pool.DescriptorPool, service: str) -> str:
    try:
        name: str = pool.FindServiceByName(service).file.name
    except KeyError:
        raise MissingDescriptorError(f"no descriptor for the service {service}") from None
    return name


def _pool_file(pool: descriptor_pool.DescriptorPool, name: str) -> descriptor_pb2.FileDescriptorProto:
    try:
        file = pool.FindFileByName(name)
    except KeyError:
        raise MissingDescriptorError(f"no descriptor for the imported file {name}") from None
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


class ReflectionServicer:
    """Answers `ServerReflectionInfo` streams, of either version, from one index."""

    def __init__(self, service_names: Iterable[str], index: SymbolIndex) -> None:
        self._services = reflection_pb2.ListServiceResponse(
            service=[reflection_pb2.ServiceResponse(name=name) for name in sorted(set(service_names))]
        )
        self._index = index

    async def ServerReflectionInfo(
        self, requests: AsyncIterable[Request], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Response]:
        already_sent: set[str] = set()
        async for request in requests:
            yield self.answer(request, already_sent)

    def answer(self, request: Request, already_sent: set[str]) -> Response:
        """The response to one request of a stream that has sent the files in `already_sent`."""
        response = Response(valid_host=request.host, original_request=request)
        index = self._index
        match request.WhichOneof("message_request"):
            case "list_services":
                response.list_services_response.CopyFrom(self._services)
            case "file_by_filename":
                file_name = request.file_by_filename
                self._send_file(response, file_name, already_sent, f"File not found: {file_name}")
            case "file_containing_symbol":
                symbol = request.file_containing_symbol
                self._send_file(
                    response, index.file_of_symbol.get(symbol), already_sent, f"Symbol not found: {symbol}"
                )
            case "file_containing_extension":
                wanted = request.file_containing_extension
                self._send_file(
                    response,
                    index.file_of_extension.get(wanted.containing_type, {}).get(wanted.extension_number),
                    already_sent,
                    f"Extension not found: number {wanted.extension_number} of {wanted.containing_type}",
                )
            case "all_extension_numbers_of_type":
                message_name = request.all_extension_numbers_of_type
                numbers = index.extension_numbers(message_name)
                if numbers is None:
                    _set_error(response, grpc.StatusCode.NOT_FOUND, f"Type not found: {message_name}")
                else:
                    response.all_extension_numbers_response.base_type_name = message_name
                    response.all_extension_numbers_response.extension_number.extend(numbers)
            case _:
                _set_error(
                    response,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "The request asks for nothing this server knows: set one of list_services, "
                    "file_by_filename, file_containing_symbol, file_containing_extension, "
                    "all_extension_numbers_of_type.",
                )
        return response

    def _send_file(
        self, response: Response, file_name: str | None, already_sent: set[str], not_found: str
    ) -> None:
        if file_name is None or file_name not in self._index.serialized_files:
            _set_error(response, grpc.StatusCode.NOT_FOUND, not_found)
            return
        response.file_descriptor_response.file_descriptor_proto.extend(
            self._index.file_with_imports(file_name, already_sent)
        )


def _set_error(response: Response, code: grpc.StatusCode, message: str) -> None:
    response.error_response.error_code = code.value[0]
    response.error_response.error_message = message


def add_reflection_service(
    server: grpc.aio.Server,
    service_names: Sequence[str],
    files: Iterable[descriptor_pb2.FileDescriptorProto] = (),
    pool: descriptor_pool.DescriptorPool | None = None,
) -> None:
    """Serve reflection, v1 and v1alpha, listing `service_names` and both reflection services.

    It describes `files` and every file a listed service needs (see `described_files`); the index is
    built here, once, so a request costs a few dictionary lookups.
    """
    listed = [*service_names, *REFLECTION_SERVICES]
    servicer = ReflectionServicer(listed, index_files(described_files(listed, files, pool)))
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=Request.FromString,
            response_serializer=Response.SerializeToString,
        )
    }
    for service in REFLECTION_SERVICES:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)
