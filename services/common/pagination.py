"""Opaque page tokens and page-size capping, shared by every List RPC.

A page token only positions a cursor: it names where the previous page stopped and a fingerprint
of the query it belongs to. It grants nothing, because every list query still applies the
caller's own filters, and a token replayed against a different query is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from services.common.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200

# One answer for every token this server could not have issued, so a probe learns nothing from it.
_NOT_ISSUED = "page_token is not a token this server issued."

SortKeyT = TypeVar("SortKeyT")


def effective_page_size(
    requested: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE
) -> int:
    """Zero means the default; anything above the cap is capped (negative is refused by validation)."""
    if requested < 0:
        raise InvalidArgument(
            "page_size must not be negative.",
            reason="INVALID_PAGE_SIZE",
            field_violations=[FieldViolation("page_size", "must be zero or positive", "INVALID_PAGE_SIZE")],
        )
    if requested == 0:
        return default
    return min(requested, maximum)


def query_fingerprint(*parts: object) -> str:
    """A short digest of the query's parameters, so a token cannot be replayed on another query."""
    encoded = json.dumps([str(part) for part in parts], separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


@dataclass(frozen=True)
class PageCursor:
    """Where the previous page stopped: the sort key values of its last item."""

    after: tuple[str, ...]
    query: str


def encode_page_token(cursor: PageCursor) -> str:
    payload = json.dumps({"a": list(cursor.after), "q": cursor.query}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def decode_page_token(token: str, *, expected_query: str) -> PageCursor | None:
    """The cursor inside `token`, None for the first page; a forged or foreign token is INVALID_ARGUMENT."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        raw = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after = tuple(str(value) for value in raw["a"])
        query = str(raw["q"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise _bad_token(_NOT_ISSUED) from None
    if query != expected_query:
        raise _bad_token("page_token belongs to a different query; start again without it.")
    return PageCursor(after=after, query=query)


def cursor_sort_key_and_id(
    cursor: PageCursor, parse_sort_key: Callable[[str], SortKeyT]
) -> tuple[SortKeyT, str]:
    """The (sort key, id) pair a cursor holds; one that holds no such pair is refused like a forged token.

    `parse_sort_key` turns the stored text back into the sort key and raises ValueError if it cannot.
    """
    try:
        sort_key, item_id = cursor.after
        return parse_sort_key(sort_key), item_id
    except ValueError:
        raise _bad_token(_NOT_ISSUED) from None


def cursor_time_and_id(cursor: PageCursor) -> tuple[datetime, str]:
    """The (timezone-aware time, id) pair a cursor holds, for lists ordered by a timestamp then id."""
    return cursor_sort_key_and_id(cursor, _aware_datetime)


def _aware_datetime(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("a cursor time must carry its UTC offset")
    return moment


def _bad_token(message: str) -> InvalidArgument:
    return InvalidArgument(
        message,
        reason="INVALID_PAGE_TOKEN",
        field_violations=[FieldViolation("page_token", message, "INVALID_PAGE_TOKEN")],
    )
