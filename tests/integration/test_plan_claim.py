"""The plan claim follows billing, end to end in one process, on SQLite and PostgreSQL: the auth
service as `parley serve auth` builds it (its gRPC server and its consumer of `subscription.changed`,
run by the production `Consumer` on the in-process source that `parley up` feeds from the outbox
relay), a user signed in, billing's change delivered, and RefreshSession minting a token whose
verified `plan` claim is the new plan.

The test delivers the event billing writes for an upgrade; tests/e2e/test_plan_claim.py pays for a
real one through `parley up`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from parley.billing.v1 import billing_pb2
from parley.events.v1 import events_pb2
from runtime.process import build_services, registrations_of, start_services, stop_services
from runtime.workers import EMBEDDED_STREAM, member_name, subscription_consumer
from services.auth.signing_keys import generate_kek
from services.common.clock import utc_now
from services.common.consumers import Consumer, InProcessSource
from services.common.context import ServiceContext
from services.common.db import Database
from services.common.encoding import timestamp_to_proto
from services.common.identity import AUTH_METHOD_HEADER, CachedJwksVerifier
from services.common.revocation import InMemoryRevocationList
from services.common.settings import Settings, load_settings
from services.common.token_rules import TokenRules
from tests.support.pki import ServicePki
from tests.support.servers import serving

PASSWORD = "violet-harbour-lantern-42"
# Bounds every wait on the consumer; a correct one settles the event in milliseconds.
WAIT_S = 10.0


@dataclass
class Auth:
    stub: auth_pb2_grpc.AuthServiceStub
    source: InProcessSource
    verifier: CachedJwksVerifier

    async def plan_claim(self, access_token: str) -> str:
        """The `plan` of a token that passes every rule the other services apply."""
        return (await self.verifier.verify(access_token)).plan


@pytest.fixture
def settings() -> Settings:
    return load_settings(auth_key_encryption_key=generate_kek())


@pytest.fixture
async def auth(settings: Settings, database: Database, service_pki: ServicePki) -> AsyncIterator[Auth]:
    context = ServiceContext(settings, database, InMemoryRevocationList(), embedded=False)
    bundles = build_services(["auth"], context)
    [bundle] = bundles
    [subscription] = bundle.subscriptions
    # `parley serve auth` reads billing's stream as the group `auth`.
    assert (subscription.consumer, subscription.sources) == ("auth", ("billing",))
    assert bundle.jwks is not None
    source = InProcessSource(stream=EMBEDDED_STREAM, group=subscription.consumer, settle_timeout_s=WAIT_S)
    consumer: Consumer = subscription_consumer(subscription, source, database=database, member=member_name())
    stop = asyncio.Event()
    await start_services(bundles)
    try:
        async with serving(registrations_of(bundles), pki=service_pki) as running:
            consuming = asyncio.create_task(consumer.run(stop))
            try:
                yield Auth(
                    auth_pb2_grpc.AuthServiceStub(running.channel),
                    source,
                    CachedJwksVerifier(bundle.jwks, rules=TokenRules.of(settings)),
                )
            finally:
                stop.set()
                async with asyncio.timeout(WAIT_S):
                    await consuming
    finally:
        await stop_services(bundles)


def subscription_changed(user_id: str, plan_id: str) -> events_pb2.Event:
    """What billing writes when a user's subscription moves to `plan_id` now."""
    now = timestamp_to_proto(utc_now())
    return events_pb2.Event(
        id=str(uuid.uuid4()),
        type="subscription.changed",
        source="billing",
        subject=user_id,
        time=now,
        subscription_changed=events_pb2.SubscriptionChanged(
            subscription_id=str(uuid.uuid4()),
            user_id=user_id,
            kind=events_pb2.SUBSCRIPTION_CHANGE_KIND_UPGRADED,
            status=billing_pb2.SUBSCRIPTION_STATUS_ACTIVE,
            previous_plan_id="free",
            plan_id=plan_id,
            effective_time=now,
        ),
    )


async def test_the_next_refresh_carries_the_plan_billing_changed_to(auth: Auth) -> None:
    registered = await auth.stub.Register(
        auth_pb2.RegisterRequest(email="ada@example.com", password=PASSWORD, display_name="Ada")
    )
    user_id = registered.user.id
    login = await auth.stub.Login(auth_pb2.LoginRequest(email="ada@example.com", password=PASSWORD))
    assert await auth.plan_claim(login.tokens.access_token) == "free"

    # As `parley up`'s relay hands it over: returns once the group has acknowledged the event.
    async with asyncio.timeout(WAIT_S):
        await auth.source.deliver(subscription_changed(user_id, "pro"))
    assert await auth.source.pending_count() == 0
    assert not await auth.source.dead_letters()

    refreshed = await auth.stub.RefreshSession(
        auth_pb2.RefreshSessionRequest(refresh_token=login.tokens.refresh_token)
    )
    assert await auth.plan_claim(refreshed.tokens.access_token) == "pro"
    # The token issued before keeps its plan until it expires: the change refuses no token.
    assert await auth.plan_claim(login.tokens.access_token) == "free"
    current = await auth.stub.GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(),
        metadata=(("x-parley-user-id", user_id), (AUTH_METHOD_HEADER, "api_key")),
    )
    assert current.user.plan_id == "pro"
