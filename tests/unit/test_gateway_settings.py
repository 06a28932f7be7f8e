"""`envoy/gateway.yaml` through its pydantic models: every kind of mistake is refused in one line that
names the file, the key and (for an unknown key) the keys allowed there; and `parley` reports a bad
data file like a bad setting, with exit code 2."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import settings as gateway_settings
from gateway.settings import SETTINGS_FILE, GatewayConfigError, load_gateway_settings
from runtime.cli import EXIT_BAD_SETTINGS, main
from services.common.settings import SettingsError
from tests.support.pki import ServicePki

Mutation = Callable[[dict[str, Any]], None]


def shipped_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(SETTINGS_FILE.read_text(encoding="utf-8"))
    return document


def _set(*path: Any, value: Any) -> Mutation:
    def mutate(document: dict[str, Any]) -> None:
        target = document
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return mutate


def _rename(*path: Any, to: str) -> Mutation:
    def mutate(document: dict[str, Any]) -> None:
        target = document
        for part in path[:-1]:
            target = target[part]
        target[to] = target.pop(path[-1])

    return mutate


def _delete(*path: Any) -> Mutation:
    def mutate(document: dict[str, Any]) -> None:
        target = document
        for part in path[:-1]:
            target = target[part]
        del target[path[-1]]

    return mutate


def refusal(tmp_path: Path, mutate: Mutation) -> str:
    document = copy.deepcopy(shipped_document())
    mutate(document)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    with pytest.raises(GatewayConfigError) as raised:
        load_gateway_settings(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    assert isinstance(raised.value, SettingsError)
    return message.removeprefix(f"{path}: ")


def test_the_shipped_file_loads_into_typed_sections() -> None:
    settings = load_gateway_settings()
    assert settings.timeouts.unary_s == 15
    assert settings.health_check.healthy_panic_threshold_percent == 0.0
    assert next(iter(settings.security_headers)) == "X-Content-Type-Options"
    assert settings.authentication.ext_authz_headers[0] == "authorization"
    deprecation = settings.api_versions.deprecated["parley.chat.v1"]
    assert deprecation.successor == "parley.chat.v2"
    assert deprecation.sunset.tzinfo is not None
    not_found = settings.local_replies[0]
    assert (not_found.status_low, not_found.status_high, not_found.reason) == (404, 404, "ROUTE_NOT_FOUND")
    server_errors = settings.local_replies[-1]
    assert (server_errors.status_low, server_errors.status_high) == (500, 599)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        pytest.param(
            _rename("timeouts", "unary_s", to="unary_sx"),
            "timeouts.unary_sx: unknown key; did you mean 'unary_s'? (allowed here: connect_ms, "
            "downstream_idle_s, request_headers_s, stream_idle_s, stream_s, unary_s); "
            "timeouts.unary_s: required key is missing",
            id="typo-in-a-section",
        ),
        pytest.param(
            _rename("health_check", to="health_checks"),
            "health_checks: unknown key; did you mean 'health_check'? (allowed here: api_versions,",
            id="typo-of-a-section",
        ),
        pytest.param(
            _set("authentication", "role_required", 0, "rol", value="admin"),
            "authentication.role_required[0].rol: unknown key; did you mean 'role'? "
            "(allowed here: role, service_suffix)",
            id="typo-in-a-list-item",
        ),
        pytest.param(
            _set("api_versions", "deprecated", "parley.chat.v1", "sunset_at", value="2027-01-01"),
            "api_versions.deprecated['parley.chat.v1'].sunset_at: unknown key; did you mean 'sunset'? "
            "(allowed here: deprecated_at, successor, sunset)",
            id="typo-under-a-mapping-key",
        ),
        pytest.param(
            _set("local_replies", 2, "metadta", value={}),
            "local_replies[2].metadta: unknown key; did you mean 'metadata'?",
            id="typo-in-a-local-reply",
        ),
        pytest.param(
            _set("timeouts", "unary_s", value="15"),
            "timeouts.unary_s: Input should be a valid integer (got '15')",
            id="number-as-text",
        ),
        pytest.param(
            _set("limits", "max_request_headers_kb", value=0),
            "limits.max_request_headers_kb: Input should be greater than 0 (got 0)",
            id="zero-limit",
        ),
        pytest.param(
            _set("health_check", "healthy_panic_threshold_percent", value=150),
            "health_check.healthy_panic_threshold_percent: Input should be less than or equal to 100",
            id="percent-out-of-range",
        ),
        pytest.param(
            _set("retries", "num_retries", value=True),
            "retries.num_retries: Input should be a valid integer (got True)",
            id="bool-as-number",
        ),
        pytest.param(
            _set("grpc_only_response_headers", value="grpc-status"),
            "grpc_only_response_headers: Input should be a valid tuple (got 'grpc-status')",
            id="text-instead-of-a-list",
        ),
        pytest.param(
            _set("security_headers", value=["X-Frame-Options: DENY"]),
            "security_headers must be a mapping, got list",
            id="list-instead-of-a-mapping",
        ),
        pytest.param(_delete("error_domain"), "error_domain: required key is missing", id="missing-key"),
        pytest.param(_delete("cors"), "cors: required key is missing", id="missing-section"),
        pytest.param(
            _set("healthz", "path", value="healthz"),
            "healthz.path: String should match pattern '^/'",
            id="path-without-slash",
        ),
        pytest.param(
            _set("authentication", "open_methods", value=["AuthService.Login"]),
            "'AuthService.Login' is not a gRPC method 'package.Service/Method'",
            id="open-method-not-a-method",
        ),
        pytest.param(
            _set("local_replies", 0, "status_range", value=[400, 499]),
            "local_replies[0]: give either status or status_range",
            id="status-and-range",
        ),
        pytest.param(
            _set("local_replies", 0, "status", value=200),
            "local_replies[0].status: Input should be greater than or equal to 400 (got 200)",
            id="status-not-an-error",
        ),
        pytest.param(
            _set("local_replies", 0, "reason", value="route_not_found"),
            "local_replies[0].reason: 'route_not_found' is not an UPPER_SNAKE reason",
            id="reason-not-upper-snake",
        ),
        pytest.param(
            _set("api_versions", "deprecated", "parley.chat.v1", "sunset", value="2026-01-01T00:00:00Z"),
            "api_versions.deprecated['parley.chat.v1']: the sunset must come after the deprecation",
            id="sunset-before-deprecation",
        ),
        pytest.param(
            _set("api_versions", "deprecated", "parley.chat.v1", "sunset", value="next summer"),
            "api_versions.deprecated['parley.chat.v1'].sunset: Input should be a valid datetime",
            id="sunset-not-a-time",
        ),
    ],
)
def test_a_mistake_is_refused_in_one_line_naming_the_key(
    tmp_path: Path, mutate: Mutation, expected: str
) -> None:
    assert expected in refusal(tmp_path, mutate)


def test_several_unknown_keys_of_one_section_are_named_together(tmp_path: Path) -> None:
    def two_typos(document: dict[str, Any]) -> None:
        document["cors"]["allow_origin"] = "*"
        document["cors"]["max_age"] = 600

    assert refusal(tmp_path, two_typos) == (
        "cors.allow_origin, cors.max_age: unknown keys "
        "(allowed here: allow_headers, allow_methods, expose_headers, max_age_s)"
    )


def test_header_names_are_lower_cased() -> None:
    settings = load_gateway_settings()
    for name in (*settings.grpc_only_response_headers, *settings.authentication.ext_authz_headers):
        assert name == name.lower()


def test_an_unreadable_or_broken_file_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(GatewayConfigError, match="cannot be read"):
        load_gateway_settings(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("timeouts: {unary_s: 1\n", encoding="utf-8")
    with pytest.raises(GatewayConfigError, match="is not valid YAML") as not_yaml:
        load_gateway_settings(broken)
    assert "\n" not in str(not_yaml.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- timeouts\n", encoding="utf-8")
    with pytest.raises(GatewayConfigError, match="the document must be a mapping, got list"):
        load_gateway_settings(listed)


# ---- how `parley` reports a bad data file -------------------------------------------------------


@pytest.fixture
def gateway_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, service_pki: ServicePki) -> Path:
    """The environment `parley gateway` needs, isolated; returns where `--render` would write."""
    gateway = service_pki.files("gateway")
    monkeypatch.setenv("PARLEY_SERVICE_CA_FILE", str(gateway.ca_file))
    monkeypatch.setenv("PARLEY_SERVICE_CERT_FILE", str(gateway.cert_file))
    monkeypatch.setenv("PARLEY_SERVICE_KEY_FILE", str(gateway.key_file))
    monkeypatch.setenv("PARLEY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GRPC_ENABLE_FORK_SUPPORT", "false")
    return tmp_path / "envoy.yaml"


def test_parley_gateway_reports_a_bad_rate_limit_file_as_a_setting(
    gateway_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    limits = tmp_path / "ratelimits.yaml"
    limits.write_text(
        "domain: parley\nlimits: []\nroutes: {default: {on_failure: allow}}\n", encoding="utf-8"
    )
    monkeypatch.setenv("PARLEY_RATE_LIMITS_FILE", str(limits))

    assert main(["gateway", "--topology", "local", "--render", str(gateway_env)]) == EXIT_BAD_SETTINGS
    error = capsys.readouterr().err
    assert error.startswith(f"{limits}: limits: ")
    assert "routes.default.descriptors: required key is missing" in error
    assert error.count("\n") == 1
    assert not gateway_env.exists()


def test_parley_gateway_reports_a_typo_in_gateway_yaml_as_a_setting(
    gateway_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings_file = tmp_path / "gateway.yaml"
    document = shipped_document()
    document["timeouts"]["unary_sx"] = document["timeouts"].pop("unary_s")
    settings_file.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    monkeypatch.setattr(gateway_settings, "SETTINGS_FILE", settings_file)

    assert main(["gateway", "--topology", "local", "--render", str(gateway_env)]) == EXIT_BAD_SETTINGS
    error = capsys.readouterr().err
    assert error.startswith(f"{settings_file}: timeouts.unary_sx: unknown key; did you mean 'unary_s'?")
    assert error.count("\n") == 1
    assert "Traceback" not in error
