"""Microservices mode end to end: `parley migrate`, `parley serve <service>` and `parley gateway`.

Real processes started through the installed `parley` script, real PostgreSQL, the real Envoy and
the real grpcurl. Every test is async so that nothing blocks the event loop: one of them runs a TCP
proxy (between billing and PostgreSQL) on that loop while the child processes talk through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from gateway.envoy_process import envoy_binary_path
from gateway.settings import load_gateway_settings
from services.common.pki import MICROSERVICES_CERTIFICATES, TlsFiles, ensure_pki
from services.common.settings import SERVICE_NAMES, ServiceName
from tests.support.databases import asyncpg_dsn
from tests.support.gateway import (
    free_port,
    grpcurl,
    internal_service_names,
    public_service_names,
)
from tests.support.microservices import (
    SHUTDOWN_GRACE_S,
    WAIT_S,
    Microservices,
    certificate_env,
    migrate,
    run_parley,
    running_microservices,
)
from tests.support.parley_process import ParleyProcess, children_of, pid_alive
from tests.support.pki import grpcurl_tls
from tests.support.polling import eventually
from tests.support.reflection import DESCRIBE_LIST_PLANS, assert_grpcurl_describes
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.envoy

# Interpreter start-up aside, a stopped process may take this long beyond its grace period to exit.
EXIT_SLACK_S = 3.0
LIST_PLANS = "parley.billing.v1.BillingService/ListPlans"
BILLING_SERVICE = "parley.billing.v1.BillingService"
SEEDED_PLANS = ["free", "pro", "team"]
PASSWORD = "violet-harbour-lantern-42"


# --- helpers -------------------------------------------------------------------------------------


def billing_service_names() -> set[str]:
    return {
        name
        for name in (*public_service_names(), *internal_service_names())
        if name.startswith("parley.billing.v1.")
    }


def operator(mesh: Microservices, service: str) -> list[str]:
    """grpcurl's flags for `service`'s port, with the operator's certificate `parley pki init` made."""
    return grpcurl_tls(mesh.pki.files("operator"), server=service)


async def wait_for_grpc_health(
    mesh: Microservices, service_name: ServiceName, service: str, expected: str, *, owner: ParleyProcess
) -> None:
    """Poll grpc.health.v1.Health/Check with grpcurl until it reports `expected`."""
    request = json.dumps({"service": service})
    target = mesh.grpc_target(service_name)
    last_answer = ""

    async def reported() -> bool:
        nonlocal last_answer
        check = await grpcurl(
            *operator(mesh, service_name), "-d", request, target, "grpc.health.v1.Health/Check", timeout_s=5
        )
        last_answer = check.stdout + check.stderr
        return check.returncode == 0 and json.loads(check.stdout).get("status") == expected

    await eventually(
        reported,
        what=f"health of {service} at {target} reported {expected}",
        timeout_s=WAIT_S,
        interval_s=0.1,
        alive=owner.check_alive,
        details=lambda: f"last answer: {last_answer}",
    )


def assert_parley_error(
    response: httpx.Response, *, status: int, grpc_code: int, reasons: Collection[str]
) -> None:
    """The JSON error shape every gateway and service error shares, with one of `reasons`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert body["code"] == grpc_code, body
    assert body["message"], body
    info = next(detail for detail in body["details"] if detail["@type"].endswith("google.rpc.ErrorInfo"))
    assert info["domain"] == "parley.dev", body
    assert info["reason"] in reasons, body
    assert "Traceback" not in response.text


def envoy_health_check_interval_s() -> float:
    settings = load_gateway_settings()
    assert settings.health_check.unhealthy_threshold >= 2, "the early-call check below assumes this"
    return settings.health_check.interval_ms / 1000


async def signed_in(client: httpx.AsyncClient) -> dict[str, str]:
    """A new account's bearer header, from registering and signing in through the gateway."""
    email = f"mesh-{uuid.uuid4().hex[:10]}@example.com"
    registered = await client.post(
        "/v1/auth/register", json={"email": email, "password": PASSWORD, "display_name": "Mesh"}
    )
    assert registered.status_code == 200, registered.text
    login = await client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert login.status_code == 200, login.text
    return {"authorization": f"Bearer {login.json()['tokens']['access_token']}"}


