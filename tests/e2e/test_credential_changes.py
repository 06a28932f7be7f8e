"""Credential changes reach every gateway within a second (issue 11, finding 1), end to end.

The attack from the issue, and its relatives, through the real Envoy: an API key (or a cookie
session, or a bearer token) is used until the edge answers it from its cache, then the key is
revoked, its user disabled or their admin role taken away, and every gateway must refuse it within
one second, and refuse to create a new key with it. Each runs against two deployments:

- `parley up` (embedded: one services process, the edge as its child process, SQLite);
- microservices: one `parley serve auth` on PostgreSQL and Redis, and two `parley gateway`
  processes (each its own Envoy and edge). The second gateway's edge reaches auth through a TCP
  proxy the test can cut; its Envoy routes to auth directly.

The delay until each gateway refuses is measured by polling (bounded): the first refused request
was sent that long after the change returned (an upper bound: the pollers start one after another).
It is logged, and must be below one second. The edges' caches are proven warm first, from their own
metrics (a cache hit), so the refusal shows the eviction and not a cache that was never used.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import string
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass

import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from services.auth.signing_keys import generate_kek
from services.common.pki import GATEWAY, MICROSERVICES_CERTIFICATES, ensure_pki
from tests.support.databases import fresh_postgres_database
from tests.support.gateway import free_port
from tests.support.microservices import WAIT_S, certificate_env, migrate, run_parley
from tests.support.parley_process import EmbeddedPorts, ParleyProcess
from tests.support.pki import ServicePki
from tests.support.polling import eventually
from tests.support.rate_limits import generous_rate_limits
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]

logger = logging.getLogger(__name__)

PASSWORD = "violet-harbour-lantern-42"
# Every gateway must refuse a changed credential within this long (the bar).
WITHIN_S = 1.0
# How long a poll goes on, so a slower refusal is measured and reported rather than cut off.
POLL_BOUND_S = 5.0
ACCESS_COOKIE = "__Host-parley-access"
CSRF_COOKIE = "__Host-parley-csrf"


# ---- deployments ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gateway:
    """One gateway (Envoy and its edge): where it serves HTTP, and where its edge's metrics are."""

    name: str
    url: str
    edge_metrics_url: str


@dataclass
class Deployment:
    name: str
    gateways: list[Gateway]
    admin_headers: dict[str, str]
    # The microservices deployment's line between the second gateway's edge and auth.
    edge_link: TcpProxy | None = None

    @property
    def first(self) -> Gateway:
        return self.gateways[0]


def unique_email(tag: str) -> str:
    suffix = "".join(secrets.choice(string.ascii_lowercase) for _ in range(12))
    return f"{tag}.{suffix}@example.com"


async def create_admin(env: dict[str, str], *options: str) -> str:
    email = unique_email("root")
    created = await run_parley(
        "admin", "create-admin", "--email", email, "--display-name", "Root", *options,
        env={**env, "PARLEY_ADMIN_PASSWORD": PASSWORD},
    )  # fmt: skip
    assert created.returncode == 0, created.describe()
    return email


async def until_answering(url: str, owner: ParleyProcess) -> None:
    """Until the gateway routes to auth (its health checks passed): the JWKS route answers 200."""
    async with httpx.AsyncClient(timeout=2.0) as client:

        async def answered() -> bool:
            return (await client.get(f"{url}/.well-known/jwks.json")).status_code == 200

        await eventually(
            answered,
            what=f"{url} routing to auth",
            timeout_s=WAIT_S * 2,
            interval_s=0.1,
            retrying_on=(httpx.HTTPError,),
            alive=owner.check_alive,
        )


