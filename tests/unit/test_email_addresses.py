"""Email addresses: the canonical spelling (`normalize_email`) and which addresses new accounts may
have (`email_violations`). Look-alike letters are written as escapes, so the table shows what they are."""

from __future__ import annotations

import sys

import pytest

from services.auth.emails import email_violations, normalize_email
from services.auth.ports import UserQuery
from tests.support.look_alikes import fullwidth, mathematical_bold

NOT_ASCII = "EMAIL_LOCAL_PART_NOT_ASCII"
MALFORMED = "INVALID_ARGUMENT"


# (as typed, canonical spelling): every one of these is a valid new address.
ACCEPTED = [
    ("ada@example.com", "ada@example.com"),
    ("  Ada.Lovelace@Example.COM \t", "ada.lovelace@example.com"),
    ("ada+parley@mail.example.co.uk", "ada+parley@mail.example.co.uk"),
    ("o'brien@xn--bcher-kva.example", "o'brien@xn--bcher-kva.example"),
    ("a" * 64 + "@example.com", "a" * 64 + "@example.com"),
    # NFKC: compatibility forms become the plain characters.
    ("\uff41da@example.com", "ada@example.com"),  # fullwidth a
    (fullwidth("ADA@EXAMPLE.COM"), "ada@example.com"),  # all fullwidth, the @ and the dot too
    ("ada\ufe6bexample.com", "ada@example.com"),  # small commercial at
    (mathematical_bold("Ada") + "@example.com", "ada@example.com"),
    ("\ufb01nn@example.com", "finn@example.com"),  # the fi ligature
    ("\u212aim@example.com", "kim@example.com"),  # Kelvin sign
    ("\u3000ada@example.com\u3000", "ada@example.com"),  # ideographic spaces around
    ("ada\u2460@example.com", "ada1@example.com"),  # circled digit one
    # Domains: UTS #46 mapping, stored as IDNA 2008 A-labels.
    ("ada@b\u00fccher.example", "ada@xn--bcher-kva.example"),
    ("ADA@B\u00dcCHER.EXAMPLE", "ada@xn--bcher-kva.example"),
    ("ada@XN--BCHER-KVA.example", "ada@xn--bcher-kva.example"),
    ("ada@fa\u00df.de", "ada@xn--fa-hia.de"),  # non-transitional: not fass.de
    ("ada@\u4f8b\u3048.\u30c6\u30b9\u30c8", "ada@xn--r8jz45g.xn--zckzah"),
    ("ada@exam\u00adple.com", "ada@example.com"),  # a soft hyphen is ignored
    ("ada@example\u3002com", "ada@example.com"),  # ideographic full stop
    # A Cyrillic a in the domain: another domain, whose A-label shows it is not example.com.
    ("ada@ex\u0430mple.com", "ada@xn--exmple-4nf.com"),
]

# (as typed, canonical spelling): look-alikes that stay non-ASCII after NFKC.
REFUSED_LOOK_ALIKES = [
    ("al\u0131ce@example.com", "al\u0131ce@example.com"),  # dotless i
    ("\u0430lice@example.com", "\u0430lice@example.com"),  # Cyrillic a
    ("\u03b1lice@example.com", "\u03b1lice@example.com"),  # Greek alpha
    ("AL\u0130CE@example.com", "ali\u0307ce@example.com"),  # capital I with dot: i and a combining dot
    ("jos\u00e9@example.com", "jos\u00e9@example.com"),  # an accented Latin letter
    ("\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a", "\u7528\u6237@xn--fsqu00a.xn--4rr70v"),  # all Chinese
]

MALFORMED_ADDRESSES = [
    "",
    "   ",
    "plainaddress",
    "@example.com",
    "ada@",
    "ada@localhost",
    "ada@@example.com",
    "ada\uff20\uff20example.com",
    "ada lovelace@example.com",
    "ada@exa mple.com",
    "ada@-example.com",
    "ada@example-.com",
    "ada@example..com",
    "ada@.example.com",
    "ada@example.com.",
    "ada@exa_mple.com",
    "ada@ab--cd.com",  # reserved hyphens, not an A-label
    "ada@xn--abc.com",  # no valid Punycode
    "ada@\u0661\u0662.com",  # breaks the bidi rule
    "ada@" + "\u00fc" * 60 + ".com",  # its A-label is longer than 63
    "ada@exam\nple.com",
    "ad\x00a@example.com",
    "al\u200bice@example.com",  # zero-width space in the local part
    "al\u202eecila@example.com",  # right-to-left override
    '"ada"@example.com',
    "a" * 65 + "@example.com",
    "ada@" + "a" * 310 + ".com",
    "a" * 300 + "@" + "b" * 30 + ".com",
    "a" * 5000 + "@example.com",
]