def plan_ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [plan["id"] for plan in response.json()["plans"]]


# --- parley migrate ------------------------------------------------------------------------------


Fingerprint = tuple[list[str], list[str], list[tuple[object, ...]]]


async def postgres_fingerprint(database_url: str) -> Fingerprint:
    """(tables, applied Alembic revisions, every plan row) of a PostgreSQL database."""
    connection = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        tables = await connection.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"
        )
        revisions = await connection.fetch("SELECT version_num FROM alembic_version ORDER BY 1")
        plans = await connection.fetch("SELECT * FROM plans ORDER BY id")
    finally:
        await connection.close()
    return [row[0] for row in tables], [row[0] for row in revisions], [tuple(row) for row in plans]


def sqlite_fingerprint(database_url: str) -> Fingerprint:
    """(tables, applied Alembic revisions, every plan row) of a SQLite database."""
    database_file = make_url(database_url).database
    assert database_file is not None
    with contextlib.closing(sqlite3.connect(database_file)) as connection:
        tables = connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY 1"
        ).fetchall()
        revisions = connection.execute("SELECT version_num FROM alembic_version ORDER BY 1").fetchall()
        plans = connection.execute("SELECT * FROM plans ORDER BY id").fetchall()
    return [row[0] for row in tables], [row[0] for row in revisions], [tuple(row) for row in plans]


async def test_migrate_creates_the_schema_once_on_postgres_and_sqlite(
    postgres_url: str, sqlite_url: str
) -> None:
    async def sqlite_fingerprint_async(url: str) -> Fingerprint:
        return sqlite_fingerprint(url)

    async def migrate_twice(
        url: str, fingerprint: Callable[[str], Awaitable[Fingerprint]]
    ) -> tuple[Fingerprint, Fingerprint]:
        await migrate(url)
        first = await fingerprint(url)
        again = await migrate(url)
        assert "Traceback" not in again.stderr, again.describe()
        return first, await fingerprint(url)

    (postgres_first, postgres_again), (sqlite_first, sqlite_again) = await asyncio.gather(
        migrate_twice(postgres_url, postgres_fingerprint),
        migrate_twice(sqlite_url, sqlite_fingerprint_async),
    )

    tables, revisions, plans = postgres_first
    assert {"alembic_version", "plans", "outbox_events"} <= set(tables)
    assert revisions, "no Alembic revision recorded"
    assert [plan[0] for plan in plans] == SEEDED_PLANS
    sqlite_tables, sqlite_revisions, sqlite_plans = sqlite_first
    assert sqlite_tables == tables
    assert sqlite_revisions == revisions
    assert [plan[0] for plan in sqlite_plans] == SEEDED_PLANS
    # The second run is a no-op: same tables, same revisions, the seed rows untouched (timestamps too).
    assert postgres_again == postgres_first
    assert sqlite_again == sqlite_first


# --- microservices topology ----------------------------------------------------------------------


