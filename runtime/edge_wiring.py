"""What the gateway's edge server needs, built from settings: its rate limiter and its authorizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import grpc
from prometheus_client import CollectorRegistry

from gateway.authz import EdgeAuthorizer
from gateway.edge import EdgeServices
from parley.auth.v1 import auth_pb2_grpc
from services.common.identity import CachedJwksVerifier
from services.common.jwks_client import grpc_jwks_fetcher
from services.common.ratelimit import RateLimitConfig, rate_limiter_for
from services.common.revocation import RevocationList
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
    rate_limits: RateLimitConfig,
    revocations: RevocationList | None,
    registry: CollectorRegistry,
) -> EdgeWiring:
    """Rate limits in Redis when PARLEY_REDIS_URL is set (exact across gateway replicas), else in
    this process's memory (one gateway: `parley up`); authentication checks go to `auth_target`."""
    channel = grpc.aio.insecure_channel(auth_target)
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
