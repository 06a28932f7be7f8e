"""Which HTTP operations answer 501 by design: the RPCs Parley has specified but not built yet.

The marker is in the code, not in a list: a service's wiring registers a servicer, and any RPC that
servicer does not override falls through to the generated base class, which the error-mapping
interceptor answers as UNIMPLEMENTED (HTTP 501) with reason NOT_IMPLEMENTED (`contract_only` in
services/common/server.py). So this module builds every service's real registrations, as `parley up`
does, and names the HTTP operations of the methods nobody overrode. When an issue builds an RPC, its
operation leaves this set by itself, and from then on a 501 from it fails the fuzz run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.descriptors import DescriptorIndex, http_bindings
from gateway.openapi import service_label
from runtime.process import build_services
from services.common.context import ServiceContext
from services.common.contracts import descriptor_set_bytes
from services.common.db import Database
from services.common.revocation import InMemoryRevocationList
from services.common.settings import ServiceName, Settings

SERVICE_NAMES: tuple[ServiceName, ...] = ("auth", "chat", "billing", "analytics")
# Generated grpc modules end so; a method defined there is the contract's placeholder, not an implementation.
GENERATED_STUB_SUFFIX = "_pb2_grpc"


def is_built(servicer: object, method_name: str) -> bool:
    """Whether the servicer's class, or a class of ours it inherits from, implements the method."""
    owner = next(cls for cls in type(servicer).__mro__ if method_name in vars(cls))
    return not owner.__module__.endswith(GENERATED_STUB_SUFFIX)


def registered_servicers(data_dir: Path) -> dict[str, Any]:
    """Service full name -> the servicer every Parley process registers for it, from each service's
    own wiring over an embedded context in `data_dir` (it writes only the embedded KEK there)."""
    settings = Settings(data_dir=data_dir)
    context = ServiceContext(
        settings=settings,
        # The engine is lazy: nothing connects while the wiring only constructs its parts.
        database=Database(f"sqlite+aiosqlite:///{data_dir / 'unused.db'}"),
        revocations=InMemoryRevocationList(),
        embedded=True,
    )
    return {
        registration.full_name: registration.servicer
        for bundle in build_services(SERVICE_NAMES, context)
        for registration in bundle.registrations
    }


def operation_ids(index: DescriptorIndex) -> Iterator[tuple[str, str, str]]:
    """(service full name, method name, OpenAPI operationId) for every HTTP binding of a public
    service, named as gateway/openapi.py names them: `<service label>_<method>`, then `_2`, `_3`, …
    for additional bindings."""
    for service in index.public_services():
        for method in service.methods:
            if method.rule is None:
                continue
            for number, _binding in enumerate(http_bindings(method.rule), start=1):
                suffix = "" if number == 1 else f"_{number}"
                yield service.full_name, method.name, f"{service_label(service)}_{method.name}{suffix}"


def not_built_operations(scratch_dir: Path | None = None) -> frozenset[str]:
    """The operationIds of every HTTP operation whose RPC is not built yet (it answers 501).

    The wiring runs in `scratch_dir` (a temporary directory when not given), which it may write to.
    """
    index = DescriptorIndex.from_bytes(descriptor_set_bytes())
    if scratch_dir is None:
        with tempfile.TemporaryDirectory(prefix="parley-wiring-") as scratch:
            servicers = registered_servicers(Path(scratch))
    else:
        servicers = registered_servicers(scratch_dir)
    missing = {service.full_name for service in index.public_services()} - servicers.keys()
    if missing:
        raise AssertionError(f"no wiring registers the public services {sorted(missing)}")
    return frozenset(
        operation_id
        for service_name, method_name, operation_id in operation_ids(index)
        if not is_built(servicers[service_name], method_name)
    )