async def test_microservices_serve_json_and_grpc_through_the_gateway(
    postgres_url: str, tmp_path: Path, redis_url: str
) -> None:
    await migrate(postgres_url)
    async with running_microservices(tmp_path, postgres_url, redis_url) as mesh:
        try:
            await mesh.gateway.wait_for_http_status(f"{mesh.gateway_url}/healthz", 200, timeout_s=WAIT_S)

            async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=10.0) as client:
                healthz = await client.get("/healthz")
                assert healthz.json() == {"status": "SERVING"}
                plans = await client.get("/v1/billing/plans")
            assert plans.headers["content-type"].startswith("application/json")
            assert plan_ids(plans) == SEEDED_PLANS
            # Transcoded with proto field names and int64 as strings.
            pro = plans.json()["plans"][1]
            assert pro["monthly_price"]["currency_code"] == "USD"
            assert isinstance(pro["included_tokens"], str)

            public, internal = set(public_service_names()), set(internal_service_names())
            through_gateway = await grpcurl("-plaintext", f"127.0.0.1:{mesh.http_port}", "list")
            assert through_gateway.returncode == 0, through_gateway.stderr
            listed = set(through_gateway.stdout.split())
            assert public <= listed
            assert not internal & listed

            direct = await grpcurl(*operator(mesh, "billing"), mesh.grpc_target("billing"), "list")
            assert direct.returncode == 0, direct.stderr
            direct_parley = {name for name in direct.stdout.split() if name.startswith("parley.")}
            assert direct_parley == billing_service_names()
            assert "parley.billing.v1.BillingInternalService" in direct_parley

            for transport, target in (
                (operator(mesh, "billing"), mesh.grpc_target("billing")),
                (["-plaintext"], f"127.0.0.1:{mesh.http_port}"),
            ):
                call = await grpcurl(*transport, "-d", "{}", target, LIST_PLANS)
                assert call.returncode == 0, call.stderr
                assert [plan["id"] for plan in json.loads(call.stdout)["plans"]] == SEEDED_PLANS
                await assert_grpcurl_describes(target, DESCRIBE_LIST_PLANS, transport=transport)

            # Each service port answers only callers with a certificate of the mesh's CA.
            for name in SERVICE_NAMES:
                plaintext = await grpcurl("-plaintext", mesh.grpc_target(name), "list")
                assert plaintext.returncode != 0
                assert f'Failed to dial target host "{mesh.grpc_target(name)}"' in plaintext.stderr
            # A service may not call another's public methods: they are the gateway's (and operator's).
            as_chat = grpcurl_tls(mesh.pki.files("chat"), server="billing")
            refused = await grpcurl(*as_chat, "-d", "{}", mesh.grpc_target("billing"), LIST_PLANS)
            assert refused.returncode != 0
            assert f"chat may not call {LIST_PLANS}" in refused.stderr
        except AssertionError as failure:
            raise AssertionError(f"{failure}\n{mesh.output_tails()}") from None


async def test_the_gateway_authenticates_callers_with_the_auth_service(
    postgres_url: str, tmp_path: Path, redis_url: str
) -> None:
    await migrate(postgres_url)
    async with running_microservices(tmp_path, postgres_url, redis_url) as mesh:
        try:
            await mesh.gateway.wait_for_http_status(f"{mesh.gateway_url}/healthz", 200, timeout_s=WAIT_S)
            async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=10.0) as client:
                anonymous = await client.get("/v1/users/me")
                assert_parley_error(anonymous, status=401, grpc_code=16, reasons={"UNAUTHENTICATED"})

                bearer = await signed_in(client)
                me = await client.get("/v1/users/me", headers=bearer)
                assert me.status_code == 200, me.text
                user_id = me.json()["user"]["id"]

                # An API key is checked by the edge, which asks the auth process.
                key = await client.post("/v1/users/me/api-keys", json={"name": "mesh"}, headers=bearer)
                assert key.status_code == 200, key.text
                as_key = await client.get("/v1/users/me", headers={"x-api-key": key.json()["secret"]})
                assert as_key.status_code == 200, as_key.text
                assert as_key.json()["user"]["id"] == user_id
                unknown_key = await client.get("/v1/users/me", headers={"x-api-key": "pk_" + "x" * 40})
                assert_parley_error(unknown_key, status=401, grpc_code=16, reasons={"API_KEY_INVALID"})

                # Admin routes need the role, whichever credential is used.
                not_admin = await client.get("/v1/admin/users", headers=bearer)
                assert_parley_error(not_admin, status=403, grpc_code=7, reasons={"PERMISSION_DENIED"})
        except AssertionError as failure:
            raise AssertionError(f"{failure}\n{mesh.output_tails()}") from None


# --- health follows the database -----------------------------------------------------------------


