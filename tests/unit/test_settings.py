"""Settings from PARLEY_* variables: defaults, validation and readable errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.settings import SettingsError, load_settings


def test_defaults_give_sqlite_under_the_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PARLEY_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.grpc_port == 50051
    assert settings.http_port == 8080
    assert settings.resolved_database_url == f"sqlite+aiosqlite:///{tmp_path.resolve() / 'parley.db'}"


def test_env_values_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_GRPC_PORT", "6000")
    monkeypatch.setenv("PARLEY_LOG_LEVEL", "debug")
    settings = load_settings()
    assert settings.grpc_port == 6000
    assert settings.log_level == "DEBUG"


def test_bad_values_are_reported_by_variable_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_GRPC_PORT", "not-a-port")
    monkeypatch.setenv("PARLEY_DATABASE_URL", "mysql://x")
    with pytest.raises(SettingsError) as error:
        load_settings()
    message = str(error.value)
    assert message.startswith("Invalid Parley settings:")
    assert "PARLEY_GRPC_PORT" in message
    assert "PARLEY_DATABASE_URL" in message
    assert "async SQLAlchemy driver" in message
    assert "Traceback" not in message


def test_port_clash_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_HTTP_PORT", "50051")
    with pytest.raises(SettingsError, match="each listener needs its own port"):
        load_settings()


def test_secrets_are_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(smtp_password=["hunter2-marker"], smtp_username="u")
    assert "PARLEY_SMTP_PASSWORD" in str(error.value)
    assert "hunter2-marker" not in str(error.value)


def test_auth_settings_have_defaults_and_read_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = load_settings()
    assert settings.access_token_ttl_s == 900
    assert settings.refresh_token_ttl_s == 30 * 24 * 3600
    assert settings.auth_key_encryption_key is None
    assert settings.auth_target is None
    monkeypatch.setenv("PARLEY_AUTH_KEY_ENCRYPTION_KEY", "kek-marker")
    monkeypatch.setenv("PARLEY_AUTH_KEY_ENCRYPTION_KEY_FILE", str(tmp_path / "kek"))
    monkeypatch.setenv("PARLEY_AUTH_SIGNING_KEY_FILE", str(tmp_path / "signing.pem"))
    monkeypatch.setenv("PARLEY_AUTH_TARGET", "auth:50061")
    settings = load_settings()
    assert settings.auth_key_encryption_key is not None
    assert settings.auth_key_encryption_key.get_secret_value() == "kek-marker"
    assert "kek-marker" not in repr(settings)
    assert settings.auth_key_encryption_key_file == tmp_path / "kek"
    assert settings.auth_signing_key_file == tmp_path / "signing.pem"
    assert settings.auth_target == "auth:50061"


def test_the_key_encryption_key_is_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_ACCESS_TOKEN_TTL_S", "5")
    with pytest.raises(SettingsError) as error:
        load_settings(auth_key_encryption_key=["kek-marker"])
    assert "PARLEY_AUTH_KEY_ENCRYPTION_KEY" in str(error.value)
    assert "PARLEY_ACCESS_TOKEN_TTL_S" in str(error.value)
    assert "kek-marker" not in str(error.value)


def test_feature_lists_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_AUTH_REQUIRE_VERIFIED_EMAIL_FOR", "api_keys, chat")
    assert load_settings().auth_require_verified_email_for == frozenset({"api_keys", "chat"})
    monkeypatch.setenv("PARLEY_AUTH_REQUIRE_VERIFIED_EMAIL_FOR", "api_keys,teleport")
    with pytest.raises(SettingsError, match="PARLEY_AUTH_REQUIRE_VERIFIED_EMAIL_FOR"):
        load_settings()


def test_the_service_certificate_defaults_to_the_data_dirs_pki(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_DATA_DIR", "/srv/parley")
    files = load_settings().service_tls_files("chat")
    assert (files.ca_file, files.cert_file, files.key_file) == (
        Path("/srv/parley/pki/ca.pem"),
        Path("/srv/parley/pki/chat.pem"),
        Path("/srv/parley/pki/chat-key.pem"),
    )

    monkeypatch.setenv("PARLEY_SERVICE_CERT_FILE", "/run/secrets/tls.crt")
    monkeypatch.setenv("PARLEY_SERVICE_KEY_FILE", "/run/secrets/tls.key")
    mounted = load_settings().service_tls_files("chat")
    assert (mounted.ca_file, mounted.cert_file, mounted.key_file) == (
        Path("/srv/parley/pki/ca.pem"),
        Path("/run/secrets/tls.crt"),
        Path("/run/secrets/tls.key"),
    )


def test_a_service_certificate_needs_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_SERVICE_CERT_FILE", "/run/secrets/tls.crt")
    with pytest.raises(SettingsError, match="service_cert_file and service_key_file must be set together"):
        load_settings()
