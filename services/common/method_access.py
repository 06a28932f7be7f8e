"""The access rules each RPC declares in its contract (`parley.common.v1.access`), by method path.

Read from the descriptors of the generated modules, so every process sees the rules its own code was
generated with: the services' caller check reads `callers`, the gateway's edge reads `sensitive`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from parley.common.v1 import access_pb2

DEFAULT_ACCESS: Final = access_pb2.MethodAccess()


def method_path(method: MethodDescriptor) -> str:
    """The gRPC path of a method: `/package.Service/Method`."""
    return f"/{method.containing_service.full_name}/{method.name}"


def access_of(method: MethodDescriptor) -> access_pb2.MethodAccess:
    """The method's declared access rules, or the defaults when it declares none."""
    options = method.GetOptions()
    if options.HasExtension(access_pb2.access):
        declared: access_pb2.MethodAccess = options.Extensions[access_pb2.access]
        return declared
    return DEFAULT_ACCESS


def access_by_path(services: Iterable[ServiceDescriptor]) -> dict[str, access_pb2.MethodAccess]:
    """Every method of `services` by gRPC path, with its access rules."""
    return {method_path(method): access_of(method) for service in services for method in service.methods}


def sensitive_paths(rules: Mapping[str, access_pb2.MethodAccess]) -> frozenset[str]:
    """The gRPC paths of the methods whose credential must be checked afresh on every call."""
    return frozenset(path for path, access in rules.items() if access.sensitive)