async def test_health_follows_the_database_end_to_end(
    postgres_url: str, tmp_path: Path, redis_url: str
) -> None:
    await migrate(postgres_url)
    database = make_url(postgres_url)
    proxy = TcpProxy(database.host or "127.0.0.1", database.port or 5432)
    await proxy.start()
    billing_url = database.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        async with running_microservices(
            tmp_path,
            postgres_url,
            redis_url,
            database_urls={"billing": billing_url},
            service_env={"billing": {"PARLEY_HEALTH_PROBE_INTERVAL_S": "0.3"}},
        ) as mesh:
            billing = mesh.services["billing"]
            healthz_url = f"{mesh.gateway_url}/healthz"
            try:
                await wait_for_grpc_health(mesh, "billing", BILLING_SERVICE, "SERVING", owner=billing)
                await mesh.gateway.wait_for_http_status(healthz_url, 200, timeout_s=WAIT_S)

                loop = asyncio.get_running_loop()
                await proxy.cut()
                cut_at = loop.time()
                await wait_for_grpc_health(mesh, "billing", BILLING_SERVICE, "NOT_SERVING", owner=billing)
                async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=10.0) as client:
                    # Until Envoy's health checks catch up, calls still reach billing, whose database is
                    # gone: that must be UNAVAILABLE from the service too, never INTERNAL (a 500). The
                    # credit packs are read from the database on every call (the plan catalog may be
                    # answered from the Redis read cache, which outlives the database here).
                    early = await client.get("/v1/billing/credit-packs")
                    # Envoy needs two failed checks, one interval apart, before it stops routing.
                    billing_answered = loop.time() - cut_at < envoy_health_check_interval_s()
                    assert_parley_error(
                        early,
                        status=503,
                        grpc_code=14,
                        reasons=(
                            {"SERVICE_UNAVAILABLE"}
                            if billing_answered
                            else {"SERVICE_UNAVAILABLE", "UPSTREAM_UNAVAILABLE"}
                        ),
                    )

                    unhealthy = await mesh.gateway.wait_for_http_status(healthz_url, 503, timeout_s=WAIT_S)
                    assert_parley_error(unhealthy, status=503, grpc_code=14, reasons={"UPSTREAM_UNAVAILABLE"})
                    refused = await client.get("/v1/billing/plans")
                    assert_parley_error(refused, status=503, grpc_code=14, reasons={"UPSTREAM_UNAVAILABLE"})

                    await proxy.restore()
                    await wait_for_grpc_health(mesh, "billing", BILLING_SERVICE, "SERVING", owner=billing)
                    await mesh.gateway.wait_for_http_status(healthz_url, 200, timeout_s=WAIT_S)
                    # /healthz and routing read the host's health on different threads; on a loaded
                    # machine routing can lag by a moment, so the first call after recovery is polled.
                    recovered = await mesh.gateway.wait_for_http_status(
                        f"{mesh.gateway_url}/v1/billing/plans", 200, timeout_s=WAIT_S
                    )
                    assert plan_ids(recovered) == SEEDED_PLANS
            except AssertionError as failure:
                raise AssertionError(f"{failure}\n{mesh.output_tails()}") from None
    finally:
        await proxy.close()


# --- bad settings --------------------------------------------------------------------------------


