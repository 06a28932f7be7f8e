"""Every port between processes authenticates its caller (issue 11, finding 2; ADR 14).

Real servers from the production factories on loopback: auth and billing on one service port (as
`parley up` hosts them, with the services process's certificate) and the edge server as `parley edge`
runs it, asking that auth about API keys. Each port is attacked as the probe did, and more: without
a client certificate, with another workload's certificate that the method does not name, with a
certificate from another CA, and with identity headers forged by a workload that is not the gateway.
The generated stubs and the real grpcurl binary both make the calls. The allowed callers are checked
to still work: the edge asking auth about a key, the gateway everywhere, the operator's grpcurl.
"""

from __future__ import annotations

import json
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from runtime.edge_wiring import serving_edge
from runtime.process import build_services, identity_for, registrations_of, start_services, stop_services
from services.auth.signing_keys import generate_kek
from services.common.context import ServiceContext
from services.common.db import Database
from services.common.identity import API_KEY_AUTH_METHOD, AUTH_METHOD_HEADER, encode_roles_header
from services.common.metrics import new_registry
from services.common.migrate import upgrade_async
from services.common.pki import CertificateSpec, Lifetimes, TlsFiles, ensure_pki, server_name
from services.common.ratelimit import load_rate_limit_config
from services.common.revocation import InMemoryRevocationList
from services.common.server import ServerDeps, create_server
from services.common.service_tls import TlsMaterial, server_name_options
from services.common.settings import load_settings
from services.common.telemetry import create_tracer_provider
from tests.support.gateway import grpcurl
from tests.support.pki import SERVICES, ServicePki, grpcurl_tls
from tests.support.rate_limits import generous_rate_limits
from tests.support.servers import rich_status, serving

pytestmark = pytest.mark.asyncio(loop_scope="module")

PASSWORD = "violet-harbour-lantern-42"
CHECK_API_KEY = "parley.auth.v1.AuthInternalService/CheckApiKey"
LIST_PLANS = "parley.billing.v1.BillingService/ListPlans"
EXT_AUTHZ_CHECK = "envoy.service.auth.v3.Authorization/Check"
SHOULD_RATE_LIMIT = "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
Call = Callable[[grpc.aio.Channel], Awaitable[Any]]


@dataclass
class Mesh:
    pki: ServicePki
    services_port: int
    edge_port: int
    registry: CollectorRegistry
    api_key: str
    user_id: str

    @property
    def services(self) -> str:
        return f"127.0.0.1:{self.services_port}"

    @property
    def edge(self) -> str:
        return f"127.0.0.1:{self.edge_port}"

    def handled(self, method: str) -> float:
        """How many calls of `method` the service pipeline saw, whatever their outcome."""
        service, name = method.split("/")
        return sum(
            self.registry.get_sample_value(
                "parley_rpc_server_handled_total",
                {"grpc_service": service, "grpc_method": name, "grpc_code": code.name},
            )
            or 0.0
            for code in grpc.StatusCode
        )


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory, service_pki: ServicePki) -> AsyncIterator[Mesh]:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('service-identity') / 'parley.db'}"
    await upgrade_async(url)
    settings = load_settings(
        database_url=url, grpc_port=0, metrics_port=0, auth_key_encryption_key=generate_kek()
    )
    database = Database(url)
    context = ServiceContext(settings, database, InMemoryRevocationList(), embedded=False)
    bundles = build_services(["auth", "billing"], context)
    await start_services(bundles)
    identity = identity_for(settings, bundles, context, service_pki.files(SERVICES))
    registry = new_registry()
    server, port = create_server(
        settings,
        ServerDeps(
            services=registrations_of(bundles),
            identity=identity.resolver,
            registry=registry,
            tracer_provider=create_tracer_provider(service="test", otlp_endpoint=None),
            tls=service_pki.files(SERVICES),
        ),
    )
    await server.start()
    try:
        async with serving_edge(
            settings,
            host="127.0.0.1",
            port=0,
            tls=service_pki.files("edge"),
            auth_target=f"127.0.0.1:{port}",
            rate_limits=load_rate_limit_config(generous_rate_limits()),
            revocations=None,
            registry=CollectorRegistry(),
        ) as edge_port:
            user_id, api_key = await _user_with_api_key(service_pki, f"127.0.0.1:{port}")
            yield Mesh(service_pki, port, edge_port, registry, api_key, user_id)
    finally:
        await server.stop()
        await stop_services(bundles)
        await identity.close()
        await database.dispose()


