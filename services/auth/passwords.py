"""Password storage (argon2id) and the password policy (NIST SP 800-63B).

Pure domain code: no gRPC, no SQL, no settings. The composition root builds one `PasswordHasher`
and one `PasswordPolicy` and hands them to whoever registers users or logs them in.

Every password is NFKC-normalized before it is measured, checked or hashed, so the same password
typed on two keyboards (a precomposed "é" or "e" + combining accent, a full-width letter or its ASCII twin)
is the same secret. docs/auth.md ("Password storage", "Password policy") has the reasoning.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import argon2

from services.common.errors import FieldViolation, InvalidArgument

# NFKC: compatibility forms fold onto their plain equivalents, which is what NIST SP 800-63B
# 5.1.1.2 asks for (NFKC or NFKD) before hashing.
NORMALIZATION_FORM: Final = "NFKC"

SHIPPED_DENY_LIST = Path(__file__).resolve().parent / "data" / "common-passwords.txt"


def normalize_password(password: str) -> str:
    """The form every password is measured, checked and hashed in."""
    return unicodedata.normalize(NORMALIZATION_FORM, password)


def _secret_bytes(password: str) -> bytes:
    # surrogatepass: a lone surrogate (possible in a Python str, never in valid UTF-8 from the wire)
    # must not turn a login into an INTERNAL error; it still hashes deterministically.
    return normalize_password(password).encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Argon2Parameters:
    """argon2id cost parameters; the defaults are OWASP's recommended minimum.

    OWASP's Password Storage Cheat Sheet lists equivalent argon2id settings (m=46 MiB t=1, m=19 MiB
    t=2, m=12 MiB t=3, ... all p=1). We take m=19 MiB, t=2, p=1:

    - Memory is what a login burst costs the server: each in-flight hash holds `memory_cost_kib`.
      With the default thread pool (up to 32 workers) 19 MiB caps a burst at ~600 MiB, where 46 MiB
      would need ~1.5 GiB for the same defence.
    - t=2 buys back, in passes over memory, the hardness the smaller memory gives up; one verify
      takes tens of milliseconds on a current server core.
    - p=1: the service already runs logins in parallel (one thread each); lanes inside a single hash
      would compete with the other logins for the same cores and make latency less predictable.
    - 16-byte salts and 32-byte tags follow RFC 9106 (128-bit salt is enough for every application).

    Raising any value later is safe: stored hashes keep verifying with the parameters recorded in
    them, and `PasswordHasher.needs_rehash` upgrades each one at its owner's next login.
    """

    time_cost: int = 2
    memory_cost_kib: int = 19 * 1024
    parallelism: int = 1
    hash_len: int = 32
    salt_len: int = 16

    def __post_init__(self) -> None:
        if self.time_cost < 1:
            raise ValueError("argon2 time_cost must be at least 1")
        if self.parallelism < 1:
            raise ValueError("argon2 parallelism must be at least 1")
        if self.memory_cost_kib < 8 * self.parallelism:
            raise ValueError("argon2 memory_cost_kib must be at least 8 KiB per lane")
        # Below these the hash stops being a sound password verifier, whatever the cost settings.
        if self.salt_len < 16:
            raise ValueError("argon2 salt_len must be at least 16 bytes")
        if self.hash_len < 16:
            raise ValueError("argon2 hash_len must be at least 16 bytes")


class PasswordHasher:
    """argon2id hashes in PHC string form (`$argon2id$v=19$m=...,t=...,p=...$salt$tag`).

    Hashing and verifying are CPU-bound for tens of milliseconds; from async code use the `*_async`
    methods, which run in a worker thread (argon2-cffi releases the GIL while it hashes).
    """

    def __init__(self, parameters: Argon2Parameters) -> None:
        self._parameters = parameters
        self._argon2 = argon2.PasswordHasher(
            time_cost=parameters.time_cost,
            memory_cost=parameters.memory_cost_kib,
            parallelism=parameters.parallelism,
            hash_len=parameters.hash_len,
            salt_len=parameters.salt_len,
            type=argon2.Type.ID,
        )
        # Made now rather than on first use, so that the first unknown-email login costs the same as
        # every later one. Its secret is random and thrown away: no password can ever match it.
        self._dummy_hash = self._argon2.hash(secrets.token_bytes(32))

    @property
    def parameters(self) -> Argon2Parameters:
        return self._parameters

    def hash(self, password: str) -> str:
        """A new argon2id hash (fresh random salt) of the normalized password."""
        return self._argon2.hash(_secret_bytes(password))

    def verify(self, password_hash: str, password: str) -> bool:
        """Whether `password` matches `password_hash`; False, never an exception, for a wrong password
        or a hash that cannot be parsed."""
        try:
            return self._argon2.verify(password_hash, _secret_bytes(password))
        except (argon2.exceptions.Argon2Error, ValueError):
            # VerifyMismatchError (wrong password), VerificationError, InvalidHashError and the
            # UnicodeEncodeError a non-ASCII "hash" raises: all of them mean "not this password".
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        """True when the stored hash was made with other parameters (or another argon2 variant, or
        cannot be parsed): after a successful login, store `hash(password)` in its place."""
        try:
            return self._argon2.check_needs_rehash(password_hash)
        except ValueError:
            return True

    def verify_dummy(self, password: str) -> None:
        """Spend what `verify` spends, against a hash with the current parameters, and learn nothing.

        Call it when the account does not exist, so a login for an unknown email takes as long as a
        login with a wrong password and timing does not tell which emails are registered.
        """
        self.verify(self._dummy_hash, password)

    async def hash_async(self, password: str) -> str:
        return await asyncio.to_thread(self.hash, password)

    async def verify_async(self, password_hash: str, password: str) -> bool:
        return await asyncio.to_thread(self.verify, password_hash, password)

    async def verify_dummy_async(self, password: str) -> None:
        await asyncio.to_thread(self.verify_dummy, password)


# --------------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------------

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 128

# Past this many code points only the length is reported: nobody's real password is that long, and
# the other checks would otherwise spend CPU on whatever a hostile client sends.
_LONGEST_FULLY_CHECKED = 1024

# Whitespace and these are dropped before matching, so "i love you" and "pass-word" are caught.
_WORD_SEPARATORS = frozenset("-_.")

# Digits and symbols people put in place of letters. Each maps to the letters it may stand for.
_LEET = {
    "0": "o",
    "1": "il",
    "3": "e",
    "4": "a",
    "5": "s",
    "6": "g",
    "7": "t",
    "8": "b",
    "9": "g",
    "@": "a",
    "$": "s",
    "!": "i",
    "|": "il",
    "+": "t",
    "(": "c",
}
# Ambiguous substitutions multiply the spellings to try; past this many, the first reading is used.
_MOST_LEET_READINGS = 16
# How many digits/symbols touching a word are tried as letters ("hell0" → "hello") before stripping.
_MOST_EDGE_LEET = 3

# Repetition, sequence and keyboard checks look only at stretches this long, so a short pattern
# inside an otherwise strong password ("abc" + random digits) is not flagged.
_SHORTEST_PATTERN = 8
# "abcabcabcabc", "dragondragon": a unit this long or shorter, repeated to fill the password.
_LONGEST_REPEATED_UNIT = 6

# US QWERTY rows: (unshifted keys, horizontal offset of the row's first key in key widths).
_KEYBOARD_ROWS = (
    ("`1234567890-=", 0.0),
    ("qwertyuiop[]\\", 1.5),
    ("asdfghjkl;'", 1.75),
    ("zxcvbnm,./", 2.25),
)
_SHIFTED_TO_UNSHIFTED = dict(zip('~!@#$%^&*()_+{}|:"<>?', "`1234567890-=[]\\;',./", strict=True))


def _keyboard_neighbours() -> dict[str, frozenset[str]]:
    centres: dict[str, tuple[int, float]] = {}
    for row_index, (keys, offset) in enumerate(_KEYBOARD_ROWS):
        for key_index, key in enumerate(keys):
            centres[key] = (row_index, offset + key_index + 0.5)
    neighbours: dict[str, set[str]] = {key: set() for key in centres}
    for key, (row, x) in centres.items():
        for other, (other_row, other_x) in centres.items():
            same_row_next = row == other_row and abs(x - other_x) == 1
            touching_row_above_or_below = abs(row - other_row) == 1 and abs(x - other_x) < 1
            if same_row_next or touching_row_above_or_below:
                neighbours[key].add(other)
    # Row-major walks ("1234567890qwerty", "qwertyuiopasdf") continue from a row's end onto the next.
    for end, start in (("0", "q"), ("p", "a"), ("l", "z")):
        neighbours[end].add(start)
        neighbours[start].add(end)
    return {key: frozenset(found) for key, found in neighbours.items()}


_KEYBOARD_NEIGHBOURS = _keyboard_neighbours()


def _folded(password: str) -> str:
    return normalize_password(password).casefold()


def _without_whitespace(text: str) -> str:
    return "".join(character for character in text if not character.isspace())


def _squashed(text: str) -> str:
    return "".join(
        character for character in text if not character.isspace() and character not in _WORD_SEPARATORS
    )


def _strip_edges(text: str, strip: Callable[[str], bool]) -> str:
    start, end = 0, len(text)
    while start < end and strip(text[start]):
        start += 1
    while end > start and strip(text[end - 1]):
        end -= 1
    return text[start:end]


def _leet_readings(text: str) -> set[str]:
    readings = [""]
    for character in text:
        choices = _LEET.get(character, character)
        if len(readings) * len(choices) > _MOST_LEET_READINGS:
            choices = choices[0]
        readings = [reading + choice for reading in readings for choice in choices]
    return set(readings)


def _deny_list_candidates(folded: str) -> set[str]:
    """Canonical spellings of a password to look up in the deny-list.

    The word is what lies between the first and the last letter; digits and symbols around it are
    decorations and are dropped ("!!Sunshine2024" → "sunshine"), except that the few touching the
    word are also tried as letters ("hell0" → "hello", "@dmin" → "admin").
    """
    text = _squashed(folded)
    letters = [index for index, character in enumerate(text) if character.isalpha()]
    if not letters:
        return set()
    first, last = letters[0], letters[-1] + 1
    before, word, after = text[:first], text[first:last], text[last:]
    candidates: set[str] = set()
    for kept_before in range(min(len(before), _MOST_EDGE_LEET) + 1):
        prefix = before[len(before) - kept_before :]
        if any(character not in _LEET for character in prefix):
            break
        for kept_after in range(min(len(after), _MOST_EDGE_LEET) + 1):
            suffix = after[:kept_after]
            if any(character not in _LEET for character in suffix):
                break
            candidates.update(_leet_readings(prefix + word + suffix))
    return {candidate for candidate in candidates if candidate.isalpha()}


def _pattern_forms(folded: str) -> set[str]:
    """The stretches of a password the repetition/sequence/keyboard checks look at: the whole of it
    (with and without separators), and the same with digits and symbols at the edges stripped."""
    forms: set[str] = set()
    for text in (_without_whitespace(folded), _squashed(folded)):
        forms.add(text)
        forms.add(_strip_edges(text, lambda character: not character.isalnum()))
        if any(character.isalpha() for character in text):
            forms.add(_strip_edges(text, lambda character: not character.isalpha()))
    return {form for form in forms if len(form) >= _SHORTEST_PATTERN}


def _on_keyboard(character: str) -> str:
    return _SHIFTED_TO_UNSHIFTED.get(character, character)


def _step(previous: str, current: str) -> str | None:
    """How predictable typing `current` after `previous` is: a repeat, the next character of a
    sequence, a neighbouring key, or None (not predictable)."""
    if previous == current:
        return "repeat"
    same_kind = (previous.isdigit() and current.isdigit()) or (previous.isalpha() and current.isalpha())
    if same_kind and (abs(ord(previous) - ord(current)) == 1 or {previous, current} == {"0", "9"}):
        return "sequence"
    if _on_keyboard(current) in _KEYBOARD_NEIGHBOURS.get(_on_keyboard(previous), frozenset()):
        return "keyboard"
    return None


def _repeated_unit(form: str) -> int | None:
    for unit in range(1, _LONGEST_REPEATED_UNIT + 1):
        repeats, remainder = divmod(len(form), unit)
        if repeats >= 2 and remainder == 0 and form == form[:unit] * repeats:
            return unit
    return None


def _pattern_kind(form: str) -> str | None:
    """ "repeated", "sequence" or "keyboard" when `form` is made of a few predictable runs (each at
    least 3 characters, on average at least 4), else None."""
    unit = _repeated_unit(form)
    if unit is not None:
        return "repeated" if unit == 1 else "repeated_unit"
    runs: list[int] = [1]
    kinds: set[str] = set()
    for previous, current in itertools.pairwise(form):
        step = _step(previous, current)
        if step is None:
            runs.append(1)
        else:
            runs[-1] += 1
            kinds.add(step)
    if min(runs) < 3 or len(runs) > max(1, len(form) // 4):
        return None
    if kinds == {"repeat"}:
        return "repeated"
    if "keyboard" not in kinds:
        return "sequence"
    # A walk moves across the keyboard ("1qaz2wsx3edc"); words typed in one small area of it
    # ("treeweredress") revisit the same few keys and are not walks.
    distinct_keys = {_on_keyboard(character) for character in form}
    return "keyboard" if len(distinct_keys) * 2 >= len(form) else None


_COMMON_DESCRIPTIONS = {
    "deny_list": "This password, or a small variation of it, is on the list of commonly used passwords.",
    "repeated": "Passwords made of repeated characters, such as aaaaaaaaaaaa, are easy to guess.",
    "repeated_unit": "Passwords that repeat a short chunk, such as abcabcabcabc, are easy to guess.",
    "sequence": "Simple sequences, such as 123456789012 or abcdefghijkl, are easy to guess.",
    "keyboard": "Keyboard patterns, such as qwertyuiop or 1qaz2wsx, are easy to guess.",
}


class CommonPasswords:
    """The deny-list: canonical forms (see `scripts/make-password-denylist`), read from `path` the
    first time they are needed and kept as a frozenset."""

    def __init__(self, path: Path = SHIPPED_DENY_LIST) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._entries: frozenset[str] | None = None
        self._longest = 0

    def load(self) -> frozenset[str]:
        """The entries; reads the file on the first call only (call it at start-up to warm up)."""
        entries = self._entries
        if entries is not None:
            return entries
        with self._lock:
            if self._entries is None:
                lines = self._path.read_text(encoding="utf-8").splitlines()
                loaded = frozenset(line for line in lines if line and not line.startswith("#"))
                self._longest = max((len(entry) for entry in loaded), default=0)
                self._entries = loaded
            return self._entries

    def __contains__(self, canonical: object) -> bool:
        return canonical in self.load()

    def __len__(self) -> int:
        return len(self.load())

    def matches(self, password: str) -> bool:
        """Whether the password, read the way people decorate common passwords, is on the list."""
        entries = self.load()
        return any(
            candidate in entries
            for candidate in _deny_list_candidates(_folded(password))
            if len(candidate) <= self._longest
        )


def _email_local_parts(email: str) -> Iterable[str]:
    local = email.rpartition("@")[0] if "@" in email else email
    yield local
    # "ada+parley@example.com" is still Ada: check the part before the sub-address tag too.
    yield local.partition("+")[0]


def _contains_email_local_part(folded_password: str, email: str) -> bool:
    def single_leet_reading(text: str) -> str:
        return "".join(_LEET.get(character, character)[0] for character in text)

    readings: tuple[Callable[[str], str], ...] = (
        lambda text: text,
        _squashed,
        lambda text: single_leet_reading(_squashed(text)),
    )
    for local in _email_local_parts(email):
        folded_local = _folded(local)
        for reading in readings:
            needle = reading(folded_local)
            if len(needle) >= 3 and needle in reading(folded_password):
                return True
    return False


class PasswordPolicy:
    """Which passwords may be set, after NIST SP 800-63B 5.1.1.2.

    - Length 12 to 128, counted in Unicode code points after NFKC normalization.
    - No composition rules (no "one digit, one symbol").
    - Not common: not on the shipped deny-list even after undoing the usual decorations (case,
      leet substitutions, digits, years and symbols around the word); not a repeated character or
      chunk, a simple sequence or a keyboard walk.
    - Not containing the local part of the user's email (when that is at least 3 characters).
    """

    def __init__(
        self,
        common_passwords: CommonPasswords | None = None,
        *,
        min_length: int = MIN_PASSWORD_LENGTH,
        max_length: int = MAX_PASSWORD_LENGTH,
    ) -> None:
        if not 1 <= min_length <= max_length:
            raise ValueError("password length bounds must satisfy 1 <= min_length <= max_length")
        self._common = common_passwords if common_passwords is not None else CommonPasswords()
        self._min_length = min_length
        self._max_length = max_length

    @property
    def min_length(self) -> int:
        return self._min_length

    @property
    def max_length(self) -> int:
        return self._max_length

    def violations(self, password: str, *, email: str, field: str = "password") -> list[FieldViolation]:
        """Every rule the password breaks, in a fixed order (length, commonness, email), at most one
        violation per reason; empty when the password may be set."""
        length = len(normalize_password(password))
        found: list[FieldViolation] = []
        if length < self._min_length:
            found.append(
                FieldViolation(
                    field=field,
                    description=f"Use at least {self._min_length} characters; this password has {length}.",
                    reason="PASSWORD_TOO_SHORT",
                )
            )
        if length > self._max_length:
            found.append(
                FieldViolation(
                    field=field,
                    description=f"Use at most {self._max_length} characters; this password has {length}.",
                    reason="PASSWORD_TOO_LONG",
                )
            )
            if length > _LONGEST_FULLY_CHECKED:
                return found
        common = self._why_common(password)
        if common is not None:
            found.append(
                FieldViolation(
                    field=field, description=_COMMON_DESCRIPTIONS[common], reason="PASSWORD_TOO_COMMON"
                )
            )
        if email and _contains_email_local_part(_folded(password), email):
            found.append(
                FieldViolation(
                    field=field,
                    description="The password must not contain your email address or the part before the @.",
                    reason="PASSWORD_CONTAINS_EMAIL",
                )
            )
        return found

    def check(self, password: str, *, email: str, field: str = "password") -> None:
        """Raise INVALID_ARGUMENT / PASSWORD_POLICY_VIOLATION listing every violation, if any."""
        found = self.violations(password, email=email, field=field)
        if found:
            raise InvalidArgument(
                "The password does not meet the password policy: "
                + " ".join(violation.description for violation in found),
                reason="PASSWORD_POLICY_VIOLATION",
                field_violations=found,
            )

    def _why_common(self, password: str) -> str | None:
        if self._common.matches(password):
            return "deny_list"
        for form in sorted(_pattern_forms(_folded(password)), key=lambda form: (-len(form), form)):
            kind = _pattern_kind(form)
            if kind is not None:
                return kind
        return None