async def test_the_cli_refuses_bad_settings_clearly(tmp_path: Path) -> None:
    ports = {
        "PARLEY_HTTP_PORT": str(free_port()),
        "PARLEY_ENVOY_ADMIN_PORT": str(free_port()),
        "PARLEY_EDGE_PORT": str(free_port()),
        "PARLEY_METRICS_PORT": str(free_port()),
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
    }
    bad_limits = tmp_path / "ratelimits.yaml"
    bad_limits.write_text(
        "domain: parley\n"
        "limits: [{name: a, descriptor: {limit: a}, key: [user], rate: {requests: 1, per_s: 1}, bursts: 2}]\n"
        "routes: {default: {on_failure: allow, descriptors: [{limit: a, entries: [user]}]}}\n"
    )
    # The gateway's certificate is fine here, so the file is what gets reported.
    pki = tmp_path / "pki"
    ensure_pki(pki, MICROSERVICES_CERTIFICATES)
    with_bad_limits = {
        **ports,
        **certificate_env(TlsFiles.in_directory(pki, "gateway")),
        "PARLEY_RATE_LIMITS_FILE": str(bad_limits),
    }
    bad_port, no_certificate, bad_database, up_bad_file, gateway_bad_file = await asyncio.gather(
        run_parley("up", env={**ports, "PARLEY_GRPC_PORT": "not-a-port"}),
        run_parley("gateway", "--topology", "local", env=ports),
        run_parley(
            "serve", "billing", "--port", str(free_port()), env={**ports, "PARLEY_DATABASE_URL": "mysql://x"}
        ),
        run_parley("up", env=with_bad_limits),
        run_parley("gateway", "--topology", "local", env=with_bad_limits),
    )

    for result in (bad_port, no_certificate, bad_database):
        assert result.returncode == 2, result.describe()
        assert result.stderr.startswith("Invalid Parley settings:"), result.describe()
        assert "Traceback" not in result.stderr + result.stdout, result.describe()
    assert "PARLEY_GRPC_PORT" in bad_port.stderr
    assert "not-a-port" in bad_port.stderr
    # No certificate, no gateway: the message names the settings, the file and how to make one.
    assert "PARLEY_SERVICE_CA_FILE / _CERT_FILE / _KEY_FILE" in no_certificate.stderr
    assert str(tmp_path / "data" / "pki" / "gateway.pem") in no_certificate.stderr
    assert "parley pki init" in no_certificate.stderr
    assert "PARLEY_DATABASE_URL" in bad_database.stderr
    assert "mysql://x" in bad_database.stderr
    # A bad data file is reported the same way: one line naming the file and the key, exit code 2.
    for result in (up_bad_file, gateway_bad_file):
        assert result.returncode == 2, result.describe()
        assert result.stderr == (
            f"{bad_limits}: limits[0].bursts: unknown key; did you mean 'burst'? "
            "(allowed here: burst, descriptor, key, name, rate, shadow); "
            "limits[0].burst: required key is missing\n"
        ), result.describe()
    # Nothing was started, so nothing was written.
    assert not (tmp_path / "data").exists()


# --- k8s config ----------------------------------------------------------------------------------


async def test_the_rendered_k8s_config_passes_envoy_validation(tmp_path: Path) -> None:
    # An operator's first steps: the certificates, in the data dir where every process finds its own.
    initialized = await run_parley("pki", "init", env={"PARLEY_DATA_DIR": str(tmp_path / "data")})
    assert initialized.returncode == 0, initialized.describe()
    assert "gateway    issued" in initialized.stdout
    config = tmp_path / "k8s.yaml"
    rendered = await run_parley(
        "gateway",
        "--topology",
        "k8s",
        "--render",
        str(config),
        env={"PARLEY_DATA_DIR": str(tmp_path / "data")},
    )
    assert rendered.returncode == 0, rendered.describe()
    assert rendered.stdout.strip() == f"wrote {config}"
    text = config.read_text()
    for name in SERVICE_NAMES:
        assert f"{name}.parley.svc.cluster.local" in text
        assert f"spiffe://parley.local/{name}" in text
    sds = (tmp_path / "k8s-sds" / "certificate.yaml").read_text()
    assert str(tmp_path / "data" / "pki" / "gateway-key.pem") in sds

    validate = await asyncio.create_subprocess_exec(
        str(envoy_binary_path()),
        "--mode",
        "validate",
        "--disable-hot-restart",
        "-c",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(validate.communicate(), timeout=WAIT_S)
    assert validate.returncode == 0, output.decode(errors="replace")[-4000:]
    assert b"OK" in output


# --- shutdown ------------------------------------------------------------------------------------


async def test_sigterm_stops_every_process_cleanly(postgres_url: str, tmp_path: Path, redis_url: str) -> None:
    await migrate(postgres_url)
    async with running_microservices(tmp_path, postgres_url, redis_url) as mesh:
        envoy_pids = children_of(mesh.gateway.pid)
        assert envoy_pids, f"parley gateway should run Envoy as a child:\n{mesh.gateway.output()[-4000:]}"
        assert all("envoy" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace") for pid in envoy_pids)

        names = [" ".join(process.args[:2]) for process in mesh.processes]
        exit_codes = await asyncio.gather(
            *(
                process.stop(signum=signal.SIGTERM, timeout_s=SHUTDOWN_GRACE_S + EXIT_SLACK_S)
                for process in mesh.processes
            )
        )

        assert dict(zip(names, exit_codes, strict=True)) == dict.fromkeys(names, 0), mesh.output_tails()
        assert not any(pid_alive(pid) for pid in envoy_pids), "Envoy outlived parley gateway"