@pytest.mark.parametrize(("given", "canonical"), ACCEPTED)
def test_accepted_addresses_get_their_canonical_spelling(given: str, canonical: str) -> None:
    assert normalize_email(given) == canonical
    assert email_violations(canonical) == []
    assert normalize_email(canonical) == canonical


@pytest.mark.parametrize(("given", "canonical"), REFUSED_LOOK_ALIKES)
def test_look_alike_local_parts_are_refused_with_their_own_reason(given: str, canonical: str) -> None:
    assert normalize_email(given) == canonical
    found = email_violations(canonical, field_name="email")
    assert [(violation.field, violation.reason) for violation in found] == [("email", NOT_ASCII)]
    assert "ASCII" in found[0].description


def test_the_dotless_i_look_alike_is_not_the_same_account_spelled_differently() -> None:
    # Refused rather than folded: folding would need UTS #39's data (see ADR 0015).
    assert normalize_email("al\u0131ce@example.com") != normalize_email("alice@example.com")


@pytest.mark.parametrize("email", MALFORMED_ADDRESSES)
def test_malformed_addresses_are_one_violation_on_the_field(email: str) -> None:
    found = email_violations(normalize_email(email), field_name="email")
    assert [(violation.field, violation.reason) for violation in found] == [("email", MALFORMED)]


def test_the_domain_length_limit_applies_to_the_a_labels() -> None:
    # 133 characters as typed, 259 as A-labels: more than a domain name may have.
    domain = ".".join(["b\u00fccher"] * 18) + ".example"
    assert len(domain) <= 253 < len(domain.replace("b\u00fccher", "xn--bcher-kva"))
    found = email_violations(normalize_email(f"ada@{domain}"))
    assert [violation.reason for violation in found] == [MALFORMED]


@pytest.mark.parametrize(
    "email",
    [*(given for given, _ in ACCEPTED), *(given for given, _ in REFUSED_LOOK_ALIKES), *MALFORMED_ADDRESSES],
)
def test_the_canonical_spelling_of_a_canonical_spelling_is_itself(email: str) -> None:
    canonical = normalize_email(email)
    assert normalize_email(canonical) == canonical


def test_normalizing_is_idempotent_over_every_code_point() -> None:
    """Each code point, in runs of 64, in the local part and in a domain label. Idempotence is what
    lets a stored address be found by its own spelling, and the migration reason about collisions."""
    code_points = [chr(point) for point in range(sys.maxunicode + 1) if not 0xD800 <= point <= 0xDFFF]
    for start in range(0, len(code_points), 64):
        run = "".join(code_points[start : start + 64])
        for email in (f"{run}@example.com", f"ada@x{run}y.example", f"ada@x{run[0]}y.example"):
            canonical = normalize_email(email)
            assert normalize_email(canonical) == canonical, (hex(ord(run[0])), email)


@pytest.mark.parametrize(
    ("text", "email_texts"),
    [
        ("", ()),
        ("  ", ()),
        ("Ada", ("ada",)),
        (fullwidth("ADA"), ("ada",)),
        ("ada@B\u00dcCHER", ("ada@xn--bcher-kva",)),
        ("@example.COM", ("@example.com",)),
        ("B\u00fcCHER.example", ("b\u00fccher.example", "xn--bcher-kva.example")),
        ("al\u0131ce", ("al\u0131ce", "xn--alce-mza")),
        ("\u0661\u0662", ("\u0661\u0662",)),  # no domain: matched as typed only
    ],
)
def test_the_admin_search_text_is_matched_in_the_canonical_spelling(
    text: str, email_texts: tuple[str, ...]
) -> None:
    assert UserQuery(text=text).email_texts == email_texts
