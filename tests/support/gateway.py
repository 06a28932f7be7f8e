"""Run the real gateway (Envoy child + edge gRPC server) on free ports, for e2e tests.

Everything here is asynchronous and must run on the event loop that serves the gRPC servers, so a
test module using it runs its fixtures and tests on one loop, e.g.:

    pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]

    @pytest_asyncio.fixture(loop_scope="module", scope="module")
    async def gateway(service_pki: ServicePki) -> AsyncIterator[RunningGateway]:
        upstream = await start_health_upstream(public_service_names(), pki=service_pki)
        topology = embedded_test_topology(upstream.port, pki=service_pki)
        async with running_gateway(topology, pki=service_pki) as gateway:
            yield gateway
        await upstream.stop()

Every hop is mTLS with the session's PKI, as in production: Envoy presents the gateway's
certificate, the edge server the edge's, the stand-in upstream the services process's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from gateway.descriptors import DescriptorIndex, is_internal_service, public_services
from gateway.edge import create_edge_server
from gateway.envoy_process import EnvoyProcess
from gateway.settings import GatewaySettings, load_gateway_settings
from gateway.topology import Topology, embedded_topology
from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from parley.common.v1 import common_pb2
from runtime.edge_wiring import build_edge_wiring
from services.common.credential_changes import HEARTBEAT_INTERVAL_S
from services.common.pki import EDGE, GATEWAY
from services.common.ratelimit import load_rate_limit_config
from services.common.revocation import RevocationList
from services.common.service_tls import server_credentials
from services.common.settings import Settings
from tests.support.pki import SERVICES, ServicePki
from tests.support.polling import eventually
from tests.support.rate_limits import generous_rate_limits

REPO_ROOT = Path(__file__).resolve().parents[2]
DESCRIPTOR_SET_PATH = REPO_ROOT / "gen" / "parley" / "descriptor_set.binpb"
GRPCURL = Path(sys.executable).parent / "grpcurl"


_HANDED_OUT_PORTS: set[int] = set()


def free_port() -> int:
    """A port that was free a moment ago and that this test process has not handed out before.

    The OS may offer the same ephemeral port twice in a row once the probe socket is closed; a
    test that asks for several ports at once must not get duplicates.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port not in _HANDED_OUT_PORTS:
            _HANDED_OUT_PORTS.add(port)
            return port


def public_service_names(descriptor_set_path: Path = DESCRIPTOR_SET_PATH) -> list[str]:
    index = DescriptorIndex.from_bytes(descriptor_set_path.read_bytes())
    return [service.full_name for service in public_services(index)]


def internal_service_names(descriptor_set_path: Path = DESCRIPTOR_SET_PATH) -> list[str]:
    index = DescriptorIndex.from_bytes(descriptor_set_path.read_bytes())
    return sorted(service.full_name for service in index.services if is_internal_service(service.full_name))


def fast_settings(*, unary_timeout_s: int | None = None) -> GatewaySettings:
    """Production settings with health checks fast enough for a test to watch a status change (and,
    when given, a shorter unary deadline)."""
    settings = load_gateway_settings()
    fast_checks = settings.health_check.model_copy(
        update={"interval_ms": 200, "unhealthy_interval_ms": 200, "timeout_ms": 500}
    )
    timeouts = settings.timeouts
    if unary_timeout_s is not None:
        timeouts = timeouts.model_copy(update={"unary_s": unary_timeout_s})
    return settings.model_copy(update={"health_check": fast_checks, "timeouts": timeouts})


def embedded_test_topology(
    grpc_port: int,
    *,
    pki: ServicePki,
    descriptor_set_path: Path = DESCRIPTOR_SET_PATH,
    settings: GatewaySettings | None = None,
    max_request_bytes: int | None = None,
) -> Topology:
    """The embedded topology on free ports, every upstream at `grpc_port` on loopback; Envoy presents
    the gateway's certificate of `pki`."""
    topology = embedded_topology(
        grpc_port=grpc_port,
        edge_port=free_port(),
        http_port=free_port(),
        admin_port=free_port(),
        gateway_tls=pki.files(GATEWAY),
        descriptor_set_path=descriptor_set_path,
        settings=settings or fast_settings(),
    )
    topology = dataclasses.replace(topology, rate_limits_path=generous_rate_limits())
    if max_request_bytes is not None:
        topology = dataclasses.replace(topology, max_request_bytes=max_request_bytes)
    return topology


@dataclass
class RunningGateway:
    """Envoy plus the edge server, both up; `http_url` is where clients connect (JSON and gRPC)."""

    topology: Topology
    envoy: EnvoyProcess
    edge_server: grpc.aio.Server

    @property
    def http_url(self) -> str:
        return self.envoy.http_url

    @property
    def grpc_target(self) -> str:
        """host:port for gRPC clients such as grpcurl (plaintext, HTTP/2 prior knowledge)."""
        return self.http_url.removeprefix("http://")


