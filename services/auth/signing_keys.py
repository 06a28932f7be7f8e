"""The Ed25519 keys that sign access tokens: stored encrypted, rotated, and published as a JWKS.

Private keys live in the `signing_keys` table encrypted with AES-256-GCM under the key-encryption key
(KEK), with the key id as associated data, so a ciphertext cannot be moved to another row. The KEK
itself never touches the database: it comes from the environment, a mounted file, or (embedded mode
only) a file created once under the data directory.

Exactly one key is active (it signs new tokens); rotation retires it, and a retired key stays in the
JWKS for as long as tokens signed with it can still be valid.

No SQL here: keys are stored through the auth unit of work's `signing_keys` repository, which also
holds the lock that serialises creations and rotations across replicas.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from services.auth.ports import AuthUnitsOfWork, StoredSigningKey
from services.common.clock import utc_now
from services.common.data_dir import secret_file

logger = logging.getLogger(__name__)

KEK_BYTES: Final = 32
SIGNING_ALGORITHM: Final = "EdDSA"
# Where embedded mode keeps the KEK it generates, relative to the data directory.
EMBEDDED_KEK_PATH: Final = Path("secrets") / "kek"
# How long a replica trusts its cached active key before checking the database for a rotation.
DEFAULT_REFRESH_INTERVAL_S: Final = 30.0
DEFAULT_ACCESS_TOKEN_TTL: Final = timedelta(minutes=15)

# Ciphertext layout: version byte, 96-bit nonce, AES-GCM ciphertext with its tag.
_CIPHERTEXT_VERSION: Final = b"\x01"
_NONCE_BYTES: Final = 12


# How long GetJwks answers from memory.
JWKS_CACHE_S = 5.0


class KeyEncryptionKeyError(ValueError):
    """The key-encryption key is missing or malformed; the message never contains the key."""


class SigningKeyDecryptionError(RuntimeError):
    """A stored signing key could not be decrypted: the KEK is not the one it was encrypted with."""


class SigningKeyImportError(ValueError):
    """A signing-key file is unreadable or not an Ed25519 private key."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode_kek(encoded: str, *, source: str) -> bytes:
    stripped = encoded.strip()
    try:
        kek = base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        raise KeyEncryptionKeyError(f"the key-encryption key from {source} is not base64url") from None
    if len(kek) != KEK_BYTES:
        raise KeyEncryptionKeyError(
            f"the key-encryption key from {source} must decode to {KEK_BYTES} bytes, not {len(kek)}"
        )
    return kek


def generate_kek() -> str:
    """A new KEK in its configuration form (base64url of 32 random bytes)."""
    return _b64url(secrets.token_bytes(KEK_BYTES))


def load_kek(value: str | None, file: Path | None, *, embedded_data_dir: Path | None) -> bytes:
    """The 32-byte KEK from `PARLEY_AUTH_KEY_ENCRYPTION_KEY`, or from the file its `_FILE` twin names.

    With neither set, embedded mode (`embedded_data_dir` given) creates `<data_dir>/secrets/kek`
    once, readable by the owner only, and reuses it on every later start; any other mode must be
    told the KEK, since replicas have to share it.
    """
    if value is not None and file is not None:
        raise KeyEncryptionKeyError(
            "set only one of PARLEY_AUTH_KEY_ENCRYPTION_KEY and PARLEY_AUTH_KEY_ENCRYPTION_KEY_FILE"
        )
    if value is not None:
        return _decode_kek(value, source="PARLEY_AUTH_KEY_ENCRYPTION_KEY")
    if file is not None:
        try:
            content = file.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as error:
            raise KeyEncryptionKeyError(
                f"cannot read the key-encryption key file {file}: {type(error).__name__}"
            ) from None
        return _decode_kek(content, source=str(file))
    if embedded_data_dir is None:
        raise KeyEncryptionKeyError(
            "the auth service needs a key-encryption key: set PARLEY_AUTH_KEY_ENCRYPTION_KEY "
            "or PARLEY_AUTH_KEY_ENCRYPTION_KEY_FILE (32 random bytes, base64url)"
        )
    return _embedded_kek(embedded_data_dir / EMBEDDED_KEK_PATH)


