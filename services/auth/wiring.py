"""What the auth service hosts, built from the process's settings and shared infrastructure."""

from __future__ import annotations

from datetime import timedelta

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from services.auth.accounts import AccountService
from services.auth.admin import AccountAdmin
from services.auth.api_keys import ApiKeyManager
from services.auth.passwords import Argon2Parameters, CommonPasswords, PasswordHasher, PasswordPolicy
from services.auth.servicer import AuthAdminServicer, AuthDomain, AuthInternalServicer, AuthServicer
from services.auth.session_repository import SqlApiKeyStores, SqlSessionStores
from services.auth.sessions import SessionManager
from services.auth.signing_keys import KeyEncryptionKeyError, SigningKeyStore, load_kek
from services.auth.tokens import AccessTokenIssuer
from services.common.context import ServiceBundle, ServiceContext
from services.common.identity import CachedJwksVerifier
from services.common.server import ServiceRegistration
from services.common.settings import SettingsError

_SERVICES = auth_pb2.DESCRIPTOR.services_by_name


def build(context: ServiceContext) -> ServiceBundle:
    settings = context.settings
    database = context.database
    try:
        kek = load_kek(
            settings.auth_key_encryption_key.get_secret_value() if settings.auth_key_encryption_key else None,
            settings.auth_key_encryption_key_file,
            embedded_data_dir=settings.data_dir if context.embedded else None,
        )
    except KeyEncryptionKeyError as error:
        raise SettingsError(f"Invalid Parley settings:\n  PARLEY_AUTH_KEY_ENCRYPTION_KEY: {error}") from None
    access_ttl = timedelta(seconds=settings.access_token_ttl_s)
    signing_keys = SigningKeyStore(database, kek, access_token_ttl=access_ttl)
    common_passwords = CommonPasswords()
    hasher = PasswordHasher(Argon2Parameters())
    policy = PasswordPolicy(common_passwords)
    sessions = SessionManager(
        SqlSessionStores(database),
        context.revocations,
        refresh_ttl=timedelta(seconds=settings.refresh_token_ttl_s),
        access_ttl=access_ttl,
    )
    api_keys = ApiKeyManager(SqlApiKeyStores(database))
    domain = AuthDomain(
        accounts=AccountService(database, hasher=hasher, policy=policy, sessions=sessions),
        sessions=sessions,
        api_keys=api_keys,
        issuer=AccessTokenIssuer(
            signing_keys, issuer=settings.jwt_issuer, audience=settings.jwt_audience, ttl=access_ttl
        ),
        signing_keys=signing_keys,
    )
    admin = AccountAdmin(database, hasher=hasher, policy=policy, sessions=sessions)
    cookie_verifier = CachedJwksVerifier(
        signing_keys.jwks,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        revocations=context.revocations,
    )

    async def prepare() -> None:
        # Read the deny-list now, not on the first registration; make sure a signing key exists.
        common_passwords.load()
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
                AuthAdminServicer(admin, api_keys),
                auth_pb2_grpc.add_AuthAdminServiceServicer_to_server,
            ),
            ServiceRegistration(
                _SERVICES["AuthInternalService"].full_name,
                AuthInternalServicer(sessions, api_keys, cookie_verifier),
                auth_pb2_grpc.add_AuthInternalServiceServicer_to_server,
            ),
        ],
        jwks=signing_keys.jwks,
        on_start=[prepare],
    )
