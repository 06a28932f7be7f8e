"""The gateway's edge server as a running unit: its rate limiter, its authorizer and the feed of
credential changes that keeps the authorizer's cache current, the server itself."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import grpc
from prometheus_client import CollectorRegistry

from gateway.authz import EdgeAuthorizer
from gateway.credential_feed import CredentialFeedFollower
from gateway.edge import EdgeServices, create_edge_server
from parley.auth.v1 import auth_pb2_grpc
from runtime.process import sensitive_methods
from services.common.contracts import descriptor_set_bytes
from services.common.credential_changes import FeedConfirmation
from services.common.identity import CachedJwksVerifier
from services.common.jwks_client import grpc_jwks_fetcher
from services.common.pki import TlsFiles
from services.common.ratelimit import RateLimitConfig, rate_limiter_for
from services.common.revocation import RevocationList
from services.common.service_tls import secure_channel_for
from services.common.settings import Settings
from services.common.token_rules import TokenRules


@dataclass
class EdgeWiring:
    """The edge server's dependencies and the connections to close when the gateway stops."""

    services: EdgeServices
    auth_channel: grpc.aio.Channel
    credential_feed: CredentialFeedFollower

    def start(self) -> None:
        """Start following auth's credential changes (until then nothing cached is used)."""
        self.credential_feed.start()

    async def close(self) -> None:
        await self.credential_feed.stop()
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
    this process's memory (one gateway: `parley up`); authentication checks, and the stream of
    credential changes that keeps their cache current, go to `auth_target`, over mTLS with the
    edge's certificate `tls`."""
    channel = secure_channel_for(auth_target, tls, server="auth")
    verifier = CachedJwksVerifier(
        grpc_jwks_fetcher(channel), rules=TokenRules.of(settings), revocations=revocations
    )
    # grpc.aio channels make async stubs; the generated stubs are typed for the sync flavour.
    stub = cast("auth_pb2_grpc.AuthInternalServiceAsyncStub", auth_pb2_grpc.AuthInternalServiceStub(channel))
    confirmation = FeedConfirmation()
    authorizer = EdgeAuthorizer(
        stub,
        verifier,
        confirmed_age_s=confirmation.age_s,
        sensitive_paths=sensitive_methods(),
        registry=registry,
    )
    feed = CredentialFeedFollower(stub, authorizer.decisions, confirmation, registry=registry)
    services = EdgeServices(
        rate_limits=rate_limits,
        limiter=rate_limiter_for(settings.redis_url),
        authorizer=authorizer,
        registry=registry,
    )
    return EdgeWiring(services=services, auth_channel=channel, credential_feed=feed)


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
        edge.start()
        try:
            yield bound_port
        finally:
            await server.stop(settings.shutdown_grace_s)
    finally:
        await edge.close()
