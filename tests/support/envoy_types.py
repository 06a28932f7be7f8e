"""Type-check a rendered Envoy config against Envoy's own API messages (`envoy-data-plane`).

`Bootstrap.from_dict` alone is not strict enough: betterproto2 converts scalars with `int(...)` (so
`"80"` or `1.5` pass as a port), and it snake-cases every key first, which mangles real field names
such as `enforcing_consecutive_5xx` into ones that do not exist. So this walks the config itself,
with the generated classes' field metadata: every key must be a field of its message (by its proto
name, or its JSON name), every scalar must have its proto3 JSON type, an enum must name one of its
values, a oneof may be set once, and every `typed_config` must name a message type that exists (its
module is imported so that the type is known). Well-known types with their own JSON form (Duration,
Struct, ...) are parsed by their own classes.
"""

from __future__ import annotations

import base64
import importlib
import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Final, cast

import betterproto2
from betterproto2 import FieldMetadata
from pydantic.warnings import PydanticDeprecatedSince212

PACKAGE_PREFIX: Final = "envoy_data_plane"
TYPE_URL_PREFIX: Final = "type.googleapis.com/"
_INT_64_TYPES: Final = frozenset(betterproto2.INT_64_TYPES)
_WRAPPER_NAMES: Final = frozenset(
    f"{kind}Value"
    for kind in ("Bool", "Bytes", "Double", "Float", "Int32", "Int64", "String", "UInt32", "UInt64")
)


class EnvoyConfigTypeError(Exception):
    """The config does not type-check; the message names the key path and the problem."""


def bootstrap_from(config: Mapping[str, Any]) -> betterproto2.Message:
    """`config` (a rendered bootstrap, parsed from YAML) as an `envoy.config.bootstrap.v3.Bootstrap`."""
    bootstrap: type[betterproto2.Message] = _api("envoy.config.bootstrap.v3").Bootstrap
    return message_from(bootstrap, config, "")


def discovery_resources_from(document: Mapping[str, Any]) -> list[Any]:
    """The resources of an xDS file (a `DiscoveryResponse`'s `resources`, as SDS reads from a path),
    each checked as the message its `@type` names (a packed `google.protobuf.Any` each)."""
    resources = document.get("resources")
    if not isinstance(resources, list) or set(document) != {"resources"}:
        raise EnvoyConfigTypeError("<root>: an xDS file holds exactly a 'resources' list")
    return [_packed(resource, f"resources[{index}]") for index, resource in enumerate(resources)]


def _info(message_class: type[betterproto2.Message]) -> Any:
    """betterproto2's field metadata of a message class (typed loosely by the library)."""
    return cast("Any", message_class)._betterproto


def _api(package: str) -> ModuleType:
    """An envoy-data-plane module, imported on first use (the whole API takes seconds to import)."""
    with warnings.catch_warnings():
        # Its generated oneof checks use a validator form pydantic 2.12 deprecates; harmless here.
        warnings.filterwarnings("ignore", category=PydanticDeprecatedSince212)
        return importlib.import_module(f"{PACKAGE_PREFIX}.{package}")


def message_from(message_class: type[betterproto2.Message], data: object, where: str) -> betterproto2.Message:
    if not isinstance(data, Mapping):
        raise EnvoyConfigTypeError(f"{where or '<root>'}: a {message_class.__name__} must be a mapping")
    fields = _info(message_class).meta_by_field_name
    values: dict[str, Any] = {}
    oneofs: dict[str, str] = {}
    for key, value in data.items():
        name = key if key in fields else betterproto2.safe_snake_case(str(key))
        meta = fields.get(name)
        here = f"{where}.{key}" if where else str(key)
        if meta is None:
            raise EnvoyConfigTypeError(f"{here}: {message_class.__name__} has no field {key!r}")
        if meta.group is not None:
            if meta.group in oneofs:
                raise EnvoyConfigTypeError(
                    f"{here}: oneof {meta.group!r} is already set by {oneofs[meta.group]!r}"
                )
            oneofs[meta.group] = str(key)
        values[name] = _field_value(message_class, name, meta, value, here)
    return message_class(**values)


