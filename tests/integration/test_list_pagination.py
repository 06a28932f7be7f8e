"""Every List RPC pages the same way (services.common.pagination.keyset_page), over real gRPC.

One server, built by the production wiring for auth, billing and chat, serves AuthService
ListSessions and ListApiKeys, AuthAdminService ListUsers, BillingService ListPlans and ChatService
v1 and v2 ListModels. For each list: small pages walk the whole list, in its order, each item once;
a token from another list is INVALID_PAGE_TOKEN; a negative page_size is refused with the field
violation INVALID_PAGE_SIZE.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from parley.chat.v1 import chat_pb2, chat_pb2_grpc
from parley.chat.v2 import chat_pb2 as chat_v2_pb2
from parley.chat.v2 import chat_pb2_grpc as chat_v2_pb2_grpc
from runtime.process import build_services, registrations_of, start_services
from services.auth.accounts import AccountService
from services.auth.api_keys import ApiKeyManager
from services.auth.passwords import PasswordHasher, PasswordPolicy
from services.auth.repository import auth_units_of_work
from services.auth.sessions import SessionManager
from services.auth.signing_keys import generate_kek
from services.common.context import ServiceContext
from services.common.db import Database
from services.common.identity import AUTH_METHOD_HEADER, ROLES_HEADER, encode_roles_header
from services.common.revocation import InMemoryRevocationList
from services.common.settings import load_settings
from tests.support.auth_accounts import CHEAP_ARGON2, STRONG_PASSWORD
from tests.support.pki import ServicePki
from tests.support.servers import rich_status, serving

SEEDED = 5
PAGE_SIZE = 2

Metadata = tuple[tuple[str, str], ...]
# One call of a list RPC: (page_size, page_token) -> (the ids on the page, next_page_token).
ListCall = Callable[[int, str], Awaitable[tuple[list[str], str]]]


@dataclass(frozen=True)
class Seeded:
    user_id: str
    user_ids: frozenset[str]
    session_ids: frozenset[str]
    api_key_ids: frozenset[str]


async def seed(database: Database) -> Seeded:
    """Users, sessions and API keys written through the domain, as the RPCs would write them."""
    units = auth_units_of_work(database)
    revocations = InMemoryRevocationList()
    sessions = SessionManager(units, revocations)
    accounts = AccountService(
        units, hasher=PasswordHasher(CHEAP_ARGON2), policy=PasswordPolicy(), sessions=sessions
    )
    users = [
        await accounts.register(f"user{n}@example.com", STRONG_PASSWORD, f"User {n}") for n in range(SEEDED)
    ]
    owner = users[0].id
    started = [
        await sessions.start(owner, auth_method="jwt", device_name=f"Device {n}") for n in range(SEEDED)
    ]
    keys = ApiKeyManager(units, changes=revocations)
    created = [await keys.create(owner, name=f"key {n}") for n in range(SEEDED)]
    return Seeded(
        user_id=owner,
        user_ids=frozenset(user.id for user in users),
        session_ids=frozenset(item.session.id for item in started),
        api_key_ids=frozenset(item.api_key.id for item in created),
    )


@dataclass(frozen=True)
class Lists:
    """Each list RPC as a `ListCall`, and what it must list in full."""

    calls: dict[str, ListCall]
    expected: dict[str, frozenset[str] | None]


def ids_of(items: Sequence[Any]) -> list[str]:
    return [str(item.id) for item in items]


@pytest.fixture
async def lists(database: Database, service_pki: ServicePki) -> AsyncIterator[Lists]:
    seeded = await seed(database)
    settings = load_settings(auth_key_encryption_key=generate_kek())
    context = ServiceContext(settings, database, InMemoryRevocationList(), embedded=False)
    bundles = build_services(["auth", "billing", "chat"], context)
    await start_services(bundles)
    # The running server's channel is the gateway's: its identity headers are believed. An identity
    # it vouches for by API key carries no token, so no token claims to check.
    as_user: Metadata = (("x-parley-user-id", seeded.user_id), (AUTH_METHOD_HEADER, "api_key"))
    as_admin: Metadata = (*as_user, (ROLES_HEADER, encode_roles_header(["user", "admin"])))
    async with serving(registrations_of(bundles), pki=service_pki) as running:
        auth = auth_pb2_grpc.AuthServiceStub(running.channel)
        admin = auth_pb2_grpc.AuthAdminServiceStub(running.channel)
        billing = billing_pb2_grpc.BillingServiceStub(running.channel)
        chat_v1 = chat_pb2_grpc.ChatServiceStub(running.channel)
        chat_v2 = chat_v2_pb2_grpc.ChatServiceStub(running.channel)

        async def sessions(size: int, token: str) -> tuple[list[str], str]:
            reply = await auth.ListSessions(
                auth_pb2.ListSessionsRequest(page_size=size, page_token=token), metadata=as_user
            )
            return ids_of(reply.sessions), reply.next_page_token

        async def api_keys(size: int, token: str) -> tuple[list[str], str]:
            reply = await auth.ListApiKeys(
                auth_pb2.ListApiKeysRequest(page_size=size, page_token=token), metadata=as_user
            )
            return ids_of(reply.api_keys), reply.next_page_token

        async def users(size: int, token: str) -> tuple[list[str], str]:
            reply = await admin.ListUsers(
                auth_pb2.ListUsersRequest(page_size=size, page_token=token), metadata=as_admin
            )
            return ids_of(reply.users), reply.next_page_token

        async def plans(size: int, token: str) -> tuple[list[str], str]:
            reply = await billing.ListPlans(
                billing_pb2.ListPlansRequest(page_size=size, page_token=token), metadata=as_user
            )
            return ids_of(reply.plans), reply.next_page_token

        async def models_v1(size: int, token: str) -> tuple[list[str], str]:
            reply = await chat_v1.ListModels(
                chat_pb2.ListModelsRequest(page_size=size, page_token=token), metadata=as_user
            )
            return ids_of(reply.models), reply.next_page_token

        async def models_v2(size: int, token: str) -> tuple[list[str], str]:
            reply = await chat_v2.ListModels(
                chat_v2_pb2.ListModelsRequest(page_size=size, page_token=token), metadata=as_user
            )
            return ids_of(reply.models), reply.next_page_token

        yield Lists(
            calls={
                "ListSessions": sessions,
                "ListApiKeys": api_keys,
                "ListUsers": users,
                "ListPlans": plans,
                "ListModels v1": models_v1,
                "ListModels v2": models_v2,
            },
            # None: whatever the list holds in one maximal page (seeded by migrations or the catalog).
            expected={
                "ListSessions": seeded.session_ids,
                "ListApiKeys": seeded.api_key_ids,
                "ListUsers": seeded.user_ids,
                "ListPlans": None,
                "ListModels v1": None,
                "ListModels v2": None,
            },
        )


LIST_NAMES = ["ListSessions", "ListApiKeys", "ListUsers", "ListPlans", "ListModels v1", "ListModels v2"]


async def walk(call: ListCall, page_size: int) -> tuple[list[str], int]:
    """Every id the list yields page by page, and how many pages that took."""
    seen: list[str] = []
    token = ""
    for pages in range(1, 100):
        ids, token = await call(page_size, token)
        assert len(ids) <= page_size
        assert ids, "a page before the last is never empty"
        seen.extend(ids)
        if not token:
            return seen, pages
    raise AssertionError("the list never ended")


@pytest.mark.parametrize("name", LIST_NAMES)
async def test_small_pages_walk_the_whole_list_in_order_each_item_once(lists: Lists, name: str) -> None:
    call = lists.calls[name]
    whole, last_token = await call(200, "")
    assert last_token == ""
    expected = lists.expected[name]
    if expected is not None:
        assert set(whole) == expected
    assert len(whole) > PAGE_SIZE, "the list must need several pages"

    seen, pages = await walk(call, PAGE_SIZE)

    assert seen == whole  # complete, in the list's order, and no item on two pages
    assert len(set(seen)) == len(seen)
    assert pages == -(-len(whole) // PAGE_SIZE)


@pytest.mark.parametrize("name", LIST_NAMES)
async def test_a_token_from_another_list_is_invalid_page_token(lists: Lists, name: str) -> None:
    other = LIST_NAMES[(LIST_NAMES.index(name) + 1) % len(LIST_NAMES)]
    _, foreign = await lists.calls[other](1, "")
    assert foreign

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await lists.calls[name](1, foreign)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = rich_status(raised.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "INVALID_PAGE_TOKEN"


@pytest.mark.parametrize("name", LIST_NAMES)
async def test_a_negative_page_size_is_invalid_page_size(lists: Lists, name: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await lists.calls[name](-1, "")

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Refused by the validation interceptor, before the servicer, with the field's own reason.
    bad_request = rich_status(raised.value)["BadRequest"]
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    assert [(v.field, v.reason) for v in bad_request.field_violations] == [("page_size", "INVALID_PAGE_SIZE")]