@asynccontextmanager
async def running_gateway(
    topology: Topology,
    *,
    pki: ServicePki,
    stdout: int | None = None,
    redis_url: str | None = None,
    registry: CollectorRegistry | None = None,
    revocations: RevocationList | None = None,
) -> AsyncIterator[RunningGateway]:
    """Start the edge server on the topology's edge port (with the edge's certificate of `pki`), then
    Envoy; stop both on exit.

    The edge asks the topology's auth upstream about API keys and cookies, and keeps rate-limit
    counters in Redis at `redis_url` (shared with other gateways) or in its own memory. With
    `revocations` (the services' list, as `parley gateway` reads it from Redis) its token verifier
    refuses revoked sessions too.
    """
    auth = topology.upstreams["auth"]
    settings = Settings(
        redis_url=redis_url, jwt_issuer=topology.jwt_issuer, jwt_audience=topology.jwt_audience
    )
    edge = build_edge_wiring(
        settings,
        auth_target=f"{auth.host}:{auth.port}",
        tls=pki.files(EDGE),
        rate_limits=load_rate_limit_config(topology.rate_limits_path),
        revocations=revocations,
        registry=registry or CollectorRegistry(),
    )
    edge_server, _ = await create_edge_server(
        topology.descriptor_set_path.read_bytes(),
        topology.edge.host,
        topology.edge.port,
        tls=pki.files(EDGE),
        services_for_envoy=edge.services,
    )
    edge.start()
    envoy = EnvoyProcess(topology, stdout=stdout)
    try:
        await envoy.start()
        yield RunningGateway(topology=topology, envoy=envoy, edge_server=edge_server)
    finally:
        await envoy.stop()
        await edge_server.stop(grace=None)
        await edge.close()


# The one API key the stand-in auth of gateway-mechanics tests accepts: send these headers (or
# this gRPC metadata) on routes that need a caller, e.g. `httpx.get(url, headers=TEST_API_KEY_HEADERS)`.
TEST_API_KEY = "pk_gatewaytest_" + "k" * 32
TEST_API_KEY_HEADERS = {"x-api-key": TEST_API_KEY}
TEST_USER_ID = "00000000-0000-7000-8000-00000000cafe"


class FixedApiKeyAuth(auth_pb2_grpc.AuthInternalServiceServicer):
    """Answers the edge's credential checks in tests of gateway mechanics (routing, errors, streams)
    that run without the real auth service: TEST_API_KEY is a user on the free plan, anything
    else is unknown. Tests of authentication itself use the real auth service."""

    async def CheckApiKey(
        self, request: auth_pb2.CheckApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CheckApiKeyResponse:
        if request.api_key != TEST_API_KEY:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "Unknown API key.")
        response = auth_pb2.CheckApiKeyResponse(
            identity=auth_pb2.Identity(
                user_id=TEST_USER_ID,
                plan_id="free",
                roles=[common_pb2.ROLE_USER],
                auth_method=common_pb2.AUTH_METHOD_API_KEY,
            )
        )
        response.cache_ttl.FromSeconds(60)
        return response

    async def CheckSession(
        self, request: auth_pb2.CheckSessionRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CheckSessionResponse:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "No sessions here.")
        raise AssertionError("abort raises")

    async def WatchCredentialChanges(
        self, request: auth_pb2.WatchCredentialChangesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[auth_pb2.WatchCredentialChangesResponse]:
        """Nothing ever changes here: a resync, then a heartbeat as often as auth sends one."""
        yield auth_pb2.WatchCredentialChangesResponse(resync=True)
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            yield auth_pb2.WatchCredentialChangesResponse()


@dataclass
class HealthUpstream:
    """A real gRPC server on loopback answering grpc.health.v1 for the given service names.

    It stands in for the Parley services where a test only needs Envoy's health checks to pass;
    more handlers (grpc.GenericRpcHandler) can be passed to answer specific RPCs, and generated
    servicers through their `add_*_to_server` function, e.g.
    `functools.partial(chat_pb2_grpc.add_ChatServiceServicer_to_server, servicer)`.
    """

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer

    async def set_status(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        await self.health.set(service, status)

    async def stop(self) -> None:
        await self.server.stop(grace=None)


async def start_health_upstream(
    serving: Iterable[str],
    *,
    pki: ServicePki,
    handlers: Iterable[grpc.GenericRpcHandler] = (),
    servicers: Iterable[Callable[[grpc.aio.Server], None]] = (),
) -> HealthUpstream:
    """Start the stand-in on a free port; it listens with mTLS like a Parley service (the services
    process's certificate of `pki`), so Envoy and the edge reach it as they would the real one."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers(tuple(handlers))
    # The edge asks the auth area's upstream about API keys: here, this server.
    auth_pb2_grpc.add_AuthInternalServiceServicer_to_server(FixedApiKeyAuth(), server)
    for add_to_server in servicers:
        add_to_server(server)
    for name in ("", *serving):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(pki.files(SERVICES)))
    await server.start()
    return HealthUpstream(server=server, port=port, health=servicer)


@dataclass(frozen=True)
class GrpcurlResult:
    returncode: int
    stdout: str
    stderr: str


async def run_to_completion(
    program: str,
    *args: str,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[int, bytes, bytes]:
    """Run a program meant to finish, without blocking the event loop that serves the test's servers.

    Returns its exit code, stdout and stderr; one still running after `timeout_s` is killed, and
    TimeoutError raised.
    """
    process = await asyncio.create_subprocess_exec(
        program,
        *args,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout, stderr


async def grpcurl(*args: str, timeout_s: float = 30.0) -> GrpcurlResult:
    """The real grpcurl binary, run without blocking the event loop that serves the test's servers."""
    returncode, stdout, stderr = await run_to_completion(str(GRPCURL), *args, timeout_s=timeout_s)
    return GrpcurlResult(returncode, stdout.decode(), stderr.decode())


async def wait_for_healthz(url: str, expected_status: int, *, timeout_s: float = 10.0) -> None:
    """Poll GET /healthz until it answers `expected_status` (Envoy's health checks run on a timer)."""
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=2.0) as client:

        async def answered() -> bool:
            statuses.append((await client.get(f"{url}/healthz")).status_code)
            return statuses[-1] == expected_status

        await eventually(
            answered,
            what=f"/healthz answering {expected_status}",
            timeout_s=timeout_s,
            interval_s=0.1,
            details=lambda: f"statuses seen: {sorted(set(statuses))}",
        )
