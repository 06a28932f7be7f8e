"""HTTP caching headers for cacheable reads: a strong ETag and Cache-Control, sent as initial metadata.

Envoy's transcoder passes a response's initial metadata on as HTTP headers, so a servicer that
answers a public, caller-independent GET (the plan catalog, the model catalog, the JWKS) calls
`send_cache_headers` just before returning. The gateway, not the service, answers a request whose
`If-None-Match` matches the ETag with 304 Not Modified; `etag_matches` is the comparison it (and the
tests) use. See docs/caching.md for what is cacheable and by whom.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final, TypeVar

import grpc
from google.protobuf.message import Message

# Hex digits of the SHA-256 kept in an ETag: 128 bits, far beyond any chance of a collision
# between two versions of one resource, and short enough for a header.
_ETAG_HEX_DIGITS: Final = 32
_WEAK_PREFIX: Final = "W/"

ResponseT = TypeVar("ResponseT", bound=Message)


@dataclass(frozen=True)
class CachePolicy:
    """How long, and by whom, a response may be reused without asking the origin again."""

    max_age_s: int
    # Shared caches (a CDN) may store it: only for responses that are the same for every caller.
    shared: bool = True

    def __post_init__(self) -> None:
        if self.max_age_s < 0:
            raise ValueError("max_age_s must not be negative")

    @property
    def cache_control(self) -> str:
        scope = "public" if self.shared else "private"
        return f"{scope}, max-age={self.max_age_s}"


# The plan and model catalogs change on an admin action or a deploy; a minute bounds how stale a
# price can be, and revalidation with If-None-Match makes every refresh after that a cheap 304.
CATALOG_CACHE: Final = CachePolicy(max_age_s=60)
# A rotated signing key signs at once, and a verifier that meets its unknown kid refetches the set;
# a shared cache may serve the pre-rotation set to that refetch for up to max-age, so it stays short.
JWKS_CACHE: Final = CachePolicy(max_age_s=60)


def strong_etag(message: Message) -> str:
    """A strong ETag over the message's deterministic serialization: `"sha256-<32 hex digits>"`.

    Equal messages give equal ETags in every replica; any change to a field changes the ETag.
    """
    digest = hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()
    return f'"sha256-{digest[:_ETAG_HEX_DIGITS]}"'


def cache_headers(message: Message, policy: CachePolicy) -> tuple[tuple[str, str], ...]:
    """The `etag` and `cache-control` metadata for `message` under `policy`."""
    return (("etag", strong_etag(message)), ("cache-control", policy.cache_control))


async def send_cache_headers(
    context: grpc.aio.ServicerContext, response: ResponseT, policy: CachePolicy
) -> ResponseT:
    """Send `response`'s ETag and Cache-Control as initial metadata and return `response` unchanged.

    Call it once, last, in a unary handler that sends no other initial metadata (gRPC sends it once).
    """
    await context.send_initial_metadata(cache_headers(response, policy))
    return response


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an `If-None-Match` header value matches `etag` (RFC 9110 §13.1.2, weak comparison).

    `*` matches any current representation; otherwise the header is a comma-separated list of entity
    tags, strong or weak, and one whose opaque tag equals `etag`'s matches regardless of `W/`.
    Several header lines are passed joined with commas. Malformed members never match.
    """
    if if_none_match is None:
        return False
    if if_none_match.strip(" \t") == "*":
        return True
    wanted = _opaque_tag(etag.strip(" \t"))
    if wanted is None:
        return False
    return any(candidate == wanted for candidate in _entity_tags(if_none_match))


def _opaque_tag(entity_tag: str) -> str | None:
    """The quoted opaque tag of one entity-tag (without `W/`), or None when it is malformed."""
    tag = entity_tag.removeprefix(_WEAK_PREFIX)
    if len(tag) < 2 or tag[0] != '"' or tag[-1] != '"':
        return None
    if not all(_is_etagc(char) for char in tag[1:-1]):
        return None
    return tag


def _is_etagc(char: str) -> bool:
    # etagc = %x21 / %x23-7E / obs-text: visible characters except DQUOTE, plus bytes 0x80-0xFF.
    code = ord(char)
    return code == 0x21 or 0x23 <= code <= 0x7E or 0x80 <= code <= 0xFF


def _entity_tags(header: str) -> list[str]:
    """The opaque tags of a `#entity-tag` list; a comma inside quotes belongs to the tag."""
    tags: list[str] = []
    index, length = 0, len(header)
    while index < length:
        while index < length and header[index] in " \t,":
            index += 1
        start = index
        if header.startswith(_WEAK_PREFIX, index):
            index += len(_WEAK_PREFIX)
        if index < length and header[index] == '"':
            closing = header.find('"', index + 1)
            index = length if closing == -1 else closing + 1
        # Whatever follows up to the next comma is part of this member; junk there makes it malformed.
        while index < length and header[index] != ",":
            index += 1
        member = header[start:index].strip(" \t")
        if member:
            tag = _opaque_tag(member)
            if tag is not None:
                tags.append(tag)
    return tags
