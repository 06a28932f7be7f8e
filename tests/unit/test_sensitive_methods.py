"""Which methods the composition root treats as sensitive: read from every contract, as the edge and
the services' revocation checks use them."""

from __future__ import annotations

from runtime.process import sensitive_methods


def test_every_contracts_sensitive_methods_and_only_them() -> None:
    assert sensitive_methods() == {
        "/parley.auth.v1.AuthService/ChangePassword",
        "/parley.auth.v1.AuthService/CreateApiKey",
        "/parley.auth.v1.AuthService/UpdateCurrentUser",
    }