async def _user_with_api_key(pki: ServicePki, target: str) -> tuple[str, str]:
    """A user signs up and makes an API key, calling auth directly with their own token (as the
    operator's grpcurl may)."""
    email = f"mtls-{uuid.uuid4().hex[:10]}@example.com"
    async with pki.channel(target, as_="operator") as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        registered = await auth.Register(
            auth_pb2.RegisterRequest(email=email, password=PASSWORD, display_name="Mel")
        )
        login = await auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
        bearer = (("authorization", f"Bearer {login.tokens.access_token}"),)
        created = await auth.CreateApiKey(auth_pb2.CreateApiKeyRequest(name="probe"), metadata=bearer)
    return str(registered.user.id), str(created.secret)


# ---- the calls, one per port ---------------------------------------------------------------------


def check_api_key(secret: str, metadata: tuple[tuple[str, str], ...] = ()) -> Call:
    async def call(channel: grpc.aio.Channel) -> Any:
        stub = auth_pb2_grpc.AuthInternalServiceStub(channel)
        return await stub.CheckApiKey(
            auth_pb2.CheckApiKeyRequest(api_key=secret), metadata=metadata, timeout=5
        )

    return call


def list_plans(metadata: tuple[tuple[str, str], ...] = ()) -> Call:
    async def call(channel: grpc.aio.Channel) -> Any:
        stub = billing_pb2_grpc.BillingServiceStub(channel)
        return await stub.ListPlans(billing_pb2.ListPlansRequest(), metadata=metadata, timeout=5)

    return call


def ext_authz_check(metadata: tuple[tuple[str, str], ...] = ()) -> Call:
    async def call(channel: grpc.aio.Channel) -> Any:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        request = external_auth_pb2.CheckRequest()
        request.attributes.request.http.headers["x-api-key"] = "pk_unknown_" + "x" * 32
        return await stub.Check(request, metadata=metadata, timeout=5)

    return call


def should_rate_limit_with(metadata: tuple[tuple[str, str], ...]) -> Call:
    async def call(channel: grpc.aio.Channel) -> Any:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        return await stub.ShouldRateLimit(
            rls_pb2.RateLimitRequest(domain="parley"), metadata=metadata, timeout=5
        )

    return call


should_rate_limit = should_rate_limit_with(())


PORTS: dict[str, tuple[str, str, Call]] = {
    # name: (which server, the workload it is, a call of the attacked method)
    "auth internal RPC": ("services", "auth", check_api_key("pk_guess_" + "g" * 32)),
    "edge ext_authz": ("edge", "edge", ext_authz_check()),
    "edge rate limits": ("edge", "edge", should_rate_limit),
    "public service method": ("services", "billing", list_plans()),
}


def target_of(mesh: Mesh, server: str) -> str:
    return mesh.services if server == "services" else mesh.edge


def tls_channel(target: str, credentials: grpc.ChannelCredentials, server: str) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(target, credentials, options=server_name_options(server))


def assert_refused_by_handshake(error: grpc.aio.AioRpcError) -> None:
    # The TLS handshake failed: the call never became a call.
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error


def assert_caller_not_allowed(error: grpc.aio.AioRpcError, caller: str, method: str) -> None:
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
    info = rich_status(error)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("CALLER_NOT_ALLOWED", "parley.dev")
    assert dict(info.metadata) == {"caller": caller, "method": method}


# ---- no client certificate -----------------------------------------------------------------------


@pytest.mark.parametrize("port", list(PORTS))
async def test_a_caller_without_a_client_certificate_is_refused_at_the_handshake(
    mesh: Mesh, port: str
) -> None:
    server, workload, call = PORTS[port]
    target = target_of(mesh, server)
    seen_before = mesh.handled(CHECK_API_KEY) + mesh.handled(LIST_PLANS)
    ca_only = grpc.ssl_channel_credentials(root_certificates=mesh.pki.files("operator").ca_file.read_bytes())

    for channel in (grpc.aio.insecure_channel(target), tls_channel(target, ca_only, workload)):
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(channel)
        assert_refused_by_handshake(refused.value)
    # No byte of theirs reached a servicer, nor even the call pipeline.
    assert mesh.handled(CHECK_API_KEY) + mesh.handled(LIST_PLANS) == seen_before


