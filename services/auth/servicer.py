"""AuthService over gRPC: decode the request, call the account/session/key domain, encode the reply."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from google.api import httpbody_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from parley.common.v1 import common_pb2
from services.auth.accounts import AccountService, User
from services.auth.admin import AccountAdmin
from services.auth.api_keys import ApiKey, ApiKeyManager
from services.auth.login import LoginService
from services.auth.ports import UserQuery
from services.auth.sessions import Session, SessionManager
from services.auth.signing_keys import SigningKeyStore
from services.auth.transport import caller_of, cleared_cookies, send_cookies, session_cookies
from services.common.call_context import current_identity
from services.common.credential_changes import CredentialChangeHub
from services.common.credentials import REFRESH_TOKEN_COOKIE, check_csrf
from services.common.encoding import timestamp_to_proto
from services.common.errors import Unauthenticated
from services.common.http_cache import JWKS_CACHE, send_cache_headers
from services.common.identity import TokenVerifier
from services.common.roles import ROLE_ADMIN, ROLE_NAMES, role_values
from services.common.safe_methods import is_safe_http_method

_AUTH_METHODS = {
    "jwt": common_pb2.AUTH_METHOD_JWT,
    "cookie": common_pb2.AUTH_METHOD_COOKIE,
    "api_key": common_pb2.AUTH_METHOD_API_KEY,
}


@dataclass(frozen=True)
class AuthDomain:
    """The collaborators every auth servicer calls."""

    accounts: AccountService
    logins: LoginService
    sessions: SessionManager
    api_keys: ApiKeyManager
    signing_keys: SigningKeyStore


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    """Self-service accounts, sessions and API keys."""

    def __init__(self, domain: AuthDomain) -> None:
        self._domain = domain

    # ---- accounts -------------------------------------------------------------------------------

    async def Register(
        self, request: auth_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RegisterResponse:
        user = await self._domain.accounts.register(request.email, request.password, request.display_name)
        return auth_pb2.RegisterResponse(user=user_to_proto(user))

    async def VerifyEmail(
        self, request: auth_pb2.VerifyEmailRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.VerifyEmailResponse:
        user = await self._domain.accounts.verify_email(request.token)
        return auth_pb2.VerifyEmailResponse(user=user_to_proto(user))

    async def ResendVerification(
        self, request: auth_pb2.ResendVerificationRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ResendVerificationResponse:
        caller = current_identity.get().require_user()
        expires = await self._domain.accounts.resend_verification(caller.user_id)
        return auth_pb2.ResendVerificationResponse(token_expire_time=timestamp_to_proto(expires))

    async def GetCurrentUser(
        self, request: auth_pb2.GetCurrentUserRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetCurrentUserResponse:
        caller = current_identity.get().require_user()
        return auth_pb2.GetCurrentUserResponse(
            user=user_to_proto(await self._domain.accounts.get_user(caller.user_id))
        )

    async def UpdateCurrentUser(
        self, request: auth_pb2.UpdateCurrentUserRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.UpdateCurrentUserResponse:
        caller = current_identity.get().require_user()
        user = await self._domain.accounts.update_profile(
            caller.user_id,
            display_name=request.user.display_name,
            update_mask=list(request.update_mask.paths),
        )
        return auth_pb2.UpdateCurrentUserResponse(user=user_to_proto(user))

    # ---- sign-in and sessions -------------------------------------------------------------------

    async def Login(
        self, request: auth_pb2.LoginRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.LoginResponse:
        caller = caller_of(context)
        use_cookies = request.token_delivery == auth_pb2.TOKEN_DELIVERY_COOKIE
        logged_in = await self._domain.logins.login(
            request.email,
            request.password,
            client_ip=caller.ip_address,
            auth_method="cookie" if use_cookies else "jwt",
            device_name=request.device_name,
            user_agent=caller.user_agent,
        )
        started, access = logged_in.started, logged_in.access
        response = auth_pb2.LoginResponse(
            user=user_to_proto(logged_in.user), session=session_to_proto(started.session)
        )
        if use_cookies:
            assert started.csrf_token is not None
            await send_cookies(
                context,
                session_cookies(
                    access_token=access.token,
                    access_expires=access.expires_at,
                    refresh_token=started.refresh_token,
                    refresh_expires=started.session.expires_at,
                    csrf_token=started.csrf_token,
                ),
            )
            response.csrf_token = started.csrf_token
        else:
            response.tokens.CopyFrom(
                token_pair(access.token, access.expires_at, started.refresh_token, started.session.expires_at)
            )
        return response

    async def RefreshSession(
        self, request: auth_pb2.RefreshSessionRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RefreshSessionResponse:
        caller = caller_of(context)
        presented = request.refresh_token or caller.cookie(REFRESH_TOKEN_COOKIE)
        if not presented:
            raise Unauthenticated("A refresh token is required.", reason="REFRESH_TOKEN_INVALID")
        outcome = await self._domain.logins.refresh(
            presented, ip_address=caller.ip_address, user_agent=caller.user_agent
        )
        refreshed, access = outcome.refreshed, outcome.access
        response = auth_pb2.RefreshSessionResponse()
        if refreshed.csrf_token is not None:
            await send_cookies(
                context,
                session_cookies(
                    access_token=access.token,
                    access_expires=access.expires_at,
                    refresh_token=refreshed.refresh_token,
                    refresh_expires=refreshed.session.expires_at,
                    csrf_token=refreshed.csrf_token,
                ),
            )
            response.csrf_token = refreshed.csrf_token
        else:
            response.tokens.CopyFrom(
                token_pair(
                    access.token, access.expires_at, refreshed.refresh_token, refreshed.session.expires_at
                )
            )
        return response

    async def Logout(
        self, request: auth_pb2.LogoutRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.LogoutResponse:
        presented = request.refresh_token or caller_of(context).cookie(REFRESH_TOKEN_COOKIE)
        if presented:
            ended = await self._domain.sessions.logout_with_refresh_token(presented)
        else:
            caller = current_identity.get().require_user()
            ended = await self._domain.sessions.logout(caller.session_id)
        await send_cookies(context, cleared_cookies())
        return auth_pb2.LogoutResponse(session_id=ended.id)

    async def ListSessions(
        self, request: auth_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ListSessionsResponse:
        caller = current_identity.get().require_user()
        page = await self._domain.sessions.list_sessions(
            caller.user_id,
            current_session_id=caller.session_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return auth_pb2.ListSessionsResponse(
            sessions=[session_to_proto(session) for session in page.items],
            next_page_token=page.next_page_token,
        )

    async def RevokeSession(
        self, request: auth_pb2.RevokeSessionRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RevokeSessionResponse:
        caller = current_identity.get().require_user()
        session = await self._domain.sessions.revoke(caller.user_id, request.session_id)
        return auth_pb2.RevokeSessionResponse(session=session_to_proto(session))

    # ---- passwords ------------------------------------------------------------------------------

    async def ForgotPassword(
        self, request: auth_pb2.ForgotPasswordRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ForgotPasswordResponse:
        await self._domain.accounts.forgot_password(request.email)
        return auth_pb2.ForgotPasswordResponse(accepted=True)

    async def ResetPassword(
        self, request: auth_pb2.ResetPasswordRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ResetPasswordResponse:
        reset = await self._domain.accounts.reset_password(request.token, request.new_password)
        return auth_pb2.ResetPasswordResponse(revoked_session_count=reset.revoked.count)

    async def ChangePassword(
        self, request: auth_pb2.ChangePasswordRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ChangePasswordResponse:
        caller = current_identity.get().require_user()
        changed = await self._domain.accounts.change_password(
            caller.user_id,
            request.current_password,
            request.new_password,
            current_session_id=caller.session_id or None,
        )
        return auth_pb2.ChangePasswordResponse(revoked_session_count=changed.revoked.count)

    # ---- API keys -------------------------------------------------------------------------------

    async def CreateApiKey(
        self, request: auth_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CreateApiKeyResponse:
        caller = current_identity.get().require_user()
        expires = request.expire_time.ToDatetime(tzinfo=UTC) if request.HasField("expire_time") else None
        created = await self._domain.api_keys.create(
            caller.user_id, name=request.name, scopes=list(request.scopes), expires_at=expires
        )
        return auth_pb2.CreateApiKeyResponse(
            api_key=api_key_to_proto(created.api_key), secret=created.plaintext
        )

    async def ListApiKeys(
        self, request: auth_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ListApiKeysResponse:
        caller = current_identity.get().require_user()
        page = await self._domain.api_keys.list_keys(
            caller.user_id,
            page_size=request.page_size,
            page_token=request.page_token,
            show_revoked=request.show_revoked,
        )
        return auth_pb2.ListApiKeysResponse(
            api_keys=[api_key_to_proto(key) for key in page.items], next_page_token=page.next_page_token
        )

    async def RevokeApiKey(
        self, request: auth_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RevokeApiKeyResponse:
        caller = current_identity.get().require_user()
        key = await self._domain.api_keys.revoke(caller.user_id, request.api_key_id)
        return auth_pb2.RevokeApiKeyResponse(api_key=api_key_to_proto(key))

    # ---- keys for verification ------------------------------------------------------------------

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        jwks = await self._domain.signing_keys.jwks()
        body = json.dumps(jwks, separators=(",", ":"), sort_keys=True).encode()
        reply = httpbody_pb2.HttpBody(content_type="application/json", data=body)
        return await send_cache_headers(context, reply, JWKS_CACHE)


# ---- encoding ----------------------------------------------------------------------------------


def user_to_proto(user: User) -> auth_pb2.User:
    message = auth_pb2.User(
        id=user.id,
        email=user.email,
        display_name=user.display_name,
        email_verified=user.email_verified,
        roles=role_values(user.roles),
        plan_id=user.plan_id,
        disabled=user.disabled,
        create_time=timestamp_to_proto(user.created_at),
        update_time=timestamp_to_proto(user.updated_at),
    )
    _set_time(message, "email_verify_time", user.email_verified_at)
    _set_time(message, "last_login_time", user.last_login_at)
    _set_time(message, "disable_time", user.disabled_at)
    return message


def session_to_proto(session: Session) -> auth_pb2.Session:
    return auth_pb2.Session(
        id=session.id,
        user_id=session.user_id,
        device=session.device,
        user_agent=session.user_agent,
        ip_address=session.ip_address,
        auth_method=_AUTH_METHODS.get(str(session.auth_method), common_pb2.AUTH_METHOD_UNSPECIFIED),
        current=session.current,
        create_time=timestamp_to_proto(session.created_at),
        last_seen_time=timestamp_to_proto(session.last_seen_at),
        expire_time=timestamp_to_proto(session.expires_at),
    )


def api_key_to_proto(key: ApiKey) -> auth_pb2.ApiKey:
    message = auth_pb2.ApiKey(
        id=key.id,
        name=key.name,
        prefix=key.display_prefix,
        last_four=key.last_four,
        scopes=list(key.scopes),
        create_time=timestamp_to_proto(key.created_at),
    )
    _set_time(message, "expire_time", key.expires_at)
    _set_time(message, "last_used_time", key.last_used_at)
    _set_time(message, "revoke_time", key.revoked_at)
    return message


def token_pair(
    access_token: str, access_expires: datetime, refresh_token: str, refresh_expires: datetime
) -> auth_pb2.TokenPair:
    return auth_pb2.TokenPair(
        access_token=access_token,
        access_token_expire_time=timestamp_to_proto(access_expires),
        refresh_token=refresh_token,
        refresh_token_expire_time=timestamp_to_proto(refresh_expires),
    )


def _set_time(message: object, field: str, moment: datetime | None) -> None:
    if moment is not None:
        getattr(message, field).CopyFrom(timestamp_to_proto(moment))


class AuthAdminServicer(auth_pb2_grpc.AuthAdminServiceServicer):
    """User administration; every RPC needs the admin role."""

    def __init__(self, admin: AccountAdmin) -> None:
        self._admin = admin

    async def ListUsers(
        self, request: auth_pb2.ListUsersRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ListUsersResponse:
        current_identity.get().require_role(ROLE_ADMIN)
        query = UserQuery(
            text=request.query,
            role=ROLE_NAMES.get(request.role) if request.role else None,
            plan_id=request.plan_id,
            disabled=request.disabled if request.HasField("disabled") else None,
            email_verified=request.email_verified if request.HasField("email_verified") else None,
            created_at_or_after=_optional_time(request, "create_time_after"),
            created_before=_optional_time(request, "create_time_before"),
        )
        page = await self._admin.list_users(
            page_size=request.page_size, page_token=request.page_token, filters=query
        )
        return auth_pb2.ListUsersResponse(
            users=[user_to_proto(user) for user in page.items], next_page_token=page.next_page_token
        )

    async def GetUser(
        self, request: auth_pb2.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetUserResponse:
        current_identity.get().require_role(ROLE_ADMIN)
        return auth_pb2.GetUserResponse(user=user_to_proto(await self._admin.get_user(request.user_id)))

    async def DisableUser(
        self, request: auth_pb2.DisableUserRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.DisableUserResponse:
        actor = current_identity.get().require_role(ROLE_ADMIN)
        disabled = await self._admin.disable_user(
            request.user_id, actor_id=actor.user_id, reason=request.reason
        )
        return auth_pb2.DisableUserResponse(
            user=user_to_proto(disabled.user), revoked_session_count=disabled.revoked.count
        )

    async def EnableUser(
        self, request: auth_pb2.EnableUserRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.EnableUserResponse:
        actor = current_identity.get().require_role(ROLE_ADMIN)
        user = await self._admin.enable_user(request.user_id, actor_id=actor.user_id)
        return auth_pb2.EnableUserResponse(user=user_to_proto(user))

    async def SetUserRoles(
        self, request: auth_pb2.SetUserRolesRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.SetUserRolesResponse:
        actor = current_identity.get().require_role(ROLE_ADMIN)
        roles = [ROLE_NAMES.get(role, "") for role in request.roles]
        user = await self._admin.set_roles(request.user_id, roles, actor_id=actor.user_id)
        return auth_pb2.SetUserRolesResponse(user=user_to_proto(user))


class AuthInternalServicer(auth_pb2_grpc.AuthInternalServiceServicer):
    """What the gateway asks: is this API key, or this cookie session, good, and for whom? And
    what changed since, so it can forget what it cached."""

    def __init__(
        self,
        sessions: SessionManager,
        api_keys: ApiKeyManager,
        verifier: TokenVerifier,
        changes: CredentialChangeHub,
    ) -> None:
        self._sessions = sessions
        self._api_keys = api_keys
        self._verifier = verifier
        self._changes = changes

    async def CheckApiKey(
        self, request: auth_pb2.CheckApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CheckApiKeyResponse:
        checked = await self._api_keys.check(request.api_key, skip_cache=request.skip_cache)
        identity = auth_pb2.Identity(
            user_id=checked.user_id,
            plan_id=checked.plan_id,
            roles=role_values(checked.roles),
            auth_method=common_pb2.AUTH_METHOD_API_KEY,
            scopes=list(checked.scopes),
            api_key_id=checked.key_id,
            email_verified=checked.email_verified,
        )
        response = auth_pb2.CheckApiKeyResponse(identity=identity)
        response.cache_ttl.FromTimedelta(self._api_keys.cache_ttl)
        return response

    async def CheckSession(
        self, request: auth_pb2.CheckSessionRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CheckSessionResponse:
        token_identity = await self._verifier.verify(request.session_cookie)
        csrf: str | None = None
        if not is_safe_http_method(request.http_method):
            csrf = checked_csrf(request.csrf_header, request.csrf_cookie)
        checked = await self._sessions.check_session(token_identity.session_id, csrf)
        identity = auth_pb2.Identity(
            user_id=checked.user_id,
            session_id=checked.session_id,
            plan_id=checked.plan_id,
            roles=role_values(checked.roles),
            auth_method=common_pb2.AUTH_METHOD_COOKIE,
            email_verified=checked.email_verified,
        )
        response = auth_pb2.CheckSessionResponse(identity=identity)
        # The answer is bound to a revocable session: the gateway may not cache it.
        response.cache_ttl.FromSeconds(0)
        return response

    async def WatchCredentialChanges(
        self, request: auth_pb2.WatchCredentialChangesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[auth_pb2.WatchCredentialChangesResponse]:
        async for news in self._changes.follow():
            message = auth_pb2.WatchCredentialChangesResponse(
                resync=news.everything, user_ids=sorted(news.user_ids)
            )
            message.confirmed_age.FromTimedelta(timedelta(seconds=news.confirmed_age_s))
            yield message


def checked_csrf(header: str, cookie: str) -> str:
    """The double-submitted CSRF token: the header must be present and equal the cookie."""
    check_csrf(header, cookie)
    return header


def _optional_time(message: object, field: str) -> datetime | None:
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    stamp: Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=UTC)
