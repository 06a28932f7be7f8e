"""ETags, Cache-Control values and RFC 9110 If-None-Match comparison."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
from google.api import httpbody_pb2
from google.rpc import error_details_pb2

from parley.billing.v1 import billing_pb2
from services.common.http_cache import (
    CATALOG_CACHE,
    JWKS_CACHE,
    CachePolicy,
    cache_headers,
    etag_matches,
    send_cache_headers,
    strong_etag,
)

ETAG_SHAPE = re.compile(r'^"sha256-[0-9a-f]{32}"$')


def test_strong_etag_has_the_documented_shape_and_is_deterministic() -> None:
    plan = billing_pb2.Plan(id="pro", display_name="Pro", included_tokens=2_000_000)
    etag = strong_etag(plan)
    assert ETAG_SHAPE.match(etag), etag
    assert strong_etag(billing_pb2.Plan(id="pro", display_name="Pro", included_tokens=2_000_000)) == etag


def test_any_change_to_the_message_changes_the_etag() -> None:
    base = billing_pb2.Plan(id="pro", display_name="Pro", included_tokens=2_000_000)
    changed = [
        billing_pb2.Plan(id="pro", display_name="Pro+", included_tokens=2_000_000),
        billing_pb2.Plan(id="pro", display_name="Pro", included_tokens=2_000_001),
        billing_pb2.Plan(id="pro", display_name="Pro", included_tokens=2_000_000, retired=True),
    ]
    etags = {strong_etag(base), *(strong_etag(message) for message in changed)}
    assert len(etags) == 1 + len(changed)


def test_map_insertion_order_does_not_change_the_etag() -> None:
    # Deterministic serialization sorts map entries; without it equal messages could differ in bytes.
    first = error_details_pb2.ErrorInfo(reason="R")
    first.metadata["a"] = "1"
    first.metadata["b"] = "2"
    second = error_details_pb2.ErrorInfo(reason="R")
    second.metadata["b"] = "2"
    second.metadata["a"] = "1"
    assert strong_etag(first) == strong_etag(second)


def test_http_body_etag_follows_its_bytes() -> None:
    one = httpbody_pb2.HttpBody(content_type="application/json", data=b'{"keys":[]}')
    same = httpbody_pb2.HttpBody(content_type="application/json", data=b'{"keys":[]}')
    other = httpbody_pb2.HttpBody(content_type="application/json", data=b'{"keys":[{}]}')
    assert strong_etag(one) == strong_etag(same) != strong_etag(other)


def test_cache_control_values() -> None:
    assert CATALOG_CACHE.cache_control == "public, max-age=60"
    assert JWKS_CACHE.cache_control == "public, max-age=60"
    assert CachePolicy(max_age_s=0, shared=False).cache_control == "private, max-age=0"
    with pytest.raises(ValueError, match="max_age_s"):
        CachePolicy(max_age_s=-1)


def test_cache_headers_are_etag_and_cache_control() -> None:
    plan = billing_pb2.Plan(id="free")
    assert cache_headers(plan, CATALOG_CACHE) == (
        ("etag", strong_etag(plan)),
        ("cache-control", "public, max-age=60"),
    )


class RecordingContext:
    """Only what send_cache_headers touches of a ServicerContext: initial metadata, sent once."""

    def __init__(self) -> None:
        self.sent: list[Sequence[tuple[str, str]]] = []

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.sent.append(metadata)


async def test_send_cache_headers_sends_them_once_and_returns_the_response() -> None:
    context = RecordingContext()
    plan = billing_pb2.Plan(id="team")
    returned = await send_cache_headers(context, plan, JWKS_CACHE)
    assert returned is plan
    assert context.sent == [(("etag", strong_etag(plan)), ("cache-control", "public, max-age=60"))]
    # The value is usable as a grpc metadata tuple: lower-case ASCII keys, printable values.
    for key, value in context.sent[0]:
        assert key == key.lower()
        assert value.isprintable()


ETAG = '"sha256-0123456789abcdef0123456789abcdef"'


@pytest.mark.parametrize(
    ("header", "etag", "expected"),
    [
        # No header, or an empty one, never matches.
        (None, ETAG, False),
        ("", ETAG, False),
        ("   ", ETAG, False),
        # "*" matches any current representation.
        ("*", ETAG, True),
        (" * ", ETAG, True),
        # Exact strong match, and weak comparison ignoring W/ on either side.
        (ETAG, ETAG, True),
        (f"W/{ETAG}", ETAG, True),
        (ETAG, f"W/{ETAG}", True),
        (f"W/{ETAG}", f"W/{ETAG}", True),
        # Lists, with optional whitespace, empty elements and several joined header lines.
        (f'"a", {ETAG}', ETAG, True),
        (f'"a",{ETAG},"b"', ETAG, True),
        (f'"a" ,\t{ETAG}', ETAG, True),
        (f'"a",, ,{ETAG}', ETAG, True),
        ('"a", "b"', ETAG, False),
        # A comma belongs to the tag when inside quotes.
        ('"x,y"', '"x,y"', True),
        ('"x,y"', '"x"', False),
        ('"x", "y"', '"x,y"', False),
        # Opaque tags compare octet by octet: case, prefixes and quotes matter.
        ('"ABC"', '"abc"', False),
        ('"abc"', '"abcd"', False),
        ("abc", '"abc"', False),
        ('"abc', '"abc"', False),
        ('w/"abc"', '"abc"', False),
        # "*" inside a list is malformed and does not match; other members still count.
        ('*, "a"', '"b"', False),
        ('*, "b"', '"b"', True),
        # Junk after a tag makes that member malformed, not the whole list.
        ('"a"junk, "b"', '"a"', False),
        ('"a"junk, "b"', '"b"', True),
        # A space or DQUOTE cannot be inside an opaque tag.
        ('"a b"', '"a b"', False),
        # The empty opaque tag is a valid entity-tag.
        ('""', '""', True),
        # A malformed ETag of our own never matches anything.
        ('"abc"', "abc", False),
    ],
)
def test_etag_matches_uses_weak_comparison(header: str | None, etag: str, expected: bool) -> None:
    assert etag_matches(header, etag) is expected
