"""Contract of the signing-key store on SQLite and PostgreSQL, and of the key-encryption key's loading."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from sqlalchemy import select

from services.auth.models import SigningKeyRecord
from services.auth.repository import auth_units_of_work
from services.auth.signing_keys import (
    EMBEDDED_KEK_PATH,
    JWKS_CACHE_S,
    KeyEncryptionKeyError,
    SigningKeyDecryptionError,
    SigningKeyImportError,
    SigningKeyStore,
    generate_kek,
    jwk_thumbprint,
    load_kek,
    public_jwk,
)
from services.common.db import Database

TTL = timedelta(minutes=15)
START = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


class Ticker:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def kek() -> bytes:
    return load_kek(generate_kek(), None, embedded_data_dir=None)


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


def _store(database: Database, kek: bytes, clock: Clock, **options: object) -> SigningKeyStore:
    return SigningKeyStore(auth_units_of_work(database), kek, clock=clock, access_token_ttl=TTL, **options)  # type: ignore[arg-type]


@pytest.fixture
async def second_database(database: Database) -> AsyncIterator[Database]:
    """Another connection pool on the same database: what a second replica would have."""
    other = Database(database.url.render_as_string(hide_password=False))
    try:
        yield other
    finally:
        await other.dispose()


async def _records(database: Database) -> list[SigningKeyRecord]:
    async with database.unit_of_work(read_only=True) as session:
        return list(
            (await session.scalars(select(SigningKeyRecord).order_by(SigningKeyRecord.created_at))).all()
        )


async def test_ensure_active_key_creates_one_key_even_when_replicas_race(
    database: Database, second_database: Database, kek: bytes, clock: Clock
) -> None:
    replicas = [_store(db, kek, clock) for db in (database, second_database, database, second_database)]
    kids = await asyncio.gather(*(replica.ensure_active_key() for replica in replicas))
    assert len(set(kids)) == 1
    records = await _records(database)
    assert [record.kid for record in records] == [kids[0]]
    assert records[0].retired_at is None
    assert records[0].algorithm == "EdDSA"
    assert await replicas[0].ensure_active_key() == kids[0]
    # Every replica signs with that one key.
    signing = {(await replica.active_signing_key()).kid for replica in replicas}
    assert signing == {kids[0]}


async def test_rotate_retires_the_previous_key_and_other_replicas_follow(
    database: Database, second_database: Database, kek: bytes, clock: Clock
) -> None:
    ticker = Ticker()
    here = _store(database, kek, clock, refresh_interval_s=30, monotonic=ticker)
    there = _store(second_database, kek, clock, refresh_interval_s=30, monotonic=ticker)
    first = await here.ensure_active_key()
    assert (await there.active_signing_key()).kid == first

    clock.now = START + timedelta(hours=1)
    second = await here.rotate()
    assert second != first
    assert (await here.active_signing_key()).kid == second
    # The other replica keeps its cached key until its refresh interval is up, then follows.
    assert (await there.active_signing_key()).kid == first
    ticker.now += 30
    assert (await there.active_signing_key()).kid == second

    records = {record.kid: record for record in await _records(database)}
    assert records[first].retired_at == START + timedelta(hours=1)
    assert records[second].retired_at is None
    assert records[second].created_at == START + timedelta(hours=1)

    third = await there.rotate()
    records = {record.kid: record for record in await _records(database)}
    assert [kid for kid, record in records.items() if record.retired_at is None] == [third]


async def test_the_jwks_is_served_from_memory_for_a_few_seconds(
    database: Database, second_database: Database, kek: bytes, clock: Clock
) -> None:
    here = _store(database, kek, clock)
    there = _store(second_database, kek, clock)
    first = await here.ensure_active_key()
    assert [key["kid"] for key in (await here.jwks())["keys"]] == [first]

    # Another replica rotates: this one answers from memory until JWKS_CACHE_S has passed...
    second = await there.rotate()
    assert [key["kid"] for key in (await here.jwks())["keys"]] == [first]
    clock.now += timedelta(seconds=JWKS_CACHE_S)
    assert [key["kid"] for key in (await here.jwks())["keys"]] == [second, first]
    # ...and a rotation in this process shows at once.
    third = await here.rotate()
    assert (await here.jwks())["keys"][0]["kid"] == third


async def test_signing_uses_the_decrypted_key_that_the_jwks_publishes(
    database: Database, kek: bytes, clock: Clock
) -> None:
    store = _store(database, kek, clock)
    kid = await store.ensure_active_key()
    # A fresh store instance has nothing cached: it must decrypt the stored key.
    key = await _store(database, kek, clock).active_signing_key()
    assert key.kid == kid
    token = jwt.encode({"sub": "u"}, key.private_key, algorithm="EdDSA", headers={"kid": kid})
    (published,) = (await store.jwks())["keys"]
    verified = jwt.decode(token, jwt.PyJWK.from_dict(published).key, algorithms=["EdDSA"])
    assert verified == {"sub": "u"}
    assert set(published) == {"kty", "crv", "x", "kid", "alg", "use"}
    assert (published["kty"], published["crv"], published["alg"], published["use"]) == (
        "OKP",
        "Ed25519",
        "EdDSA",
        "sig",
    )
    assert published["kid"] == jwk_thumbprint(published)


async def test_jwks_publishes_retired_keys_only_while_their_tokens_can_live(
    database: Database, kek: bytes, clock: Clock
) -> None:
    store = _store(database, kek, clock, refresh_interval_s=30)
    first = await store.ensure_active_key()
    assert [key["kid"] for key in (await store.jwks())["keys"]] == [first]

    rotated_at = START + timedelta(hours=2)
    clock.now = rotated_at
    second = await store.rotate()
    clock.now = rotated_at + timedelta(hours=1)
    third = await store.rotate()

    window = TTL + timedelta(seconds=30)
    assert store.publication_window == window

    def kids(jwks: dict[str, list[dict[str, str]]]) -> list[str]:
        return [key["kid"] for key in jwks["keys"]]

    # Just after the second rotation: the active key first, then retired ones newest first.
    assert kids(await store.jwks(clock.now + timedelta(seconds=1))) == [third, second]
    # The first key retired two hours ago, long past its window.
    assert first not in kids(await store.jwks(rotated_at + window))
    assert kids(await store.jwks(rotated_at + window - timedelta(microseconds=1))) == [third, second, first]
    later = clock.now + window
    assert kids(await store.jwks(later - timedelta(seconds=1))) == [third, second]
    assert kids(await store.jwks(later)) == [third]
    # Without an explicit time, the store's clock decides.
    clock.now = later
    assert kids(await store.jwks()) == [third]


async def test_private_keys_are_stored_encrypted_and_a_wrong_kek_fails_clearly(
    database: Database, kek: bytes, clock: Clock
) -> None:
    with pytest.raises(KeyEncryptionKeyError, match="32 bytes"):
        SigningKeyStore(auth_units_of_work(database), kek[:16])
    store = _store(database, kek, clock)
    kid = await store.ensure_active_key()
    key = await store.active_signing_key()
    raw = key.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    (record,) = await _records(database)
    stored = bytes(record.private_key_encrypted)
    assert raw not in stored
    assert base64.b64encode(raw) not in stored
    assert base64.urlsafe_b64encode(raw).rstrip(b"=") not in stored
    assert raw.hex().encode() not in stored
    assert len(stored) == 1 + 12 + len(raw) + 16  # version, nonce, ciphertext, tag
    assert "d" not in record.public_jwk

    wrong = _store(database, load_kek(generate_kek(), None, embedded_data_dir=None), clock)
    with pytest.raises(SigningKeyDecryptionError, match="PARLEY_AUTH_KEY_ENCRYPTION_KEY") as error:
        await wrong.active_signing_key()
    assert kid in str(error.value)
    assert kek.hex() not in str(error.value)


async def test_a_ciphertext_moved_to_another_row_does_not_decrypt(
    database: Database, kek: bytes, clock: Clock
) -> None:
    store = _store(database, kek, clock)
    first = await store.ensure_active_key()
    clock.now = START + timedelta(minutes=1)
    second = await store.rotate()
    async with database.unit_of_work() as session:
        records = {record.kid: record for record in (await session.scalars(select(SigningKeyRecord))).all()}
        records[second].private_key_encrypted = records[first].private_key_encrypted
    with pytest.raises(SigningKeyDecryptionError):
        await _store(database, kek, clock).active_signing_key()


async def test_a_pem_key_file_becomes_the_active_key_once(
    database: Database, kek: bytes, clock: Clock, tmp_path: Path
) -> None:
    store = _store(database, kek, clock)
    generated = await store.ensure_active_key()

    imported_key = Ed25519PrivateKey.generate()
    pem = tmp_path / "signing.pem"
    pem.write_bytes(imported_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    clock.now = START + timedelta(minutes=5)
    kid = await store.import_key_file(pem)
    assert kid == public_jwk(imported_key)["kid"]
    active = await _store(database, kek, clock).active_signing_key()
    assert active.kid == kid
    assert active.private_key.public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw
    ) == imported_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    records = {record.kid: record for record in await _records(database)}
    assert records[generated].retired_at == START + timedelta(minutes=5)

    # Restarting with the same file changes nothing, even after a rotation retired it.
    clock.now = START + timedelta(minutes=10)
    rotated = await store.rotate()
    assert await store.import_key_file(pem) == kid
    assert (await _store(database, kek, clock).active_signing_key()).kid == rotated
    assert len(await _records(database)) == 3


async def test_a_key_file_that_is_not_ed25519_is_refused(
    database: Database, kek: bytes, clock: Clock, tmp_path: Path
) -> None:
    store = _store(database, kek, clock)
    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    with pytest.raises(SigningKeyImportError, match="Ed25519"):
        await store.import_key_file(ec_key)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(SigningKeyImportError):
        await store.import_key_file(garbage)
    with pytest.raises(SigningKeyImportError):
        await store.import_key_file(tmp_path / "missing.pem")
    assert await _records(database) == []


def test_the_thumbprint_follows_rfc_7638() -> None:
    # RFC 8037 appendix A.3: the thumbprint of its Ed25519 example key.
    jwk = {"crv": "Ed25519", "kty": "OKP", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert jwk_thumbprint(jwk) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


# ---------------------------------------------------------------------------------------------------
# The key-encryption key.
# ---------------------------------------------------------------------------------------------------


def test_the_kek_comes_from_the_value_or_a_file(tmp_path: Path) -> None:
    raw = os.urandom(32)
    encoded = base64.urlsafe_b64encode(raw).decode()
    assert load_kek(encoded, None, embedded_data_dir=None) == raw
    assert load_kek(encoded.rstrip("="), None, embedded_data_dir=tmp_path) == raw
    secret_file = tmp_path / "kek"
    secret_file.write_text(encoded + "\n")
    assert load_kek(None, secret_file, embedded_data_dir=None) == raw


def test_a_bad_or_missing_kek_is_refused_without_echoing_it(tmp_path: Path) -> None:
    short = base64.urlsafe_b64encode(b"k" * 16).decode()
    with pytest.raises(KeyEncryptionKeyError, match="32 bytes") as too_short:
        load_kek(short, None, embedded_data_dir=None)
    assert short not in str(too_short.value)
    with pytest.raises(KeyEncryptionKeyError, match="base64url"):
        load_kek("***not base64***", None, embedded_data_dir=None)
    with pytest.raises(KeyEncryptionKeyError, match="only one"):
        load_kek(generate_kek(), tmp_path / "kek", embedded_data_dir=None)
    with pytest.raises(KeyEncryptionKeyError, match="cannot read"):
        load_kek(None, tmp_path / "missing", embedded_data_dir=None)
    with pytest.raises(KeyEncryptionKeyError, match="PARLEY_AUTH_KEY_ENCRYPTION_KEY"):
        load_kek(None, None, embedded_data_dir=None)


def test_embedded_mode_creates_a_private_kek_once_and_reuses_it(tmp_path: Path) -> None:
    first = load_kek(None, None, embedded_data_dir=tmp_path)
    path = tmp_path / EMBEDDED_KEK_PATH
    assert len(first) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_kek(None, None, embedded_data_dir=tmp_path) == first
    assert [entry.name for entry in path.parent.iterdir()] == ["kek"]


async def test_concurrent_embedded_starts_agree_on_one_kek(tmp_path: Path) -> None:
    keks = await asyncio.gather(
        *(asyncio.to_thread(load_kek, None, None, embedded_data_dir=tmp_path) for _ in range(8))
    )
    assert len(set(keks)) == 1