async def bearer_of(gateway: Gateway, email: str) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=15.0) as client:
        login = await client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert login.status_code == 200, login.text
    return {"authorization": f"Bearer {login.json()['tokens']['access_token']}"}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def embedded(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Deployment]:
    data_dir = tmp_path_factory.mktemp("credential-changes-embedded")
    ports = EmbeddedPorts()
    env = {**ports.env(), "PARLEY_DATA_DIR": str(data_dir)}
    process = ParleyProcess(["up"], env=env, log_path=data_dir / "parley.log")
    process.start()
    try:
        gateway = Gateway(
            "embedded", f"http://127.0.0.1:{ports.http}", f"http://127.0.0.1:{ports.edge_metrics}/metrics"
        )
        await process.wait_for_http_status(f"{gateway.url}/healthz", timeout_s=60)
        admin = await create_admin(env)
        yield Deployment("embedded", [gateway], await bearer_of(gateway, admin))
    finally:
        process.kill()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def microservices(
    tmp_path_factory: pytest.TempPathFactory, postgres_server_url: str, redis_url: str
) -> AsyncIterator[Deployment]:
    directory = tmp_path_factory.mktemp("credential-changes-mesh")
    async with fresh_postgres_database(postgres_server_url) as database_url:
        await migrate(database_url)
        # What `parley pki init` makes; each process gets its certificate by file, as in k8s.
        pki = ServicePki(directory / "pki")
        ensure_pki(pki.directory, MICROSERVICES_CERTIFICATES)
        auth_port = free_port()
        auth = ParleyProcess(
            ["serve", "auth", "--port", str(auth_port)],
            env={
                "PARLEY_DATABASE_URL": database_url,
                "PARLEY_REDIS_URL": redis_url,
                **certificate_env(pki.files("auth")),
                "PARLEY_AUTH_KEY_ENCRYPTION_KEY": generate_kek(),
                "PARLEY_METRICS_PORT": str(free_port()),
                "PARLEY_SHUTDOWN_GRACE_S": "2",
            },
            log_path=directory / "auth.log",
        )
        link = TcpProxy("127.0.0.1", auth_port)
        await link.start()
        # Only auth runs: the other areas' routes lead to a port nothing listens on.
        nowhere = free_port()
        processes, gateways = [auth], []
        for index, auth_target in enumerate((f"127.0.0.1:{auth_port}", f"127.0.0.1:{link.port}"), start=1):
            http_port, metrics_port = free_port(), free_port()
            upstreams = [
                f"--upstream={area}=127.0.0.1:{nowhere}" for area in ("chat", "billing", "analytics")
            ]
            processes.append(
                ParleyProcess(
                    ["gateway", "--topology", "local", f"--upstream=auth=127.0.0.1:{auth_port}", *upstreams],
                    env={
                        **certificate_env(pki.files(GATEWAY)),
                        "PARLEY_REDIS_URL": redis_url,
                        "PARLEY_AUTH_TARGET": auth_target,
                        "PARLEY_HTTP_PORT": str(http_port),
                        "PARLEY_ENVOY_ADMIN_PORT": str(free_port()),
                        "PARLEY_EDGE_PORT": str(free_port()),
                        "PARLEY_METRICS_PORT": str(metrics_port),
                        "PARLEY_DATA_DIR": str(directory / f"gateway-{index}"),
                        "PARLEY_RATE_LIMITS_FILE": str(generous_rate_limits()),
                    },
                    log_path=directory / f"gateway-{index}.log",
                )
            )
            gateways.append(
                Gateway(
                    f"gateway-{index}",
                    f"http://127.0.0.1:{http_port}",
                    f"http://127.0.0.1:{metrics_port}/metrics",
                )
            )
        try:
            for process in processes:
                process.start()
            await auth.wait_for_output(f"parley auth serving gRPC on 127.0.0.1:{auth_port}", timeout_s=WAIT_S)
            await asyncio.gather(
                *(
                    until_answering(gateway.url, process)
                    for gateway, process in zip(gateways, processes[1:], strict=True)
                )
            )
            admin = await create_admin({}, "--database-url", database_url)
            yield Deployment("microservices", gateways, await bearer_of(gateways[0], admin), edge_link=link)
        finally:
            for process in processes:
                process.kill()
            await link.close()


@pytest.fixture(params=["embedded", "microservices"])
def deployment(request: pytest.FixtureRequest) -> Deployment:
    found: Deployment = request.getfixturevalue(request.param)
    return found


# ---- credentials ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """A user with every kind of credential: an access token, an API key and a cookie session."""

    user_id: str
    email: str
    bearer: dict[str, str]
    refresh_token: str
    api_key: str
    api_key_id: str
    cookie: dict[str, str]

    @property
    def key(self) -> dict[str, str]:
        return {"x-api-key": self.api_key}


async def member(gateway: Gateway, admin_headers: dict[str, str], *, admin: bool = False) -> Member:
    email = unique_email("member")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=15.0) as client:
        registered = await client.post(
            "/v1/auth/register", json={"email": email, "password": PASSWORD, "display_name": "Member"}
        )
        assert registered.status_code == 200, registered.text
        user_id = registered.json()["user"]["id"]
        if admin:
            promoted = await client.put(
                f"/v1/admin/users/{user_id}/roles", json={"roles": ["ROLE_ADMIN"]}, headers=admin_headers
            )
            assert promoted.status_code == 200, promoted.text
        login = await client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert login.status_code == 200, login.text
        tokens = login.json()["tokens"]
        bearer = {"authorization": f"Bearer {tokens['access_token']}"}
        created = await client.post("/v1/users/me/api-keys", json={"name": "ci"}, headers=bearer)
        assert created.status_code == 200, created.text
        browser = await client.post(
            "/v1/auth/login",
            json={"email": email, "password": PASSWORD, "token_delivery": "TOKEN_DELIVERY_COOKIE"},
        )
        assert browser.status_code == 200, browser.text
    cookies = {
        line.partition("=")[0]: line.partition("=")[2].split(";", 1)[0]
        for line in browser.headers.get_list("set-cookie")
    }
    return Member(
        user_id=user_id,
        email=email,
        bearer=bearer,
        refresh_token=tokens["refresh_token"],
        api_key=created.json()["secret"],
        api_key_id=created.json()["api_key"]["id"],
        cookie={"cookie": f"{ACCESS_COOKIE}={cookies[ACCESS_COOKIE]}; {CSRF_COOKIE}={cookies[CSRF_COOKIE]}"},
    )


