"""Password hashing (real argon2id) and the NIST SP 800-63B password policy."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path

import argon2
import grpc
import pytest

from services.auth.passwords import (
    MAX_PASSWORD_LENGTH,
    MIN_PASSWORD_LENGTH,
    SHIPPED_DENY_LIST,
    Argon2Parameters,
    CommonPasswords,
    PasswordHasher,
    PasswordPolicy,
    normalize_password,
)
from services.common.errors import InvalidArgument

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATOR = REPO_ROOT / "scripts" / "make-password-denylist"

# Cheap parameters for the tests that are about behaviour, not cost.
CHEAP = Argon2Parameters(time_cost=1, memory_cost_kib=1024, parallelism=1)
EMAIL = "ada.lovelace@example.com"


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return PasswordHasher(CHEAP)


@pytest.fixture(scope="module")
def policy() -> PasswordPolicy:
    return PasswordPolicy()


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


def test_default_parameters_are_owasps_argon2id_minimum() -> None:
    defaults = Argon2Parameters()
    assert (defaults.memory_cost_kib, defaults.time_cost, defaults.parallelism) == (19 * 1024, 2, 1)
    assert (defaults.hash_len, defaults.salt_len) == (32, 16)
    stored = PasswordHasher(defaults).hash("glacier mango violin ferry")
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    extracted = argon2.extract_parameters(stored)
    assert (extracted.type, extracted.hash_len, extracted.salt_len) == (argon2.Type.ID, 32, 16)


@pytest.mark.parametrize(
    "overrides",
    [
        {"time_cost": 0},
        {"parallelism": 0},
        {"memory_cost_kib": 15, "parallelism": 2},
        {"salt_len": 8},
        {"hash_len": 8},
    ],
)
def test_unsound_parameters_are_refused(overrides: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="argon2"):
        Argon2Parameters(**overrides)


# --------------------------------------------------------------------------------------------------
# Hash and verify
# --------------------------------------------------------------------------------------------------


def test_hash_verify_round_trip(hasher: PasswordHasher) -> None:
    stored = hasher.hash("glacier mango violin ferry")
    assert stored.startswith("$argon2id$v=19$m=1024,t=1,p=1$")
    assert hasher.verify(stored, "glacier mango violin ferry") is True


def test_wrong_password_is_false(hasher: PasswordHasher) -> None:
    stored = hasher.hash("glacier mango violin ferry")
    assert hasher.verify(stored, "glacier mango violin ferrY") is False
    assert hasher.verify(stored, "") is False


def test_every_hash_has_its_own_salt(hasher: PasswordHasher) -> None:
    first, second = hasher.hash("same password here"), hasher.hash("same password here")
    assert first != second
    assert hasher.verify(first, "same password here")
    assert hasher.verify(second, "same password here")


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "garbage",
        "$argon2id$",
        "$argon2id$v=19$m=1024,t=1,p=1$bm90LWEtc2FsdA$bm90LWEtaGFzaA",
        "$argon2id$v=19$m=1024,t=1,p=1$sälz$häsh",
        "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",
        "\x00\x01\x02",
    ],
)
def test_malformed_hash_is_false_not_an_exception(hasher: PasswordHasher, stored: str) -> None:
    assert hasher.verify(stored, "glacier mango violin ferry") is False


def test_truncated_hash_is_false(hasher: PasswordHasher) -> None:
    stored = hasher.hash("glacier mango violin ferry")
    assert hasher.verify(stored[:-5], "glacier mango violin ferry") is False


def test_passwords_are_nfkc_normalized_before_hashing(hasher: PasswordHasher) -> None:
    precomposed, decomposed = (
        "caf\u00e9 au lait, s'il vous pla\u00eet",
        "cafe\u0301 au lait, s'il vous plai\u0302t",
    )
    assert precomposed != decomposed
    assert hasher.verify(hasher.hash(precomposed), decomposed)
    assert hasher.verify(hasher.hash(decomposed), precomposed)
    # Compatibility forms too: the "ﬁ" ligature and full-width letters are their plain equivalents.
    assert hasher.verify(hasher.hash("\ufb01ne \uff21\uff22\uff23 tuning"), "fine ABC tuning")


def test_hashes_made_with_old_parameters_still_verify(hasher: PasswordHasher) -> None:
    old = PasswordHasher(Argon2Parameters(time_cost=2, memory_cost_kib=2048, parallelism=2))
    stored = old.hash("glacier mango violin ferry")
    assert hasher.verify(stored, "glacier mango violin ferry")


# --------------------------------------------------------------------------------------------------
# Re-hash on login
# --------------------------------------------------------------------------------------------------


def test_needs_rehash_is_false_for_current_parameters(hasher: PasswordHasher) -> None:
    assert hasher.needs_rehash(hasher.hash("glacier mango violin ferry")) is False
    # An equal set of parameters in another hasher instance is still "current".
    assert PasswordHasher(CHEAP).needs_rehash(hasher.hash("glacier mango violin ferry")) is False


@pytest.mark.parametrize(
    "changed",
    [
        {"time_cost": 2},
        {"memory_cost_kib": 2048},
        {"parallelism": 2},
        {"hash_len": 16},
        {"salt_len": 24},
    ],
)
def test_needs_rehash_after_any_parameter_changes(hasher: PasswordHasher, changed: dict[str, int]) -> None:
    stored = hasher.hash("glacier mango violin ferry")
    upgraded = PasswordHasher(Argon2Parameters(**{**vars(CHEAP), **changed}))
    assert upgraded.needs_rehash(stored) is True
    assert upgraded.verify(stored, "glacier mango violin ferry")
    assert upgraded.needs_rehash(upgraded.hash("glacier mango violin ferry")) is False


def test_needs_rehash_for_another_argon2_variant_or_garbage(hasher: PasswordHasher) -> None:
    argon2i = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1, type=argon2.Type.I)
    assert hasher.needs_rehash(argon2i.hash("glacier mango violin ferry")) is True
    assert hasher.needs_rehash("garbage") is True
    assert hasher.needs_rehash("") is True


# --------------------------------------------------------------------------------------------------
# Dummy verification for unknown accounts
# --------------------------------------------------------------------------------------------------


class RecordingHasher(PasswordHasher):
    """Notes which thread ran each hash/verify and against which stored hash."""

    def __init__(self, parameters: Argon2Parameters) -> None:
        self.calls: list[tuple[str, int, str]] = []
        super().__init__(parameters)

    def hash(self, password: str) -> str:
        self.calls.append(("hash", threading.get_ident(), ""))
        return super().hash(password)

    def verify(self, password_hash: str, password: str) -> bool:
        self.calls.append(("verify", threading.get_ident(), password_hash))
        return super().verify(password_hash, password)


def test_verify_dummy_verifies_against_a_hash_with_the_current_parameters() -> None:
    recording = RecordingHasher(CHEAP)
    recording.verify_dummy("glacier mango violin ferry")
    [(kind, _, dummy_hash)] = recording.calls
    assert kind == "verify"
    assert argon2.extract_parameters(dummy_hash) == argon2.extract_parameters(recording.hash("x"))
    assert recording.needs_rehash(dummy_hash) is False


def _seconds(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def test_verify_dummy_costs_about_what_a_real_verify_costs() -> None:
    production = PasswordHasher(Argon2Parameters())
    stored = production.hash("glacier mango violin ferry")
    # Interleaved, so that load on the machine hits both alike; medians compared loosely.
    real, dummy = [], []
    for _ in range(5):
        real.append(_seconds(lambda: production.verify(stored, "wrong password guess")))
        dummy.append(_seconds(lambda: production.verify_dummy("wrong password guess")))
    ratio = statistics.median(dummy) / statistics.median(real)
    assert 0.3 < ratio < 3, f"dummy/real verify time ratio {ratio:.2f}"


async def test_async_wrappers_run_argon2_off_the_event_loop_thread() -> None:
    recording = RecordingHasher(CHEAP)
    recording.calls.clear()
    loop_thread = threading.get_ident()

    stored = await recording.hash_async("glacier mango violin ferry")
    assert await recording.verify_async(stored, "glacier mango violin ferry") is True
    assert await recording.verify_async(stored, "something else entirely") is False
    await recording.verify_dummy_async("glacier mango violin ferry")

    assert [kind for kind, _, _ in recording.calls] == ["hash", "verify", "verify", "verify"]
    assert all(thread != loop_thread for _, thread, _ in recording.calls)


# --------------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------------

SHORT, LONG, COMMON, EMAIL_PART = (
    "PASSWORD_TOO_SHORT",
    "PASSWORD_TOO_LONG",
    "PASSWORD_TOO_COMMON",
    "PASSWORD_CONTAINS_EMAIL",
)


def reasons(policy: PasswordPolicy, password: str, email: str = EMAIL) -> list[str]:
    return [violation.reason for violation in policy.violations(password, email=email)]


def common_description(policy: PasswordPolicy, password: str) -> str:
    [violation] = policy.violations(password, email=EMAIL)
    assert violation.reason == COMMON
    return violation.description


@pytest.mark.parametrize(
    ("password", "expected"),
    [
        ("glacier mango violin ferry", []),
        ("Tr0ub4dor&3 zebra lamp", []),
        ("f7Kq!2mZ9x#L", []),
        # A short word is not a deny-list hit when what surrounds it is not a decoration.
        ("cat829104738291", []),
        # Words typed in one small area of the keyboard are not a keyboard walk.
        ("treeweredress", []),
        ("mango violin", []),
        ("mango viol", [SHORT]),
        ("x7!", [SHORT]),
        ("", [SHORT]),
        ("glacier mango violin ferry " * 5, [LONG]),
        ("password", [SHORT, COMMON]),
        ("a" * (MAX_PASSWORD_LENGTH + 1), [LONG, COMMON]),
        ("ada.lovelace!!99", [EMAIL_PART]),
    ],
)
def test_policy_matrix(policy: PasswordPolicy, password: str, expected: list[str]) -> None:
    assert reasons(policy, password) == expected


def test_exactly_min_and_max_lengths_are_allowed(policy: PasswordPolicy) -> None:
    assert (MIN_PASSWORD_LENGTH, MAX_PASSWORD_LENGTH) == (12, 128)
    assert reasons(policy, "mango violin") == []
    assert reasons(policy, "mango violi") == [SHORT]
    at_max = ("glacier mango violin ferry " * 5)[:128]
    assert reasons(policy, at_max) == []
    assert reasons(policy, at_max + "z") == [LONG]


def test_length_descriptions_give_the_limit_and_the_count(policy: PasswordPolicy) -> None:
    [short] = policy.violations("x7!", email=EMAIL)
    assert short.description == "Use at least 12 characters; this password has 3."
    [long] = policy.violations("glacier mango violin ferry " * 5, email=EMAIL)
    assert long.description == "Use at most 128 characters; this password has 135."


@pytest.mark.parametrize(
    "password",
    [
        "password1234",
        "P@ssw0rd2024!",
        "pa55w0rd!!!!",
        "PASSWORD2024",
        "Sunshine123!",
        "!!Welcome2024",
        "iloveyou1234",
        "i love you 2024",
        "letmein12345",
        "Dragon!!!!!!",
        "hell02024",  # "hell0" is "hello" with a leet o, not "hell" + 02024
        "@dministrator",
        "MyPassword12",
        "dragondragon",
        "football-lover",
        "SUMMER2024!!",
        "September2025",
        "Parley2024!!",
        "ChatGPT12345",
        "OpenAI-2024!",
        "jessica19901990",
        "correcthorsebatterystaple",
    ],
)
def test_decorated_common_passwords_are_on_the_deny_list(policy: PasswordPolicy, password: str) -> None:
    assert COMMON in reasons(policy, password)
    description = next(v.description for v in policy.violations(password, email=EMAIL) if v.reason == COMMON)
    assert "list of commonly used passwords" in description


@pytest.mark.parametrize(
    "password", ["123456789012", "abcdefghijkl", "zyxwvutsrqpo", "7890123456789", "aaabbbcccddd"]
)
def test_sequences_are_too_common(policy: PasswordPolicy, password: str) -> None:
    assert "sequences" in common_description(policy, password)


@pytest.mark.parametrize("password", ["aaaaaaaaaaaa", "aaaaaaaaaaaa1", "!!!!!!!!!!!!", "éééééééééééé"])
def test_one_repeated_character_is_too_common(policy: PasswordPolicy, password: str) -> None:
    assert "repeated characters" in common_description(policy, password)


@pytest.mark.parametrize("password", ["abcabcabcabc", "xk9!xk9!xk9!", "zebrazebrazebra"])
def test_a_repeated_short_chunk_is_too_common(policy: PasswordPolicy, password: str) -> None:
    assert "repeat a short chunk" in common_description(policy, password)


@pytest.mark.parametrize(
    "password",
    ["qwertyuiopas", "1qaz2wsx3edc", "zaq12wsxcde3", "1q2w3e4r5t6y", "!@#$%^&*()_+", "mnbvcxzlkjhg"],
)
def test_keyboard_walks_are_too_common(policy: PasswordPolicy, password: str) -> None:
    assert "Keyboard patterns" in common_description(policy, password)


@pytest.mark.parametrize(
    ("password", "email"),
    [
        ("ada.lovelace!!99", "ada.lovelace@example.com"),
        ("AdaLovelace1815", "ada.lovelace@example.com"),
        ("I am ADA.LOVELACE", "ada.lovelace@example.com"),
        ("my name is ada, okay", "ada+parley@example.com"),
        ("j0hn_sm1th-rocks", "john.smith@example.com"),
        ("xyz-noreply-xyz", "NoReply@example.com"),
    ],
)
def test_passwords_containing_the_email_local_part_are_refused(
    policy: PasswordPolicy, password: str, email: str
) -> None:
    [violation] = policy.violations(password, email=email)
    assert violation.reason == EMAIL_PART
    assert violation.description.startswith("The password must not contain your email")


def test_email_local_parts_shorter_than_three_characters_are_not_checked(policy: PasswordPolicy) -> None:
    assert reasons(policy, "bo beats everything", "bo@example.com") == []
    assert reasons(policy, "no email on file here", "") == []


def test_every_violation_is_reported_at_once(policy: PasswordPolicy) -> None:
    violations = policy.violations("password", email="password@example.com", field="new_password")
    assert [v.reason for v in violations] == [SHORT, COMMON, EMAIL_PART]
    assert {v.field for v in violations} == {"new_password"}
    assert all(v.description for v in violations)


def test_check_raises_policy_violation_with_every_field_violation(policy: PasswordPolicy) -> None:
    with pytest.raises(InvalidArgument) as raised:
        policy.check("password", email="password@example.com", field="new_password")
    error = raised.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "PASSWORD_POLICY_VIOLATION"
    assert list(error.field_violations) == policy.violations(
        "password", email="password@example.com", field="new_password"
    )
    policy.check("glacier mango violin ferry", email=EMAIL)


def test_length_counts_code_points_after_nfkc(policy: PasswordPolicy) -> None:
    # 11 letters, but 14 code points before normalization (three combining accents).
    decomposed = "cre\u0300me bru\u0302le\u0301"
    assert len(decomposed) == 14
    assert len(normalize_password(decomposed)) == 11
    assert reasons(policy, decomposed) == [SHORT]
    # 10 code points as typed; the "ﬃ" ligature becomes "ffi", so 12 after normalization.
    ligature = "o\ufb03ce chair"
    assert len(ligature) == 10
    assert reasons(policy, ligature) == []
    # Code points, not bytes or UTF-16 units: 12 distinct emoji (48 UTF-8 bytes) are long enough, and
    # 128 accented letters (256 bytes) are not too long.
    emoji = "🦜🐙🦀🐝🦋🐌🐞🐜🦗🕷🦂🐢"
    assert len(emoji) == 12
    assert reasons(policy, emoji) == []
    accented = ("grün über brücken fährt " * 6)[:128]
    assert len(accented.encode()) > 128
    assert reasons(policy, accented) == []
    assert reasons(policy, accented + "ö") == [LONG]


def test_absurdly_long_input_only_reports_the_length(policy: PasswordPolicy) -> None:
    started = time.perf_counter()
    assert reasons(policy, "password" * 500_000, "password@example.com") == [LONG]
    assert time.perf_counter() - started < 5


def test_policy_length_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="min_length"):
        PasswordPolicy(min_length=20, max_length=10)


# --------------------------------------------------------------------------------------------------
# The deny-list
# --------------------------------------------------------------------------------------------------


def test_deny_list_is_read_lazily_from_its_path(tmp_path: Path) -> None:
    path = tmp_path / "deny.txt"
    common = CommonPasswords(path)  # the file does not exist yet: nothing is read at construction
    path.write_text("# a comment line\nzebralamp\n\n", encoding="utf-8")
    assert len(common) == 1
    assert "zebralamp" in common
    path.write_text("somethingelse\n", encoding="utf-8")
    assert common.load() == frozenset({"zebralamp"}), "read once, then kept"
    custom = PasswordPolicy(common)
    assert reasons(custom, "Zebra-Lamp 2024!") == [COMMON]
    assert reasons(custom, "glacier mango violin ferry") == []


def test_shipped_deny_list_holds_canonical_forms_only() -> None:
    entries = CommonPasswords().load()
    assert 5_000 < len(entries) < 50_000
    assert all(
        entry.isascii() and entry.isalpha() and entry.islower() and len(entry) >= 4 for entry in entries
    )
    for expected in ("password", "letmein", "iloveyou", "parley", "september", "qwerty", "mypassword"):
        assert expected in entries


def test_shipped_deny_list_is_what_the_generator_produces(tmp_path: Path) -> None:
    output = tmp_path / "common-passwords.txt"
    subprocess.run([sys.executable, str(GENERATOR), "--output", str(output)], check=True, capture_output=True)
    assert output.read_bytes() == SHIPPED_DENY_LIST.read_bytes(), "run scripts/make-password-denylist"
    check = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], check=False, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_generator_check_fails_on_a_stale_list(tmp_path: Path) -> None:
    stale = tmp_path / "stale.txt"
    stale.write_text("password\n", encoding="utf-8")
    check = subprocess.run(
        [sys.executable, str(GENERATOR), "--check", "--output", str(stale)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 1
    assert "stale" in check.stderr


def test_normalize_password_is_nfkc() -> None:
    assert normalize_password("\uff21\u00e9") == unicodedata.normalize("NFKC", "\uff21e\u0301") == "A\u00e9"
