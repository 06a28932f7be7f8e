"""The one walk over the compiled descriptor set (`gen/parley/descriptor_set.binpb`), shared by the
Envoy config renderer, the OpenAPI generator and the edge server's reflection.

It decides which services are public (the internal-service rule), indexes every message, enum and
service with its source comments, and reads each method's `google.api.http` binding.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

from services.common.safe_methods import http_rule_verb, is_safe_http_rule

if TYPE_CHECKING:
    from google.protobuf.internal.extension_dict import _ExtensionFieldDescriptor

CommentIndex = Mapping[tuple[int, ...], str]
FieldProto = descriptor_pb2.FieldDescriptorProto

# Parley's own packages are `parley.<area>.<version>`. A service whose name ends with the suffix is
# internal: the gateway never routes it, documents it or reflects it.
PROTO_ROOT_PACKAGE: Final = "parley"
INTERNAL_SERVICE_SUFFIX: Final = "InternalService"
HTTP_BODY_TYPE: Final = "google.api.HttpBody"

# mypy sees google.api as untyped; typing the extension handle keeps `Extensions[...]` lookups typed
# as the option message they carry.
_HTTP_RULE_EXTENSION: Final = cast(
    "_ExtensionFieldDescriptor[descriptor_pb2.MethodOptions, http_pb2.HttpRule]", annotations_pb2.http
)

# Field numbers used in SourceCodeInfo location paths.
FILE_MESSAGE: Final = descriptor_pb2.FileDescriptorProto.MESSAGE_TYPE_FIELD_NUMBER
FILE_ENUM: Final = descriptor_pb2.FileDescriptorProto.ENUM_TYPE_FIELD_NUMBER
FILE_SERVICE: Final = descriptor_pb2.FileDescriptorProto.SERVICE_FIELD_NUMBER
MESSAGE_FIELD: Final = descriptor_pb2.DescriptorProto.FIELD_FIELD_NUMBER
MESSAGE_NESTED: Final = descriptor_pb2.DescriptorProto.NESTED_TYPE_FIELD_NUMBER
MESSAGE_ENUM: Final = descriptor_pb2.DescriptorProto.ENUM_TYPE_FIELD_NUMBER
MESSAGE_ONEOF: Final = descriptor_pb2.DescriptorProto.ONEOF_DECL_FIELD_NUMBER
ENUM_VALUE: Final = descriptor_pb2.EnumDescriptorProto.VALUE_FIELD_NUMBER
SERVICE_METHOD: Final = descriptor_pb2.ServiceDescriptorProto.METHOD_FIELD_NUMBER


def is_internal_service(full_name: str) -> bool:
    """A Parley service named as internal-only, e.g. `parley.billing.v1.BillingInternalService`."""
    return full_name.startswith(f"{PROTO_ROOT_PACKAGE}.") and full_name.endswith(INTERNAL_SERVICE_SUFFIX)


def is_public_service(full_name: str) -> bool:
    """A Parley service the gateway exposes: every one that is not internal."""
    return full_name.startswith(f"{PROTO_ROOT_PACKAGE}.") and not is_internal_service(full_name)


def read_descriptor_set(data: bytes) -> descriptor_pb2.FileDescriptorSet:
    descriptor_set = descriptor_pb2.FileDescriptorSet()
    descriptor_set.ParseFromString(data)
    return descriptor_set


# --- HTTP rules -----------------------------------------------------------------------------------


def http_rule(method: descriptor_pb2.MethodDescriptorProto) -> http_pb2.HttpRule | None:
    """The method's `google.api.http` option, if it has one."""
    if not method.options.HasExtension(_HTTP_RULE_EXTENSION):
        return None
    return method.options.Extensions[_HTTP_RULE_EXTENSION]


def http_bindings(rule: http_pb2.HttpRule) -> Iterator[http_pb2.HttpRule]:
    """The rule's own binding, then its additional ones."""
    yield rule
    # Bindings nest only one level deep by the google.api.http contract.
    yield from rule.additional_bindings


def binding_verb_and_path(binding: http_pb2.HttpRule) -> tuple[str, str]:
    """A binding's lower-case HTTP method and path template; ("", "") when it binds none."""
    verb = http_rule_verb(binding)
    if not verb:
        return "", ""
    path: str = binding.custom.path if binding.HasField("custom") else getattr(binding, verb.lower())
    return verb.lower(), path