async def cache_hits(gateway: Gateway) -> float:
    """The edge's API-key answers served from its cache so far."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        text = (await client.get(gateway.edge_metrics_url)).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "parley_edge_authz_cache_lookups_total" and sample.labels == {
                "credential": "api_key",
                "outcome": "hit",
            }:
                return sample.value
    return 0.0


async def warm(gateway: Gateway, path: str, headers: dict[str, str]) -> None:
    """Use the key until this gateway's edge answers it from its cache (proven by its metrics)."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=15.0) as client:

        async def answered_from_the_cache() -> bool:
            before = await cache_hits(gateway)
            response = await client.get(path, headers=headers)
            assert response.status_code == 200, response.text
            return await cache_hits(gateway) > before

        await eventually(answered_from_the_cache, what=f"{gateway.name} caching the key", interval_s=0.1)


async def assert_allowed(gateway: Gateway, path: str, *credentials: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=15.0) as client:
        for headers in credentials:
            response = await client.get(path, headers=headers)
            assert response.status_code == 200, response.text


async def refusal_delay(
    gateway: Gateway,
    path: str,
    headers: dict[str, str],
    statuses: Collection[int],
    since: float,
    *,
    meanwhile: Collection[int] = (200,),
) -> float:
    """Poll `path` with `headers` until the gateway refuses with one of `statuses` (answering only
    `meanwhile` until then). Returns when the first refused request was sent, in seconds after
    `since` (a `time.monotonic()` taken when the change was made): the change had taken effect there
    by then; a request sent earlier was still answered the old way."""
    last = ""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5.0) as client:

        async def refused() -> float | None:
            nonlocal last
            sent = time.monotonic()
            response = await client.get(path, headers=headers)
            last = f"{response.status_code} {response.text[:300]}"
            assert response.status_code in {*meanwhile, *statuses}, last
            # 0.0 would read as "not yet" to the poll.
            return max(sent - since, 1e-6) if response.status_code in statuses else None

        return await eventually(
            refused,
            what=f"{gateway.name} refusing {path}",
            timeout_s=POLL_BOUND_S,
            interval_s=0.01,
            details=lambda: f"last answer: {last}",
        )


async def measure(
    deployment: Deployment,
    change: Callable[[], Awaitable[None]],
    probes: list[tuple[str, str, dict[str, str], Collection[int]]],
    request: pytest.FixtureRequest,
) -> None:
    """Make `change`, then poll every gateway with every probe (what, path, headers, refusals) at
    once; each must be refused within a second. The delays are logged, and kept as the test's
    `refusal_delays_ms` user property (for reports)."""
    await change()
    # Taken when the change returned: requests sent from here on must be refused within a second.
    since = time.monotonic()
    delays = await asyncio.gather(
        *(
            refusal_delay(gateway, path, headers, refusals, since)
            for gateway in deployment.gateways
            for _, path, headers, refusals in probes
        )
    )
    labels = [f"{gateway.name}/{what}" for gateway in deployment.gateways for what, *_ in probes]
    measured = dict(zip(labels, delays, strict=True))
    logger.info(
        "%s: refused after %s",
        deployment.name,
        ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in measured.items()),
    )
    delays_ms = {label: round(delay * 1000) for label, delay in measured.items()}
    request.node.user_properties.append(("refusal_delays_ms", delays_ms))
    slow = {label: delay for label, delay in measured.items() if delay >= WITHIN_S}
    assert not slow, f"refused later than {WITHIN_S} s: {slow}"


# ---- the attacks ---------------------------------------------------------------------------------


