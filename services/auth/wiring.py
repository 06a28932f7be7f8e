"""What the auth service hosts, built from the process's settings and shared infrastructure.

`build` is the service's wiring. The smaller builders it is made of (`signing_key_store`,
`account_parts`) are public too: the `parley admin` commands use the same ones, so an
operator command and the running service never construct these pieces differently.

Auth persists through one `SqlUnitsOfWork` (`services.auth.repository.auth_units_of_work`); its
after-commit hooks are where cached copies of changed users die: the read cache's entries
(`read_cache_invalidation`) and this process's API-key checks (`ApiKeyManager.invalidate`). Other
replicas and the gateway's edges hear credential changes from the revocation list
(`RevocationList.credentials_changed`, announced by the API-key and session managers), which
`AuthInternalService.WatchCredentialChanges` streams to each edge.

Auth consumes billing's `subscription.changed` as the consumer group `auth`
(`services.auth.event_handlers`), so `parley serve auth` needs the streams' Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from services.auth.accounts import AccountService, AccountSettings
from services.auth.admin import AccountAdmin
from services.auth.api_keys import API_KEYS_FEATURE, DEFAULT_CACHE_TTL_S, ApiKeyManager
from services.auth.email_limits import EmailRateLimits
from services.auth.event_handlers import auth_subscription
from services.auth.login import LoginService
from services.auth.passwords import Argon2Parameters, CommonPasswords, PasswordHasher, PasswordPolicy
from services.auth.ports import AuthUnitOfWork
from services.auth.repository import auth_units_of_work
from services.auth.servicer import AuthAdminServicer, AuthDomain, AuthInternalServicer, AuthServicer
from services.auth.sessions import SessionManager
from services.auth.signing_keys import KeyEncryptionKeyError, SigningKeyStore, load_kek
from services.auth.tokens import AccessTokenIssuer
from services.common.cache import InMemoryReadCache, ReadCache, read_cache_invalidation
from services.common.context import ServiceBundle, ServiceContext
from services.common.db import Database
from services.common.identity import CachedJwksVerifier
from services.common.ratelimit import load_rate_limit_config, rate_limiter_for
from services.common.revocation import RevocationList
from services.common.server import ServiceRegistration
from services.common.settings import Settings, SettingsError
from services.common.sql_unit_of_work import SqlUnitsOfWork
from services.common.token_rules import TokenRules

_SERVICES = auth_pb2.DESCRIPTOR.services_by_name


def key_encryption_key(settings: Settings, *, embedded: bool) -> bytes:
    """The KEK from settings; embedded mode falls back to (and creates) `<data_dir>/secrets/kek`.

    A missing or malformed KEK is a `SettingsError`, reported like any other bad variable.
    """
    try:
        return load_kek(
            settings.auth_key_encryption_key.get_secret_value() if settings.auth_key_encryption_key else None,
            settings.auth_key_encryption_key_file,
            embedded_data_dir=settings.data_dir if embedded else None,
        )
    except KeyEncryptionKeyError as error:
        raise SettingsError(f"Invalid Parley settings:\n  PARLEY_AUTH_KEY_ENCRYPTION_KEY: {error}") from None


def signing_key_store(settings: Settings, database: Database, *, embedded: bool) -> SigningKeyStore:
    """The token-signing keys, sealed under the KEK, published for `access_token_ttl_s` after retirement."""
    return SigningKeyStore(
        auth_units_of_work(database),
        key_encryption_key(settings, embedded=embedded),
        access_token_ttl=timedelta(seconds=settings.access_token_ttl_s),
    )


@dataclass(frozen=True)
class AccountParts:
    """What changing accounts needs: the units of work (whose after-commit hooks drop the read
    cache's copies of changed users), password hashing and policy, and the session manager."""

    units: SqlUnitsOfWork[AuthUnitOfWork]
    common_passwords: CommonPasswords
    hasher: PasswordHasher
    policy: PasswordPolicy
    sessions: SessionManager
    read_cache: ReadCache

    def admin(self) -> AccountAdmin:
        return AccountAdmin(self.units, hasher=self.hasher, policy=self.policy, sessions=self.sessions)


def account_parts(
    settings: Settings,
    database: Database,
    revocations: RevocationList,
    read_cache: ReadCache | None = None,
) -> AccountParts:
    """`read_cache`: the one the running services read users through, so changes made here reach
    them; without one nothing is cached (nor invalidated)."""
    units = auth_units_of_work(database)
    cache = read_cache if read_cache is not None else InMemoryReadCache(max_entries=0)
    units.after_commit(read_cache_invalidation(cache))
    common_passwords = CommonPasswords()
    return AccountParts(
        units=units,
        common_passwords=common_passwords,
        hasher=PasswordHasher(Argon2Parameters()),
        policy=PasswordPolicy(common_passwords),
        sessions=SessionManager(
            units,
            revocations,
            refresh_ttl=timedelta(seconds=settings.refresh_token_ttl_s),
            access_ttl=timedelta(seconds=settings.access_token_ttl_s),
        ),
        read_cache=cache,
    )


def build(context: ServiceContext) -> ServiceBundle:
    """The auth services as every Parley process hosts them."""
    return build_bundle(context)


def build_bundle(
    context: ServiceContext, *, api_key_cache_ttl_s: float = DEFAULT_CACHE_TTL_S
) -> ServiceBundle:
    """`build` with its tunable parts exposed: `api_key_cache_ttl_s=0` turns the API-key check cache
    off (the auth benchmark compares both)."""
    settings = context.settings
    database = context.database
    signing_keys = signing_key_store(settings, database, embedded=context.embedded)
    parts = account_parts(settings, database, context.revocations, context.read_cache)
    api_keys = ApiKeyManager(
        parts.units,
        changes=context.revocations,
        cache_ttl_s=api_key_cache_ttl_s,
        require_verified_email=API_KEYS_FEATURE in settings.auth_require_verified_email_for,
    )
    # Every path that changes a user or revokes a key evicts this process's cached checks.
    parts.units.after_commit(api_keys.invalidate)
    # Shared by every auth replica through Redis, like the gateway's own counters.
    email_limiter = rate_limiter_for(settings.redis_url)
    accounts = AccountService(
        parts.units,
        hasher=parts.hasher,
        policy=parts.policy,
        sessions=parts.sessions,
        settings=AccountSettings(),
        read_cache=parts.read_cache,
        email_limits=EmailRateLimits(load_rate_limit_config(settings.rate_limits_file), email_limiter),
    )
    issuer = AccessTokenIssuer(
        signing_keys,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        ttl=timedelta(seconds=settings.access_token_ttl_s),
        revocations=context.revocations,
    )
    domain = AuthDomain(
        accounts=accounts,
        logins=LoginService(accounts, parts.sessions, issuer),
        sessions=parts.sessions,
        api_keys=api_keys,
        signing_keys=signing_keys,
    )
    # CheckSession verifies the access cookie by the same rules as every other verifier.
    cookie_verifier = CachedJwksVerifier(
        signing_keys.jwks, rules=TokenRules.of(settings), revocations=context.revocations
    )

    async def prepare() -> None:
        # Read the deny-list now, not on the first registration; make sure a signing key exists.
        parts.common_passwords.load()
        if settings.auth_signing_key_file is not None:
            await signing_keys.import_key_file(settings.auth_signing_key_file)
        await signing_keys.ensure_active_key()

    return ServiceBundle(
        registrations=[
            ServiceRegistration(
                _SERVICES["AuthService"].full_name,
                AuthServicer(domain),
                auth_pb2_grpc.add_AuthServiceServicer_to_server,
            ),
            ServiceRegistration(
                _SERVICES["AuthAdminService"].full_name,
                AuthAdminServicer(parts.admin()),
                auth_pb2_grpc.add_AuthAdminServiceServicer_to_server,
            ),
            ServiceRegistration(
                _SERVICES["AuthInternalService"].full_name,
                AuthInternalServicer(
                    parts.sessions, api_keys, cookie_verifier, context.revocations.credential_changes()
                ),
                auth_pb2_grpc.add_AuthInternalServiceServicer_to_server,
            ),
        ],
        jwks=signing_keys.jwks,
        on_start=[prepare],
        on_stop=[email_limiter.aclose],
        # The plan follows billing's subscription changes.
        subscriptions=[auth_subscription(parts.units, accounts)],
    )
