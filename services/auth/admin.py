"""Account administration: listing users, disabling and enabling them, roles, and the first admin.

Every operation here is for callers already checked to hold the admin role (the servicer's
`require_role("admin")`), except `create_admin`, which the `parley admin create-admin` command runs
with database access instead of credentials.

The invariant kept throughout: the system never ends up without an enabled administrator. Changes
that could break it lock the rows of every enabled admin first (PostgreSQL; SQLite serializes
writers), so two admins demoting or disabling each other at the same moment cannot both succeed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from parley.events.v1 import events_pb2
from services.auth.accounts import (
    DEFAULT_PLAN_ID,
    User,
    clean_display_name,
    display_name_violations,
    email_already_registered,
    invalid_fields,
    user_not_found,
)
from services.auth.emails import EMAIL_MAX, email_violations, normalize_email
from services.auth.passwords import PasswordHasher, PasswordPolicy
from services.auth.ports import AuthUnitOfWork, AuthUnitsOfWork, EmailTaken, UserQuery
from services.auth.sessions import RevokedSessions, RevokeReason, SessionManager
from services.common.clock import Clock, utc_now
from services.common.errors import FailedPrecondition, FieldViolation, InvalidArgument
from services.common.pagination import BY_TIME, Page, keyset_page
from services.common.roles import KNOWN_ROLES, ROLE_ADMIN, ROLE_USER, ordered_roles, role_values

__all__ = ["AccountAdmin", "AdminBootstrap", "DisabledUser", "UserQuery"]


@dataclass(frozen=True)
class DisabledUser:
    """A disabled user; `revoked` lists the sessions ended with it (already propagated to the
    revocation list, together with every access token the user held)."""

    user: User
    revoked: RevokedSessions


@dataclass(frozen=True)
class AdminBootstrap:
    """What `create_admin` did: `created` a new account, or promoted an existing one (`changed`
    is False when it was already an enabled admin)."""

    user: User
    created: bool
    changed: bool


class AccountAdmin:
    """The admin RPCs' domain: user listing, disable/enable, roles, and the bootstrap."""

    def __init__(
        self,
        units: AuthUnitsOfWork,
        *,
        hasher: PasswordHasher,
        policy: PasswordPolicy,
        sessions: SessionManager,
        clock: Clock = utc_now,
    ) -> None:
        self._units = units
        self._hasher = hasher
        self._policy = policy
        self._sessions = sessions
        self._clock = clock

    async def list_users(
        self, *, page_size: int = 0, page_token: str = "", filters: UserQuery | None = None
    ) -> Page[User]:
        """Users matching `filters`, newest first (created_at, then id, descending), page by page.

        A role other than "user"/"admin", or a creation range whose start is not before its end, is
        INVALID_ARGUMENT; a page token from another filter set is INVALID_PAGE_TOKEN.
        """
        query = filters or UserQuery()
        _check_query(query)

        async def fetch(after: tuple[datetime, str] | None, limit: int) -> Sequence[User]:
            async with self._units.read() as uow:
                return await uow.users.list_after(query, after=after, limit=limit)

        return await keyset_page(
            page_size=page_size,
            page_token=page_token,
            query=(
                "admin_users",
                query.text.lower(),
                query.role,
                query.plan_id,
                query.disabled,
                query.email_verified,
                query.created_at_or_after.isoformat() if query.created_at_or_after else None,
                query.created_before.isoformat() if query.created_before else None,
            ),
            sort_key=BY_TIME,
            position=lambda user: (user.created_at, user.id),
            fetch=fetch,
        )

    async def get_user(self, user_id: str) -> User:
        """The user; NOT_FOUND when there is none."""
        async with self._units.read() as uow:
            user = await uow.users.by_id(user_id)
        if user is None:
            raise user_not_found(user_id)
        return user

    async def disable_user(self, user_id: str, *, actor_id: str, reason: str = "") -> DisabledUser:
        """Disable a user: set disabled_at, end every session (reason user_disabled, with the
        actor), refuse every access token issued so far, and write `user.disabled`, in one unit of
        work; the user's cached copies and API-key checks are dropped once it commits, here and (by
        the announcement `propagate` makes) in every auth replica and gateway edge.

        Disabling an already disabled user changes nothing and writes nothing. Disabling the last
        enabled admin (yourself included) is FAILED_PRECONDITION / LAST_ADMIN. API keys are not
        revoked: they are refused while their owner is disabled and work again after `enable_user`.
        """
        now = self._clock()
        async with self._units.write() as uow:
            admins, user = await _lock_admins_and_user(uow, user_id)
            if user.disabled:
                return DisabledUser(
                    user=user,
                    revoked=RevokedSessions(
                        user_id=user.id, session_ids=(), all_sessions=False, revoked_at=now
                    ),
                )
            if user.id in admins and len(admins) == 1:
                raise _last_admin("disable")
            user = await uow.users.save(replace(user, disabled_at=now), now=now)
            revoked = await self._sessions.revoke_all_within(
                uow, user.id, reason=RevokeReason.USER_DISABLED, actor_user_id=actor_id
            )
            uow.outbox.record(
                subject=user.id,
                payload=events_pb2.UserDisabled(user_id=user.id, actor_user_id=actor_id, reason=reason[:500]),
            )
        await self._sessions.propagate(revoked)
        return DisabledUser(user=user, revoked=revoked)

    async def enable_user(self, user_id: str, *, actor_id: str) -> User:
        """Re-enable a disabled user and write `user.enabled`; they must sign in again (their
        sessions stay ended). Enabling an enabled user changes nothing and writes nothing."""
        now = self._clock()
        async with self._units.write() as uow:
            user = await uow.users.by_id(user_id, for_update=True)
            if user is None:
                raise user_not_found(user_id)
            if user.disabled:
                user = await _enable(uow, user, actor_id=actor_id, now=now)
            return user

    async def set_roles(self, user_id: str, roles: Collection[str], *, actor_id: str) -> User:
        """Replace a user's roles ("user" is always kept) and write `user.role_changed`.

        Unknown role names are INVALID_ARGUMENT (field `roles`); taking the admin role from the last
        enabled admin is FAILED_PRECONDITION / LAST_ADMIN. On any change, every access token the
        user holds is refused from now on, so their next request must refresh and gets a token with
        the new roles (their sessions stay signed in), and every cache of the user's credential
        decisions forgets them (an API key's roles change at the gateway within a second). No
        change writes nothing.
        """
        unknown = sorted(set(roles) - KNOWN_ROLES)
        if unknown:
            message = f"Unknown role(s) {', '.join(map(repr, unknown))}; roles are 'user' and 'admin'."
            raise InvalidArgument(
                message,
                reason="INVALID_ARGUMENT",
                field_violations=[
                    FieldViolation(field="roles", description=message, reason="INVALID_ARGUMENT")
                ],
            )
        wanted = ordered_roles([ROLE_USER, *roles])
        now = self._clock()
        changed = False
        async with self._units.write() as uow:
            admins, user = await _lock_admins_and_user(uow, user_id)
            previous = user.roles
            if previous != wanted:
                changed = True
                demoted = ROLE_ADMIN in previous and ROLE_ADMIN not in wanted
                if demoted and user.id in admins and len(admins) == 1:
                    raise _last_admin("remove the admin role from")
                user = await uow.users.save(replace(user, roles=wanted), now=now)
                _role_changed(uow, user.id, previous, wanted, actor_id=actor_id)
        if changed:
            # No session ends: the tokens already issued carry the old roles, so they are refused
            # and the client's refresh mints new ones from the stored roles.
            await self._sessions.propagate(
                RevokedSessions(user_id=user.id, session_ids=(), all_sessions=True, revoked_at=now)
            )
        return user

    async def create_admin(self, email: str, password: str, display_name: str) -> AdminBootstrap:
        """The `parley admin create-admin` bootstrap; safe to run again.

        No account with this email: create it verified, with roles user and admin (password policy
        applies; writes `user.registered`, `user.email_verified` and `user.role_changed` with no
        actor). An account exists: give it the admin role and re-enable it if disabled (writing
        `user.role_changed` / `user.enabled` with no actor); its password and name stay as they are.
        """
        address = normalize_email(email)
        name = clean_display_name(display_name)
        shape = [*email_violations(address), *display_name_violations(name)]
        if shape:
            raise invalid_fields(shape)
        async with self._units.read() as uow:
            exists = await uow.users.by_email(address) is not None
        if exists:
            return await self._promote(address)
        self._policy.check(password, email=address, field="password")
        password_hash = await self._hasher.hash_async(password)
        now = self._clock()
        try:
            async with self._units.write() as uow:
                user = await uow.users.add(
                    email=address,
                    display_name=name,
                    password_hash=password_hash,
                    roles=[ROLE_USER, ROLE_ADMIN],
                    plan_id=DEFAULT_PLAN_ID,
                    email_verified_at=now,
                    now=now,
                )
                uow.outbox.record(
                    subject=user.id,
                    payload=events_pb2.UserRegistered(
                        user_id=user.id, email=user.email, display_name=user.display_name
                    ),
                )
                uow.outbox.record(
                    subject=user.id,
                    payload=events_pb2.UserEmailVerified(user_id=user.id, email=user.email),
                )
                _role_changed(uow, user.id, (), user.roles, actor_id="")
        except EmailTaken:
            # Registered between our look-up and our insert: promote that account instead.
            return await self._promote(address)
        return AdminBootstrap(user=user, created=True, changed=True)

    async def _promote(self, address: str) -> AdminBootstrap:
        now = self._clock()
        async with self._units.write() as uow:
            user = await uow.users.by_email(address, for_update=True)
            if user is None:  # deleted meanwhile; nothing sensible to promote
                raise email_already_registered()
            changed = False
            previous = user.roles
            if ROLE_ADMIN not in previous:
                wanted = ordered_roles([*previous, ROLE_USER, ROLE_ADMIN])
                user = await uow.users.save(replace(user, roles=wanted), now=now)
                _role_changed(uow, user.id, previous, wanted, actor_id="")
                changed = True
            if user.disabled:
                user = await _enable(uow, user, actor_id="", now=now)
                changed = True
            return AdminBootstrap(user=user, created=False, changed=changed)


