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
        load_settings(gateway_secret=["hunter2-marker"])
    assert "PARLEY_GATEWAY_SECRET" in str(error.value)
    assert "hunter2-marker" not in str(error.value)
