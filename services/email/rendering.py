"""Email templates: one Jinja2 text and one HTML template per `EmailRequested.template`.

Each template declares the parameters it needs and what kind of value each is; `render` checks and
formats them before Jinja sees them, so a job with a missing or malformed parameter fails with a
typed permanent error (naming the parameter, never showing its value: values may be tokens).
Parameters a template does not declare are ignored. HTML is autoescaped; the text part is not
escaped, since it is plain text.

Links are built on the configured public base URL: a job carries only a path (`link_path`, e.g.
`/verify-email?token=...`), never an absolute URL, so no job can point a user at another site.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Final

import jinja2

from services.email.errors import InvalidTemplateParamError, MissingTemplateParamError, UnknownTemplateError

TEMPLATES_DIR: Final = Path(__file__).resolve().parent / "templates"

# ISO 4217 currencies without minor units, among those a SaaS bills in; every other has two.
_ZERO_DECIMAL_CURRENCIES: Final = frozenset({"JPY", "KRW", "VND", "CLP", "ISK", "HUF", "TWD", "UGX"})
_MAX_PARAM_CHARS: Final = 2000


class _BadValueError(ValueError):
    """A parameter's value is unusable; the message says why without repeating the value."""


def _text(value: str) -> str:
    if any(ord(char) < 32 and char not in "\t" for char in value):
        raise _BadValueError("contains control characters")
    return value


def _link_path(value: str) -> str:
    # Only a path on our own site: "//evil.example" and "\\evil.example" are other hosts to browsers.
    if not value.startswith("/") or value.startswith(("//", "/\\")):
        raise _BadValueError("must be a path starting with a single '/'")
    if any(char.isspace() or ord(char) < 32 or char == "\\" for char in value):
        raise _BadValueError("must not contain spaces, control characters or backslashes")
    return value


def _time(value: str) -> str:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _BadValueError("is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise _BadValueError("needs a UTC offset")
    return moment.astimezone(UTC).strftime("%d %B %Y, %H:%M UTC")


def _count(value: str) -> str:
    try:
        number = int(value)
    except ValueError:
        raise _BadValueError("is not an integer") from None
    return f"{number:,}"


def _minor_units(value: str) -> str:
    try:
        int(value)
    except ValueError:
        raise _BadValueError("is not an integer amount in minor units") from None
    return value


def _currency(value: str) -> str:
    if len(value) != 3 or not value.isascii() or not value.isalpha() or not value.isupper():
        raise _BadValueError("is not an upper-case ISO 4217 currency code")
    return value


def format_money(amount_minor: int, currency: str) -> str:
    """`1234, "EUR"` -> `"12.34 EUR"`; negative amounts keep their sign."""
    if currency in _ZERO_DECIMAL_CURRENCIES:
        return f"{amount_minor:,} {currency}"
    sign = "-" if amount_minor < 0 else ""
    whole, cents = divmod(abs(amount_minor), 100)
    return f"{sign}{whole:,}.{cents:02d} {currency}"


ParamKind = Callable[[str], str]
TEXT: Final[ParamKind] = _text
LINK_PATH: Final[ParamKind] = _link_path
TIME: Final[ParamKind] = _time
COUNT: Final[ParamKind] = _count
MINOR_UNITS: Final[ParamKind] = _minor_units
CURRENCY: Final[ParamKind] = _currency


@dataclass(frozen=True)
class TemplateSpec:
    """A template's subject line (a Jinja expression over the same context) and its parameters."""

    subject: str
    required: Mapping[str, ParamKind] = field(hash=False)
    optional: Mapping[str, ParamKind] = field(default_factory=dict, hash=False)


_GREETING: Final = {"display_name": TEXT}
_TOKEN_LINK: Final = {**_GREETING, "link_path": LINK_PATH, "expire_time": TIME}
_INVOICE: Final = {**_GREETING, "invoice_number": TEXT, "amount_minor": MINOR_UNITS, "currency": CURRENCY}
_QUOTA: Final = {**_GREETING, "used_tokens": COUNT, "included_tokens": COUNT, "period_end_time": TIME}

TEMPLATES: Final[Mapping[str, TemplateSpec]] = MappingProxyType(
    {
        "verify_email": TemplateSpec("Confirm your email address for Parley", _TOKEN_LINK),
        "password_reset": TemplateSpec("Reset your Parley password", _TOKEN_LINK),
        "welcome": TemplateSpec("Welcome to Parley, {{ display_name }}", _GREETING),
        "new_login": TemplateSpec(
            "New sign-in to your Parley account",
            {**_GREETING, "login_time": TIME, "ip_address": TEXT},
            {"device_name": TEXT},
        ),
        "invoice_receipt": TemplateSpec("Your Parley receipt {{ invoice_number }}", _INVOICE),
        "payment_failed": TemplateSpec(
            "Payment for Parley invoice {{ invoice_number }} failed", _INVOICE, {"next_retry_time": TIME}
        ),
        "quota_80": TemplateSpec("You have used 80% of your Parley tokens", _QUOTA),
        "quota_100": TemplateSpec("You have used all of your Parley tokens", _QUOTA),
    }
)


@dataclass(frozen=True)
class RenderedEmail:
    """An email's content, ready to be put in a message."""

    subject: str
    text: str
    html: str


@functools.cache
def _environment() -> jinja2.Environment:
    """One environment for every template, built once: it caches the compiled templates.

    `*.html.j2` files are autoescaped; text templates and subject lines are plain text, never HTML.
    """
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, params: Mapping[str, str], public_base_url: str) -> RenderedEmail:
    """Render one email. Raises `UnknownTemplateError`, `MissingTemplateParamError` or
    `InvalidTemplateParamError` (all `PermanentDeliveryError`s)."""
    spec = TEMPLATES.get(template)
    if spec is None:
        raise UnknownTemplateError(template)
    missing = [name for name in spec.required if not params.get(name)]
    if missing:
        raise MissingTemplateParamError(template, missing)
    base_url = public_base_url.rstrip("/")
    context: dict[str, str] = {"base_url": base_url}
    declared = {**spec.optional, **spec.required}
    for name, kind in declared.items():
        value = params.get(name)
        if not value:
            continue
        if len(value) > _MAX_PARAM_CHARS:
            raise InvalidTemplateParamError(template, name, f"is longer than {_MAX_PARAM_CHARS} characters")
        try:
            context[name] = kind(value)
        except _BadValueError as problem:
            raise InvalidTemplateParamError(template, name, str(problem)) from None
    if "link_path" in context:
        context["link"] = base_url + context["link_path"]
    if "amount_minor" in context:
        context["amount"] = format_money(int(context["amount_minor"]), context["currency"])
    environment = _environment()
    subject = " ".join(environment.from_string(spec.subject).render(context).split())
    return RenderedEmail(
        subject=subject,
        text=environment.get_template(f"{template}.txt.j2").render(context),
        html=environment.get_template(f"{template}.html.j2").render(context),
    )