# --- comments -------------------------------------------------------------------------------------


def _clean_comment(raw: str) -> str:
    lines = [line.removeprefix(" ").rstrip() for line in raw.strip("\n").split("\n")]
    # `buf:lint:ignore RULE` lines are instructions to the linter, not documentation.
    kept = [line for line in lines if not line.startswith("buf:lint:")]
    return "\n".join(kept).strip()


def _comments_by_path(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    comments: dict[tuple[int, ...], str] = {}
    for location in file.source_code_info.location:
        text = location.leading_comments or location.trailing_comments
        if text.strip():
            comments[tuple(location.path)] = _clean_comment(text)
    return comments


# --- the index ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Element:
    """A descriptor plus where its comments live in its file's SourceCodeInfo."""

    full_name: str
    location: tuple[int, ...]
    comments: CommentIndex

    def comment(self, *subpath: int) -> str:
        return self.comments.get((*self.location, *subpath), "")


@dataclass(frozen=True)
class MessageInfo(Element):
    """A message type (nested ones included) with its comments."""

    proto: descriptor_pb2.DescriptorProto

    def field_comment(self, index: int) -> str:
        return self.comment(MESSAGE_FIELD, index)


@dataclass(frozen=True)
class EnumInfo(Element):
    """An enum type with its comments."""

    proto: descriptor_pb2.EnumDescriptorProto


@dataclass(frozen=True)
class MethodInfo:
    """One RPC, with the HTTP binding its `google.api.http` rule gives it."""

    name: str
    # Its position in the service, for its comment and its descriptor.
    index: int
    proto: descriptor_pb2.MethodDescriptorProto
    rule: http_pb2.HttpRule | None
    streaming: bool
    # Lower-case HTTP verb of the primary binding ("get", "post", ...), "" without a rule.
    http_verb: str
    # Every path the method answers on (primary binding first), e.g. "/v1/conversations/{id}".
    http_paths: tuple[str, ...]
    # The request is google.api.HttpBody, or its HTTP body field is: the body reaches the service byte
    # for byte, any media type.
    raw_body: bool = False

    @property
    def is_read(self) -> bool:
        """Safe, hence idempotent (`services.common.safe_methods`): the only calls the gateway may
        retry after they may have reached the service."""
        return is_safe_http_rule(self.rule)


@dataclass(frozen=True)
class ServiceInfo(Element):
    """A service with its comments and its methods."""

    package: str
    proto: descriptor_pb2.ServiceDescriptorProto
    methods: tuple[MethodInfo, ...]

    @property
    def name(self) -> str:
        return self.proto.name

    @property
    def version(self) -> str:
        """The API version of its package: "v1" for `parley.chat.v1`."""
        return self.package.rsplit(".", 1)[-1]

    @property
    def area(self) -> str:
        """The part of Parley it belongs to, and so its upstream: "chat" for `parley.chat.v1`."""
        parts = self.package.split(".")
        return parts[1] if len(parts) > 1 else ""

    @property
    def is_public(self) -> bool:
        return is_public_service(self.full_name)

    @property
    def streaming_methods(self) -> tuple[str, ...]:
        return tuple(method.name for method in self.methods if method.streaming)


def qualify(scope: str, name: str) -> str:
    return f"{scope}.{name}" if scope else name


def type_full_name(type_name: str) -> str:
    """A field's or method's type name without the leading dot protoc writes."""
    return type_name.removeprefix(".")


class DescriptorIndex:
    """Every message, enum and service of a FileDescriptorSet, by fully-qualified name."""

    def __init__(self, file_set: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, MessageInfo] = {}
        self.enums: dict[str, EnumInfo] = {}
        self.services: list[ServiceInfo] = []
        files = [(file, _comments_by_path(file)) for file in file_set.file]
        for file, comments in files:
            for index, message in enumerate(file.message_type):
                self._add_message(message, file.package, (FILE_MESSAGE, index), comments)
            for index, enum in enumerate(file.enum_type):
                self._add_enum(enum, file.package, (FILE_ENUM, index), comments)
        # Services last: their methods look up request messages of any file.
        for file, comments in files:
            for index, service in enumerate(file.service):
                self.services.append(
                    ServiceInfo(
                        full_name=qualify(file.package, service.name),
                        location=(FILE_SERVICE, index),
                        comments=comments,
                        package=file.package,
                        proto=service,
                        methods=tuple(
                            self._method(method, number) for number, method in enumerate(service.method)
                        ),
                    )
                )

    @classmethod
    def from_bytes(cls, data: bytes) -> DescriptorIndex:
        return cls(read_descriptor_set(data))

    def public_services(self) -> list[ServiceInfo]:
        """The services the gateway routes, documents and reflects, in descriptor-set order."""
        return [service for service in self.services if service.is_public]

    def _add_message(
        self,
        proto: descriptor_pb2.DescriptorProto,
        scope: str,
        location: tuple[int, ...],
        comments: CommentIndex,
    ) -> None:
        full_name = qualify(scope, proto.name)
        self.messages[full_name] = MessageInfo(full_name, location, comments, proto)
        for index, nested in enumerate(proto.nested_type):
            self._add_message(nested, full_name, (*location, MESSAGE_NESTED, index), comments)
        for index, enum in enumerate(proto.enum_type):
            self._add_enum(enum, full_name, (*location, MESSAGE_ENUM, index), comments)

    def _add_enum(
        self,
        proto: descriptor_pb2.EnumDescriptorProto,
        scope: str,
        location: tuple[int, ...],
        comments: CommentIndex,
    ) -> None:
        full_name = qualify(scope, proto.name)
        self.enums[full_name] = EnumInfo(full_name, location, comments, proto)

    def _method(self, method: descriptor_pb2.MethodDescriptorProto, index: int) -> MethodInfo:
        rule = http_rule(method)
        verb = ""
        paths: tuple[str, ...] = ()
        if rule is not None:
            verb = binding_verb_and_path(rule)[0]
            paths = tuple(path for _, path in map(binding_verb_and_path, http_bindings(rule)) if path)
        return MethodInfo(
            name=method.name,
            index=index,
            proto=method,
            rule=rule,
            streaming=method.server_streaming or method.client_streaming,
            http_verb=verb,
            http_paths=paths,
            raw_body=self._takes_raw_body(method, rule),
        )

    def _takes_raw_body(
        self, method: descriptor_pb2.MethodDescriptorProto, rule: http_pb2.HttpRule | None
    ) -> bool:
        """The request is an HttpBody, or its HTTP body field is: the transcoder passes them as sent."""
        if type_full_name(method.input_type) == HTTP_BODY_TYPE:
            return True
        request = self.messages.get(type_full_name(method.input_type))
        if request is None or rule is None or not rule.body or rule.body == "*":
            return False
        return any(
            field.name == rule.body and type_full_name(field.type_name) == HTTP_BODY_TYPE
            for field in request.proto.field
        )

    def message(self, full_name: str) -> MessageInfo:
        try:
            return self.messages[full_name]
        except KeyError:
            raise ValueError(f"message {full_name} is not in the descriptor set") from None

    def enum(self, full_name: str) -> EnumInfo:
        try:
            return self.enums[full_name]
        except KeyError:
            raise ValueError(f"enum {full_name} is not in the descriptor set") from None

    def resolve_field(self, message: MessageInfo, field_path: str) -> tuple[MessageInfo, int]:
        """The message declaring the last field of a dotted path, and that field's index in it."""
        owner = message
        names = field_path.split(".")
        for depth, name in enumerate(names):
            index = next((i for i, f in enumerate(owner.proto.field) if f.name == name), None)
            if index is None:
                raise ValueError(f"{message.full_name} has no field {field_path!r}")
            if depth == len(names) - 1:
                return owner, index
            field = owner.proto.field[index]
            if field.type != FieldProto.TYPE_MESSAGE or field.label == FieldProto.LABEL_REPEATED:
                raise ValueError(f"{field_path!r} in {message.full_name} crosses a non-message field")
            owner = self.message(type_full_name(field.type_name))
        raise ValueError(f"empty field path in {message.full_name}")


def public_services(index: DescriptorIndex) -> list[ServiceInfo]:
    """The public services by full name: the order of the gateway's routes and transcoder list."""
    return sorted(index.public_services(), key=lambda service: service.full_name)
