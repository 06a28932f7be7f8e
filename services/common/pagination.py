"""Keyset pagination, one way for every List RPC: `keyset_page`.

A list is ordered by a sort key then the item id, both descending or both ascending as the query
says; a page ends where its last item stands, and the next page starts strictly after it. The
caller hands `keyset_page` the request's page size and token, the parts that identify its query,
how to read an item's position, and a fetch `(after, limit) -> items`; the helper checks the
request, fetches one item more than the page to learn whether another page exists (no COUNT), and
builds the next token.

A page token only positions a cursor: it names where the previous page stopped and a fingerprint
of the query it belongs to. It grants nothing, because every list query still applies the
caller's own filters, and a token replayed against a different query is refused
(INVALID_PAGE_TOKEN, like a forged one). A negative page size is INVALID_PAGE_SIZE; zero means
`DEFAULT_PAGE_SIZE`; more than `MAX_PAGE_SIZE` is capped.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from services.common.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200

# One answer for every token this server could not have issued, so a probe learns nothing from it.
_NOT_ISSUED = "page_token is not a token this server issued."

SortKeyT = TypeVar("SortKeyT")
ItemT = TypeVar("ItemT")


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


def _encode_page_token(cursor: PageCursor) -> str:
    payload = json.dumps({"a": list(cursor.after), "q": cursor.query}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def _decode_page_token(token: str, *, expected_query: str) -> PageCursor | None:
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


@dataclass(frozen=True)
class SortKey(Generic[SortKeyT]):
    """How a list's sort key is written into a page token and read back from one.

    `parse` raises ValueError for text it cannot read; such a token is refused like a forged one.
    """

    to_text: Callable[[SortKeyT], str]
    parse: Callable[[str], SortKeyT]


def _aware_datetime(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("a cursor time must carry its UTC offset")
    return moment


# Lists ordered by a timestamp (then id), and by an integer position (then id).
BY_TIME: SortKey[datetime] = SortKey(to_text=datetime.isoformat, parse=_aware_datetime)
BY_INTEGER: SortKey[int] = SortKey(to_text=str, parse=int)

# Where a page starts: strictly after this (sort key, id), or at the beginning when None.
Position = tuple[SortKeyT, str]


@dataclass(frozen=True)
class Page(Generic[ItemT]):
    """One page of a list, and the token of the next one ("" on the last page)."""

    items: tuple[ItemT, ...]
    next_page_token: str


async def keyset_page(
    *,
    page_size: int,
    page_token: str,
    query: Sequence[object],
    sort_key: SortKey[SortKeyT],
    position: Callable[[ItemT], Position[SortKeyT]],
    fetch: Callable[[Position[SortKeyT] | None, int], Awaitable[Sequence[ItemT]]],
) -> Page[ItemT]:
    """One page of a keyset-paginated list.

    - `query`: what identifies the list and its filters (its name first, e.g. `("sessions", user_id)`);
      a token is only accepted back by the same query.
    - `position(item)`: the item's (sort key, id), in the list's order.
    - `fetch(after, limit)`: up to `limit` items in list order, strictly after `after` (from the
      start when None). It is asked for one more item than the page holds.

    Raises INVALID_PAGE_SIZE for a negative size and INVALID_PAGE_TOKEN for a token this query did
    not issue, before anything is fetched.
    """
    limit = effective_page_size(page_size)
    fingerprint = query_fingerprint(*query)
    cursor = _decode_page_token(page_token, expected_query=fingerprint)
    after = _cursor_position(cursor, sort_key) if cursor is not None else None
    found = list(await fetch(after, limit + 1))
    items = tuple(found[:limit])
    if len(found) <= limit or not items:
        return Page(items=items, next_page_token="")
    last_key, last_id = position(items[-1])
    next_cursor = PageCursor(after=(sort_key.to_text(last_key), last_id), query=fingerprint)
    return Page(items=items, next_page_token=_encode_page_token(next_cursor))


def _cursor_position(cursor: PageCursor, sort_key: SortKey[SortKeyT]) -> Position[SortKeyT]:
    """The (sort key, id) a cursor holds; one that holds no such pair is refused like a forged token."""
    try:
        text, item_id = cursor.after
        return sort_key.parse(text), item_id
    except ValueError:
        raise _bad_token(_NOT_ISSUED) from None


def _bad_token(message: str) -> InvalidArgument:
    return InvalidArgument(
        message,
        reason="INVALID_PAGE_TOKEN",
        field_violations=[FieldViolation("page_token", message, "INVALID_PAGE_TOKEN")],
    )
