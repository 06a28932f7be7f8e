"""The shape rules of display names (pure functions); email addresses are in test_email_addresses.py."""

from __future__ import annotations

import pytest

from services.auth.accounts import clean_display_name, display_name_violations


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
