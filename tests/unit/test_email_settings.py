"""The email worker's settings: SMTP, sender, public base URL and the per-domain rate."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.settings import SettingsError, load_settings


def test_defaults_mean_no_smtp_and_local_links() -> None:
    settings = load_settings()
    assert settings.smtp_host is None
    assert (settings.smtp_port, settings.smtp_security) == (587, "starttls")
    assert settings.public_base_url == "http://127.0.0.1:8080"
    assert settings.smtp_per_domain_per_minute >= 1 and settings.smtp_per_domain_burst >= 1


def test_smtp_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PARLEY_SMTP_HOST", "smtp.example.com")
    monkeypatch.setenv("PARLEY_SMTP_PORT", "465")
    monkeypatch.setenv("PARLEY_SMTP_SECURITY", "tls")
    monkeypatch.setenv("PARLEY_SMTP_USERNAME", "mailer")
    monkeypatch.setenv("PARLEY_SMTP_PASSWORD", "hunter2-long")
    monkeypatch.setenv("PARLEY_MAIL_FROM", "Parley <no-reply@example.com>")
    monkeypatch.setenv("PARLEY_PUBLIC_BASE_URL", "https://parley.example.com/")
    settings = load_settings()
    assert settings.smtp_host == "smtp.example.com"
    assert (settings.smtp_port, settings.smtp_security) == (465, "tls")
    assert settings.smtp_password is not None
    assert settings.smtp_password.get_secret_value() == "hunter2-long"
    assert "hunter2-long" not in repr(settings)
    assert settings.public_base_url == "https://parley.example.com"


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"public_base_url": "parley.example.com"}, "absolute http(s) URL"),
        ({"public_base_url": "https://parley.example.com/?a=1"}, "query or fragment"),
        ({"mail_from": "nobody"}, "is not an address"),
        ({"smtp_username": "mailer"}, "set together"),
        ({"smtp_security": "ssl"}, "PARLEY_SMTP_SECURITY"),
        ({"smtp_per_domain_per_minute": 0}, "PARLEY_SMTP_PER_DOMAIN_PER_MINUTE"),
    ],
)
def test_bad_email_settings_are_refused(overrides: dict[str, object], complaint: str) -> None:
    with pytest.raises(SettingsError, match="Invalid Parley settings") as error:
        load_settings(**overrides)
    assert complaint in str(error.value)


def test_a_bad_smtp_password_is_never_echoed() -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(smtp_username="mailer", smtp_password=["hunter2-list"])
    assert "PARLEY_SMTP_PASSWORD" in str(error.value)
    assert "hunter2-list" not in str(error.value)
