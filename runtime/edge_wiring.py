"""The gateway's edge server as a running unit: its rate limiter, its authorizer, the server itself."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import grpc
from prometheus_client import CollectorRegistry

from gateway.authz import EdgeAuthorizer
from gateway.edge import EdgeServices, create_edge_server
from parley.auth.v1 import auth_pb2_grpc
from services.common.contracts import descriptor_set_bytes
from services.common.identity import CachedJwksVerifier
from services.common.jwks_client import grpc_jwks_fetcher
from services.common.pki import TlsFiles
from services.common.ratelimit import RateLimitConfig, rate_limiter_for
from services.common.revocation import RevocationList
from services.common.service_tls import secure_channel_for
from services.common.settings import Settings


@dataclass
class EdgeWiring:
    """The edge server's dependencies and the connections to close when the gateway stops."""

    services: EdgeServices
    auth_channel: grpc.aio.Channel

    async def close(self) -> None:
        await self.auth_channel.close()
        await self.services.limiter.aclose()


def build_edge_wiring(
    settings: Settings,
    *,
    auth_target: str,
    tls: TlsFiles,
    rate_limits: RateLimitConfig,
    revocations: RevocationList | None,
    registry: CollectorRegistry,
) -> EdgeWiring:
    """Rate limits in Redis when PARLEY_REDIS_URL is set (exact across gateway replicas), else in
    this process's memory (one gateway: `parley up`); authentication checks go to `auth_target`,
    over mTLS with the edge's certificate `tls`."""
    channel = secure_channel_for(auth_target, tls, server="auth")
    verifier = CachedJwksVerifier(
        grpc_jwks_fetcher(channel),
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        revocations=revocations,
    )
    # grpc.aio channels make async stubs; the generated stubs are typed for the sync flavour.
    stub = cast("auth_pb2_grpc.AuthInternalServiceAsyncStub", auth_pb2_grpc.AuthInternalServiceStub(channel))
    authorizer = EdgeAuthorizer(stub, verifier, registry=registry)
    services = EdgeServices(
        rate_limits=rate_limits,
        limiter=rate_limiter_for(settings.redis_url),
        authorizer=authorizer,
        registry=registry,
    )
    return EdgeWiring(services=services, auth_channel=channel)


@contextlib.asynccontextmanager
async def serving_edge(
    settings: Settings,
    *,
    host: str,
    port: int,
    tls: TlsFiles,
    auth_target: str,
    rate_limits: RateLimitConfig,
    revocations: RevocationList | None,
    registry: CollectorRegistry,
) -> AsyncIterator[int]:
    """The edge server, started on host:port (0: a free port, which is yielded), until the block ends;
    it listens and calls auth with the certificate `tls`.

    The one way every process runs it: `parley edge` (and `parley up`, which starts that as a child)
    and `parley gateway`.
    """
    edge = build_edge_wiring(
        settings,
        auth_target=auth_target,
        tls=tls,
        rate_limits=rate_limits,
        revocations=revocations,
        registry=registry,
    )
    try:
        server, bound_port = await create_edge_server(
            descriptor_set_bytes(), host=host, port=port, tls=tls, services_for_envoy=edge.services
        )
        try:
            yield bound_port
        finally:
            await server.stop(settings.shutdown_grace_s)
    finally:
        await edge.close()
