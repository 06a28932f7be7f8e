"""Sign-in and session refresh as the Login and RefreshSession RPCs need them: one call each.

`login` spends the email's sign-in budget, checks the credentials, starts the session and writes
`user.login_succeeded` in one unit of work (`AccountService.sign_in`), then signs the access token.
`refresh` rotates the refresh token in one unit of work (`SessionManager.refresh`), then signs the
access token from the owner's current plan and roles. Signing happens after the commit: it may wait
out a revocation cutoff's second, which must never hold a transaction open.

How the tokens travel (a token pair in the body, or cookies with a CSRF token) is the servicer's.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.auth.accounts import AccountService, User
from services.auth.sessions import AuthMethod, RefreshedSession, SessionManager, StartedSession
from services.auth.tokens import AccessTokenIssuer, IssuedAccessToken


@dataclass(frozen=True)
class LoggedIn:
    """A successful sign-in: the user, the new session with its refresh (and CSRF) token, and the
    access token; the plaintext tokens exist only here."""

    user: User
    started: StartedSession
    access: IssuedAccessToken


@dataclass(frozen=True)
class Refreshed:
    """A successful refresh: the successor refresh token (and CSRF token) and a new access token."""

    refreshed: RefreshedSession
    access: IssuedAccessToken


class LoginService:
    """Login and RefreshSession, each one domain call that ends with a signed access token."""

    def __init__(self, accounts: AccountService, sessions: SessionManager, issuer: AccessTokenIssuer) -> None:
        self._accounts = accounts
        self._sessions = sessions
        self._issuer = issuer

    async def login(
        self,
        email: str,
        password: str,
        *,
        client_ip: str,
        auth_method: AuthMethod | str,
        device_name: str = "",
        user_agent: str = "",
    ) -> LoggedIn:
        """Refusals are `AccountService.sign_in`'s (RATE_LIMITED, ACCOUNT_LOCKED, INVALID_CREDENTIALS,
        ACCOUNT_DISABLED)."""
        signed_in = await self._accounts.sign_in(
            email,
            password,
            client_ip=client_ip,
            auth_method=auth_method,
            device_name=device_name,
            user_agent=user_agent,
        )
        user, started = signed_in.user, signed_in.started
        access = await self._issuer.issue(user.id, started.session.id, user.plan_id, list(user.roles))
        return LoggedIn(user=user, started=started, access=access)

    async def refresh(self, refresh_token: str, *, ip_address: str = "", user_agent: str = "") -> Refreshed:
        """Refusals are `SessionManager.refresh`'s (REFRESH_TOKEN_INVALID, SESSION_REVOKED,
        REFRESH_TOKEN_REUSED, ACCOUNT_DISABLED)."""
        refreshed = await self._sessions.refresh(refresh_token, ip_address=ip_address, user_agent=user_agent)
        owner = refreshed.owner
        access = await self._issuer.issue(
            owner.user_id, refreshed.session.id, owner.plan_id, list(owner.roles)
        )
        return Refreshed(refreshed=refreshed, access=access)
