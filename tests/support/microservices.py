"""Microservices mode from a test: `parley` commands run to completion, and the four `parley serve`
processes plus `parley gateway` started on free ports, each waited for (bounded)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from services.auth.signing_keys import generate_kek
from services.common.pki import GATEWAY, MICROSERVICES_CERTIFICATES, TlsFiles, ensure_pki
from services.common.settings import SERVICE_NAMES, ServiceName
from tests.support.gateway import free_port, run_to_completion
from tests.support.parley_process import PARLEY, REPO_ROOT, ParleyProcess
from tests.support.pki import ServicePki
from tests.support.rate_limits import generous_rate_limits

# Every wait for a process to come up is bounded by this; failures carry the process output tail.
WAIT_S = 20.0
SHUTDOWN_GRACE_S = 3.0


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


def cli_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """This environment without any PARLEY_* variable, plus `overrides`: only what a test sets counts."""
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("PARLEY_")}
    return {**inherited, **overrides}


async def run_parley(*args: str, env: Mapping[str, str], timeout_s: float = 60.0) -> CliResult:
    """Run a `parley` command that is meant to finish, without blocking the event loop."""
    try:
        returncode, stdout, stderr = await run_to_completion(
            str(PARLEY), *args, timeout_s=timeout_s, env=cli_env(env), cwd=REPO_ROOT
        )
    except TimeoutError:
        raise AssertionError(f"parley {' '.join(args)} did not finish within {timeout_s}s") from None
    return CliResult(returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"))


async def migrate(database_url: str) -> CliResult:
    result = await run_parley("migrate", "--database-url", database_url, env={})
    assert result.returncode == 0, result.describe()
    return result


def certificate_env(files: TlsFiles) -> dict[str, str]:
    """The variables that give a `parley` process its certificate."""
    return {
        "PARLEY_SERVICE_CA_FILE": str(files.ca_file),
        "PARLEY_SERVICE_CERT_FILE": str(files.cert_file),
        "PARLEY_SERVICE_KEY_FILE": str(files.key_file),
    }


@dataclass
class Microservices:
    """Four `parley serve` processes and one `parley gateway` (local topology) on free ports."""

    services: dict[ServiceName, ParleyProcess]
    grpc_ports: dict[ServiceName, int]
    gateway: ParleyProcess
    http_port: int
    # What `parley pki init` makes: every process's certificate, and the operator's.
    pki: ServicePki

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def grpc_target(self, service: ServiceName) -> str:
        return f"127.0.0.1:{self.grpc_ports[service]}"

    @property
    def processes(self) -> list[ParleyProcess]:
        return [*self.services.values(), self.gateway]

    def output_tails(self) -> str:
        return "\n".join(
            f"=== parley {' '.join(process.args)}\n{process.output()[-2000:]}" for process in self.processes
        )


@asynccontextmanager
async def running_microservices(
    directory: Path,
    database_url: str,
    redis_url: str,
    *,
    database_urls: Mapping[ServiceName, str] | None = None,
    service_env: Mapping[ServiceName, Mapping[str, str]] | None = None,
    gateway_env: Mapping[str, str] | None = None,
) -> AsyncIterator[Microservices]:
    """Start all five processes at once and yield when each has said it is listening.

    `redis_url` is where the services' event consumers read the streams (billing needs it).
    `database_urls` replaces the database URL of single services (e.g. billing behind a proxy);
    `service_env` adds variables to single services, `gateway_env` to the gateway. Whatever is
    still running at the end is killed. Each process is given its certificate by file, as k8s does.
    """
    pki = ServicePki(directory / "pki")
    ensure_pki(pki.directory, MICROSERVICES_CERTIFICATES)
    grpc_ports = {name: free_port() for name in SERVICE_NAMES}
    # What an operator gives microservices: the signing keys' encryption key (auth), and where auth
    # serves the JWKS that every other service verifies tokens with.
    kek = generate_kek()
    services = {
        name: ParleyProcess(
            ["serve", name, "--port", str(grpc_ports[name])],
            env={
                "PARLEY_DATABASE_URL": (database_urls or {}).get(name, database_url),
                "PARLEY_REDIS_URL": redis_url,
                **certificate_env(pki.files(name)),
                "PARLEY_AUTH_KEY_ENCRYPTION_KEY": kek,
                "PARLEY_AUTH_TARGET": f"127.0.0.1:{grpc_ports['auth']}",
                "PARLEY_METRICS_PORT": str(free_port()),
                "PARLEY_SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S),
                **(service_env or {}).get(name, {}),
            },
            log_path=directory / f"{name}.log",
        )
        for name in SERVICE_NAMES
    }
    http_port = free_port()
    gateway = ParleyProcess(
        [
            "gateway",
            "--topology",
            "local",
            *(f"--upstream={name}=127.0.0.1:{port}" for name, port in grpc_ports.items()),
        ],
        env={
            **certificate_env(pki.files(GATEWAY)),
            "PARLEY_HTTP_PORT": str(http_port),
            "PARLEY_ENVOY_ADMIN_PORT": str(free_port()),
            "PARLEY_EDGE_PORT": str(free_port()),
            "PARLEY_DATA_DIR": str(directory / "gateway-data"),
            "PARLEY_SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S),
            # The edge checks API keys and sessions with auth; health polling must not meet a limit.
            "PARLEY_AUTH_TARGET": f"127.0.0.1:{grpc_ports['auth']}",
            "PARLEY_RATE_LIMITS_FILE": str(generous_rate_limits()),
            "PARLEY_METRICS_PORT": str(free_port()),
            **(gateway_env or {}),
        },
        log_path=directory / "gateway.log",
    )
    running = Microservices(services, grpc_ports, gateway, http_port, pki)
    try:
        for process in running.processes:
            process.start()
        await asyncio.gather(
            *(
                services[name].wait_for_output(
                    f"parley {name} serving gRPC on 127.0.0.1:{grpc_ports[name]}", timeout_s=WAIT_S
                )
                for name in SERVICE_NAMES
            ),
            gateway.wait_for_output(
                f"parley gateway (local) listening on http://127.0.0.1:{http_port}", timeout_s=WAIT_S
            ),
        )
        yield running
    finally:
        for process in running.processes:
            process.kill()