async def test_grpcurl_without_credentials_is_refused_on_every_port(mesh: Mesh) -> None:
    ca_file = str(mesh.pki.files("operator").ca_file)
    for target, server in ((mesh.services, "auth"), (mesh.edge, "edge")):
        plaintext = await grpcurl("-plaintext", target, "list")
        no_certificate = await grpcurl("-cacert", ca_file, "-servername", server_name(server), target, "list")
        for refused in (plaintext, no_certificate):
            assert refused.returncode != 0, refused.stdout
            assert f'Failed to dial target host "{target}"' in refused.stderr

    probe = await grpcurl(
        "-plaintext", "-d", json.dumps({"api_key": mesh.api_key}), mesh.services, CHECK_API_KEY
    )
    assert probe.returncode != 0
    assert f'Failed to dial target host "{mesh.services}"' in probe.stderr
    assert mesh.user_id not in probe.stdout


# ---- another workload's certificate ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "callers"),
    [
        ("auth internal RPC", ["chat", "gateway", "operator", "billing"]),
        ("edge ext_authz", ["edge", "operator", "chat", "auth"]),
        ("edge rate limits", ["edge", "operator", "analytics"]),
        ("public service method", ["chat", "edge", "analytics", "auth"]),
    ],
)
async def test_a_workload_the_method_does_not_name_is_refused(
    mesh: Mesh, port: str, callers: list[str]
) -> None:
    server, workload, call = PORTS[port]
    method = {
        "auth internal RPC": CHECK_API_KEY,
        "edge ext_authz": EXT_AUTHZ_CHECK,
        "edge rate limits": SHOULD_RATE_LIMIT,
        "public service method": LIST_PLANS,
    }[port]
    for caller in callers:
        async with mesh.pki.channel(target_of(mesh, server), as_=caller, server=workload) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(channel)
        assert_caller_not_allowed(refused.value, caller, method)


async def test_grpcurl_with_another_workloads_certificate_is_refused(mesh: Mesh) -> None:
    as_chat = grpcurl_tls(mesh.pki.files("chat"), server="auth")
    result = await grpcurl(
        *as_chat, "-d", json.dumps({"api_key": mesh.api_key}), mesh.services, CHECK_API_KEY
    )

    assert result.returncode != 0
    assert "PermissionDenied" in result.stderr
    assert f"chat may not call {CHECK_API_KEY}" in result.stderr
    assert mesh.user_id not in result.stdout + result.stderr


# ---- a certificate from another CA ---------------------------------------------------------------


@pytest.mark.parametrize("port", list(PORTS))
async def test_a_certificate_from_another_ca_is_refused_at_the_handshake(
    mesh: Mesh, port: str, foreign_pki: ServicePki
) -> None:
    server, workload, call = PORTS[port]
    # The right names (the gateway may call everything) and the server's real CA trusted, but the
    # certificate is signed by a CA Parley never heard of.
    impostor = TlsMaterial.read(foreign_pki.files("gateway"))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=mesh.pki.files("gateway").ca_file.read_bytes(),
        private_key=impostor.key_pem,
        certificate_chain=impostor.cert_pem,
    )
    async with tls_channel(target_of(mesh, server), credentials, workload) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(channel)
    assert_refused_by_handshake(refused.value)


async def test_grpcurl_with_a_certificate_from_another_ca_is_refused(
    mesh: Mesh, foreign_pki: ServicePki
) -> None:
    impostor = foreign_pki.files("operator")
    flags = grpcurl_tls(
        TlsFiles(mesh.pki.files("operator").ca_file, impostor.cert_file, impostor.key_file), server="billing"
    )
    result = await grpcurl(*flags, "-d", "{}", mesh.services, LIST_PLANS)

    assert result.returncode != 0
    assert f'Failed to dial target host "{mesh.services}"' in result.stderr
    assert '"plans"' not in result.stdout