def _embedded_kek(path: Path) -> bytes:
    return _decode_kek(secret_file(path, generate_kek), source=str(path))


def public_jwk(private_key: Ed25519PrivateKey) -> dict[str, str]:
    """The public half as a JWK (RFC 8037), with its RFC 7638 thumbprint as `kid`."""
    x = _b64url(private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": x,
        "kid": jwk_thumbprint({"kty": "OKP", "crv": "Ed25519", "x": x}),
        "alg": SIGNING_ALGORITHM,
        "use": "sig",
    }


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members in lexicographic order, no whitespace, base64url."""
    required = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}
    members = required.get(jwk.get("kty", ""))
    if members is None:
        raise ValueError(f"no thumbprint rule for key type {jwk.get('kty')!r}")
    canonical = json.dumps({name: jwk[name] for name in members}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


@dataclass(frozen=True)
class SigningKey:
    """The key new access tokens are signed with."""

    kid: str
    private_key: Ed25519PrivateKey = field(repr=False)


@dataclass
class _CachedKey:
    key: SigningKey
    checked_at: float


class SigningKeyStore:
    """The signing keys: create, rotate, import, decrypt, publish (stored through `signing_keys`).

    Replicas share the table; each caches the active key and looks for a rotation at most every
    `refresh_interval_s`. A replica may therefore sign with a just-retired key for up to that long,
    which is why a retired key stays published for `access_token_ttl + refresh_interval_s`.
    """

    def __init__(
        self,
        units: AuthUnitsOfWork,
        kek: bytes,
        *,
        clock: Callable[[], datetime] = utc_now,
        access_token_ttl: timedelta = DEFAULT_ACCESS_TOKEN_TTL,
        refresh_interval_s: float = DEFAULT_REFRESH_INTERVAL_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if len(kek) != KEK_BYTES:
            raise KeyEncryptionKeyError(f"the key-encryption key must be {KEK_BYTES} bytes")
        self._units = units
        self._aead = AESGCM(kek)
        self._clock = clock
        self._access_token_ttl = access_token_ttl
        self._refresh_interval_s = refresh_interval_s
        self._monotonic = monotonic
        self._cached: _CachedKey | None = None
        # The JWK Set as last read, and the wall-clock time it was read for: GetJwks is hot (every
        # verifier's cache refill, the gateway's jwt_authn) and changes only on rotation.
        self._published: tuple[datetime, dict[str, list[dict[str, str]]]] | None = None
        self._refreshing = asyncio.Lock()

    @property
    def publication_window(self) -> timedelta:
        """How long a retired key stays in the JWKS after its retirement."""
        return self._access_token_ttl + timedelta(seconds=self._refresh_interval_s)

    async def ensure_active_key(self) -> str:
        """The active key's kid, creating the first Ed25519 key if there is none (safe to race)."""
        async with self._units.write() as uow:
            await uow.signing_keys.lock()
            active = await uow.signing_keys.active()
            if active is not None:
                return active.kid
            private_key = Ed25519PrivateKey.generate()
            stored = self._sealed(private_key)
            await uow.signing_keys.add(stored)
        logger.info("created the first token-signing key", extra={"kid": stored.kid})
        self._remember(SigningKey(stored.kid, private_key))
        return stored.kid

    async def rotate(self) -> str:
        """Add a new active key and retire the previous one now; returns the new kid."""
        private_key = Ed25519PrivateKey.generate()
        kid = await self._install(private_key)
        logger.info("rotated the token-signing key", extra={"kid": kid})
        return kid

    async def import_key_file(self, path: Path) -> str:
        """Make the PEM Ed25519 private key in `path` the active key, unless it is already stored.

        Returns its kid. A key that is already in the table (active or retired) is left as it is,
        so a process restarting with the same file changes nothing.
        """
        try:
            loaded = load_pem_private_key(await asyncio.to_thread(path.read_bytes), password=None)
        except (OSError, ValueError, TypeError) as error:
            raise SigningKeyImportError(
                f"cannot load a private key from {path}: {type(error).__name__}"
            ) from None
        if not isinstance(loaded, Ed25519PrivateKey):
            raise SigningKeyImportError(f"{path} holds a {type(loaded).__name__}; an Ed25519 key is needed")
        kid = public_jwk(loaded)["kid"]
        async with self._units.read() as uow:
            present = await uow.signing_keys.contains(kid)
        if present:
            return kid
        installed = await self._install(loaded, unless_present=True)
        logger.info("imported the token-signing key from %s", path, extra={"kid": installed})
        return installed

    async def active_signing_key(self) -> SigningKey:
        """The key to sign with now, from memory, re-checked against the database now and then."""
        cached = self._cached
        if cached is not None and self._monotonic() - cached.checked_at < self._refresh_interval_s:
            return cached.key
        async with self._refreshing:
            cached = self._cached
            if cached is not None and self._monotonic() - cached.checked_at < self._refresh_interval_s:
                return cached.key
            async with self._units.read() as uow:
                active = await uow.signing_keys.active()
            if active is None:
                await self.ensure_active_key()
                assert self._cached is not None
                return self._cached.key
            if cached is not None and cached.key.kid == active.kid:
                key = cached.key
            else:
                key = SigningKey(active.kid, self._decrypt(active))
            self._remember(key)
            return key

    async def jwks(self, now: datetime | None = None) -> dict[str, list[dict[str, str]]]:
        """The public JWK Set: the active key, then retired keys whose tokens may still be valid.

        Served from memory for up to JWKS_CACHE_S (a rotation in this process clears it at once).
        Another replica may start signing with a new key while this copy is that old; verifiers
        refetch on an unknown kid, so such a token verifies within seconds.
        """
        moment = self._clock() if now is None else now
        published = self._published
        if now is None and published is not None:
            age = (moment - published[0]).total_seconds()
            if 0 <= age < JWKS_CACHE_S:
                return published[1]
        async with self._units.read() as uow:
            keys = await uow.signing_keys.published(retired_after=moment - self.publication_window)
        document = {"keys": [dict(jwk) for jwk in keys]}
        if now is None:
            self._published = (moment, document)
        return document

    async def _install(self, private_key: Ed25519PrivateKey, *, unless_present: bool = False) -> str:
        stored = self._sealed(private_key)
        async with self._units.write() as uow:
            await uow.signing_keys.lock()
            if unless_present and await uow.signing_keys.contains(stored.kid):
                return stored.kid
            await uow.signing_keys.retire_active(at=stored.created_at)
            await uow.signing_keys.add(stored)
        self._remember(SigningKey(stored.kid, private_key))
        return stored.kid

    def _sealed(self, private_key: Ed25519PrivateKey) -> StoredSigningKey:
        """The key as it is stored: its public JWK and its private half encrypted under the KEK."""
        jwk = public_jwk(private_key)
        raw = private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, raw, jwk["kid"].encode("ascii"))
        return StoredSigningKey(
            kid=jwk["kid"],
            algorithm=SIGNING_ALGORITHM,
            public_jwk=jwk,
            private_key_encrypted=_CIPHERTEXT_VERSION + nonce + sealed,
            created_at=self._clock(),
            retired_at=None,
        )

    def _decrypt(self, stored: StoredSigningKey) -> Ed25519PrivateKey:
        blob = stored.private_key_encrypted
        if not blob.startswith(_CIPHERTEXT_VERSION):
            raise SigningKeyDecryptionError(f"signing key {stored.kid} is stored in an unknown format")
        nonce = blob[1 : 1 + _NONCE_BYTES]
        try:
            raw = self._aead.decrypt(nonce, blob[1 + _NONCE_BYTES :], stored.kid.encode("ascii"))
        except InvalidTag:
            raise SigningKeyDecryptionError(
                f"cannot decrypt signing key {stored.kid}: the key-encryption key "
                "(PARLEY_AUTH_KEY_ENCRYPTION_KEY) is not the one it was stored with"
            ) from None
        return Ed25519PrivateKey.from_private_bytes(raw)

    def _remember(self, key: SigningKey) -> None:
        if self._cached is None or self._cached.key.kid != key.kid:
            self._published = None
        self._cached = _CachedKey(key, self._monotonic())