def _field_value(
    owner: type[betterproto2.Message], name: str, meta: FieldMetadata, value: object, where: str
) -> Any:
    field_class = _info(owner).cls_by_field[name]
    if meta.proto_type == betterproto2.TYPE_MAP:
        assert meta.map_meta is not None
        if not isinstance(value, Mapping):
            raise EnvoyConfigTypeError(f"{where}: must be a mapping")
        key_meta, value_meta = meta.map_meta
        value_class = _info(owner).cls_by_field[f"{name}.value"]
        return {
            _single(key_meta, type(None), key, f"{where} key"): _single(
                value_meta, value_class, item, f"{where}[{key!r}]"
            )
            for key, item in value.items()
        }
    if meta.repeated:
        if not isinstance(value, list):
            raise EnvoyConfigTypeError(f"{where}: must be a list")
        return [_single(meta, field_class, item, f"{where}[{index}]") for index, item in enumerate(value)]
    return _single(meta, field_class, value, where)


def _single(meta: FieldMetadata, field_class: type, value: object, where: str) -> Any:
    kind = meta.proto_type
    if kind == betterproto2.TYPE_MESSAGE:
        message_class = meta.unwrap() if meta.unwrap else field_class
        message = _message(message_class, value, where)
        return message.to_wrapped() if meta.unwrap else message  # type: ignore[attr-defined]
    if kind == betterproto2.TYPE_ENUM:
        names = {member.name for member in field_class}  # type: ignore[attr-defined]
        if isinstance(value, str) and value in names:
            return field_class[value]  # type: ignore[index]
        raise EnvoyConfigTypeError(f"{where}: {value!r} is not one of {sorted(names)}")
    if kind in betterproto2.ALL_INT_TYPES:
        # proto3 JSON writes 64-bit integers as strings; Envoy accepts both.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in _INT_64_TYPES and isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
        raise EnvoyConfigTypeError(f"{where}: {value!r} is not an integer ({kind})")
    if kind in (betterproto2.TYPE_FLOAT, betterproto2.TYPE_DOUBLE):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise EnvoyConfigTypeError(f"{where}: {value!r} is not a number")
    if kind == betterproto2.TYPE_BOOL:
        if isinstance(value, bool):
            return value
        raise EnvoyConfigTypeError(f"{where}: {value!r} is not true or false")
    if kind == betterproto2.TYPE_STRING:
        if isinstance(value, str):
            return value
        raise EnvoyConfigTypeError(f"{where}: {value!r} is not a string")
    if kind == betterproto2.TYPE_BYTES and isinstance(value, str):
        return base64.b64decode(value, validate=True)
    raise EnvoyConfigTypeError(f"{where}: cannot check a {kind} field")


def _message(message_class: type[betterproto2.Message], value: object, where: str) -> betterproto2.Message:
    module, name = message_class.__module__, message_class.__name__
    if module == f"{PACKAGE_PREFIX}.google.protobuf":
        if name == "Any":
            return _packed(value, where)
        if name in _WRAPPER_NAMES:
            # Written as {value: x} in our YAML; proto3 JSON also allows the bare value.
            return message_from(
                message_class, value if isinstance(value, Mapping) else {"value": value}, where
            )
        if "from_dict" in message_class.__dict__:
            # Duration ("1.5s"), Struct (any JSON), ...: their own JSON form, parsed by their class.
            try:
                return message_class.from_dict(value)
            except (TypeError, ValueError, KeyError) as error:
                raise EnvoyConfigTypeError(f"{where}: not a {name}: {error}") from None
    return message_from(message_class, value, where)


def _packed(value: object, where: str) -> betterproto2.Message:
    """A `typed_config`: the message its `@type` names, checked like any other, then packed."""
    if not isinstance(value, Mapping) or not isinstance(value.get("@type"), str):
        raise EnvoyConfigTypeError(f"{where}: a typed config needs an '@type'")
    type_url: str = value["@type"]
    message_class = _registered_type(type_url, where)
    fields = {key: item for key, item in value.items() if key != "@type"}
    message = _message(message_class, fields, where)
    packed: betterproto2.Message = _api("google.protobuf").Any(type_url=type_url, value=bytes(message))
    return packed


def _registered_type(type_url: str, where: str) -> type[betterproto2.Message]:
    pool = _api("message_pool").default_message_pool
    if type_url not in pool.url_to_type:
        package = type_url.removeprefix(TYPE_URL_PREFIX).rpartition(".")[0]
        try:
            _api(package)
        except ImportError:
            raise EnvoyConfigTypeError(f"{where}: no Envoy API package {package!r} ({type_url})") from None
    found: type[betterproto2.Message] | None = pool.url_to_type.get(type_url)
    if found is None:
        raise EnvoyConfigTypeError(f"{where}: no Envoy API message {type_url}")
    return found
