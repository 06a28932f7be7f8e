"""Page sizes and opaque page tokens."""

from __future__ import annotations

import base64
import json

import pytest

from services.common.errors import InvalidArgument
from services.common.pagination import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    PageCursor,
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