# ---- forged identity headers --------------------------------------------------------------------


ADMIN_HEADERS = (
    ("x-parley-user-id", "00000000-0000-7000-8000-000000000001"),
    ("x-parley-roles", encode_roles_header(["user", "admin"])),
)


@pytest.mark.parametrize("caller", ["operator", "edge", "chat"])
async def test_identity_headers_from_a_workload_that_is_not_the_gateway_are_refused(
    mesh: Mesh, caller: str
) -> None:
    """The probe's master-key attack: identity headers claiming an admin, sent straight to the port."""
    async with mesh.pki.channel(mesh.services, as_=caller) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await auth_pb2_grpc.AuthAdminServiceStub(channel).ListUsers(
                auth_pb2.ListUsersRequest(), metadata=ADMIN_HEADERS, timeout=5
            )
    if caller == "operator":
        # The operator may call public methods, never as someone else.
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = rich_status(refused.value)["ErrorInfo"]
        assert isinstance(info, error_details_pb2.ErrorInfo)
        assert (info.reason, dict(info.metadata)) == ("UNTRUSTED_IDENTITY", {"cause": "identity_headers"})
    else:
        assert_caller_not_allowed(refused.value, caller, "parley.auth.v1.AuthAdminService/ListUsers")


@pytest.mark.parametrize(
    ("port", "caller", "refusal"),
    [
        # The edge may ask auth about keys, never as a user it names itself.
        ("auth internal RPC", "edge", "UNTRUSTED_IDENTITY"),
        ("edge ext_authz", "edge", "CALLER_NOT_ALLOWED"),
        ("edge rate limits", "operator", "CALLER_NOT_ALLOWED"),
        ("public service method", "operator", "UNTRUSTED_IDENTITY"),
    ],
)
async def test_forged_identity_headers_are_refused_on_every_port(
    mesh: Mesh, port: str, caller: str, refusal: str
) -> None:
    server, workload, _ = PORTS[port]
    calls: dict[str, Call] = {
        "auth internal RPC": check_api_key(mesh.api_key, ADMIN_HEADERS),
        "edge ext_authz": ext_authz_check(ADMIN_HEADERS),
        "edge rate limits": should_rate_limit_with(ADMIN_HEADERS),
        "public service method": list_plans(ADMIN_HEADERS),
    }
    async with mesh.pki.channel(target_of(mesh, server), as_=caller, server=workload) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await calls[port](channel)
    info = rich_status(refused.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == refusal
    expected = (
        grpc.StatusCode.UNAUTHENTICATED
        if refusal == "UNTRUSTED_IDENTITY"
        else grpc.StatusCode.PERMISSION_DENIED
    )
    assert refused.value.code() == expected


async def test_the_edge_may_check_keys_but_not_claim_a_user(mesh: Mesh) -> None:
    async with mesh.pki.channel(mesh.services, as_="edge") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await auth_pb2_grpc.AuthInternalServiceStub(channel).CheckApiKey(
                auth_pb2.CheckApiKeyRequest(api_key=mesh.api_key), metadata=ADMIN_HEADERS, timeout=5
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = rich_status(refused.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "UNTRUSTED_IDENTITY"


async def test_forged_headers_do_not_open_the_edge_to_other_workloads(mesh: Mesh) -> None:
    async with mesh.pki.channel(mesh.edge, as_="chat", server="edge") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ext_authz_check(ADMIN_HEADERS)(channel)
    assert_caller_not_allowed(refused.value, "chat", EXT_AUTHZ_CHECK)


async def test_grpcurl_with_forged_identity_headers_is_refused(mesh: Mesh) -> None:
    as_operator = grpcurl_tls(mesh.pki.files("operator"), server="auth")
    headers = [flag for name, value in ADMIN_HEADERS for flag in ("-H", f"{name}: {value}")]
    result = await grpcurl(
        *as_operator, *headers, "-d", "{}", mesh.services, "parley.auth.v1.AuthAdminService/ListUsers"
    )

    assert result.returncode != 0
    assert "Unauthenticated" in result.stderr
    assert "Identity headers are accepted only from the gateway" in result.stderr


# ---- the allowed callers --------------------------------------------------------------------------


async def test_the_edge_checks_api_keys_with_auth(mesh: Mesh) -> None:
    async with mesh.pki.channel(mesh.services, as_="edge") as channel:
        reply = await check_api_key(mesh.api_key)(channel)
    assert reply.identity.user_id == mesh.user_id

    as_edge = grpcurl_tls(mesh.pki.files("edge"), server="auth")
    result = await grpcurl(
        *as_edge, "-d", json.dumps({"api_key": mesh.api_key}), mesh.services, CHECK_API_KEY
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["identity"]["userId"] == mesh.user_id


async def test_the_gateway_reaches_everything_it_routes_and_its_identity_headers_count(mesh: Mesh) -> None:
    async with mesh.pki.channel(mesh.services, as_="gateway") as channel:
        me = await auth_pb2_grpc.AuthServiceStub(channel).GetCurrentUser(
            auth_pb2.GetCurrentUserRequest(),
            # an API-key identity: one resting on a token would need the token's time claims too
            metadata=(("x-parley-user-id", mesh.user_id), (AUTH_METHOD_HEADER, API_KEY_AUTH_METHOD)),
            timeout=5,
        )
        assert me.user.id == mesh.user_id
        assert len((await list_plans()(channel)).plans) == 3
    async with mesh.pki.channel(mesh.edge, as_="gateway", server="edge") as channel:
        decision = await ext_authz_check()(channel)
        assert decision.WhichOneof("http_response") == "denied_response"  # an unknown key, answered
        limits = await should_rate_limit(channel)
        assert limits.overall_code == rls_pb2.RateLimitResponse.OK


async def test_the_operator_calls_public_methods_and_every_workload_asks_health(mesh: Mesh) -> None:
    async with mesh.pki.channel(mesh.services, as_="operator") as channel:
        assert len((await list_plans()(channel)).plans) == 3
    for caller in ("chat", "analytics", "operator", "edge"):
        for target, server in ((mesh.services, "auth"), (mesh.edge, "edge")):
            async with mesh.pki.channel(target, as_=caller, server=server) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

    listed = await grpcurl(*grpcurl_tls(mesh.pki.files("operator"), server="auth"), mesh.services, "list")
    assert listed.returncode == 0, listed.stderr
    assert "parley.auth.v1.AuthInternalService" in listed.stdout.split()


async def test_a_client_refuses_a_server_that_is_not_the_workload_it_meant(mesh: Mesh) -> None:
    """The edge sends API keys to auth only: a Parley server with another name is not auth."""
    async with mesh.pki.channel(mesh.edge, as_="edge", server="auth") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert_refused_by_handshake(refused.value)


# ---- rotation by file replacement -----------------------------------------------------------------


def served_certificate(target: str, client: TlsFiles, server: str) -> x509.Certificate:
    """The certificate a new TLS connection to `target` is answered with."""
    context = ssl.create_default_context(cafile=str(client.ca_file))
    context.load_cert_chain(client.cert_file, client.key_file)
    context.set_alpn_protocols(["h2"])
    host, port = target.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name(server)) as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_a_server_picks_up_a_replaced_certificate_on_new_connections(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    specs = [
        CertificateSpec(SERVICES, ("auth", "billing")),
        *(CertificateSpec(workload, (workload,)) for workload in ("gateway", "operator")),
    ]
    ensure_pki(directory, specs)
    rotating = ServicePki(directory)
    async with serving([], pki=rotating) as running:
        operator = rotating.files("operator")
        first = served_certificate(running.target, operator, "auth")
        health = health_pb2_grpc.HealthStub(running.channel_as("operator"))
        serving_status = health_pb2.HealthCheckResponse.SERVING
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == serving_status

        # What `parley up` (or cert-manager) does near the end of a certificate's life: new files,
        # renamed into place. A year's window makes today "near the end".
        ensure_pki(directory, specs, lifetimes=Lifetimes(leaf_renew_within=timedelta(days=365)))

        second = served_certificate(running.target, operator, "auth")
        assert second.serial_number != first.serial_number
        assert second.public_key() != first.public_key()
        # The connection made before the rotation carries on.
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == serving_status