async def test_a_revoked_key_is_refused_everywhere_within_a_second_and_cannot_mint_a_new_key(
    deployment: Deployment, request: pytest.FixtureRequest
) -> None:
    victim = await member(deployment.first, deployment.admin_headers)
    for gateway in deployment.gateways:
        await warm(gateway, "/v1/users/me", victim.key)

    async def revoke() -> None:
        async with httpx.AsyncClient(base_url=deployment.first.url, timeout=15.0) as client:
            revoked = await client.delete(f"/v1/users/me/api-keys/{victim.api_key_id}", headers=victim.bearer)
        assert revoked.status_code == 200, revoked.text

    await measure(deployment, revoke, [("key", "/v1/users/me", victim.key, {401})], request)

    for gateway in deployment.gateways:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=15.0) as client:
            minted = await client.post("/v1/users/me/api-keys", json={"name": "persist"}, headers=victim.key)
        assert minted.status_code == 401, minted.text
        assert minted.json()["details"][0]["reason"] == "API_KEY_REVOKED"


async def test_a_disabled_users_key_and_cookie_session_are_refused_everywhere_within_a_second(
    deployment: Deployment, request: pytest.FixtureRequest
) -> None:
    victim = await member(deployment.first, deployment.admin_headers)
    for gateway in deployment.gateways:
        await warm(gateway, "/v1/users/me", victim.key)
        await assert_allowed(gateway, "/v1/users/me", victim.cookie, victim.bearer)

    async def disable() -> None:
        async with httpx.AsyncClient(base_url=deployment.first.url, timeout=15.0) as client:
            disabled = await client.post(
                f"/v1/admin/users/{victim.user_id}:disable", json={}, headers=deployment.admin_headers
            )
        assert disabled.status_code == 200, disabled.text

    await measure(
        deployment,
        disable,
        [
            ("key", "/v1/users/me", victim.key, {403}),
            ("cookie", "/v1/users/me", victim.cookie, {401, 403}),
            ("token", "/v1/users/me", victim.bearer, {401}),
        ],
        request,
    )


async def test_an_admin_who_loses_the_role_is_refused_admin_routes_everywhere_within_a_second(
    deployment: Deployment, request: pytest.FixtureRequest
) -> None:
    demoted = await member(deployment.first, deployment.admin_headers, admin=True)
    for gateway in deployment.gateways:
        await warm(gateway, "/v1/admin/users", demoted.key)
        await assert_allowed(gateway, "/v1/admin/users", demoted.cookie, demoted.bearer)

    async def demote() -> None:
        async with httpx.AsyncClient(base_url=deployment.first.url, timeout=15.0) as client:
            changed = await client.put(
                f"/v1/admin/users/{demoted.user_id}/roles",
                json={"roles": []},
                headers=deployment.admin_headers,
            )
        assert changed.status_code == 200, changed.text

    await measure(
        deployment,
        demote,
        [
            ("key", "/v1/admin/users", demoted.key, {403}),
            # Its access cookie carries the old roles too: refused like the token, or for the role.
            ("cookie", "/v1/admin/users", demoted.cookie, {401, 403}),
            # Its token still says admin: refused, so the client refreshes.
            ("token", "/v1/admin/users", demoted.bearer, {401}),
        ],
        request,
    )
    async with httpx.AsyncClient(base_url=deployment.first.url, timeout=15.0) as client:
        refreshed = await client.post("/v1/auth/refresh", json={"refresh_token": demoted.refresh_token})
        assert refreshed.status_code == 200, refreshed.text
        token = refreshed.json()["tokens"]["access_token"]
        again = await client.get("/v1/admin/users", headers={"authorization": f"Bearer {token}"})
    assert again.status_code == 403, again.text


# ---- the subscription fails safe ------------------------------------------------------------------


async def test_an_edge_cut_off_from_auth_refuses_instead_of_answering_from_its_cache(
    microservices: Deployment,
) -> None:
    assert microservices.edge_link is not None
    first, cut_off = microservices.gateways
    victim = await member(first, microservices.admin_headers)
    await warm(cut_off, "/v1/users/me", victim.key)

    await microservices.edge_link.cut()
    try:
        delay = await refusal_delay(cut_off, "/v1/users/me", victim.key, {503}, time.monotonic())
        logger.info("the cut-off edge stopped answering from its cache after %.0f ms", delay * 1000)
        assert delay < WITHIN_S
        # Revoked meanwhile, elsewhere: the cut-off edge never heard of it.
        async with httpx.AsyncClient(base_url=first.url, timeout=15.0) as client:
            revoked = await client.delete(f"/v1/users/me/api-keys/{victim.api_key_id}", headers=victim.bearer)
        assert revoked.status_code == 200, revoked.text
        async with httpx.AsyncClient(base_url=cut_off.url, timeout=15.0) as client:
            assert (await client.get("/v1/users/me", headers=victim.key)).status_code == 503
    finally:
        await microservices.edge_link.restore()

    # Back, it asks auth again: the revoked key is refused, never served from before the cut.
    await refusal_delay(cut_off, "/v1/users/me", victim.key, {401}, time.monotonic(), meanwhile={503})