async def _lock_admins_and_user(uow: AuthUnitOfWork, user_id: str) -> tuple[list[str], User]:
    """Lock every enabled admin's row, then the target user's (NOT_FOUND when it does not exist).

    The admins first, always, so changes that could leave no enabled admin take locks in one order.
    """
    admins = await uow.users.enabled_admin_ids(for_update=True)
    user = await uow.users.by_id(user_id, for_update=True)
    if user is None:
        raise user_not_found(user_id)
    return admins, user


async def _enable(uow: AuthUnitOfWork, user: User, *, actor_id: str, now: datetime) -> User:
    enabled = await uow.users.save(replace(user, disabled_at=None), now=now)
    uow.outbox.record(
        subject=user.id, payload=events_pb2.UserEnabled(user_id=user.id, actor_user_id=actor_id)
    )
    return enabled


def _role_changed(
    uow: AuthUnitOfWork,
    user_id: str,
    previous: Collection[str],
    roles: Collection[str],
    *,
    actor_id: str,
) -> None:
    uow.outbox.record(
        subject=user_id,
        payload=events_pb2.UserRoleChanged(
            user_id=user_id,
            previous_roles=role_values(list(previous)),
            roles=role_values(list(roles)),
            actor_user_id=actor_id,
        ),
    )


def _last_admin(action: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"Cannot {action} the last enabled administrator; make another user an admin first.",
        reason="LAST_ADMIN",
    )


def _check_query(query: UserQuery) -> None:
    violations: list[FieldViolation] = []
    if query.role is not None and query.role not in KNOWN_ROLES:
        violations.append(
            FieldViolation(
                field="role", description="role must be 'user' or 'admin'.", reason="INVALID_ARGUMENT"
            )
        )
    if len(query.text) > EMAIL_MAX:
        violations.append(
            FieldViolation(
                field="query",
                description=f"query must be at most {EMAIL_MAX} characters.",
                reason="INVALID_ARGUMENT",
            )
        )
    if violations:
        raise invalid_fields(violations)
    after, before = query.created_at_or_after, query.created_before
    if after is not None and before is not None and after >= before:
        message = "create_time_after must be before create_time_before."
        raise InvalidArgument(
            message,
            reason="INVALID_TIME_RANGE",
            field_violations=[
                FieldViolation(field="create_time_after", description=message, reason="INVALID_TIME_RANGE")
            ],
        )
