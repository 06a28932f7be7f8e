"""Opaque secrets: random, hashed for storage, compared in constant time."""

from __future__ import annotations

from services.auth.opaque import matches, new_secret, secret_hash


def test_secrets_are_random_and_url_safe() -> None:
    made = {new_secret() for _ in range(100)}
    assert len(made) == 100
    assert all(len(secret) == 43 and secret.replace("-", "").replace("_", "").isalnum() for secret in made)


def test_hash_matches_only_its_secret() -> None:
    secret = new_secret()
    stored = secret_hash(secret)
    assert len(stored) == 64
    assert secret not in stored
    assert matches(secret, stored)
    assert not matches(new_secret(), stored)
    assert not matches(secret[:-1], stored)
