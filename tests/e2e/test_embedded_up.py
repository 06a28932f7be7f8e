"""`parley up` end to end: the real CLI, the real Envoy, real HTTP and grpcurl clients."""

from __future__ import annotations

import base64
import json
import signal
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from services.common.contracts import descriptor_set_bytes, descriptor_set_path
from services.common.pki import workloads_of_certificate
from tests.support.gateway import grpcurl
from tests.support.microservices import run_parley
from tests.support.parley_process import EmbeddedPorts, ParleyProcess, children_of, command_of, pid_alive
from tests.support.pki import embedded_pki, grpcurl_tls
from tests.support.polling import eventually_sync
from tests.support.reflection import (
    DESCRIBE_CASES,
    LIST_PLANS_METHOD,
    REFLECTION_VERSIONS,
    DescribeCase,
    assert_grpcurl_describes,
    files_of,
    listed_services,
    reflect,
    service_names_in,
    symbol_request,
)

pytestmark = pytest.mark.envoy

PASSWORD = "violet-harbour-lantern-42"
LIST_PLANS = "parley.billing.v1.BillingService/ListPlans"


def parley_services() -> tuple[set[str], set[str]]:
    """(public, internal) Parley service names, read from the committed descriptor set."""
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_bytes())
    names = {
        f"{file.package}.{service.name}"
        for file in descriptor_set.file
        if file.package.startswith("parley.")
        for service in file.service
    }
    internal = {name for name in names if name.endswith("InternalService")}
    return names - internal, internal


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parley-data")


@pytest.fixture(scope="module")
def parley_up(data_dir: Path) -> Iterator[tuple[ParleyProcess, EmbeddedPorts]]:
    ports = EmbeddedPorts()
    process = ParleyProcess(
        ["up"],
        env={**ports.env(), "PARLEY_DATA_DIR": str(data_dir)},
        log_path=data_dir / "parley.log",
    )
    process.start()
    process.wait_until_http_ok(f"http://127.0.0.1:{ports.http}/healthz")
    # Envoy can answer /healthz a moment before `parley up` prints where everything listens.
    eventually_sync(lambda: "Parley is up" in process.output(), what="`parley up` announcing itself")
    yield process, ports
    process.terminate()


