"""The shape rules of account fields: email addresses and display names (pure functions)."""

from __future__ import annotations

import pytest

from services.auth.accounts import (
    clean_display_name,
    display_name_violations,
    email_violations,
    normalize_email,
)


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("ada@example.com", "ada@example.com"),
        ("  Ada.Lovelace@Example.COM \t", "ada.lovelace@example.com"),
        ("ada+parley@mail.example.co.uk", "ada+parley@mail.example.co.uk"),
        ("o'brien@xn--bcher-kva.example", "o'brien@xn--bcher-kva.example"),
        ("a" * 64 + "@example.com", "a" * 64 + "@example.com"),
    ],
)
def test_valid_emails_are_normalized(given: str, stored: str) -> None:
    assert normalize_email(given) == stored
    assert email_violations(stored) == []


@pytest.mark.parametrize(
    "email",
    [
        "",
        "   ",
        "plainaddress",
        "@example.com",
        "ada@",
        "ada@localhost",
        "ada@@example.com",
        "ada lovelace@example.com",
        "ada@exa mple.com",
        "ada@-example.com",
        "ada@example-.com",
        "ada@example..com",
        "ada@.example.com",
        "ada@exam\nple.com",
        "ad\x00a@example.com",
        '"ada"@example.com',
        "ada@exämple.com",
        "a" * 65 + "@example.com",
        "ada@" + "a" * 310 + ".com",
        "a" * 300 + "@" + "b" * 30 + ".com",
    ],
)
def test_malformed_emails_are_one_violation_on_the_field(email: str) -> None:
    found = email_violations(normalize_email(email), field_name="email")
    assert [(v.field, v.reason) for v in found] == [("email", "INVALID_ARGUMENT")]


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        ("Ada", True),
        ("x" * 100, True),
        ("  " + "x" * 100 + "  ", True),
        ("Zoë 👩‍💻", True),
        ("李小龍", True),
        ("", False),
        ("   ", False),
        ("x" * 101, False),
        ("Ada\nLovelace", False),
        ("Ada\tLovelace", False),
        ("Ada\x00", False),
        ("Ada\u2028Lovelace", False),
        ("Ada\u202eecalevoL", False),
        ("Ada\u2066x", False),
    ],
)
def test_display_names_are_1_to_100_characters_without_control_characters(name: str, accepted: bool) -> None:
    found = display_name_violations(clean_display_name(name))
    if accepted:
        assert found == []
    else:
        assert [(v.field, v.reason) for v in found] == [("display_name", "INVALID_ARGUMENT")]


def test_display_names_are_nfc_normalized() -> None:
    assert clean_display_name("Zoe\u0308") == "Zoë"
