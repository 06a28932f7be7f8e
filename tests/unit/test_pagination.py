"""Page sizes and opaque page tokens."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from services.common.errors import InvalidArgument
from services.common.pagination import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    PageCursor,
    cursor_sort_key_and_id,
    cursor_time_and_id,
    decode_page_token,
    effective_page_size,
    encode_page_token,
    query_fingerprint,
)


def test_page_size_defaults_and_caps() -> None:
    assert effective_page_size(0) == DEFAULT_PAGE_SIZE
    assert effective_page_size(7) == 7
    assert effective_page_size(MAX_PAGE_SIZE * 10) == MAX_PAGE_SIZE
    with pytest.raises(InvalidArgument) as error:
        effective_page_size(-1)
    assert error.value.reason == "INVALID_PAGE_SIZE"
    assert error.value.field_violations[0].field == "page_size"


def test_token_round_trips_for_the_same_query() -> None:
    query = query_fingerprint("plans", False)
    token = encode_page_token(PageCursor(after=("10", "pro"), query=query))
    assert decode_page_token(token, expected_query=query) == PageCursor(after=("10", "pro"), query=query)
    assert decode_page_token("", expected_query=query) is None


@pytest.mark.parametrize("token", ["%%%", "bm90LWpzb24", base64.urlsafe_b64encode(b'{"x":1}').decode()])
def test_forged_tokens_are_invalid_argument(token: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        decode_page_token(token, expected_query="q")
    assert error.value.reason == "INVALID_PAGE_TOKEN"


def test_token_from_another_query_is_refused() -> None:
    token = encode_page_token(PageCursor(after=("1",), query=query_fingerprint("plans", True)))
    with pytest.raises(InvalidArgument) as error:
        decode_page_token(token, expected_query=query_fingerprint("plans", False))
    assert error.value.reason == "INVALID_PAGE_TOKEN"
    # The token is opaque text, but nothing in it is trusted beyond its position.
    assert json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))["a"] == ["1"]


def test_cursor_pairs_parse_their_sort_key() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert cursor_time_and_id(PageCursor(after=(moment.isoformat(), "u1"), query="q")) == (moment, "u1")
    assert cursor_sort_key_and_id(PageCursor(after=("10", "pro"), query="q"), int) == (10, "pro")


@pytest.mark.parametrize(
    "after", [("2026-01-02T03:04:05", "naive"), ("yesterday", "u1"), ("2026-01-02T03:04:05+00:00",), ()]
)
def test_cursor_without_a_time_and_id_is_refused_like_a_forged_token(after: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgument) as error:
        cursor_time_and_id(PageCursor(after=after, query="q"))
    assert error.value.reason == "INVALID_PAGE_TOKEN"
    assert error.value.message == "page_token is not a token this server issued."
    assert error.value.field_violations[0].field == "page_token"


def test_cursor_with_a_non_numeric_sort_order_is_refused() -> None:
    with pytest.raises(InvalidArgument) as error:
        cursor_sort_key_and_id(PageCursor(after=("ten", "pro"), query="q"), int)
    assert error.value.reason == "INVALID_PAGE_TOKEN"
