"""`parley pki init` (the CA and the workloads' certificates for microservices mode and tests) and
`parley grpcurl` (grpcurl with the operator's certificate), ADR 14."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from runtime.command_errors import EXIT_BAD_INPUT, CommandError
from services.common.pki import (
    OPERATOR,
    SERVICE_WORKLOADS,
    CertificateSpec,
    PkiError,
    ensure_pki,
    server_name,
)
from services.common.settings import Settings

# A fully qualified Parley symbol names its area: `parley.billing.v1.BillingService/ListPlans`.
_PARLEY_SYMBOL = re.compile(r"^parley\.([a-z]+)\.v\d+\.")
# The server name grpcurl checks when no argument names a service (any works on `parley up`'s port).
DEFAULT_GRPCURL_SERVER = "auth"


def init_pki(directory: Path, specs: Sequence[str], stdout: TextIO) -> int:
    """Create or renew the CA and the certificates in `directory`; print what was done."""
    try:
        parsed = [CertificateSpec.parse(spec) for spec in specs]
        report = ensure_pki(directory, parsed)
    except PkiError as error:
        raise CommandError(f"parley pki init: {error}", exit_code=EXIT_BAD_INPUT) from None
    except OSError as error:
        raise CommandError(
            f"parley pki init: cannot write {directory}: {error}", exit_code=EXIT_BAD_INPUT
        ) from None
    stdout.write(f"PKI in {report.directory}\n")
    for status in (report.ca, *report.certificates):
        workloads = ",".join(status.workloads) or "(certificate authority)"
        stdout.write(
            f"  {status.name:<10} {status.action:<8} valid until {status.not_after:%Y-%m-%d}  {workloads}\n"
        )
    return 0


def grpcurl_command(settings: Settings, server: str | None, arguments: Sequence[str]) -> list[str]:
    """grpcurl with the operator's certificate, checking that the server is workload `server` (else the
    area of the first Parley symbol in `arguments`, else DEFAULT_GRPCURL_SERVER)."""
    files = settings.service_tls_files(OPERATOR)
    missing = files.missing()
    if missing:
        raise CommandError(
            f"parley grpcurl: no operator certificate ({', '.join(map(str, missing))}); `parley up` makes "
            f"one in its data dir, `parley pki init --dir DIR` in DIR; or set PARLEY_SERVICE_*_FILE",
            exit_code=EXIT_BAD_INPUT,
        )
    binary = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    expected = server or _server_named_in(arguments)
    return [
        binary,
        "-cacert",
        str(files.ca_file),
        "-cert",
        str(files.cert_file),
        "-key",
        str(files.key_file),
        "-servername",
        server_name(expected),
        *arguments,
    ]


def run_grpcurl(settings: Settings, server: str | None, arguments: Sequence[str]) -> int:
    """Run grpcurl (stdin and stdout are the terminal's); returns its exit code."""
    command = grpcurl_command(settings, server, arguments)
    try:
        return subprocess.run(command, check=False).returncode  # noqa: S603 - our own argument list
    except FileNotFoundError:
        raise CommandError(f"parley grpcurl: {command[0]} not found", exit_code=EXIT_BAD_INPUT) from None


def _server_named_in(arguments: Sequence[str]) -> str:
    for argument in arguments:
        match = _PARLEY_SYMBOL.match(argument)
        if match and match.group(1) in SERVICE_WORKLOADS:
            return match.group(1)
    return DEFAULT_GRPCURL_SERVER
