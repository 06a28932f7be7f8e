"""Which workloads may call which method on a Parley server (ADR 14).

The caller is who the client certificate names (`services.common.service_tls.peer_workloads`). The
rules come from the contract (`parley.common.v1.access`, read by `services.common.method_access`):

- A method that names `callers` is served to those workloads only.
- A method that names none is served to the gateway, and to the operator (grpcurl) as a direct
  caller that proves a user with its own token: identity headers are believed from the gateway only.
- Health and reflection answer every workload with a certificate from the CA.

A refusal is PERMISSION_DENIED with reason CALLER_NOT_ALLOWED, naming the caller and the method.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from google.protobuf import descriptor_pool
from grpc_health.v1 import health

from services.common.errors import PermissionDenied
from services.common.method_access import access_by_path
from services.common.pki import GATEWAY, OPERATOR
from services.common.reflection import REFLECTION_SERVICES

# Operator tooling every authenticated workload may use (grpcurl, probes, Envoy's health checks).
OPEN_SERVICES: Final = frozenset({health.SERVICE_NAME, *REFLECTION_SERVICES})
# Who may call a method of a Parley service that names no callers.
DEFAULT_CALLERS: Final = frozenset({GATEWAY, OPERATOR})


def describe_workloads(workloads: frozenset[str]) -> str:
    """How a caller's workloads read in an error or a log line."""
    return ",".join(sorted(workloads)) or "none"


class CallerPolicy:
    """Decides per method whether a caller's workloads may call it; built once per server."""

    def __init__(
        self,
        rules: Mapping[str, frozenset[str]],
        *,
        default: frozenset[str],
        open_services: Iterable[str] = OPEN_SERVICES,
    ) -> None:
        self._rules = dict(rules)
        self._default = default
        self._open_prefixes = tuple(f"/{service}/" for service in open_services)

    @classmethod
    def from_contracts(
        cls, service_names: Iterable[str], *, pool: descriptor_pool.DescriptorPool | None = None
    ) -> CallerPolicy:
        """The rules the contracts declare for the methods of `service_names` (DEFAULT_CALLERS for
        methods that declare none)."""
        pool = pool or descriptor_pool.Default()
        services = [pool.FindServiceByName(name) for name in service_names if name not in OPEN_SERVICES]
        rules = {
            path: frozenset(access.callers) or DEFAULT_CALLERS
            for path, access in access_by_path(services).items()
        }
        return cls(rules, default=DEFAULT_CALLERS)

    def allowed_callers(self, method: str) -> frozenset[str] | None:
        """The workloads that may call `method` (`/pkg.Service/Method`); None when every one may."""
        if method.startswith(self._open_prefixes):
            return None
        return self._rules.get(method, self._default)

    def check(self, caller: frozenset[str], method: str) -> None:
        """Raise PermissionDenied (CALLER_NOT_ALLOWED) unless one of `caller`'s workloads may call."""
        allowed = self.allowed_callers(method)
        if caller and (allowed is None or not allowed.isdisjoint(caller)):
            return
        name = method.lstrip("/")
        raise PermissionDenied(
            f"{describe_workloads(caller)} may not call {name}.",
            reason="CALLER_NOT_ALLOWED",
            metadata={"caller": describe_workloads(caller), "method": name},
        )
