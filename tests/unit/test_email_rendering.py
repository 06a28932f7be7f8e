"""Email templates: every template renders both parts from its declared parameters, links sit on
the public base URL, HTML is escaped, and bad jobs fail with typed permanent errors that never
repeat a parameter's value."""

from __future__ import annotations

import pytest

from services.email.errors import (
    EmailTemplateError,
    InvalidTemplateParamError,
    MissingTemplateParamError,
    PermanentDeliveryError,
    UnknownTemplateError,
)
from services.email.rendering import TEMPLATES, format_money, render
from tests.support.mail import SAMPLE_LINK_PATHS, SAMPLE_PARAMS

BASE_URL = "https://app.parley.test"
CONTRACT_TEMPLATES = {
    "verify_email",
    "password_reset",
    "welcome",
    "new_login",
    "invoice_receipt",
    "payment_failed",
    "quota_80",
    "quota_100",
}


def test_the_contracts_templates_all_exist() -> None:
    assert set(TEMPLATES) == CONTRACT_TEMPLATES == set(SAMPLE_PARAMS)


@pytest.mark.parametrize("template", sorted(CONTRACT_TEMPLATES))
def test_each_template_renders_text_and_html_with_a_link_on_the_base_url(template: str) -> None:
    rendered = render(template, SAMPLE_PARAMS[template], BASE_URL + "/")

    link = BASE_URL + SAMPLE_LINK_PATHS[template]
    assert rendered.subject and "\n" not in rendered.subject
    assert rendered.text.startswith("Hello Ada,\n")
    assert link in rendered.text
    assert "<" not in rendered.text
    assert rendered.html.startswith("<!DOCTYPE html>")
    assert f'href="{link.replace("&", "&amp;")}"' in rendered.html
    assert "Hello Ada," in rendered.html


def test_verify_email_link_carries_the_token_on_the_base_url() -> None:
    rendered = render("verify_email", SAMPLE_PARAMS["verify_email"], "https://parley.example.com/app")
    assert "https://parley.example.com/app/verify-email?token=tok-verify-0123456789" in rendered.text
    assert "27 November 2026, 08:00 UTC" in rendered.text


def test_html_is_escaped_and_text_is_not() -> None:
    params = {
        **SAMPLE_PARAMS["invoice_receipt"],
        "display_name": "Tom & <b>Jerry</b>",
        "invoice_number": '"1"',
    }
    rendered = render("invoice_receipt", params, BASE_URL)
    assert "Tom &amp; &lt;b&gt;Jerry&lt;/b&gt;" in rendered.html
    assert "<b>Jerry</b>" not in rendered.html
    assert "&#34;1&#34;" in rendered.html
    assert "Hello Tom & <b>Jerry</b>," in rendered.text
    assert rendered.subject == 'Your Parley receipt "1"'


def test_values_are_formatted_for_people() -> None:
    quota = render("quota_80", SAMPLE_PARAMS["quota_80"], BASE_URL)
    assert "800,000 of the 1,000,000 tokens" in quota.text
    assert "01 December 2026, 00:00 UTC" in quota.text
    receipt = render("invoice_receipt", SAMPLE_PARAMS["invoice_receipt"], BASE_URL)
    assert "29.00 EUR" in receipt.text
    # A time given in another offset is shown in UTC.
    login = render(
        "new_login", {**SAMPLE_PARAMS["new_login"], "login_time": "2026-11-26T10:15:00+02:00"}, BASE_URL
    )
    assert "26 November 2026, 08:15 UTC" in login.text


def test_optional_parameters_change_the_text_only_when_given() -> None:
    with_device = render("new_login", SAMPLE_PARAMS["new_login"], BASE_URL)
    without = render(
        "new_login", {k: v for k, v in SAMPLE_PARAMS["new_login"].items() if k != "device_name"}, BASE_URL
    )
    assert "(Firefox on Linux)" in with_device.text
    assert "Firefox" not in without.text and "()" not in without.text
    retrying = render("payment_failed", SAMPLE_PARAMS["payment_failed"], BASE_URL)
    final = render(
        "payment_failed",
        {k: v for k, v in SAMPLE_PARAMS["payment_failed"].items() if k != "next_retry_time"},
        BASE_URL,
    )
    assert "We will try again on 29 November 2026" in retrying.text
    assert "That was our last attempt" in final.text


@pytest.mark.parametrize(
    ("amount_minor", "currency", "shown"),
    [
        (2900, "EUR", "29.00 EUR"),
        (123456789, "USD", "1,234,567.89 USD"),
        (-5, "GBP", "-0.05 GBP"),
        (500, "JPY", "500 JPY"),
    ],
)
def test_format_money(amount_minor: int, currency: str, shown: str) -> None:
    assert format_money(amount_minor, currency) == shown


def test_an_unknown_template_is_a_permanent_error() -> None:
    with pytest.raises(UnknownTemplateError) as error:
        render("newsletter", {}, BASE_URL)
    assert isinstance(error.value, PermanentDeliveryError)
    assert error.value.template == "newsletter"


def test_missing_parameters_are_named() -> None:
    with pytest.raises(MissingTemplateParamError) as error:
        render("password_reset", {"display_name": "Ada", "link_path": ""}, BASE_URL)
    assert isinstance(error.value, EmailTemplateError)
    assert error.value.missing == ("expire_time", "link_path")


@pytest.mark.parametrize(
    "link_path",
    [
        "https://evil.test/verify-email?token=tok-secret",
        "//evil.test/verify-email?token=tok-secret",
        "/\\evil.test/?token=tok-secret",
        "/verify email?token=tok-secret",
        "verify-email?token=tok-secret",
    ],
)
def test_a_link_path_off_our_site_is_refused_without_echoing_it(link_path: str) -> None:
    params = {**SAMPLE_PARAMS["verify_email"], "link_path": link_path}
    with pytest.raises(InvalidTemplateParamError) as error:
        render("verify_email", params, BASE_URL)
    assert error.value.param == "link_path"
    assert "tok-secret" not in str(error.value)


@pytest.mark.parametrize(
    ("template", "param", "value"),
    [
        ("verify_email", "expire_time", "tomorrow"),
        ("verify_email", "expire_time", "2026-11-27T08:00:00"),
        ("quota_80", "used_tokens", "lots"),
        ("invoice_receipt", "amount_minor", "29.00"),
        ("invoice_receipt", "currency", "eur"),
        ("welcome", "display_name", "Ada\r\nBcc: eve@evil.test"),
        ("welcome", "display_name", "A" * 2001),
    ],
)
def test_malformed_parameters_are_permanent_errors(template: str, param: str, value: str) -> None:
    with pytest.raises(InvalidTemplateParamError) as error:
        render(template, {**SAMPLE_PARAMS[template], param: value}, BASE_URL)
    assert error.value.param == param


def test_undeclared_parameters_are_ignored() -> None:
    params = {**SAMPLE_PARAMS["welcome"], "token": "tok-unused", "extra": "{{ 7 * 7 }}"}
    rendered = render("welcome", params, BASE_URL)
    assert "tok-unused" not in rendered.text + rendered.html
    assert "49" not in rendered.text
