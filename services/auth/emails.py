"""Email addresses: the one canonical spelling every way in uses, and the addresses new accounts may have.

`normalize_email` is applied wherever an address enters: registration, sign-in, forgot-password,
the admin bootstrap (`parley admin create-admin`), the admin user search, the per-email rate limits
and the sign-in throttle. So every spelling of one address reaches one account, one budget and one
lockout counter. The canonical spelling is:

1. the whole address in Unicode NFKC, surrounding whitespace removed: fullwidth letters, ligatures
   and mathematical letters become the plain letters (U+FF41 and U+1D41A become "a", U+FF20 "@");
2. the local part (before the last `@`) lower-cased, as Parley always did;
3. the domain mapped by UTS #46 (non-transitional, STD3 rules) and stored as IDNA 2008 A-labels
   (`bücher.example` is `xn--bcher-kva.example`): case-folded, and ASCII, as DNS and SMTP carry it.
   A domain that is not a valid IDN is kept NFKC'd and lower-cased, so a look-up simply finds no one.

A new address (`email_violations`) must also have an ASCII local part after NFKC: a look-alike of
alice@example.com with a dotless i (U+0131) or a Cyrillic a (U+0430) is refused with
EMAIL_LOCAL_PART_NOT_ASCII instead of registering beside it. Why this rather than a UTS #39
skeleton, and what became of stored addresses: docs/adr/0015-email-normalization.md.

`normalize_email` itself never refuses anything: sign-in and forgot-password must answer a malformed
address exactly like an unknown one, and accounts stored before these rules keep working.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

import idna

from services.common.errors import FieldViolation

# The longest email address accepted (RFC 5321's path limit less its brackets); `users.email` holds it.
EMAIL_MAX: Final = 320
LOCAL_PART_MAX: Final = 64
DOMAIN_MAX: Final = 253
# Longer input is no address: it is left as it is (NFKC can grow text eighteenfold) and matches no one.
_INPUT_MAX: Final = 4 * EMAIL_MAX

# Local part: anything printable but whitespace and "@" (quoted forms are not supported); with the
# ASCII rule that is RFC 5322's atext and dots. Domain: dot-separated LDH labels, at least two.
_LOCAL_PART: Final = re.compile(r"[^\s@\"(),:;<>\[\]\\]+")
_DOMAIN_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def normalize_email(value: str) -> str:
    """The canonical spelling of `value` (see the module docstring); never raises.

    Idempotent: the canonical spelling of a canonical spelling is itself, so a stored address is
    found by every spelling of it, its own included.
    """
    if len(value) > _INPUT_MAX:
        return value
    text = unicodedata.normalize("NFKC", value).strip()
    local, at, domain = text.rpartition("@")
    if not at:
        return text.lower()
    return f"{local.lower()}@{ascii_domain(domain) or domain.lower()}"


def email_search_texts(text: str) -> tuple[str, ...]:
    """What an admin's search `text` looks like inside canonical addresses: its canonical spelling
    ("ADA@Bücher" in fullwidth letters or not: "ada@xn--bcher-kva"), and, for text without an "@"
    that is not ASCII, also its A-labels, since it may be a domain as people read it ("bücher")."""
    canonical = normalize_email(text)
    if not canonical:
        return ()
    if "@" in canonical or canonical.isascii():
        return (canonical,)
    a_labels = ascii_domain(canonical)
    return (canonical,) if a_labels is None or a_labels == canonical else (canonical, a_labels)


def ascii_domain(domain: str) -> str | None:
    """`domain` mapped by UTS #46 and encoded as IDNA 2008 A-labels; None when it is not a valid
    domain name (bad label, disallowed code point, bidi rule, label or name too long)."""
    if not domain:
        return None
    try:
        return idna.encode(domain, uts46=True, std3_rules=True, transitional=False).decode("ascii")
    except UnicodeError:  # idna.IDNAError and its kinds are UnicodeErrors
        return None


def email_violations(normalized: str, *, field_name: str = "email") -> list[FieldViolation]:
    """Why the canonical address `normalized` (see `normalize_email`) may not be a new account's;
    empty when it may. At most one violation: the first problem found."""
    if not normalized:
        return _invalid(field_name, "An email address is required.")
    if len(normalized) > EMAIL_MAX:
        return _invalid(field_name, f"The email address must be at most {EMAIL_MAX} characters.")
    local, at, domain = normalized.rpartition("@")
    labels = domain.split(".")
    if (
        not at
        or not local
        or len(local) > LOCAL_PART_MAX
        or _LOCAL_PART.fullmatch(local) is None
        or any(not character.isprintable() for character in local)
        or len(domain) > DOMAIN_MAX
        or len(labels) < 2
        or any(_DOMAIN_LABEL.fullmatch(label) is None for label in labels)
        # An ASCII name that IDNA 2008 still refuses: "ab--cd", or an "xn--" label that is no A-label.
        or ascii_domain(domain) != domain
    ):
        return _invalid(field_name, "This is not a valid email address.")
    if not local.isascii():
        return [
            FieldViolation(
                field=field_name,
                description=(
                    "The part before the @ may use only ASCII letters, digits and symbols (a-z, 0-9, "
                    ". _ + - and the like); letters from other alphabets that look like them are not "
                    "accepted."
                ),
                reason="EMAIL_LOCAL_PART_NOT_ASCII",
            )
        ]
    return []


def _invalid(field_name: str, description: str) -> list[FieldViolation]:
    return [FieldViolation(field=field_name, description=description, reason="INVALID_ARGUMENT")]
