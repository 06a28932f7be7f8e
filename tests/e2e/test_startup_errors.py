"""A port in use is a bad setting, for every listener of every `parley` command: one line naming the
address, what listens there and the flag or variable that moves it, exit code 2, no traceback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.auth.signing_keys import generate_kek
from services.common.pki import MICROSERVICES_CERTIFICATES, ensure_pki
from tests.support.gateway import free_port
from tests.support.microservices import run_parley
from tests.support.parley_process import EmbeddedPorts
from tests.support.tls import self_signed_certificate

pytestmark = pytest.mark.envoy

EXIT_BAD_SETTINGS = 2


@contextmanager
def held(port: int) -> Iterator[None]:
    """Another process's listener on 127.0.0.1:`port`, for the duration of the block."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        yield


@dataclass(frozen=True)
class Case:
    """A command, the listener whose port is taken, and what the error line must name."""

    command: tuple[str, ...]
    setting: str
    # What moves the port: the variable, and the command's flag when it has one.
    names: tuple[str, ...]
    extra_env: dict[str, str] = field(default_factory=dict)
    # A command-line flag that sets the port (the value is appended), instead of the variable.
    port_flag: str | None = None


CASES = [
    Case(("up",), "grpc_port", ("--grpc-port", "PARLEY_GRPC_PORT")),
    Case(("up",), "grpc_port", ("--grpc-port",), port_flag="--grpc-port"),
    Case(("up",), "http_port", ("--http-port", "PARLEY_HTTP_PORT")),
    Case(("up",), "metrics_port", ("PARLEY_METRICS_PORT",)),
    Case(("up",), "edge_port", ("PARLEY_EDGE_PORT",)),
    Case(("up",), "edge_metrics_port", ("PARLEY_EDGE_METRICS_PORT",)),
    Case(("up",), "envoy_admin_port", ("PARLEY_ENVOY_ADMIN_PORT",)),
    Case(("up",), "https_port", ("PARLEY_HTTPS_PORT",)),
    Case(("serve", "auth"), "grpc_port", ("--port", "PARLEY_GRPC_PORT"), port_flag="--port"),
    Case(("serve", "auth"), "metrics_port", ("PARLEY_METRICS_PORT",)),
    Case(("gateway", "--topology", "local"), "edge_port", ("PARLEY_EDGE_PORT",)),
    Case(("gateway", "--topology", "local"), "metrics_port", ("PARLEY_METRICS_PORT",)),
    Case(("gateway", "--topology", "local"), "http_port", ("PARLEY_HTTP_PORT",)),
    Case(("gateway", "--topology", "local"), "envoy_admin_port", ("PARLEY_ENVOY_ADMIN_PORT",)),
    Case(("gateway", "--topology", "local"), "https_port", ("PARLEY_HTTPS_PORT",)),
    Case(("edge",), "edge_port", ("--port", "PARLEY_EDGE_PORT"), port_flag="--port"),
    Case(("edge",), "edge_metrics_port", ("PARLEY_EDGE_METRICS_PORT",)),
    Case(("worker", "relay"), "metrics_port", ("PARLEY_METRICS_PORT",)),
    Case(("worker", "email"), "metrics_port", ("PARLEY_METRICS_PORT",)),
]


def _env(tmp_path: Path) -> dict[str, str]:
    ports = EmbeddedPorts()
    certificate, key = self_signed_certificate(tmp_path)
    # Every process finds its workload's certificate in the data dir, as after `parley pki init`.
    ensure_pki(tmp_path / "data" / "pki", MICROSERVICES_CERTIFICATES)
    return {
        **ports.env(),
        "PARLEY_HTTPS_PORT": str(free_port()),
        "PARLEY_TLS_CERT_FILE": str(certificate),
        "PARLEY_TLS_KEY_FILE": str(key),
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
        "PARLEY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'data' / 'parley.db'}",
        "PARLEY_AUTH_KEY_ENCRYPTION_KEY": generate_kek(),
        # The workers refuse to start without the streams' Redis (not contacted before they listen).
        "PARLEY_REDIS_URL": "redis://127.0.0.1:1/0",
    }


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{' '.join(c.command)}:{c.setting}{'(flag)' if c.port_flag else ''}" for c in CASES]
)
async def test_a_port_in_use_is_one_line_and_exit_2(case: Case, tmp_path: Path) -> None:
    env = _env(tmp_path)
    await run_parley("migrate", env=env)
    port = free_port()
    args = list(case.command)
    if case.port_flag is not None:
        args += [case.port_flag, str(port)]
    else:
        env[f"PARLEY_{case.setting.upper()}"] = str(port)
    with held(port):
        result = await run_parley(*args, env=env, timeout_s=60)
    assert result.returncode == EXIT_BAD_SETTINGS, result.describe()
    assert "Traceback" not in result.stdout + result.stderr, result.describe()
    # Besides the log lines (JSON) of what started before, one line: the error.
    said = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(said) == 1, result.describe()
    (line,) = said
    assert line.startswith("parley: "), line
    assert result.stderr.rstrip().endswith(line), "the error is the last thing said"
    assert f"127.0.0.1:{port}" in line, line
    for name in case.names:
        assert name in line, line
