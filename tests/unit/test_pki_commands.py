"""`parley pki init` and `parley grpcurl` (runtime/pki_commands.py), run through the CLI entry point."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from runtime.cli import main
from runtime.pki_commands import grpcurl_command
from services.common.pki import TlsFiles, workloads_of_certificate
from services.common.settings import load_settings
from tests.support.pki import ServicePki


def certificate_workloads(path: Path) -> set[str]:
    return set(workloads_of_certificate(x509.load_pem_x509_certificate(path.read_bytes())))


def test_pki_init_issues_the_microservices_set_then_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "pki"

    assert main(["pki", "init", "--dir", str(directory)]) == 0
    first = capsys.readouterr().out
    assert first.startswith(f"PKI in {directory}\n")
    assert "ca         issued" in first
    for name in ("auth", "chat", "billing", "analytics", "gateway", "edge", "operator"):
        assert f"  {name:<10} issued" in first
    # `parley gateway` runs Envoy and the edge server: one certificate names both.
    assert certificate_workloads(directory / "gateway.pem") == {"gateway", "edge"}
    assert certificate_workloads(directory / "edge.pem") == {"edge"}
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700

    assert main(["pki", "init", "--dir", str(directory)]) == 0
    again = capsys.readouterr().out
    assert "issued" not in again
    assert again.count(" kept ") == 8


def test_pki_init_defaults_to_the_data_dir_and_takes_specs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["pki", "init", "--data-dir", str(tmp_path), "--workloads", "mesh=auth,chat", "operator"]) == 0
    )
    assert "mesh       issued" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "pki").glob("*.pem")) == [
        "ca-key.pem",
        "ca.pem",
        "mesh-key.pem",
        "mesh.pem",
        "operator-key.pem",
        "operator.pem",
    ]
    assert certificate_workloads(tmp_path / "pki" / "mesh.pem") == {"auth", "chat"}


@pytest.mark.parametrize("spec", ["Auth", "x=", "ca", "a/b"])
def test_pki_init_refuses_a_bad_spec_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str
) -> None:
    assert main(["pki", "init", "--dir", str(tmp_path / "pki"), "--workloads", spec]) == 2
    error = capsys.readouterr().err
    assert error.startswith("parley pki init: ")
    assert error.count("\n") == 1
    assert not (tmp_path / "pki").exists()


def test_grpcurl_gets_the_operators_files_and_the_servers_name(service_pki: ServicePki) -> None:
    operator = service_pki.files("operator")
    settings = load_settings(
        service_ca_file=operator.ca_file,
        service_cert_file=operator.cert_file,
        service_key_file=operator.key_file,
    )

    def flags(server: str | None, *arguments: str) -> list[str]:
        return grpcurl_command(settings, server, arguments)[1:]

    tls = ["-cacert", str(operator.ca_file), "-cert", str(operator.cert_file), "-key", str(operator.key_file)]
    assert flags(None, "-d", "{}", "h:1", "parley.billing.v1.BillingService/ListPlans") == [
        *tls,
        "-servername",
        "billing.parley.local",
        "-d",
        "{}",
        "h:1",
        "parley.billing.v1.BillingService/ListPlans",
    ]
    assert flags(None, "h:1", "list")[-4:] == ["-servername", "auth.parley.local", "h:1", "list"]
    assert flags("edge", "h:1", "describe", "parley.chat.v1.ChatService")[-5:-3] == [
        "-servername",
        "edge.parley.local",
    ]


def test_grpcurl_leaves_every_argument_after_its_own_options_to_grpcurl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `-d` right after `--data-dir` is grpcurl's; the missing certificate is the one-line error.
    assert main(["grpcurl", "--data-dir", str(tmp_path), "-d", "{}", "127.0.0.1:1", "list"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("parley grpcurl: no operator certificate")
    assert str(TlsFiles.in_directory(tmp_path / "pki", "operator").cert_file) in error
