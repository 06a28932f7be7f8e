"""The keyset pagination helper: page sizes, opaque page tokens, and the limit+1 fetch."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from services.common.errors import InvalidArgument
from services.common.pagination import (
    BY_INTEGER,
    BY_TIME,
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    Page,
    Position,
    effective_page_size,
    keyset_page,
    query_fingerprint,
)

START = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@dataclass(frozen=True)
class Item:
    id: str
    created_at: datetime


@dataclass
class NewestFirst:
    """A list ordered by (created_at, id) descending, like the SQL lists, recording each fetch."""

    items: list[Item]
    fetches: list[tuple[Position[datetime] | None, int]] = field(default_factory=list)

    async def fetch(self, after: Position[datetime] | None, limit: int) -> Sequence[Item]:
        self.fetches.append((after, limit))
        ordered = sorted(self.items, key=lambda item: (item.created_at, item.id), reverse=True)
        if after is not None:
            ordered = [item for item in ordered if (item.created_at, item.id) < after]
        return ordered[:limit]

    async def page(self, page_size: int = 0, page_token: str = "", *, query: str = "items") -> Page[Item]:
        return await keyset_page(
            page_size=page_size,
            page_token=page_token,
            query=(query,),
            sort_key=BY_TIME,
            position=lambda item: (item.created_at, item.id),
            fetch=self.fetch,
        )


def items(count: int) -> list[Item]:
    # Pairs share a timestamp, so the id must break ties for the pages to be exact.
    return [Item(f"i{n:03d}", START + timedelta(seconds=n // 2)) for n in range(count)]


def token_with(after: list[object], query: str = "items") -> str:
    """A token as the server writes one, with any cursor content (to forge bad cursors)."""
    payload = json.dumps({"a": after, "q": query_fingerprint(query)}).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


async def test_pages_are_complete_ordered_and_disjoint_with_ties_broken_by_id() -> None:
    listing = NewestFirst(items(7))
    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = await listing.page(3, token)
        assert len(page.items) <= 3
        seen.extend(item.id for item in page.items)
        token = page.next_page_token
        if not token:
            break
    assert seen == [item.id for item in sorted(items(7), key=lambda i: (i.created_at, i.id), reverse=True)]
    # One more than the page each time, which is how the helper knows another page exists.
    assert [limit for _, limit in listing.fetches] == [4, 4, 4]
    assert listing.fetches[0][0] is None
    assert listing.fetches[1][0] == (START + timedelta(seconds=2), "i004")


async def test_a_page_that_ends_the_list_has_no_next_token() -> None:
    exact = NewestFirst(items(4))
    assert (await exact.page(4)).next_page_token == ""
    assert (await NewestFirst([]).page(5)) == Page(items=(), next_page_token="")
    first = await exact.page(2)
    last = await exact.page(2, first.next_page_token)
    assert [item.id for item in last.items] == ["i001", "i000"]
    assert last.next_page_token == ""


async def test_page_size_zero_means_the_default_and_large_is_capped() -> None:
    listing = NewestFirst(items(3))
    await listing.page(0)
    await listing.page(MAX_PAGE_SIZE * 10)
    assert [limit for _, limit in listing.fetches] == [DEFAULT_PAGE_SIZE + 1, MAX_PAGE_SIZE + 1]
    assert effective_page_size(7) == 7


async def test_a_negative_page_size_is_refused_before_fetching() -> None:
    listing = NewestFirst(items(3))
    with pytest.raises(InvalidArgument) as error:
        await listing.page(-1)
    assert error.value.reason == "INVALID_PAGE_SIZE"
    assert error.value.field_violations[0].field == "page_size"
    assert listing.fetches == []


@pytest.mark.parametrize(
    "token",
    [
        "%%%",
        "bm90LWpzb24",
        base64.urlsafe_b64encode(b'{"x":1}').decode(),
        token_with(["2026-01-02T03:04:05", "naive"]),
        token_with(["yesterday", "i001"]),
        token_with(["2026-01-02T03:04:05+00:00"]),
        token_with([]),
    ],
    ids=["not-base64", "not-json", "no-cursor", "naive-time", "not-a-time", "no-id", "empty"],
)
async def test_forged_tokens_are_refused_before_fetching(token: str) -> None:
    listing = NewestFirst(items(3))
    with pytest.raises(InvalidArgument) as error:
        await listing.page(2, token)
    assert error.value.reason == "INVALID_PAGE_TOKEN"
    assert error.value.message == "page_token is not a token this server issued."
    assert error.value.field_violations[0].field == "page_token"
    assert listing.fetches == []


async def test_a_token_from_another_query_is_refused() -> None:
    listing = NewestFirst(items(5))
    token = (await listing.page(2, query="items of alice")).next_page_token
    with pytest.raises(InvalidArgument) as error:
        await listing.page(2, token, query="items of bob")
    assert error.value.reason == "INVALID_PAGE_TOKEN"
    # The token is opaque text, but nothing in it is trusted beyond its position.
    decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    assert decoded["a"] == [(START + timedelta(seconds=1)).isoformat(), "i003"]


async def test_integer_sort_keys_round_trip_and_refuse_text() -> None:
    ranked = [(10, "free"), (20, "pro"), (20, "team"), (30, "zeta")]

    async def fetch(after: Position[int] | None, limit: int) -> Sequence[tuple[int, str]]:
        return [pair for pair in ranked if after is None or pair > after][:limit]

    async def page(token: str) -> Page[tuple[int, str]]:
        return await keyset_page(
            page_size=2,
            page_token=token,
            query=("ranked",),
            sort_key=BY_INTEGER,
            position=lambda p: p,
            fetch=fetch,
        )

    first = await page("")
    second = await page(first.next_page_token)
    assert first.items + second.items == tuple(ranked)
    with pytest.raises(InvalidArgument) as error:
        await page(token_with(["ten", "pro"], query="ranked"))
    assert error.value.reason == "INVALID_PAGE_TOKEN"
