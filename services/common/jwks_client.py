"""Fetching the auth service's JWKS over gRPC, for `CachedJwksVerifier` in the other services."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import grpc

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from services.common.identity import JwksFetcher

DEFAULT_FETCH_TIMEOUT_S = 3.0


class JwksFetchError(RuntimeError):
    """The auth service answered GetJwks with something that is not a JWK Set."""


def grpc_jwks_fetcher(
    channel: grpc.aio.Channel, *, timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
) -> JwksFetcher:
    """A fetch function calling `AuthService.GetJwks` (an `HttpBody` of JSON) on `channel`.

    The channel belongs to the caller, who closes it at shutdown. gRPC errors propagate; the
    verifier treats any failure as "keep the cached keys".
    """
    stub = auth_pb2_grpc.AuthServiceStub(channel)

    async def fetch_jwks() -> Mapping[str, Any]:
        body = await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=timeout_s)
        try:
            document = json.loads(body.data)
        except ValueError as error:
            raise JwksFetchError(f"GetJwks returned invalid JSON ({body.content_type!r})") from error
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise JwksFetchError("GetJwks returned JSON without a 'keys' list")
        return document

    return fetch_jwks
