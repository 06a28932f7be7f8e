"""Webhook signatures (`services.billing.webhook_signatures`): sign and verify round trips, secret
rotation, tampering, replay windows both ways, header shapes, and arbitrary headers that may only
ever be refused with the two typed reasons."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.billing.webhook_signatures import (
    DEFAULT_TOLERANCE,
    MAX_HEADER_LENGTH,
    MAX_SIGNATURES,
    VerifiedSignature,
    sign,
    verify,
)
from services.common.errors import InvalidArgument

NOW = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
T = int(NOW.timestamp())
BODY = b'{"id":"evt_1","type":"invoice.paid","data":{"object":{"amount_paid":1999}}}'
SECRET = "whsec_current"
OLD_SECRET = "whsec_previous"
INVALID = "WEBHOOK_SIGNATURE_INVALID"
EXPIRED = "WEBHOOK_SIGNATURE_EXPIRED"


def v1(secret: str, timestamp: str, body: bytes = BODY) -> str:
    """The v1 signature computed independently of the module under test."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def refusal(
    body: bytes,
    header: str | None,
    secrets: tuple[str, ...] = (SECRET,),
    tolerance: timedelta = DEFAULT_TOLERANCE,
) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        verify(body, header, secrets, now=NOW, tolerance=tolerance)
    return caught.value


def test_sign_produces_the_stripe_header() -> None:
    assert sign(BODY, SECRET, at=NOW) == f"t={T},v1={v1(SECRET, str(T))}"


def test_sign_truncates_to_whole_seconds() -> None:
    assert sign(BODY, SECRET, at=NOW + timedelta(milliseconds=999)) == sign(BODY, SECRET, at=NOW)


def test_round_trip() -> None:
    header = sign(BODY, SECRET, at=NOW)
    assert verify(BODY, header, [SECRET], now=NOW) == VerifiedSignature(timestamp=NOW, secret_index=0)


@given(body=st.binary(max_size=2048), secret=st.text(min_size=1, max_size=64))
def test_round_trip_any_body_and_secret(body: bytes, secret: str) -> None:
    assert verify(body, sign(body, secret, at=NOW), [secret], now=NOW).secret_index == 0


@pytest.mark.parametrize("index", [0, 1, 2])
def test_each_secret_of_a_rotation_set_verifies(index: int) -> None:
    secrets = [SECRET, OLD_SECRET, "whsec_older"]
    header = sign(BODY, secrets[index], at=NOW)
    assert verify(BODY, header, secrets, now=NOW).secret_index == index


def test_any_v1_in_the_header_may_match_during_rotation() -> None:
    header = f"t={T},v1={v1('whsec_unknown', str(T))},v1={v1(OLD_SECRET, str(T))}"
    assert verify(BODY, header, [SECRET, OLD_SECRET], now=NOW).secret_index == 1


def test_a_secret_outside_the_set_is_refused() -> None:
    error = refusal(BODY, sign(BODY, "whsec_someone_else", at=NOW), (SECRET, OLD_SECRET))
    assert error.reason == INVALID
    assert error.metadata == {"cause": "no_match"}