@pytest.fixture(scope="module")
def gateway(parley_up: tuple[ParleyProcess, EmbeddedPorts]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{parley_up[1].http}", timeout=10.0) as client:
        yield client


def assert_error_body(
    response: httpx.Response, *, status: int, grpc_code: int, reason: str
) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["code"] == grpc_code
    assert isinstance(body["message"], str)
    assert body["message"]
    info = next(d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo"))
    assert (info["reason"], info["domain"]) == (reason, "parley.dev")
    assert "Traceback" not in response.text
    assert not any(name.startswith("grpc-") for name in response.headers)
    return dict(body)


@pytest.fixture(scope="module")
def operator(parley_up: tuple[ParleyProcess, EmbeddedPorts], data_dir: Path) -> list[str]:
    """grpcurl's flags for the services' port, with the operator's certificate `parley up` made."""
    return grpcurl_tls(embedded_pki(data_dir).files("operator"), server="billing")


def test_it_prints_where_everything_listens(
    parley_up: tuple[ParleyProcess, EmbeddedPorts], data_dir: Path
) -> None:
    process, ports = parley_up
    output = process.output()
    assert f"http://127.0.0.1:{ports.http}" in output
    assert f"127.0.0.1:{ports.grpc}" in output
    assert f"parley grpcurl --data-dir {data_dir} 127.0.0.1:{ports.grpc} list" in output
    assert str(data_dir / "pki") in output
    assert f"http://127.0.0.1:{ports.metrics}/metrics" in output


def test_the_data_dir_holds_the_pki_owner_only(
    parley_up: tuple[ParleyProcess, EmbeddedPorts], data_dir: Path
) -> None:
    pki = data_dir / "pki"
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700
    names = sorted(path.name for path in pki.iterdir())
    assert names == sorted(
        f"{name}{suffix}"
        for name in ("ca", "services", "edge", "gateway", "operator")
        for suffix in (".pem", "-key.pem")
    )
    assert {stat.S_IMODE(path.stat().st_mode) for path in pki.iterdir()} == {0o600}
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    expected = {
        "services": {"auth", "chat", "billing", "analytics"},
        "edge": {"edge"},
        "gateway": {"gateway"},
        "operator": {"operator"},
    }
    for name, workloads in expected.items():
        certificate = x509.load_pem_x509_certificate((pki / f"{name}.pem").read_bytes())
        certificate.verify_directly_issued_by(ca)
        assert workloads_of_certificate(certificate) == workloads


def admin_documents(admin_url: str) -> dict[str, str]:
    """What Envoy's admin shows, with every base64 `inline_bytes` value decoded next to it (SDS
    secrets are dumped that way: a leak would be base64 of the PEM)."""
    documents = {}
    with httpx.Client(base_url=admin_url, timeout=10.0) as admin:
        for path in ("/config_dump", "/config_dump?include_eds", "/certs"):
            text = admin.get(path).raise_for_status().text
            decoded = [
                base64.b64decode(value).decode(errors="replace") for value in inline_bytes(json.loads(text))
            ]
            documents[path] = "\n".join([text, *decoded])
    return documents


def inline_bytes(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [value for key, value in node.items() if key == "inline_bytes" and isinstance(value, str)]
        return found + [item for value in node.values() for item in inline_bytes(value)]
    if isinstance(node, list):
        return [item for value in node for item in inline_bytes(value)]
    return []


def test_envoy_admin_shows_no_secret(parley_up: tuple[ParleyProcess, EmbeddedPorts], data_dir: Path) -> None:
    """Finding 2 of issue 11: the admin interface on 127.0.0.1 showed the gateway's master secret."""
    documents = admin_documents(f"http://127.0.0.1:{parley_up[1].admin}")
    secret_files = [*(data_dir / "pki").glob("*-key.pem"), *(data_dir / "secrets").iterdir()]
    # Five private keys, the key-encryption key and the sandbox's webhook signing secret.
    assert len(secret_files) == 7, secret_files
    for name, document in documents.items():
        assert "PRIVATE KEY" not in document, name
        assert "gateway-secret" not in document, name
        flat = document.replace("\\n", "").replace("\n", "")
        for secret_file in secret_files:
            secret = secret_file.read_text()
            body = "".join(line for line in secret.splitlines() if not line.startswith("-----"))
            assert body.strip()
            assert body not in flat, (name, secret_file)
            assert base64.b64encode(secret.encode()).decode() not in document, (name, secret_file)
            for line in body.split():
                assert line not in document, (name, secret_file)
    # The dump is the real one: Envoy's certificate came by SDS, its key is shown redacted.
    dump = documents["/config_dump"]
    assert '"name": "parley_workload_certificate"' in dump
    assert "[redacted]" in dump
    assert "spiffe://parley.local/gateway" in documents["/certs"]


async def test_grpcurl_through_the_gateway_and_direct(
    parley_up: tuple[ParleyProcess, EmbeddedPorts], operator: list[str]
) -> None:
    _, ports = parley_up
    public, internal = parley_services()

    through_gateway = await grpcurl("-plaintext", f"127.0.0.1:{ports.http}", "list")
    assert through_gateway.returncode == 0, through_gateway.stderr
    listed = set(through_gateway.stdout.split())
    assert public <= listed
    assert not internal & listed

    direct = await grpcurl(*operator, f"127.0.0.1:{ports.grpc}", "list")
    assert direct.returncode == 0, direct.stderr
    assert public | internal <= set(direct.stdout.split())

    for transport, port in ((["-plaintext"], ports.http), (operator, ports.grpc)):
        call = await grpcurl(
            *transport, "-d", "{}", f"127.0.0.1:{port}", "parley.billing.v1.BillingService/ListPlans"
        )
        assert call.returncode == 0, call.stderr
        assert [plan["id"] for plan in json.loads(call.stdout)["plans"]] == ["free", "pro", "team"]

    # Without the operator's certificate the services' port does not answer at all.
    plaintext = await grpcurl("-plaintext", f"127.0.0.1:{ports.grpc}", "list")
    assert plaintext.returncode != 0
    assert f'Failed to dial target host "127.0.0.1:{ports.grpc}"' in plaintext.stderr


async def test_parley_grpcurl_adds_the_operators_certificate(
    parley_up: tuple[ParleyProcess, EmbeddedPorts], data_dir: Path
) -> None:
    _, ports = parley_up
    target = f"127.0.0.1:{ports.grpc}"
    listed = await run_parley("grpcurl", "--data-dir", str(data_dir), target, "list", env={})
    assert listed.returncode == 0, listed.describe()
    assert "parley.billing.v1.BillingInternalService" in listed.stdout.split()

    call = await run_parley(
        "grpcurl", "--data-dir", str(data_dir), "-d", '{"page_size": 1}', target, LIST_PLANS, env={}
    )
    assert call.returncode == 0, call.describe()
    assert [plan["id"] for plan in json.loads(call.stdout)["plans"]] == ["free"]

    # The operator is not the edge: the internal credential check stays closed to it.
    probe = await run_parley(
        "grpcurl",
        "--data-dir",
        str(data_dir),
        "-d",
        '{"api_key": "pk_guess"}',
        target,
        "parley.auth.v1.AuthInternalService/CheckApiKey",
        env={},
    )
    assert probe.returncode != 0
    assert "PermissionDenied" in probe.stderr
    assert "operator may not call parley.auth.v1.AuthInternalService/CheckApiKey" in probe.stderr

    elsewhere = await run_parley("grpcurl", "--data-dir", str(data_dir / "nowhere"), target, "list", env={})
    assert elsewhere.returncode == 2
    assert "no operator certificate" in elsewhere.stderr
    assert "Traceback" not in elsewhere.stderr


@pytest.mark.parametrize("case", DESCRIBE_CASES, ids=lambda case: case.symbol)
async def test_grpcurl_describes_every_kind_of_symbol_through_the_gateway_and_direct(
    parley_up: tuple[ParleyProcess, EmbeddedPorts], operator: list[str], case: DescribeCase
) -> None:
    _, ports = parley_up
    await assert_grpcurl_describes(f"127.0.0.1:{ports.http}", case)
    await assert_grpcurl_describes(f"127.0.0.1:{ports.grpc}", case, transport=operator)


async def test_grpcurl_prints_a_request_template_through_the_gateway(
    parley_up: tuple[ParleyProcess, EmbeddedPorts],
) -> None:
    _, ports = parley_up
    result = await grpcurl(
        "-plaintext",
        "-msg-template",
        f"127.0.0.1:{ports.http}",
        "describe",
        "parley.billing.v1.ListPlansRequest",
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.split("Message template:\n", 1)[1]) == {
        "pageSize": 0,
        "pageToken": "",
        "showRetired": False,
    }


async def test_internal_services_are_described_on_the_service_port_only(
    parley_up: tuple[ParleyProcess, EmbeddedPorts], operator: list[str]
) -> None:
    _, ports = parley_up
    _, internal = parley_services()
    reserve_credits = "parley.billing.v1.BillingInternalService.ReserveCredits"
    for symbol in [*sorted(internal), reserve_credits]:
        hidden = await grpcurl("-plaintext", f"127.0.0.1:{ports.http}", "describe", symbol)
        assert hidden.returncode != 0
        assert f"Symbol not found: {symbol}" in hidden.stderr

        shown = await grpcurl(*operator, f"127.0.0.1:{ports.grpc}", "describe", symbol)
        assert shown.returncode == 0, shown.stderr


@pytest.mark.parametrize("version", REFLECTION_VERSIONS)
async def test_both_reflection_versions_answer_through_the_gateway(
    parley_up: tuple[ParleyProcess, EmbeddedPorts], version: str
) -> None:
    _, ports = parley_up
    public, internal = parley_services()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.http}") as channel:
        listing, method, unknown = await reflect(
            channel,
            version,
            reflection_pb2.ServerReflectionRequest(list_services=""),
            symbol_request(LIST_PLANS_METHOD),
            symbol_request("parley.billing.v1.BillingInternalService"),
        )

    assert set(listed_services(listing)) == {
        *public,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    files = files_of(method)
    assert files[0].name == "parley/billing/v1/billing.proto"
    # The public view: the billing file comes without its internal service, nor any file with one.
    assert not internal & service_names_in(files)
    assert "parley.billing.v1.BillingService" in service_names_in(files)
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_internal_services_are_unreachable_through_the_gateway(
    parley_up: tuple[ParleyProcess, EmbeddedPorts], gateway: httpx.Client
) -> None:
    _, ports = parley_up
    call = await grpcurl(
        "-plaintext",
        # Reflection through the gateway does not know internal services, so describe it from the contract.
        "-protoset",
        str(descriptor_set_path()),
        "-d",
        "{}",
        f"127.0.0.1:{ports.http}",
        "parley.billing.v1.BillingInternalService/ReserveCredits",
    )
    assert call.returncode != 0
    assert "Code: Unimplemented" in call.stderr or "Code: NotFound" in call.stderr, call.stderr
    response = gateway.post(
        "/parley.billing.v1.BillingInternalService/ReserveCredits",
        content=b"{}",
        headers={"content-type": "application/json"},
    )
    assert_error_body(response, status=404, grpc_code=5, reason="ROUTE_NOT_FOUND")


def test_metrics_are_served(parley_up: tuple[ParleyProcess, EmbeddedPorts], gateway: httpx.Client) -> None:
    gateway.get("/v1/billing/plans")
    metrics = httpx.get(f"http://127.0.0.1:{parley_up[1].metrics}/metrics", timeout=5.0).text
    assert 'parley_rpc_server_handled_total{grpc_code="OK",grpc_method="ListPlans"' in metrics
    assert 'parley_dependency_up{dependency="database"} 1.0' in metrics


def test_logs_are_json_lines(parley_up: tuple[ParleyProcess, EmbeddedPorts]) -> None:
    records = []
    for line in parley_up[0].output().splitlines():
        if line.startswith("{") and '"service"' in line:
            records.append(json.loads(line))
    assert records, "parley up logged no JSON lines"
    assert all({"time", "level", "service", "message"} <= record.keys() for record in records)


def test_signals_stop_everything_and_a_restart_keeps_the_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ports = EmbeddedPorts()
    env = {**ports.env(), "PARLEY_DATA_DIR": str(data_dir)}
    first = ParleyProcess(["up"], env=env, log_path=tmp_path / "first.log")
    first.start()
    first.wait_until_http_ok(f"http://127.0.0.1:{ports.http}/healthz")
    assert first.process is not None
    children = children_of(first.process.pid)
    commands = sorted(command_of(pid) for pid in children)
    assert len(children) == 2, f"parley up should run Envoy and the edge process as children: {commands}"
    assert any("envoy" in command for command in commands), commands
    assert any("runtime.cli edge" in command for command in commands), commands

    ca = (data_dir / "pki" / "ca.pem").read_bytes()
    # An operator retires a plan directly in the embedded database while Parley runs.
    with sqlite3.connect(data_dir / "parley.db") as connection:
        connection.execute("UPDATE plans SET retired_at = '2026-01-01 00:00:00' WHERE id = 'team'")
    assert first.terminate() == 0
    assert not any(pid_alive(pid) for pid in children), "Envoy or the edge process outlived parley up"

    second = ParleyProcess(["up"], env=env, log_path=tmp_path / "second.log")
    second.start()
    try:
        second.wait_until_http_ok(f"http://127.0.0.1:{ports.http}/healthz")
        plans = httpx.get(f"http://127.0.0.1:{ports.http}/v1/billing/plans", timeout=10).json()["plans"]
        assert [plan["id"] for plan in plans] == ["free", "pro"]
        retired = httpx.get(
            f"http://127.0.0.1:{ports.http}/v1/billing/plans", params={"show_retired": "true"}, timeout=10
        ).json()["plans"]
        assert retired[-1]["id"] == "team"
        assert retired[-1]["retired"] is True
        # The PKI is reused while valid: the same CA (and so the same operator certificate) as before.
        assert (data_dir / "pki" / "ca.pem").read_bytes() == ca
    finally:
        # Ctrl-C in a terminal sends SIGINT to the foreground process; that must stop cleanly too.
        assert second.terminate(signum=signal.SIGINT) == 0