@given(bit=st.integers(min_value=0, max_value=len(BODY) * 8 - 1))
def test_one_flipped_body_bit_is_refused(bit: int) -> None:
    tampered = bytearray(BODY)
    tampered[bit // 8] ^= 1 << (bit % 8)
    assert refusal(bytes(tampered), sign(BODY, SECRET, at=NOW)).reason == INVALID


def test_an_empty_body_does_not_match_a_signed_one() -> None:
    assert refusal(b"", sign(BODY, SECRET, at=NOW)).reason == INVALID


@given(position=st.integers(min_value=0, max_value=63))
def test_one_changed_signature_digit_is_refused(position: int) -> None:
    good = v1(SECRET, str(T))
    digit = "0" if good[position] != "0" else "1"
    tampered = good[:position] + digit + good[position + 1 :]
    assert refusal(BODY, f"t={T},v1={tampered}").reason == INVALID


def test_a_changed_timestamp_breaks_the_signature() -> None:
    header = f"t={T + 1},v1={v1(SECRET, str(T))}"
    assert refusal(BODY, header).metadata == {"cause": "no_match"}


@pytest.mark.parametrize("offset", [DEFAULT_TOLERANCE, -DEFAULT_TOLERANCE, timedelta(0)])
def test_timestamps_within_the_tolerance_pass(offset: timedelta) -> None:
    header = sign(BODY, SECRET, at=NOW + offset)
    assert verify(BODY, header, [SECRET], now=NOW).timestamp == NOW + offset


def test_now_may_be_in_any_timezone() -> None:
    now_in_paris = NOW.astimezone(timezone(timedelta(hours=1)))
    verified = verify(BODY, sign(BODY, SECRET, at=NOW), [SECRET], now=now_in_paris)
    assert verified.timestamp == NOW
    assert verified.timestamp.tzinfo is UTC


def test_a_stale_replay_is_expired() -> None:
    header = sign(BODY, SECRET, at=NOW - DEFAULT_TOLERANCE - timedelta(seconds=1))
    error = refusal(BODY, header)
    assert error.reason == EXPIRED
    assert error.metadata == {"cause": "too_old", "tolerance_s": "300"}
    assert "older than the 300-second tolerance" in error.message


def test_a_future_timestamp_is_expired() -> None:
    header = sign(BODY, SECRET, at=NOW + DEFAULT_TOLERANCE + timedelta(seconds=1))
    error = refusal(BODY, header)
    assert error.reason == EXPIRED
    assert error.metadata["cause"] == "too_new"


def test_the_tolerance_is_the_callers() -> None:
    header = sign(BODY, SECRET, at=NOW - timedelta(minutes=20))
    assert verify(BODY, header, [SECRET], now=NOW, tolerance=timedelta(minutes=30)).secret_index == 0
    assert refusal(BODY, header, tolerance=timedelta(minutes=10)).reason == EXPIRED


def test_a_forged_stale_header_is_invalid_not_expired() -> None:
    # Only a delivery the provider really signed is reported as expired.
    assert refusal(BODY, f"t={T - 3600},v1={'0' * 64}").reason == INVALID


@pytest.mark.parametrize(
    "template",
    [
        "t={t},v1={sig}",
        "v1={sig},t={t}",
        " t = {t} , v1 = {sig} ",
        "t={t},\tv1={sig}",
        "v0={other},t={t},v1={sig}",
        "t={t},v1={other},v1={sig}",
        "t={t},v1={sig},v0={other},scheme2=future",
        "t={t},v1={upper}",
    ],
)
def test_header_permutations_and_whitespace_verify(template: str) -> None:
    good = v1(SECRET, str(T))
    header = template.format(t=T, sig=good, upper=good.upper(), other="ab" * 32)
    assert verify(BODY, header, [SECRET], now=NOW).secret_index == 0


def test_the_timestamp_is_signed_as_written() -> None:
    padded = f"0{T}"
    assert verify(BODY, f"t={padded},v1={v1(SECRET, padded)}", [SECRET], now=NOW).timestamp == NOW
    assert refusal(BODY, f"t={padded},v1={v1(SECRET, str(T))}").reason == INVALID


@pytest.mark.parametrize(
    ("header", "cause"),
    [
        (None, "missing"),
        ("", "missing"),
        ("   ", "malformed"),
        ("garbage", "malformed"),
        ("t=,v1={sig}", "malformed"),
        ("=1,t={t},v1={sig}", "malformed"),
        ("t={t},,v1={sig}", "malformed"),
        ("t={t},v1={sig},", "malformed"),
        ("t=-{t},v1={sig}", "malformed"),
        ("t=+{t},v1={sig}", "malformed"),
        ("t={t}.5,v1={sig}", "malformed"),
        ("t=1_700_000_000,v1={sig}", "malformed"),
        ("t=\u0661\u0662\u0663,v1={sig}", "malformed"),
        ("t=123456789012,v1={sig}", "malformed"),
        ("t={t},v1=zz{short}", "malformed"),
        ("t={t},v1={short}", "malformed"),
        ("t={t},v1={sig}00", "malformed"),
        ("v1={sig}", "no_timestamp"),
        ("t={t}", "no_signature"),
        ("t={t},v0={sig}", "no_signature"),
        ("t={t},t={t},v1={sig}", "duplicate_timestamp"),
    ],
)
def test_bad_headers_are_invalid(header: str | None, cause: str) -> None:
    sig = v1(SECRET, str(T))
    formatted = None if header is None else header.format(t=T, sig=sig, short=sig[:62])
    error = refusal(BODY, formatted)
    assert error.reason == INVALID
    assert error.metadata == {"cause": cause}


def test_a_header_of_absurd_length_is_refused_before_parsing() -> None:
    header = sign(BODY, SECRET, at=NOW) + ",v0=" + "a" * MAX_HEADER_LENGTH
    assert refusal(BODY, header).metadata == {"cause": "too_long"}


def test_too_many_signatures_are_refused() -> None:
    good = v1(SECRET, str(T))
    within = f"t={T}" + f",v1={'0' * 64}" * (MAX_SIGNATURES - 1) + f",v1={good}"
    assert verify(BODY, within, [SECRET], now=NOW).secret_index == 0
    assert refusal(BODY, within + f",v1={good}").metadata == {"cause": "too_many_signatures"}


def test_refusals_never_echo_the_secret_or_the_expected_signature() -> None:
    expected = v1(SECRET, str(T))
    headers = [f"t={T},v1={'0' * 64}", f"t={T},v1={expected[:10]}", f"t={T - 3600},v1={expected}"]
    for header in headers:
        error = refusal(BODY, header)
        shown = f"{error.message} {error.metadata}"
        assert SECRET not in shown
        assert expected not in shown
        assert expected[:10] not in shown


_HEADER_PIECES = st.one_of(
    st.sampled_from(["t", "v1", "v0", "", " ", "=", ",", str(T), "0" * 64, v1(SECRET, str(T))]),
    st.text(max_size=12),
)


@given(header=st.one_of(st.none(), st.text(max_size=300), st.lists(_HEADER_PIECES, max_size=30).map("".join)))
def test_arbitrary_headers_only_ever_raise_the_typed_errors(header: str | None) -> None:
    try:
        verify(BODY, header, [SECRET, OLD_SECRET], now=NOW)
    except InvalidArgument as error:
        assert error.reason in {INVALID, EXPIRED}


@given(body=st.binary(max_size=64), header=st.text(max_size=MAX_HEADER_LENGTH + 50))
def test_arbitrary_headers_and_bodies_never_verify(body: bytes, header: str) -> None:
    with pytest.raises(InvalidArgument):
        verify(body, header, [SECRET], now=NOW)


@pytest.mark.parametrize("secrets", [[], (), ["whsec_ok", ""]])
def test_missing_secrets_are_a_configuration_error(secrets: list[str]) -> None:
    with pytest.raises(ValueError, match="secret"):
        verify(BODY, sign(BODY, SECRET, at=NOW), secrets, now=NOW)


def test_a_bare_string_is_not_a_list_of_secrets() -> None:
    with pytest.raises(TypeError):
        verify(BODY, sign(BODY, SECRET, at=NOW), SECRET, now=NOW)


def test_signing_with_an_empty_secret_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="secret"):
        sign(BODY, "", at=NOW)


def test_naive_times_and_negative_tolerances_are_programming_errors() -> None:
    naive = NOW.replace(tzinfo=None)
    header = sign(BODY, SECRET, at=NOW)
    with pytest.raises(ValueError, match="timezone-aware"):
        sign(BODY, SECRET, at=naive)
    with pytest.raises(ValueError, match="timezone-aware"):
        verify(BODY, header, [SECRET], now=naive)
    with pytest.raises(ValueError, match="negative"):
        verify(BODY, header, [SECRET], now=NOW, tolerance=timedelta(seconds=-1))
